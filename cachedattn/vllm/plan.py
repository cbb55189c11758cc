"""The connector's scheduler side, without vLLM and without the store: which
of a request's blocks the store holds, what the worker must load into which
paged blocks, and what it must save from them before vLLM frees them.

vLLM runs its scheduler and its worker in different processes (on the CPU
build always; on GPUs with several workers too), and the store lives with
the worker, beside the paged KV it fills. So the scheduler side asks: the
first time vLLM asks how much of a request is stored, the planner puts a
*lookup* of the request's block keys in the next step's plan and answers
"not yet" (None: vLLM asks again at a later step); the worker answers in its
step output (`answered`), and the next ask gets the count.

One request's life: `matched` → `allocated` (vLLM gave it paged blocks: a
load of the stored blocks into them is planned; the request waits in vLLM's
queue until the worker reports the load finished) → `finished` (the whole
blocks of its computed tokens that the store lacks are saved, and vLLM keeps
the blocks until the worker reports the save finished). State changes under
one lock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from cachedattn.vllm.prefix_keys import block_keys, salted


@dataclass
class BlockMove:
    """One request's transfer or lookup: block i of `keys` (tokens `tokens[i]`), to or from paged block
    `block_ids[i]` (a lookup has no blocks)."""

    req_id: str
    keys: list[str]
    tokens: list[np.ndarray]
    block_ids: list[int] = field(default_factory=list)


@dataclass
class StepPlan:
    lookups: list[BlockMove] = field(default_factory=list)
    loads: list[BlockMove] = field(default_factory=list)
    saves: list[BlockMove] = field(default_factory=list)
    queued: tuple[str, ...] | None = None  # block keys of the requests waiting in vLLM's queue, when it changed


class PrefixPlanner:
    def __init__(self, ns: bytes, block_tokens: int, sync_loads: bool = False):
        """sync_loads: the worker loads a request's blocks during the step that schedules it (the GPU
        plan: vLLM is told load_async=False and expects no finished_recving for it), rather than while
        the request waits in vLLM's queue."""
        self.ns, self.block_tokens, self.sync_loads = ns, block_tokens, sync_loads
        self._lock = threading.Lock()
        self._plan = StepPlan()
        self._asked: dict[str, list[str]] = {}  # req -> the keys a lookup was planned for
        self._answers: dict[str, int] = {}  # req -> leading blocks of those keys the store holds
        self._matched: dict[str, tuple[list[str], np.ndarray, int, int]] = {}  # req -> keys, tokens, first, n
        self._loading: set[str] = set()  # loads planned and not reported finished: their blocks are being filled
        self._saving: set[str] = set()
        self._keys_saving: dict[str, str] = {}  # block key -> the request whose save will store it
        self._loaded: dict[str, int] = {}  # req -> leading blocks it loaded from the store (not saved again)
        self._queued_sent: tuple[str, ...] = ()
        self._keys: dict[str, tuple[str | None, np.ndarray, list[str]]] = {}  # req -> salt, tokens, their block keys

    def _chain(self, before, salt: str | None, toks: np.ndarray, n: int) -> list[str]:
        """The keys of the first n blocks of toks, under vLLM's cache_salt `salt`. vLLM asks at every step
        while a request waits, and a request's tokens only grow: the keys computed `before` for blocks whose
        tokens are unchanged are kept, not hashed again."""
        B, known = self.block_tokens, []
        if before is not None and before[0] == salt:
            _, old, old_keys = before
            m = min(len(old_keys), n, len(toks) // B)
            if m and len(old) >= m * B and np.array_equal(old[: m * B], toks[: m * B]):
                known = old_keys[:m]
        return block_keys(salted(self.ns, salt), toks, B, n, known=known)

    def _split(self, toks: np.ndarray, n: int) -> list[np.ndarray]:
        B = self.block_tokens
        return [toks[i * B : (i + 1) * B] for i in range(n)]

    def matched(self, req_id: str, token_ids, num_computed: int, salt: str | None = None) -> int | None:
        """Tokens the store can load beyond the `num_computed` vLLM holds (block-aligned; the last prompt
        token is always left to compute, since its logits are needed), or None: not known yet (a lookup is
        planned), or a block of the prefix is being saved by a request that just finished (the
        conversation's previous turn), whose save this turn then reuses."""
        toks = np.asarray(token_ids, dtype=np.int64)
        B = self.block_tokens
        with self._lock:
            before = self._keys.get(req_id)
        keys = self._chain(before, salt, toks, max(len(toks) - 1, 0) // B)
        first = -(-num_computed // B)  # vLLM's own cache ends on a block boundary; be safe if it did not
        with self._lock:
            self._keys[req_id] = (salt, toks, keys)
            if len(keys) <= first:
                return 0
            if any(k in self._keys_saving for k in keys):
                return None
            if self._asked.get(req_id) != keys:  # first ask, or the request's tokens changed (a resumed request)
                self._asked[req_id] = keys
                self._answers.pop(req_id, None)
                self._plan.lookups.append(BlockMove(req_id, keys, self._split(toks, len(keys))))
                return None
            n = self._answers.get(req_id)
            if n is None:
                return None  # the worker has not answered yet
            if n <= first:
                self._matched.pop(req_id, None)
                return 0
            self._matched[req_id] = (keys, toks, first, n)
        return n * B - num_computed

    def answered(self, answers: dict[str, int]) -> None:
        """The worker's answers to lookups: request -> leading blocks stored."""
        with self._lock:
            for req_id, n in answers.items():
                if req_id in self._asked:
                    self._answers[req_id] = n

    def allocated(self, req_id: str, block_ids: list[int], num_external: int) -> None:
        """vLLM allocated the request's paged blocks (all of them, in token order)."""
        with self._lock:
            m = self._matched.pop(req_id, None)
            self._asked.pop(req_id, None)
            self._answers.pop(req_id, None)
            if m is None or num_external <= 0:
                return
            keys, toks, first, n = m
            if len(block_ids) < n:
                raise ValueError(f"request {req_id}: {len(block_ids)} paged blocks for {n} matched blocks")
            if not self.sync_loads:  # reported finished_recving later; a sync load is over with its step
                self._loading.add(req_id)
            self._loaded[req_id] = n
            self._plan.loads.append(BlockMove(req_id, keys[first:n], self._split(toks, n)[first:], list(block_ids[first:n])))

    def finished(self, req_id: str, token_ids, num_computed: int, block_ids: list[int], salt: str | None = None) -> bool:
        """The request is done: plans a save of the whole blocks of its computed tokens beyond those it
        loaded from the store. True: vLLM must keep the blocks until the worker reports the save finished.
        (The worker skips blocks the store holds already, e.g. a system prompt another request stored.)"""
        with self._lock:
            self._matched.pop(req_id, None)
            self._asked.pop(req_id, None)
            self._answers.pop(req_id, None)
            stored_blocks = self._loaded.pop(req_id, 0)
            before = self._keys.pop(req_id, None)  # the request is gone
            if req_id in self._loading:  # aborted while its load runs: vLLM frees its blocks after the load
                return False
        B = self.block_tokens
        toks = np.asarray(token_ids, dtype=np.int64)[:num_computed]
        n = min(len(toks) // B, len(block_ids))
        if n <= stored_blocks:
            return False
        keys = self._chain(before, salt, toks, n)
        s = stored_blocks
        move = BlockMove(req_id, keys[s:n], self._split(toks, n)[s:], list(block_ids[s:n]))
        with self._lock:
            self._plan.saves.append(move)
            self._saving.add(req_id)
            self._keys_saving.update((k, req_id) for k in move.keys)
        return True

    def reported(self, saved, loaded) -> None:
        """The worker finished these saves and loads."""
        with self._lock:
            self._saving.difference_update(saved)
            self._loading.difference_update(loaded)
            if saved:
                self._keys_saving = {k: r for k, r in self._keys_saving.items() if r in self._saving}

    @property
    def saves_in_flight(self) -> int:
        with self._lock:
            return len(self._saving)

    def take_step(self) -> StepPlan:
        """The plan for this step's worker; the planner starts a new one. It carries vLLM's queue as
        the store's eviction policy sees conversations: the block keys of the waiting requests (those
        that asked and have no blocks yet), first asked first, whenever that changed."""
        with self._lock:
            plan, self._plan = self._plan, StepPlan()
            queued = tuple(k for keys in self._asked.values() for k in keys)
            if queued != self._queued_sent:
                plan.queued = self._queued_sent = queued
        return plan
