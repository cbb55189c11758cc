"""GPU staging memory is bounded (defect 5): by default a staging buffer holds STAGED_LAYERS layer
slots, ring-reused, not every layer's history; it grows with slack, shrinks when turns need far
less than it holds, and trim() frees idle buffers (the fake engine, CACHEDATTN_FAKE_COPY_ENGINE=1)."""

import pytest
import torch

import cachedattn
from cachedattn.transfer import staging
from cachedattn.transfer.gpu_load import STAGED_LAYERS, GpuLoad, GpuLoader

from ..hf.models import VOCAB, tiny_model

LAYERS = STAGED_LAYERS + 3


pytestmark = pytest.mark.usefixtures("fake_engine")


def _turns(model, conv, n, seed=0):
    ids = torch.randint(1, VOCAB, (1, n + 4), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        with cachedattn.session(model, conv):
            model(ids[:, :n])
        with cachedattn.session(model, conv) as s:
            out = model(ids).logits
        ref = model(ids).logits[:, n:]
    assert s.reused_tokens == n
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_the_default_stages_a_few_layers_not_every_layers_history(store, monkeypatch):
    slots = []
    real = GpuLoad.__init__

    def spy(self, *a, **k):
        real(self, *a, **k)
        (part,) = self._parts.values()  # one device
        slots.append((self.readahead, self._slot_bytes, part.staging.buffers[part.buffer].numel()))

    monkeypatch.setattr(GpuLoad, "__init__", spy)
    model = cachedattn.patch(tiny_model("llama", num_hidden_layers=LAYERS), store)  # readahead=None
    _turns(model, "c", 200)
    (r, slot, held), = slots
    assert r == STAGED_LAYERS < LAYERS
    assert r * slot <= held <= max(int(r * slot * 1.25) + staging.ALIGN, staging.ALIGN)


def test_an_explicit_readahead_still_stages_every_layer_when_asked(store, monkeypatch):
    seen = []
    real = GpuLoad.__init__

    def spy(self, *a, **k):
        real(self, *a, **k)
        seen.append(self.readahead)

    monkeypatch.setattr(GpuLoad, "__init__", spy)
    model = cachedattn.patch(tiny_model("llama", num_hidden_layers=LAYERS), store, readahead=LAYERS)
    _turns(model, "c", 40)
    assert seen == [LAYERS]


def test_staging_shrinks_after_a_long_conversation_and_trim_frees_it(store):
    model = cachedattn.patch(tiny_model("llama", num_hidden_layers=LAYERS), store)
    _turns(model, "long", 1500, seed=1)
    loader = model._cachedattn.gpu
    assert isinstance(loader, GpuLoader)
    big = loader.staged_bytes()
    assert big > 4 * staging.ALIGN
    for i in range(2):  # turns alternate between the two buffers
        _turns(model, f"short{i}", 20, seed=2 + i)
    assert loader.staged_bytes() < big / 4
    loader.trim()
    assert loader.staged_bytes() == 0
    _turns(model, "short0", 30, seed=2)  # and it grows back when needed


def test_the_engine_frees_idle_staging_when_its_queue_runs_dry(store):
    from cachedattn.serving import Engine

    model = cachedattn.patch(tiny_model("llama"), store)
    ids = torch.randint(1, VOCAB, (1, 48), generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), cachedattn.session(model, "c"):
        model(ids)
    with Engine(model, store, background=False, prefetch=False, read_buffer=True) as engine:
        job = engine.submit("c", torch.cat([ids, ids[:, :4]], 1), answer=ids[:, :6])
        while engine.step() is not None:
            engine.wait_background_io()
    assert job.reused_tokens == 48 and model._cachedattn.gpu.staged_bytes() == 0
