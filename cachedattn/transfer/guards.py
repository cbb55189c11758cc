"""Checks that run before host memory goes back to its pool.

Copy engines that can tell whether memory is still used by a pending copy
(the fake engine, in tests) register here; HostBlock.release asks every one
of them. With none registered (production) a release costs one empty loop.
"""

from __future__ import annotations

import weakref

_engines: weakref.WeakSet = weakref.WeakSet()


def register(engine) -> None:
    _engines.add(engine)


def unregister(engine) -> None:
    _engines.discard(engine)


def check_release(ptr: int, nbytes: int) -> None:
    """Raises RuntimeError when a registered engine still has a copy touching [ptr, ptr + nbytes)."""
    for engine in list(_engines):
        engine.check_released(ptr, nbytes)
