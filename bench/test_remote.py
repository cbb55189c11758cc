"""The remote tier's load bandwidth against the disk tier's, on the same history.

A Llama-3-8B-shaped history (32 layers, 8 KV heads, head dim 128, bf16:
128 KiB per token, 32 MiB per 256-token chunk) of CACHEDATTN_BENCH_TOKENS
tokens (default 2048) is written through one store. "load from remote": a
fresh store with no local copy (another server) finds the chain in Redis,
GETs it (pipelined, whole chunks), checks every layer and serves it.
"load from disk": the writing store, its host copy demoted, reads it back
from its disk tier. Redis is a local redis-server started here (or
CACHEDATTN_BENCH_REDIS=redis://...), on the same machine: loopback TCP, not a
network.

    python3 -m pytest bench/test_remote.py
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from cachedattn import AttentionStore, KVSpec
from cachedattn.store.spec import ChunkGeometry

TOKENS = int(os.environ.get("CACHEDATTN_BENCH_TOKENS", "2048"))
CHUNK = 256
SPEC = KVSpec.uniform(32, 8, 128, torch.bfloat16, "bench-llama3-8b")
NAME = "llama3-8b(32L,8x128,bf16)"


@pytest.fixture(scope="module")
def redis_url(bench_dir):
    url = os.environ.get("CACHEDATTN_BENCH_REDIS")
    if url:
        yield url
        return
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed (scripts/setup.sh installs it) and no CACHEDATTN_BENCH_REDIS given")
    from tests.remote.redis_servers import RedisServer

    srv = RedisServer(bench_dir, "maxmemory 0")
    yield srv.url
    srv.stop()


@pytest.fixture(scope="module")
def history(redis_url, bench_dir):
    geo = ChunkGeometry(SPEC, CHUNK)
    nchunks = -(-TOKENS // CHUNK)
    store = AttentionStore(
        host_bytes=4 * nchunks * geo.block_bytes + geo.block_bytes, disk_dir=str(bench_dir / "remote-bench-disk"),
        disk_bytes=4 * nchunks * (geo.block_bytes + 8192), chunk_tokens=CHUNK, spec=SPEC, remote=redis_url,
        remote_timeout_s=30.0, remote_inflight_bytes=4 * nchunks * geo.block_bytes,
    )
    g = torch.Generator().manual_seed(0)
    kv = [(torch.randn(h, TOKENS, d, generator=g).to(SPEC.dtype), torch.randn(h, TOKENS, d, generator=g).to(SPEC.dtype))
          for h, d in SPEC.layers]
    toks = np.random.default_rng(0).integers(0, 128000, TOKENS)
    store.append("bench", toks, kv).result()
    store.flush()
    if store.stats()["remote"]["skipped_writes"] or store.stats()["remote"]["errors"]:
        pytest.fail(f"the history did not reach Redis: {store.stats()['remote']}")
    yield store, toks, nchunks * geo.block_bytes
    store.close()


def _row(report, benchmark, case, nbytes):
    secs = benchmark.stats.stats.median
    row = {"suite": "remote", "case": f"{case} {NAME}", "tokens": TOKENS, "tokens/s": TOKENS / secs, "GB/s": nbytes / secs / 1e9}
    benchmark.extra_info.update(row)
    report.append(row)


def test_load_from_remote(benchmark, report, history, redis_url):
    store, toks, nbytes = history
    fresh = []

    def setup():
        s = AttentionStore(host_bytes=store.config.host_bytes, chunk_tokens=CHUNK, spec=SPEC, remote=redis_url,
                           remote_timeout_s=30.0)
        fresh.append(s)
        return (s,), {}

    def load(s):
        ld = s.load_prefix("bench", toks)
        assert ld is not None and ld.n_tokens == TOKENS
        with ld:
            ld.read_all()

    try:
        benchmark.pedantic(load, setup=setup, rounds=5, warmup_rounds=1)
        assert all(s.stats()["remote"]["corrupt"] == 0 for s in fresh)
    finally:
        for s in fresh:
            s.close()
    _row(report, benchmark, "load from remote (local Redis)", nbytes)


def test_load_from_disk(benchmark, report, history):
    store, toks, nbytes = history

    def load():
        with store.load("bench", TOKENS) as ld:
            ld.read_all()

    benchmark.pedantic(load, setup=lambda: store.demote("bench"), rounds=5, warmup_rounds=1)
    _row(report, benchmark, "load from disk", nbytes)
