"""The vLLM connector's worker side over a real Redis, without vLLM: a second
instance finds a request's blocks that the first stored, in a fixed number of
round trips whatever the request's length, byte for byte."""

from __future__ import annotations

import numpy as np
import torch

import cachedattn
from cachedattn.store import KVSpec
from cachedattn.vllm.paged import PagedKV
from cachedattn.vllm.plan import PrefixPlanner
from cachedattn.vllm.prefix_keys import namespace
from cachedattn.vllm.transfers import PagedTransfers
from tests.vllm.test_connector_core import B, D, H, L, NB, _matched, _paged, _step

BLOCKS = 24


def _instance(tmp_path, name, url, seed):
    spec = KVSpec.uniform(L, H, D, torch.float32, model_digest="w1")
    store = cachedattn.AttentionStore(
        host_bytes=8 << 20, disk_dir=str(tmp_path / name), chunk_tokens=B, hugepages="off", spec=spec, remote=url
    )
    caches = _paged(seed)
    planner = PrefixPlanner(namespace("w1", "float32", "paged-test", B), B)
    return store, caches, planner, PagedTransfers(store, PagedKV(caches, B, H, D))


def test_a_second_instance_reads_a_requests_blocks_from_redis_in_two_round_trips(redis_server, tmp_path):
    a = _instance(tmp_path, "a", redis_server.url, seed=0)
    b = _instance(tmp_path, "b", redis_server.url, seed=1)
    try:
        store_a, caches_a, planner_a, transfers_a = a
        toks = np.arange(1000, 1000 + BLOCKS * B + 1)
        assert planner_a.finished("r1", toks, BLOCKS * B, list(range(BLOCKS)))
        _step(planner_a, transfers_a)
        store_a.flush()

        store_b, caches_b, planner_b, transfers_b = b
        before = store_b.stats()["remote"]["requests"]
        assert _matched(planner_b, transfers_b, "r2", toks, 0) == BLOCKS * B
        assert store_b.stats()["remote"]["requests"] - before == 2  # one probe and one read for 24 blocks
        dst = list(range(NB - BLOCKS, NB))
        planner_b.allocated("r2", dst, BLOCKS * B)
        _step(planner_b, transfers_b)
        assert store_b.stats()["remote"]["requests"] - before == 2  # the load finds them here
        for layer in range(L):
            assert torch.equal(caches_b[layer][dst], caches_a[layer][:BLOCKS])
    finally:
        for _, _, _, t in (a, b):
            t.close()
        for s, _, _, _ in (a, b):
            s.close()
