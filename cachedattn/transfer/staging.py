"""One device's copy engine and GPU staging buffers.

Two buffers per device: the running turn's and the read buffer. A buffer is
bounded by its load (readahead slots of the largest layer's history), grows
with slack, shrinks when a load needs far less than it holds, and trim()
frees the buffers no load holds. Each buffer remembers which compute streams
read it in its last use: the next load fences them before refilling it, and
a buffer dropped goes back to the caching allocator on the stream that
allocated it, with those readers recorded (checkpoints.device_free tells a race
detector; the engine's copies into it must have been waited for by the host).
"""

from __future__ import annotations

import threading

import torch

from cachedattn.transfer import checkpoints, streams

_SLACK = 1.25  # growth headroom: a conversation growing turn by turn does not reallocate every turn
ALIGN = 4 << 10  # allocation granularity of a staging buffer (a page)


class DeviceStaging:
    BUFFERS = 2  # the running turn's and the read buffer

    def __init__(self, engine, device: torch.device, logical: torch.device | None = None):
        self.engine, self.device = engine, device  # device: physical (where the memory is)
        self.logical = device if logical is None else logical  # whose streams order it (streams.device_of)
        self.buffers: list[torch.Tensor] = [torch.empty(0, dtype=torch.uint8, device=device)] * self.BUFFERS
        self._readers: list[set[int]] = [set() for _ in range(self.BUFFERS)]
        self._allocated_on: list[int | None] = [None] * self.BUFFERS  # the stream each buffer was allocated on
        self._free = list(range(self.BUFFERS))
        self._lock = threading.Lock()

    def has_free(self) -> bool:
        with self._lock:
            return bool(self._free)

    def acquire(self, nbytes: int) -> int:
        with self._lock:
            if not self._free:
                raise RuntimeError("both GPU staging buffers of this device are in use")
            b = self._free.pop(0)
        if self.buffers[b].numel() < nbytes:
            # No copy writes the old buffer any more (its last load waited for its copies at close).
            grown = -(-int(nbytes * _SLACK) // ALIGN) * ALIGN
            self._drop(b)
            self.buffers[b] = torch.empty(grown, dtype=torch.uint8, device=self.device)
            # Fresh memory is ordered against its old users only on the allocating stream (the caching
            # allocator reuses a block in that stream's order, its old kernels may still be queued): the
            # engine's first copies into it must wait for that stream, as for a reader.
            self._allocated_on[b] = streams.current(streams.device_of(self.buffers[b]))
            self._readers[b] = {self._allocated_on[b]}
        return b

    def readers(self, b: int) -> set[int]:
        """Streams that read buffer b in its last use (a new load fences them first)."""
        return set(self._readers[b])

    def release(self, b: int, used: int = 0, readers=()) -> None:
        if readers:
            self._readers[b] = set(readers)
        if self.buffers[b].numel() > 2 * max(used, ALIGN):  # far more than this load needed: give it back
            self._drop(b)
        with self._lock:
            self._free.append(b)

    def _drop(self, b: int) -> None:
        buf = self.buffers[b]
        if buf.numel() and self._allocated_on[b] is not None:
            checkpoints.device_free(buf.data_ptr(), buf.numel(), self._allocated_on[b], self._readers[b])
        if buf.is_cuda and buf.numel():  # the caching allocator must not hand it out before the readers ran
            try:
                for s in self._readers[b]:
                    buf.record_stream(torch.cuda.ExternalStream(s, device=buf.device))
            except (RuntimeError, ValueError):  # a stream torch cannot wrap: wait for the device instead
                torch.cuda.synchronize(buf.device)
        self.buffers[b] = torch.empty(0, dtype=torch.uint8, device=self.device)
        self._readers[b] = set()  # fresh memory: the allocator orders it against its old users
        self._allocated_on[b] = None

    def trim(self) -> None:
        """Frees the buffers no load holds."""
        with self._lock:
            free = list(self._free)
        for b in free:
            self._drop(b)

    def staged_bytes(self) -> int:
        return sum(b.numel() for b in self.buffers)
