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


def test_fill_block_through_view(benchmark, report):
    pool = native.HostPool(64 << 20, 8 << 20)
    b = pool.alloc()
    view = torch.frombuffer(b, dtype=torch.uint8)
    src = torch.randint(0, 256, (len(b),), dtype=torch.uint8)
    benchmark(view.copy_, src)
    report.append({"suite": "pool", "case": "copy 8 MiB into a block view", "GB/s": len(b) / benchmark.stats.stats.median / 1e9})
    pool.close()
