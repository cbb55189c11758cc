"""The remote tier against real Redis servers: two stores (two servers' worth of local
tiers) sharing one Redis, faults, eviction by Redis, and a Redis that is not there."""

import logging

import numpy as np
import pytest
import redis

from cachedattn import AttentionStore
from cachedattn.store.config import StoreConfig
from tests.remote.redis_servers import free_port
from tests.store.conftest import CHUNK, SPEC, assert_kv_equal, chunk_bytes, make_kv, read_all


@pytest.fixture
def open_store(tmp_path):
    opened = []

    def make(name, remote, **kw):
        s = AttentionStore(
            host_bytes=kw.pop("host_chunks", 64) * chunk_bytes(),
            disk_dir=str(tmp_path / name),
            disk_bytes=256 * (chunk_bytes() + 4096),
            chunk_tokens=CHUNK,
            spec=SPEC,
            hugepages="off",
            remote=remote,
            **kw,
        )
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


def _tokens(seed, n=100):
    return np.random.default_rng(seed).integers(0, 32000, n)


def test_a_store_that_never_saw_a_conversation_finds_it_in_the_remote_tier(redis_server, open_store):
    a, b = open_store("a", redis_server.url), open_store("b", redis_server.url)
    toks, kv = _tokens(1), make_kv(SPEC, 90, 3)
    a.append("c", toks[:90], kv).result()
    a.flush()
    assert b.lookup("c", toks) == 90  # 5 whole chunks and a partial one of 10 tokens
    assert_kv_equal(read_all(b, "c", 90), kv)
    st = b.stats()["remote"]
    assert st["hits"] == 6 and st["bytes_read"] > 6 * chunk_bytes() and st["errors"] == 0
    assert a.stats()["remote"]["bytes_written"] == st["bytes_read"]
    # B extends it; A (whose copy is shorter) adopts the longer remote chain, partial chunk replaced.
    more = make_kv(SPEC, 30, 4)
    full = np.concatenate([toks, _tokens(9, 20)])
    b.append("c", full, more, start=90).result()
    b.flush()
    assert a.lookup("c", np.concatenate([full, [7]])) == 120
    got = read_all(a, "c", 120)
    assert_kv_equal([(k[:, 90:], v[:, 90:]) for k, v in got], more)
    assert_kv_equal([(k[:, :90], v[:, :90]) for k, v in got], kv)


def test_through_sentinel_the_master_it_names_holds_the_chunks(redis_sentinel, open_store):
    a, b = open_store("a", redis_sentinel.url), open_store("b", redis_sentinel.url)
    toks, kv = _tokens(11), make_kv(SPEC, 50, 1)
    a.append("c", toks[:50], kv).result()
    a.flush()
    assert b.lookup("c", toks) == 50
    assert_kv_equal(read_all(b, "c", 50), kv)
    assert redis.Redis(port=redis_sentinel.master.port).dbsize() == 5  # 4 chunks and one partial-chunk entry


def test_a_conversation_id_and_model_are_the_namespace(redis_server, open_store):
    a, b = open_store("a", redis_server.url), open_store("b", redis_server.url)
    toks = _tokens(2)
    a.append("c", toks[:64], make_kv(SPEC, 64, 1)).result()
    a.flush()
    assert b.lookup("other", toks) == 0  # same tokens, another conversation: another chain
    assert all(k.startswith(b"cachedattn:" + SPEC.fingerprint[:32].encode()) for k in redis.Redis(port=redis_server.port).keys())


def test_damaged_remote_bytes_are_caught_removed_and_never_served(redis_server, open_store, caplog):
    a, b = open_store("a", redis_server.url), open_store("b", redis_server.url)
    toks, kv = _tokens(3), make_kv(SPEC, 80, 5)
    a.append("c", toks[:80], kv).result()
    a.flush()
    r = redis.Redis(port=redis_server.port)
    from cachedattn.store import keys

    key = keys.root_key(SPEC.fingerprint, "c")
    for j in range(3):  # the third chunk's key
        key = keys.chunk_key(key, toks[j * CHUNK : (j + 1) * CHUNK])
    name = f"cachedattn:{SPEC.fingerprint[:32]}:c:{key.hex()}"
    value = bytearray(r.get(name))
    value[-100] ^= 0xFF  # a payload byte
    r.set(name, bytes(value))
    with caplog.at_level(logging.WARNING, logger="cachedattn"):
        n = b.lookup("c", toks)
    assert n == 2 * CHUNK  # the chain ends before the damaged chunk: the rest is recomputed
    assert_kv_equal(read_all(b, "c", n), kv, upto=n)
    assert b.stats()["remote"]["corrupt"] == 1 and not r.exists(name)
    assert "checksum mismatch" in caplog.text


def test_an_evicted_partial_chunk_is_a_miss_and_its_entry_is_cleaned_up(redis_server, open_store):
    a, b = open_store("a", redis_server.url), open_store("b", redis_server.url)
    toks = _tokens(4)
    a.append("c", toks[:40], make_kv(SPEC, 40, 2)).result()
    a.flush()
    r = redis.Redis(port=redis_server.port)
    (tail,) = r.keys(b"*:t:*")
    chunk_names = sorted(r.keys(b"*:c:*"))
    partial = [n for n in chunk_names if r.strlen(n) == min(r.strlen(m) for m in chunk_names)]
    assert r.smembers(tail) == {b"8"}
    r.delete(*[n for n in chunk_names if r.strlen(n) < max(r.strlen(m) for m in chunk_names)] or partial)
    assert b.lookup("c", toks) == 32
    assert r.smembers(tail) == set()
    assert b.stats()["remote"]["misses"] == 1


def test_redis_evicting_under_maxmemory_gives_misses_not_errors(redis_lru, open_store):
    a = open_store("a", redis_lru.url)
    convs = {f"c{i}": _tokens(100 + i, 96) for i in range(80)}  # ~80 x 72 KB: far beyond 2 MB
    for cid, toks in convs.items():
        a.append(cid, toks, make_kv(SPEC, 96, 1)).result()
        a.flush()  # each one written (the in-flight bound is another test's)
    assert a.stats()["remote"]["errors"] == 0
    b = open_store("b", redis_lru.url)
    found = {cid: b.lookup(cid, toks) for cid, toks in convs.items()}
    # Redis evicted most (its LRU is approximate: which ones is its choice); what is left is sound.
    assert found["c0"] < 96 and 0 < sum(found.values()) < 96 * len(convs)
    for cid, n in found.items():
        if n:
            assert_kv_equal(read_all(b, cid, n), make_kv(SPEC, 96, 1), upto=n)
    st = b.stats()["remote"]
    assert st["errors"] == 0 and st["corrupt"] == 0


def test_a_full_redis_refusing_writes_costs_no_turn_and_nothing_local(redis_full, open_store, caplog):
    a = open_store("a", redis_full.url)
    convs = {f"c{i}": _tokens(200 + i, 64) for i in range(40)}  # ~40 x 50 KB: beyond 1.5 MB
    with caplog.at_level(logging.WARNING, logger="cachedattn"):
        for cid, toks in convs.items():
            a.append(cid, toks, make_kv(SPEC, 64, 1)).result()
            a.flush()
    assert "OutOfMemoryError" in caplog.text and caplog.text.count("the remote tier") == 1
    assert a.stats()["remote"]["errors"] >= 1
    for cid, toks in convs.items():  # every turn's KV is still here
        assert a.lookup(cid, toks) == 64
    assert_kv_equal(read_all(a, "c39", 64), make_kv(SPEC, 64, 1))


def test_redis_unreachable_at_start_the_store_works_locally_and_warns_once(open_store, caplog):
    url = f"redis://127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING, logger="cachedattn"):
        s = open_store("a", url)
        toks, kv = _tokens(5), make_kv(SPEC, 70, 1)
        s.append("c", toks[:70], kv).result()
        s.flush()
        assert s.lookup("c", toks) == 70
        assert_kv_equal(read_all(s, "c", 70), kv)
        s.append("d", toks[:50], make_kv(SPEC, 50, 2)).result()
        assert s.lookup("d", toks) == 50
    assert caplog.text.count("the remote tier") == 1 and "retrying with backoff" in caplog.text
    assert s.stats()["remote"]["errors"] >= 1


def test_the_tier_comes_back_after_backoff(redis_server, open_store, monkeypatch):
    from cachedattn.store import remote_tier

    monkeypatch.setattr(remote_tier, "BACKOFF_S", (0.05, 0.05))
    a = open_store("a", redis_server.url)
    port = redis_server.port
    redis_server.stop()
    toks = _tokens(6)
    a.append("c", toks[:50], make_kv(SPEC, 50, 1)).result()  # Redis gone: local only
    a.flush()
    assert a.lookup("c", toks) == 50
    from tests.remote.redis_servers import RedisServer

    srv = RedisServer.__new__(RedisServer)
    srv.port, srv.dir = port, redis_server.dir
    import subprocess, time

    srv.proc = subprocess.Popen(["redis-server", str(redis_server.dir / "redis.conf")], stdout=subprocess.DEVNULL)
    try:
        srv._wait()
        time.sleep(0.1)
        a.append("d", toks[:40], make_kv(SPEC, 40, 2)).result()
        a.flush()
        assert a.stats()["remote"]["bytes_written"] > 0
        b = open_store("b", redis_server.url)
        assert b.lookup("d", toks) == 40
    finally:
        srv.stop()


def test_bytes_in_flight_are_bounded_and_the_rest_skipped(redis_server, open_store):
    a = open_store("a", redis_server.url, remote_inflight_bytes=chunk_bytes() + 1)
    toks = _tokens(7)
    a.append("c", toks, make_kv(SPEC, 100, 1)).result()
    a.flush()
    st = a.stats()["remote"]
    assert st["skipped_writes"] >= 1 and st["errors"] == 0
    assert a.lookup("c", toks) == 100  # the local tiers keep everything


def test_remote_urls_are_validated_early():
    for bad, why in [("http://h:1", "unknown scheme"), ("redis://h:x", "bad host:port"), ("redis+sentinel://h:1", "service"),
                     ("redis://a:1,b:2", "several hosts"), ("", "expected a Redis URL")]:
        with pytest.raises(ValueError, match=why):
            StoreConfig(remote=bad)
    cfg = StoreConfig.from_env({"CACHEDATTN_REMOTE": "redis+cluster://h1:7000,h2:7001", "CACHEDATTN_REMOTE_TTL_S": "600"})
    assert cfg.remote == "redis+cluster://h1:7000,h2:7001" and cfg.remote_ttl_s == 600
    with pytest.raises(ValueError, match="remote_ttl_s"):
        StoreConfig(remote_ttl_s=0)


def test_without_the_redis_package_the_store_says_so_and_works_locally(open_store, monkeypatch, caplog):
    import sys

    monkeypatch.setitem(sys.modules, "redis", None)  # `import redis` raises ImportError
    with caplog.at_level(logging.WARNING, logger="cachedattn"):
        s = open_store("a", "redis://127.0.0.1:1")
    assert "needs the `redis` package" in caplog.text and s._remote is None
    toks = _tokens(12)
    s.append("c", toks[:30], make_kv(SPEC, 30, 1)).result()
    assert s.lookup("c", toks) == 30


def test_prefetch_remote_brings_the_history_in_ahead_of_the_turn(redis_server, open_store):
    a, b = open_store("a", redis_server.url), open_store("b", redis_server.url)
    toks, kv = _tokens(13), make_kv(SPEC, 60, 2)
    a.append("c", toks[:60], kv).result()
    a.flush()
    assert b.prefetch_remote("c", toks).result() == 4
    assert b.residency("c")["host_bytes"] == 4 * chunk_bytes()
    with b.load_prefix("c", toks) as ld:
        assert ld.n_tokens == 60 and ld.from_disk == 0
    assert b.stats()["remote"]["hits"] == 4  # the lookup found nothing more to fetch
    assert open_store("c", None).prefetch_remote("c", toks).result() == 0


def test_an_unexpected_failure_reading_the_remote_tier_is_served_locally(redis_server, open_store, caplog):
    a = open_store("a", redis_server.url)
    toks = _tokens(14)
    a.append("c", toks[:40], make_kv(SPEC, 40, 1)).result()
    a.flush()

    def broken(*_):
        raise RuntimeError("a bug in the remote path")

    a._remote.tier.find_chains = broken
    with caplog.at_level(logging.WARNING, logger="cachedattn"):
        assert a.lookup("c", toks) == 40
        with a.load_prefix("c", toks) as ld:
            assert ld.n_tokens == 40
    assert "a bug in the remote path" in caplog.text and a.stats()["remote"]["errors"] == 2


def test_remote_ttl_gives_every_chunk_and_entry_an_expiry(redis_server, open_store):
    a = open_store("a", redis_server.url, remote_ttl_s=100)
    a.append("c", _tokens(15)[:40], make_kv(SPEC, 40, 1)).result()
    a.flush()
    r = redis.Redis(port=redis_server.port)
    names = r.keys(b"cachedattn:*")
    assert len(names) == 4 and all(0 < r.ttl(n) <= 100 for n in names)  # 2 chunks, the partial one, its entry


def test_a_lookup_of_what_is_held_whole_here_costs_no_round_trip(redis_server, open_store):
    a = open_store("a", redis_server.url)
    toks = _tokens(15)
    a.append("c", toks[:64], make_kv(SPEC, 64, 1)).result()
    a.flush()
    before = a.stats()["remote"]["requests"]
    assert a.lookup("c", toks[:64]) == 64
    with a.load_prefix("c", toks[:64]) as ld:
        assert ld.n_tokens == 64
    assert a.stats()["remote"]["requests"] == before


def test_lookup_many_reads_many_conversations_from_redis_in_two_round_trips(redis_server, open_store):
    a, b = open_store("a", redis_server.url), open_store("b", redis_server.url)
    items, kvs = [], []
    for i in range(12):  # a request's blocks as the connector keeps them: one conversation each
        toks = _tokens(100 + i, CHUNK)
        kvs.append(make_kv(SPEC, CHUNK, i))
        a.append(f"kv-{i}", toks, kvs[-1]).result()
        items.append((f"kv-{i}", toks))
    a.append("partial", _tokens(99, 20), make_kv(SPEC, 20, 99)).result()
    a.flush()
    items.insert(5, ("never-stored", _tokens(98, CHUNK)))
    items.append(("partial", _tokens(99, 40)))
    assert b.lookup_many(items, remote=False) == [0] * len(items)
    assert b.stats()["remote"]["requests"] == 0
    assert b.lookup_many(items) == [CHUNK] * 5 + [0] + [CHUNK] * 7 + [20]
    assert b.stats()["remote"]["requests"] == 2  # one probe, one read, for all thirteen
    for i in range(12):
        assert_kv_equal(read_all(b, f"kv-{i}", CHUNK), kvs[i])
    assert b.lookup_many(items) == [CHUNK] * 5 + [0] + [CHUNK] * 7 + [20]
    assert b.stats()["remote"]["requests"] == 3  # only what is not held whole asks again (one probe)
