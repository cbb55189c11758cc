"""Which stream and device a piece of GPU work runs on: the one place the
GPU path asks.

Every copy the engine issues is ordered against "the caller's current
stream"; which stream that is must be asked where the work happens (each
cache update, each save), never captured once, because a turn may run under
``torch.cuda.stream(s)`` or be consumed on another stream than the one that
started it. Tests replace the provider (``use``) with one that simulates
several compute streams and devices on the CPU, so the ordering checks see
the same calls the GPU sees.
"""

from __future__ import annotations

import contextlib

import torch


class CudaStreams:
    """The real provider: torch's current CUDA stream of a device (0 off the GPU)."""

    def current(self, device: torch.device) -> int:
        device = torch.device(device)
        return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


_provider = CudaStreams()


def current(device) -> int:
    """The handle of the stream that work on `device` issued now runs on."""
    return _provider.current(torch.device(device))


def provider():
    return _provider


@contextlib.contextmanager
def use(p):
    """Replaces the provider within the block (tests: simulated streams and devices)."""
    global _provider
    old, _provider = _provider, p
    try:
        yield p
    finally:
        _provider = old
