"""How chunks move between tiers: allocation with eviction, demotion to disk,
write-through scheduling, disk eviction, and truncation when a chunk is lost.

Mixed into AttentionStore; every method here runs with the store lock held.
The invariant they keep: a conversation's chunks form a prefix, and every
chunk in it has its data in host memory, on disk, or on its way to disk.
"""

from __future__ import annotations

import errno
import logging
import time

from cachedattn.store.chunk_file import ChunkHeader, file_name, layer_checksum
from cachedattn.store.conversation import Chunk, Conversation
from cachedattn.store.host_tier import HostMemoryFull

log = logging.getLogger("cachedattn")


class TieringMixin:
    # ---- host memory ------------------------------------------------------------

    def _alloc_blocks(self, n: int, exclude: Conversation | None):
        """n host blocks, demoting other conversations (policy order) to make room."""
        blocks = []
        deadline = time.monotonic() + 60.0
        try:
            while len(blocks) < n:
                b = self._host.try_alloc()
                if b is not None:
                    blocks.append(b)
                elif not self._evict_one_host(exclude):
                    # Blocks under in-flight disk writes come back when the writes end;
                    # anything else is held by open loads or appends.
                    if not self._writing or time.monotonic() > deadline:
                        raise HostMemoryFull(
                            f"host memory is full: all {self._host.capacity_blocks} chunk blocks "
                            f"(host_bytes={self.config.host_bytes}) are held by open loads or appends"
                        )
                    # Waiting releases the store lock, so those writes can finish their bookkeeping.
                    self._cond.wait(timeout=0.05)
        except BaseException:
            for b in blocks:
                b.release()
            raise
        return blocks

    def _evict_one_host(self, exclude: Conversation | None) -> bool:
        cands = [
            cid
            for cid, c in self._convs.items()
            if c is not exclude and c.pins == 0 and not c.appending and c.evictable_host_chunks()
        ]
        if not cands:
            return False
        self._demote(self._convs[self.policy.order(cands, "host")[0]])
        return True

    def _demote(self, conv: Conversation) -> None:
        """Host copies go; chunks not yet on disk are written first where the disk allows.
        A chunk whose write is in flight leaves host memory when the write completes."""
        for c in conv.host_chunks():
            if c.writing:
                c.evict_after_write = True
                continue
            if c.file is None:
                self._write_now(conv, c)
            self._drop_host_copy(c)
        self._truncate_at_lost(conv)

    def _drop_host_copy(self, c: Chunk) -> None:
        c.host.release()
        c.host = None
        c.evict_after_write = False
        self._stats.add(host_evictions=1)
        self._cond.notify_all()

    def _copy_chunk(self, conv: Conversation, old: Chunk, block) -> None:
        """Fills a fresh block with an existing chunk (copy on write of a partial chunk)."""
        if old.host is not None:
            block.view().copy_(old.host.view())
            return
        from cachedattn.store.load import ChunkCorruptError

        d, geo = self._disk, self._geometry
        with d.open_file(conv.dirname, old.file) as f:
            self._engine.read([(f, d.header_bytes, block.ptr, geo.block_bytes)]).wait()
        view = block.view()
        for layer, (o, s) in enumerate(zip(geo.layer_offset, geo.layer_stride)):
            if layer_checksum(view[o : o + s].numpy()) != old.checksums[layer]:
                self._on_bad_chunk(conv, old, f"layer {layer} checksum mismatch")
                raise ChunkCorruptError(errno.EBADMSG, "stored KV chunk is bad", d.path(conv.dirname, old.file))
        self._stats.add(disk_bytes_read=geo.block_bytes)

    # ---- disk -------------------------------------------------------------------

    def _disk_usable(self) -> bool:
        return self._disk is not None and self._disk_error is None

    def _reserve_disk(self, conv: Conversation) -> bool:
        if self._disk.reserve():
            return True
        self._make_disk_room(need=self._disk.file_bytes, exclude=conv)
        return self._disk.reserve()

    def _schedule_write(self, conv: Conversation, c: Chunk):
        """Starts writing a chunk to disk in the background (write-through)."""
        if not self._disk_usable() or not self._reserve_disk(conv):
            return None
        try:
            self._disk.ensure_conversation_dir(conv.dirname, conv.id)
        except OSError as e:
            self._disk.unreserve()
            self._disk_failed(e)
            return None
        c.writing = True
        self._writing += 1
        header = ChunkHeader(c.index, c.key, c.parent, c.tokens, c.checksums, self._geometry.chunk_tokens)
        return self._track(self._executor.submit(self._write_job, conv, c, header, c.host.acquire()))

    def _stage_writes(self, conv: Conversation, n: int):
        """Reserves and opens n temporary chunk files for layer-by-layer writes, or None."""
        if not self._disk_usable() or n == 0:
            return None
        taken = 0
        while taken < n and self._reserve_disk(conv):
            taken += 1
        staged = []
        try:
            if taken < n:
                return None
            self._disk.ensure_conversation_dir(conv.dirname, conv.id)
            for _ in range(n):
                staged.append(self._disk.open_tmp(conv.dirname))
            return staged
        except OSError as e:
            self._disk_failed(e)
            return None
        finally:
            if len(staged) < n:
                for tmp, f in staged:
                    f.close()
                    self._disk.discard_tmp(tmp)
                for _ in range(taken - len(staged)):
                    self._disk.unreserve()

    def _drop_staged(self, txn) -> None:
        """Abandons an append's layer-by-layer files (after their writes stop touching its blocks)."""
        if txn.staged is None:
            return
        for b in txn.batches:
            try:
                b.wait()
            except OSError:
                pass  # the files are being thrown away; only their end matters
        for tmp, f in txn.staged:
            f.close()
            self._disk.discard_tmp(tmp)
        txn.staged = None

    def _write_now(self, conv: Conversation, c: Chunk) -> bool:
        """Writes a chunk synchronously (demotion in write-back mode)."""
        if not self._disk_usable() or not self._reserve_disk(conv):
            return False
        try:
            self._disk.ensure_conversation_dir(conv.dirname, conv.id)
            header = ChunkHeader(c.index, c.key, c.parent, c.tokens, c.checksums, self._geometry.chunk_tokens)
            tmp = self._disk.write_tmp(conv.dirname, header, c.host.ptr)
        except OSError as e:
            self._disk.unreserve()
            self._disk_failed(e)
            return False
        c.file = file_name(c.index, c.ntokens, c.key)
        self._disk.publish(tmp, conv.dirname, c.file)
        self._stats.add(disk_bytes_written=self._disk.file_bytes)
        return True

    def _make_disk_room(self, need: int, exclude: Conversation | None = None) -> bool:
        d = self._disk
        while d.used + need > d.capacity:
            cands = [
                cid
                for cid, c in self._convs.items()
                if c is not exclude and c.pins == 0 and not c.appending and (c.unresolved or c.disk_chunks())
            ]
            if not cands:
                return False
            self._evict_disk(self._convs[self.policy.order(cands, "disk")[0]])
        return True

    def _evict_disk(self, conv: Conversation) -> None:
        if conv.unresolved is not None:  # never opened since the restart: goes whole
            self._stats.add(disk_evictions=len(conv.unresolved))
            self._forget(conv)
            return
        for c in conv.disk_chunks():
            self._delete_file(conv, c.file)
            c.file = None
            self._stats.add(disk_evictions=1)
        self._truncate_at_lost(conv)

    def _delete_file(self, conv: Conversation, name: str | None) -> None:
        if name and self._disk is not None:
            self._disk.delete(conv.dirname, name)

    def _disk_failed(self, e: OSError) -> None:
        self._stats.add(write_errors=1)
        if self._disk_error is None:
            self._disk_error = f"{e.strerror or e} ({e.filename})"
            log.warning(
                "cachedattn: writing to the disk tier failed (%s); continuing with host memory only, "
                "KV already in host memory is kept",
                self._disk_error,
            )

    def _after_lost_write(self, conv: Conversation, c: Chunk) -> None:
        self._delete_file(conv, c.supersedes)
        c.supersedes = None
        self._truncate_at_lost(conv)

    # ---- losing chunks ---------------------------------------------------------

    def _retire(self, conv: Conversation, c: Chunk, keep_file: bool) -> str | None:
        """Takes a chunk out of the conversation; returns its file when asked to keep it."""
        c.live = False
        if c.host is not None:
            c.host.release()
            c.host = None
        name, c.file = c.file, None
        if keep_file:
            return name
        self._delete_file(conv, name)
        return None

    def _truncate(self, conv: Conversation, index: int) -> None:
        for c in conv.chunks[index:]:
            self._retire(conv, c, keep_file=False)
            self._delete_file(conv, c.supersedes)
            c.supersedes = None
        conv.chunks = conv.chunks[:index]
        self._forget_if_empty(conv)

    def _truncate_at_lost(self, conv: Conversation) -> None:
        for i, c in enumerate(conv.chunks):
            if c.host is None and c.file is None and not c.writing:
                self._truncate(conv, i)
                return

    def _on_bad_chunk(self, conv: Conversation, c: Chunk, why: str) -> None:
        with self._lock:
            log.warning("cachedattn: chunk %d of conversation %r is bad (%s); removed", c.index, conv.id, why)
            self._stats.add(corrupt_chunks=1, disk_misses=1)
            if c.live and c in conv.chunks:
                self._truncate(conv, conv.chunks.index(c))

    def _forget_if_empty(self, conv: Conversation) -> None:
        if not conv.chunks and conv.unresolved is None and conv.pins == 0 and not conv.appending:
            self._forget(conv)

    def _forget(self, conv: Conversation) -> None:
        conv.dropped = True
        for c in conv.chunks:
            self._retire(conv, c, keep_file=False)
        conv.chunks = []
        if self._convs.get(conv.id) is conv:
            del self._convs[conv.id]
            self.policy.on_remove(conv.id)
        if self._disk is not None:
            self._disk.remove_dir(conv.dirname)
