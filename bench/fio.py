"""fio as the device's ceiling: the same file size, block size and pattern."""

from __future__ import annotations

import json
import shutil
import subprocess


def available() -> bool:
    return shutil.which("fio") is not None


def bandwidth(path: str, rw: str, block_bytes: int, size_bytes: int, iodepth: int = 32, direct: bool = True) -> float:
    """Bytes per second fio reaches for `rw` ('read' or 'write') on `path`."""
    cmd = [
        "fio",
        "--name=ceiling",
        f"--filename={path}",
        f"--rw={rw}",
        f"--bs={block_bytes}",
        f"--size={size_bytes}",
        f"--iodepth={iodepth}",
        "--ioengine=io_uring",
        "--fixedbufs",  # the engine registers its pool as fixed buffers too
        f"--direct={int(direct)}",
        "--numjobs=1",
        "--loops=3",
        "--output-format=json",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        # Sandboxes that refuse io_uring: fall back to libaio, then psync.
        for engine in ("libaio", "psync"):
            cmd = [c if not c.startswith("--ioengine=") else f"--ioengine={engine}" for c in cmd if c != "--fixedbufs"]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode == 0:
                break
    out.check_returncode()
    job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]
    return float(job["read" if rw == "read" else "write"]["bw_bytes"])
