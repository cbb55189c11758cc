"""Scheduler-aware eviction (the paper's): the job queue says what is coming.

Victims, first to last: conversations with no job in the queue (least
recently used first), then those whose next job is furthest back in the queue.
Conversations inside the eviction window, the first `(C_mem + C_disk) / S_kv`
jobs of the queue, are never dropped from disk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from cachedattn.store.eviction import LRUPolicy


class QueueAwarePolicy(LRUPolicy):
    name = "queue"

    def __init__(self, queued: Callable[[], list[str]] | None = None, disk_window: Callable[[], int] | None = None):
        super().__init__()
        self._queued = queued or (lambda: [])
        self._disk_window = disk_window or (lambda: 0)

    def bind(self, queued: Callable[[], list[str]], disk_window: Callable[[], int]) -> None:
        self._queued, self._disk_window = queued, disk_window

    def order(self, candidates: Iterable[str], tier: str) -> list[str]:
        queue = self._queued()
        first_pos: dict[str, int] = {}
        for i, conv in enumerate(queue):
            first_pos.setdefault(conv, i)
        cands = list(candidates)
        if tier == "disk":
            protected = set(queue[: self._disk_window()])
            cands = [c for c in cands if c not in protected]
        idle = [c for c in super().order(cands, tier) if c not in first_pos]
        waiting = sorted((c for c in cands if c in first_pos), key=lambda c: -first_pos[c])
        return idle + waiting
