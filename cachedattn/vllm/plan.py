"""The connector's scheduler side, without vLLM: which of a request's blocks
the store holds, what the worker must load into which paged blocks, and what
it must save from them before vLLM frees them.

One request's life: `matched` (vLLM asks how many prompt tokens the store
can give beyond its own prefix cache) → `allocated` (vLLM gave the request
paged blocks: a load of the matched blocks is planned into them) →
`take_step` (the step's plan goes to the worker; the request waits in vLLM's
queue until the worker reports the load finished) → `finished` (the request
is done: the blocks of its computed tokens that the store lacks are saved,
and vLLM keeps the blocks until the worker reports the save finished).

State changes under one lock (vLLM calls the scheduler side from its engine
loop, the stats from other threads); the store is asked outside it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from cachedattn.vllm.prefix_keys import block_keys


@dataclass
class BlockMove:
    """One request's transfer: block i of `keys` (tokens `tokens[i]`) to or from paged block `block_ids[i]`."""

    req_id: str
    keys: list[str]
    tokens: list[np.ndarray]
    block_ids: list[int]


@dataclass
class StepPlan:
    loads: list[BlockMove] = field(default_factory=list)
    saves: list[BlockMove] = field(default_factory=list)


class PrefixPlanner:
    def __init__(self, store, ns: bytes, block_tokens: int):
        self.store, self.ns, self.block_tokens = store, ns, block_tokens
        self._lock = threading.Lock()
        self._matched: dict[str, tuple[list[str], np.ndarray, int, int]] = {}  # req -> keys, tokens, first, n
        self._plan = StepPlan()
        self._saving: set[str] = set()
        self._loading: set[str] = set()  # loads planned and not reported finished: their blocks are being filled
        self._keys_saving: dict[str, str] = {}  # block key -> the request whose save will store it

    def _stored_blocks(self, keys: list[str], toks: np.ndarray) -> int:
        """How many leading blocks of `keys` the store holds whole (host, disk or the remote tier)."""
        B = self.block_tokens
        for i, key in enumerate(keys):
            if self.store.lookup(key, toks[i * B : (i + 1) * B]) < B:
                return i
        return len(keys)

    def matched(self, req_id: str, token_ids, num_computed: int) -> int | None:
        """Tokens the store can load beyond the `num_computed` vLLM holds (block-aligned; the last prompt
        token is always left to compute, since its logits are needed). None while the next block is
        being saved by a request that just finished (the conversation's previous turn): vLLM asks again
        at a later step, and the turn then reuses what that save stores."""
        toks = np.asarray(token_ids, dtype=np.int64)
        B = self.block_tokens
        usable = max(len(toks) - 1, 0) // B
        keys = block_keys(self.ns, toks, B, usable)
        n = self._stored_blocks(keys, toks)
        with self._lock:
            if n < len(keys) and keys[n] in self._keys_saving:
                return None
        first = -(-num_computed // B)  # vLLM's own cache ends on a block boundary; be safe if it did not
        with self._lock:
            if n <= first:
                self._matched.pop(req_id, None)
                return 0
            self._matched[req_id] = (keys, toks, first, n)
        return n * B - num_computed

    def allocated(self, req_id: str, block_ids: list[int], num_external: int) -> None:
        """vLLM allocated the request's paged blocks (all of them, in token order)."""
        with self._lock:
            m = self._matched.pop(req_id, None)
            if m is None or num_external <= 0:
                return
            keys, toks, first, n = m
            B = self.block_tokens
            if len(block_ids) < n:
                raise ValueError(f"request {req_id}: {len(block_ids)} paged blocks for {n} matched blocks")
            self._loading.add(req_id)
            self._plan.loads.append(
                BlockMove(
                    req_id,
                    keys[first:n],
                    [toks[i * B : (i + 1) * B] for i in range(first, n)],
                    list(block_ids[first:n]),
                )
            )

    def finished(self, req_id: str, token_ids, num_computed: int, block_ids: list[int]) -> bool:
        """The request is done: plans a save of the whole blocks of its computed tokens that the store
        lacks. True: vLLM must keep the blocks until the worker reports the save finished."""
        with self._lock:
            self._matched.pop(req_id, None)
            if req_id in self._loading:  # aborted while its load runs: vLLM frees its blocks after the load
                return False
        B = self.block_tokens
        toks = np.asarray(token_ids, dtype=np.int64)[:num_computed]
        n = min(len(toks) // B, len(block_ids))
        if n == 0:
            return False
        keys = block_keys(self.ns, toks, B, n)
        have = self._stored_blocks(keys, toks)
        if have >= n:
            return False
        move = BlockMove(req_id, keys[have:n], [toks[i * B : (i + 1) * B] for i in range(have, n)], list(block_ids[have:n]))
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
        """The plan for this step's worker; the planner starts a new one."""
        with self._lock:
            plan, self._plan = self._plan, StepPlan()
        return plan
