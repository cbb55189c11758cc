"""Every way a turn reads history on a model with a copy engine goes through the engine from
the pinned blocks (defect 9: layerwise=False and batched rows used fresh pageable CPU tensors
then .to(device)), and a batch takes the read buffer filled for it (defect 10). The deferred
fake copy engine (CACHEDATTN_FAKE_COPY_ENGINE=1)."""

import importlib

import pytest
import torch

import cachedattn
from cachedattn.store.load import KVLoad
from cachedattn.transfer.gpu_load import GpuLoad

from ..hf.models import VOCAB, tiny_model

hp = importlib.import_module("cachedattn.hf.patch")


pytestmark = pytest.mark.usefixtures("fake_engine")


@pytest.fixture
def host_reads(monkeypatch):
    """Calls of KVLoad.read_layer (the host path: new CPU tensors or a copy out of the blocks)."""
    calls = []
    real = KVLoad.read_layer
    monkeypatch.setattr(KVLoad, "read_layer", lambda self, *a, **k: calls.append(a[0]) or real(self, *a, **k))
    return calls


def _ids(n, seed):
    return torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def test_load_then_compute_stages_through_the_engine(store, host_reads):
    model = cachedattn.patch(tiny_model("gemma2"), store)
    ids = _ids(50, 0)
    full = torch.cat([ids, ids[:, :4]], 1)
    with torch.no_grad():
        with cachedattn.session(model, "c"):
            model(ids)
        with cachedattn.session(model, "c", layerwise=False) as s:
            out = model(full).logits
        ref = model(full).logits[:, 50:]
    assert s.reused_tokens == 50 and host_reads == []
    assert model._cachedattn.gpu.engine.stats["copies"] > 0
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def _batch(model, full):
    bs = cachedattn.batch_session(model, list(full))
    out = bs.generate([full[c] for c in full], max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                      output_logits=True, pad_token_id=0)
    return bs, out


def _check_rows(model, full, bs, out):
    for r, c in enumerate(full):
        ref = model.generate(full[c][None], max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, pad_token_id=0)
        assert torch.equal(out.rows[r], ref.sequences[0, full[c].numel() :]), c
        diff = max((out.logits[j][r] - ref.logits[j][0]).abs().max().item() for j in range(3))
        assert diff <= 1e-4, (c, diff)


def test_batched_rows_read_their_history_through_the_engine(store, host_reads):
    model = cachedattn.patch(tiny_model("llama"), store, readahead=1)
    hist = {"a": 37, "b": 16, "c": 70, "d": 0}
    full = {}
    with torch.no_grad():
        for i, (c, n) in enumerate(hist.items()):
            ids = _ids(n + 5, i)
            if n:
                with cachedattn.session(model, c):
                    model(ids[:, :n])
            full[c] = ids[0]
        bs, out = _batch(model, full)
        assert host_reads == []
        assert [row.reused_tokens for row in bs.rows] == list(hist.values())
        _check_rows(model, full, bs, out)
    assert model._cachedattn.gpu.engine.pending("h2d") == 0


def test_a_batch_takes_the_read_buffer_filled_for_one_of_its_rows(store, monkeypatch):
    model = cachedattn.patch(tiny_model("llama"), store, readahead=2)
    full = {}
    with torch.no_grad():
        for i, c in enumerate("ab"):
            ids = _ids(45, 10 + i)
            with cachedattn.session(model, c):
                model(ids[:, :40])
            full[c] = ids[0]
        assert hp.preload(model, "b", full["b"][None])
        started = []
        real = GpuLoad.__init__

        def spy(self, *a, **k):
            real(self, *a, **k)
            started.append(self.load)

        monkeypatch.setattr(GpuLoad, "__init__", spy)
        bs, out = _batch(model, full)
        monkeypatch.undo()
        assert [row.reused_tokens for row in bs.rows] == [40, 40]
        assert len(started) == 1  # row a's load; row b's came from the read buffer, not a second load
        assert model._cachedattn.gpu.preloaded_conversation() is None
        _check_rows(model, full, bs, out)
