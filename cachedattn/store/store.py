"""AttentionStore: every conversation's KV cache between turns, in host memory
and on disk, found again by its token ids.

One lock guards the index: conversations, their chunks' states (state.py),
tier occupancy. It is held only for bookkeeping, never for I/O: whatever
must touch a file is decided and marked under it, done after it is released,
and recorded under it again (tiering.py). So a lookup never waits for a disk.

The parts, by composition: the tiers (HostTier, DiskBackend: one interface,
tier.py), the Mover (tiering.py: the one place that moves chunks between
tiers and asks the eviction policy), the Reader (loads, prefetches) and the
Writer (appends). Blocks are reference counted, so a block under a read or
write in flight is never handed to anyone else; conversations are leased by
their open loads and appends, so nothing they read is deleted under them.
"""

from __future__ import annotations

import logging
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from cachedattn import native
from cachedattn.store import keys
from cachedattn.store.config import StoreConfig
from cachedattn.store.conversation import Conversation, common_prefix
from cachedattn.store.disk_backend import DiskBackend
from cachedattn.store.disk_tier import DirectoryLock, DiskTier
from cachedattn.store.eviction import EvictionPolicy, make_policy
from cachedattn.store.host_tier import HostTier
from cachedattn.store.load import KVLoad
from cachedattn.store.reads import Reader, done_future
from cachedattn.store.recovery import read_chain
from cachedattn.store.remote_sync import RemoteSync
from cachedattn.store.remote_tier import RemoteTier, RemoteUnavailable
from cachedattn.store.spec import ChunkGeometry, KVSpec
from cachedattn.store.state import ConvState
from cachedattn.store.stats import StoreStats
from cachedattn.store.tiering import Mover, mark_store_thread
from cachedattn.store.writes import Writer

log = logging.getLogger("cachedattn")


class _Critical:
    """The store lock; I/O queued under it (_after_lock) runs once the outermost holder lets go."""

    def __init__(self, lock: threading.RLock):
        self.lock = lock
        self.local = threading.local()

    def __enter__(self):
        self.lock.acquire()
        self.local.depth = getattr(self.local, "depth", 0) + 1
        return self

    def __exit__(self, *exc):
        self.local.depth -= 1
        ops = None
        if self.local.depth == 0:
            ops, self.local.ops = getattr(self.local, "ops", None), None
        self.lock.release()
        for fn, args in ops or ():
            fn(*args)

    def after(self, fn, *args) -> None:
        if getattr(self.local, "depth", 0) == 0:
            raise RuntimeError("_after_lock outside the store lock")
        if getattr(self.local, "ops", None) is None:
            self.local.ops = []
        self.local.ops.append((fn, args))


def _release_resources(executor: ThreadPoolExecutor, dirlock: DirectoryLock | None, wait: bool) -> None:
    """What a store holds beyond memory. Also run when a store is collected without close():
    then nothing is queued on its threads any more (queued work keeps a store alive)."""
    try:
        executor.shutdown(wait=wait)
    finally:
        if dirlock is not None:
            dirlock.release()


class AttentionStore:
    """The tiered KV store. See README.md ("The KV store") for layout and guarantees."""

    def __init__(
        self,
        host_bytes=None,
        disk_dir=None,
        disk_bytes=None,
        chunk_tokens=None,
        *,
        config: StoreConfig | None = None,
        spec: KVSpec | None = None,
        eviction: str | EvictionPolicy | None = None,
        **fields,
    ):
        self._closing = self._closed = True  # until fully built: a half-built store refuses every call
        given = dict(host_bytes=host_bytes, disk_dir=disk_dir, disk_bytes=disk_bytes, chunk_tokens=chunk_tokens)
        given = {k: v for k, v in {**given, **fields}.items() if v is not None}
        if config is not None and given:
            raise ValueError(f"pass either config= or fields, not both (got fields {sorted(given)})")
        self.config = config if config is not None else StoreConfig(**given)
        self.policy = make_policy(eviction if eviction is not None else self.config.eviction)
        self._stats = StoreStats()
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)  # host blocks came free, a write or a resolution ended
        self._crit = _Critical(self._lock)
        self._convs: dict[str, Conversation] = {}
        self._unfinished: set[Conversation] = set()  # conversations not yet done with their directory
        self._dir_users: dict[str, int] = {}  # such conversations per directory
        self._pending: set[Future] = set()
        self._open = weakref.WeakSet()  # open loads and appends
        self._leases = 0
        self._disk_error: str | None = None
        self.spec: KVSpec | None = None
        self._geometry: ChunkGeometry | None = None
        self._host: HostTier | None = None
        self._disk: DiskTier | None = None  # the files
        self._disk_tier: DiskBackend | None = None  # the tier made of them
        self._engine = None
        self._remote: RemoteSync | None = None  # the shared Redis tier, when configured
        self._mover, self._reader, self._writer = Mover(self), Reader(self), Writer(self)
        dirlock = DirectoryLock(self.config.disk_dir) if self.config.disk_dir else None
        self._executor = ThreadPoolExecutor(self.config.io_threads, thread_name_prefix="cachedattn-store")
        self._finalizer = weakref.finalize(self, _release_resources, self._executor, dirlock, False)
        self._closing = self._closed = False
        try:
            if spec is not None:
                self.attach(spec)
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_config(cls, config: StoreConfig, spec: KVSpec | None = None, **kw) -> AttentionStore:
        return cls(config=config, spec=spec, **kw)

    @classmethod
    def from_env(cls, spec: KVSpec | None = None, **overrides) -> AttentionStore:
        """Configured by CACHEDATTN_HOST_BYTES, CACHEDATTN_DISK_DIR, ... (see StoreConfig)."""
        return cls(config=StoreConfig.from_env(**overrides), spec=spec)

    # ---- model binding --------------------------------------------------------

    def attach(self, spec: KVSpec) -> None:
        """Binds the store to one model's KV layout; recovers its chunks from disk."""
        if self._same_model(spec):
            return
        cfg = self.config
        geo = ChunkGeometry(spec, cfg.chunk_tokens)
        if cfg.host_bytes < geo.block_bytes:
            raise ValueError(
                f"host_bytes: {cfg.host_bytes} is less than one chunk of this model ({geo.block_bytes} bytes "
                f"for {cfg.chunk_tokens} tokens); raise host_bytes or lower chunk_tokens"
            )
        host = HostTier(cfg.host_bytes, geo.block_bytes, cfg.hugepages)
        disk = None
        try:
            engine = native.io_engine(cfg.io_backend, threads=cfg.io_threads, pool=host.pool)
            found = {}
            if cfg.disk_dir:
                disk = DiskTier(cfg.disk_dir, spec.fingerprint, cfg.disk_bytes, geo, engine, cfg.sync_writes)
                if cfg.disk_bytes < disk.file_bytes:
                    raise ValueError(f"disk_bytes: {cfg.disk_bytes} is less than one chunk file ({disk.file_bytes})")
                found = disk.scan()  # I/O: before taking the lock
            with self._critical():
                self._check_open()
                if self.spec is not None:  # attached by another thread meanwhile
                    raise _AlreadyAttached
                self.spec, self._geometry, self._host, self._engine = spec, geo, host, engine
                self._disk = disk
                self._disk_tier = DiskBackend(disk) if disk is not None else None
                for conv_id, (dirname, files) in found.items():
                    conv = self._new_conversation(conv_id, dirname)
                    conv.state, conv.found = ConvState.FOUND, files
                if cfg.remote:
                    self._remote = self._open_remote(spec, geo)
                if disk is not None:
                    self._mover.make_disk_room(need=0)
                    log.info("cachedattn: store opened %s with %d stored conversations", disk.root, len(self._convs))
        except _AlreadyAttached:
            self._discard(host, disk)
            self._same_model(spec)
        except BaseException:
            self._discard(host, disk)
            raise

    def _open_remote(self, spec: KVSpec, geo: ChunkGeometry) -> RemoteSync | None:
        cfg = self.config
        try:
            tier = RemoteTier(cfg.remote, spec.fingerprint, geo, self._stats, cfg.remote_timeout_s, cfg.remote_ttl_s)
        except RemoteUnavailable as e:  # said once, plainly; the store works without it
            log.warning("cachedattn: %s; continuing without the remote tier", e)
            return None
        # Queued chunks hold their host blocks: at most a quarter of host memory waits for Redis.
        return RemoteSync(self, tier, min(cfg.remote_inflight_bytes, cfg.host_bytes // 4))

    @staticmethod
    def _discard(host: HostTier, disk: DiskTier | None) -> None:
        """What a failed or redundant attach() made: the pinned pool now, the directory descriptors too."""
        host.close()
        if disk is not None:
            disk.close()

    def _same_model(self, spec: KVSpec) -> bool:
        with self._critical():
            self._check_open()
            if self.spec is None:
                return False
            if spec.fingerprint == self.spec.fingerprint:
                return True
            raise ValueError(
                f"this store holds KV of model {self.spec.fingerprint[:12]}; model {spec.fingerprint[:12]} "
                "needs a store of its own"
            )

    # ---- queries --------------------------------------------------------------

    def lookup(self, conv_id: str, token_ids) -> int:
        """How many leading tokens of token_ids have KV stored for this conversation."""
        toks = keys.as_token_array(token_ids)
        self._resolve(conv_id)
        self._from_remote(conv_id, toks)
        with self._critical():
            self._check_ready()
            self._stats.add(lookups=1)
            conv = self._get(conv_id, required=False)
            if conv is None:
                return 0
            self.policy.on_access(conv_id)
            return common_prefix(conv.tokens(), toks)

    def stored_tokens(self, conv_id: str) -> np.ndarray:
        self._resolve(conv_id)
        with self._critical():
            self._check_ready()
            return self._get(conv_id).tokens()

    def conversations(self) -> list[str]:
        with self._critical():
            self._check_open()
            return list(self._convs)

    def __contains__(self, conv_id: str) -> bool:
        self._resolve(conv_id)
        with self._critical():
            self._check_open()
            return self._get(conv_id, required=False) is not None

    # ---- reading and writing ----------------------------------------------------

    def load(self, conv_id: str, n_tokens: int, readahead: int | None = None) -> KVLoad:
        """Starts loading the KV of the first n_tokens; read it per layer from the returned KVLoad."""
        return self._reader.open(conv_id, n_tokens=n_tokens, readahead=readahead)

    def load_prefix(self, conv_id: str, token_ids, limit: int | None = None, readahead: int | None = None) -> KVLoad | None:
        """lookup + load in one step: a load of the longest stored prefix of token_ids (at most
        `limit` tokens), or None when nothing matches. Nothing can change the conversation
        between finding the prefix and opening its load."""
        keys.validate_conversation_id(conv_id)
        if self._remote is not None:
            self._resolve(conv_id)
            self._from_remote(conv_id, keys.as_token_array(token_ids))
        return self._reader.open(conv_id, token_ids=token_ids, limit=limit, readahead=readahead)

    def prefetch(self, conv_id: str) -> Future:
        """Brings a conversation from disk into host memory in the background; the future gives the
        chunks read (0 when there is nothing to bring in, or the conversation is gone). It never
        waits for host memory: when none can be freed at once it fails with HostMemoryFull."""
        return self._reader.prefetch(conv_id)

    def prefetch_remote(self, conv_id: str, token_ids) -> Future:
        """Brings the chunks the remote tier holds beyond what is stored here for this prefix of
        token_ids into host memory in the background (what a lookup would fetch, ahead of it);
        the future gives the chunks adopted (0 without a remote tier or when it has none)."""
        keys.validate_conversation_id(conv_id)
        toks = keys.as_token_array(token_ids)
        if self._remote is None:
            return done_future(0)

        def job() -> int:
            self._resolve(conv_id)
            return self._remote.fill(conv_id, toks)

        return self._submit(job)

    def begin_append(self, conv_id: str, token_ids, start: int):
        """Starts storing the KV of token_ids[start:]; token_ids[:start] must be stored already.

        Stored tokens from `start` on (a diverged or regenerated tail) are replaced at commit.
        """
        return self._writer.begin_append(conv_id, token_ids, start)

    def append(self, conv_id: str, token_ids, kv, start: int = 0) -> Future:
        """begin_append + put every layer + commit, in one call."""
        with self.begin_append(conv_id, token_ids, start) as txn:
            txn.put(kv)
            return txn.commit()

    # ---- management -----------------------------------------------------------

    def demote(self, conv_id: str) -> None:
        """Moves a conversation out of host memory onto disk (writing what is not there yet).
        KV that cannot be written (the disk failed or is full) stays in host memory."""
        self._resolve(conv_id)
        with self._critical():
            self._check_ready()
            conv = self._get(conv_id)
            if self._disk_tier is None:
                raise ValueError("this store has no disk tier: demoting would drop the KV (use drop())")
            if conv.owners:
                raise ValueError(f"conversation {conv_id!r} is in use by an open load or append")
            writes = self._mover.plan_demote(conv, drop_unwritable=False)
        self._mover.run_writes(writes)

    def drop(self, conv_id: str) -> None:
        """Forgets a conversation in every tier (open loads keep what they hold)."""
        self._resolve(conv_id)
        with self._critical():
            self._check_ready()
            self._mover.forget(self._get(conv_id))

    # ---- what the scheduler needs to know ---------------------------------------

    def residency(self, conv_id: str) -> dict[str, int]:
        """Bytes of a conversation's KV (whole chunks) in host memory and only on disk; zeros if unknown."""
        self._resolve(conv_id)
        with self._critical():
            self._check_ready()
            conv = self._get(conv_id, required=False)
            if conv is None:
                return {"tokens": 0, "host_bytes": 0, "disk_only_bytes": 0}
            b = self._geometry.block_bytes
            host = sum(1 for c in conv.chunks if c.in_host)
            return {"tokens": conv.ntokens, "host_bytes": host * b, "disk_only_bytes": (len(conv.chunks) - host) * b}

    def host_free_bytes(self) -> int:
        with self._critical():
            self._check_ready()
            return self._host_free()

    def mean_conversation_bytes(self) -> float:
        """S_kv: the mean size of a stored conversation's KV (whole chunks), 0 when none is stored."""
        with self._critical():
            self._check_ready()
            chunks = [len(c.chunks) for c in self._convs.values() if c.state is ConvState.READY]
            return sum(chunks) * self._geometry.block_bytes / len(chunks) if chunks else 0.0

    def make_host_room(self, nbytes: int, protect: set[str] = frozenset()) -> int:
        """Demotes conversations (policy order, never those in `protect` or in use) until
        `nbytes` of host memory are free or nothing more can go; returns the free bytes."""
        return self._mover.make_host_room(nbytes, protect)

    @property
    def gpu_pinned(self) -> bool | None:
        """Whether the host tier's pool is page-locked for the GPU (a copy engine may DMA from its
        blocks); None before the store is attached to a model."""
        host = self._host
        return None if host is None else bool(host.pool.cuda_registered)

    #: Events a caller of the store (the model integration) counts with count().
    CALLER_EVENTS = ("recovered_turns", "skipped_saves")

    def count(self, name: str, n: int = 1) -> None:
        """Counts `n` events of a kind the store's callers report (see CALLER_EVENTS): a turn redone
        because a chunk failed while loading, a turn whose KV was not stored. Shows in stats()."""
        if name not in self.CALLER_EVENTS:
            raise ValueError(f"unknown event {name!r}; known: {self.CALLER_EVENTS}")
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an integer >= 0, got {n!r}")
        self._stats.add(**{name: n})

    def stats(self) -> dict:
        """Counters (see cachedattn.store.stats) plus what each tier holds now."""
        d = self._stats.snapshot()
        with self._critical():
            d["conversations"] = len(self._convs)
            for name, tier in (("host", self._host), ("disk", self._disk_tier)):
                if tier is not None:
                    d[name]["used_bytes"] = tier.used()
                    d[name]["capacity_bytes"] = tier.capacity()
            d["disk_error"] = self._disk_error
        return d

    def flush(self) -> None:
        """Waits until every write started so far is on disk (and in the remote tier, or given up)."""
        if self._remote is not None:
            self._remote.flush()
        while True:
            with self._critical():
                pending = list(self._pending)
            if not pending:
                return
            for f in pending:
                f.exception()  # waits; failures were already handled and logged

    def close(self) -> None:
        """Ends open loads and aborts open appends (later calls on them raise), finishes the
        writes in flight, and lets go of memory, files and the directory lock."""
        with self._critical():
            if self._closing:
                return
            self._closing = True  # from here on every call raises "the store is closed"
        try:
            for obj in list(self._open):
                obj._cancel()
            with self._critical():
                while self._leases:  # loads being opened right now: they give up at registration
                    self._cond.wait(timeout=0.05)
            self.flush()
            self._executor.shutdown(wait=True)
            if self._remote is not None:
                self._remote.close()  # its queue holds host blocks: before the pool goes
            with self._critical():
                for conv in self._convs.values():
                    for c in conv.chunks:
                        if c.host is not None:
                            c.host.release()
                            c.host = None
                self._closed = True
            if self._host is not None:
                self._host.close()  # the pinned region goes now, not when this object is collected
            # The io_uring engine keeps the region registered as fixed buffers: let it go too.
            self._engine = None
            if self._disk is not None:
                self._disk.engine = None
                self._disk.close()  # the directory descriptors
        finally:
            self._finalizer()

    def __enter__(self) -> AttentionStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals ------------------------------------------------------------

    def _critical(self) -> _Critical:
        return self._crit

    def _after_lock(self, fn, *args) -> None:
        self._crit.after(fn, *args)

    def _check_open(self) -> None:
        if self._closing:
            raise ValueError("the store is closed")

    def _check_ready(self) -> None:
        self._check_open()
        if self.spec is None:
            raise ValueError("the store is not attached to a model yet: call attach(spec) or cachedattn.patch()")

    def _host_free(self) -> int:
        return self._host.capacity() - self._host.used()

    def _get(self, conv_id: str, required: bool = True) -> Conversation | None:
        conv = self._convs.get(conv_id) if isinstance(conv_id, str) else None
        if conv is None and required:
            keys.validate_conversation_id(conv_id)
            raise KeyError(f"unknown conversation {conv_id!r}")
        return conv

    def _new_conversation(self, conv_id: str, dirname: str | None = None) -> Conversation:
        dirname = dirname or keys.conversation_dirname(conv_id)
        conv = Conversation(conv_id, dirname, keys.root_key(self.spec.fingerprint, conv_id))
        self._convs[conv_id] = conv
        self._unfinished.add(conv)
        self._dir_users[dirname] = self._dir_users.get(dirname, 0) + 1
        self.policy.on_insert(conv_id)
        return conv

    def _resolve(self, conv_id) -> None:
        """Reads the chunk headers of a conversation found at open, once, without the lock
        (its lookups wait meanwhile; nobody else does)."""
        if not isinstance(conv_id, str):
            return
        while True:
            with self._critical():
                conv = self._convs.get(conv_id)
                if conv is None or conv.state in (ConvState.READY, ConvState.GONE):
                    return
                if conv.state is ConvState.RESOLVING:
                    self._cond.wait(timeout=0.05)
                    continue
                self._check_open()
                conv.move(ConvState.RESOLVING)
                lease = self._lease(conv, "resolve")
                files, conv.found = conv.found, None
            try:
                chunks, stale, damaged = read_chain(self._disk, conv.id, conv.dirname, conv.root, files)
            except Exception as e:  # unexpected: keep nothing of it rather than fail the caller
                log.warning("cachedattn: cannot read the stored chunks of %r (%s); dropped", conv.id, e)
                chunks, stale, damaged = [], [name for *_, name in files], 0
            with self._critical():
                conv.chunks = chunks
                conv.move(ConvState.READY)
                self._stats.add(corrupt_chunks=damaged)
                for name in stale:
                    self._mover.delete_later(conv.dirname, name)
                self._release(lease)
                self._cond.notify_all()
            return

    def _from_remote(self, conv_id, toks) -> None:
        """Adopts what the remote tier holds beyond the local prefix of toks (nothing without one)."""
        if self._remote is None or not isinstance(conv_id, str) or self.spec is None:
            return
        try:
            self._remote.fill(conv_id, toks)
        except Exception as e:  # never the turn's failure: it goes on with what is local
            self._check_open()
            self._stats.add(remote_errors=1)
            log.warning("cachedattn: reading %r from the remote tier failed (%s: %s); served locally", conv_id, type(e).__name__, e)

    def _lease(self, conv: Conversation, kind: str):
        with self._critical():
            lease = conv.lease(kind)
            self._leases += 1
            return lease

    def _release(self, lease) -> None:
        with self._critical():
            lease.release()
            self._leases -= 1
            self._mover.released(lease.conv)
            self._cond.notify_all()

    def _register(self, obj) -> None:
        """An open load or append, for close() to end."""
        with self._critical():
            self._check_open()
            self._open.add(obj)

    def _disk_failed(self, e: OSError, what: str) -> None:
        with self._critical():
            if what == "writing":
                self._stats.add(write_errors=1)
            if self._disk_error is None:
                self._disk_error = f"{e.strerror or e} ({e.filename})"
                log.warning(
                    "cachedattn: %s the disk tier failed (%s); continuing with host memory only, "
                    "KV already in host memory is kept",
                    what,
                    self._disk_error,
                )

    def _submit(self, fn, *args) -> Future:
        def job():
            mark_store_thread()
            return fn(*args)

        fut = self._executor.submit(job)
        with self._critical():
            self._pending.add(fut)
        fut.add_done_callback(self._untrack)
        return fut

    def _untrack(self, fut: Future) -> None:
        with self._critical():
            self._pending.discard(fut)

    # Kept for tests and tools that cut a conversation at a chunk (what a bad read does).
    def _on_bad_chunk(self, conv: Conversation, chunk, why: str) -> None:
        self._mover.on_bad_chunk(conv, chunk, why)


class _AlreadyAttached(Exception):
    """Another thread attached this store while attach() read the disk outside the lock."""
