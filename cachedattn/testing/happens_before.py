"""Happens-before over CUDA-like streams: vector clocks, an access history of byte
ranges, and the reports (the ThreadSanitizer model, with streams as threads).

A *thread* is anything that runs in order: a compute stream of a device, a copy
engine's H2D or D2H stream, a host thread. Each has a vector clock. An edge
(event record then wait, a launch from the host, a host wait) joins a snapshot
of one clock into another; taking a snapshot advances the source, so what that
thread does later is not covered by it.

An access is a byte range read or written by a thread at its current clock. Two
accesses conflict when the ranges overlap, at least one writes, the threads
differ and neither happens before the other. Since accesses are seen in the
order they were issued, "the earlier one happens before the later one" is the
only order to check: the earlier access of thread u at epoch e happens before
thread t's current point iff t's clock holds at least e for u.

Only ordering is checked, never data: a missing edge is reported even when the
copies happened to run in time.
"""

from __future__ import annotations

import linecache
import os
import sys
import threading
from dataclasses import dataclass, field

_BUCKET = 16  # log2 of the bytes one index bucket covers
_STACK_DEPTH = 48
_HERE = os.path.dirname(os.path.abspath(__file__))
# Frames of these are noise in a report (the detector, torch's dispatch, pytest's runner).
_NOISE = (_HERE, os.sep + "torch" + os.sep, os.sep + "_pytest" + os.sep, os.sep + "pluggy" + os.sep,
          os.sep + "pytest" + os.sep, "<frozen")


def _noise(code) -> bool:
    return code.co_name == "_tell" or any(n in code.co_filename for n in _NOISE)


def capture_stack(skip: int = 1) -> tuple:
    """The caller's stack as (code, line) pairs, innermost first: cheap to take, formatted only when reported."""
    f = sys._getframe(skip + 1)
    out = []
    while f is not None and len(out) < _STACK_DEPTH:
        out.append((f.f_code, f.f_lineno))
        f = f.f_back
    return tuple(out)


def format_stack(stack: tuple, limit: int = 12) -> str:
    lines = []
    for code, line in stack:
        if _noise(code):
            continue
        src = linecache.getline(code.co_filename, line).strip()
        lines.append(f'    {code.co_filename}:{line} in {code.co_name}\n      {src}')
        if len(lines) >= limit:
            break
    return "\n".join(lines) or "    (no frames outside the detector)"


def site(stack: tuple) -> str:
    """The innermost frame outside the detector and torch: where an access was issued."""
    for code, line in stack:
        if not _noise(code):
            return f"{os.path.basename(code.co_filename)}:{line}"
    return "?"


@dataclass
class Access:
    lo: int
    hi: int
    thread: object
    epoch: int
    write: bool
    what: str
    stack: tuple

    def describe(self, names) -> str:
        return f"{'write' if self.write else 'read'} of 0x{self.lo:x}..0x{self.hi:x} ({self.what}) on {names(self.thread)}"


@dataclass
class Report:
    kind: str  # "race", "release", "free", "stale-wait", "reuse", "stream"
    message: str
    stacks: list = field(default_factory=list)  # (title, stack) pairs

    def key(self) -> tuple:
        return (self.kind,) + tuple(site(s) for _, s in self.stacks)

    def __str__(self) -> str:
        parts = [f"[{self.kind}] {self.message}"]
        for title, stack in self.stacks:
            parts.append(f"  {title}:\n{format_stack(stack)}")
        return "\n".join(parts)


class HappensBefore:
    """Vector clocks per thread and the byte-range access history; thread-safe."""

    def __init__(self, names=None):
        self._vc: dict[object, dict[object, int]] = {}
        self._buckets: dict[int, list[Access]] = {}
        self._lock = threading.RLock()
        self._names = names or str
        self.reports: list[Report] = []
        self._reported: set = set()

    # ---- clocks ------------------------------------------------------------------

    def _clock(self, t) -> dict:
        vc = self._vc.get(t)
        if vc is None:
            vc = self._vc[t] = {t: 1}
        return vc

    def snapshot(self, t) -> dict:
        """t's clock now (an event recorded on t); t's later work is not covered by it."""
        with self._lock:
            vc = self._clock(t)
            snap = dict(vc)
            vc[t] += 1
            return snap

    def join(self, t, snap: dict) -> None:
        """t waits for `snap`: everything before that snapshot happens before t's next work."""
        with self._lock:
            vc = self._clock(t)
            for u, c in snap.items():
                if vc.get(u, 0) < c:
                    vc[u] = c

    def edge(self, src, dst) -> None:
        """dst waits for what src did so far (a launch from the host, wait_for_stream, a synchronize)."""
        self.join(dst, self.snapshot(src))

    def ordered(self, a: Access, t) -> bool:
        """True when access `a` happens before thread t's current point."""
        return a.thread == t or self._clock(t).get(a.thread, 0) >= a.epoch

    # ---- accesses ------------------------------------------------------------------

    def access(self, t, lo: int, hi: int, write: bool, what: str, stack: tuple, fresh: bool = False,
               kind: str = "race") -> None:
        """Records [lo, hi) read or written by t; reports each earlier conflicting access not ordered before it.

        ``fresh``: the range was just allocated (a new tensor): earlier accesses of compute streams are dropped
        (the caching allocator orders a block's reuse on its own stream), those of any other thread must
        happen before the allocation, or the allocator handed out memory a copy may still use."""
        if hi <= lo:
            return
        with self._lock:
            vc = self._clock(t)
            a = Access(lo, hi, t, vc[t], write, what, stack)
            for b in range(lo >> _BUCKET, ((hi - 1) >> _BUCKET) + 1):
                keep = []
                for old in self._buckets.get(b, ()):
                    if old.hi <= lo or hi <= old.lo:
                        keep.append(old)
                        continue
                    if fresh:
                        if getattr(old.thread, "compute", False) or self.ordered(old, t):
                            continue
                        self._report("reuse", f"memory reused by a new tensor while a copy may still use it: "
                                     f"{old.describe(self._names)}", ("the new tensor", stack), ("the copy", old.stack))
                        continue
                    if (write or old.write) and not self.ordered(old, t):
                        self._report(kind, f"{a.describe(self._names)} is not ordered after "
                                     f"{old.describe(self._names)}", ("this access", stack), ("the earlier access", old.stack))
                    # A covered earlier access that happens before a new write, or a covered earlier read of the
                    # same thread before a new read, can race with nothing the new one would not also race with:
                    # drop it (the history stays small). A read never hides an earlier write.
                    if old.lo >= lo and old.hi <= hi and (
                        (write and self.ordered(old, t)) or (not old.write and old.thread == t)
                    ):
                        continue
                    keep.append(old)
                keep.append(a)
                self._buckets[b] = keep

    def free(self, t, host, lo: int, hi: int, recorded, what: str, stack: tuple) -> None:
        """[lo, hi) goes back to a caching allocator on thread t (the stream that allocated it): t's later
        work may reuse it at once, and the allocator waits for the threads in `recorded` (record_stream).
        Every other thread's access to it must happen before the free (before the host's point, which
        issues it, or t's), else it is reported (``free``). The range's history is then dropped."""
        if hi <= lo:
            return
        with self._lock:
            excused = set(recorded) | {t}
            for b in range(lo >> _BUCKET, ((hi - 1) >> _BUCKET) + 1):
                for old in self._buckets.get(b, ()):
                    if old.hi <= lo or hi <= old.lo or old.thread in excused:
                        continue
                    if not (self.ordered(old, host) or self.ordered(old, t)):
                        self._report("free", f"memory freed ({what}) on {self._names(t)} while "
                                     f"{old.describe(self._names)} is not ordered before the free (wait for it, or "
                                     "record_stream its stream)", ("the free", stack), ("the access", old.stack))
            self.forget(lo, hi)

    def forget(self, lo: int, hi: int) -> None:
        """Drops the history of [lo, hi) (memory that left the detector's view)."""
        with self._lock:
            for b in range(lo >> _BUCKET, ((hi - 1) >> _BUCKET) + 1):
                if b in self._buckets:
                    self._buckets[b] = [a for a in self._buckets[b] if a.hi <= lo or hi <= a.lo]

    # ---- reports ------------------------------------------------------------------

    def _report(self, kind: str, message: str, *stacks) -> None:
        r = Report(kind, message, list(stacks))
        k = r.key()
        if k not in self._reported:  # one report per pair of sites
            self._reported.add(k)
            self.reports.append(r)

    def report(self, kind: str, message: str, *stacks) -> None:
        with self._lock:
            self._report(kind, message, *stacks)
