"""The GPU load path, run on the CPU through the deferred fake copy engine
(CACHEDATTN_FAKE_COPY_ENGINE=1): cached turns equal recompute, and every wait
the path relies on is proved necessary by removing it."""

import importlib

import pytest
import torch

import cachedattn
from cachedattn.testing.fake_engine import FakeCopyEngine
from cachedattn.transfer.gpu_load import GpuLoad

from ..hf.models import VOCAB, tiny_model

hp = importlib.import_module("cachedattn.hf.patch")  # `cachedattn.hf.patch` as an attribute is the function

TURNS = [37, 120, 20, 90]
GEN = 4


@pytest.fixture(autouse=True)
def fake_engine(monkeypatch):
    monkeypatch.setenv("CACHEDATTN_FAKE_COPY_ENGINE", "1")


@pytest.fixture
def make_store(tmp_path):
    opened = []

    def make(**kw):
        s = cachedattn.AttentionStore(
            **{"host_bytes": 64 << 20, "disk_dir": str(tmp_path / "kv"), "chunk_tokens": 16, "hugepages": "off", **kw}
        )
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


def _gen(model, ids):
    return model.generate(
        ids, max_new_tokens=GEN, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0
    )


def _diff(out, ref):
    return max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits))


def _engine(model):
    eng = model._cachedattn.gpu.engine
    assert isinstance(eng, FakeCopyEngine)
    return eng


def _turns(model, make_store, readahead, turns=TURNS, check=True, gpu=None):
    store = make_store()
    cachedattn.patch(model, store, readahead=readahead)
    g = torch.Generator().manual_seed(1)
    history = torch.zeros(1, 0, dtype=torch.long)
    diffs, tiers = [], []
    with torch.no_grad():
        for turn, n_new in enumerate(turns):
            full = torch.cat([history, torch.randint(1, VOCAB, (1, n_new), generator=g)], 1)
            if gpu is not None:
                full = gpu.ids(full)
            with cachedattn.session(model, "conv") as s:
                out = _gen(model, full)
            ref = _gen(model, full)
            diffs.append(_diff(out, ref))
            if check and gpu is not None:
                gpu.assert_close(torch.stack(out.logits), torch.stack(ref.logits))
                assert s.reused_tokens == max(history.shape[1] - 1, 0)
            elif check:
                assert torch.equal(out.sequences, ref.sequences) and diffs[-1] <= 1e-4, (turn, diffs[-1])
                assert s.reused_tokens == max(history.shape[1] - 1, 0)
            tiers.append(dict(s.tier_tokens))
            if turn and (gpu is None or gpu.kind == "fake"):
                assert _engine(model).stats["copies"] > 0 and _engine(model).pending() == 0
            history = out.sequences
            if turn == 1:  # the history of turn 2 comes from disk
                store.close()
                cachedattn.unpatch(model)
                store = make_store()
                cachedattn.patch(model, store, readahead=readahead)
    return diffs, tiers


@pytest.mark.parametrize("readahead", [1, 2, None])
@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3_text", "mistral", "gpt2", "gpt_neox"])
def test_gpu_branch_matches_recompute(arch, readahead, make_store, gpu):
    _, tiers = _turns(gpu.model(arch), make_store, readahead, gpu=gpu)
    assert tiers[2]["disk"] > 0  # the restart's turn really read from disk through the GPU path


def test_the_gpu_branch_is_taken(make_store, monkeypatch):
    calls = []
    real = GpuLoad.layer
    monkeypatch.setattr(GpuLoad, "layer", lambda self, i, *a, **k: calls.append(i) or real(self, i, *a, **k))
    _turns(tiny_model("llama"), make_store, 1, turns=[40, 30])
    assert sorted(calls) == [0, 1, 2]  # the second turn's three layers, once each


@pytest.mark.expect_races  # the ordering is broken on purpose: the detector must see it too
def test_a_missing_layer_wait_gives_wrong_logits(make_store, monkeypatch):
    monkeypatch.setattr(FakeCopyEngine, "stream_wait_layer", lambda self, d, layer, stream, epoch=-1: None)
    diffs, _ = _turns(tiny_model("llama"), make_store, 2, turns=[40, 30], check=False)
    assert not diffs[1] <= 1e-4  # NaN or far off: the fake catches a missing wait


@pytest.mark.expect_races  # the ordering is broken on purpose: the detector must see it too
def test_a_missing_fence_before_refilling_a_slot_raises(make_store, monkeypatch):
    monkeypatch.setattr(FakeCopyEngine, "wait_for_stream", lambda self, d, stream: None)
    with pytest.raises(RuntimeError, match="slot reuse"):
        _turns(tiny_model("llama"), make_store, 1, turns=[40, 30])


@pytest.mark.expect_races  # the ordering is broken on purpose: the detector must see it too
def test_blocks_released_without_waiting_for_the_copies_raises(make_store, monkeypatch):
    monkeypatch.setattr(GpuLoad, "_wait_copies", lambda self: None)
    # readahead 1: layer 1 is issued by layer 0's update and never waited for: its forward raises
    model = tiny_model("llama")
    store = make_store()
    cachedattn.patch(model, store, readahead=1)
    ids = torch.randint(1, VOCAB, (1, 50))
    with pytest.raises(RuntimeError, match="released under a pending"):
        with torch.no_grad():
            with cachedattn.session(model, "c"):
                model(ids)
            with cachedattn.session(model, "c"):
                monkeypatch.setattr(model.model.layers[1], "forward", _boom)
                model(torch.cat([ids, ids[:, :5]], 1))
    _engine(model).synchronize("h2d")  # before the store frees the region under it


def _boom(*a, **k):
    raise KeyError("boom")


@pytest.mark.parametrize("readahead", [1, 2, None])
def test_a_forward_raising_mid_turn_releases_blocks_after_the_copies(make_store, monkeypatch, readahead):
    model = tiny_model("llama")
    store = make_store()
    cachedattn.patch(model, store, readahead=readahead)
    ids = torch.randint(1, VOCAB, (1, 50))
    with torch.no_grad():
        with cachedattn.session(model, "c"):
            model(ids)
        monkeypatch.setattr(model.model.layers[2], "forward", _boom)
        with pytest.raises(KeyError, match="boom"), cachedattn.session(model, "c"):
            model(torch.cat([ids, ids[:, :5]], 1))
        assert _engine(model).pending() == 0
        monkeypatch.undo()
        monkeypatch.setenv("CACHEDATTN_FAKE_COPY_ENGINE", "1")
        full = torch.cat([ids, ids[:, :5]], 1)
        with cachedattn.session(model, "c") as s:
            out = model(full).logits
        assert s.reused_tokens == 50
        torch.testing.assert_close(out[:, -1], model(full).logits[:, -1], atol=1e-4, rtol=0)


@pytest.mark.expect_races  # the ordering is broken on purpose: the detector must see it too
def test_epochs_one_per_turn_and_a_stale_layer_is_refused(make_store, monkeypatch):
    epochs = []
    real = FakeCopyEngine.begin_epoch
    monkeypatch.setattr(FakeCopyEngine, "begin_epoch", lambda self: epochs.append(real(self)) or epochs[-1])
    model = tiny_model("llama")
    cachedattn.patch(model, make_store(), readahead=2)
    ids = torch.randint(1, VOCAB, (1, 40))
    with torch.no_grad():
        for n in (40, 45, 50):
            with cachedattn.session(model, "c"):
                model(torch.cat([ids, ids[:, : n - 40]], 1))
    assert epochs == [1, 2]  # one per turn that reuses history
    with pytest.raises(RuntimeError, match="layer 0 of direction h2d was not issued in epoch 3"):
        eng = _engine(model)
        eng.begin_epoch()
        eng.stream_wait_layer("h2d", 0, 0)


def test_read_buffer_preloads_the_next_turn(make_store, gpu):
    model = gpu.model("gemma2")
    store = make_store()
    cachedattn.patch(model, store, readahead=2)
    g = torch.Generator().manual_seed(3)
    ids = {c: gpu.ids(torch.randint(1, VOCAB, (1, 60), generator=g)) for c in "pq"}
    with torch.no_grad():
        for c in "pq":
            with cachedattn.session(model, c):
                model(ids[c])
        eng = gpu.engine(model)
        fake = gpu.kind == "fake"
        full = torch.cat([ids["q"], ids["q"][:, :7]], 1)
        assert hp.preload(model, "q", full)
        if fake:
            assert eng.stats["copies"] > 0 and eng.pending() > 0  # first layers issued, nothing waited for yet
        with cachedattn.session(model, "p"):  # another conversation's turn meanwhile drops nothing it needs
            pass
        with cachedattn.session(model, "q") as s:
            out = model(full).logits
        assert s.reused_tokens == 60
        gpu.assert_close(out, model(full).logits[:, 60:])
        # a preload for a prefix the turn does not have is dropped, its blocks released after its copies
        assert hp.preload(model, "p", torch.cat([ids["p"], ids["p"][:, :3]], 1))
        other = torch.cat([ids["p"][:, :20] + 1, ids["p"][:, 20:]], 1)
        with cachedattn.session(model, "p") as s:
            out = model(other).logits
        assert s.reused_tokens == 0 and (not fake or eng.pending("h2d") == 0)  # (its own save may still be in flight)
        gpu.assert_close(out, model(other).logits)

def test_engine_read_buffer_goes_to_the_gpu(tmp_path):
    from cachedattn.serving import Engine

    model = tiny_model("llama")
    store = cachedattn.AttentionStore(host_bytes=1 << 24, disk_dir=str(tmp_path / "kv"), chunk_tokens=16, hugepages="off")
    ids = {c: torch.randint(1, VOCAB, (1, 48), generator=torch.Generator().manual_seed(i)) for i, c in enumerate("pq")}
    cachedattn.patch(model, store)
    with torch.no_grad():
        for c in "pq":
            with cachedattn.session(model, c):
                model(ids[c])
    preloads = []
    real = hp.preload
    hp.preload = lambda *a: preloads.append(a[1]) or real(*a)
    try:
        with Engine(model, store, background=False, prefetch=False, read_buffer=True) as engine:
            jobs = [engine.submit(c, torch.cat([ids[c], ids[c][:, :4]], 1), answer=ids[c][:, :6]) for c in "pq"]
            while engine.step() is not None:
                engine.wait_background_io()
    finally:
        hp.preload = real
    assert preloads == ["q"] and jobs[1].reused_tokens == 48
    store.close()


def test_preload_waits_for_the_conversations_save_in_flight(make_store):
    import threading

    model = tiny_model("llama")
    cachedattn.patch(model, make_store())
    ids = torch.randint(1, VOCAB, (1, 60), generator=torch.Generator().manual_seed(5))
    hold = threading.Event()
    with torch.no_grad():
        with cachedattn.session(model, "q"):
            model(ids[:, :1])  # the model's loader and saver exist from here on
        model._cachedattn.saver.submit("other", hold.wait)  # the worker is busy: q's next save stays queued
        with cachedattn.session(model, "q"):
            model(ids)
        got = []
        t = threading.Thread(target=lambda: got.append(hp.preload(model, "q", torch.cat([ids, ids[:, :5]], 1))))
        try:
            t.start()
            t.join(0.3)
            assert t.is_alive(), "preload went ahead of the conversation's save in flight"
        finally:
            hold.set()
        t.join(10)
        assert got == [True]
        with cachedattn.session(model, "q") as s:
            out = model(torch.cat([ids, ids[:, :5]], 1)).logits
        assert s.reused_tokens == 60
        torch.testing.assert_close(out, model(torch.cat([ids, ids[:, :5]], 1)).logits[:, 60:], atol=1e-4, rtol=0)
