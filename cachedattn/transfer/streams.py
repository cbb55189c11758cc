"""Which stream and device a piece of GPU work runs on: the one place the
GPU path asks.

Every copy the engine issues is ordered against "the caller's current
stream"; which stream that is must be asked where the work happens (each
cache update, each save), never captured once, because a turn may run under
``torch.cuda.stream(s)`` or be consumed on another stream than the one that
started it. Tests replace the provider (``use``) with one that simulates
several compute streams and devices on the CPU, so the ordering checks see
the same calls the GPU sees.

Devices too: code that picks a copy engine, a staging buffer set or a stream
for a tensor asks ``device_of(t)`` (not ``t.device``), so a test can put the
layers of a CPU model on several simulated devices. Memory is still
allocated on ``t.device`` (the physical one); ``device_of`` is the logical
device that ordering and engines are per.

Whether work on a device runs asynchronously to the host (so that the host
must wait before it reads a result, e.g. the time of a turn's first token, and
the copy engine's kernels must be ordered after compute) is asked here too
(``is_async``), and such a wait goes through ``synchronize``: a simulated device
answers True and tells the race detector about the wait, so those paths run on
the CPU under the detector.
"""

from __future__ import annotations

import contextlib

import torch


class CudaStreams:
    """The real provider: torch's current CUDA stream of a device (0 off the GPU)."""

    def current(self, device: torch.device) -> int:
        device = torch.device(device)
        return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0

    def device_of(self, t: torch.Tensor) -> torch.device:
        return t.device

    def is_async(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.current_stream(device).synchronize()


_provider = CudaStreams()


def current(device) -> int:
    """The handle of the stream that work on `device` issued now runs on."""
    return _provider.current(torch.device(device))


def device_of(t: torch.Tensor) -> torch.device:
    """The (logical) device whose engine and streams work on `t` goes through."""
    return _provider.device_of(t)


def is_async(device) -> bool:
    """True when work on `device` runs asynchronously to the host (a GPU, or a simulated one)."""
    return _provider.is_async(torch.device(device))


def synchronize(device) -> None:
    """The host waits for the stream current on `device` (not the whole device: other jobs' work is not ours)."""
    _provider.synchronize(torch.device(device))


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
