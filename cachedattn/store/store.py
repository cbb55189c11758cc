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
from cachedattn.store.append import KVAppend
from cachedattn.store.chunk_file import ChunkHeader, file_name, layer_checksum
from cachedattn.store.config import StoreConfig
from cachedattn.store.conversation import Chunk, Conversation, common_prefix
from cachedattn.store.disk_tier import DirectoryLock, DiskTier
from cachedattn.store.eviction import EvictionPolicy, make_policy
from cachedattn.store.host_tier import HostTier
from cachedattn.store.load import KVLoad
from cachedattn.store.recovery import resolve_chain
from cachedattn.store.spec import ChunkGeometry, KVSpec
from cachedattn.store.stats import StoreStats
from cachedattn.store.tiering import TieringMixin

log = logging.getLogger("cachedattn")


def _done(value=None) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


class AttentionStore(TieringMixin):
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
        self._convs: dict[str, Conversation] = {}
        self._pending: set[Future] = set()
        self._disk_error: str | None = None
        self._closed = False
        self.spec: KVSpec | None = None
        self._geometry: ChunkGeometry | None = None
        self._host: HostTier | None = None
        self._disk: DiskTier | None = None
        self._dirlock = DirectoryLock(self.config.disk_dir) if self.config.disk_dir else None
        self._executor = ThreadPoolExecutor(self.config.io_threads, thread_name_prefix="cachedattn-store")
        if spec is not None:
            self.attach(spec)

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

    # ---- reading --------------------------------------------------------------

    def load(self, conv_id: str, n_tokens: int, readahead: int | None = None, _prefetch: bool = False) -> KVLoad:
        """Starts loading the KV of the first n_tokens; read it per layer from the returned KVLoad."""
        with self._lock:
            self._check_ready()
            conv = self._get(conv_id)
            if not 0 <= n_tokens <= conv.ntokens:
                raise ValueError(f"n_tokens={n_tokens}: conversation {conv_id!r} has {conv.ntokens} tokens stored")
            C = self._geometry.chunk_tokens
            chunks = conv.chunks[: -(-n_tokens // C)]
            from_disk = [i for i, c in enumerate(chunks) if c.host is None]
            conv.pins += 1
            try:
                fresh = self._alloc_blocks(len(from_disk), exclude=conv)
            except BaseException:
                conv.pins -= 1
                raise
            fresh_iter = iter(fresh)
            blocks = [c.host.acquire() if c.host is not None else next(fresh_iter) for c in chunks]
            self.policy.on_access(conv_id)
            self._stats.add(host_hits=len(chunks) - len(from_disk), host_misses=len(from_disk))
            if not _prefetch:
                self._stats.add(tokens_reused=n_tokens)
        try:
            ld = KVLoad(self, conv, n_tokens, chunks, blocks, from_disk, readahead)
        except BaseException:
            self._finish_blocks(conv, chunks, blocks, from_disk, adopt=False)
            raise
        ld._prefetch = _prefetch
        return ld

    def prefetch(self, conv_id: str) -> Future:
        """Brings a conversation from disk into host memory in the background; the future gives the chunks read."""
        with self._lock:
            self._check_ready()
            conv = self._get(conv_id)
            if all(c.host is not None for c in conv.chunks):
                return _done(0)
            n = conv.ntokens

        def job() -> int:
            with self.load(conv_id, n, _prefetch=True) as ld:
                ld.read_all()
                return ld.from_disk

        return self._track(self._executor.submit(job))

    def _finish_load(self, ld: KVLoad, whole: bool) -> None:
        adopted = self._finish_blocks(ld._conv, ld._chunks, ld._blocks, ld._disk_pos, adopt=whole)
        if whole:
            self._stats.add(disk_hits=len(ld._disk_pos))
        if ld._prefetch:
            self._stats.add(host_prefetches=adopted)

    def _finish_blocks(self, conv, chunks, blocks, from_disk, adopt: bool) -> int:
        """Chunks read whole from disk stay in host memory; every other reference is let go."""
        adopted = 0
        disk_set = set(from_disk)
        with self._lock:
            for pos, (c, b) in enumerate(zip(chunks, blocks)):
                if adopt and pos in disk_set and c.live and c.host is None:
                    c.host = b  # this load's reference becomes the chunk's own
                    adopted += 1
                else:
                    b.release()
            conv.pins -= 1
            self._forget_if_empty(conv)
        return adopted

    # ---- writing --------------------------------------------------------------

    def begin_append(self, conv_id: str, token_ids, start: int) -> KVAppend:
        """Starts storing the KV of token_ids[start:]; token_ids[:start] must be stored already.

        Stored tokens from `start` on (a diverged or regenerated tail) are replaced at commit.
        """
        toks = keys.as_token_array(token_ids)
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or not 0 <= start <= len(toks):
            raise ValueError(f"start={start!r} must be an integer in [0, {len(toks)}]")
        start = int(start)
        with self._lock:
            self._check_ready()
            conv = self._get(conv_id, required=False)
            if conv is None:
                conv_id = keys.validate_conversation_id(conv_id)
                conv = Conversation(
                    conv_id, keys.conversation_dirname(conv_id), keys.root_key(self.spec.fingerprint, conv_id)
                )
                self._convs[conv_id] = conv
                self.policy.on_insert(conv_id)
            if conv.appending:
                raise ValueError(f"conversation {conv_id!r} already has an append in progress")
            stored = common_prefix(conv.tokens(), toks)
            if start > stored:
                raise ValueError(
                    f"start={start}, but only the first {stored} of these tokens are stored for {conv_id!r}: "
                    f"the KV of tokens [{stored}, {start}) would be missing"
                )
            C = self._geometry.chunk_tokens
            first = start // C
            conv.appending = True
            conv.pins += 1
            blocks = []
            try:
                blocks = self._alloc_blocks(-(-len(toks) // C) - first, exclude=conv)
                if start % C and blocks:
                    self._copy_chunk(conv, conv.chunks[first], blocks[0])
                staged = None
                if self.config.write_through and len(toks) > start:
                    staged = self._stage_writes(conv, len(blocks))
            except BaseException:
                for b in blocks:
                    b.release()
                conv.appending = False
                conv.pins -= 1
                self._forget_if_empty(conv)
                raise
            return KVAppend(self, conv, toks, start, blocks, staged)

    def append(self, conv_id: str, token_ids, kv, start: int = 0) -> Future:
        """begin_append + put every layer + commit, in one call."""
        with self.begin_append(conv_id, token_ids, start) as txn:
            txn.put(kv)
            return txn.commit()

    def _commit_append(self, txn: KVAppend) -> Future:
        C, n = self._geometry.chunk_tokens, len(txn.tokens)
        pieces = []
        for j, block in enumerate(txn.blocks):
            i = txn.first_index + j
            pieces.append((i, txn.tokens[i * C : min(n, (i + 1) * C)].copy(), txn.sums[j], block))
        with self._lock:
            conv = txn.conv
            conv.appending = False
            conv.pins -= 1
            if conv.dropped or self._closed:
                self._drop_staged(txn)
                for *_, b in pieces:
                    b.release()
                return _done()
            first = txn.first_index
            parent = conv.chunks[first - 1].key if first else conv.root
            new = []
            for i, t, sums, block in pieces:
                key = keys.chunk_key(parent, t)
                new.append(Chunk(i, t, key, parent, sums, host=block))
                parent = key
            replaced = {c.index: c for c in conv.chunks[first:]}
            conv.chunks = conv.chunks[:first] + new
            for c in new:
                old = replaced.pop(c.index, None)
                if old is not None:
                    c.supersedes = self._retire(conv, old, keep_file=True)
            for old in replaced.values():
                self._retire(conv, old, keep_file=False)
            self._stats.add(tokens_stored=txn.n_new, host_bytes_written=txn.n_new * self.spec.kv_bytes_per_token())
            self.policy.on_access(conv.id)
            if txn.staged is not None:
                for c in new:
                    c.writing = True
                refs = [c.host.acquire() for c in new]
                job = self._executor.submit(self._finish_staged, conv, new, refs, txn.staged, txn.batches)
                writes = [self._track(job)]
            elif self.config.write_through:
                writes = [self._schedule_write(conv, c) for c in new]
            else:
                writes = []
            for c in new:
                if c.supersedes and not c.writing:
                    self._delete_file(conv, c.supersedes)
                    c.supersedes = None
            self._forget_if_empty(conv)
        return _all_done([w for w in writes if w is not None])

    def _abort_append(self, txn: KVAppend) -> None:
        with self._lock:
            self._drop_staged(txn)
            for b in txn.blocks:
                b.release()
            txn.conv.appending = False
            txn.conv.pins -= 1
            self._forget_if_empty(txn.conv)

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
            if self._host is not None:
                self._host.close()
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

    def _write_job(self, conv: Conversation, c: Chunk, header: ChunkHeader, block) -> None:
        tmp, err = None, None
        try:
            tmp = self._disk.write_tmp(conv.dirname, header, block.ptr)  # no lock held during I/O
        except OSError as e:
            err = e
        block.release()
        with self._lock:
            self._written(conv, c, tmp, err)

    def _finish_staged(self, conv: Conversation, chunks: list[Chunk], refs, staged, batches) -> None:
        """Completes layer-by-layer chunk files: waits their layers, writes their headers."""
        err = None
        for b in batches:
            try:
                b.wait()
            except OSError as e:
                err = err or e
        for c, (tmp, f) in zip(chunks, staged):
            if err is None:
                header = ChunkHeader(c.index, c.key, c.parent, c.tokens, c.checksums, self._geometry.chunk_tokens)
                try:
                    self._disk.finish_tmp(f, header)
                except OSError as e:
                    err = e
            else:
                f.close()
        for r in refs:
            r.release()
        with self._lock:
            for c, (tmp, _) in zip(chunks, staged):
                self._written(conv, c, tmp, err)

    def _written(self, conv: Conversation, c: Chunk, tmp: str | None, err: OSError | None) -> None:
        """Bookkeeping once a chunk file is written (or failed); lock held."""
        c.writing = False
        if tmp is None:
            self._disk.unreserve()
        elif err is not None or not c.live or conv.dropped:
            self._disk.discard_tmp(tmp)
        if not c.live or conv.dropped:
            self._delete_file(conv, c.supersedes)
            return
        if err is not None:
            self._disk_failed(err)
            self._after_lost_write(conv, c)
            return
        name = file_name(c.index, c.ntokens, c.key)
        self._disk.publish(tmp, conv.dirname, name)
        c.file = name
        self._stats.add(disk_bytes_written=self._disk.file_bytes)
        self._delete_file(conv, c.supersedes)
        c.supersedes = None

def _all_done(futures: list[Future]) -> Future:
    if not futures:
        return _done()
    out: Future = Future()
    remaining = [len(futures)]
    lock = threading.Lock()

    def one(_f):
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            out.set_result(None)

    for f in futures:
        f.add_done_callback(one)
    return out
