"""Appends: new KV of a conversation, handed over layer by layer (KVAppend).

begin_append decides under the store lock (the conversation, a lease on it,
where the new chunks start) and finds memory, copies the partial chunk it
extends and opens the tier writer without it. Layers are copied into host
blocks as they arrive, and with write-through each layer is at once handed
to the disk tier's writer (tier.py), so copying layer i+1 overlaps with
writing layer i (put_layer returns after its copy; the writes run on the I/O
engine). Nothing is visible to lookups or loads until commit(), which
publishes all chunks at once under the lock; the returned future completes
when the files are complete and renamed into place (the executor finishes
the writer on the store's threads and reports each chunk to the index).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

import numpy as np
import torch

from cachedattn.store import keys, lock_order
from cachedattn.store.conversation import Chunk, common_prefix
from cachedattn.store.index import Plan
from cachedattn.store.load import done_future
from cachedattn.store.record import ChunkCorruptError, layer_checksum
from cachedattn.store.conversation import ChunkState, ConvState



def failed_future(exc: BaseException) -> Future:
    f: Future = Future()
    f.set_exception(exc)
    return f


def begin_append(core, conv_id: str, token_ids, start: int) -> KVAppend:
    """Starts storing the KV of token_ids[start:] (see AttentionStore.begin_append)."""
    toks = keys.as_token_array(token_ids)
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or not 0 <= start <= len(toks):
        raise ValueError(f"start={start!r} must be an integer in [0, {len(toks)}]")
    start = int(start)
    core.executor.resolve(conv_id)
    ix = core.index
    with ix.lock:
        core.index.check_ready()
        conv = ix.get(conv_id, required=False)
        if conv is None:
            keys.validate_conversation_id(conv_id)
            conv = ix.new_conversation(conv_id, keys.root_key(core.spec.fingerprint, conv_id))
        if conv.writer is not None:
            raise ValueError(f"conversation {conv_id!r} already has an append in progress")
        stored = common_prefix(conv.tokens(), toks)
        plan = None
        if start > stored:
            plan = Plan()
            ix.forget_if_empty(conv, plan)
        else:
            C = core.geometry.chunk_tokens
            first = start // C
            nblocks = -(-len(toks) // C) - first
            src = conv.chunks[first] if start % C and nblocks else None
            src_ref = src.host.acquire() if src is not None and src.in_host else None
            parent = conv.chunks[first - 1].key if first else conv.root
            lease = ix.lease(conv, "append")
    if plan is not None:
        core.executor.run(plan)
        raise ValueError(
            f"start={start}, but only the first {stored} of these tokens are stored for {conv_id!r}: "
            f"the KV of tokens [{stored}, {start}) would be missing"
        )
    blocks, writer, reserved = [], None, 0
    try:
        blocks = core.executor.alloc(nblocks, foreground=True)
        if src is not None:
            try:
                _copy_into(core, conv, src, src_ref, blocks[0])
            except ChunkCorruptError as e:
                raise ValueError(
                    f"the stored history of {conv_id!r} was cut (chunk {src.index} is bad: {e.strerror}); "
                    "nothing to append to"
                ) from e
        if core.config.write_through and len(toks) > start and nblocks:
            plan = Plan()
            with ix.lock:
                while reserved < nblocks and ix.disk_usable() and ix.reserve_disk(conv, plan):
                    reserved += 1
            core.executor.run(plan)
            if reserved == nblocks:
                try:
                    writer = core.disk.open_write(conv, nblocks)
                except OSError as e:
                    ix.disk_failed(e, "writing")
            if writer is None:
                _unreserve(core, reserved)
                reserved = 0
        return KVAppend(core, conv, lease, toks, start, blocks, writer, parent)
    except BaseException:
        if writer is not None:
            writer.abandon()
        _unreserve(core, reserved)
        for b in blocks:
            b.release()
        core.executor.release(lease)
        raise
    finally:
        if src_ref is not None:
            src_ref.release()

def _copy_into(core, conv, c: Chunk, ref, block) -> None:
    """Fills a fresh block with an existing chunk (copy on write of a partial chunk); no lock held.
    ref: a held reference to the chunk's host block, or None to read it from disk."""
    if ref is not None:
        block.view().copy_(ref.view())
        return
    try:
        core.disk.read_chunk(conv, c, block)
    except ChunkCorruptError as e:
        core.executor.bad_chunk(conv, c, e.strerror or str(e))
        raise
    core.stats.add(disk_bytes_read=core.geometry.block_bytes)

def _unreserve(core, n: int) -> None:
    if n:
        with core.index.lock:
            for _ in range(n):
                core.index.disk.unreserve()


class KVAppend:
    def __init__(self, core, conv, lease, tokens: np.ndarray, start: int, blocks, writer, parent: bytes):
        self._core = core
        self.conv = conv
        self.lease = lease
        self.tokens = tokens
        self.start = start
        self.blocks = blocks  # one per chunk from first_index on
        self.first_index = start // core.geometry.chunk_tokens
        self.writer = writer  # the disk tier's writer of the new chunks, when writing layer by layer
        self.parent = parent  # key of the chunk before first_index when the append began
        self.sums = [[0] * core.geometry.spec.num_layers for _ in blocks]
        self._done: set[int] = set()
        self._closed = False
        self._cancelled = False
        self._settle = None  # waits for copies an engine still has in flight into self.blocks
        # put_layer/commit/abort against the store's close()
        self._mutex = lock_order.ordered(threading.Lock(), lock_order.LOAD, "append")
        core.index.register(self)

    @property
    def n_new(self) -> int:
        return len(self.tokens) - self.start

    def put_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """K and V of the new tokens for one layer: ``[kv_heads, n_new, head_dim]`` (or with a leading 1)."""
        with self._mutex:
            self._check_usable()
            self._put_layer(layer, k, v)

    def _check_usable(self) -> None:
        if self._cancelled:
            raise ValueError("this append was aborted by store.close(): the store is closed")
        if self._closed:
            raise ValueError("this append is already committed or aborted")

    def _check_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        geo = self._core.geometry
        spec = geo.spec
        if not 0 <= layer < spec.num_layers:
            raise ValueError(f"layer {layer} out of range (model has {spec.num_layers})")
        h, d = spec.layers[layer]
        want = (h, self.n_new, d)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor")
            if t.dim() == 4 and t.shape[0] == 1:
                t = t[0]
            if tuple(t.shape) != want or t.dtype != spec.dtype:
                raise ValueError(
                    f"layer {layer} {name} is {tuple(t.shape)}/{t.dtype}; this model's KV needs {want}/{spec.dtype}"
                )
        return (k[0] if k.dim() == 4 else k), (v[0] if v.dim() == 4 else v)

    def _put_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        geo = self._core.geometry
        k, v = self._check_kv(layer, k, v)
        C = geo.chunk_tokens
        end = len(self.tokens)
        for j, block in enumerate(self.blocks):
            c0 = (self.first_index + j) * C
            s0, s1 = max(self.start, c0), min(end, c0 + C)
            kd, vd = geo.kv_views(block.view(), layer)
            kd[:, s0 - c0 : s1 - c0].copy_(k[:, s0 - self.start : s1 - self.start])
            vd[:, s0 - c0 : s1 - c0].copy_(v[:, s0 - self.start : s1 - self.start])
        self._seal_layer(layer)
        if self.writer is not None:
            self.writer.write_layer(layer, self.blocks)
        self._done.add(layer)

    def copy_segments(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> list[tuple[int, int, int]]:
        """(src_ptr, dst_ptr, bytes) triples that copy one layer's new K and V (as put_layer
        takes them, on any device) into this append's host blocks: one per head, chunk and K/V.

        For a copy engine: the caller issues them, keeps k and v alive and calls
        layer_copied(layer) only once the copies are done (nothing reads the
        blocks before). Rows must be dense (``stride(-1) == 1``, ``stride(-2) == head_dim``)."""
        with self._mutex:
            self._check_usable()
            k, v = self._check_kv(layer, k, v)
        geo = self._core.geometry
        C, end, es = geo.chunk_tokens, len(self.tokens), k.element_size()
        d = k.shape[-1]
        for name, t in (("k", k), ("v", v)):
            if t.stride(-1) != 1 or (t.shape[1] > 1 and t.stride(-2) != d):
                raise ValueError(f"layer {layer} {name}: each head's rows must be dense (make it contiguous)")
        segs = []
        for j, block in enumerate(self.blocks):
            c0 = (self.first_index + j) * C
            s0, s1 = max(self.start, c0), min(end, c0 + C)
            if s1 <= s0:
                continue
            for t, dst in zip((k, v), geo.kv_views(block.view(), layer)):
                for h in range(t.shape[0]):
                    src = t.data_ptr() + (h * t.stride(0) + (s0 - self.start) * t.stride(1)) * es
                    segs.append((src, dst[h, s0 - c0].data_ptr(), (s1 - s0) * d * es))
        return segs

    def layer_copied(self, layer: int) -> None:
        """The copies of copy_segments(layer) are done: seal the layer and write it like put_layer."""
        with self._mutex:
            self._check_usable()
            if not 0 <= layer < self._core.geometry.spec.num_layers:
                raise ValueError(f"layer {layer} out of range")
            self._seal_layer(layer)
            if self.writer is not None:
                self.writer.write_layer(layer, self.blocks)
            self._done.add(layer)

    def _seal_layer(self, layer: int) -> None:
        """Zeroes the unused slots of a partial last chunk (no stale bytes of other
        conversations reach the disk) and checksums the layer in every block."""
        geo = self._core.geometry
        C, n = geo.chunk_tokens, len(self.tokens)
        off, length = geo.layer_range(layer)
        for j, block in enumerate(self.blocks):
            used = min(n, (self.first_index + j + 1) * C) - (self.first_index + j) * C
            if used < C:
                for part in geo.kv_views(block.view(), layer):
                    part[:, used:].zero_()
            self.sums[j][layer] = layer_checksum(block.view()[off : off + length].numpy())

    def put(self, kv) -> None:
        """All layers at once: a sequence of (k, v) pairs."""
        for layer, (k, v) in enumerate(kv):
            self.put_layer(layer, k, v)

    def commit(self) -> Future:
        """Publishes the new KV; the future completes when it is on disk."""
        with self._mutex:
            self._check_usable()
            missing = sorted(set(range(self._core.geometry.spec.num_layers)) - self._done)
            if missing and self.n_new:
                raise ValueError(f"cannot commit: no KV was put for layers {missing}")
            self._closed = True
            for layer in range(self._core.geometry.spec.num_layers):
                if layer not in self._done:  # nothing new for it (a pure truncation): seal what was copied
                    self._seal_layer(layer)
            return self._commit()

    def _commit(self) -> Future:
        """Publishes the new chunks under the lock (they replace the stored ones from first_index on)."""
        core, txn = self._core, self
        C, n = core.geometry.chunk_tokens, len(txn.tokens)
        pieces = []
        for j, block in enumerate(txn.blocks):
            i = txn.first_index + j
            pieces.append((i, txn.tokens[i * C : min(n, (i + 1) * C)].copy(), txn.sums[j], block))
        conv, first = txn.conv, txn.first_index
        ix, plan = core.index, Plan()
        with ix.lock:
            gone = conv.state is ConvState.GONE
            parent = conv.chunks[first - 1].key if 0 < first <= len(conv.chunks) else conv.root
            cut = not gone and (len(conv.chunks) < first or parent != txn.parent)
            if not (gone or cut):
                new, gen = [], ix.next_gen()
                for j, (i, t, sums, block) in enumerate(pieces):
                    key = keys.chunk_key(parent, t)
                    state = ChunkState.WRITING if txn.writer is not None else ChunkState.HOST
                    new.append(Chunk(i, t, key, parent, sums, state, host=block, gen=gen, tail=j == len(pieces) - 1))
                    parent = key
                ix.replace_tail(conv, first, new, plan)
                if core.remote is not None:  # write-behind to the shared tier, off this path
                    core.remote.write_behind(new)
                core.stats.add(tokens_stored=txn.n_new, host_bytes_written=txn.n_new * core.spec.kv_bytes_per_token())
                if txn.writer is not None:
                    plan.staged.append((conv, new, ix.start_writes(conv, new), txn.writer))
                elif core.config.write_through:
                    for c in new:
                        ix.write_through(conv, c, plan)
                txn.writer = None
            ix.release(txn.lease, plan)
        writes = core.executor.run(plan)
        if gone or cut:
            self._abandon_writer()
            for *_, b in pieces:
                b.release()
            if cut:  # a damaged chunk before `start` was removed meanwhile: this KV no longer has its history
                return failed_future(ValueError(f"the stored history of {conv.id!r} was cut during this append; nothing was stored"))
            return done_future()
        return _all_done(writes)

    def settle_with(self, wait) -> None:
        """`wait()` returns once no copy issued by the caller still writes this append's blocks.

        A copy engine fills the blocks asynchronously (hf.async_saving); abort, from the
        saver or from store.close() on another thread, calls it before the blocks go back
        to the pool, so a pending DMA never writes memory that was handed out again."""
        self._settle = wait

    def abort(self) -> None:
        with self._mutex:
            if not self._closed:
                self._closed = True
                self._release_blocks()

    def _cancel(self) -> None:
        """The store is closing: abort now."""
        with self._mutex:
            if not self._closed:
                self._closed = self._cancelled = True
                self._release_blocks()

    def _release_blocks(self) -> None:
        """Gives back the writer's reservation, every block and the lease, each whatever the others did:
        a release that raises (a checkpoint watcher in tests: a block still under a copy, which then stays
        out of the pool) is raised after the rest went back. The lease goes either way, as a load's does:
        store.close() waits for leases and must not hang."""
        errors: list[BaseException] = []
        try:
            if self._settle is not None:
                self._settle()
        except BaseException as e:  # noqa: BLE001 - raised below, after everything else went back
            errors.append(e)
        for release in (self._abandon_writer, *(b.release for b in self.blocks)):
            try:
                release()
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
        self._core.executor.release(self.lease)
        if errors:
            raise errors[0]

    def __enter__(self) -> KVAppend:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if not self._closed:
            self.abort()

    def _abandon_writer(self) -> None:
        if self.writer is None:
            return
        writer, self.writer = self.writer, None
        writer.abandon()
        _unreserve(self._core, len(self.blocks))


def _all_done(futures: list[Future]) -> Future:
    if not futures:
        return done_future()
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
