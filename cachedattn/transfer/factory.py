"""Which copy engine a patched model gets.

- a model on a CUDA device: the native CopyEngine (cachedattn.native), when the
  store's host pool is page-locked for the GPU; otherwise None, with one log
  line saying why (the turn then takes the host path);
- a model on the CPU with ``CACHEDATTN_FAKE_COPY_ENGINE=1`` in the environment:
  the deferred FakeCopyEngine (cachedattn.testing.fake_engine, imported only
  then: production never loads the test doubles), so that CI runs the GPU
  branch of the code;
- a model on the CPU otherwise: None (the CPU path).
"""

from __future__ import annotations

import logging
import os

import torch

from cachedattn import native

log = logging.getLogger("cachedattn")
FAKE_ENV = "CACHEDATTN_FAKE_COPY_ENGINE"
_said: set[str] = set()


def _once(why: str) -> None:
    if why not in _said:
        _said.add(why)
        log.warning("cachedattn: GPU copy engine not used (%s); history goes through the host path", why)


def fake_requested() -> bool:
    return os.environ.get(FAKE_ENV, "") not in ("", "0")


def engine_for(device, num_layers: int, pinned: bool | None = None):
    """A copy engine for a model on `device` with `num_layers` layers, or None (see the module doc).

    ``pinned``: whether the store's host pool is page-locked (the native engine needs it; None: unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        if pinned is False:
            _once("the store's host pool is not page-locked for the GPU (it was created without a usable GPU)")
            return None
        try:
            return native.CopyEngine(device.index if device.index is not None else torch.cuda.current_device(), num_layers)
        except RuntimeError as e:
            _once(str(e))
            return None
    if device.type == "cpu" and fake_requested():
        from cachedattn.testing.fake_engine import FakeCopyEngine  # a test double: loaded only when asked for

        return FakeCopyEngine(-1, num_layers)
    return None
