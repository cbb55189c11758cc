"""AttentionStore: every conversation's KV cache between turns, in host memory
and on disk, found again by its token ids.

The parts (core.py), by composition: the index (index.py: conversations,
chunk states, leases, the store lock; its transitions return plans), the
executor (executor.py: carries plans out with no lock held and reports
back), the block pool (block_pool.py) and the tiers that carry chunks into
and out of its blocks (tier.py: disk_tier.py, remote_tier.py). Loads
(load.py) and appends (append.py) are built from those parts. The lock is held only for bookkeeping, never for
I/O, so a lookup never waits for a disk. Blocks are reference counted, so a
block under a read or write in flight is never handed to anyone else;
conversations are leased by their open loads and appends, so nothing they
read is deleted under them.
"""

from __future__ import annotations

import logging
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from cachedattn import native
from cachedattn.store import keys
from cachedattn.store import queue_policies  # noqa: F401  (registers "queue" and "predictive")
from cachedattn.store.append import KVAppend, begin_append
from cachedattn.store.block_pool import BlockPool
from cachedattn.store.chunk_files import ChunkFiles, DirectoryLock, parse_version
from cachedattn.store.config import StoreConfig
from cachedattn.store.conversation import common_prefix
from cachedattn.store.core import Core
from cachedattn.store.disk_tier import DiskTier
from cachedattn.store.eviction import EvictionPolicy, make_policy
from cachedattn.store.index import DiskSpace, Plan
from cachedattn.store.load import KVLoad, done_future, open_load, prefetch
from cachedattn.store.remote_sync import RemoteSync
from cachedattn.store.remote_tier import RemoteTier, RemoteUnavailable
from cachedattn.store.spec import ChunkGeometry, KVSpec
from cachedattn.store.conversation import ConvState
from cachedattn.store.stats import StoreStats

log = logging.getLogger("cachedattn")
MAX_HOST_BLOCKS = (1 << 32) - 1  # the native pool numbers its blocks with 32 bits


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
        self._closed = True  # until fully built: a half-built store refuses every call
        given = dict(host_bytes=host_bytes, disk_dir=disk_dir, disk_bytes=disk_bytes, chunk_tokens=chunk_tokens)
        given = {k: v for k, v in {**given, **fields}.items() if v is not None}
        if config is not None and given:
            raise ValueError(f"pass either config= or fields, not both (got fields {sorted(given)})")
        self.config = config if config is not None else StoreConfig(**given)
        self.policy = make_policy(eviction if eviction is not None else self.config.eviction)
        self._stats = StoreStats()
        self._executor = ThreadPoolExecutor(self.config.io_threads, thread_name_prefix="cachedattn-store")
        self._core = core = Core(self.config, self.policy, self._stats, self._executor)
        self._index, self._exec = core.index, core.executor
        self._index.closing = True
        self.spec: KVSpec | None = None
        self._engine = None
        dirlock = DirectoryLock(self.config.disk_dir) if self.config.disk_dir else None
        self._finalizer = weakref.finalize(self, _release_resources, self._executor, dirlock, False)
        self._index.closing = self._closed = False
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
        if cfg.host_bytes // geo.block_bytes > MAX_HOST_BLOCKS:
            raise ValueError(
                f"host_bytes: {cfg.host_bytes} makes {cfg.host_bytes // geo.block_bytes} chunk blocks of "
                f"{geo.block_bytes} bytes, more than the limit of {MAX_HOST_BLOCKS}; "
                "raise chunk_tokens or lower host_bytes"
            )
        host = BlockPool(cfg.host_bytes, geo.block_bytes, cfg.hugepages)
        disk = None
        try:
            engine = native.io_engine(cfg.io_backend, threads=cfg.io_threads, pool=host.pool)
            found = {}
            if cfg.disk_dir:
                disk = ChunkFiles(cfg.disk_dir, spec.fingerprint, geo, engine, cfg.sync_writes)
                if cfg.disk_bytes < disk.file_bytes:
                    raise ValueError(f"disk_bytes: {cfg.disk_bytes} is less than one chunk file ({disk.file_bytes})")
                found = disk.scan()  # I/O: before taking the lock
            plan = Plan()
            ix = self._index
            with ix.lock:
                self._check_open()
                if self.spec is not None:  # attached by another thread meanwhile
                    raise _AlreadyAttached
                core = self._core
                self.spec = core.spec = spec
                core.geometry, core.pool, self._engine = geo, host, engine
                core.files, core.disk = disk, DiskTier(disk) if disk is not None else None
                ix.host, ix.chunk_tokens, ix.attached = host, geo.chunk_tokens, True
                self._exec.disk, self._exec.files, self._exec.host_bytes = core.disk, disk, cfg.host_bytes
                if disk is not None:
                    ix.disk = DiskSpace(cfg.disk_bytes, disk.file_bytes, sum(len(f) for _, f in found.values()))
                for conv_id, (dirname, files) in found.items():
                    conv = ix.new_conversation(conv_id, keys.root_key(spec.fingerprint, conv_id), dirname)
                    conv.state, conv.found = ConvState.FOUND, files
                    ix.gen = max([ix.gen] + [parse_version(name)[0] for *_, name in files])
                if cfg.remote:
                    core.remote = self._open_remote(spec, geo)
                if disk is not None:
                    ix.make_disk_room(0, plan)
                    log.info("cachedattn: store opened %s with %d stored conversations", disk.root, len(ix.convs))
            self._exec.run(plan)
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
        return RemoteSync(self._core, tier, min(cfg.remote_inflight_bytes, cfg.host_bytes // 4))

    @staticmethod
    def _discard(host: BlockPool, disk: ChunkFiles | None) -> None:
        """What a failed or redundant attach() made: the pinned pool now, the directory descriptors too."""
        host.close()
        if disk is not None:
            disk.close()

    def _same_model(self, spec: KVSpec) -> bool:
        with self._index.lock:
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
        return self.lookup_many([(conv_id, token_ids)])[0]

    def lookup_many(self, items, remote: bool = True) -> list[int]:
        """lookup() of several (conversation id, token ids) at once. What the remote tier holds beyond
        the local prefixes is found and read for all of them in two pipelined round trips (none when
        `remote` is False, or for a conversation held whole here): the vLLM connector keeps a request's
        blocks as one conversation each, found by content."""
        pairs = [(keys.validate_conversation_id(c), keys.as_token_array(t)) for c, t in items]
        for conv_id, _ in pairs:
            self._resolve(conv_id)
        if remote:
            self._from_remote_many(pairs)
        out = []
        with self._index.lock:
            self._check_ready()
            self._stats.add(lookups=len(pairs))
            for conv_id, toks in pairs:
                conv = self._index.get(conv_id, required=False)
                if conv is not None:
                    self._index.touch(conv)
                out.append(common_prefix(conv.tokens(), toks) if conv is not None else 0)
        return out

    def stored_tokens(self, conv_id: str) -> np.ndarray:
        self._resolve(conv_id)
        with self._index.lock:
            self._check_ready()
            return self._index.get(conv_id).tokens()

    def conversations(self) -> list[str]:
        with self._index.lock:
            self._check_open()
            return list(self._index.convs)

    def __contains__(self, conv_id: str) -> bool:
        self._resolve(conv_id)
        with self._index.lock:
            self._check_open()
            return self._index.get(conv_id, required=False) is not None

    # ---- reading and writing ----------------------------------------------------

    def load(self, conv_id: str, n_tokens: int, readahead: int | None = None) -> KVLoad:
        """Starts loading the KV of the first n_tokens; read it per layer from the returned KVLoad."""
        return open_load(self._core, conv_id, n_tokens=n_tokens, readahead=readahead)

    def load_prefix(self, conv_id: str, token_ids, limit: int | None = None, readahead: int | None = None) -> KVLoad | None:
        """lookup + load in one step: a load of the longest stored prefix of token_ids (at most
        `limit` tokens), or None when nothing matches. Nothing can change the conversation
        between finding the prefix and opening its load."""
        keys.validate_conversation_id(conv_id)
        if self._remote is not None:
            self._resolve(conv_id)
            self._from_remote(conv_id, keys.as_token_array(token_ids))
        return open_load(self._core, conv_id, token_ids=token_ids, limit=limit, readahead=readahead)

    def prefetch(self, conv_id: str) -> Future:
        """Brings a conversation from disk into host memory in the background; the future gives the
        chunks read (0 when there is nothing to bring in, or the conversation is gone). It never
        waits for host memory: when none can be freed at once it fails with HostMemoryFull."""
        return prefetch(self._core, conv_id)

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

        return self._core.submit(job)

    def begin_append(self, conv_id: str, token_ids, start: int) -> KVAppend:
        """Starts storing the KV of token_ids[start:]; token_ids[:start] must be stored already.

        Stored tokens from `start` on (a diverged or regenerated tail) are replaced at commit.
        """
        return begin_append(self._core, conv_id, token_ids, start)

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
        plan = Plan()
        with self._index.lock:
            self._check_ready()
            conv = self._index.get(conv_id)
            if self._core.disk is None:
                raise ValueError("this store has no disk tier: demoting would drop the KV (use drop())")
            if conv.owners:
                raise ValueError(f"conversation {conv_id!r} is in use by an open load or append")
            self._index.demote(conv, plan, drop_unwritable=False)
        self._exec.run(plan)

    def drop(self, conv_id: str) -> None:
        """Forgets a conversation in every tier (open loads keep what they hold)."""
        self._resolve(conv_id)
        plan = Plan()
        with self._index.lock:
            self._check_ready()
            self._index.forget(self._index.get(conv_id), plan)
        self._exec.run(plan)

    # ---- what the scheduler needs to know ---------------------------------------

    def residency(self, conv_id: str) -> dict[str, int]:
        """Bytes of a conversation's KV (whole chunks) in host memory and only on disk; zeros if unknown."""
        self._resolve(conv_id)
        with self._index.lock:
            self._check_ready()
            conv = self._index.get(conv_id, required=False)
            if conv is None:
                return {"tokens": 0, "host_bytes": 0, "disk_only_bytes": 0}
            b = self._geometry.block_bytes
            host = sum(1 for c in conv.chunks if c.in_host)
            return {"tokens": conv.ntokens, "host_bytes": host * b, "disk_only_bytes": (len(conv.chunks) - host) * b}

    def host_free_bytes(self) -> int:
        with self._index.lock:
            self._check_ready()
            return self._index.host_free()

    def mean_conversation_bytes(self) -> float:
        """S_kv: the mean size of a stored conversation's KV (whole chunks), 0 when none is stored."""
        with self._index.lock:
            self._check_ready()
            chunks = [len(c.chunks) for c in self._index.convs.values() if c.state is ConvState.READY]
            return sum(chunks) * self._geometry.block_bytes / len(chunks) if chunks else 0.0

    def make_host_room(self, nbytes: int, protect: set[str] = frozenset()) -> int:
        """Demotes conversations (policy order, never those in `protect` or in use) until
        `nbytes` of host memory are free or nothing more can go; returns the free bytes."""
        with self._index.lock:
            self._check_ready()
        return self._exec.make_host_room(nbytes, protect)

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
        ix = self._index
        with ix.lock:
            d["conversations"] = len(ix.convs)
            if ix.host is not None:
                d["host"]["used_bytes"] = ix.host.used()
                d["host"]["capacity_bytes"] = ix.host.capacity()
            if ix.disk is not None:
                d["disk"]["used_bytes"] = ix.disk.used
                d["disk"]["capacity_bytes"] = ix.disk.capacity
            d["disk_error"] = ix.disk_error
        return d

    def flush(self) -> None:
        """Waits until every write started so far is on disk (and in the remote tier, or given up)."""
        if self._remote is not None:
            self._remote.flush()
        while True:
            with self._index.lock:
                pending = list(self._core.pending)
            if not pending:
                return
            for f in pending:
                f.exception()  # waits; failures were already handled and logged

    def close(self) -> None:
        """Ends open loads and aborts open appends (later calls on them raise), finishes the
        writes in flight, and lets go of memory, files and the directory lock."""
        ix = self._index
        with ix.lock:
            if ix.closing:
                return
            ix.closing = True  # from here on every call raises "the store is closed"
        try:
            for obj in list(self._index.open):
                obj._cancel()
            with ix.lock:
                while ix.leases:  # loads being opened right now: they give up at registration
                    ix.cond.wait(timeout=0.05)
            self.flush()
            self._executor.shutdown(wait=True)
            if self._remote is not None:
                self._remote.close()  # its queue holds host blocks: before the pool goes
            with ix.lock:
                for conv in ix.convs.values():
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

    def _check_open(self) -> None:
        self._index.check_open()

    def _check_ready(self) -> None:
        self._index.check_ready()

    def _resolve(self, conv_id) -> None:
        self._exec.resolve(conv_id)

    # What tests, tools and the serving engine read (the parts, by their old names).
    @property
    def _geometry(self) -> ChunkGeometry | None:
        return self._core.geometry

    @property
    def _host(self) -> BlockPool | None:
        return self._core.pool

    @property
    def _disk(self) -> ChunkFiles | None:
        return self._core.files

    @property
    def _remote(self) -> RemoteSync | None:
        return self._core.remote

    def _from_remote(self, conv_id, toks) -> None:
        """Adopts what the remote tier holds beyond the local prefix of toks (nothing without one)."""
        if isinstance(conv_id, str):
            self._from_remote_many([(conv_id, toks)])

    def _from_remote_many(self, pairs) -> None:
        if self._remote is None or self.spec is None or not pairs:
            return
        try:
            self._remote.fill_many(pairs)
        except Exception as e:  # never the turn's failure: it goes on with what is local
            self._check_open()
            self._stats.add(remote_errors=1)
            log.warning("cachedattn: reading %r from the remote tier failed (%s: %s); served locally", pairs[0][0], type(e).__name__, e)

    # Kept for tests and tools that cut a conversation at a chunk (what a bad read does).
    def _on_bad_chunk(self, conv, chunk, why: str) -> None:
        self._exec.bad_chunk(conv, chunk, why)


class _AlreadyAttached(Exception):
    """Another thread attached this store while attach() read the disk outside the lock."""
