"""A turn never fails because of the cache: a bad chunk found while the history
is read reruns the turn from the store's cut, a save the store refuses stores
nothing, a conversation changed between lookup and load is a shorter prefix or
a miss; the caller always gets the answer recompute gives."""

import errno
import logging
import os

import pytest
import torch

import cachedattn
from cachedattn.store import ChunkCorruptError, HostMemoryFull, KVLoad

from .models import VOCAB, tiny_model

GEN = 5


class Collect:
    def __init__(self):
        self.parts = []

    def put(self, value):
        self.parts.append(value.tolist())

    def end(self):
        pass


def _plain(model, fn):
    """Outside a session the patched model is the plain model: full recompute."""
    with torch.no_grad():
        return fn()


def _gen(model, ids, **kw):
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=GEN, do_sample=False,
        return_dict_in_generate=True, output_logits=True, pad_token_id=0, **kw,
    )  # fmt: skip


def _same_generation(out, ref):
    assert torch.equal(out.sequences, ref.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits)) <= 1e-4


def _restarted_with_history(make_store, model, ids, arch_readahead=None):
    """ids stored for conversation "c" by a forward, then the store restarted: the history is on disk only."""
    store = make_store()
    cachedattn.patch(model, store, readahead=arch_readahead)
    with torch.no_grad(), cachedattn.session(model, "c"):
        model(ids)
    store.close()
    cachedattn.unpatch(model)
    store = make_store()
    cachedattn.patch(model, store, readahead=arch_readahead)
    assert store.lookup("c", ids[0]) == ids.shape[1]  # resolves the chain: damage done now is found by the load
    return store


def _damage(store, conv_id, index, how):
    conv = store._index.convs[conv_id]
    path = store._disk.path(conv.dirname, conv.chunks[index].file)
    if how == "checksum":
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) - 64)  # in the payload: the header still verifies
            data = f.read(8)
            f.seek(-8, os.SEEK_CUR)
            f.write(bytes(b ^ 0xFF for b in data))
    elif how == "missing":
        os.unlink(path)
    elif how == "directory":
        os.unlink(path)
        os.mkdir(path)
    elif how == "truncated":
        os.truncate(path, os.path.getsize(path) // 2)


def _inject_eio(monkeypatch, layer):
    """An I/O error reading `layer` of the first chunk read from disk (the store cuts the conversation there)."""
    real = KVLoad._ensure

    def ensure(self, i):
        if i == layer and self._disk_pos and self._error is None and i not in self._verified:
            self._fail(self._disk_pos[0], "injected EIO", errno.EIO)
        return real(self, i)

    monkeypatch.setattr(KVLoad, "_ensure", ensure)


DAMAGE = ["checksum", "missing", "directory", "truncated", "eio"]


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("readahead", [1, None])
@pytest.mark.parametrize("call", ["generate", "forward"])
def test_a_bad_chunk_during_the_turn_reruns_it_from_the_cut(call, readahead, how, make_store, monkeypatch, caplog):
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (1, 70), generator=g)
    store = _restarted_with_history(make_store, model, ids, readahead)
    if how == "eio":
        _inject_eio(monkeypatch, layer=1)
    else:
        _damage(store, "c", 2, how)
    full = torch.cat([ids, torch.randint(1, VOCAB, (1, 20), generator=g)], 1)
    streamer = Collect()
    with caplog.at_level(logging.WARNING, logger="cachedattn"), torch.no_grad(), cachedattn.session(model, "c") as s:
        if call == "generate":
            out = _gen(model, full, streamer=streamer)
        else:
            logits = model(full).logits[0]
    if call == "generate":
        ref_streamer = Collect()
        _same_generation(out, _plain(model, lambda: _gen(model, full, streamer=ref_streamer)))
        assert streamer.parts == ref_streamer.parts  # the prompt streamed once, then each token once
    else:
        ref = _plain(model, lambda: model(full).logits[0])
        torch.testing.assert_close(logits, ref[s.reused_tokens :], atol=1e-4, rtol=1e-4)
    # The store cut the conversation before the bad chunk (chunk 2 or, for the EIO, the first one read).
    if how == "directory":  # the store cannot delete the damaged "file": it may serve less (never more)
        assert s.reused_tokens <= 32
    else:
        assert s.reused_tokens == (32 if how != "eio" else 0)
    assert store.stats()["recovered_turns"] == 1
    assert len([r for r in caplog.records if "computed again" in r.getMessage()]) == 1


def test_a_load_that_always_fails_ends_in_a_full_recompute(make_store, monkeypatch):
    """A load that raises every time (the store never cuts) cannot make the turn loop."""
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (1, 50), generator=g)
    store = _restarted_with_history(make_store, model, ids)
    attempts = []

    def always_bad(self, layer, *a, **k):
        attempts.append(layer)
        raise ChunkCorruptError(errno.EIO, "injected", "x")

    monkeypatch.setattr(KVLoad, "read_layer", always_bad)
    full = torch.cat([ids, torch.randint(1, VOCAB, (1, 10), generator=g)], 1)
    with torch.no_grad(), cachedattn.session(model, "c") as s:
        out = _gen(model, full)
    assert s.reused_tokens == 0 and len(attempts) == 2
    _same_generation(out, _plain(model, lambda: _gen(model, full)))
    assert store.stats()["recovered_turns"] == 1


SAVE_FAILURES = {
    "host_memory_full": lambda: HostMemoryFull("injected: host memory full"),
    "disk_full": lambda: OSError(errno.ENOSPC, "injected: no space left"),
    "store_refuses": lambda: ValueError("injected: conversation changed"),
}


@pytest.mark.parametrize("where", ["begin_append", "put_layer"])
@pytest.mark.parametrize("failure", list(SAVE_FAILURES))
def test_a_save_the_store_refuses_returns_the_answer_and_stores_nothing(failure, where, make_store, monkeypatch, caplog):
    model = tiny_model("llama")
    store = make_store()
    cachedattn.patch(model, store)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (1, 40), generator=g)
    with torch.no_grad(), cachedattn.session(model, "s"):
        model(ids)  # 40 tokens stored
    target = type(store) if where == "begin_append" else cachedattn.store.KVAppend

    def refuse(*a, **k):
        raise SAVE_FAILURES[failure]()

    monkeypatch.setattr(target, where, refuse)
    hist = ids
    with caplog.at_level(logging.WARNING, logger="cachedattn"), torch.no_grad():
        for _ in range(2):  # warned once, counted every time
            full = torch.cat([hist, torch.randint(1, VOCAB, (1, 12), generator=g)], 1)
            with cachedattn.session(model, "s") as s:
                out = _gen(model, full)
            assert s.reused_tokens == 40
            _same_generation(out, _plain(model, lambda: _gen(model, full)))
            hist = out.sequences
    assert store.stats()["skipped_saves"] == 2
    assert len([r for r in caplog.records if "was not stored" in r.getMessage()]) == 1
    monkeypatch.undo()
    assert store.lookup("s", hist[0]) == 40  # the old history is intact, nothing half-written


def test_host_memory_full_at_save_time_returns_the_answer(make_store):
    """A store without disk and room for one chunk: the second turn's KV does not fit."""
    model = tiny_model("llama")
    probe = make_store()
    cachedattn.patch(model, probe)
    block = probe._geometry.block_bytes
    cachedattn.unpatch(model)
    store = make_store(host_bytes=block, disk_dir=None)
    cachedattn.patch(model, store)
    ids = torch.randint(1, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), cachedattn.session(model, "h"):
        out = _gen(model, ids)
    _same_generation(out, _plain(model, lambda: _gen(model, ids)))
    assert store.stats()["skipped_saves"] == 1


RACES = ["drop", "truncate", "rewrite", "prefetch"]


def _race(store, how, ids):
    if how == "drop":
        store.drop("r")
    elif how == "truncate":  # keeps the first 16 stored tokens
        with store.begin_append("r", ids[0, :16], start=16) as txn:
            txn.commit()
    elif how == "rewrite":  # another history, shorter than the one looked up
        store.drop("r")
        other = torch.randint(1, VOCAB, (30,))
        store.append("r", other, txn_layers(store, 30))
    elif how == "prefetch":
        try:
            store.demote("r")
        except ValueError:
            pass  # an open load keeps it where it is
        store.prefetch("r").result()
    store.flush()


def txn_layers(store, n):
    return [(torch.randn(h, n, d), torch.randn(h, n, d)) for h, d in store.spec.layers]


@pytest.mark.parametrize("how", RACES)
@pytest.mark.parametrize("call", ["generate", "forward"])
@pytest.mark.parametrize("atomic", [True, False])
def test_a_conversation_changed_between_lookup_and_load_is_a_shorter_prefix_or_a_miss(
    atomic, call, how, make_store, monkeypatch
):
    model = tiny_model("llama")
    store = make_store()
    cachedattn.patch(model, store)
    if not atomic:  # the lookup-then-load path, as with a store that has no load_prefix
        monkeypatch.delattr(type(store), "load_prefix", raising=False)
    elif not hasattr(store, "load_prefix"):
        pytest.skip("this store has no atomic load_prefix")
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, VOCAB, (1, 60), generator=g)
    with torch.no_grad(), cachedattn.session(model, "r"):
        model(ids)
    # The race strikes right after the step that answers "how much is stored": the
    # lookup (then load follows), or the atomic load_prefix (then the load is open).
    name = "load_prefix" if atomic else "lookup"
    real = getattr(type(store), name)
    fired = []

    def racing(self, conv_id, token_ids, *a, **k):
        answer = real(self, conv_id, token_ids, *a, **k)
        if not fired and conv_id == "r":
            fired.append(1)
            _race(self, how, ids)
        return answer

    monkeypatch.setattr(type(store), name, racing)
    full = torch.cat([ids, torch.randint(1, VOCAB, (1, 10), generator=g)], 1)
    with torch.no_grad(), cachedattn.session(model, "r") as s:
        if call == "generate":
            out = _gen(model, full)
        else:
            logits = model(full).logits[0]
    monkeypatch.setattr(type(store), name, real)
    assert fired
    if call == "generate":
        _same_generation(out, _plain(model, lambda: _gen(model, full)))
    else:
        torch.testing.assert_close(
            logits, _plain(model, lambda: model(full).logits[0])[s.reused_tokens :], atol=1e-4, rtol=1e-4
        )
    if how == "prefetch":
        assert s.reused_tokens == 60
