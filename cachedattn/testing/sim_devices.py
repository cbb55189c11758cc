"""Simulated CUDA devices and streams on the CPU: a provider for
``cachedattn.transfer.streams.use``.

Tensors stay CPU tensors; what is simulated is the *logical* placement the GPU
path orders by:

- devices ``torch.device("cpu", d)`` for d in range(devices); a tensor's device
  is the one its storage was assigned (``place``, or inherited from the inputs
  of the op that made it), else the thread's current device;
- each device has ``streams`` compute streams; each thread has a current device
  and a current stream per device (``with sim.stream(s):`` is
  ``torch.cuda.stream(s)``, ``with sim.device(d):`` is ``torch.cuda.device(d)``);
  an op runs on the current stream of its inputs' device;
- an op whose inputs are on two devices raises, as a real cross-device op does.

The race detector (:mod:`cachedattn.testing.race`) records each op's accesses on
the stream chosen here.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch

from cachedattn.testing import checkpoint_watch

_HANDLE_BASE = 0x5100  # handles the GPU path passes to the engine; never 0 (the real provider's CPU answer)


@dataclass(frozen=True)
class SimStream:
    device: int
    index: int
    handle: int
    compute = True  # a compute stream (the caching allocator orders memory reuse on it)

    def __str__(self) -> str:
        return f"compute stream {self.index} of device {self.device}"


def storage_range(t: torch.Tensor) -> tuple[int, int]:
    """[lo, hi) of the bytes `t` may touch (its storage extent for its sizes and strides); (0, 0) if none."""
    if t.numel() == 0:
        return 0, 0
    try:
        base = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # no storage (a wrapper subclass, a meta tensor)
        return 0, 0
    if not base:
        return 0, 0
    es = t.element_size()
    lo = hi = t.storage_offset()
    for size, stride in zip(t.shape, t.stride()):
        if stride >= 0:
            hi += (size - 1) * stride
        else:
            lo += (size - 1) * stride
    return base + lo * es, base + (hi + 1) * es


def storage_of(t: torch.Tensor) -> tuple[int, int]:
    """[lo, hi) of `t`'s whole storage."""
    try:
        s = t.untyped_storage()
        return s.data_ptr(), s.data_ptr() + s.nbytes()
    except (RuntimeError, NotImplementedError):
        return 0, 0


class SimulatedDevices:
    """`devices` simulated devices with `streams` compute streams each (stream 0: the default one)."""

    def __init__(self, devices: int = 2, streams: int = 2):
        if devices < 1 or streams < 1:
            raise ValueError("at least one device and one stream")
        self.devices, self.streams_per_device = devices, streams
        self._streams = {
            (d, k): SimStream(d, k, _HANDLE_BASE + d * 16 + k) for d in range(devices) for k in range(streams)
        }
        self._by_handle = {s.handle: s for s in self._streams.values()}
        self._placed: dict[int, int] = {}  # storage address -> device (assigned or inherited)
        self._lock = threading.Lock()
        self._tls = threading.local()

    # ---- the provider (cachedattn.transfer.streams) ------------------------------------

    def current(self, device) -> int:
        return self.current_stream(self._index(device)).handle

    def device_of(self, t: torch.Tensor) -> torch.device:
        d = self.placed(t)
        return torch.device("cpu", self.current_device() if d is None else d)

    def is_async(self, device) -> bool:
        return True  # a simulated device is a GPU: the host waits for it explicitly

    def synchronize(self, device) -> None:
        """``torch.cuda.current_stream(device).synchronize()``: told to the race detector (an edge to the host)."""
        obs = checkpoint_watch.observer()
        if obs is not None:
            obs.on_stream_synchronize(self.current(device))

    # ---- streams and devices ---------------------------------------------------------------

    def _index(self, device) -> int:
        if device is None:
            return self.current_device()
        if isinstance(device, int):
            d = device
        else:
            device = torch.device(device)
            d = self.current_device() if device.index is None else device.index
        if not 0 <= d < self.devices:
            raise ValueError(f"no simulated device {device} (there are {self.devices})")
        return d

    def stream(self, device: int, index: int) -> SimStream:
        return self._streams[(self._index(device), index)]

    def stream_of(self, handle: int) -> SimStream | None:
        return self._by_handle.get(handle)

    def current_device(self) -> int:
        return getattr(self._tls, "device", 0)

    def current_stream(self, device=None) -> SimStream:
        d = self._index(device)
        cur = getattr(self._tls, "streams", {})
        return cur.get(d) or self._streams[(d, 0)]

    @contextlib.contextmanager
    def device(self, d: int):
        """``torch.cuda.device(d)``."""
        d = self._index(d)
        old, self._tls.device = self.current_device(), d
        try:
            yield
        finally:
            self._tls.device = old

    @contextlib.contextmanager
    def stream_ctx(self, s: SimStream):
        """``torch.cuda.stream(s)``: s becomes its device's current stream, and its device the current device."""
        cur = getattr(self._tls, "streams", None)
        if cur is None:
            cur = self._tls.streams = {}
        old = cur.get(s.device)
        cur[s.device] = s
        try:
            with self.device(s.device):
                yield s
        finally:
            if old is None:
                cur.pop(s.device, None)
            else:
                cur[s.device] = old

    # ---- placement ------------------------------------------------------------------------

    def placed(self, t: torch.Tensor) -> int | None:
        lo, _ = storage_of(t)
        return self._placed.get(lo)

    def assign(self, t: torch.Tensor, device: int | None) -> None:
        """Records the device of t's storage (None: not assigned, the current device's)."""
        lo, _ = storage_of(t)
        if not lo:
            return
        with self._lock:
            if device is None:
                self._placed.pop(lo, None)
            else:
                self._placed[lo] = device

    def place(self, obj, device: int) -> None:
        """Puts a tensor, or every parameter and buffer of a module, on simulated `device`."""
        d = self._index(device)
        tensors = [obj] if isinstance(obj, torch.Tensor) else [*obj.parameters(), *obj.buffers()]
        for t in tensors:
            self.assign(t, d)

    def op_device(self, tensors) -> int | None:
        """The device an op on `tensors` runs on (None: none assigned); raises for two devices.

        A 0-dim tensor goes with any device (as a CPU scalar does on CUDA); it decides only when it is alone.
        Integer and bool tensors (token ids, positions, masks: host-side bookkeeping in the GPU path, see the
        race detector) go with any device too."""
        found = scalar = None
        for t in tensors:
            if not (t.is_floating_point() or t.is_complex()):
                continue
            d = self._placed.get(storage_of(t)[0])
            if d is None:
                continue
            if t.dim() == 0:
                scalar = d if scalar is None else scalar
                continue
            if found is not None and d != found:
                raise RuntimeError(
                    "Expected all tensors to be on the same device, but found at least two devices, "
                    f"cpu:{found} and cpu:{d} (simulated devices)"
                )
            found = d
        return found if found is not None else scalar
