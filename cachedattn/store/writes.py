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
from cachedattn.store.conversation import Chunk, Conversation, common_prefix
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
        with s._critical():
            s._check_ready()
            conv = s._convs.get(conv_id) if isinstance(conv_id, str) else None
            if conv is None:
                conv = s._new_conversation(keys.validate_conversation_id(conv_id))
            if conv.writer is not None:
                raise ValueError(f"conversation {conv_id!r} already has an append in progress")
            stored = common_prefix(conv.tokens(), toks)
            if start > stored:
                s._mover.forget_if_empty(conv)
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
            lease = s._lease(conv, "append")
        blocks, staged, reserved = [], None, 0
        try:
            blocks = s._mover.alloc(nblocks, foreground=True)
            if src is not None:
                try:
                    s._mover.copy_into(conv, src, src_ref, blocks[0])
                except ChunkCorruptError as e:
                    raise ValueError(
                        f"the stored history of {conv_id!r} was cut (chunk {src.index} is bad: {e.strerror}); "
                        "nothing to append to"
                    ) from e
            if s.config.write_through and len(toks) > start and nblocks:
                with s._critical():
                    while reserved < nblocks and s._mover.disk_usable() and s._mover.reserve_disk(conv):
                        reserved += 1
                if reserved == nblocks:
                    try:
                        staged = s._disk_tier.stage(conv, nblocks)
                    except OSError as e:
                        s._disk_failed(e, "writing")
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
            s._release(lease)
            raise
        finally:
            if src_ref is not None:
                src_ref.release()

    def _unreserve(self, n: int) -> None:
        if n:
            with self.s._critical():
                for _ in range(n):
                    self.s._disk_tier.unreserve()

    def commit(self, txn: KVAppend) -> Future:
        s = self.s
        C, n = s._geometry.chunk_tokens, len(txn.tokens)
        pieces = []
        for j, block in enumerate(txn.blocks):
            i = txn.first_index + j
            pieces.append((i, txn.tokens[i * C : min(n, (i + 1) * C)].copy(), txn.sums[j], block))
        conv, first = txn.conv, txn.first_index
        with s._critical():
            gone = conv.state is ConvState.GONE
            parent = conv.chunks[first - 1].key if 0 < first <= len(conv.chunks) else conv.root
            cut = not gone and (len(conv.chunks) < first or parent != txn.parent)
            if not (gone or cut):
                new, gen = [], s._next_gen()
                for j, (i, t, sums, block) in enumerate(pieces):
                    key = keys.chunk_key(parent, t)
                    state = ChunkState.WRITING if txn.staged is not None else ChunkState.HOST
                    new.append(Chunk(i, t, key, parent, sums, state, host=block, gen=gen, tail=j == len(pieces) - 1))
                    parent = key
                for old in conv.chunks[first:]:
                    s._mover.retire(conv, old, replaced=True)
                conv.chunks = conv.chunks[:first] + new
                s._mover.settle(conv)  # a pure truncation: the kept chunks may all be on disk already
                if s._remote is not None:  # write-behind to the shared tier, off this path
                    s._remote.write_behind(new)
                s._stats.add(tokens_stored=txn.n_new, host_bytes_written=txn.n_new * s.spec.kv_bytes_per_token())
                s.policy.on_access(conv.id)
                writes = []
                if txn.staged is not None:
                    jobs = [s._mover._start_write(conv, c) for c in new]
                    writes.append(s._submit(self._finish_staged, conv, new, jobs, txn.staged, txn.batches))
                elif s.config.write_through:
                    writes = [w for w in (s._mover.schedule_write(conv, c) for c in new) if w is not None]
                txn.staged = None
            s._release(txn.lease)
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
        self.s._release(txn.lease)

    def _drop_staged(self, txn: KVAppend) -> None:
        if txn.staged is None:
            return
        staged, txn.staged = txn.staged, None
        self.s._disk_tier.drop_staged(staged, txn.batches)
        self._unreserve(len(staged))

    def _finish_staged(self, conv: Conversation, chunks: list[Chunk], jobs, staged, batches) -> None:
        """Completes layer-by-layer chunk files (store thread, no lock), then records each."""
        s = self.s
        try:
            results = s._disk_tier.finish_staged(conv, chunks, staged, batches)
        finally:
            for *_, ref in jobs:
                ref.release()
        with s._critical():
            for c, (name, err) in zip(chunks, results):
                s._mover.written(conv, c, name, err)


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
