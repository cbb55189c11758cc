"""Lookup latency while large transfers run: a write-back demotion and a prefetch
of CACHEDATTN_BENCH_MOVE_MB (default 1024) MiB in all, over and over, on
background threads, while the benchmark looks up a small conversation.

The store lock is never held for I/O, so a lookup waits at most for another
thread's bookkeeping, not for a disk. Reported: p50/p99/max lookup latency and
the bytes moved while measuring (the moving must overlap the lookups).

    python3 -m pytest bench/test_store_lookup.py
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import torch

from cachedattn import AttentionStore, KVSpec
from cachedattn.store import HostMemoryFull
from cachedattn.store.spec import ChunkGeometry

MOVE_MB = int(os.environ.get("CACHEDATTN_BENCH_MOVE_MB", "1024"))
CHUNK = 256
SPEC = KVSpec.uniform(32, 8, 128, torch.bfloat16, "bench-lookup-llama3-8b")  # 128 KiB per token


def _kv(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(h, n, d, generator=g).to(SPEC.dtype), torch.randn(h, n, d, generator=g).to(SPEC.dtype)) for h, d in SPEC.layers]


def test_lookup_latency_while_moving(benchmark, report, bench_dir):
    geo = ChunkGeometry(SPEC, CHUNK)
    half_chunks = max(1, MOVE_MB * (1 << 20) // 2 // geo.block_bytes)
    n = half_chunks * CHUNK  # tokens of each of the two big conversations
    store = AttentionStore(
        host_bytes=(3 * half_chunks + 2) * geo.block_bytes,  # an append keeps the old copy until commit
        disk_dir=str(bench_dir / "lookup"),
        disk_bytes=4 * half_chunks * (geo.block_bytes + 65536),
        chunk_tokens=CHUNK,
        spec=SPEC,
        write_through=False,  # so that demoting writes: the transfer that once held the lock
    )
    rng = np.random.default_rng(0)
    big = rng.integers(0, 128000, n)
    kv = _kv(n, 1)
    store.append("demoted", big, kv).result()
    store.append("prefetched", big, kv).result()
    store.demote("prefetched")
    small = rng.integers(0, 128000, 300)
    store.append("small", small, _kv(300, 2)).result()

    moved = [0]
    stop = threading.Event()

    def demoter():
        while not stop.is_set():
            store.append("demoted", big, kv).result()  # fresh, host only (write-back)
            store.demote("demoted")  # writes half of MOVE_MB
            moved[0] += half_chunks * geo.block_bytes

    def prefetcher():
        while not stop.is_set():
            try:
                got = store.prefetch("prefetched").result()  # reads half of MOVE_MB
            except HostMemoryFull:
                continue  # the demoter's append holds the room this instant: try again
            moved[0] += got * geo.block_bytes
            store.demote("prefetched")  # on disk already: host copies go at once

    threads = [threading.Thread(target=demoter), threading.Thread(target=prefetcher)]
    for th in threads:
        th.start()
    time.sleep(0.2)  # both transfers under way
    lat: list[float] = []

    def lookup():
        t = time.perf_counter()
        store.lookup("small", small)
        lat.append(time.perf_counter() - t)

    try:
        before = moved[0]
        t0 = time.perf_counter()
        # Spaced out (untimed) so that the lookups span several whole transfers.
        benchmark.pedantic(lookup, setup=lambda: time.sleep(0.001), rounds=3000, iterations=1, warmup_rounds=10)
        wall = time.perf_counter() - t0
        during = moved[0] - before
    finally:
        stop.set()
        for th in threads:
            th.join()
        store.close()
    lat_ms = np.array(lat) * 1e3
    row = {
        "suite": "store",
        "case": f"lookup while {MOVE_MB} MiB demote+prefetch run",
        "p50 ms": float(np.percentile(lat_ms, 50)),
        "p99 ms": float(np.percentile(lat_ms, 99)),
        "p99.9 ms": float(np.percentile(lat_ms, 99.9)),
        "max ms": float(lat_ms.max()),
        "moved GB/s": during / wall / 1e9,
    }
    benchmark.extra_info.update(row)
    report.append(row)
    assert during > 0, "nothing moved while measuring: the figure would say nothing"
