"""The points where production code announces what the GPU path's ordering
depends on: host memory goes back to its pool, device memory is freed, the
host reads tensors that compute produced.

Why these calls exist: the CPU-side ordering checks (the deferred fake copy
engine and the stream race detector, both in cachedattn.testing) must see
every release and every host read, or a missing wait before one goes
unnoticed. Each checkpoint is a loop over the installed watchers; production
installs none, so a checkpoint costs one empty loop. Watchers are installed by
cachedattn.testing (this module never imports it), with ``watch``.

A watcher has the three methods below with the same arguments; any of them may
raise (RuntimeError: memory released under a pending copy), and the caller lets
that propagate, as it would a real fault.
"""

from __future__ import annotations

import threading

_watchers: tuple = ()  # replaced, never mutated: a checkpoint reads it without the lock
_lock = threading.Lock()


def watch(watcher) -> None:
    """Installs `watcher` (tests): from now on it sees every checkpoint, after those installed before it."""
    global _watchers
    with _lock:
        if watcher not in _watchers:
            _watchers = (*_watchers, watcher)


def unwatch(watcher) -> None:
    global _watchers
    with _lock:
        _watchers = tuple(w for w in _watchers if w is not watcher)


def host_release(ptr: int, nbytes: int) -> None:
    """Host memory [ptr, ptr + nbytes) goes back to its pool (a HostBlock released, a load's block handed
    back): no copy may still read or write it."""
    for w in _watchers:
        w.host_release(ptr, nbytes)


def device_free(ptr: int, nbytes: int, stream: int, recorded=()) -> None:
    """Device memory [ptr, ptr + nbytes) goes back to the caching allocator, freed on `stream` (the one
    that allocated it: its later work may reuse it at once); `recorded`: the streams record_stream told
    the allocator to wait for."""
    for w in _watchers:
        w.device_free(ptr, nbytes, stream, recorded)


def host_reads(what: str, *tensors) -> None:
    """The host depends on the content of `tensors` now (e.g. it takes the time of the first token their
    compute produced): the compute writing them must have happened before."""
    for w in _watchers:
        w.host_reads(what, *tensors)
