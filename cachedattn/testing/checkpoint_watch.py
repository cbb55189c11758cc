"""What the test doubles and the race detector hang on production's checkpoints
(:mod:`cachedattn.transfer.checkpoints`): the registry of copy engines that can
tell whether memory is still used by a pending copy, and the race detector's
slot.

- Fake copy engines (:mod:`cachedattn.testing.fake_engine`) ``register`` here;
  every host release and device free then asks each of them (``check_released``
  raises when a copy not yet performed touches the memory).
- A race detector (:mod:`cachedattn.testing.race`) installs itself with
  ``observing``; the fake engine then reports each copy, event, wait and fence
  to it (through ``observer()``), every host release reaches it as a host
  write, every device free (a staging buffer dropped, shrunk or regrown) as a
  stream event on the allocating stream, and every host read as a host read.

The watcher is installed on the checkpoints when this module is first imported
(by the fake engine, the detector or a test); production never imports it, so
its checkpoints loop over nothing.
"""

from __future__ import annotations

import contextlib
import weakref

from cachedattn.transfer import checkpoints

_engines: weakref.WeakSet = weakref.WeakSet()
_observer = None


def register(engine) -> None:
    _engines.add(engine)


def unregister(engine) -> None:
    _engines.discard(engine)


def observer():
    """The race detector installed, or None."""
    return _observer


@contextlib.contextmanager
def observing(obs):
    """Installs `obs` as the observer of copy engines and checkpoints within the block."""
    global _observer
    if _observer is not None:
        raise RuntimeError("a race detector is already installed")
    _observer = obs
    try:
        yield obs
    finally:
        _observer = None


class _Watcher:
    """The checkpoints' watcher: the race detector first (it records the release even when an engine then
    raises), then every registered engine's check."""

    def host_release(self, ptr: int, nbytes: int) -> None:
        if _observer is not None:
            _observer.on_release(ptr, nbytes)
        for engine in list(_engines):
            engine.check_released(ptr, nbytes)

    def device_free(self, ptr: int, nbytes: int, stream: int, recorded=()) -> None:
        if _observer is not None:
            _observer.on_device_free(ptr, nbytes, stream, tuple(recorded))
        for engine in list(_engines):
            engine.check_released(ptr, nbytes)

    def host_reads(self, what: str, *tensors) -> None:
        if _observer is not None:
            _observer.on_host_read(tensors, what)


checkpoints.watch(_Watcher())
