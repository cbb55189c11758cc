"""Folding per-head copy triples into strided copies (defect 8: a save issued one copy per head)."""

import ctypes

import pytest
import torch

import cachedattn
from cachedattn.transfer.strided import fold

from ..hf.models import VOCAB, tiny_model


def _apply_triples(segs):
    for s, d, n in segs:
        ctypes.memmove(d, s, n)


def _apply_2d(copies):
    for s, sp, d, dp, w, h in copies:
        for r in range(h):
            ctypes.memmove(d + r * dp, s + r * sp, w)


@pytest.mark.parametrize("heads,tokens", [(1, 5), (4, 7), (8, 16)])
def test_fold_covers_exactly_the_triples(heads, tokens):
    src = torch.arange(heads * 40 * 3, dtype=torch.float32).view(heads, 40, 3)  # [h, T, d]
    # a block's [h, C, d]; one spare head behind it: with tokens=16 from row 2 the last head's run ends
    # 2 rows past its [C, d] (it was a write past the allocation, a heap overflow)
    a, b = torch.zeros(heads + 1, 16, 3)[:heads], torch.zeros(heads + 1, 16, 3)[:heads]
    es = 4
    at = 16 - tokens  # where the chunk's slice starts (the slice ends at the chunk's end)
    segs = [(src[h, 10].data_ptr(), a[h, at].data_ptr(), tokens * 3 * es) for h in range(heads)]
    segs += [(src[h, 20].data_ptr(), a[h, 0].data_ptr() + 0, 0) for h in range(heads)]  # empty: skipped
    _apply_triples(segs)
    copies = fold(segs)
    _apply_2d(copies)
    b2 = torch.zeros(heads + 1, 16, 3)[:heads]
    _apply_2d([(s, sp, d - a.data_ptr() + b2.data_ptr(), dp, w, h) for s, sp, d, dp, w, h in copies])
    assert torch.equal(b2, a) and len(copies) == 1 and copies[0][5] == heads


def test_fold_keeps_irregular_runs_apart():
    segs = [(1000, 5000, 8), (1100, 5100, 8), (1250, 5200, 8), (2000, 6000, 4)]
    assert fold(segs) == [(1000, 100, 5000, 100, 8, 2), (1250, 8, 5200, 8, 8, 1), (2000, 4, 6000, 4, 4, 1)]
    assert fold([(1000, 5000, 8), (1004, 5100, 8)]) == [(1000, 8, 5000, 8, 8, 1), (1004, 8, 5100, 8, 8, 1)]


def test_a_save_issues_one_strided_copy_per_layer_chunk_and_kv(tmp_path, monkeypatch):
    monkeypatch.setenv("CACHEDATTN_FAKE_COPY_ENGINE", "1")
    store = cachedattn.AttentionStore(host_bytes=16 << 20, disk_dir=str(tmp_path / "kv"), chunk_tokens=16,
                                      hugepages="off")
    model = cachedattn.patch(tiny_model("llama", num_key_value_heads=4), store)
    ids = torch.randint(1, VOCAB, (1, 45), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with cachedattn.session(model, "c"):
            model(ids[:, :1])  # the loader (and its engine) exist from here on
        eng = model._cachedattn.gpu.engine
        before = eng.stats["copies"]
        with cachedattn.session(model, "c") as s:
            model(ids[:, :40])  # reuses 1 token, saves tokens 1..40: chunks 0, 1, 2
        s.last_save.result()
        layers, chunks = model.config.num_hidden_layers, 3
        h2d = 1 * layers  # the one reused chunk, one copy per layer
        assert eng.stats["copies"] - before == h2d + layers * chunks * 2  # not x4 heads
        with cachedattn.session(model, "c") as s:
            out = model(ids).logits
        ref = model(ids).logits[:, 40:]
    assert s.reused_tokens == 40
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    cachedattn.unpatch(model)
    store.close()
