"""Writing: appends (layer by layer), their commit, and the disk writes behind them.

begin_append decides under the store lock (the conversation, a lease on it,
where the new chunks start) and finds memory, copies the partial chunk it
extends and opens temporary files without it. commit() publishes all new
chunks under the lock at once; the files are finished and renamed into place
on the store's threads, and their outcome recorded under the lock again.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

import numpy as np

from cachedattn.store import keys
from cachedattn.store.append import KVAppend
from cachedattn.store.chunk_file import ChunkCorruptError
from cachedattn.store.conversation import Chunk, common_prefix
from cachedattn.store.index import Plan
from cachedattn.store.reads import done_future
from cachedattn.store.state import ChunkState, ConvState


def failed_future(exc: BaseException) -> Future:
    f: Future = Future()
    f.set_exception(exc)
    return f


class Writer:
    def __init__(self, store):
        self.s = store

    def begin_append(self, conv_id: str, token_ids, start: int) -> KVAppend:
        s = self.s
        toks = keys.as_token_array(token_ids)
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or not 0 <= start <= len(toks):
            raise ValueError(f"start={start!r} must be an integer in [0, {len(toks)}]")
        start = int(start)
        s._resolve(conv_id)
        ix = s._index
        with ix.lock:
            s._check_ready()
            conv = ix.get(conv_id, required=False)
            if conv is None:
                keys.validate_conversation_id(conv_id)
                conv = ix.new_conversation(conv_id, keys.root_key(s.spec.fingerprint, conv_id))
            if conv.writer is not None:
                raise ValueError(f"conversation {conv_id!r} already has an append in progress")
            stored = common_prefix(conv.tokens(), toks)
            if start > stored:
                ix.forget_if_empty(conv, Plan())  # a conversation made just now: no files to plan for
                raise ValueError(
                    f"start={start}, but only the first {stored} of these tokens are stored for {conv_id!r}: "
                    f"the KV of tokens [{stored}, {start}) would be missing"
                )
            C = s._geometry.chunk_tokens
            first = start // C
            nblocks = -(-len(toks) // C) - first
            src = conv.chunks[first] if start % C and nblocks else None
            src_ref = src.host.acquire() if src is not None and src.in_host else None
            parent = conv.chunks[first - 1].key if first else conv.root
            lease = ix.lease(conv, "append")
        blocks, staged, reserved = [], None, 0
        try:
            blocks = s._exec.alloc(nblocks, foreground=True)
            if src is not None:
                try:
                    self._copy_into(conv, src, src_ref, blocks[0])
                except ChunkCorruptError as e:
                    raise ValueError(
                        f"the stored history of {conv_id!r} was cut (chunk {src.index} is bad: {e.strerror}); "
                        "nothing to append to"
                    ) from e
            if s.config.write_through and len(toks) > start and nblocks:
                plan = Plan()
                with ix.lock:
                    while reserved < nblocks and ix.disk_usable() and ix.reserve_disk(conv, plan):
                        reserved += 1
                s._exec.run(plan)
                if reserved == nblocks:
                    try:
                        staged = s._disk_tier.stage(conv, nblocks)
                    except OSError as e:
                        ix.disk_failed(e, "writing")
                if staged is None:
                    self._unreserve(reserved)
                    reserved = 0
            return KVAppend(s, conv, lease, toks, start, blocks, staged, parent)
        except BaseException:
            if staged is not None:
                s._disk_tier.drop_staged(staged, [])
            self._unreserve(reserved)
            for b in blocks:
                b.release()
            s._exec.release(lease)
            raise
        finally:
            if src_ref is not None:
                src_ref.release()

    def _copy_into(self, conv, c: Chunk, ref, block) -> None:
        """Fills a fresh block with an existing chunk (copy on write of a partial chunk); no lock held.
        ref: a held reference to the chunk's host block, or None to read it from disk."""
        if ref is not None:
            block.view().copy_(ref.view())
            return
        try:
            self.s._disk_tier.get_into(conv, c, block)
        except ChunkCorruptError as e:
            self.s._exec.bad_chunk(conv, c, e.strerror or str(e))
            raise
        self.s._stats.add(disk_bytes_read=self.s._geometry.block_bytes)

    def _unreserve(self, n: int) -> None:
        if n:
            with self.s._index.lock:
                for _ in range(n):
                    self.s._index.disk.unreserve()

    def commit(self, txn: KVAppend) -> Future:
        s = self.s
        C, n = s._geometry.chunk_tokens, len(txn.tokens)
        pieces = []
        for j, block in enumerate(txn.blocks):
            i = txn.first_index + j
            pieces.append((i, txn.tokens[i * C : min(n, (i + 1) * C)].copy(), txn.sums[j], block))
        conv, first = txn.conv, txn.first_index
        ix, plan = s._index, Plan()
        with ix.lock:
            gone = conv.state is ConvState.GONE
            parent = conv.chunks[first - 1].key if 0 < first <= len(conv.chunks) else conv.root
            cut = not gone and (len(conv.chunks) < first or parent != txn.parent)
            if not (gone or cut):
                new, gen = [], ix.next_gen()
                for j, (i, t, sums, block) in enumerate(pieces):
                    key = keys.chunk_key(parent, t)
                    state = ChunkState.WRITING if txn.staged is not None else ChunkState.HOST
                    new.append(Chunk(i, t, key, parent, sums, state, host=block, gen=gen, tail=j == len(pieces) - 1))
                    parent = key
                ix.replace_tail(conv, first, new, plan)
                if s._remote is not None:  # write-behind to the shared tier, off this path
                    s._remote.write_behind(new)
                s._stats.add(tokens_stored=txn.n_new, host_bytes_written=txn.n_new * s.spec.kv_bytes_per_token())
                if txn.staged is not None:
                    plan.staged.append((conv, new, ix.start_writes(conv, new), txn.staged, txn.batches))
                elif s.config.write_through:
                    for c in new:
                        ix.write_through(conv, c, plan)
                txn.staged = None
            ix.release(txn.lease, plan)
        writes = s._exec.run(plan)
        if gone or cut:
            self._drop_staged(txn)
            for *_, b in pieces:
                b.release()
            if cut:  # a damaged chunk before `start` was removed meanwhile: this KV no longer has its history
                return failed_future(ValueError(f"the stored history of {conv.id!r} was cut during this append; nothing was stored"))
            return done_future()
        return _all_done(writes)

    def abort(self, txn: KVAppend) -> None:
        self._drop_staged(txn)
        for b in txn.blocks:
            b.release()
        self.s._exec.release(txn.lease)

    def _drop_staged(self, txn: KVAppend) -> None:
        if txn.staged is None:
            return
        staged, txn.staged = txn.staged, None
        self.s._disk_tier.drop_staged(staged, txn.batches)
        self._unreserve(len(staged))


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
