"""FakeCopyEngine: the native CopyEngine's API (GPU_API.md) on the CPU, with
copies DEFERRED so that CI catches every missing wait.

A copy is only recorded when issued; its destination is poisoned at once
(0xFF bytes: NaN in every supported float dtype) because until the copy is
known done its content is undefined. Copies run, in issue order per direction
(a stream is FIFO), only when someone waits for them: stream_wait_layer,
wait_layer, wait_ticket, synchronize, or layer_done / ticket_done answering
True (they answer False on their first poll, like a copy still in flight).

It also enforces the rules the native engine cannot check by itself:
- epochs: waiting for a layer not issued in the epoch named (default: the
  latest begun) raises; several epochs are open at once, one per load;
- host blocks: releasing memory that a copy not yet performed reads or writes
  raises (every HostBlock release and device free is a checkpoint,
  :mod:`cachedattn.transfer.checkpoints`, and the engines registered in
  :mod:`cachedattn.testing.checkpoint_watch` are asked there);
- slot reuse: a copy into a region that a compute stream was bound to read
  (stream_wait_layer) raises until wait_for_stream(direction, that stream)
  fenced the reader.

Under a race detector (cachedattn.testing.race, installed through
checkpoint_watch.observing) every copy, event, wait and fence is also reported
to it, so ordering is checked as happens-before, independently of when copies ran.
"""

from __future__ import annotations

import ctypes
import threading

from cachedattn import native
from cachedattn.testing import checkpoint_watch

DIRECTIONS = ("h2d", "d2h")
_POISON = 0xFF


def _direction(d: str) -> str:
    if d not in DIRECTIONS:
        raise ValueError(f"direction must be 'h2d' or 'd2h', not {d!r}")
    return d


def _tell(hook: str, *args) -> None:
    """Reports to the race detector, if one is installed (tests)."""
    obs = checkpoint_watch.observer()
    if obs is not None:
        getattr(obs, hook)(*args)


def _overlaps(a: int, n: int, b: int, m: int) -> bool:
    return n > 0 and m > 0 and a < b + m and b < a + n


class _Op:
    __slots__ = ("run", "reads", "writes", "done")

    def __init__(self, run, reads, writes):
        self.run, self.reads, self.writes, self.done = run, reads, writes, False


class FakeCopyEngine:
    """Same names, arguments and semantics as ``cachedattn.native.CopyEngine``."""

    def __init__(self, device: int, num_layers: int):
        if int(num_layers) <= 0:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        self._device = int(device)
        self._num_layers = int(num_layers)
        self._lock = threading.RLock()
        self._queue = {d: [] for d in DIRECTIONS}  # (sequence number, op) not yet performed, in issue order
        self._issued = {d: 0 for d in DIRECTIONS}
        self._epoch = 0  # the latest begun (what epoch -1 names)
        self._open = {0}
        self._events: dict[tuple[int, str, int], int] = {}  # (epoch, direction, layer) -> ops issued at record
        self._layer_writes: dict[tuple[int, str, int], list[tuple[int, int]]] = {}
        self._tickets: dict[int, tuple[str, int]] = {}
        self._next_ticket = 1
        self._polled: set = set()
        self._readers: dict[int, list[tuple[int, int]]] = {}  # stream -> dst regions it was bound to read
        self.stats = {"copies": 0, "bytes": 0, "performed": 0}
        checkpoint_watch.register(self)

    # ---- properties ------------------------------------------------------------

    @property
    def device(self) -> int:
        return self._device

    @property
    def num_layers(self) -> int:
        return self._num_layers

    def stream(self, direction: str) -> int:
        return 1 + DIRECTIONS.index(_direction(direction))  # fake, never 0 (the legacy default stream)

    # ---- issuing -----------------------------------------------------------------

    def begin_epoch(self) -> int:
        with self._lock:
            self._epoch += 1
            self._open.add(self._epoch)
            _tell("on_epoch", self, self._epoch)
            return self._epoch

    def end_epoch(self, epoch: int) -> None:
        with self._lock:
            epoch = self._resolve(epoch)
            self._open.discard(epoch)
            _tell("on_end_epoch", self, epoch)
            for d in (self._events, self._layer_writes):
                for key in [k for k in d if k[0] == epoch]:
                    del d[key]

    def _resolve(self, epoch: int) -> int:
        return self._epoch if int(epoch) < 0 else int(epoch)

    def _open_epoch(self, epoch: int) -> int:
        epoch = self._resolve(epoch)
        if epoch not in self._open:
            raise RuntimeError(f"epoch {epoch} is not open")
        return epoch

    def _check_layer(self, layer: int) -> int:
        layer = int(layer)
        if not -1 <= layer < self._num_layers:
            raise ValueError(f"layer {layer} out of range (engine has {self._num_layers})")
        return layer

    def _issue(self, direction: str, run, reads, writes, layer: int, epoch: int = -1) -> None:
        direction, layer = _direction(direction), self._check_layer(layer)
        with self._lock:
            if layer >= 0:
                epoch = self._open_epoch(epoch)
            _tell("on_copy", self, direction, reads, writes, layer, epoch)
            for stream, regions in self._readers.items():
                for dst, n in writes:
                    for a, m in regions:
                        if _overlaps(dst, n, a, m):
                            raise RuntimeError(
                                f"slot reuse: refilling 0x{dst:x} (+{n}) while stream {stream} may still read it "
                                f"(call wait_for_stream({direction!r}, {stream}) first)"
                            )
            for dst, n in writes:
                ctypes.memset(dst, _POISON, n)
            seq = self._issued[direction]
            self._issued[direction] = seq + 1
            self._queue[direction].append((seq, _Op(run, reads, writes)))
            if layer >= 0:
                self._events[(epoch, direction, layer)] = seq + 1
                self._layer_writes.setdefault((epoch, direction, layer), []).extend(writes)

    def copy_batch(self, direction: str, segments, layer: int = -1, epoch: int = -1) -> None:
        segs = [(int(s), int(d), int(n)) for s, d, n in segments]
        for s, d, n in segs:
            if n < 0 or (n and (not s or not d)):
                raise ValueError(f"bad segment (src=0x{s:x}, dst=0x{d:x}, bytes={n})")
            if n and _overlaps(s, n, d, n):
                raise ValueError(f"segment source and destination overlap (0x{s:x}, 0x{d:x}, {n})")

        def run(segs=segs):
            native.segment_copy_cpu(segs)

        self.stats["copies"] += len(segs)
        self.stats["bytes"] += sum(n for _, _, n in segs)
        self._issue(direction, run, [(s, n) for s, _, n in segs], [(d, n) for _, d, n in segs], layer, epoch)

    def segment_copy(self, direction: str, segments, layer: int = -1, epoch: int = -1) -> None:
        self.copy_batch(direction, segments, layer, epoch)

    def rope_copy(
        self, src, dst, rows, head_dim, rotary_dim, interleaved, dtype, delta, inv_freq, layer=-1, epoch=-1
    ) -> None:
        size = {0: 4, 1: 2, 2: 2}.get(int(dtype))
        if size is None:
            raise ValueError(f"unknown dtype code {dtype}")
        n = int(rows) * int(head_dim) * size
        args = (int(src), int(dst), int(rows), int(head_dim), int(rotary_dim), bool(interleaved), int(dtype))
        inv = [float(x) for x in inv_freq]
        if len(inv) * 2 != int(rotary_dim):
            raise ValueError(f"inv_freq has {len(inv)} entries; rotary_dim {rotary_dim} needs {int(rotary_dim) // 2}")
        # In place (src == dst) the source must survive the poisoning until the op runs.
        saved = (ctypes.c_char * n).from_buffer_copy((ctypes.c_char * n).from_address(int(src))) if src == dst else None

        def run():
            if saved is not None:
                ctypes.memmove(int(dst), saved, n)
            native.rope_rotate_cpu(*args, float(delta), inv)

        self._issue("h2d", run, [(int(src), n)], [(int(dst), n)], layer, epoch)

    def copy_2d(self, direction, src, src_pitch, dst, dst_pitch, width, height, layer=-1, epoch=-1) -> None:
        """One strided copy: `height` rows of `width` bytes, rows `src_pitch` / `dst_pitch` apart."""
        src, sp, dst, dp, w, h = (int(x) for x in (src, src_pitch, dst, dst_pitch, width, height))
        if w < 0 or h < 0 or w > sp or w > dp:
            raise ValueError(f"copy_2d: width {w} exceeds a pitch (src {sp}, dst {dp}) or is negative")
        rows = [(src + r * sp, dst + r * dp, w) for r in range(h)] if w else []
        if any(not s or not d for s, d, _ in rows):
            raise ValueError(f"copy_2d: bad pointers (src=0x{src:x}, dst=0x{dst:x})")

        def run(rows=rows):
            native.segment_copy_cpu(rows)

        self.stats["copies"] += 1
        self.stats["bytes"] += w * h
        self._issue(direction, run, [(s, n) for s, _, n in rows], [(d, n) for _, d, n in rows], layer, epoch)

    # ---- ordering against compute ------------------------------------------------------

    def wait_for_stream(self, direction: str, stream: int) -> None:
        _direction(direction)
        with self._lock:
            # Work queued on `stream` so far (its reads of copied buffers included) precedes what comes next.
            self._readers.pop(int(stream), None)
            _tell("on_wait_for_stream", self, direction, int(stream))

    def _perform_at(self, direction: str, upto: int) -> None:
        """Runs the direction's copies issued before sequence number `upto` (a stream completes in order)."""
        q = self._queue[direction]
        while q and q[0][0] < upto:
            _, op = q.pop(0)
            op.run()
            op.done = True
            self.stats["performed"] += 1

    def _event(self, direction: str, layer: int, epoch: int = -1) -> int:
        direction, layer, epoch = _direction(direction), int(layer), self._resolve(epoch)
        if not 0 <= layer < self._num_layers:
            raise ValueError(f"layer {layer} out of range (engine has {self._num_layers})")
        pos = self._events.get((epoch, direction, layer))
        if pos is None:
            _tell("on_stale_wait", self, direction, layer, epoch)
            raise RuntimeError(f"layer {layer} of direction {direction} was not issued in epoch {epoch}")
        return pos

    def stream_wait_layer(self, direction: str, layer: int, stream: int, epoch: int = -1) -> None:
        with self._lock:
            pos = self._event(direction, layer, epoch)
            self._perform_at(direction, pos)
            writes = self._layer_writes.get((self._resolve(epoch), direction, int(layer)), [])
            self._readers.setdefault(int(stream), []).extend(writes)
            _tell("on_stream_wait_layer", self, direction, int(layer), int(stream), self._resolve(epoch))

    def wait_layer(self, direction: str, layer: int, epoch: int = -1) -> None:
        with self._lock:
            self._perform_at(direction, self._event(direction, layer, epoch))
            _tell("on_host_wait_layer", self, direction, int(layer), self._resolve(epoch))

    def layer_done(self, direction: str, layer: int, epoch: int = -1) -> bool:
        with self._lock:
            pos = self._event(direction, layer, epoch)
            key = ("layer", self._resolve(epoch), direction, int(layer), pos)
            if key not in self._polled:
                self._polled.add(key)
                return False
            self._perform_at(direction, pos)
            _tell("on_host_wait_layer", self, direction, int(layer), self._resolve(epoch))
            return True

    def record(self, direction: str) -> int:
        direction = _direction(direction)
        with self._lock:
            t = self._next_ticket
            self._next_ticket += 1
            self._tickets[t] = (direction, self._issued[direction])
            _tell("on_record", self, direction, t)
            return t

    def _ticket(self, ticket: int) -> tuple[str, int]:
        try:
            return self._tickets[int(ticket)]
        except KeyError:
            raise ValueError(f"ticket {ticket} is unknown or already released") from None

    def ticket_done(self, ticket: int) -> bool:
        with self._lock:
            direction, pos = self._ticket(ticket)
            if ("ticket", ticket) not in self._polled:
                self._polled.add(("ticket", ticket))
                return False
            self._polled.discard(("ticket", ticket))
            self._perform_at(direction, pos)
            del self._tickets[int(ticket)]
            _tell("on_host_wait_ticket", self, int(ticket))
            return True

    def wait_ticket(self, ticket: int) -> None:
        with self._lock:
            direction, pos = self._ticket(ticket)
            self._polled.discard(("ticket", ticket))
            self._perform_at(direction, pos)
            del self._tickets[int(ticket)]
            _tell("on_host_wait_ticket", self, int(ticket))

    def synchronize(self, direction: str) -> None:
        direction = _direction(direction)
        with self._lock:
            self._perform_at(direction, self._issued[direction])
            _tell("on_synchronize", self, direction)

    # ---- checks for the wiring and tests (not part of the native API) ---------------------

    def pending(self, direction: str | None = None) -> int:
        """Copies issued and not yet performed."""
        with self._lock:
            dirs = DIRECTIONS if direction is None else (_direction(direction),)
            return sum(len(self._queue[d]) for d in dirs)

    def check_released(self, ptr: int, nbytes: int) -> None:
        """Raises when memory about to be freed is still read or written by a pending copy."""
        with self._lock:
            for d in DIRECTIONS:
                for _, op in self._queue[d]:
                    if any(_overlaps(ptr, nbytes, a, n) for a, n in op.reads + op.writes):
                        raise RuntimeError(
                            f"memory 0x{ptr:x} (+{nbytes}) released under a pending {d} copy: "
                            "wait for its ticket or layer first"
                        )

    def close(self) -> None:
        checkpoint_watch.unregister(self)
