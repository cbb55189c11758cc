"""Which stream, which epoch and which copies each GPU load orders itself against
(the deferred fake copy engine, CACHEDATTN_FAKE_COPY_ENGINE=1)."""

import importlib
import threading

import pytest
import torch

import cachedattn
from cachedattn.testing.fake_engine import FakeCopyEngine
from cachedattn.transfer.gpu_load import GpuLoad
from cachedattn.store.load import KVLoad
from cachedattn.transfer import streams

from ..hf.models import VOCAB, tiny_model

hp = importlib.import_module("cachedattn.hf.patch")


# Installs its own stream provider (handles the race detector cannot know).
pytestmark = [pytest.mark.usefixtures("fake_engine"), pytest.mark.no_race_detector]


class Streams(streams.CudaStreams):  # is_async, synchronize: a CPU device is synchronous here
    """Simulated compute streams: `now` is the stream current on every device."""

    def __init__(self, now: int = 0):
        self.now = now

    def current(self, device) -> int:
        return self.now

    def device_of(self, t):
        return t.device


def _ids(n, seed=0):
    return torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _spy(monkeypatch, name, log):
    real = getattr(FakeCopyEngine, name)

    def spy(self, *a, **k):
        log.append((name, *a))
        return real(self, *a, **k)

    monkeypatch.setattr(FakeCopyEngine, name, spy)


def test_a_preloaded_turn_waits_on_the_stream_that_consumes_it(store, monkeypatch):
    """Defect 3: the stream was captured when the load started (the read buffer: on the engine's
    thread, another stream), so the consuming turn's kernels were never ordered after the copies."""
    model = cachedattn.patch(tiny_model("llama"), store, readahead=1)
    ids = _ids(60)
    full = torch.cat([ids, ids[:, :5]], 1)
    sim = Streams(5)
    with torch.no_grad(), streams.use(sim):
        with cachedattn.session(model, "q"):
            model(ids)
        assert hp.preload(model, "q", full)  # issued while stream 5 is current
        log = []
        _spy(monkeypatch, "stream_wait_layer", log)
        _spy(monkeypatch, "wait_for_stream", log)
        sim.now = 9  # the turn runs on another stream
        with cachedattn.session(model, "q") as s:
            out = model(full).logits
    assert s.reused_tokens == 60
    waits = [c for c in log if c[0] == "stream_wait_layer"]
    fences = [c for c in log if c[0] == "wait_for_stream" and c[1] == "h2d"]
    assert [w[2] for w in waits] == [0, 1, 2] and {w[3] for w in waits} == {9}
    assert fences and {f[2] for f in fences} == {9}  # each refill fenced after the stream that read the slot
    torch.testing.assert_close(out, model(full).logits[:, 60:], atol=1e-4, rtol=0)


def test_a_turn_under_another_stream_mid_turn_waits_on_each_layers_stream(store, monkeypatch):
    """Defect 3: the stream is asked at each update, not once per load."""
    model = cachedattn.patch(tiny_model("llama"), store, readahead=1)
    ids = _ids(40, 1)
    sim = Streams(3)
    log = []
    with torch.no_grad(), streams.use(sim):
        with cachedattn.session(model, "c"):
            model(ids)
        _spy(monkeypatch, "stream_wait_layer", log)
        real = model.model.layers[1].forward

        def on_stream_4(*a, **k):  # layer 1 onwards computes on stream 4
            sim.now = 4
            return real(*a, **k)

        monkeypatch.setattr(model.model.layers[1], "forward", on_stream_4)
        with cachedattn.session(model, "c"):
            model(torch.cat([ids, ids[:, :3]], 1))
    assert [(c[2], c[3]) for c in log] == [(0, 3), (1, 4), (2, 4)]


def test_a_preload_from_another_thread_mid_turn_leaves_the_turn_on_the_engine(store, monkeypatch):
    """Defect 4: preload() began an epoch that invalidated the running turn's layer events: the
    turn then fell back to blocking pageable host reads (or raised). Each load has its own epoch."""
    model = cachedattn.patch(tiny_model("llama"), store, readahead=1)
    ids = {c: _ids(50, i) for i, c in enumerate("pq")}
    with torch.no_grad():
        for c in "pq":
            with cachedattn.session(model, c):
                model(ids[c])
        reads = []
        real_read = KVLoad.read_layer
        monkeypatch.setattr(KVLoad, "read_layer", lambda self, *a, **k: reads.append(a) or real_read(self, *a, **k))
        real = model.model.layers[1].forward
        preloaded = []

        def preload_meanwhile(*a, **k):  # the engine's thread preloading the next job, mid-forward
            nxt = torch.cat([ids["q"], ids["q"][:, :2]], 1)
            t = threading.Thread(target=lambda: preloaded.append(hp.preload(model, "q", nxt)))
            t.start()
            t.join()
            return real(*a, **k)

        monkeypatch.setattr(model.model.layers[1], "forward", preload_meanwhile)
        full = torch.cat([ids["p"], ids["p"][:, :4]], 1)
        with cachedattn.session(model, "p") as s:
            out = model(full).logits
        monkeypatch.undo()
        monkeypatch.setenv("CACHEDATTN_FAKE_COPY_ENGINE", "1")
        assert preloaded == [True] and s.reused_tokens == 50
        assert reads == []  # every layer came through the engine
        torch.testing.assert_close(out, model(full).logits[:, 50:], atol=1e-4, rtol=0)
        with cachedattn.session(model, "q") as s:  # and the preload is still good
            out = model(torch.cat([ids["q"], ids["q"][:, :2]], 1)).logits
        assert s.reused_tokens == 50
        ref = model(torch.cat([ids["q"], ids["q"][:, :2]], 1)).logits[:, 50:]
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_closing_a_turn_does_not_wait_for_the_next_jobs_preload(store):
    """Defect 6: close() waited for the whole H2D stream, so job N's end blocked on job N+1's
    read buffer. It waits for its own last copy only."""
    model = cachedattn.patch(tiny_model("llama"), store, readahead=2)
    ids = {c: _ids(50, i) for i, c in enumerate("pq")}
    with torch.no_grad():
        for c in "pq":
            with cachedattn.session(model, c):
                model(ids[c])
        eng = model._cachedattn.gpu.engine
        assert isinstance(eng, FakeCopyEngine)
        with cachedattn.session(model, "p") as s:
            s.on_first_token = lambda: hp.preload(model, "q", torch.cat([ids["q"], ids["q"][:, :2]], 1))
            model(torch.cat([ids["p"], ids["p"][:, :4]], 1))
        assert eng.pending("h2d") > 0  # the preload's copies: still in flight after the turn closed
        with cachedattn.session(model, "q") as s:
            out = model(torch.cat([ids["q"], ids["q"][:, :2]], 1)).logits
        assert s.reused_tokens == 50 and eng.pending("h2d") == 0
        ref = model(torch.cat([ids["q"], ids["q"][:, :2]], 1)).logits[:, 50:]
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_a_full_attention_history_is_copied_once_into_the_layers_own_tensor(store, monkeypatch):
    """Defect 12: the history went staging slot -> permuted copy -> slice copy -> cat (three device
    copies per layer). Now the slot is copied straight into the front of the tensor the layer holds."""
    model = cachedattn.patch(tiny_model("llama"), store, readahead=2)
    ids = _ids(40, 3)
    targets = []
    real = GpuLoad.layer

    def spy(self, i, k_out=None, v_out=None, **kw):
        k, v = real(self, i, k_out, v_out, **kw)
        targets.append((i, k.data_ptr(), v.data_ptr()))
        return k, v

    monkeypatch.setattr(GpuLoad, "layer", spy)
    with torch.no_grad():
        with cachedattn.session(model, "c"):
            model(ids)
        with cachedattn.session(model, "c") as s:
            model(torch.cat([ids, ids[:, :3]], 1))
    cache = s._last.cache
    assert [t[0] for t in targets] == [0, 1, 2]
    for i, kp, vp in targets:
        assert (cache.layers[i].keys.data_ptr(), cache.layers[i].values.data_ptr()) == (kp, vp)


def test_a_model_moved_to_another_device_drops_its_old_read_buffer(store):
    """for_model replaced the loader on a device change without dropping its preloaded load: the
    conversation stayed leased (in use, never evictable) for as long as the process lived."""
    model = cachedattn.patch(tiny_model("llama"), store)
    ids = _ids(40, 4)
    with torch.no_grad():
        with cachedattn.session(model, "q"):
            model(ids)
        assert hp.preload(model, "q", torch.cat([ids, ids[:, :3]], 1))
        old = model._cachedattn.gpu
        held = old._ahead[2].load
        old.devices = [(torch.device("meta"), torch.device("meta"))] * 3  # as if the model had moved since
        with cachedattn.session(model, "other"):
            model(ids[:, :5])
    assert model._cachedattn.gpu is not old
    assert held._closed and old.preloaded_conversation() is None
