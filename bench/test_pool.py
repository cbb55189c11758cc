"""Host pool: block alloc/free rate, and filling blocks (zero-copy views)."""

from __future__ import annotations

import torch

from cachedattn import native


def test_alloc_free_pair(benchmark, report):
    pool = native.HostPool(64 << 20, 64 << 10)

    def cycle():
        b = pool.alloc()
        pool.free(b)

    benchmark(cycle)
    report.append({"suite": "pool", "case": "alloc+free (Python call)", "ops/s": 1.0 / benchmark.stats.stats.median})
    pool.close()


def test_alloc_free_burst(benchmark, report):
    pool = native.HostPool(64 << 20, 64 << 10)
    n = pool.num_blocks

    def burst():
        blocks = [pool.alloc() for _ in range(n)]
        for b in blocks:
            pool.free(b)

    benchmark(burst)
    report.append({"suite": "pool", "case": f"alloc {n} then free {n}", "ops/s": 2 * n / benchmark.stats.stats.median})
    pool.close()


def test_fill_blocks_through_views(benchmark, report):
    # 256 MiB, far past any last-level cache: this measures memory, not cache.
    pool = native.HostPool(256 << 20, 8 << 20)
    views = [torch.frombuffer(pool.alloc(), dtype=torch.uint8) for _ in range(pool.num_blocks)]
    src = torch.randint(0, 256, (256 << 20,), dtype=torch.uint8)
    parts = src.split(8 << 20)

    def fill():
        for v, p in zip(views, parts):
            v.copy_(p)

    benchmark(fill)
    report.append({"suite": "pool", "case": "copy 256 MiB into block views", "GB/s": (256 << 20) / benchmark.stats.stats.median / 1e9})
    pool.close()
