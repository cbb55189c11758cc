"""Tiny random models built from configs (no downloads)."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 320
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4)

CONFIGS = {
    "llama": dict(COMMON, num_key_value_heads=2),
    "mistral": dict(COMMON, num_key_value_heads=2, sliding_window=48),
    "qwen2": dict(COMMON, num_key_value_heads=2),
    "qwen3": dict(COMMON, num_key_value_heads=2, head_dim=16),
    "gemma2": dict(COMMON, num_key_value_heads=2, head_dim=16, sliding_window=40),
    "gemma3_text": dict(COMMON, num_key_value_heads=1, head_dim=16, sliding_window=40, sliding_window_pattern=2),
    "phi3": dict(COMMON, num_key_value_heads=2, pad_token_id=0),
    "gpt_neox": dict(COMMON, rotary_pct=0.5),
    "gpt2": dict(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=2048),
    "falcon": dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4),
    "mixtral": dict(COMMON, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
}


def tiny_model(arch: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(arch, **{**CONFIGS.get(arch, COMMON), **overrides})
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager" if arch == "gpt2" else None).eval()

# Layers without RoPE (NoPE) next to RoPE layers: an overflow must rotate only the RoPE layers' keys.
NOPE = dict(COMMON, num_hidden_layers=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CONFIGS.update({
    "cohere2": dict(NOPE, sliding_window=40, layer_types=["sliding_attention", "full_attention"] * 2),
    "smollm3": dict(NOPE, no_rope_layers=[1, 0, 1, 1]),
    "llama4_text": dict(NOPE, head_dim=16, intermediate_size_mlp=96, num_local_experts=2, attention_chunk_size=40,
                        no_rope_layers=[1, 0, 1, 0]),
})
# Which layers of those hold no positions, from their configs (the probe must find the same).
NOPE_LAYERS = {"cohere2": [1, 3], "smollm3": [1], "llama4_text": [1, 3]}
