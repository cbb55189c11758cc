"""The one place that moves chunks between tiers and asks the eviction policy.

Every move has three steps: decide and mark the chunk's new state under the
store lock; do the I/O without it; record the outcome under it again,
re-checking what changed meanwhile (a chunk written while its conversation
was dropped has its new file deleted, not published into the index). File
deletions decided under the lock are queued and run once it is released.

Waits never depend on work queued behind the waiter: the store's own threads
(prefetches, write completions) never wait for host memory; only a caller's
thread may wait, and only for writes already running on other threads.
"""

from __future__ import annotations

import logging
import threading
import time

from cachedattn.store.chunk_file import ChunkCorruptError
from cachedattn.store.conversation import Chunk, Conversation
from cachedattn.store.host_tier import HostMemoryFull
from cachedattn.store.state import WRITE_IN_FLIGHT, ChunkState, ConvState

log = logging.getLogger("cachedattn")
S = ChunkState
HOST_WAIT_S = 0.1  # the longest a caller waits for host blocks that writes in flight are about to free

_on_store_thread = threading.local()


def mark_store_thread() -> None:
    """Called first in every job on the store's threads: they never wait for host memory."""
    _on_store_thread.yes = True


def on_store_thread() -> bool:
    return getattr(_on_store_thread, "yes", False)


class Mover:
    def __init__(self, store):
        self.s = store
        self.writing = 0  # chunk writes in flight (any conversation)
        self._warned_no_victim = False

    # ---- host memory ------------------------------------------------------------

    def alloc(self, n: int, foreground: bool, partial: bool = False) -> list:
        """n host blocks, demoting other conversations (policy order) to make room.

        Called without the store lock. A foreground caller may write back a victim's
        unwritten chunks itself and wait, HOST_WAIT_S at most, for writes already in
        flight (they free blocks); a background one (a prefetch) takes only what is free
        at once. When that is not enough: partial, the blocks found (maybe none); else
        HostMemoryFull, holding nothing.
        """
        s = self.s
        blocks: list = []
        deadline = None
        try:
            while True:
                writes = None
                with s._critical():
                    s._check_open()
                    host = s._host
                    while len(blocks) < n:
                        b = host.try_alloc()
                        if b is None:
                            break
                        blocks.append(b)
                    if len(blocks) == n:
                        return blocks
                    victim = self._host_victim(exclude=(), background=not foreground)
                    if victim is not None:
                        writes = self.plan_demote(victim, drop_unwritable=True, at_once_only=not foreground)
                    elif foreground and self.writing:
                        now = time.monotonic()
                        deadline = deadline or now + HOST_WAIT_S
                        if now >= deadline:
                            break
                        s._cond.wait(timeout=deadline - now)  # releases the lock: those writes record their end
                        continue
                    else:
                        break
                if writes:
                    self.run_writes(writes)
        except BaseException:
            for b in blocks:
                b.release()
            raise
        if partial:
            return blocks
        for b in blocks:
            b.release()
        raise self._full()

    def _full(self) -> HostMemoryFull:
        h = self.s._host
        return HostMemoryFull(
            f"host memory is full: all {h.capacity_blocks} chunk blocks (host_bytes={self.s.config.host_bytes}) "
            "are held by open loads or appends"
        )

    def _demotable(self, conv: Conversation, background: bool) -> bool:
        if background:  # only what goes at once and loses nothing
            return any(c.state is S.HOST_DISK for c in conv.chunks)
        return any(c.state in (S.HOST, S.HOST_DISK, S.WRITING) for c in conv.chunks)

    def _host_victim(self, exclude, background: bool = False) -> Conversation | None:
        s = self.s
        cands = [
            cid
            for cid, c in s._convs.items()
            if cid not in exclude and c.owners == 0 and c.state is ConvState.READY and self._demotable(c, background)
        ]
        cid = s.policy.victim(cands, "host")
        return None if cid is None else s._convs[cid]

    def make_host_room(self, nbytes: int, protect) -> int:
        s = self.s
        tried = set(protect)
        while True:
            with s._critical():
                s._check_ready()
                free = s._host_free()
                if free >= nbytes or not self.disk_usable():
                    return free
                victim = self._host_victim(exclude=tried)
                if victim is None:
                    return free
                tried.add(victim.id)
                writes = self.plan_demote(victim, drop_unwritable=False)
            self.run_writes(writes)

    def plan_demote(self, conv: Conversation, drop_unwritable: bool, at_once_only: bool = False) -> list:
        """Host copies go: at once where the chunk is on disk, after its write where one
        is in flight or can start (returned, for the caller to run without the lock).
        A chunk that cannot be written stays, unless drop_unwritable (eviction for room).
        at_once_only: only what goes at once (a store thread must not start writes and wait)."""
        s = self.s
        writes, lost = [], None
        for i, c in enumerate(conv.chunks):
            if c.state is S.HOST_DISK:
                self._drop_host_copy(c)
                c.move(S.DISK)
            elif at_once_only:
                continue
            elif c.state is S.WRITING:
                c.move(S.DEMOTING)
            elif c.state is S.HOST:
                if self.disk_usable() and self.reserve_disk(conv):
                    c.move(S.DEMOTING)
                    writes.append(self._start_write(conv, c))
                elif drop_unwritable:
                    lost = i  # it and what follows go
                    break
        if lost is not None:
            s._stats.add(host_evictions=sum(1 for c in conv.chunks[lost:] if c.in_host))
            self.truncate(conv, lost)
        return writes

    def _drop_host_copy(self, c: Chunk) -> None:
        c.host.release()
        c.host = None
        self.s._stats.add(host_evictions=1)
        self.s._cond.notify_all()

    # ---- writes -----------------------------------------------------------------

    def disk_usable(self) -> bool:
        return self.s._disk_tier is not None and self.s._disk_error is None

    def reserve_disk(self, conv: Conversation) -> bool:
        d = self.s._disk_tier
        if d.reserve():
            return True
        self.make_disk_room(need=d.file_bytes, exclude=conv)
        if d.reserve():
            return True
        if not self._warned_no_victim:
            self._warned_no_victim = True
            log.warning(
                "cachedattn: the disk tier is full and the eviction policy has no conversation to evict; "
                "KV that does not fit stays in host memory only (logged once)"
            )
        return False

    def _start_write(self, conv: Conversation, c: Chunk):
        """Bookkeeping of a write about to start (a disk reservation is held)."""
        conv.writes += 1
        self.writing += 1
        return conv, c, c.host.acquire()

    def schedule_write(self, conv: Conversation, c: Chunk):
        """Write-through of one HOST chunk on the store's threads; the future, or None."""
        if not self.disk_usable() or not self.reserve_disk(conv):
            return None
        c.move(S.WRITING)
        job = self._start_write(conv, c)
        return self.s._submit(self.run_writes, [job])

    def run_writes(self, jobs) -> None:
        """Writes whole chunks (no lock held), then records each outcome."""
        for conv, c, ref in jobs:
            name, err = None, None
            try:
                name = self.s._disk_tier.put_from(conv, c, ref)
            except OSError as e:
                err = e
            finally:
                ref.release()
            with self.s._critical():
                self.written(conv, c, name, err)

    def written(self, conv: Conversation, c: Chunk, name: str | None, err: OSError | None) -> None:
        """Records the end of a chunk write; lock held."""
        s = self.s
        conv.writes -= 1
        self.writing -= 1
        if err is not None:
            s._disk_tier.unreserve()
            s._disk_failed(err, "writing")
            if c.state in WRITE_IN_FLIGHT:
                c.move(S.HOST)  # the host copy is now the only one: it stays
        elif c.state is S.DROPPED:  # replaced or dropped while being written
            if conv.state is ConvState.READY and not conv.all_on_disk():
                conv.superseded.append(name)  # maybe part of the newest complete save: kept as long as older ones
            else:
                self.delete_later(conv.dirname, name)
        else:
            c.file = name
            s._stats.add(disk_bytes_written=s._disk_tier.file_bytes)
            if c.state is S.WRITING:
                c.move(S.HOST_DISK)
            else:
                self._drop_host_copy(c)
                c.move(S.DISK)
        self.settle(conv)
        s._cond.notify_all()
        self.finish_if_done(conv)

    # ---- disk -------------------------------------------------------------------

    def make_disk_room(self, need: int, exclude: Conversation | None = None) -> bool:
        s, d = self.s, self.s._disk_tier
        while d.used() + need > d.capacity():
            cands = [
                cid
                for cid, c in s._convs.items()
                if c is not exclude
                and c.owners == 0
                and (c.state is ConvState.FOUND or c.superseded or c.disk_chunks())
            ]
            cid = s.policy.victim(cands, "disk")
            if cid is None:
                return False
            self._evict_disk(s._convs[cid])
        return True

    def _evict_disk(self, conv: Conversation) -> None:
        if conv.state is ConvState.FOUND:  # never opened since the restart: goes whole
            self.s._stats.add(disk_evictions=len(conv.found))
            self.forget(conv)
            return
        files = len(conv.disk_chunks()) + len(conv.superseded)
        self._doom_superseded(conv)  # eviction gives up the older save first
        lost = None
        for i, c in enumerate(conv.chunks):
            if c.state is S.HOST_DISK:  # its host copy stays
                name, c.file = c.file, None
                c.move(S.HOST)
                self.delete_later(conv.dirname, name)
            elif c.state is S.DISK and lost is None:
                lost = i
        if lost is not None:
            self.truncate(conv, lost)  # the conversation stays a prefix: from its first chunk gone on
        self.s._stats.add(disk_evictions=files)

    def delete_later(self, dirname: str, name: str) -> None:
        """A chunk file goes: its space now, the file once the lock is released."""
        self.s._disk_tier.unreserve()
        self.s._after_lock(self._delete, dirname, name)

    def _delete(self, dirname: str, name: str) -> None:
        try:
            self.s._disk_tier.delete(dirname, name)
        except OSError as e:
            self.s._disk_failed(e, "deleting")

    def _doom(self, conv: Conversation, name: str) -> None:
        """A file of this conversation goes, once no open load may still read it."""
        if conv.owners:
            conv.doomed.append(name)
        else:
            self.delete_later(conv.dirname, name)

    # ---- losing chunks ----------------------------------------------------------

    def retire(self, conv: Conversation, c: Chunk, replaced: bool = False) -> None:
        """Takes a chunk out of every tier (a write in flight deletes its own file when it ends).
        replaced: a save put another chunk in its place; its file stays, superseded, until
        every current chunk of the conversation has its file (settle)."""
        if c.in_host:
            c.host.release()
            c.host = None
            self.s._cond.notify_all()
        name = c.file if c.on_disk else None
        c.move(S.DROPPED)  # c.file stays: loads opened before may still name it (it is deleted once they end)
        if name is not None:
            if replaced:
                conv.superseded.append(name)
            else:
                self._doom(conv, name)

    def settle(self, conv: Conversation) -> None:
        """Superseded files go once the conversation's current chunks are all on disk: until
        then they are the last complete save that a crash must not lose (lock held)."""
        if conv.superseded and conv.state is ConvState.READY and conv.all_on_disk():
            self._doom_superseded(conv)

    def _doom_superseded(self, conv: Conversation) -> None:
        for name in conv.superseded:
            self._doom(conv, name)
        conv.superseded.clear()

    def truncate(self, conv: Conversation, index: int) -> None:
        for c in conv.chunks[index:]:
            self.retire(conv, c)
        conv.chunks = conv.chunks[:index]
        self.forget_if_empty(conv)

    def on_bad_chunk(self, conv: Conversation, c: Chunk, why: str) -> None:
        with self.s._critical():
            log.warning("cachedattn: chunk %d of conversation %r is bad (%s); removed", c.index, conv.id, why)
            self.s._stats.add(corrupt_chunks=1, disk_misses=1)
            if conv.state is ConvState.READY and c.state is not S.DROPPED and c in conv.chunks:
                self.truncate(conv, conv.chunks.index(c))

    def forget_if_empty(self, conv: Conversation) -> None:
        if conv.state is ConvState.READY and not conv.chunks and conv.owners == 0:
            self.forget(conv)

    def forget(self, conv: Conversation) -> None:
        """Out of the index for good; what it holds goes as soon as no owner needs it."""
        s = self.s
        found = conv.found if conv.state is ConvState.FOUND else None
        conv.move(ConvState.GONE)
        for c in conv.chunks:
            if c.state is not S.DROPPED:
                self.retire(conv, c)
        conv.chunks = []
        for *_, name in found or ():
            self._doom(conv, name)
        conv.found = None
        self._doom_superseded(conv)
        if s._convs.get(conv.id) is conv:
            del s._convs[conv.id]
            s.policy.on_remove(conv.id)
        self.finish_if_done(conv)

    def released(self, conv: Conversation) -> None:
        """After an owner let go (lock held)."""
        if conv.owners == 0:
            for name in conv.doomed:
                self.delete_later(conv.dirname, name)
            conv.doomed.clear()
        self.forget_if_empty(conv)
        self.finish_if_done(conv)

    def finish_if_done(self, conv: Conversation) -> None:
        """A gone conversation with no owner and no write in flight lets go of its directory."""
        s = self.s
        if conv.state is not ConvState.GONE or conv.owners or conv.writes or conv not in s._unfinished:
            return
        s._unfinished.discard(conv)
        s._dir_users[conv.dirname] -= 1
        if s._dir_users[conv.dirname] == 0:
            del s._dir_users[conv.dirname]
            if s._disk_tier is not None:
                s._after_lock(self._remove_dir, conv.dirname)

    def _remove_dir(self, dirname: str) -> None:
        s = self.s

        def unused() -> bool:
            with s._critical():
                return dirname not in s._dir_users

        try:
            s._disk_tier.remove_dir(dirname, unused)
        except OSError as e:
            s._disk_failed(e, "deleting")

    # ---- copies -----------------------------------------------------------------

    def copy_into(self, conv: Conversation, c: Chunk, ref, block) -> None:
        """Fills a fresh block with an existing chunk (copy on write of a partial chunk); no lock held.
        ref: a held reference to the chunk's host block, or None to read it from disk."""
        if ref is not None:
            block.view().copy_(ref.view())
            return
        try:
            self.s._disk_tier.get_into(conv, c, block)
        except ChunkCorruptError as e:
            self.on_bad_chunk(conv, c, e.strerror or str(e))
            raise
        self.s._stats.add(disk_bytes_read=self.s._geometry.block_bytes)
