"""Context overflow through the GPU path (the fake copy engine on simulated devices, under the race
detector like every test here): the kept keys are re-rotated by the engine's kernel after compute
wrote them (kernels._after_compute), the host waits for the engine (truncation._rotate_on_gpu's
synchronize) before copying them back, and the stored window equals the truth, as on the CPU path."""

import pytest
import torch

import cachedattn
from cachedattn.hf import truncation

from ..hf.test_positions import CASES
from ..hf.test_truncation import W, _check_every_layer_after_overflow, _ids, _layer0_keys_from_scratch, _model

pytestmark = pytest.mark.usefixtures("fake_engine")


@pytest.fixture
def rotations(monkeypatch):
    """The layers' key lists _rotate_on_gpu was given (the GPU path's rotation, not the CPU reference)."""
    calls = []
    real = truncation._rotate_on_gpu
    monkeypatch.setattr(truncation, "_rotate_on_gpu", lambda *a: (calls.append(len(a[1])), real(*a))[1])
    return calls


@pytest.mark.parametrize("case", ["llama-default", "gpt_neox-partial", "gptj-interleaved"])
@pytest.mark.parametrize("keep_first", [0, 4])
def test_overflow_on_a_simulated_device_rotates_on_the_engine_and_stores_the_recomputed_window(
    case, keep_first, store, rotations
):
    model = _model(case)
    cachedattn.patch(model, store, max_context=W, keep_first=keep_first)
    ids = _ids(120)
    with torch.no_grad(), cachedattn.session(model, "c") as s:
        model(ids[:, :40])
        model._cachedattn.saver.wait("c")  # saves are asynchronous: what overflow finds stored is what was saved
        model(ids[:, :80])  # a history loaded through the engine: the model's GPU loader exists
        model._cachedattn.saver.wait("c")
        model(ids)  # 120 > 96: drops 48 tokens after the first keep_first
        assert s.dropped_tokens == 48 and "re-rotated" in s.position_note
    model._cachedattn.saver.wait("c")
    assert rotations == [model.config.num_hidden_layers], "the engine's rotation was not used"
    kept = torch.cat([ids[:, :keep_first], ids[:, keep_first + 48 :]], 1)
    with store.load("c", kept.shape[1]) as ld:
        got, _ = ld.read_layer(0)
    want = _layer0_keys_from_scratch(model, kept)
    assert (got.float() - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("case", ["llama-default", "gptj-interleaved"])
def test_every_layers_keys_after_overflow_on_a_simulated_device_are_the_truth(case, store, rotations):
    model = _model(case)
    cachedattn.patch(model, store, max_context=32)
    with torch.no_grad(), cachedattn.session(model, "warm-up"):
        model(_ids(20, seed=5))
        model._cachedattn.saver.wait("warm-up")
        model(_ids(24, seed=5))  # a history loaded through the engine: the model's GPU loader exists
    _check_every_layer_after_overflow(model, store, 0)
    assert rotations, "the engine's rotation was not used"
    assert CASES[case][2] == "rotate"
