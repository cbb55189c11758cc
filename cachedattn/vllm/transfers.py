"""The connector's worker side, without vLLM: carries out a step's plan
between the store and vLLM's paged KV.

A lookup (in the background) counts the leading blocks of a request's keys
that the store holds (host, disk, or fetched from the remote tier), for the
scheduler side. A load fills the paged blocks of a request: with sync loads
(the default) in the step that schedules it, before the forward, from host
memory (the lookup brought the blocks there before it answered); with async
loads in the background while the request waits in vLLM's queue
(WAITING_FOR_REMOTE_KVS), reported when done. A save copies the blocks of a
finished request into the store in the background while vLLM holds them for
us, and reports the request when done. A load that cannot read a block
(evicted since the lookup, damaged, a failing disk or Redis) reports that
block and every later one of the request as failed: vLLM recomputes them,
so the request never fails because of the cache. A save that the store
refuses stores nothing and frees the blocks all the same.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from cachedattn.store import QueueView

from cachedattn.vllm.paged import PagedKV
from cachedattn.vllm.plan import BlockMove, StepPlan

log = logging.getLogger("cachedattn")


def blocks_held(store, move: BlockMove, remote: bool) -> list[bool]:
    """Which of the move's blocks the store holds whole. With `remote`, what Redis holds is read in for
    all of them in two round trips (the store keeps each block as one content-keyed conversation)."""
    counts = store.lookup_many(list(zip(move.keys, move.tokens)), remote=remote)
    return [n >= len(t) for n, t in zip(counts, move.tokens)]


class PagedTransfers:
    def __init__(self, store, paged: PagedKV, threads: int = 2, sync_loads: bool = False):
        """sync_loads: a request's blocks are loaded during the step that schedules it (vLLM is told
        load_async=False), and a lookup brings the blocks it counts into host memory before answering, so
        that the in-step load reads host memory only; otherwise a load runs in the background while its
        request waits in vLLM's queue, and is reported finished_recving."""
        self.store, self.paged, self.sync_loads = store, paged, sync_loads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cachedattn-vllm")
        self._lock = threading.Lock()
        self._sent: set[str] = set()
        self._received: set[str] = set()
        self._failed_blocks: set[int] = set()
        self._answers: dict[str, int] = {}
        self._warned: set[str] = set()
        self.stats = {"lookups": 0, "blocks_loaded": 0, "blocks_saved": 0, "load_failures": 0, "save_failures": 0}
        self.tier_tokens = {"host": 0, "disk": 0, "remote": 0}
        self._pending = 0
        self._views = itertools.count(1)
        self._prefetched: set[str] = set()  # queued keys already prefetched while they stay queued
        self._idle = threading.Condition(self._lock)

    def submit(self, plan: StepPlan) -> None:
        if plan.queued is not None:  # off vLLM's step: the policy and the prefetches take the store's lock
            self._background(self._push_queue, plan.queued, next(self._views))
        for move in plan.lookups:
            self._start(self._lookup, move, None)
        self._transfer(plan)

    def _transfer(self, plan: StepPlan) -> None:
        """The step's loads (here and now before the step's forward, or in the background until their
        request is reported) and saves (in the background until their request is reported)."""
        for move in plan.loads:
            if self.sync_loads:
                self._load(move)
            else:
                self._start(self._load, move, "_received")
        for move in plan.saves:
            self._start(self._save, move, "_sent")

    def _start(self, fn, move: BlockMove, done: str | None) -> None:
        def finish():
            if done is not None:  # the set by name: finished() swaps in a new one while this runs
                getattr(self, done).add(move.req_id)

        self._background(fn, move, finish=finish)

    def _background(self, fn, *args, finish=None) -> None:
        """Runs fn(*args) on the pool, counted until done (wait_idle); `finish` runs under the lock after."""
        with self._lock:
            self._pending += 1

        def run():
            try:
                fn(*args)
            finally:
                with self._lock:
                    if finish is not None:
                        finish()
                    self._pending -= 1
                    self._idle.notify_all()

        self._pool.submit(run)

    def _warn_once(self, kind: str, msg: str, *args) -> None:
        with self._lock:
            first = kind not in self._warned
            self._warned.add(kind)
        (log.warning if first else log.debug)(msg, *args)

    def _push_queue(self, queued: tuple[str, ...], seq: int) -> None:
        """The paper's scheduler-aware eviction and fetching, with vLLM's queue: the store's policy sees
        the waiting requests' blocks (a queue-aware policy keeps them, the first (C_mem + C_disk) / S of
        them never leave disk), and the blocks that fit in host memory are brought in from disk ahead of
        their requests' loads."""
        chunk = max(self.store.mean_conversation_bytes(), 1.0)
        cfg = self.store.config
        window = int((cfg.host_bytes + (cfg.disk_bytes if cfg.disk_dir else 0)) // chunk)
        self.store.policy.on_queue(QueueView(queued, window, time.monotonic, seq))  # seq: the newest view wins
        keys = list(dict.fromkeys(queued))[: int(cfg.host_bytes // chunk) // 2]
        with self._lock:  # each queued block once, not at every step it stays queued
            fresh = [k for k in keys if k not in self._prefetched]
            self._prefetched = self._prefetched.intersection(keys).union(fresh)
        self._prefetch(fresh, "queued")  # not waited for

    def _prefetch(self, keys, what: str) -> list:
        """Starts bringing these blocks from disk into host memory (never waiting for host memory; a block
        held in host memory or not stored is a no-op); the futures of those started. Best effort: a
        failure is logged once, and the load reads any tier."""
        futures = []
        for key in keys:
            try:
                futures.append(self.store.prefetch(key))
            except Exception as e:  # noqa: BLE001
                self._warn_once("prefetch", "cachedattn: prefetch of a %s block failed (%s: %s)", what, type(e).__name__, e)
        return futures

    def _lookup(self, move: BlockMove) -> None:
        n = 0
        try:
            held = blocks_held(self.store, move, remote=True)
            while n < len(held) and held[n]:
                n += 1
        except Exception as e:  # noqa: BLE001 - a failing tier makes the match shorter
            self._warn_once("lookup", "cachedattn: a lookup of request %s stopped (%s: %s)", move.req_id, type(e).__name__, e)
        self._before_answer(move, n)
        with self._lock:
            self._answers[move.req_id] = n
            self.stats["lookups"] += 1

    def _before_answer(self, move: BlockMove, n: int) -> None:
        """With sync loads, the n blocks counted come into host memory before the scheduler hears of them
        (the request waits in vLLM's queue meanwhile): the step that loads them then reads host memory only.
        A block evicted again meanwhile is read from disk during the step: slower, not wrong. (Async loads
        read any tier while their request waits: nothing to do.)"""
        if not self.sync_loads:
            return
        for f in self._prefetch(move.keys[:n], "matched"):
            try:
                f.result()
            except Exception as e:  # noqa: BLE001
                self._warn_once("prefetch", "cachedattn: prefetch of a matched block failed (%s: %s)", type(e).__name__, e)

    def answers(self) -> dict[str, int]:
        """Lookups answered since the last call: request -> leading blocks the store holds."""
        with self._lock:
            answers, self._answers = self._answers, {}
        return answers

    def _load(self, move: BlockMove) -> None:
        for i, (key, toks, block) in enumerate(zip(move.keys, move.tokens, move.block_ids)):
            try:
                ok = self._load_block(key, toks, block)
            except Exception as e:  # noqa: BLE001 - a failing tier makes the load shorter, never the request fail
                self._warn_once("load", "cachedattn: a block of request %s could not be loaded (%s: %s); vLLM recomputes it", move.req_id, type(e).__name__, e)
                ok = False
            if not ok:
                with self._lock:
                    self._failed_blocks.update(move.block_ids[i:])
                    self.stats["load_failures"] += 1
                return

    def _load_block(self, key: str, toks, block: int) -> bool:
        n = len(toks)
        load = self.store.load_prefix(key, toks)
        if load is None:
            return False
        try:
            if load.n_tokens < n:
                return False
            for layer in range(self.paged.num_layers):
                k, v = self.paged.block(layer, block)
                load.read_layer(layer, k_out=k, v_out=v)
            tiers = load.tier_tokens()
        finally:
            load.close()
        with self._lock:
            self.stats["blocks_loaded"] += 1
            for tier, t in tiers.items():
                self.tier_tokens[tier] = self.tier_tokens.get(tier, 0) + t
        return True

    def _save(self, move: BlockMove) -> None:
        try:  # blocks held here already (e.g. a shared system prompt another request stored) are skipped;
            # Redis is not asked: its copy, if any, is the same bytes, and asking costs a round trip
            held = blocks_held(self.store, move, remote=False)
        except Exception:  # noqa: BLE001 - the appends below meet the same failure and say so
            held = [False] * len(move.keys)
        for key, toks, block, there in zip(move.keys, move.tokens, move.block_ids, held):
            try:
                if there:
                    continue
                kv = [self.paged.block(layer, block) for layer in range(self.paged.num_layers)]
                self.store.append(key, toks, kv, start=0)  # copies into host blocks now; on disk later
            except Exception as e:  # noqa: BLE001 - a refused save stores nothing; the answer is already out
                self._warn_once("save", "cachedattn: a block of request %s was not stored (%s: %s)", move.req_id, type(e).__name__, e)
                with self._lock:
                    self.stats["save_failures"] += 1
                return
            with self._lock:
                self.stats["blocks_saved"] += 1

    def finished(self) -> tuple[set[str], set[str]]:
        """(requests whose save finished, requests whose load finished) since the last call."""
        with self._lock:
            sent, self._sent = self._sent, set()
            received, self._received = self._received, set()
        return sent, received

    def failed_blocks(self) -> set[int]:
        """Paged blocks that loads since the last call could not fill (vLLM recomputes them)."""
        with self._lock:
            failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._lock:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
