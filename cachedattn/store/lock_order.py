"""The package's one lock order, and a debug mode that enforces it.

A thread may acquire a lock only if every lock it already holds has a lower
level (re-entering a lock it holds is fine). The levels, outermost first:

    ENGINE         5  the serving engine's queue (never held while calling the store)
    LOAD          10  a KVLoad's or KVAppend's own mutex
    DIRECTORY     20  a conversation directory's lock (create / remove it)
    STORE         30  the store lock: the index of conversations and chunks
    POLICY        40  an eviction policy's own state (asked under the store lock)
    REMOTE_QUEUE  45  the remote tier's write-behind queue
    HOST_POOL     50  the host block pool (reference counts)
    FS_DIR        55  an open directory's users (fsdir.Dir)
    REMOTE_CLIENT 60  the remote tier's client and back-off state
    STATS         70  the counters (a leaf)

With CACHEDATTN_LOCK_ORDER=1 in the environment when a lock is made, it is
wrapped so that acquiring it out of this order raises LockOrderError at once
(tests set it: tests/store/conftest.py); otherwise `ordered` returns the plain
lock and costs nothing.
"""

from __future__ import annotations

import os
import threading

ENV = "CACHEDATTN_LOCK_ORDER"
ENGINE, LOAD, DIRECTORY, STORE, POLICY, REMOTE_QUEUE, HOST_POOL, FS_DIR, REMOTE_CLIENT, STATS = (
    5, 10, 20, 30, 40, 45, 50, 55, 60, 70,
)  # fmt: skip


class LockOrderError(RuntimeError):
    """A lock was acquired while a lock of the same or a later level was held."""


_held = threading.local()  # this thread's held checked locks, in acquisition order


def checking() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def ordered(lock, level: int, name: str):
    """`lock`, checked against the order when the debug mode is on."""
    return _Checked(lock, level, name) if checking() else lock


def _stack() -> list:
    s = getattr(_held, "stack", None)
    if s is None:
        s = _held.stack = []
    return s


class _Checked:
    def __init__(self, lock, level: int, name: str):
        self._lock, self.level, self.name = lock, level, name

    def _check(self) -> None:
        st = _stack()
        if any(lk is self for lk in st):
            return  # re-entry
        worst = max(st, key=lambda lk: lk.level, default=None)
        if worst is not None and worst.level >= self.level:
            raise LockOrderError(
                f"lock order: {self.name} (level {self.level}) acquired while holding {worst.name} "
                f"(level {worst.level}); see docs/store-core.md, 'Lock order'"
            )

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if blocking:  # a try that cannot wait cannot deadlock
            self._check()
        got = self._lock.acquire(blocking, timeout)
        if got:
            _stack().append(self)
        return got

    def release(self) -> None:
        st = _stack()
        for i in range(len(st) - 1, -1, -1):
            if st[i] is self:
                del st[i]
                break
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *exc) -> None:
        self.release()

    # What threading.Condition uses when its lock offers it (wait() releases every level of an RLock).
    def _is_owned(self) -> bool:
        if hasattr(self._lock, "_is_owned"):
            return self._lock._is_owned()
        if self._lock.acquire(False):
            self._lock.release()
            return False
        return True

    def _release_save(self):
        st = _stack()
        n = sum(1 for lk in st if lk is self)
        st[:] = [lk for lk in st if lk is not self]
        if hasattr(self._lock, "_release_save"):
            return self._lock._release_save(), n
        self._lock.release()
        return None, n

    def _acquire_restore(self, saved) -> None:
        state, n = saved
        self._check()
        if hasattr(self._lock, "_acquire_restore"):
            self._lock._acquire_restore(state)
        else:
            self._lock.acquire()
        _stack().extend([self] * n)
