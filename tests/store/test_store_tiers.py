import errno
import logging
import os

import numpy as np
import pytest

from cachedattn.store import FIFOPolicy, HostMemoryFull

from .conftest import CHUNK, SPEC, assert_kv_equal, chunk_bytes, make_kv, read_all


def _dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs if f.endswith(".kv"))


def test_host_capacity_is_a_hard_limit_and_lru_order(make_store):
    # Room for 8 chunks; each conversation takes 2 (20 tokens of 16-token chunks).
    s = make_store(host_chunks=8)
    rng = np.random.default_rng(0)
    toks = {f"c{i}": rng.integers(0, 999, 20) for i in range(6)}
    kvs = {c: make_kv(SPEC, 20, i) for i, c in enumerate(toks)}
    for c in ["c0", "c1", "c2", "c3"]:
        s.append(c, toks[c], kvs[c]).result()
    s.lookup("c0", toks["c0"])  # c0 becomes the most recently used
    s.append("c4", toks["c4"], kvs["c4"]).result()  # must evict the LRU: c1
    st = s.stats()
    assert st["host"]["used_bytes"] <= st["host"]["capacity_bytes"] == 8 * chunk_bytes()
    with s._index.lock:
        in_host = {c for c, conv in s._index.convs.items() if conv.host_chunks()}
    assert in_host == {"c0", "c2", "c3", "c4"}
    assert st["host"]["evictions"] == 2
    # Demoted, not lost: c1 comes back from disk, bit for bit.
    assert_kv_equal(read_all(s, "c1", 20), kvs["c1"])


def test_fifo_policy_ignores_recency(make_store):
    s = make_store(host_chunks=8, eviction=FIFOPolicy())
    rng = np.random.default_rng(1)
    toks = {f"c{i}": rng.integers(0, 999, 20) for i in range(5)}
    for i, c in enumerate(toks):
        if i == 4:
            s.lookup("c0", toks["c0"])
        s.append(c, toks[c], make_kv(SPEC, 20, i)).result()
    with s._index.lock:
        assert not s._index.convs["c0"].host_chunks()  # first in, first out, despite the recent use


def test_without_disk_host_eviction_drops(make_store):
    s = make_store(disk=False, host_chunks=4)
    rng = np.random.default_rng(2)
    for i in range(3):
        s.append(f"c{i}", rng.integers(0, 999, 20), make_kv(SPEC, 20, i)).result()
    assert s.conversations() == ["c1", "c2"]
    with pytest.raises(ValueError, match="no disk tier"):
        s.demote("c1")


def test_disk_capacity_is_a_hard_limit(make_store, tmp_path):
    s = make_store(host_chunks=4, disk_chunks=6)
    rng = np.random.default_rng(3)
    for i in range(8):
        s.append(f"c{i}", rng.integers(0, 999, 20), make_kv(SPEC, 20, i)).result()
        s.flush()
        st = s.stats()
        assert st["disk"]["used_bytes"] <= st["disk"]["capacity_bytes"]
        assert _dir_bytes(tmp_path / "kv") == st["disk"]["used_bytes"]
    assert s.stats()["disk"]["evictions"] > 0
    # Every conversation still listed is whole.
    for c in s.conversations():
        assert s.lookup(c, s.stored_tokens(c)) == len(s.stored_tokens(c))


def test_open_loads_pin_their_conversation(make_store):
    s = make_store(disk=False, host_chunks=2)
    rng = np.random.default_rng(4)
    t = rng.integers(0, 999, 20)
    kv = make_kv(SPEC, 20, 0)
    s.append("a", t, kv).result()
    with s.load("a", 20) as ld:
        with pytest.raises(HostMemoryFull, match="host_bytes"):
            s.append("b", t, kv)
        assert_kv_equal([ld.read_layer(i) for i in range(3)], kv)
    s.append("b", t, kv).result()  # now "a" can go
    assert s.conversations() == ["b"]


def test_write_back_mode_writes_only_on_demotion(make_store, tmp_path, tokens):
    s = make_store(write_through=False)
    kv = make_kv(SPEC, 40, 1)
    s.append("a", tokens[:40], kv).result()
    assert _dir_bytes(tmp_path / "kv") == 0
    s.demote("a")
    assert _dir_bytes(tmp_path / "kv") == 3 * (chunk_bytes() + 4096)
    assert_kv_equal(read_all(s, "a", 40), kv)


def test_full_disk_degrades_to_host_only(make_store, tokens, monkeypatch, caplog):
    s = make_store()
    from cachedattn.store.chunk_files import ChunkFiles

    def no_space(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.root))

    monkeypatch.setattr(ChunkFiles, "write_tmp", no_space)
    monkeypatch.setattr(ChunkFiles, "finish_tmps", no_space)
    kv = make_kv(SPEC, 40, 1)
    with caplog.at_level(logging.WARNING, logger="cachedattn"):
        s.append("a", tokens[:40], kv).result()
        s.append("b", tokens[:40], kv).result()
    assert any("host memory only" in r.getMessage() for r in caplog.records)
    st = s.stats()
    # a's three chunk writes were in flight together; b's were not even tried.
    assert st["disk_error"] and st["write_errors"] == 3
    assert_kv_equal(read_all(s, "a", 40), kv)  # host data kept
    assert_kv_equal(read_all(s, "b", 40), kv)


def test_hit_rate_counts_misses(make_store, tokens):
    s = make_store(host_chunks=4)
    kv = make_kv(SPEC, 32, 1)
    s.append("a", tokens[:32], kv).result()  # 2 chunks
    s.append("b", tokens[:32], kv).result()
    s.append("c", tokens[:32], kv).result()  # evicts a
    read_all(s, "b", 32)  # 2 host hits
    read_all(s, "a", 32)  # 2 host misses, 2 disk hits
    st = s.stats()
    assert (st["host"]["hits"], st["host"]["misses"], st["disk"]["hits"]) == (2, 2, 2)
    assert st["host_hit_rate"] == 0.5 and st["hit_rate"] == 1.0


def test_real_full_filesystem(tmp_path, tokens, caplog):
    """ENOSPC from a real (tiny tmpfs) filesystem, where this machine lets us mount one."""
    import subprocess

    from cachedattn import AttentionStore

    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        s = AttentionStore(host_bytes=64 * chunk_bytes(), disk_dir=str(mnt), disk_bytes=1 << 30, chunk_tokens=CHUNK,
                           spec=SPEC, hugepages="off")
        kv = make_kv(SPEC, 200, 1)
        with caplog.at_level(logging.WARNING, logger="cachedattn"):
            s.append("a", tokens, kv).result()
        st = s.stats()
        assert st["disk_error"] and "No space left" in st["disk_error"]
        assert_kv_equal(read_all(s, "a", 200), kv)  # nothing lost
        s.close()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_prefetch_into_a_pinned_full_host_is_a_miss_at_once(make_store, tokens):
    s = make_store(host_chunks=2)
    kv = make_kv(SPEC, 32, 1)
    s.append("b", tokens[:32], kv).result()
    s.demote("b")
    s.append("a", tokens[:32], kv).result()
    with s.load("a", 32):
        fut = s.prefetch("b")
        assert fut.result(timeout=30) == 0  # nothing brought in, no error
    assert s.prefetch("b").result(timeout=30) == 2  # once "a" is free, it makes room


def test_demote_while_writes_are_in_flight(make_store, tokens):
    s = make_store()
    for i in range(5):
        kv = make_kv(SPEC, 200, 10 + i)
        s.append(f"w{i}", tokens, kv)  # not waited for: its chunk writes may still be running
        s.demote(f"w{i}")  # host copies of chunks still being written stay until they are on disk
        assert_kv_equal(read_all(s, f"w{i}", 200), kv)
    s.flush()
    for i in range(5):
        s.demote(f"w{i}")
        assert_kv_equal(read_all(s, f"w{i}", 200), make_kv(SPEC, 200, 10 + i))
