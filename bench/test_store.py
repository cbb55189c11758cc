"""AttentionStore throughput per tier, next to the raw I/O engine on the same bytes.

Shapes: a small model and a Llama-3-8B-shaped one (32 layers, 8 KV heads,
head dim 128, bf16). One conversation of CACHEDATTN_BENCH_TOKENS tokens
(default 4096) in 256-token chunks. "raw" moves the very same chunk files
with the I/O engine in the same per-layer pattern, with no checksums, keys
or bookkeeping: the store's overhead is the ratio of the two.

    python3 -m pytest bench/test_store.py
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from cachedattn import AttentionStore, KVSpec, native
from cachedattn.store.spec import ChunkGeometry

TOKENS = int(os.environ.get("CACHEDATTN_BENCH_TOKENS", "4096"))
CHUNK = 256
SHAPES = {
    "small(8L,4x64,bf16)": KVSpec.uniform(8, 4, 64, torch.bfloat16, "bench-small"),
    "llama3-8b(32L,8x128,bf16)": KVSpec.uniform(32, 8, 128, torch.bfloat16, "bench-llama3-8b"),
}
_RAW: dict[tuple[str, str], float] = {}


def _kv(spec):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(h, TOKENS, d, generator=g).to(spec.dtype), torch.randn(h, TOKENS, d, generator=g).to(spec.dtype)) for h, d in spec.layers]


@pytest.fixture(scope="module", params=list(SHAPES))
def shape(request, bench_dir):
    spec = SHAPES[request.param]
    geo = ChunkGeometry(spec, CHUNK)
    nchunks = -(-TOKENS // CHUNK)
    store = AttentionStore(
        host_bytes=2 * nchunks * geo.block_bytes + geo.block_bytes,
        disk_dir=str(bench_dir / f"store-{spec.fingerprint[:8]}"),
        disk_bytes=4 * nchunks * (geo.block_bytes + 8192),
        chunk_tokens=CHUNK,
        spec=spec,
    )
    toks = np.random.default_rng(0).integers(0, 128000, TOKENS)
    kv = _kv(spec)
    store.append("bench", toks, kv).result()
    yield request.param, spec, store, toks, kv
    store.close()


def _row(report, benchmark, name, case, nbytes, raw_times=None):
    secs = benchmark.stats.stats.median
    row = {"suite": "store", "case": f"{case} {name}", "tokens/s": TOKENS / secs, "GB/s": nbytes / secs / 1e9}
    if raw_times:
        raw = float(np.median(raw_times))
        row["raw GB/s"] = nbytes / raw / 1e9
        row["time vs raw"] = secs / raw
    benchmark.extra_info.update(row)
    report.append(row)


def _chunk_files(store):
    # (the store before its index kept conversations in _convs: bench/interleave.py runs this file on both)
    conv = store._index.convs["bench"] if hasattr(store, "_index") else store._convs["bench"]
    return [store._disk.path(conv.dirname, c.file) for c in conv.chunks]


class RawIO:
    """The I/O engine alone on the store's own chunk files and layout."""

    def __init__(self, store, bench_dir):
        self.geo, self.hb = store._geometry, store._disk.header_bytes
        self.n = -(-TOKENS // CHUNK)
        self.pool = native.HostPool(self.n * self.geo.block_bytes, self.geo.block_bytes)
        self.blocks = [self.pool.alloc() for _ in range(self.n)]
        for b in self.blocks:
            torch.frombuffer(b, dtype=torch.uint8).random_(0, 256)
        self.head = np.zeros(self.hb, dtype=np.uint8)
        self.engine = native.io_engine(store.config.io_backend, threads=store.config.io_threads, pool=self.pool)
        self.write_paths = [str(bench_dir / f"raw-{i}.kv") for i in range(self.n)]
        self.times: list[float] = []

    def _layers(self):
        return list(zip(self.geo.layer_offset, self.geo.layer_stride))

    def read(self, paths):
        t = time.perf_counter()
        files = [native.File(p, "r") for p in paths]
        batches = [self.engine.read([(f, self.hb + o, b.ptr + o, ln) for f, b in zip(files, self.blocks)]) for o, ln in self._layers()]
        for b in batches:
            b.wait()
        for f in files:
            f.close()
        self.times.append(time.perf_counter() - t)

    def write(self):
        t = time.perf_counter()
        files = [native.File(p, "w") for p in self.write_paths]
        reqs = [(f, 0, self.head.ctypes.data, self.hb) for f in files]
        reqs += [(f, self.hb + o, b.ptr + o, ln) for o, ln in self._layers() for f, b in zip(files, self.blocks)]
        self.engine.write(reqs).wait()
        for f in files:
            f.close()
        self.times.append(time.perf_counter() - t)

    def close(self):
        for p in self.write_paths:
            if os.path.exists(p):
                os.unlink(p)
        self.pool.close()


def test_store_read_disk(benchmark, report, shape, bench_dir):
    """Loading from disk (every layer read and checksummed, chunks kept in host
    memory) against the engine reading the same files, interleaved round by round."""
    name, spec, store, toks, kv = shape
    store.flush()
    raw = RawIO(store, bench_dir)

    def setup():
        raw.read(_chunk_files(store))
        store.demote("bench")

    def read():
        with store.load("bench", TOKENS) as ld:
            ld.read_all()

    benchmark.pedantic(read, setup=setup, rounds=7, warmup_rounds=1)
    _row(report, benchmark, name, "load from disk", raw.n * raw.geo.block_bytes, raw.times[1:])
    raw.close()


def test_store_read_host(benchmark, report, shape):
    name, spec, store, toks, kv = shape
    outs = [(torch.empty_like(k), torch.empty_like(v)) for k, v in kv]

    def read():
        with store.load("bench", TOKENS) as ld:
            for layer, (k, v) in enumerate(outs):
                ld.read_layer(layer, k, v)

    benchmark.pedantic(read, setup=lambda: store.prefetch("bench").result(), rounds=5, warmup_rounds=1)
    _row(report, benchmark, name, "read from host (copy out)", TOKENS * spec.kv_bytes_per_token())
    assert all(torch.equal(o[0], k) for o, (k, _) in zip(outs, kv))


def test_store_append_to_disk(benchmark, report, shape, bench_dir):
    """Append with write-through until on disk, against the engine writing the
    same number of chunk files, interleaved round by round."""
    name, spec, store, toks, kv = shape
    raw = RawIO(store, bench_dir)

    def append():
        store.append("bench", toks, kv, start=0)  # replaces the stored copy
        store.flush()

    benchmark.pedantic(append, setup=raw.write, rounds=7, warmup_rounds=1)
    _row(report, benchmark, name, "append + write-through", raw.n * raw.geo.block_bytes, raw.times[1:])
    raw.close()


def test_store_append_host(benchmark, report, shape):
    name, spec, store, toks, kv = shape
    wt = store.config.write_through
    store.config.write_through = False  # host tier only
    benchmark.pedantic(lambda: store.append("bench", toks, kv, start=0), rounds=5, warmup_rounds=1)
    store.config.write_through = wt
    _row(report, benchmark, name, "append (host tier)", TOKENS * spec.kv_bytes_per_token())
