"""Saving through the copy engine (the GPU branch), run on the CPU with the deferred fake engine:
copies happen only when someone waits, so a missing wait stores wrong KV."""

import pytest
import torch
from transformers import DynamicCache

import cachedattn
from cachedattn.testing.fake_engine import FakeCopyEngine
from cachedattn.transfer.factory import FAKE_ENV

from .models import VOCAB, tiny_model

TURNS = [37, 120, 20]


@pytest.fixture(autouse=True)
def _fake_engine(monkeypatch):
    """The copy-engine path is chosen at patch: the deferred fake engine stands in for a GPU's."""
    monkeypatch.setenv(FAKE_ENV, "1")


def _patched(make_store, arch="llama"):
    model = tiny_model(arch)
    store = make_store()
    cachedattn.patch(model, store)
    engine = model._cachedattn.path.loader.engine
    assert isinstance(engine, FakeCopyEngine)
    return model, store, engine


def _gen(model, ids):
    return model.generate(
        ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0
    )


def _stored_equals_recompute(model, store, conv, ids, settle=None) -> float:
    """Largest difference between the stored KV of ids and recomputed KV (inf if not stored).

    `settle` (an engine) performs copies left pending before the load releases the blocks they write.
    """
    model._cachedattn.saver.wait(conv)
    n = store.lookup(conv, ids[0])
    if n == 0:
        return float("inf")
    load = store.load(conv, n)
    try:
        ref = DynamicCache(config=model.config)
        with torch.no_grad():
            cachedattn.unpatch(model)
            model(ids[:, :n], past_key_values=ref, use_cache=True)
        worst = 0.0
        for layer in range(model.config.num_hidden_layers):
            k, v = load.read_layer(layer)
            rk, rv = ref.layers[layer].keys[0], ref.layers[layer].values[0]
            k, v = k[:, k.shape[1] - rk.shape[1] :], v[:, v.shape[1] - rv.shape[1] :]  # a sliding layer keeps its window
            for d in ((k - rk).abs().max().item(), (v - rv).abs().max().item()):
                worst = d if d != d else max(worst, d)  # NaN (a block never filled) wins
                if worst != worst:
                    return float("inf")
        return worst
    finally:
        if settle is not None:
            settle.synchronize("d2h")
        load.close()


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_turns_saved_through_the_engine_match_recompute(arch, make_store):
    model, store, engine = _patched(make_store, arch)
    g = torch.Generator().manual_seed(3)
    history = torch.zeros(1, 0, dtype=torch.long)
    with torch.no_grad():
        for n_new in TURNS:
            full = torch.cat([history, torch.randint(1, VOCAB, (1, n_new), generator=g)], 1)
            with cachedattn.session(model, "c") as s:
                out = _gen(model, full)
            ref = _gen(model, full)
            assert torch.equal(out.sequences, ref.sequences)
            assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits)) <= 1e-4
            stored = max(history.shape[1] - 1, 0)
            assert s.reused_tokens == stored
            history = out.sequences
    assert engine.stats["copies"] > 0 and engine.pending() == 0
    assert store.stats()["skipped_saves"] == 0
    assert _stored_equals_recompute(model, store, "c", history[:, :-1]) <= 1e-4


def _one_turn(model, n=60, seed=4):
    ids = torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), cachedattn.session(model, "w") as s:
        out = _gen(model, ids)
    return s, out.sequences


@pytest.mark.expect_races  # the ordering is broken on purpose: the detector must see it too
def test_a_missing_ticket_wait_stores_wrong_kv(make_store, monkeypatch):
    model, store, engine = _patched(make_store)
    monkeypatch.setattr(FakeCopyEngine, "wait_ticket", lambda self, t: None)
    _, seq = _one_turn(model)
    # poisoned blocks were stored; the copies still pending write blocks the load frees at close
    assert not _stored_equals_recompute(model, store, "w", seq[:, :-1], settle=engine) <= 1e-4


def test_with_the_wait_the_same_turn_stores_right_kv(make_store):
    model, store, _ = _patched(make_store)
    _, seq = _one_turn(model)
    assert _stored_equals_recompute(model, store, "w", seq[:, :-1]) <= 1e-4


def test_a_save_failing_mid_copy_is_best_effort_and_frees_blocks_after_the_copies(make_store, monkeypatch):
    model, store, engine = _patched(make_store)
    from cachedattn.store.append import KVAppend

    orig = KVAppend.copy_segments

    def failing(self, layer, k, v):
        if layer == 1:
            assert engine.pending("d2h") > 0  # layer 0's copy is issued and not yet performed
            raise OSError("copy failed")
        return orig(self, layer, k, v)

    monkeypatch.setattr(KVAppend, "copy_segments", failing)
    s, seq = _one_turn(model)  # the turn itself succeeds
    assert seq.shape[1] == 65
    assert store.stats()["skipped_saves"] == 1
    assert engine.pending() == 0  # waited before abort freed the blocks (the fake raises otherwise)
    assert store.lookup("w", seq[0]) == 0


def test_the_next_turn_waits_for_the_append_in_flight(make_store, monkeypatch):
    model, store, engine = _patched(make_store)
    _, seq = _one_turn(model)
    full = torch.cat([seq, torch.randint(1, VOCAB, (1, 10))], 1)
    with torch.no_grad(), cachedattn.session(model, "w") as s:
        _gen(model, full)
    assert s.reused_tokens == seq.shape[1] - 1


def test_store_close_with_a_save_in_flight_frees_its_blocks_after_the_copies(make_store):
    import threading

    model, store, engine = _patched(make_store)
    hold = threading.Event()
    model._cachedattn.saver.submit("other", hold.wait)  # the worker is busy: the turn's save stays queued
    try:
        _, seq = _one_turn(model)
        assert engine.pending("d2h") > 0  # its copies are issued and not yet performed
        store.close()  # aborts the append: the fake raises if its blocks go back under a pending copy
        assert engine.pending("d2h") == 0
    finally:
        hold.set()
    model._cachedattn.saver.drain()  # the queued save finds its append cancelled and gives up quietly
    assert seq.shape[1] == 65
