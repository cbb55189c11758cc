"""Torch-facing entry points of the native kernels.

Tensors are turned into raw pointers and sizes here; the native code never
sees torch. CPU tensors go to the CPU references, CUDA destinations to the
copy engine's kernels (on its host-to-device stream); so do a simulated
device's tensors (streams.is_async) when an engine is given, so that the
race detector sees those kernels ordered as on a GPU.
"""

from __future__ import annotations

import torch

from cachedattn import native
from cachedattn.transfer import streams

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def dtype_code(dtype: torch.dtype) -> int:
    try:
        return _DTYPE_CODES[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype}: expected float32, float16 or bfloat16") from None


def _check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _on_device(t: torch.Tensor, engine) -> bool:
    """True when `t` is device memory the engine's kernels work on: a CUDA tensor, or with an engine
    given, a tensor of a simulated device (streams.is_async)."""
    return t.is_cuda or (engine is not None and streams.is_async(streams.device_of(t)))


def _after_compute(engine, direction: str, device: torch.device) -> None:
    """The engine's stream waits for the caller's current stream.

    Whatever the launch reads was written there (keys, new KV) and whatever it
    overwrites may still be read there (a reused buffer): without this the
    engine's stream races compute.
    """
    engine.wait_for_stream(direction, streams.current(device))


def rope_rotate(
    keys: torch.Tensor,
    delta: int,
    inv_freq: torch.Tensor,
    rotary_dim: int | None = None,
    interleaved: bool = False,
    out: torch.Tensor | None = None,
    engine=None,
    layer: int = -1,
) -> torch.Tensor:
    """Rotates post-RoPE ``keys`` (``[..., head_dim]``) by ``delta`` positions.

    A key rotated for position p comes out as the key for p + delta: the
    rotation by angles ``delta * inv_freq``. ``rotary_dim`` (default
    ``2 * len(inv_freq)``) leading dims rotate, the rest are copied;
    ``interleaved`` selects pairs (2i, 2i+1) instead of (i, i + rotary_dim/2).
    ``out`` may be ``keys`` itself. With a CUDA ``out``, the copy engine
    rotates on its H2D stream once that stream has waited for the current
    torch stream, and records ``layer``'s event; otherwise the CPU reference
    runs. ``keys`` may be pinned host memory, but the kernel then reads it over
    PCIe in 2-byte loads: copying first and rotating in place
    (``out=keys`` on the GPU) is much faster.
    """
    inv = inv_freq.detach().to("cpu", torch.float32).reshape(-1)
    rotary_dim = 2 * inv.numel() if rotary_dim is None else int(rotary_dim)
    if out is None:
        out = torch.empty_like(keys)
    if out.shape != keys.shape or out.dtype != keys.dtype:
        raise ValueError(f"out {tuple(out.shape)}/{out.dtype} does not match keys {tuple(keys.shape)}/{keys.dtype}")
    _check_contiguous("keys", keys)
    _check_contiguous("out", out)
    head_dim = keys.shape[-1]
    rows = keys.numel() // head_dim if head_dim else 0
    args = (keys.data_ptr(), out.data_ptr(), rows, head_dim, rotary_dim, bool(interleaved), dtype_code(keys.dtype))
    if _on_device(out, engine):
        if engine is None:
            raise ValueError("a CUDA destination needs a CopyEngine (engine=...)")
        _after_compute(engine, "h2d", streams.device_of(out))
        engine.rope_copy(*args, float(delta), inv.tolist(), layer)
    elif keys.is_cuda:
        raise ValueError("keys on the GPU with a CPU destination: copy them first")
    else:
        native.rope_rotate_cpu(*args, float(delta), inv.tolist())
    return out


def segment_copy(pairs: list[tuple[torch.Tensor, torch.Tensor]], engine=None, direction: str = "h2d", layer: int = -1):
    """Copies each ``(src, dst)`` pair of contiguous tensors of equal byte size.

    CPU-only pairs use the CPU reference; with ``engine`` the copy engine's
    gather/scatter kernel moves them all in one launch, after the engine's
    ``direction`` stream has waited for the current torch stream whenever a
    GPU tensor takes part (compute wrote the source or still reads the
    destination).
    """
    segments = []
    for src, dst in pairs:
        _check_contiguous("src", src)
        _check_contiguous("dst", dst)
        n = src.numel() * src.element_size()
        if n != dst.numel() * dst.element_size():
            raise ValueError(f"segment sizes differ: {n} vs {dst.numel() * dst.element_size()} bytes")
        segments.append((src.data_ptr(), dst.data_ptr(), n))
    if engine is not None:
        on_device = [t for pair in pairs for t in pair if _on_device(t, engine)]
        if on_device:
            _after_compute(engine, direction, streams.device_of(on_device[0]))
        engine.segment_copy(direction, segments, layer)
    else:
        if any(s.is_cuda or d.is_cuda for s, d in pairs):
            raise ValueError("CUDA tensors need a CopyEngine (engine=...)")
        native.segment_copy_cpu(segments)
