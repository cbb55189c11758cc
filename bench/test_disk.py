"""Disk: io_uring vs the thread pool vs torch.save/torch.load, next to fio.

Every read starts cold (the file is dropped from the page cache first; the
engine reads with O_DIRECT anyway). Writes end with fdatasync, torch.save's
too, so each method pays for durability. fio runs the same pattern (same
file size, block size, queue depth 32, O_DIRECT, io_uring) as the ceiling;
the target is io_uring reads >= 90% of fio and ahead of the thread pool.

    python3 -m pytest bench/test_disk.py        # CACHEDATTN_BENCH_FILE_MB=1024 by default
"""

from __future__ import annotations

import os

import fio
import numpy as np
import pytest
import torch

from cachedattn import native

FILE_BYTES = int(os.environ.get("CACHEDATTN_BENCH_FILE_MB", "1024")) << 20
RING_BYTES = 64 << 20  # destination memory, reused round-robin
BLOCKS = [256 << 10, 1 << 20, 8 << 20]
QUEUE_DEPTH = 32
POOL_THREADS = 4
BACKENDS = ["io_uring", "threads"]


def _drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def pool():
    p = native.HostPool(RING_BYTES, 8 << 20)
    blocks = [p.alloc() for _ in range(p.num_blocks)]
    rng = np.random.default_rng(0)
    for b in blocks:  # random bytes: no device or filesystem gets to skip zeros
        np.frombuffer(b, dtype=np.uint8)[:] = rng.integers(0, 256, len(b), dtype=np.uint8)
    yield p
    p.close()


@pytest.fixture(scope="module")
def data_file(bench_dir, pool):
    path = str(bench_dir / "data.bin")
    with native.File(path, "w") as f:
        eng = native.io_engine("threads")
        eng.write([(f, off, pool.base_ptr + off % RING_BYTES, RING_BYTES) for off in range(0, FILE_BYTES, RING_BYTES)]).wait()
        f.sync()
    return path


@pytest.fixture(scope="module")
def fio_bw(bench_dir, data_file):
    if not fio.available():
        pytest.skip("fio is not installed (apt-get install fio)")
    cache: dict[tuple[str, int], float] = {}

    def get(rw: str, bs: int) -> float:
        # Reads: the very file the engines read. Writes: a file of fio's own.
        path = data_file if rw == "read" else str(bench_dir / "fio-write.bin")
        if (rw, bs) not in cache:
            cache[(rw, bs)] = fio.bandwidth(path, rw, bs, FILE_BYTES, QUEUE_DEPTH)
        return cache[(rw, bs)]

    return get


def _engine(backend: str, pool):
    if backend == "io_uring":
        try:
            # One ring at fio's queue depth: the same concurrency as the ceiling.
            return native.io_engine("io_uring", threads=1, queue_depth=QUEUE_DEPTH, pool=pool)
        except OSError as e:
            pytest.skip(f"io_uring unavailable: {e}")
    return native.io_engine("threads", threads=POOL_THREADS)


def _requests(f, pool, bs):
    return [(f, off, pool.base_ptr + off % RING_BYTES, bs) for off in range(0, FILE_BYTES, bs)]


def _record(report, benchmark, case, fio_bps=None):
    secs = benchmark.stats.stats.median
    row = {"suite": "disk", "case": case, "GB/s": FILE_BYTES / secs / 1e9}
    if fio_bps:
        row["fio GB/s"] = fio_bps / 1e9
        row["vs fio"] = row["GB/s"] / row["fio GB/s"]
    benchmark.extra_info.update(row)
    report.append(row)


@pytest.mark.parametrize("bs", BLOCKS, ids=lambda b: f"{b >> 10}K")
@pytest.mark.parametrize("backend", BACKENDS)
def test_read(benchmark, report, pool, data_file, fio_bw, backend, bs):
    eng = _engine(backend, pool)
    f = native.File(data_file, "r")

    def read():
        eng.read(_requests(f, pool, bs)).wait()

    benchmark.pedantic(read, setup=lambda: _drop_cache(data_file), rounds=5, iterations=1, warmup_rounds=1)
    _record(report, benchmark, f"read {eng.name}({eng.threads}) bs={bs >> 10}K", fio_bw("read", bs))
    f.close()


@pytest.mark.parametrize("bs", BLOCKS, ids=lambda b: f"{b >> 10}K")
@pytest.mark.parametrize("backend", BACKENDS)
def test_write(benchmark, report, pool, bench_dir, fio_bw, backend, bs):
    eng = _engine(backend, pool)
    f = native.File(str(bench_dir / f"w-{backend}.bin"), "w")

    def write():
        eng.write(_requests(f, pool, bs)).wait()
        f.sync()

    benchmark.pedantic(write, rounds=5, iterations=1, warmup_rounds=1)
    _record(report, benchmark, f"write+sync {eng.name}({eng.threads}) bs={bs >> 10}K", fio_bw("write", bs))
    f.close()


@pytest.fixture(scope="module")
def torch_file(bench_dir, pool):
    path = str(bench_dir / "tensor.pt")
    t = torch.frombuffer(pool.block_at(pool.base_ptr), dtype=torch.uint8).repeat(FILE_BYTES // (8 << 20))
    torch.save(t, path)
    return path


def test_torch_load(benchmark, report, torch_file):
    def load():
        return torch.load(torch_file, weights_only=True)

    benchmark.pedantic(load, setup=lambda: _drop_cache(torch_file), rounds=5, iterations=1, warmup_rounds=1)
    _record(report, benchmark, "read torch.load")


def test_torch_save(benchmark, report, bench_dir, pool):
    t = torch.frombuffer(pool.block_at(pool.base_ptr), dtype=torch.uint8).repeat(FILE_BYTES // (8 << 20))
    path = str(bench_dir / "save.pt")

    def save():
        torch.save(t, path)
        fd = os.open(path, os.O_RDONLY)
        os.fdatasync(fd)
        os.close(fd)

    benchmark.pedantic(save, rounds=5, iterations=1, warmup_rounds=1)
    _record(report, benchmark, "write+sync torch.save")
