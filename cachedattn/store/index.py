"""The index: what the store holds, and every change to it, as state transitions
that return plans.

The index owns the conversations (their chunks and chunk states, state.py),
the leases on them, the directories still in use, the save generations, the
disk space reserved, and the store lock that guards all of it. Its methods
are called with that lock held; they do no I/O and never block. What a change
needs done to files (write these chunks, delete these files, remove this
directory) is appended to a `Plan`, which the executor (executor.py) carries
out after the lock is released, reporting each write's outcome back through
`written()`, which re-checks what changed meanwhile (a chunk dropped while it
was being written has its new file deleted, not published).

Host blocks are memory, not I/O: a chunk's own block reference is let go at
once, under the lock, so the next allocation in the same critical section,
and a waiter woken by `cond`, finds the block free.

Conversations are keyed by id today; see docs/store-core.md for what a
content-keyed chunk (shared by several conversations, with a reference count)
changes here.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass, field

from cachedattn.store import keys, lock_order
from cachedattn.store.conversation import (
    WRITE_IN_FLIGHT,
    Chunk,
    ChunkState,
    Conversation,
    ConvState,
    IllegalTransition,
    Lease,
    common_prefix,
)

log = logging.getLogger("cachedattn")
S = ChunkState


@dataclass
class Plan:
    """File work decided under the lock, to run without it (executor.Executor.run)."""

    writes: list = field(default_factory=list)  # (conv, chunk, block ref): write now, report with written()
    queued: list = field(default_factory=list)  # (conv, chunk, block ref): the same, each a job on the store's threads
    staged: list = field(default_factory=list)  # (conv, chunks, jobs, tier writer): finish on the store's threads
    deletes: list = field(default_factory=list)  # (dirname, file name)
    rmdirs: list = field(default_factory=list)  # conversation directories no conversation uses any more

    def __bool__(self) -> bool:
        return bool(self.writes or self.queued or self.staged or self.deletes or self.rmdirs)


@dataclass
class LoadPlan:
    """What a load reads, decided under the lock (Index.plan_load): the first n tokens of conv,
    in `chunks`; `held`: a block reference per chunk position in host memory; `from_disk`: the
    positions to read from the disk tier into fresh blocks."""

    conv: Conversation
    lease: Lease
    n: int
    chunks: list[Chunk]
    held: dict[int, object]
    from_disk: list[int]


class DiskSpace:
    """The disk tier's space, counted in whole chunk files (present or being written)."""

    def __init__(self, capacity: int, file_bytes: int, files: int = 0):
        self.capacity = capacity
        self.file_bytes = file_bytes
        self.used = files * file_bytes

    def reserve(self) -> bool:
        if self.used + self.file_bytes > self.capacity:
            return False
        self.used += self.file_bytes
        return True

    def unreserve(self) -> None:
        self.used -= self.file_bytes


class Index:
    def __init__(self, policy, stats):
        self.lock = lock_order.ordered(threading.RLock(), lock_order.STORE, "store")
        self.cond = threading.Condition(self.lock)  # host blocks came free, a write or a resolution ended
        self.policy = policy
        self.stats = stats
        # Least recently used first (touch moves one to the end): the order policies get candidates in.
        self.convs: dict[str, Conversation] = {}
        self.unfinished: set[Conversation] = set()  # conversations not yet done with their directory
        self.dir_users: dict[str, int] = {}  # such conversations per directory
        self.leases = 0  # open leases of every conversation
        self.writing = 0  # chunk writes in flight (any conversation)
        self.gen = 0  # the newest save generation given out or found on disk
        self.host = None  # the block pool (try_alloc, capacity, used), once attached
        self.chunk_tokens = 0  # tokens per chunk, once attached
        self.disk: DiskSpace | None = None  # None: no disk tier
        self.disk_error: str | None = None  # the disk failed: new KV stays in host memory
        self.closing = False  # close() began: every call raises "the store is closed"
        self.attached = False  # bound to a model (AttentionStore.attach)
        self.open = weakref.WeakSet()  # open loads and appends, for close() to end
        self._warned_no_victim = False

    # ---- the store's own state -----------------------------------------------------

    def check_open(self) -> None:
        if self.closing:
            raise ValueError("the store is closed")

    def check_ready(self) -> None:
        self.check_open()
        if not self.attached:
            raise ValueError("the store is not attached to a model yet: call attach(spec) or cachedattn.patch()")

    def register(self, obj) -> None:
        """An open load or append, for close() to end (takes the lock)."""
        with self.lock:
            self.check_open()
            self.open.add(obj)

    # ---- conversations -----------------------------------------------------------

    def get(self, conv_id, required: bool = True) -> Conversation | None:
        conv = self.convs.get(conv_id) if isinstance(conv_id, str) else None
        if conv is None and required:
            keys.validate_conversation_id(conv_id)
            raise KeyError(f"unknown conversation {conv_id!r}")
        return conv

    def touch(self, conv: Conversation) -> None:
        """conv was looked up, loaded or saved: it becomes the most recently used."""
        if self.convs.get(conv.id) is conv:
            del self.convs[conv.id]
            self.convs[conv.id] = conv

    def new_conversation(self, conv_id: str, root: bytes, dirname: str | None = None) -> Conversation:
        dirname = dirname or keys.conversation_dirname(conv_id)
        conv = Conversation(conv_id, dirname, root)
        self.convs[conv_id] = conv
        self.unfinished.add(conv)
        self.dir_users[dirname] = self.dir_users.get(dirname, 0) + 1
        self.policy.on_insert(conv_id)
        return conv

    def next_gen(self) -> int:
        """The generation of a new save: above every one on disk and before it, also across
        restarts (the clock, and the newest found at open, whichever is later)."""
        self.gen = max(self.gen + 1, time.time_ns())
        return self.gen

    def lease(self, conv: Conversation, kind: str) -> Lease:
        """A new owner of conv ("append": its one writer) keeps it from eviction and its files from deletion."""
        if conv.state is ConvState.GONE:
            raise IllegalTransition(f"lease on gone conversation {conv.id!r}")
        lease = Lease(conv, kind)
        conv.owners += 1
        if kind == "append":
            conv.writer = lease
        self.leases += 1
        return lease

    def release(self, lease: Lease, plan: Plan) -> None:
        """An owner lets go (exactly once); files doomed while it could read them go with the last."""
        conv = lease.conv
        if lease.released:
            raise IllegalTransition(f"{lease.kind} lease on conversation {conv.id!r} released twice")
        lease.released = True
        conv.owners -= 1
        if conv.writer is lease:
            conv.writer = None
        self.leases -= 1
        if conv.owners == 0:
            for name in conv.doomed:
                self.delete_file(conv.dirname, name, plan)
            conv.doomed.clear()
        self.forget_if_empty(conv, plan)
        self.finish_if_done(conv, plan)
        self.cond.notify_all()

    def plan_load(self, conv_id, toks, n_tokens, limit, prefetch: bool) -> LoadPlan | None:
        """A load of conv_id's first n_tokens (load), of the longest stored prefix of toks (a lookup:
        None when nothing matches; at most `limit` tokens) or of every stored token (prefetch: None
        when all are in host memory or none is stored). It holds a reference to each host copy
        (let go by the load, or adopted by adopt_read) and a lease."""
        self.check_ready()
        conv = self.get(conv_id, required=False)
        if toks is not None:
            self.stats.add(lookups=1)
            if conv is None:
                return None
            n = common_prefix(conv.tokens(), toks)
            n = n if limit is None else min(n, max(0, int(limit)))
            if n == 0:
                return None
        elif prefetch:
            if conv is None or all(c.in_host for c in conv.chunks):
                return None
            n = conv.ntokens
        else:
            if conv is None:
                self.get(conv_id)  # raises the right error
            if isinstance(n_tokens, bool) or not 0 <= n_tokens <= conv.ntokens:
                raise ValueError(f"n_tokens={n_tokens}: conversation {conv_id!r} has {conv.ntokens} tokens stored")
            n = int(n_tokens)
        chunks = conv.chunks[: -(-n // self.chunk_tokens)]
        held = {i: c.host.acquire() for i, c in enumerate(chunks) if c.in_host}
        lease = self.lease(conv, "prefetch" if prefetch else "load")
        self.touch(conv)
        return LoadPlan(conv, lease, n, chunks, held, [i for i in range(len(chunks)) if i not in held])

    def resolved(self, conv: Conversation, chunks: list[Chunk], stale: list[str], damaged: int, lease, plan: Plan) -> None:
        """The headers of a conversation found at open were read: its chain, and the files left over."""
        conv.chunks = chunks
        conv.move(ConvState.READY)
        self.stats.add(corrupt_chunks=damaged)
        for name in stale:
            self.delete_file(conv.dirname, name, plan)
        self.release(lease, plan)

    def dir_unused(self, dirname: str) -> bool:
        with self.lock:
            return dirname not in self.dir_users

    # ---- saves -------------------------------------------------------------------

    def replace_tail(self, conv: Conversation, first: int, new: list[Chunk], plan: Plan) -> None:
        """A save: `new` takes the place of the chunks from `first` on. The replaced chunks'
        files stay (superseded) until every current chunk has its file (settle)."""
        for old in conv.chunks[first:]:
            self.retire(conv, old, plan, replaced=True)
        conv.chunks = conv.chunks[:first] + new
        self.settle(conv, plan)  # a pure truncation: the kept chunks may all be on disk already
        self.touch(conv)

    def adopt_read(self, conv: Conversation, c: Chunk, block) -> bool:
        """A load read a DISK chunk whole into `block`: it becomes the chunk's host copy."""
        if c.state is S.DISK and conv.state is ConvState.READY:
            c.host = block
            c.move(S.HOST_DISK)
            return True
        return False

    # ---- host memory ---------------------------------------------------------------

    def host_free(self) -> int:
        return self.host.capacity() - self.host.used()

    def _demotable(self, conv: Conversation, background: bool) -> bool:
        if background:  # only what goes at once and loses nothing
            return any(c.state is S.HOST_DISK for c in conv.chunks)
        return any(c.state in (S.HOST, S.HOST_DISK, S.WRITING) for c in conv.chunks)

    def host_victim(self, exclude=(), background: bool = False) -> Conversation | None:
        cands = [
            cid
            for cid, c in self.convs.items()
            if cid not in exclude and c.owners == 0 and c.state is ConvState.READY and self._demotable(c, background)
        ]
        cid = self.policy.victim(cands, "host")
        return None if cid is None else self.convs[cid]

    def demote(self, conv: Conversation, plan: Plan, drop_unwritable: bool, at_once_only: bool = False) -> None:
        """Host copies go: at once where the chunk is on disk, after its write where one is
        in flight or can start (plan.writes). A chunk that cannot be written stays, unless
        drop_unwritable (eviction for room): then it and what follows go.
        at_once_only: only what goes at once (a store thread must not start writes and wait)."""
        lost = None
        for i, c in enumerate(conv.chunks):
            if c.state is S.HOST_DISK:
                self._drop_host_copy(c)
                c.move(S.DISK)
            elif at_once_only:
                continue
            elif c.state is S.WRITING:
                c.move(S.DEMOTING)
            elif c.state is S.HOST:
                if self.disk_usable() and self.reserve_disk(conv, plan):
                    c.move(S.DEMOTING)
                    plan.writes.append(self._start_write(conv, c))
                elif drop_unwritable:
                    lost = i
                    break
        if lost is not None:
            self.stats.add(host_evictions=sum(1 for c in conv.chunks[lost:] if c.in_host))
            self.truncate(conv, lost, plan)

    def _drop_host_copy(self, c: Chunk) -> None:
        c.host.release()
        c.host = None
        self.stats.add(host_evictions=1)
        self.cond.notify_all()

    # ---- writes --------------------------------------------------------------------

    def disk_usable(self) -> bool:
        return self.disk is not None and self.disk_error is None

    def reserve_disk(self, conv: Conversation, plan: Plan) -> bool:
        """Room for one chunk file, evicting other conversations' files (policy order) if needed."""
        if self.disk.reserve():
            return True
        self.make_disk_room(self.disk.file_bytes, plan, exclude=conv)
        if self.disk.reserve():
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

    def start_writes(self, conv: Conversation, chunks: list[Chunk]) -> list:
        """Writes of chunks created WRITING (their files staged by an append); reserved already."""
        return [self._start_write(conv, c) for c in chunks]

    def write_through(self, conv: Conversation, c: Chunk, plan: Plan) -> bool:
        """Write-through of one HOST chunk (plan.queued), when the disk can take it."""
        if not self.disk_usable() or not self.reserve_disk(conv, plan):
            return False
        c.move(S.WRITING)
        plan.queued.append(self._start_write(conv, c))
        return True

    def written(self, conv: Conversation, c: Chunk, name: str | None, err: OSError | None, plan: Plan) -> None:
        """Records the end of a chunk write (the executor reports it), re-checking what changed meanwhile."""
        conv.writes -= 1
        self.writing -= 1
        if err is not None:
            self.disk.unreserve()
            self.disk_failed(err, "writing")
            if c.state in WRITE_IN_FLIGHT:
                c.move(S.HOST)  # the host copy is now the only one: it stays
        elif c.state is S.DROPPED:  # replaced or dropped while being written
            if conv.state is ConvState.READY and not conv.all_on_disk():
                conv.superseded.append(name)  # maybe part of the newest complete save: kept as long as older ones
            else:
                self.delete_file(conv.dirname, name, plan)
        else:
            c.file = name
            self.stats.add(disk_bytes_written=self.disk.file_bytes)
            if c.state is S.WRITING:
                c.move(S.HOST_DISK)
            else:
                self._drop_host_copy(c)
                c.move(S.DISK)
        self.settle(conv, plan)
        self.cond.notify_all()
        self.finish_if_done(conv, plan)

    def disk_failed(self, e: OSError, what: str) -> None:
        with self.lock:
            if what == "writing":
                self.stats.add(write_errors=1)
            if self.disk_error is None:
                self.disk_error = f"{e.strerror or e} ({e.filename})"
                log.warning(
                    "cachedattn: %s the disk tier failed (%s); continuing with host memory only, "
                    "KV already in host memory is kept",
                    what,
                    self.disk_error,
                )

    # ---- disk space ------------------------------------------------------------------

    def make_disk_room(self, need: int, plan: Plan, exclude: Conversation | None = None) -> bool:
        d = self.disk
        while d.used + need > d.capacity:
            cands = [
                cid
                for cid, c in self.convs.items()
                if c is not exclude and c.owners == 0 and (c.state is ConvState.FOUND or c.superseded or c.disk_chunks())
            ]
            cid = self.policy.victim(cands, "disk")
            if cid is None:
                return False
            self._evict_disk(self.convs[cid], plan)
        return True

    def _evict_disk(self, conv: Conversation, plan: Plan) -> None:
        if conv.state is ConvState.FOUND:  # never opened since the restart: goes whole
            self.stats.add(disk_evictions=len(conv.found))
            self.forget(conv, plan)
            return
        files = len(conv.disk_chunks()) + len(conv.superseded)
        self._doom_superseded(conv, plan)  # eviction gives up the older save first
        lost = None
        for i, c in enumerate(conv.chunks):
            if c.state is S.HOST_DISK:  # its host copy stays
                name, c.file = c.file, None
                c.move(S.HOST)
                self.delete_file(conv.dirname, name, plan)
            elif c.state is S.DISK and lost is None:
                lost = i
        if lost is not None:
            self.truncate(conv, lost, plan)  # the conversation stays a prefix: from its first chunk gone on
        self.stats.add(disk_evictions=files)

    def delete_file(self, dirname: str, name: str, plan: Plan) -> None:
        """A chunk file goes: its space now, the file when the plan runs."""
        self.disk.unreserve()
        plan.deletes.append((dirname, name))

    def _doom(self, conv: Conversation, name: str, plan: Plan) -> None:
        """A file of this conversation goes, once no open load may still read it."""
        if conv.owners:
            conv.doomed.append(name)
        else:
            self.delete_file(conv.dirname, name, plan)

    # ---- losing chunks -------------------------------------------------------------

    def retire(self, conv: Conversation, c: Chunk, plan: Plan, replaced: bool = False) -> None:
        """Takes a chunk out of every tier (a write in flight deletes its own file when it ends).
        replaced: a save put another chunk in its place; its file stays, superseded, until
        every current chunk of the conversation has its file (settle)."""
        if c.in_host:
            c.host.release()
            c.host = None
            self.cond.notify_all()
        name = c.file if c.on_disk else None
        c.move(S.DROPPED)  # c.file stays: loads opened before may still name it (it is deleted once they end)
        if name is not None:
            if replaced:
                conv.superseded.append(name)
            else:
                self._doom(conv, name, plan)

    def settle(self, conv: Conversation, plan: Plan) -> None:
        """Superseded files go once the conversation's current chunks are all on disk: until
        then they are the last complete save that a crash must not lose."""
        if conv.superseded and conv.state is ConvState.READY and conv.all_on_disk():
            self._doom_superseded(conv, plan)

    def _doom_superseded(self, conv: Conversation, plan: Plan) -> None:
        for name in conv.superseded:
            self._doom(conv, name, plan)
        conv.superseded.clear()

    def truncate(self, conv: Conversation, index: int, plan: Plan) -> None:
        for c in conv.chunks[index:]:
            self.retire(conv, c, plan)
        conv.chunks = conv.chunks[:index]
        self.forget_if_empty(conv, plan)

    def bad_chunk(self, conv: Conversation, c: Chunk, why: str, plan: Plan) -> None:
        """A chunk failed its checksum or could not be read: it and what follows go."""
        log.warning("cachedattn: chunk %d of conversation %r is bad (%s); removed", c.index, conv.id, why)
        self.stats.add(corrupt_chunks=1, disk_misses=1)
        if conv.state is ConvState.READY and c.state is not S.DROPPED and c in conv.chunks:
            self.truncate(conv, conv.chunks.index(c), plan)

    def forget_if_empty(self, conv: Conversation, plan: Plan) -> None:
        if conv.state is ConvState.READY and not conv.chunks and conv.owners == 0:
            self.forget(conv, plan)

    def forget(self, conv: Conversation, plan: Plan) -> None:
        """Out of the index for good; what it holds goes as soon as no owner needs it."""
        found = conv.found if conv.state is ConvState.FOUND else None
        conv.move(ConvState.GONE)
        for c in conv.chunks:
            if c.state is not S.DROPPED:
                self.retire(conv, c, plan)
        conv.chunks = []
        for *_, name in found or ():
            self._doom(conv, name, plan)
        conv.found = None
        self._doom_superseded(conv, plan)
        if self.convs.get(conv.id) is conv:
            del self.convs[conv.id]
            self.policy.on_remove(conv.id)
        self.finish_if_done(conv, plan)

    def finish_if_done(self, conv: Conversation, plan: Plan) -> None:
        """A gone conversation with no owner and no write in flight lets go of its directory."""
        if conv.state is not ConvState.GONE or conv.owners or conv.writes or conv not in self.unfinished:
            return
        self.unfinished.discard(conv)
        self.dir_users[conv.dirname] -= 1
        if self.dir_users[conv.dirname] == 0:
            del self.dir_users[conv.dirname]
            if self.disk is not None:
                plan.rmdirs.append(conv.dirname)
