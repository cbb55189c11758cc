"""Writing: appends (layer by layer), commits, and the disk writes behind them.

Mixed into AttentionStore. Disk I/O runs on the store's threads without the
lock; _written() does the bookkeeping under it once a file is complete.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

import numpy as np

from cachedattn.store import keys
from cachedattn.store.append import KVAppend
from cachedattn.store.chunk_file import ChunkHeader, file_name
from cachedattn.store.conversation import Chunk, Conversation, common_prefix


def done_future(value=None) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


class WriteMixin:
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
                if start % C and blocks and len(conv.chunks) <= first:
                    # A damaged chunk was removed while waiting for memory.
                    raise ValueError(f"the stored history of {conv_id!r} was cut; nothing to append to at {start}")
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
            txn = KVAppend(self, conv, toks, start, blocks, staged)
            txn.parent = conv.chunks[first - 1].key if first else conv.root
            return txn

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
            first = txn.first_index
            parent = conv.chunks[first - 1].key if 0 < first <= len(conv.chunks) else conv.root
            cut = len(conv.chunks) < first or parent != txn.parent
            if conv.dropped or self._closed or cut:
                self._drop_staged(txn)
                for *_, b in pieces:
                    b.release()
                if cut and not conv.dropped:
                    # A damaged chunk before `start` was removed meanwhile: this KV no longer has its history.
                    f: Future = Future()
                    f.set_exception(ValueError(f"the stored history of {conv.id!r} was cut during this append; nothing was stored"))
                    return f
                return done_future()
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
                self._writing += len(new)
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
        files = [f for _, f in staged]
        if err is None:
            C = self._geometry.chunk_tokens
            headers = [ChunkHeader(c.index, c.key, c.parent, c.tokens, c.checksums, C) for c in chunks]
            try:
                self._disk.finish_tmps(files, headers)
            except OSError as e:
                err = e
        else:
            for f in files:
                f.close()
        for r in refs:
            r.release()
        with self._lock:
            for c, (tmp, _) in zip(chunks, staged):
                self._written(conv, c, tmp, err)

    def _written(self, conv: Conversation, c: Chunk, tmp: str | None, err: OSError | None) -> None:
        """Bookkeeping once a chunk file is written (or failed); lock held."""
        c.writing = False
        self._writing -= 1
        if tmp is None:
            self._disk.unreserve()
        elif err is not None or not c.live or conv.dropped:
            self._disk.discard_tmp(tmp)
        if not c.live or conv.dropped:
            self._delete_file(conv, c.supersedes)
            return
        if err is not None:
            c.evict_after_write = False  # the host copy is now the only one: it stays
            self._disk_failed(err)
            self._after_lost_write(conv, c)
            return
        name = file_name(c.index, c.ntokens, c.key)
        self._disk.publish(tmp, conv.dirname, name)
        c.file = name
        self._stats.add(disk_bytes_written=self._disk.file_bytes)
        self._delete_file(conv, c.supersedes)
        c.supersedes = None
        if c.evict_after_write and c.host is not None:
            self._drop_host_copy(c)
        self._cond.notify_all()


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
