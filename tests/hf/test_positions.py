"""Position probing and key re-rotation against recomputing keys at the new positions."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from cachedattn.hf.positions import RECOMPUTE, ROTATE, UNCHANGED, layer_keys, probe_positions
from cachedattn.hf.probe import cache_kwarg

from .models import COMMON, CONFIGS, NOPE_LAYERS, VOCAB

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
    # RoPE and NoPE layers in one model
    "cohere2-nope": ("cohere2", CONFIGS["cohere2"], ROTATE, "interleaved in layers 0,2; no positions (NoPE) in layers 1,3"),
    "smollm3-nope": ("smollm3", CONFIGS["smollm3"], ROTATE, "rotate-half in layers 0,2,3; no positions (NoPE) in layers 1"),
    "llama4-nope": ("llama4_text", CONFIGS["llama4_text"], ROTATE,
                    "interleaved in layers 0,2; no positions (NoPE) in layers 1,3"),
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


def _n_layers(model):
    return model.config.get_text_config(decoder=True).num_hidden_layers


@pytest.mark.parametrize("arch", list(NOPE_LAYERS))
def test_nope_layers_are_found_in_every_layer_not_layer_0_alone(arch):
    """The configs' NoPE layers (no_rope_layers / full-attention layers of cohere2) come out
    unchanged, every other layer rotates; the probe does not read the configs."""
    model = _model(arch, CONFIGS[arch])
    scheme = probe_positions(model, cache_kwarg(model), _n_layers(model))
    assert scheme.kind == ROTATE
    assert [i for i, lp in enumerate(scheme.layers) if lp.kind == UNCHANGED] == NOPE_LAYERS[arch]
    assert all(lp.kind == ROTATE for i, lp in enumerate(scheme.layers) if i not in NOPE_LAYERS[arch])


def test_gemma3_layers_get_their_own_layer_types_frequencies():
    arch, kw, _, _ = CASES["gemma3-per-layer-type"]
    model = _model(arch, dict(kw, layer_types=["sliding_attention", "full_attention", "sliding_attention"], rope_parameters=dict(
        sliding_attention=dict(rope_type="default", rope_theta=10000.0),
        full_attention=dict(rope_type="default", rope_theta=1000000.0))))
    scheme = probe_positions(model, cache_kwarg(model), _n_layers(model))
    rotary = model.model.rotary_emb
    for i, t in enumerate(model.config.layer_types):
        assert torch.equal(scheme.layers[i].inv_freq, getattr(rotary, f"{t}_inv_freq").float())
    assert len({tuple(lp.inv_freq.tolist()) for lp in scheme.layers}) == 2


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][2] == ROTATE])
@pytest.mark.parametrize("delta", [-700, 300])
def test_rotated_keys_of_every_layer_equal_keys_of_the_shifted_sequence(case, delta):
    """The whole sequence moved by delta keeps every relative position, so each layer's
    keys at p + delta are that layer's keys at p rotated by its own RoPE (NoPE layers: equal)."""
    arch, kw, _, _ = CASES[case]
    model = _model(arch, kw)
    kwarg = cache_kwarg(model)
    scheme = probe_positions(model, kwarg, _n_layers(model))
    ids = torch.randint(1, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    at_p = layer_keys(model, ids, 800, kwarg)
    want = layer_keys(model, ids, 800 + delta, kwarg)
    for layer, (a, w) in enumerate(zip(at_p, want)):
        got = scheme.rotate_(a.clone(), layer, delta)
        assert (got - w).abs().max().item() <= 1e-4 * max(1.0, w.abs().max().item()), layer
        if scheme.layers[layer].kind == UNCHANGED:
            assert torch.equal(got, a)  # a NoPE layer's keys are left alone
