"""Pinned H2D/D2H bandwidth of the copy engine against a plain
cudaMemcpyAsync of the same bytes (torch's non_blocking copy), and pinned
against pageable memory; the store's per-layer load pattern (16 x 1 MiB vs
256 x 64 KiB per layer, copy_batch vs segment_copy); and how much a bf16
matmul loop slows down while copies overlap it. GPU only: skipped without one.

Each call ends with a host wait (stream synchronize or the last layer's
event) before the clock is read.
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


# ---- the store's per-layer pattern ------------------------------------------------
# One layer of one 256-token chunk of a Llama-3-8B shape is 1 MiB contiguous, so a
# 4K-token history loads 16 x 1 MiB per layer; 256 x 64 KiB is the same bytes cut as
# a per-head layout would cut them. Each layer records its event; the last layer's
# host wait ends the load (as a turn's read-ahead would).

LAYER_BYTES = 16 << 20


@pytest.fixture(scope="module")
def layered():
    pool = native.HostPool(TOTAL, 1 << 20)
    blocks = [pool.alloc() for _ in range(pool.num_blocks)]
    for b in blocks:
        torch.frombuffer(b, dtype=torch.uint8).copy_(torch.randint(0, 256, (len(b),), dtype=torch.uint8))
    dev = torch.empty(TOTAL, dtype=torch.uint8, device="cuda")
    engine = native.CopyEngine(torch.cuda.current_device(), TOTAL // LAYER_BYTES)
    yield pool, blocks, dev, engine
    torch.cuda.synchronize()
    del blocks
    pool.close()


def _layer_segments(blocks, dev, piece, direction):
    """Per layer: the layer's 1 MiB blocks cut into `piece`-byte segments."""
    per_layer = LAYER_BYTES // len(blocks[0])
    layers = []
    for layer in range(len(blocks) // per_layer):
        segs = []
        for j, b in enumerate(blocks[layer * per_layer : (layer + 1) * per_layer]):
            base = dev.data_ptr() + layer * LAYER_BYTES + j * len(b)
            for off in range(0, len(b), piece):
                h, d = b.ptr + off, base + off
                segs.append((h, d, piece) if direction == "h2d" else (d, h, piece))
        layers.append(segs)
    return layers


def _issue_layers(engine, method, direction, layers):
    engine.begin_epoch()
    run_copy = getattr(engine, method)
    for i, segs in enumerate(layers):
        run_copy(direction, segs, i)
    engine.wait_layer(direction, len(layers) - 1)


@pytest.mark.parametrize("piece", [1 << 20, 64 << 10], ids=["16x1M", "256x64K"])
@pytest.mark.parametrize("method", ["copy_batch", "segment_copy"])
@pytest.mark.parametrize("direction", ["h2d", "d2h"])
def test_layer_pattern(benchmark, report, layered, direction, method, piece):
    _, blocks, dev, engine = layered
    layers = _layer_segments(blocks, dev, piece, direction)
    benchmark(_issue_layers, engine, method, direction, layers)
    per_layer = LAYER_BYTES // piece
    _record(report, benchmark, f"{direction.upper()} per layer {per_layer} x {piece >> 10}K {method}")


# ---- compute slowdown while copies overlap ---------------------------------------
# A bf16 matmul loop on the compute stream, alone and with a load (or a save)
# running beside it on the engine's stream. Copy engines (copy_batch) only take
# memory bandwidth; segment_copy's kernel also takes SMs.

MATMUL_N = 8192
MATMUL_ITERS = 20
COPY_ROUNDS = 8  # 2 GiB of copies: longer than the ~28 ms matmul loop, so they overlap all of it


def _matmul_ms(a, b, iters):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        torch.matmul(a, b)
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


@pytest.mark.parametrize("method", ["copy_batch", "segment_copy"])
@pytest.mark.parametrize("direction", ["h2d", "d2h"])
def test_overlap_slowdown(benchmark, report, layered, direction, method):
    _, blocks, dev, engine = layered
    a = torch.randn(MATMUL_N, MATMUL_N, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(MATMUL_N, MATMUL_N, device="cuda", dtype=torch.bfloat16)
    layers = _layer_segments(blocks, dev, 1 << 20, direction)
    run_copy = getattr(engine, method)
    copy_stream = torch.cuda.ExternalStream(engine.stream(direction))
    for _ in range(3):
        _matmul_ms(a, b, MATMUL_ITERS)  # warm-up: clocks up, cuBLAS picked its kernel
    alone = sorted(_matmul_ms(a, b, MATMUL_ITERS) for _ in range(5))[2]
    runs = []

    def overlapped():
        torch.cuda.synchronize()
        m0, m1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        c0, c1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        # The matmuls are queued first (fast) so the copies, issued while they run, cover the loop.
        m0.record()
        for _ in range(MATMUL_ITERS):
            torch.matmul(a, b)
        m1.record()
        c0.record(copy_stream)
        for _ in range(COPY_ROUNDS):
            engine.begin_epoch()
            for i, segs in enumerate(layers):
                run_copy(direction, segs, i)
        c1.record(copy_stream)
        engine.synchronize(direction)
        m1.synchronize()
        runs.append((m0.elapsed_time(m1), c0.elapsed_time(c1)))

    benchmark.pedantic(overlapped, rounds=5, iterations=1, warmup_rounds=1)
    runs.sort()
    with_copies, copy_ms = runs[len(runs) // 2]
    slowdown = with_copies / alone
    copy_gbps = COPY_ROUNDS * TOTAL / (copy_ms * 1e-3) / 1e9
    benchmark.extra_info.update({"matmul_ms_alone": alone, "matmul_ms_with_copies": with_copies,
                                 "slowdown": slowdown, "copy_GB/s": copy_gbps})
    report.append({"suite": "cuda", "case": f"bf16 matmul + {direction.upper()} {method} 1M pieces",
                   "GB/s": copy_gbps, "slowdown": slowdown, "matmul_ms": with_copies, "matmul_ms_alone": alone})
