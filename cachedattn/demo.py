"""`python -m cachedattn native-demo`: the native core end to end on this machine.

Fills pinned-pool blocks with random "KV chunks", writes them to disk with
the I/O engine, drops them from the page cache, reads them back into other
blocks and checks every byte. Prints what this build offers and the measured
bandwidth of each step.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from rich.table import Table

from cachedattn import native
from cachedattn.console import print_table, say, track


def _drop_page_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run(total_mb: int, block_kb: int, directory: str | None, backend: str | None) -> dict[str, float]:
    feats = native.features()
    info = Table(title="cachedattn native core")
    info.add_column("feature")
    info.add_column("value")
    for k, v in feats.items():
        info.add_row(k, str(v) if v != "" else "-")
    print_table(info)

    block = block_kb << 10
    nblocks = max(1, (total_mb << 20) // block)
    pool = native.HostPool(2 * nblocks * block, block)
    engine = native.io_engine(backend, pool=pool)
    rng = np.random.default_rng(0)
    src = [pool.alloc() for _ in range(nblocks)]
    dst = [pool.alloc() for _ in range(nblocks)]
    for b in track(src, "filling blocks", unit="blocks"):
        np.frombuffer(b, dtype=np.uint8)[:] = rng.integers(0, 256, block, dtype=np.uint8)

    with tempfile.TemporaryDirectory(dir=directory, prefix="cachedattn-demo-") as tmp:
        path = os.path.join(tmp, "kv.bin")
        with native.File(path, "w") as f:
            t0 = time.perf_counter()
            engine.write([(f, i * block, b.ptr, block) for i, b in enumerate(src)]).wait()
            f.sync()
            t_write = time.perf_counter() - t0
            direct = f.direct
        _drop_page_cache(path)
        with native.File(path, "r") as f:
            t0 = time.perf_counter()
            engine.read([(f, i * block, b.ptr, block) for i, b in enumerate(dst)]).wait()
            t_read = time.perf_counter() - t0
    ok = all(bytes(a) == bytes(b) for a, b in zip(src, dst))
    pool.close()

    gb = nblocks * block / 1e9
    res = Table(title=f"{nblocks} blocks of {block_kb} KiB through '{engine.name}' (O_DIRECT: {direct})")
    res.add_column("step")
    res.add_column("GB/s", justify="right")
    res.add_column("seconds", justify="right")
    res.add_row("write + fdatasync", f"{gb / t_write:.2f}", f"{t_write:.3f}")
    res.add_row("read (cold cache)", f"{gb / t_read:.2f}", f"{t_read:.3f}")
    print_table(res)
    say("[green]every byte read back matches[/green]" if ok else "[red]MISMATCH in read-back data[/red]")
    if not ok:
        raise SystemExit(1)
    return {"write_gbps": gb / t_write, "read_gbps": gb / t_read}


def main(args: argparse.Namespace) -> None:
    if args.block_kb <= 0 or args.block_kb % 4:
        raise SystemExit("--block-kb must be a positive multiple of 4")
    run(args.total_mb, args.block_kb, args.dir, args.backend)
