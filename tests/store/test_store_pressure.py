"""Exhaustion is never the turn's failure: when host blocks (or disk space, or the
in-flight budget) run out under concurrency, a load gets shorter or misses and a
save is skipped; the turn's logits are what recomputation gives."""

import copy
import threading
import time

import numpy as np
import pytest
import torch

import cachedattn
from cachedattn import AttentionStore
from cachedattn.store.block_pool import HostMemoryFull
from cachedattn.store.spec import ChunkGeometry

from ..hf.models import VOCAB, tiny_model
from .conftest import CHUNK, SPEC, chunk_bytes, make_kv


def _turns(model, store, conv_id, seed, turns, errors, mismatches):
    g = torch.Generator().manual_seed(seed)
    history = torch.zeros(1, 0, dtype=torch.long)
    try:
        for _ in range(turns):
            ids = torch.cat([history, torch.randint(1, VOCAB, (1, 21), generator=g)], 1)
            with torch.no_grad():
                with cachedattn.session(model, conv_id):
                    got = model(ids).logits
            want = store_free_logits(model, ids)[:, -got.shape[1] :]  # a session returns the computed tokens' logits
            if (got - want).abs().max().item() > 1e-4:
                mismatches.append(conv_id)
            history = ids
    except Exception as e:  # what the test is about: no turn may raise
        errors.append(e)


def store_free_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits  # outside a session the patched model is the plain model


def test_host_memory_tight_under_concurrency_never_fails_a_turn(tmp_path):
    base = tiny_model("llama")
    models = [copy.deepcopy(base) for _ in range(4)]
    probe = AttentionStore(host_bytes=64 << 20, chunk_tokens=16, hugepages="off")
    cachedattn.patch(models[0], probe)
    block = probe._geometry.block_bytes
    cachedattn.unpatch(models[0])
    probe.close()
    # Four threads with ~5 chunks of history each pin more than these 6 blocks at once.
    store = AttentionStore(host_bytes=6 * block, disk_dir=str(tmp_path / "kv"), chunk_tokens=16, hugepages="off")
    try:
        for m in models:
            cachedattn.patch(m, store)
        errors, mismatches = [], []
        threads = [
            threading.Thread(target=_turns, args=(m, store, f"c{i}", i, 3, errors, mismatches))
            for i, m in enumerate(models)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        assert not mismatches
        st = store.stats()
        assert st["host"]["used_bytes"] <= 6 * block
    finally:
        store.close()


def test_a_load_finding_no_host_block_is_shorter_or_a_miss_within_the_wait_bound(make_store, tokens):
    from cachedattn.store.executor import HOST_WAIT_S

    s = make_store(host_chunks=3)
    kv = make_kv(SPEC, 48, 1)
    s.append("b", tokens[:48], kv).result()
    s.append("c", tokens[100:132], make_kv(SPEC, 32, 3)).result()
    s.demote("b")  # 3 chunks on disk only
    s.demote("c")
    s.append("a", tokens[50:82], make_kv(SPEC, 32, 2)).result()
    with s.load("a", 32):  # pins 2 of the 3 blocks
        t0 = time.monotonic()
        with s.load_prefix("b", tokens[:48]) as ld:
            assert ld.n_tokens == CHUNK  # one block left: the first chunk only
            assert torch.equal(ld.read_layer(0)[0], kv[0][0][:, :CHUNK])
        assert time.monotonic() - t0 < HOST_WAIT_S + 5  # bounded; generous for a loaded CI machine
        with s.load("b", 48) as ld:  # its first chunk stayed in host memory; every block is pinned now
            assert ld.n_tokens == CHUNK
            assert s.load_prefix("c", tokens[100:132]) is None  # a miss, not an error
    assert s.stats()["shortened_loads"] == 3
    assert s.lookup("b", tokens[:48]) == 48  # nothing was lost: only these loads were short
    with s.load("c", 32) as ld:
        assert ld.n_tokens == 32


def test_running_out_of_descriptors_shortens_the_load_and_keeps_the_chunks(make_store, tokens, monkeypatch):
    import errno

    s = make_store()
    kv = make_kv(SPEC, 48, 1)
    s.append("b", tokens[:48], kv).result()
    s.demote("b")
    real, calls = s._disk.open_file, []

    def open_file(dirname, name):
        calls.append(name)
        if len(calls) == 2:
            raise OSError(errno.EMFILE, "Too many open files")
        return real(dirname, name)

    monkeypatch.setattr(s._disk, "open_file", open_file)
    with s.load_prefix("b", tokens[:48]) as ld:
        assert ld.n_tokens == CHUNK
        assert torch.equal(ld.read_layer(2)[1], kv[2][1][:, :CHUNK])
    monkeypatch.undo()
    assert s.stats()["corrupt_chunks"] == 0 and s.stats()["shortened_loads"] == 1
    with s.load("b", 48) as ld:
        assert torch.equal(ld.read_layer(1)[0], kv[1][0])


def test_an_overflow_whose_rewrite_finds_no_host_memory_still_answers(tmp_path):
    """The context window overflows; rewriting the kept window's KV needs host blocks that
    the conversation itself holds: the turn is computed (the stored KV dropped), not failed."""
    model = tiny_model("llama")
    probe = AttentionStore(host_bytes=1 << 20, chunk_tokens=16, hugepages="off")
    cachedattn.patch(model, probe)
    block = probe._geometry.block_bytes
    cachedattn.unpatch(model)
    probe.close()
    store = AttentionStore(host_bytes=6 * block, chunk_tokens=16, hugepages="off")  # no disk: nothing to demote to
    try:
        cachedattn.patch(model, store, max_context=96)
        ids = torch.randint(1, VOCAB, (1, 90), generator=torch.Generator().manual_seed(2))
        with torch.no_grad(), cachedattn.session(model, "w"):
            model(ids)  # 6 chunks: host memory is full of this conversation
        more = torch.cat([ids, torch.randint(1, VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))], 1)
        with torch.no_grad(), cachedattn.session(model, "w") as s:
            got = model(more).logits
            kept = more[:, s.dropped_tokens :]
        want = store_free_logits(model, kept)[:, -got.shape[1] :]
        assert (got - want).abs().max().item() <= 1e-4
    finally:
        store.close()
