"""A model split over two devices (device_map), simulated on the CPU (defect 2): each layer is
loaded, waited for and saved on its own device's copy engine and streams. Staging used to live on
the first parameter's device only, and saves fenced only layer 0's device."""

import pytest
import torch

import cachedattn
from cachedattn.testing.fake_engine import FakeCopyEngine
from cachedattn.transfer import streams

from ..hf.models import VOCAB, tiny_model

# Installs its own stream and device provider (simulated devices the race detector does not know).
pytestmark = [pytest.mark.usefixtures("fake_engine"), pytest.mark.no_race_detector]

A, B = torch.device("cuda", 0), torch.device("cuda", 1)  # logical labels; the memory stays on the CPU
STREAM = {A: 10, B: 20}
SPLIT = 2  # layers 0, 1 on A; 2, 3 on B


class TwoDevices(streams.CudaStreams):  # is_async, synchronize: a CPU device is synchronous here
    """device_of: a layer's parameters and the KV its forward makes are on that layer's device
    (the tensors a layer's forward allocates are told apart by the layer running now)."""

    def __init__(self, model):
        self.active = A
        self.params: dict[int, torch.device] = {}
        self.known: dict[int, torch.device] = {}  # this forward's KV (freed memory comes back: forgotten per forward)
        for i, layer in enumerate(model.model.layers):
            dev = A if i < SPLIT else B
            for p in layer.parameters():
                self.params[p.untyped_storage().data_ptr()] = dev
            layer.register_forward_pre_hook(lambda m, a, i=i, dev=dev: self._enter(i, dev))
            layer.register_forward_hook(lambda m, a, k, out, i=i, dev=dev: self._note(k, i, dev), with_kwargs=True)

    def _enter(self, i, dev):
        if i == 0:
            self.known = {}
        self.active = dev

    def _note(self, kwargs, i, dev):
        cache = next((kwargs[n] for n in ("cache", "past_key_values", "past_key_value") if kwargs.get(n) is not None), None)
        if cache is not None and i < len(cache.layers) and getattr(cache.layers[i], "keys", None) is not None:
            for t in (cache.layers[i].keys, cache.layers[i].values):
                self.known[t.untyped_storage().data_ptr()] = dev
        self.active = A

    def current(self, device) -> int:
        return STREAM[torch.device(device)]

    def device_of(self, t) -> torch.device:
        ptr = t.untyped_storage().data_ptr()
        return self.params.get(ptr) or self.known.get(ptr, self.active)


def _spy(monkeypatch, name, log):
    real = getattr(FakeCopyEngine, name)

    def spy(self, *a, **k):
        log.append((id(self), name, *a))
        return real(self, *a, **k)

    monkeypatch.setattr(FakeCopyEngine, name, spy)


@pytest.mark.parametrize("readahead", [1, None])
def test_each_layer_loads_and_saves_on_its_own_devices_engine(store, monkeypatch, readahead):
    model = tiny_model("llama", num_hidden_layers=4)
    sim = TwoDevices(model)
    cachedattn.patch(model, store, readahead=readahead)
    ids = torch.randint(1, VOCAB, (1, 45), generator=torch.Generator().manual_seed(0))
    log = []
    with torch.no_grad(), streams.use(sim):
        with cachedattn.session(model, "c") as s:
            model(ids[:, :1])  # the loader exists from here on
        loader = model._cachedattn.gpu
        eng = {A: id(loader.engine_of(A)), B: id(loader.engine_of(B))}
        assert eng[A] != eng[B]
        for name in ("stream_wait_layer", "wait_for_stream", "copy_2d", "copy_batch"):
            _spy(monkeypatch, name, log)
        with cachedattn.session(model, "c") as s:
            model(ids[:, :40])  # saves 40 tokens through both devices' D2H streams
        s.last_save.result()
        fences = {(e, a[1]) for e, name, *a in log if name == "wait_for_stream" and a[0] == "d2h"}
        assert fences == {(eng[A], STREAM[A]), (eng[B], STREAM[B])}  # each device's save after its compute
        saves = [e for e, name, *a in log if name == "copy_2d"]
        assert saves.count(eng[A]) == saves.count(eng[B]) > 0  # two layers' chunks on each
        log.clear()
        with cachedattn.session(model, "c") as s:
            out = model(ids).logits
        monkeypatch.undo()
        ref = model(ids).logits[:, 40:]
    assert s.reused_tokens == 40
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    waits = [(e, a[1], a[2]) for e, name, *a in log if name == "stream_wait_layer"]
    dev = [A, A, B, B]
    assert waits == [(eng[dev[i]], i, STREAM[dev[i]]) for i in range(4)]
    loads = {(e, a[2]) for e, name, *a in log if name == "copy_batch" and a[0] == "h2d"}
    assert loads == {(eng[dev[i]], i) for i in range(4)}
