"""Tiny random fp32 models of any causal-LM architecture, built from its config
(no download): what ``python -m cachedattn compat`` checks, and what tests use
to run an architecture's real modeling code in seconds.

The config of `arch` is shrunk field by field (SHRINK, then one of VARIANTS:
different head dims, GQA ratios, expert counts and top-k, sliding windows where
the config has one), and every kind of layer the full model has (sliding and
full attention, RoPE and NoPE) still occurs in the tiny one.

It lives in cachedattn/hf/, not in a cachedattn/models/ package, because of the
dependency rule: transformers is imported only under cachedattn/hf/
(docs/architecture.md; tests/test_docs.py and tests/test_build.py check it).
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

SHRINK = {
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2, "decoder_layers": 2,
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "dim": 64,
    "intermediate_size": 128, "n_inner": 128, "ffn_dim": 128, "ffn_hidden_size": 128, "hidden_dim": 128,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "decoder_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16,
    "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "moe_intermediate_size": 32,
    "num_experts_per_tok": 2, "moe_topk": 2, "n_group": 1, "topk_group": 1,
    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "kv_lora_rank": 16, "q_lora_rank": 16,
    "vocab_size": 512,
}
_HEADS = ("num_attention_heads", "n_head", "num_heads", "decoder_attention_heads")
# Applied over SHRINK, each to the fields a config has (an int there already).
VARIANTS = (
    {},  # GQA 4:2, head_dim 16, 4 experts top-2
    {  # MQA, wide heads, 8 experts top-1, a window shorter than the conversation
        "num_key_value_heads": 1, "head_dim": 32, "num_local_experts": 8, "num_experts": 8, "n_routed_experts": 8,
        "num_experts_per_tok": 1, "moe_topk": 1, "sliding_window": 24, "attention_chunk_size": 24,
    },
    {  # MHA, narrow heads, 4 experts top-3, a window a little longer than a turn
        **{h: 8 for h in _HEADS}, "num_key_value_heads": 8, "head_dim": 8, "num_experts_per_tok": 3, "moe_topk": 3,
        "sliding_window": 40, "attention_chunk_size": 40,
    },
)


def _alternate(values: list, n: int) -> list:
    kinds = list(dict.fromkeys(values))
    return [kinds[i % len(kinds)] for i in range(n)]


def _shrink(cfg, variant: dict) -> None:
    fields = {**SHRINK, **variant}
    for sub in [cfg, *(getattr(cfg, n, None) for n in ("text_config", "decoder"))]:
        if sub is None or not hasattr(sub, "to_dict"):
            continue
        for k, v in fields.items():
            if isinstance(getattr(sub, k, None), int) and not isinstance(getattr(sub, k), bool):
                setattr(sub, k, v)
        for k in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            if isinstance(getattr(sub, k, None), int) and getattr(sub, k) >= SHRINK["vocab_size"]:
                setattr(sub, k, 1)
        n = getattr(sub, "num_hidden_layers", None)
        if not isinstance(n, int):
            continue
        # Every kind of layer the full model has must occur in the tiny one (sliding and full
        # attention, RoPE and NoPE layers): alternate them.
        for name, kinds in (("layer_types", getattr(sub, "layer_types", None)), ("no_rope_layers", [1, 0])):
            if isinstance(getattr(sub, name, None), list) and getattr(sub, name):
                try:
                    setattr(sub, name, _alternate(kinds, n))
                except AttributeError:  # derived from other fields (a property): those were shrunk already
                    pass


def tiny_model(arch: str, variant: int = 0, seed: int = 0):
    """A tiny random fp32 model of `arch` in configuration VARIANTS[variant]."""
    cfg = AutoConfig.for_model(arch)
    _shrink(cfg, VARIANTS[variant])
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()
