"""Scheduler-aware eviction: the job queue (and, for the predictive policy, each
conversation's own rhythm) says what is needed next.

QueueAwarePolicy (the paper's). Victims, first to last: conversations with no
job in the queue (least recently used first), then those whose next job is
furthest back in the queue. Conversations inside the eviction window, the
first `(C_mem + C_disk) / S_kv` jobs of the queue, are never dropped from disk.
Both decide from the QueueView the scheduler pushes (eviction.py), never
from the scheduler itself.

PredictivePolicy (beyond the paper: real queues are short). Among conversations
with no queued job it ranks by how overdue each one's next turn is: the time
since its last turn ended over the gap it is expected to take, `elapsed / E`.
The longer a conversation stays silent relative to its own rhythm, the more
likely it has ended, so it goes first. E comes from a least-squares fit of all
observed gaps on the length of the answer before them, scaled by the
conversation's own mean ratio to that fit, shrunk towards 1 by empirical
Bayes: as far as conversations differ more than their gaps scatter (users
with alike rhythms get the global fit alone). Queued conversations are ranked
as in QueueAwarePolicy.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from cachedattn.store import lock_order
from cachedattn.store.eviction import LRUPolicy, QueueView, register_policy


class QueueAwarePolicy(LRUPolicy):
    """The paper's. Victims, first to last: conversations with no job in the queue (least
    recently used first), then those whose next job is furthest back in the queue.
    Conversations inside the eviction window, the first `(C_mem + C_disk) / S_kv` jobs of
    the queue, are never dropped from disk. Without a view pushed yet: LRU."""

    name = "queue"

    def __init__(self):
        super().__init__()
        self._view = QueueView()
        # Views come from submitters and the worker, order() from the store.
        self._view_lock = lock_order.ordered(threading.Lock(), lock_order.POLICY, "policy view")

    def on_queue(self, view: QueueView) -> None:
        with self._view_lock:
            if view.seq >= self._view.seq:
                self._view = view

    def on_submit(self, conv_id: str, now: float) -> None:
        """A job of this conversation arrived (engine clock). The queue itself is all this policy needs."""

    def on_finish(self, conv_id: str, now: float, answer_tokens: int) -> None:
        """A job of this conversation ended (engine clock) after an answer of answer_tokens."""

    def idle_order(self, idle: list[str], view: QueueView) -> list[str]:
        """Victim order among conversations with no queued job."""
        return super().order(idle, "host")

    def order(self, candidates: Iterable[str], tier: str) -> list[str]:
        view = self._view
        first_pos: dict[str, int] = {}
        for i, conv in enumerate(view.queued):
            first_pos.setdefault(conv, i)
        cands = list(candidates)
        if tier == "disk":
            protected = set(view.queued[: view.disk_window])
            cands = [c for c in cands if c not in protected]
        idle = self.idle_order([c for c in cands if c not in first_pos], view)
        waiting = sorted((c for c in cands if c in first_pos), key=lambda c: -first_pos[c])
        return idle + waiting


class PredictivePolicy(QueueAwarePolicy):
    name = "predictive"

    def __init__(self):
        super().__init__()
        self._last_end: dict[str, float] = {}
        self._last_answer: dict[str, int] = {}
        self._ratios: dict[str, list[float]] = {}  # each observed gap over the fit's expectation at the time
        self._sums = [0, 0.0, 0.0, 0.0, 0.0, 0.0]  # n, sums of answer, gap, answer^2, answer*gap, gap^2
        self._fit = (0.0, 0.0)
        self._between = 0.0  # variance of the conversations' true rhythms (empirical Bayes)
        self._within = 1.0  # variance of one gap ratio around its conversation's rhythm
        # Job events come from submitters and the worker, order() from the store.
        self._lock = lock_order.ordered(threading.Lock(), lock_order.POLICY, "policy")

    def on_submit(self, conv_id: str, now: float) -> None:
        with self._lock:
            end = self._last_end.get(conv_id)
            if end is None:
                return
            answer = self._last_answer.get(conv_id, 0)
            gap = max(now - end, 0.0)
            expected = self._fit_gap(answer)
            if expected > 0:
                self._ratios.setdefault(conv_id, []).append(gap / expected)
                self._estimate_spread()
            for i, v in enumerate((1, answer, gap, answer * answer, answer * gap, gap * gap)):
                self._sums[i] += v
            self._refit()

    def on_finish(self, conv_id: str, now: float, answer_tokens: int) -> None:
        with self._lock:
            self._last_end[conv_id] = now
            self._last_answer[conv_id] = answer_tokens

    def on_remove(self, conv_id: str) -> None:
        super().on_remove(conv_id)
        with self._lock:
            for d in (self._last_end, self._last_answer, self._ratios):
                d.pop(conv_id, None)

    def _refit(self) -> None:
        """Least squares of gap on answer length; the slope is kept only where the data
        support it (t > 2), so noise does not make long answers look slower."""
        n, sa, sg, saa, sag, sgg = self._sums
        sxx, sxy, syy = saa - sa * sa / n, sag - sa * sg / n, sgg - sg * sg / n
        slope = sxy / sxx if sxx > 1e-9 else 0.0
        if n > 2 and slope > 0:
            resid = max(0.0, syy - slope * sxy) / (n - 2)
            if slope <= 2 * (resid / sxx) ** 0.5:
                slope = 0.0
        slope = max(0.0, slope)
        self._fit = ((sg - slope * sa) / n, slope)

    def _estimate_spread(self) -> None:
        """Between- and within-conversation variance of the gap ratios: how much a
        conversation's own history says beyond the global fit."""
        groups = [r for r in self._ratios.values() if r]
        repeat = [r for r in groups if len(r) >= 2]
        dof = sum(len(r) - 1 for r in repeat)
        if dof < 2:
            self._between = 0.0  # too little to tell users apart: trust the global fit
            return
        means = [sum(r) / len(r) for r in groups]
        self._within = sum(sum((x - sum(r) / len(r)) ** 2 for x in r) for r in repeat) / dof
        mu = sum(means) / len(means)
        spread = sum((m - mu) ** 2 for m in means) / max(1, len(means) - 1)
        self._between = max(0.0, spread - sum(self._within / len(r) for r in groups) / len(groups))

    def _fit_gap(self, answer: int) -> float:
        a, b = self._fit
        return max(a + b * answer, 1e-9) if self._sums[0] else 0.0

    def expected_gap(self, conv_id: str) -> float:
        """E: the gap this conversation's next turn is expected to take after its last one ended:
        the global fit, scaled by the conversation's own mean ratio shrunk towards 1 as
        far as the spread between conversations warrants (empirical Bayes)."""
        base = self._fit_gap(self._last_answer.get(conv_id, 0))
        own = self._ratios.get(conv_id, [])
        if not own or self._between <= 0:
            return base
        weight = self._between / (self._between + self._within / len(own))
        return base * max(0.05, 1 + weight * (sum(own) / len(own) - 1))

    def idle_order(self, idle: list[str], view: QueueView) -> list[str]:
        lru = super().idle_order(idle, view)
        if not self._sums[0] or view.clock is None:
            return lru  # no rhythm seen yet, or no clock to measure silence: LRU
        now = view.clock()
        with self._lock:
            rank = {}
            for c in lru:
                end = self._last_end.get(c)
                # No turn served since the store opened: nothing says it will come back.
                rank[c] = float("inf") if end is None else (now - end) / self.expected_gap(c)
        return sorted(lru, key=lambda c: -rank[c])  # stable: ties keep LRU order


register_policy("queue", QueueAwarePolicy)
register_policy("predictive", PredictivePolicy)
