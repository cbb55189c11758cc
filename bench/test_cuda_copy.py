"""Pinned H2D/D2H bandwidth of the copy engine against a plain
cudaMemcpyAsync of the same bytes (torch's non_blocking copy), and pinned
against pageable memory. GPU only: skipped without one.

Each call ends with a stream synchronize before the clock is read.
"""

from __future__ import annotations

import pytest
import torch

from cachedattn import native

pytestmark = pytest.mark.cuda

TOTAL = 256 << 20
SEG = 256 << 10


@pytest.fixture(scope="module")
def setup():
    pool = native.HostPool(TOTAL, 8 << 20)
    blocks = [pool.alloc() for _ in range(pool.num_blocks)]
    for b in blocks:
        torch.frombuffer(b, dtype=torch.uint8).copy_(torch.randint(0, 256, (len(b),), dtype=torch.uint8))
    pinned_view = [torch.frombuffer(b, dtype=torch.uint8) for b in blocks]
    dev = torch.empty(TOTAL, dtype=torch.uint8, device="cuda")
    engine = native.CopyEngine(torch.cuda.current_device(), 1)
    yield pool, blocks, pinned_view, dev, engine
    torch.cuda.synchronize()
    pool.close()


def _segments(blocks, dev, seg, reverse=False):
    out = []
    for i, b in enumerate(blocks):
        for off in range(0, len(b), seg):
            h, d = b.ptr + off, dev.data_ptr() + i * len(b) + off
            out.append((d, h, seg) if reverse else (h, d, seg))
    return out


def _record(report, benchmark, case):
    gbps = TOTAL / benchmark.stats.stats.median / 1e9
    benchmark.extra_info["GB/s"] = gbps
    report.append({"suite": "cuda", "case": case, "GB/s": gbps})


@pytest.mark.parametrize("seg", [8 << 20, SEG], ids=["8M", "256K"])
def test_h2d_plain_memcpy_async(benchmark, report, setup, seg):
    pool, blocks, views, dev, _ = setup
    stream = torch.cuda.Stream()
    pairs = [(v[o : o + seg], dev[i * len(v) + o : i * len(v) + o + seg]) for i, v in enumerate(views) for o in range(0, len(v), seg)]

    def run():
        with torch.cuda.stream(stream):
            for h, d in pairs:
                d.copy_(h, non_blocking=True)
        stream.synchronize()

    benchmark(run)
    _record(report, benchmark, f"H2D cudaMemcpyAsync (torch) {seg >> 10}K pieces")


@pytest.mark.parametrize("seg", [8 << 20, SEG], ids=["8M", "256K"])
@pytest.mark.parametrize("method", ["copy_batch", "segment_copy"])
@pytest.mark.parametrize("direction", ["h2d", "d2h"])
def test_engine(benchmark, report, setup, direction, method, seg):
    """The copy engine: cudaMemcpyAsync per piece (copy_batch) or one kernel launch (segment_copy)."""
    _, blocks, _, dev, engine = setup
    segs = _segments(blocks, dev, seg, reverse=direction == "d2h")
    run_copy = getattr(engine, method)

    def run():
        run_copy(direction, segs, 0)
        engine.synchronize(direction)

    benchmark(run)
    _record(report, benchmark, f"{direction.upper()} engine {method} {seg >> 10}K pieces")


def test_h2d_pageable(benchmark, report, setup):
    _, _, _, dev, _ = setup
    host = torch.randint(0, 256, (TOTAL,), dtype=torch.uint8)  # ordinary pageable memory

    def run():
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()

    benchmark(run)
    _record(report, benchmark, "H2D pageable (torch)")


def test_d2h_plain_memcpy_async(benchmark, report, setup):
    _, _, views, dev, _ = setup
    stream = torch.cuda.Stream()

    def run():
        with torch.cuda.stream(stream):
            for i, v in enumerate(views):
                v.copy_(dev[i * len(v) : (i + 1) * len(v)], non_blocking=True)
        stream.synchronize()

    benchmark(run)
    _record(report, benchmark, "D2H cudaMemcpyAsync (torch) 8M pieces")
