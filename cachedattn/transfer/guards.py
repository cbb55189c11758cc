"""Checks that run before host memory goes back to its pool, and the hook
through which a test's race detector sees the fake copy engine.

Copy engines that can tell whether memory is still used by a pending copy
(the fake engine, in tests) register here; HostBlock.release asks every one
of them. With none registered (production) a release costs one empty loop.

A race detector (cachedattn.testing.race, tests only) installs itself with
``observing``; the fake engine then reports each copy, event, wait and fence
to it, and every release here reaches it as a host write. Device memory going
back to torch's caching allocator (a staging buffer dropped, shrunk or regrown)
reaches it through ``device_free``: a stream event on the allocating stream, not a
host one. With none installed (production) ``observer()`` is None and nothing
else happens.
"""

from __future__ import annotations

import contextlib
import weakref

_engines: weakref.WeakSet = weakref.WeakSet()
_observer = None


def register(engine) -> None:
    _engines.add(engine)


def unregister(engine) -> None:
    _engines.discard(engine)


def observer():
    """The race detector installed (tests), or None."""
    return _observer


@contextlib.contextmanager
def observing(obs):
    """Installs `obs` as the observer of copy engines and host releases within the block."""
    global _observer
    if _observer is not None:
        raise RuntimeError("a race detector is already installed")
    _observer = obs
    try:
        yield obs
    finally:
        _observer = None


def check_release(ptr: int, nbytes: int) -> None:
    """Raises RuntimeError when a registered engine still has a copy touching [ptr, ptr + nbytes)."""
    if _observer is not None:
        _observer.on_release(ptr, nbytes)
    for engine in list(_engines):
        engine.check_released(ptr, nbytes)


def device_free(ptr: int, nbytes: int, stream: int, recorded=()) -> None:
    """Device memory [ptr, ptr + nbytes) goes back to the caching allocator, freed on `stream` (the one
    that allocated it: its later work may reuse it at once); `recorded`: the streams record_stream told
    the allocator to wait for. Raises RuntimeError when a registered engine still has a copy touching it."""
    if _observer is not None:
        _observer.on_device_free(ptr, nbytes, stream, tuple(recorded))
    for engine in list(_engines):
        engine.check_released(ptr, nbytes)


def host_reads(what: str, *tensors) -> None:
    """The host depends on the content of `tensors` now (e.g. it takes the time of the first token their
    compute produced): a race detector checks that the compute writing them happened before."""
    if _observer is not None:
        _observer.on_host_read(tensors, what)
