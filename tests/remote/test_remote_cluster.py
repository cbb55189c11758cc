"""The remote tier on a 3-master Redis Cluster: shared history across stores, and a
master killed in the middle of a run (no turn fails, no KV is wrong)."""

import numpy as np

from cachedattn import AttentionStore
from tests.store.conftest import CHUNK, SPEC, assert_kv_equal, chunk_bytes, make_kv, read_all


def _store(path, url):
    return AttentionStore(
        host_bytes=64 * chunk_bytes(), disk_dir=str(path), disk_bytes=512 * (chunk_bytes() + 4096), chunk_tokens=CHUNK,
        spec=SPEC, hugepages="off", remote=url, remote_timeout_s=0.5,
    )


def test_two_stores_share_history_through_a_cluster(redis_cluster, tmp_path):
    with _store(tmp_path / "a", redis_cluster.url) as a, _store(tmp_path / "b", redis_cluster.url) as b:
        toks, kv = np.random.default_rng(1).integers(0, 32000, 200), make_kv(SPEC, 170, 2)
        a.append("c", toks[:170], kv).result()
        a.flush()
        assert b.lookup("c", toks) == 170
        assert_kv_equal(read_all(b, "c", 170), kv)
        assert b.stats()["remote"]["hits"] == 11  # chunks spread over the three masters
        owners = {n.port for n in redis_cluster.nodes if int(n.cli("dbsize") or 0) > 0}
        assert len(owners) >= 2


def test_a_master_killed_during_a_run_fails_no_turn_and_serves_no_wrong_kv(redis_cluster, tmp_path):
    rng = np.random.default_rng(3)
    convs = {f"c{i}": rng.integers(0, 32000, 400) for i in range(6)}
    kvs = {cid: make_kv(SPEC, 400, i) for i, cid in enumerate(convs)}
    stored = dict.fromkeys(convs, 0)
    servers = [_store(tmp_path / "a", redis_cluster.url), _store(tmp_path / "b", redis_cluster.url)]
    try:
        for turn in range(8):
            if turn == 3:
                redis_cluster.nodes[1].stop()  # a third of the slots go
            for i, cid in enumerate(convs):
                st = servers[(turn + i) % 2]  # each turn of a conversation on the other server
                n = st.lookup(cid, convs[cid])
                assert n <= stored[cid]
                if n:
                    assert_kv_equal(read_all(st, cid, n), kvs[cid], upto=n)
                end = stored[cid] + 40
                new = [(k[:, n:end], v[:, n:end]) for k, v in kvs[cid]]
                st.append(cid, convs[cid][:end], new, start=n).result()  # recomputes what it could not load
                stored[cid] = end
            for st in servers:
                st.flush()
        errors = sum(s.stats()["remote"]["errors"] for s in servers)
        hits = sum(s.stats()["remote"]["hits"] for s in servers)
        assert errors >= 1 and hits >= 1
    finally:
        for st in servers:
            st.close()
