"""Position probing and key re-rotation against recomputing keys at the new positions."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from cachedattn.hf.positions import RECOMPUTE, ROTATE, UNCHANGED, probe_positions
from cachedattn.hf.probe import cache_kwarg

from .models import COMMON, VOCAB

ROPE = dict(rope_theta=10000.0)
CASES = {
    # name: (model_type, config overrides, expected kind, expected layout words)
    "llama-default": ("llama", dict(COMMON, num_key_value_heads=2), ROTATE, "rotate-half"),
    "llama-linear": ("llama", dict(COMMON, rope_parameters=dict(ROPE, rope_type="linear", factor=4.0)), ROTATE, "rotate-half"),
    "llama-llama3": ("llama", dict(COMMON, rope_parameters=dict(ROPE, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                     high_freq_factor=4.0, original_max_position_embeddings=256)), ROTATE, "rotate-half"),
    "llama-yarn": ("llama", dict(COMMON, rope_parameters=dict(ROPE, rope_type="yarn", factor=4.0,
                   original_max_position_embeddings=256)), ROTATE, "rotate-half"),
    "llama-dynamic": ("llama", dict(COMMON, rope_parameters=dict(ROPE, rope_type="dynamic", factor=2.0)), RECOMPUTE, "dynamic"),
    "phi3-longrope": ("phi3", dict(COMMON, pad_token_id=0, original_max_position_embeddings=256, max_position_embeddings=1024,
                      rope_parameters=dict(ROPE, rope_type="longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8)),
                      RECOMPUTE, "longrope"),
    "gpt_neox-partial": ("gpt_neox", dict(COMMON, rotary_pct=0.5), ROTATE, "rotary dims 8/16"),
    "phi-partial": ("phi", dict(COMMON), ROTATE, "rotate-half"),
    "gptj-interleaved": ("gptj", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8), ROTATE, "interleaved"),
    "cohere-interleaved": ("cohere", dict(COMMON, num_key_value_heads=2), ROTATE, "interleaved"),
    "gemma3-per-layer-type": ("gemma3_text", dict(COMMON, num_key_value_heads=1, head_dim=16, sliding_window=40), ROTATE, "rotate-half"),
    "gpt2-absolute": ("gpt2", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4), RECOMPUTE, "absolute"),
    "bloom-alibi": ("bloom", dict(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4), UNCHANGED, "ALiBi"),
}


def _model(arch, kw):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **kw)).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_probe_finds_the_scheme(case):
    arch, kw, kind, words = CASES[case]
    model = _model(arch, kw)
    scheme = probe_positions(model, cache_kwarg(model), model.config.get_text_config(decoder=True).num_hidden_layers)
    assert scheme.kind == kind, scheme.reason
    assert words in scheme.reason


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][2] == ROTATE])
@pytest.mark.parametrize("delta", [-700, 300])
def test_rotated_layer0_keys_equal_recomputed_keys(case, delta):
    """Keys computed at positions p, rotated by delta, equal keys computed at p + delta."""
    arch, kw, _, _ = CASES[case]
    model = _model(arch, kw)
    kwarg = cache_kwarg(model)
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    scheme = probe_positions(model, kwarg, n_layers)
    from cachedattn.hf.positions import _layer0_keys

    ids = torch.randint(1, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    at_p = _layer0_keys(model, ids, 800, kwarg)
    want = _layer0_keys(model, ids, 800 + delta, kwarg)
    got = scheme.rotate_(at_p.clone(), 0, delta)
    assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())
