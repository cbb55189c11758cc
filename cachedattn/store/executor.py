"""The executor: carries out the index's plans with no lock held.

Every change to the store has three steps: the index decides it under the
store lock and returns a plan (index.py); the executor does the plan's file
work (writes, deletions, directory removals) without the lock; each write's
outcome goes back to the index under the lock, which re-checks what changed
meanwhile and may add more work (a file written for a chunk dropped meanwhile
is deleted), which the executor then carries out too.

The executor also finds host blocks (alloc), the one place that waits:
waits never depend on work queued behind the waiter. The store's own threads
(prefetches, write completions) never wait for host memory; a caller's thread
may write back a victim's chunks itself, and wait, HOST_WAIT_S at most, only
for writes already running on other threads.
"""

from __future__ import annotations

import logging
import threading
import time

from cachedattn.store.block_pool import HostMemoryFull
from cachedattn.store.index import Index, Plan
from cachedattn.store.recovery import read_chain
from cachedattn.store.conversation import ConvState

log = logging.getLogger("cachedattn")

HOST_WAIT_S = 0.1  # the longest a caller waits for host blocks that writes in flight are about to free

_on_store_thread = threading.local()


def mark_store_thread() -> None:
    """Called first in every job on the store's threads: they never wait for host memory."""
    _on_store_thread.yes = True


def on_store_thread() -> bool:
    return getattr(_on_store_thread, "yes", False)


class Executor:
    def __init__(self, index: Index, submit):
        self.index = index
        self.disk = None  # the disk tier (disk_tier.DiskTier), once attached with one
        self.files = None  # its files (chunk_files.ChunkFiles), where recovery reads headers
        self.host_bytes = 0  # the configured host memory, for messages
        self._submit = submit  # runs a job on the store's threads, returns its future
        self._warned_short = False

    # ---- plans ---------------------------------------------------------------------

    def run(self, plan: Plan) -> list:
        """Carries out a plan (no lock held) and what reporting its writes adds; returns the
        futures of the work it queued on the store's threads."""
        futures = []
        while plan:
            cur, plan = plan, Plan()
            for dirname, name in cur.deletes:
                self._delete(dirname, name)
            for dirname in cur.rmdirs:
                self._remove_dir(dirname)
            for job in cur.queued:
                futures.append(self._submit(self.run, Plan(writes=[job])))
            for args in cur.staged:
                futures.append(self._submit(self._finish_staged, *args))
            for conv, c, ref in cur.writes:
                name, err = None, None
                try:
                    name = self.disk.write_chunk(conv, c, ref)
                except OSError as e:
                    err = e
                finally:
                    ref.release()
                with self.index.lock:
                    self.index.written(conv, c, name, err, plan)
        return futures

    def _finish_staged(self, conv, chunks, jobs, writer) -> None:
        """Completes an append's layer-by-layer chunk files (store thread), then reports each."""
        try:
            results = writer.finish(chunks)
        finally:
            for *_, ref in jobs:
                ref.release()
        plan = Plan()
        with self.index.lock:
            for c, (name, err) in zip(chunks, results):
                self.index.written(conv, c, name, err, plan)
        self.run(plan)

    def _delete(self, dirname: str, name: str) -> None:
        try:
            self.disk.delete(dirname, name)
        except OSError as e:
            self.index.disk_failed(e, "deleting")

    def _remove_dir(self, dirname: str) -> None:
        try:
            self.disk.remove_dir(dirname, lambda: self.index.dir_unused(dirname))
        except OSError as e:
            self.index.disk_failed(e, "deleting")

    # ---- transitions that carry their plan out at once ---------------------------------

    def release(self, lease) -> None:
        plan = Plan()
        with self.index.lock:
            self.index.release(lease, plan)
        self.run(plan)

    def bad_chunk(self, conv, c, why: str) -> None:
        plan = Plan()
        with self.index.lock:
            self.index.bad_chunk(conv, c, why, plan)
        self.run(plan)

    def resolve(self, conv_id) -> None:
        """Reads the chunk headers of a conversation found at open, once, without the lock
        (its lookups wait meanwhile; nobody else does)."""
        if not isinstance(conv_id, str):
            return
        ix = self.index
        while True:
            with ix.lock:
                conv = ix.convs.get(conv_id)
                if conv is None or conv.state in (ConvState.READY, ConvState.GONE):
                    return
                if conv.state is ConvState.RESOLVING:
                    ix.cond.wait(timeout=0.05)
                    continue
                ix.check_open()
                conv.move(ConvState.RESOLVING)
                lease = ix.lease(conv, "resolve")
                files, conv.found = conv.found, None
            try:
                chunks, stale, damaged = read_chain(self.files, conv.id, conv.dirname, conv.root, files)
            except Exception as e:  # unexpected: keep nothing of it rather than fail the caller
                log.warning("cachedattn: cannot read the stored chunks of %r (%s); dropped", conv.id, e)
                chunks, stale, damaged = [], [name for *_, name in files], 0
            plan = Plan()
            with ix.lock:
                ix.resolved(conv, chunks, stale, damaged, lease, plan)
            self.run(plan)
            return

    def shortened(self, why: str) -> None:
        """A load was cut short because a resource ran out: counted, logged once."""
        self.index.stats.add(shortened_loads=1)
        if not self._warned_short:
            self._warned_short = True
            log.warning("cachedattn: %s; loads are shortened meanwhile (history recomputed, logged once)", why)

    # ---- host memory ---------------------------------------------------------------

    def alloc(self, n: int, foreground: bool, partial: bool = False) -> list:
        """n host blocks, demoting other conversations (policy order) to make room.

        A foreground caller may write back a victim's unwritten chunks itself and wait,
        HOST_WAIT_S at most, for writes already in flight (they free blocks); a background
        one (a prefetch) takes only what is free at once. When that is not enough: partial,
        the blocks found (maybe none); else HostMemoryFull, holding nothing."""
        ix = self.index
        blocks: list = []
        deadline = None
        try:
            while True:
                plan = Plan()
                with ix.lock:
                    ix.check_open()
                    while len(blocks) < n:
                        b = ix.host.try_alloc()
                        if b is None:
                            break
                        blocks.append(b)
                    if len(blocks) == n:
                        return blocks
                    victim = ix.host_victim(background=not foreground)
                    if victim is not None:
                        ix.demote(victim, plan, drop_unwritable=True, at_once_only=not foreground)
                    elif foreground and ix.writing:
                        now = time.monotonic()
                        deadline = deadline or now + HOST_WAIT_S
                        if now >= deadline:
                            break
                        ix.cond.wait(timeout=deadline - now)  # releases the lock: those writes record their end
                        continue
                    else:
                        break
                self.run(plan)
        except BaseException:
            for b in blocks:
                b.release()
            raise
        if partial:
            return blocks
        for b in blocks:
            b.release()
        raise HostMemoryFull(
            f"host memory is full: all {ix.host.capacity_blocks} chunk blocks (host_bytes={self.host_bytes}) "
            "are held by open loads or appends"
        )

    def make_host_room(self, nbytes: int, protect) -> int:
        """Demotes conversations (policy order, never those in `protect` or in use) until
        `nbytes` of host memory are free or nothing more can go; returns the free bytes."""
        ix = self.index
        tried = set(protect)
        while True:
            plan = Plan()
            with ix.lock:
                free = ix.host_free()
                if free >= nbytes or not ix.disk_usable():
                    return free
                victim = ix.host_victim(exclude=tried)
                if victim is None:
                    return free
                tried.add(victim.id)
                ix.demote(victim, plan, drop_unwritable=False)
            self.run(plan)
