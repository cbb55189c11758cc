"""Which generate() decoding modes a session serves, decided before any work.

Served: greedy, sampling, beam search, beam sampling (several returned
sequences included), and assisted decoding with a draft model or prompt
lookup. Their decoding loops use the cache only through update() and the
row operations StoreBackedCache follows (reorder, select, repeat, crop).
Refused, with the mode named: modes that transformers serves from Hub code
(contrastive search, DoLa, group and constrained beam search),
`custom_generate`, drafting from the model itself (`assistant_early_exit`,
`use_mtp`) and `token_healing` (it rewrites the prompt after the stored
prefix was matched). Their loops are code the session cannot check.
"""

from __future__ import annotations

import copy

from transformers.generation.configuration_utils import GenerationMode

SERVED = (
    GenerationMode.GREEDY_SEARCH,
    GenerationMode.SAMPLE,
    GenerationMode.BEAM_SEARCH,
    GenerationMode.BEAM_SAMPLE,
    GenerationMode.ASSISTED_GENERATION,
)
# generate() arguments that are not GenerationConfig fields
_NOT_CONFIG = {
    "generation_config", "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus",
    "assistant_model", "streamer", "negative_prompt_ids", "negative_prompt_attention_mask", "use_model_defaults",
    "custom_generate", "trust_remote_code", "tokenizer", "assistant_tokenizer",
}  # fmt: skip


def _refuse(what: str) -> None:
    raise ValueError(
        f"{what} is not served inside a cachedattn session (served: "
        + ", ".join(m.value for m in SERVED)
        + "); call generate() outside the session to run it without the store"
    )


def check_generate(model, kwargs: dict) -> GenerationMode:
    """The decoding mode generate(**kwargs) will run; raises ValueError naming it if a session cannot serve it."""
    if kwargs.get("custom_generate") is not None:
        _refuse(f"custom_generate={kwargs['custom_generate']!r}")
    gc = copy.deepcopy(kwargs.get("generation_config") or model.generation_config)
    gc.update(**{k: v for k, v in kwargs.items() if k not in _NOT_CONFIG})
    mode = gc.get_generation_mode(kwargs.get("assistant_model"))
    if mode not in SERVED:
        _refuse(f"decoding mode {mode.value!r}")
    if getattr(gc, "assistant_early_exit", None) is not None:
        _refuse("assisted decoding with assistant_early_exit (the model drafting with its own early layers)")
    if getattr(gc, "use_mtp", False):
        _refuse("multi-token-prediction drafting (use_mtp)")
    if getattr(gc, "token_healing", False):
        _refuse("token_healing")
    return mode
