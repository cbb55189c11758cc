"""The one module that imports the compiled extension.

Everything native goes through here: feature flags, the host memory pool,
files and the I/O engine, the CUDA copy engine and the CPU kernel references.
"""

from __future__ import annotations

import functools
import logging
import os

try:
    from cachedattn import _core
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "cachedattn's native extension is not built: run `pip install --no-build-isolation -e .` "
        f"in the repository (see README.md). Cause: {exc}"
    ) from exc

log = logging.getLogger("cachedattn")

#: Built with the CUDA copy engine (says nothing about a GPU being present).
HAS_CUDA: bool = _core.cuda_built()
#: Built with the io_uring backend (the kernel may still refuse it at runtime).
HAS_URING: bool = _core.uring_built()

URING_SYSCTL = "/proc/sys/kernel/io_uring_disabled"

File = _core.File
IoBatch = _core.IoBatch
IoEngine = _core.IoEngine
Block = _core.Block
segment_copy_cpu = _core.segment_copy_cpu
rope_rotate_cpu = _core.rope_rotate_cpu


@functools.lru_cache(maxsize=None)
def _cuda_probe() -> tuple[int, str]:
    return tuple(_core.cuda_device_count())


def cuda_available() -> bool:
    """A usable GPU right now: built with CUDA, a driver, and a device."""
    return HAS_CUDA and _cuda_probe()[0] > 0


def cuda_unavailable_reason() -> str:
    """Why cuda_available() is False ('' when it is True)."""
    if not HAS_CUDA:
        return "cachedattn was built without CUDA"
    n, why = _cuda_probe()
    return "" if n > 0 else why


def HostPool(
    capacity_bytes: int,
    block_bytes: int,
    hugepages: str = "auto",
    register_cuda: bool | None = None,
) -> _core.HostPool:
    """One host region split into fixed-size, 4 KiB-aligned blocks.

    ``hugepages``: 'off', 'auto' (huge pages if reserved, else transparent huge
    pages) or 'on' (fail without reserved huge pages). ``register_cuda``:
    page-lock and map the region for the GPU; default: when a GPU is usable.
    ``pool.alloc()`` returns a :class:`Block` (or None when exhausted) that
    ``torch.frombuffer(block, dtype=torch.uint8)`` views without a copy.
    """
    if register_cuda is None:
        register_cuda = cuda_available()
    elif register_cuda and not cuda_available():
        raise RuntimeError(f"register_cuda=True but no usable GPU: {cuda_unavailable_reason()}")
    return _core.HostPool(int(capacity_bytes), int(block_bytes), hugepages, bool(register_cuda))


_logged_fallbacks: set[str] = set()


def io_engine(
    backend: str | None = None,
    threads: int = 2,
    queue_depth: int = 64,
    pool: _core.HostPool | None = None,
    uring_sysctl: str = URING_SYSCTL,
) -> _core.IoEngine:
    """A batched asynchronous file I/O engine.

    ``backend``: 'auto' (io_uring when built and allowed, else threads),
    'io_uring' (raise if unavailable) or 'threads'; default from
    ``CACHEDATTN_IO_BACKEND`` or 'auto'. With ``pool`` the io_uring backend
    registers its memory as fixed buffers. When 'auto' falls back, one log
    line says why.
    """
    backend = backend or os.environ.get("CACHEDATTN_IO_BACKEND", "auto")
    engine, why = _core.make_io_engine(backend, int(threads), int(queue_depth), uring_sysctl, pool)
    if backend == "auto" and why and why not in _logged_fallbacks:
        _logged_fallbacks.add(why)
        log.warning("cachedattn: io_uring not used (%s); using the thread-pool I/O backend", why)
    return engine


@functools.lru_cache(maxsize=None)
def io_backend() -> str:
    """The backend io_engine() picks on this machine with the current settings."""
    return io_engine().name


def CopyEngine(device: int, num_layers: int) -> _core.CopyEngine:
    """Dedicated H2D/D2H CUDA streams with per-epoch layer events and tickets.

    The API (begin_epoch, end_epoch, copy_batch, copy_2d, segment_copy, rope_copy,
    wait_for_stream, stream_wait_layer, wait_layer, layer_done, record,
    ticket_done, wait_ticket, synchronize) is the one the fake engine in
    cachedattn.transfer mirrors. Epochs: one per load, several open at once;
    the layer-event calls take ``epoch=`` (-1: the most recently begun).
    ``copy_2d(direction, src, src_pitch, dst, dst_pitch, width, height, layer=-1,
    epoch=-1)`` is one strided copy (cudaMemcpy2DAsync).
    Raises RuntimeError naming why when there is no usable GPU.
    """
    if not cuda_available():
        raise RuntimeError(f"the CUDA copy engine needs a GPU: {cuda_unavailable_reason()}")
    return _core.CopyEngine(int(device), int(num_layers))


def live_regions() -> int:
    """Host pool regions currently mapped in this process."""
    return _core._live_regions()


def features() -> dict[str, object]:
    """What this build and machine offer, for logs and bug reports."""
    return {
        "cuda_built": HAS_CUDA,
        "cuda_available": cuda_available(),
        "cuda_reason": cuda_unavailable_reason(),
        "uring_built": HAS_URING,
        "io_backend": io_backend(),
    }
