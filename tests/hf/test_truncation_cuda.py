"""Overflow on a GPU: the kept keys are re-rotated by the copy engine's kernel, not on the CPU,
and the stored window equals the one the CPU reference produces. Skipped without a GPU."""

import pytest
import torch

import cachedattn
from cachedattn.hf import truncation

from .test_truncation import W, _ids, _layer0_keys_from_scratch, _model

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("case", ["llama-default", "gpt_neox-partial", "gptj-interleaved"])
@pytest.mark.parametrize("keep_first", [0, 4])
def test_overflow_on_a_gpu_rotates_there_and_stores_the_recomputed_window(case, keep_first, make_store, monkeypatch):
    calls = []
    real = truncation._rotate_on_gpu
    monkeypatch.setattr(truncation, "_rotate_on_gpu", lambda *a: (calls.append(a[3]), real(*a)))
    model = _model(case).cuda()
    store = make_store()
    cachedattn.patch(model, store, max_context=W, keep_first=keep_first)
    ids = _ids(120).cuda()
    with torch.no_grad():
        with cachedattn.session(model, "c") as s:
            model(ids[:, :80])
            model(ids)
            assert s.dropped_tokens == 48 and "re-rotated" in s.position_note
    assert len(calls) == 1, "the GPU rotation was not used"
    kept = torch.cat([ids[:, :keep_first], ids[:, keep_first + 48 :]], 1)
    with store.load("c", kept.shape[1]) as ld:
        got, _ = ld.read_layer(0)
    want = _layer0_keys_from_scratch(model, kept).cpu()
    assert (got.float() - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("case", ["llama-default", "gpt_neox-partial", "gptj-interleaved"])
def test_rotate_on_gpu_equals_the_cpu_reference(case, make_store):
    from cachedattn import native

    model = _model(case)
    cachedattn.patch(model, make_store())
    scheme, cfg = model._cachedattn.positions, model.config
    n_layers, heads = cfg.num_hidden_layers, cfg.num_key_value_heads if hasattr(cfg, "num_key_value_heads") else cfg.num_attention_heads
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(1)
    full = [torch.randn(heads, 40, head_dim, generator=g) for _ in range(n_layers)]
    want = [t.clone() for t in full]
    for layer, t in enumerate(want):
        scheme.rotate_(t[:, 4:], layer, -48)
    engine = native.CopyEngine(0, n_layers)
    truncation._rotate_on_gpu(scheme, [t[:, 4:] for t in full], -48, engine, torch.device("cuda"))
    for layer, (a, b) in enumerate(zip(full, want)):
        assert (a - b).abs().max().item() <= 1e-5, f"layer {layer}"
        assert torch.equal(a[:, :4], b[:, :4])  # the sinks are not moved
