"""What a vLLM request's KV depends on besides its token ids, and so which
requests the connector may serve from the store, and under which keys.

A stored block is found by its tokens (prefix_keys.py). That is exact only
when the KV follows from the tokens and the weights alone:

- ``cache_salt`` (vLLM's per-request isolation of its prefix cache, e.g. one
  per tenant) goes into the keys: requests share stored KV only with the
  same salt, as they share vLLM's own cache;
- a LoRA adapter, multimodal inputs (their placeholder tokens stand for
  image or audio features) and prompt embeddings change the KV without
  changing the token ids: such requests bypass the store (nothing loaded,
  nothing saved) and vLLM serves them alone;
- a request that asks for prompt logprobs needs every prompt token computed
  (vLLM reads no cache for it either): nothing is loaded; what it computed
  is saved as usual.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scope:
    salt: str | None = None  # vLLM's cache_salt, folded into the request's block keys
    bypass: str | None = None  # why the store neither serves nor stores this request, when it does not
    load: bool = True  # False: nothing is loaded for it (saving is fine)


def request_scope(request) -> Scope:
    if getattr(request, "lora_request", None) is not None:
        return Scope(bypass="a LoRA adapter (its KV depends on the adapter, which block keys do not name)")
    if getattr(request, "mm_features", None):
        return Scope(bypass="multimodal inputs (their placeholder tokens do not name the features)")
    if getattr(request, "prompt_embeds", None) is not None:
        return Scope(bypass="prompt embeddings (there are no token ids to key them by)")
    salt = getattr(request, "cache_salt", None)
    return Scope(salt=salt or None, load=not getattr(request, "skip_reading_prefix_cache", False))
