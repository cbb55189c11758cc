"""What a model's KV cache looks like, found by running it, not from a list.

patch() runs the model once on a few random tokens with a fresh DynamicCache
built from its config and reads what every layer stored: shape and dtype of
keys and values, which layers are sliding windows, and whether any layer
holds something a per-token KV store cannot serve (recurrent or linear
attention state, keys and values of different shapes as in multi-latent
attention, layers sharing another layer's KV). Such models are refused with
the reason.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from cachedattn.hf.identity import WeightsIdentity
from cachedattn.hf.weights import model_digest
from cachedattn.store import KVSpec

PROBE_TOKENS = 5
# The incremental-decoding check: a longer sequence, cut at several points.
CHECK_TOKENS = 16
CHECK_CUTS = (1, 3, 8, 15)
# A sliding window is checked past its end when it is at most this long (one forward of that many tokens).
WINDOW_CHECK_MAX = 8192


class UnsupportedModel(ValueError):
    """A model whose cached state a per-token KV store cannot reproduce."""


@dataclass
class ModelKV:
    spec: KVSpec
    sliding: list[int | None]  # window per layer, None for full attention
    devices: list[torch.device]
    cache_kwarg: str  # "cache" (transformers >= 5.24) or "past_key_values"
    identity: WeightsIdentity  # the weights the store's KV belongs to; checked at every turn


def cache_kwarg(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _probe_ids(cfg, n: int, device) -> torch.Tensor:
    """n random tokens from a private generator (probing must not move the caller's random
    state), with the pad token, where the config names one, early in the sequence: some
    models derive positions from the token ids (RoBERTa counts non-pad tokens), which a cache
    that counts stored tokens does not reproduce once a pad id has been seen."""
    text = cfg.get_text_config(decoder=True)
    vocab = getattr(text, "vocab_size", None) or 100
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(vocab, 1000), (1, n), generator=gen)
    pad = getattr(text, "pad_token_id", None)
    if isinstance(pad, int) and not isinstance(pad, bool) and 0 <= pad < vocab and n > 2:
        ids[0, 2] = pad
    return ids.to(device)


def _check_incremental(model, kwarg: str, dtype, sliding: list[int | None]) -> None:
    """Refuses models whose cached decoding does not reproduce a full forward: serving them
    from a KV store would silently change their output. Two ways it fails, both checked at
    several cut points of a random sequence: a token's logits depend on later tokens
    (bidirectional attention, e.g. an encoder without is_decoder=True), or the tokens after
    a cut are computed differently with the history cached than in one forward (positions
    derived from the token ids, as RoBERTa's padding_idx positions); and once past the longest
    sliding window, the cache and the model's mask must have dropped the same tokens."""
    ids = _probe_ids(model.config, CHECK_TOKENS, model.device)
    # fp32 to the compat checker's 1e-4; half precision only catches gross differences.
    rel = 1e-4 if dtype == torch.float32 else 5e-2
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits[0].float()
        tol = rel * max(1.0, full.abs().max().item())
        for cut in CHECK_CUTS:
            prefix = model(input_ids=ids[:, :cut], use_cache=False).logits[0].float()
            diff = (full[:cut] - prefix).abs().max().item()
            if not diff <= tol:
                raise UnsupportedModel(
                    f"{model.config.model_type}: a token's logits depend on later tokens (logits of the first {cut} "
                    f"tokens change by {diff:.2e} when more follow: bidirectional attention, e.g. an encoder without "
                    "is_decoder=True), so no KV cache can reproduce a full forward"
                )
            cache = DynamicCache(config=model.config)
            model(input_ids=ids[:, :cut], use_cache=True, **{kwarg: cache})
            inc = model(input_ids=ids[:, cut:], use_cache=True, **{kwarg: cache}).logits[0].float()
            _compare_incremental(model, full[cut:], inc, cut, tol)
    windows = [w for w in sliding if w is not None]
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    # Bounded cost at patch time: windows longer than WINDOW_CHECK_MAX tokens go unchecked.
    if windows and max(windows) + 4 <= min(WINDOW_CHECK_MAX, limit if isinstance(limit, int) and limit > 0 else WINDOW_CHECK_MAX):
        # Past the longest window the cache has dropped tokens: the model's own mask must have
        # dropped the same ones (moshi's full forward attends to all of them).
        n = max(windows) + 4
        ids = _probe_ids(model.config, n, model.device)
        with torch.no_grad():
            full = model(input_ids=ids, use_cache=False).logits[0, n - 3:].float()
            cache = DynamicCache(config=model.config)
            model(input_ids=ids[:, : n - 3], use_cache=True, **{kwarg: cache})
            inc = model(input_ids=ids[:, n - 3:], use_cache=True, **{kwarg: cache}).logits[0].float()
        _compare_incremental(model, full, inc, n - 3, rel * max(1.0, full.abs().max().item()))


def _compare_incremental(model, full, inc, cut: int, tol: float) -> None:
    diff = (full - inc).abs().max().item()
    if not diff <= tol:
        raise UnsupportedModel(
            f"{model.config.model_type}: decoding with a KV cache does not reproduce a full forward (logits after "
            f"{cut} cached tokens differ by {diff:.2e}; e.g. positions derived from the token ids, or a sliding "
            "window the cache keeps and the model's mask does not), so stored KV could not be served exactly"
        )


def probe(model) -> ModelKV:
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        raise UnsupportedModel(f"{cfg.model_type}: encoder-decoder models are not served (decoder-only causal LMs only)")
    for attr in ("kv_lora_rank", "q_lora_rank"):
        if getattr(cfg, attr, None):
            raise UnsupportedModel(f"{cfg.model_type}: multi-latent attention ({attr}) caches a compressed latent")
    kwarg = cache_kwarg(model)
    cache = DynamicCache(config=cfg)
    vocab = getattr(cfg.get_text_config(decoder=True), "vocab_size", None) or 100
    # A private generator: probing must not move the caller's random state.
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(vocab, 1000), (1, PROBE_TOKENS), generator=gen).to(model.device)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, **{kwarg: cache})
    except Exception as e:  # any failure here means we cannot serve it
        raise UnsupportedModel(f"{cfg.model_type}: running it with a DynamicCache failed: {type(e).__name__}: {e}") from e
    layers = getattr(cache, "layers", [])
    for i, layer in enumerate(layers):
        name = type(layer).__name__
        if "Linear" in name or hasattr(layer, "conv_states") or hasattr(layer, "recurrent_states"):
            raise UnsupportedModel(f"{cfg.model_type}: layer {i} keeps recurrent/linear-attention state ({name})")
    if not layers or all(getattr(layer, "keys", None) is None or layer.keys.numel() == 0 for layer in layers):
        raise UnsupportedModel(f"{cfg.model_type}: the model does not use a KV cache (it stored nothing in one)")
    shapes, sliding, devices, dtype = [], [], [], None
    for i, layer in enumerate(layers):
        name = type(layer).__name__
        if "Dummy" in name or getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            raise UnsupportedModel(f"{cfg.model_type}: layer {i} stores no KV of its own (KV shared between layers)")
        if "Static" in name or "Quantized" in name or "Indexed" in name:
            raise UnsupportedModel(f"{cfg.model_type}: layer {i} uses an unsupported cache layer ({name})")
        k, v = layer.keys, layer.values
        window = getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None
        kept = PROBE_TOKENS if window is None else min(PROBE_TOKENS, window - 1)
        if k.dim() != 4 or k.shape[0] != 1 or k.shape[-2] != kept or k.shape != v.shape:
            raise UnsupportedModel(
                f"{cfg.model_type}: layer {i} caches keys {tuple(k.shape)} and values {tuple(v.shape)}; a per-token "
                "store needs [1, heads, tokens, head_dim] for both (multi-latent or compressed attention?)"
            )
        if dtype is not None and k.dtype != dtype:
            raise UnsupportedModel(f"{cfg.model_type}: layers cache different dtypes")
        dtype = k.dtype
        shapes.append((k.shape[1], k.shape[3]))
        sliding.append(window)
        devices.append(k.device)
    n_layers = getattr(cfg.get_text_config(decoder=True), "num_hidden_layers", len(layers))
    if len(layers) != n_layers:
        raise UnsupportedModel(f"{cfg.model_type}: {len(layers)} cache layers for {n_layers} decoder layers")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise UnsupportedModel(f"{cfg.model_type}: KV dtype {dtype} is not supported")
    _check_incremental(model, kwarg, dtype, sliding)
    try:
        identity = WeightsIdentity(model)  # hashes every weight byte (~0.2 s per GB on one CPU core)
    except Exception as e:  # without a digest, stored KV could be served to other weights
        raise UnsupportedModel(f"{cfg.model_type}: cannot hash its weights: {type(e).__name__}: {e}") from e
    digest = model_digest(cfg.to_dict(), identity.digest)
    return ModelKV(KVSpec(tuple(shapes), dtype, digest), sliding, devices, kwarg, identity)
