"""Eviction policies: which conversations leave a tier first.

The store asks a policy for a victim among candidate conversations (those not
in use) when a tier is full, and gets None when none may go; the unit is the
whole conversation, as in the paper. Candidates arrive least recently used
first: the index keeps its conversations in that order (Index.touch), so a
load or save never calls a policy. A policy sees every insert and removal
(from the store, under its lock) and the queue (QueueView, pushed by
whoever schedules turns: the serving engine, on each submit and step). A
policy never calls out: it decides from what it was told, so no lock of the
scheduler is ever taken under the store's, and the store imports nothing of
the serving package.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterable


@dataclass(frozen=True)
class QueueView:
    """What a scheduler tells the policy about its queue: the conversations of the queued jobs
    (first to run first), the eviction window (the first `disk_window` queued jobs' conversations
    are never dropped from disk), its clock, and a number that orders the views it pushes."""

    queued: tuple[str, ...] = ()
    disk_window: int = 0
    clock: Callable[[], float] | None = None
    seq: int = 0


class EvictionPolicy(ABC):
    name = "base"

    def on_insert(self, conv_id: str) -> None:
        """A conversation was stored for the first time (or found at open)."""

    def on_remove(self, conv_id: str) -> None:
        """A conversation left the store."""

    def on_queue(self, view: QueueView) -> None:
        """The scheduler's queue changed (a job was submitted or started). Views may arrive out
        of order from several threads: keep the one with the highest seq."""

    @abstractmethod
    def order(self, candidates: Iterable[str], tier: str) -> list[str]:
        """Candidates (least recently used first) ordered victims first. ``tier`` is 'host' or
        'disk'. A policy may leave out candidates that must not go (the queue-aware policy's
        disk window)."""

    def victim(self, candidates: Iterable[str], tier: str) -> str | None:
        """The conversation to evict next from ``tier``, or None when none may go."""
        ordered = self.order(candidates, tier)
        return ordered[0] if ordered else None


class LRUPolicy(EvictionPolicy):
    """Least recently used first: the order the candidates come in."""

    name = "lru"

    def order(self, candidates: Iterable[str], tier: str) -> list[str]:
        return list(candidates)


class FIFOPolicy(EvictionPolicy):
    """First stored first, whatever was used since."""

    name = "fifo"

    def __init__(self):
        self._clock = itertools.count()
        self._stamp: dict[str, int] = {}

    def on_insert(self, conv_id: str) -> None:
        self._stamp.setdefault(conv_id, next(self._clock))

    def on_remove(self, conv_id: str) -> None:
        self._stamp.pop(conv_id, None)

    def order(self, candidates: Iterable[str], tier: str) -> list[str]:
        return sorted(candidates, key=lambda c: self._stamp.get(c, -1))


# The queue-aware policies register themselves (queue_policies.py, imported by the package).
_POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy, "fifo": FIFOPolicy}


def register_policy(name: str, cls: type[EvictionPolicy]) -> None:
    _POLICIES[name] = cls


def make_policy(spec: str | EvictionPolicy) -> EvictionPolicy:
    if isinstance(spec, EvictionPolicy):
        return spec
    try:
        return _POLICIES[spec]()
    except KeyError:
        raise ValueError(f"eviction: unknown policy {spec!r}; known: {sorted(_POLICIES)}") from None
