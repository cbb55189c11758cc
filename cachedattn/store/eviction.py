"""Eviction policies: which conversations leave a tier first.

The store asks a policy for a victim among candidate conversations (those not
in use) when a tier is full, and gets None when none may go; the unit is the
whole conversation, as in the paper. A policy sees every insert, access and
removal; the scheduler-aware policy of the serving engine plugs in through the
same interface.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from typing import Iterable


class EvictionPolicy(ABC):
    name = "base"

    def on_insert(self, conv_id: str) -> None:
        """A conversation was stored for the first time (or found at open)."""

    def on_access(self, conv_id: str) -> None:
        """A conversation was looked up, loaded or appended to."""

    def on_remove(self, conv_id: str) -> None:
        """A conversation left the store."""

    @abstractmethod
    def order(self, candidates: Iterable[str], tier: str) -> list[str]:
        """Candidates ordered victims first. ``tier`` is 'host' or 'disk'. A policy may leave
        out candidates that must not go (the queue-aware policy's disk window)."""

    def victim(self, candidates: Iterable[str], tier: str) -> str | None:
        """The conversation to evict next from ``tier``, or None when none may go."""
        ordered = self.order(candidates, tier)
        return ordered[0] if ordered else None


class _Clocked(EvictionPolicy):
    """Orders by a per-conversation stamp from a monotonic counter."""

    def __init__(self):
        self._clock = itertools.count()
        self._stamp: dict[str, int] = {}

    def on_insert(self, conv_id: str) -> None:
        self._stamp.setdefault(conv_id, next(self._clock))

    def on_remove(self, conv_id: str) -> None:
        self._stamp.pop(conv_id, None)

    def order(self, candidates: Iterable[str], tier: str) -> list[str]:
        return sorted(candidates, key=lambda c: self._stamp.get(c, -1))


class LRUPolicy(_Clocked):
    """Least recently used first."""

    name = "lru"

    def on_access(self, conv_id: str) -> None:
        self._stamp[conv_id] = next(self._clock)


class FIFOPolicy(_Clocked):
    """First stored first, whatever was used since."""

    name = "fifo"


_POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy, "fifo": FIFOPolicy}
# Policies that live with the serving engine (they read its queue). Named here so that
# AttentionStore(eviction="queue") works without anything imported first; the module
# registers them when imported.
_SERVING_POLICIES = {"queue", "predictive"}


def register_policy(name: str, cls: type[EvictionPolicy]) -> None:
    _POLICIES[name] = cls


def make_policy(spec: str | EvictionPolicy) -> EvictionPolicy:
    if isinstance(spec, EvictionPolicy):
        return spec
    if spec in _SERVING_POLICIES and spec not in _POLICIES:
        import cachedattn.serving.policies  # noqa: F401  (registers them)
    try:
        return _POLICIES[spec]()
    except KeyError:
        raise ValueError(f"eviction: unknown policy {spec!r}; known: {sorted(_POLICIES)}") from None
