"""One conversation used from several sides at once: the store serves the
truth or nothing, never an error from its own internals, and its bookkeeping
(chunk states, leases) never makes an illegal move."""

import random
import threading
from pathlib import Path

import numpy as np
import pytest

from cachedattn.store import ChunkCorruptError, HostMemoryFull
from cachedattn.store.conversation import ChunkState, IllegalTransition

from .conftest import chunk_bytes
from .kvtruth import check_load, truth_kv


@pytest.fixture
def illegal(monkeypatch):
    """Every IllegalTransition created anywhere (store threads included)."""
    seen = []
    init = IllegalTransition.__init__

    def record(self, *a):
        seen.append(a)
        init(self, *a)

    monkeypatch.setattr(IllegalTransition, "__init__", record)
    return seen


def _files(store):
    return sorted(p.name for p in Path(store.config.disk_dir).rglob("*.kv"))


def test_a_chunk_state_change_not_in_the_table_raises():
    from cachedattn.store.conversation import Chunk

    c = Chunk(0, np.arange(4, dtype=np.int32), b"k" * 16, b"p" * 16, [0, 0, 0], ChunkState.DISK, file="x")
    with pytest.raises(IllegalTransition):
        c.move(ChunkState.WRITING)
    c.move(ChunkState.DROPPED)
    with pytest.raises(IllegalTransition):
        c.move(ChunkState.HOST_DISK)


def test_a_lease_is_released_exactly_once():
    from cachedattn.store.conversation import Conversation
    from cachedattn.store.index import Index, Plan
    from cachedattn.store.stats import StoreStats

    ix = Index(None, StoreStats())
    conv = Conversation("a", "d", b"r" * 16)
    with ix.lock:
        lease = ix.lease(conv, "load")
        assert conv.owners == 1 and ix.leases == 1
        ix.release(lease, Plan())
        with pytest.raises(IllegalTransition, match="twice"):
            ix.release(lease, Plan())
    assert conv.owners == 0 and ix.leases == 0


@pytest.mark.parametrize("write_through", [True, False])
@pytest.mark.parametrize("start", [0, 39, 32])
def test_the_same_turn_twice_keeps_the_rewritten_chunk(make_store, tokens, write_through, start, illegal):
    """A client retry or a regenerate stores the same tokens again from `start`."""
    s = make_store(write_through=write_through)
    t = tokens[:40]
    s.append("a", t, truth_kv(t)).result()
    s.flush()
    s.append("a", t, truth_kv(t, start), start=start).result()
    s.flush()
    s.demote("a")
    s.flush()
    assert len(_files(s)) == 3
    with s.load("a", 40) as ld:  # from disk
        check_load(ld, t)
    t2 = tokens[:70]
    s.append("a", t2, truth_kv(t2, 40), start=40).result()  # the next turn
    s.demote("a")  # write-back: on disk only once demoted
    s.close()
    s2 = make_store()
    assert s2.lookup("a", t2) == 70
    with s2.load("a", 70) as ld:
        check_load(ld, t2)
    assert not illegal


def test_drop_then_store_anew_while_a_load_is_open(make_store, tokens, illegal):
    s = make_store()
    t = tokens[:40]
    s.append("a", t, truth_kv(t)).result()
    s.demote("a")
    ld = s.load("a", 40)  # e.g. the engine's prefetch, or an overflow's load
    s.drop("a")
    s.append("a", t, truth_kv(t)).result()  # the conversation stored anew, same tokens
    s.flush()
    check_load(ld, t)  # the old load still reads what it opened
    ld.close()
    assert s.lookup("a", t) == 40
    s.demote("a")
    with s.load("a", 40) as ld2:
        check_load(ld2, t)
    s.close()
    s2 = make_store()
    assert s2.lookup("a", t) == 40
    assert len(_files(s2)) == 3
    assert not illegal


def _blocked_executor(store):
    """Occupies the store's only thread until the returned event is set."""
    gate = threading.Event()
    store._executor.submit(gate.wait)
    return gate


@pytest.mark.parametrize("change", ["drop", "truncate", "extend", "demote"])
def test_prefetch_races_with_changes_to_its_conversation(make_store, tokens, change, illegal):
    s = make_store(io_threads=1)
    t = tokens[:64]
    s.append("a", t, truth_kv(t)).result()
    s.demote("a")
    gate = _blocked_executor(s)
    fut = s.prefetch("a")  # queued behind the gate
    if change == "drop":
        s.drop("a")
    elif change == "truncate":
        s.drop("a")
        s.append("a", t[:20], truth_kv(t[:20]))
    elif change == "extend":
        t = tokens[:100]
        s.append("a", t, truth_kv(t, 64), start=64)
    else:
        s.demote("a")
    gate.set()
    assert fut.result(timeout=30) >= 0  # never a TypeError, KeyError or ValueError
    s.flush()
    if change != "drop":
        with s.load_prefix("a", t) as ld:
            check_load(ld, t)
    assert not illegal


def test_prefetch_of_a_dropped_conversation_is_a_no_op(make_store, tokens):
    s = make_store()
    s.append("a", tokens[:40], truth_kv(tokens[:40])).result()
    s.drop("a")
    assert s.prefetch("a").result(timeout=30) == 0


@pytest.mark.parametrize("change", ["drop", "shorter", "longer", "damaged"])
def test_load_prefix_serves_what_is_stored_when_it_is_asked(make_store, tokens, change):
    """lookup then load can see two different conversations; load_prefix cannot."""
    s = make_store()
    t = tokens[:64]
    s.append("a", t, truth_kv(t)).result()
    n = s.lookup("a", t)
    if change == "drop":
        s.drop("a")
    elif change == "shorter":
        s.drop("a")
        s.append("a", t[:30], truth_kv(t[:30])).result()
    elif change == "longer":
        s.append("a", tokens[:90], truth_kv(tokens[:90], 64), start=64).result()
    else:
        conv = s._index.convs["a"]
        s._on_bad_chunk(conv, conv.chunks[2], "test")
    ld = s.load_prefix("a", t, limit=n - 1)
    if change == "drop":
        assert ld is None
        return
    with ld:
        assert ld.n_tokens == {"shorter": 30, "longer": 63, "damaged": 32}[change]
        check_load(ld, t)


def test_load_prefix_matches_the_longest_stored_prefix(make_store, tokens):
    s = make_store()
    t = tokens[:50]
    s.append("a", t, truth_kv(t)).result()
    other = t.copy()
    other[20] += 1
    with s.load_prefix("a", other) as ld:
        assert ld.n_tokens == 20
        check_load(ld, other)
    assert s.load_prefix("a", other, limit=0) is None
    assert s.load_prefix("nobody", t) is None
    assert s.load_prefix("a", [t[0] + 1]) is None


def test_load_against_drop_and_append_from_many_threads(make_store, illegal):
    """Seeded random operations on a few conversations from several threads, repeated.
    Every load serves the truth of the tokens it matched; nothing raises but the
    documented outcomes of a race (a miss, a shorter prefix, a busy conversation)."""
    rng = np.random.default_rng(11)
    base = {f"c{i}": rng.integers(0, 999, 120) for i in range(3)}
    for rep in range(3):
        s = make_store(host_chunks=12, disk_chunks=40)
        errors = []

        def worker(seed):
            r = random.Random(seed)
            for _ in range(60):
                cid = r.choice(list(base))
                toks = base[cid][: r.randint(1, 120)].copy()
                if r.random() < 0.2:  # a diverged or regenerated tail
                    toks[r.randrange(len(toks)) :] += 1
                op = r.random()
                try:
                    if op < 0.35:
                        n = s.lookup(cid, toks)
                        start = r.randint(0, n)
                        s.append(cid, toks, truth_kv(toks, start), start=start)
                    elif op < 0.7:
                        ld = s.load_prefix(cid, toks, readahead=1)
                        if ld is not None:
                            with ld:
                                check_load(ld, toks)
                    elif op < 0.78:
                        s.drop(cid)
                    elif op < 0.86:
                        s.prefetch(cid)
                    elif op < 0.93:
                        s.demote(cid)
                    else:
                        s.make_host_room(4 * chunk_bytes())
                except KeyError:
                    pass  # dropped by another thread: a miss
                except HostMemoryFull:
                    pass  # every block held by other threads' open loads and appends
                except ChunkCorruptError:
                    pass  # never expected here; counted below
                except ValueError as e:
                    if not any(m in str(e) for m in ("append in progress", "in use by an open", "only the first", "was cut")):
                        errors.append(e)
                except BaseException as e:  # noqa: BLE001  (collected for the assertion)
                    errors.append(e)

        threads = [threading.Thread(target=worker, args=(rep * 100 + i,)) for i in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors[:3]
        s.flush()
        st = s.stats()
        assert st["corrupt_chunks"] == 0 and st["disk_error"] is None
        assert st["host"]["used_bytes"] <= st["host"]["capacity_bytes"]
        assert st["disk"]["used_bytes"] == len(_files(s)) * (chunk_bytes() + 4096)
        for cid in s.conversations():
            stored = s.stored_tokens(cid)
            with s.load(cid, len(stored)) as ld:
                check_load(ld, stored)
        kept = {cid: s.stored_tokens(cid) for cid in s.conversations()}
        s.close()
        s2 = make_store(host_chunks=12, disk_chunks=40)
        for cid, stored in kept.items():  # what was on disk comes back exact
            ld = s2.load_prefix(cid, stored)
            if ld is not None:
                with ld:
                    check_load(ld, stored)
        s2.close()
        import shutil

        shutil.rmtree(s.config.disk_dir)
    assert not illegal


def test_a_prefetch_never_waits_for_writes_queued_behind_it(make_store, tokens):
    """Host memory full of chunks whose writes are queued behind the prefetch on the
    store's only thread: the prefetch brings in nothing at once instead of waiting for them."""
    s = make_store(host_chunks=6, io_threads=1)
    t = tokens[:32]
    s.append("b", t, truth_kv(t)).result()
    s.demote("b")
    gate = _blocked_executor(s)
    fut = s.prefetch("b")  # queued first
    u = tokens[100:196]
    s.append("a", u, truth_kv(u))  # 6 chunks, all host memory; their writes queue behind the prefetch
    gate.set()
    assert fut.result(timeout=20) == 0  # a guard against a hang, not a measurement: a miss at once, no error
    s.flush()
    assert s.prefetch("b").result(timeout=20) == 2  # the written chunks can go now
    with s.load("b", 32) as ld:
        check_load(ld, t)


@pytest.mark.parametrize("where", ["host", "disk"])
def test_an_append_replacing_the_tail_under_an_open_load(make_store, tokens, where, illegal):
    s = make_store()
    t = tokens[:64]
    s.append("a", t, truth_kv(t)).result()
    if where == "disk":
        s.demote("a")
    ld = s.load("a", 64, readahead=1)  # layers read lazily, after the append below
    u = t.copy()
    u[20:] += 1  # a regenerated answer from token 20 on
    s.append("a", u, truth_kv(u, 20), start=20).result()
    s.flush()
    check_load(ld, t)  # the open load still serves what it opened
    ld.close()
    assert len(_files(s)) == 4  # the replaced chunks' files went once the load closed
    s.demote("a")
    with s.load("a", 64) as ld2:
        check_load(ld2, u)
