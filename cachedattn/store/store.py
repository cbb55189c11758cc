"""AttentionStore: every conversation's KV cache between turns, in host memory
and on disk, found again by its token ids.

One lock guards the index (conversations, chunks, tier occupancy). Disk I/O
runs outside it: writes on the store's threads, reads on the I/O engine; only
their bookkeeping takes the lock. Blocks are reference counted, so a block
under a read or write in flight is never handed to anyone else.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from cachedattn import native
from cachedattn.store import keys
from cachedattn.store.config import StoreConfig
from cachedattn.store.conversation import Conversation, common_prefix
from cachedattn.store.disk_tier import DirectoryLock, DiskTier
from cachedattn.store.eviction import EvictionPolicy, make_policy
from cachedattn.store.host_tier import HostTier
from cachedattn.store.recovery import resolve_chain
from cachedattn.store.spec import ChunkGeometry, KVSpec
from cachedattn.store.stats import StoreStats
from cachedattn.store.reads import ReadMixin
from cachedattn.store.tiering import TieringMixin
from cachedattn.store.writes import WriteMixin

log = logging.getLogger("cachedattn")



class AttentionStore(ReadMixin, WriteMixin, TieringMixin):
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
        given = dict(host_bytes=host_bytes, disk_dir=disk_dir, disk_bytes=disk_bytes, chunk_tokens=chunk_tokens)
        given = {k: v for k, v in {**given, **fields}.items() if v is not None}
        if config is not None and given:
            raise ValueError(f"pass either config= or fields, not both (got fields {sorted(given)})")
        self.config = config if config is not None else StoreConfig(**given)
        self.policy = make_policy(eviction if eviction is not None else self.config.eviction)
        self._stats = StoreStats()
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)  # signalled whenever host blocks come free
        self._convs: dict[str, Conversation] = {}
        self._pending: set[Future] = set()
        self._writing = 0  # chunks whose disk write is in flight
        self._disk_error: str | None = None
        self._closed = False
        self.spec: KVSpec | None = None
        self._geometry: ChunkGeometry | None = None
        self._host: HostTier | None = None
        self._disk: DiskTier | None = None
        self._dirlock = DirectoryLock(self.config.disk_dir) if self.config.disk_dir else None
        self._executor = ThreadPoolExecutor(self.config.io_threads, thread_name_prefix="cachedattn-store")
        if spec is not None:
            try:
                self.attach(spec)
            except BaseException:
                self.close()  # a failed constructor must not keep disk_dir locked
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
        with self._lock:
            self._check_open()
            if self.spec is not None:
                if spec.fingerprint == self.spec.fingerprint:
                    return
                raise ValueError(
                    f"this store holds KV of model {self.spec.fingerprint[:12]}; model {spec.fingerprint[:12]} "
                    "needs a store of its own"
                )
            cfg = self.config
            geo = ChunkGeometry(spec, cfg.chunk_tokens)
            if cfg.host_bytes < geo.block_bytes:
                raise ValueError(
                    f"host_bytes: {cfg.host_bytes} is less than one chunk of this model ({geo.block_bytes} bytes "
                    f"for {cfg.chunk_tokens} tokens); raise host_bytes or lower chunk_tokens"
                )
            host = HostTier(cfg.host_bytes, geo.block_bytes, cfg.hugepages)
            self._engine = native.io_engine(cfg.io_backend, threads=cfg.io_threads, pool=host.pool)
            disk = None
            if cfg.disk_dir:
                disk = DiskTier(cfg.disk_dir, spec.fingerprint, cfg.disk_bytes, geo, self._engine, cfg.sync_writes)
                if cfg.disk_bytes < disk.file_bytes:
                    raise ValueError(f"disk_bytes: {cfg.disk_bytes} is less than one chunk file ({disk.file_bytes})")
            self.spec, self._geometry, self._host, self._disk = spec, geo, host, disk
            if disk is not None:
                for conv_id, (dirname, files) in disk.scan().items():
                    conv = Conversation(conv_id, dirname, keys.root_key(spec.fingerprint, conv_id), unresolved=files)
                    self._convs[conv_id] = conv
                    self.policy.on_insert(conv_id)
                self._make_disk_room(need=0)
                log.info("cachedattn: store opened %s with %d stored conversations", disk.root, len(self._convs))

    # ---- queries --------------------------------------------------------------

    def lookup(self, conv_id: str, token_ids) -> int:
        """How many leading tokens of token_ids have KV stored for this conversation."""
        toks = keys.as_token_array(token_ids)
        with self._lock:
            self._check_ready()
            self._stats.add(lookups=1)
            conv = self._get(conv_id, required=False)
            if conv is None:
                return 0
            self.policy.on_access(conv_id)
            return common_prefix(conv.tokens(), toks)

    def stored_tokens(self, conv_id: str) -> np.ndarray:
        with self._lock:
            self._check_ready()
            return self._get(conv_id).tokens()

    def conversations(self) -> list[str]:
        with self._lock:
            return list(self._convs)

    def __contains__(self, conv_id: str) -> bool:
        with self._lock:
            return self._get(conv_id, required=False) is not None

    # ---- management -----------------------------------------------------------

    def demote(self, conv_id: str) -> None:
        """Moves a conversation out of host memory onto disk (writing what is not there yet)."""
        with self._lock:
            self._check_ready()
            conv = self._get(conv_id)
            if self._disk is None:
                raise ValueError("this store has no disk tier: demoting would drop the KV (use drop())")
            if conv.pins:
                raise ValueError(f"conversation {conv_id!r} is in use by an open load or append")
            self._demote(conv)

    def drop(self, conv_id: str) -> None:
        """Forgets a conversation in every tier (open loads keep what they hold)."""
        with self._lock:
            self._check_ready()
            conv = self._get(conv_id)
            self._truncate(conv, 0)
            self._forget(conv)

    # ---- what the scheduler needs to know ---------------------------------------

    def residency(self, conv_id: str) -> dict[str, int]:
        """Bytes of a conversation's KV (whole chunks) in host memory and only on disk; zeros if unknown."""
        with self._lock:
            self._check_ready()
            conv = self._get(conv_id, required=False)
            if conv is None:
                return {"tokens": 0, "host_bytes": 0, "disk_only_bytes": 0}
            b = self._geometry.block_bytes
            host = sum(1 for c in conv.chunks if c.host is not None)
            return {"tokens": conv.ntokens, "host_bytes": host * b, "disk_only_bytes": (len(conv.chunks) - host) * b}

    def host_free_bytes(self) -> int:
        with self._lock:
            self._check_ready()
            return (self._host.capacity_blocks - self._host.used_blocks) * self._host.block_bytes

    def mean_conversation_bytes(self) -> float:
        """S_kv: the mean size of a stored conversation's KV (whole chunks), 0 when none is stored."""
        with self._lock:
            self._check_ready()
            chunks = [len(c.chunks) for c in self._convs.values() if c.unresolved is None]
            return sum(chunks) * self._geometry.block_bytes / len(chunks) if chunks else 0.0

    def make_host_room(self, nbytes: int, protect: set[str] = frozenset()) -> int:
        """Demotes conversations (policy order, never those in `protect` or in use) until
        `nbytes` of host memory are free or nothing more can go; returns the free bytes."""
        with self._lock:
            self._check_ready()
            if self._disk is None or not self._disk_usable():
                return self.host_free_bytes()  # demoting would drop KV: leave it to allocation
            while self.host_free_bytes() < nbytes:
                cands = [
                    cid
                    for cid, c in self._convs.items()
                    if cid not in protect and c.pins == 0 and not c.appending and c.evictable_host_chunks()
                ]
                if not cands:
                    break
                self._demote(self._convs[self.policy.order(cands, "host")[0]])
            return self.host_free_bytes()

    def stats(self) -> dict:
        """Counters (see cachedattn.store.stats) plus what each tier holds now."""
        d = self._stats.snapshot()
        with self._lock:
            d["conversations"] = len(self._convs)
            if self._host is not None:
                d["host"]["used_bytes"] = self._host.used_blocks * self._host.block_bytes
                d["host"]["capacity_bytes"] = self._host.capacity_blocks * self._host.block_bytes
            if self._disk is not None:
                d["disk"]["used_bytes"] = self._disk.used
                d["disk"]["capacity_bytes"] = self._disk.capacity
            d["disk_error"] = self._disk_error
        return d

    def flush(self) -> None:
        """Waits until every write started so far is on disk."""
        while True:
            with self._lock:
                pending = list(self._pending)
            if not pending:
                return
            for f in pending:
                f.exception()  # waits; failures were already handled and logged

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        with self._lock:
            self._closed = True
        self._executor.shutdown(wait=True)
        with self._lock:
            # Let go of every host block now, so the pinned region is unmapped as soon as
            # no open load holds a block, not whenever this object is collected.
            for conv in self._convs.values():
                for c in conv.chunks:
                    if c.host is not None:
                        c.host.release()
                        c.host = None
            if self._host is not None:
                self._host.close()
            # The io_uring engine keeps the region registered as fixed buffers: let it go too.
            self._engine = None
            if self._disk is not None:
                self._disk.engine = None
                self._disk.close()
            if self._dirlock is not None:
                self._dirlock.release()

    def __enter__(self) -> AttentionStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals ------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the store is closed")

    def _check_ready(self) -> None:
        self._check_open()
        if self.spec is None:
            raise ValueError("the store is not attached to a model yet: call attach(spec) or cachedattn.patch()")

    def _get(self, conv_id: str, required: bool = True) -> Conversation | None:
        conv = self._convs.get(conv_id) if isinstance(conv_id, str) else None
        if conv is not None and conv.unresolved is not None:
            resolve_chain(self, conv)
            conv = self._convs.get(conv_id)
        if conv is None and required:
            keys.validate_conversation_id(conv_id)
            raise KeyError(f"unknown conversation {conv_id!r}")
        return conv

    def _track(self, fut: Future) -> Future:
        with self._lock:
            self._pending.add(fut)
        fut.add_done_callback(self._untrack)
        return fut

    def _untrack(self, fut: Future) -> None:
        with self._lock:
            self._pending.discard(fut)


