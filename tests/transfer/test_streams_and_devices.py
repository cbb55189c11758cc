"""The GPU path under the race detector with more than one stream and device:
a turn on a non-default stream, a read buffer consumed on another stream
(defect 3 of issue 20), layers split over two simulated devices (defect 2),
and the history lengths that make a layer's plan one chunk (defect 1). Each
failed under the detector before its fix (branch gpufix); the first one also
before the staging buffer's allocating stream was fenced (a fresh buffer's
block may still be used by kernels queued on the stream that allocated it).
"""

import pytest
import torch

import importlib

import cachedattn

from ..hf.models import VOCAB, tiny_model

hp = importlib.import_module("cachedattn.hf.patch")  # `cachedattn.hf.patch` as an attribute is the function


@pytest.fixture(autouse=True)
def fake_engine(monkeypatch):
    monkeypatch.setenv("CACHEDATTN_FAKE_COPY_ENGINE", "1")


@pytest.fixture
def store(tmp_path):
    s = cachedattn.AttentionStore(host_bytes=64 << 20, disk_dir=str(tmp_path / "kv"), chunk_tokens=16, hugepages="off")
    yield s
    s.close()


def _ids(n, seed=7):
    return torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _turn(model, ids, reused):
    with cachedattn.session(model, "c") as s:
        out = model(ids).logits
    assert s.reused_tokens == reused
    model._cachedattn.saver.wait("c")
    return out


def _matches_recompute(out, model, ids, reused):
    torch.testing.assert_close(out, model(ids).logits[:, reused:], atol=1e-4, rtol=0)


def test_a_turn_on_a_non_default_stream_is_ordered(store, race_detector):
    det = race_detector
    model = tiny_model("llama")
    cachedattn.patch(model, store, readahead=1)
    ids = _ids(70)
    with torch.no_grad():
        _turn(model, ids[:, :40], 0)
        side = det.sim.stream(0, 1)
        with det.sim.stream_ctx(side):  # torch.cuda.stream(side): load, compute and save all on it
            out = _turn(model, ids, 40)
            ref = model(ids).logits[:, 40:]
        det.wait_stream(det.sim.current_stream(), side)  # the caller's stream waits before it reads the logits
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
        _matches_recompute(_turn(model, torch.cat([ids, ids[:, :9]], 1), 70), model, torch.cat([ids, ids[:, :9]], 1), 70)
    assert det.sim.stream(0, 1).handle != det.sim.stream(0, 0).handle and det.ops > 0


def test_a_read_buffer_consumed_on_another_stream_is_ordered(store, race_detector):
    det = race_detector
    model = tiny_model("llama")
    cachedattn.patch(model, store, readahead=1)
    ids = _ids(70)
    with torch.no_grad():
        _turn(model, ids[:, :40], 0)
        assert hp.preload(model, "c", ids)  # issued while stream 0 is current
        with det.sim.stream_ctx(det.sim.stream(0, 1)):  # the next job runs on stream 1
            out = _turn(model, ids, 40)
    det.check()
    _matches_recompute(out, model, ids, 40)


def test_layers_on_two_simulated_devices_are_loaded_and_saved_on_their_own(store, race_detector):
    det = race_detector
    model = tiny_model("llama")
    det.split_layers(model, [0, 0, 1])
    cachedattn.patch(model, store, readahead=1)
    ids = _ids(70)
    with torch.no_grad():
        _turn(model, ids[:, :40], 0)
        out = _turn(model, ids, 40)
        _matches_recompute(out, model, ids, 40)
    det.check()


def test_a_model_split_over_two_devices_without_the_cache_is_ordered(race_detector):
    """The simulation itself: device_map-like moves order the devices' streams (no cachedattn involved)."""
    det = race_detector
    model = tiny_model("llama")
    det.split_layers(model, [0, 1, 1])
    with torch.no_grad():
        out = model(_ids(20)).logits
    assert det.sim.placed(out) == 0 and det.sim.placed(next(model.model.layers[2].parameters())) == 1
    det.check()


# Defect 1: a layer plan of one chunk placed a *view* of the staging slot, refilled before the cache read it.
@pytest.mark.parametrize("arch,history", [("llama", 16), ("gemma3_text", 10)])
def test_a_one_chunk_history_with_readahead_below_the_layer_count_is_ordered(arch, history, store, race_detector):
    model = tiny_model(arch)
    cachedattn.patch(model, store, readahead=1)
    ids = _ids(history + 5)
    with torch.no_grad():
        _turn(model, ids[:, :history], 0)
        race_detector.check()  # the first turn is clean: what follows is the cached one
        out = _turn(model, ids, history)
    race_detector.check()  # reported even where the fake engine's timing left the data right
    _matches_recompute(out, model, ids, history)
