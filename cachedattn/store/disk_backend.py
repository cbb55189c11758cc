"""The disk tier behind the Tier interface: whole chunks in and out of chunk
files, on top of the file-level operations of DiskTier (disk_tier.py).

Nothing here takes the store lock or changes a chunk's state; every method
that touches the file system is called without the store lock held. A
conversation directory is created and removed under a lock of its own (one
per directory), so removing a conversation's directory never races with a
new conversation of the same id creating it again.
"""

from __future__ import annotations

import errno
import threading

from cachedattn.store import lock_order
from cachedattn.store.chunk_file import ChunkCorruptError, ChunkHeader, file_name, layer_checksum
from cachedattn.store.disk_tier import DiskTier
from cachedattn.store.tier import Tier


class DiskBackend(Tier):
    name = "disk"

    def __init__(self, files: DiskTier):
        self.files = files
        self.geometry = files.geometry
        self._dir_locks: dict[str, threading.Lock] = {}
        self._dir_locks_guard = threading.Lock()

    # ---- bookkeeping (store lock held) -----------------------------------------

    @property
    def file_bytes(self) -> int:
        return self.files.file_bytes

    def capacity(self) -> int:
        return self.files.capacity

    def used(self) -> int:
        return self.files.used

    def contains(self, conv, chunk) -> bool:
        return chunk.on_disk

    def reserve(self) -> bool:
        return self.files.reserve()

    def unreserve(self) -> None:
        self.files.unreserve()

    # ---- data (store lock not held) ----------------------------------------------

    def dir_lock(self, dirname: str) -> threading.Lock:
        with self._dir_locks_guard:
            lock = self._dir_locks.get(dirname)
            if lock is None:
                lock = lock_order.ordered(threading.Lock(), lock_order.DIRECTORY, "directory")
                self._dir_locks[dirname] = lock
            return lock

    def _ensure_dir(self, conv) -> None:
        with self.dir_lock(conv.dirname):
            self.files.ensure_conversation_dir(conv.dirname, conv.id)  # durable with sync_writes

    def _header(self, chunk) -> ChunkHeader:
        return ChunkHeader(chunk.index, chunk.key, chunk.parent, chunk.tokens, chunk.checksums, self.geometry.chunk_tokens)

    def _publish(self, conv, chunk, tmp: str) -> str:
        name = file_name(chunk.index, chunk.ntokens, chunk.key, chunk.gen, chunk.tail)
        try:
            self.files.publish(tmp, conv.dirname, name)
        except OSError:
            self.files.discard_tmp(tmp)
            raise
        return name  # with sync_writes, publish() made the rename durable

    def put_from(self, conv, chunk, block) -> str:
        """Writes the chunk's file from a host block; returns its (new, unique) name."""
        self._ensure_dir(conv)
        tmp = self.files.write_tmp(conv.dirname, self._header(chunk), block.ptr)
        return self._publish(conv, chunk, tmp)

    def get_into(self, conv, chunk, block) -> None:
        geo = self.geometry
        path = self.files.path(conv.dirname, chunk.file)
        try:
            with self.files.open_file(conv.dirname, chunk.file) as f:
                self.files.engine.read([(f, self.files.header_bytes, block.ptr, geo.block_bytes)]).wait()
        except OSError as e:
            raise ChunkCorruptError(e.errno or errno.EIO, f"stored KV chunk is unreadable ({e.strerror or e})", path) from e
        view = block.view()
        for layer, (o, s) in enumerate(zip(geo.layer_offset, geo.layer_stride)):
            if layer_checksum(view[o : o + s].numpy()) != chunk.checksums[layer]:
                raise ChunkCorruptError(errno.EBADMSG, f"stored KV chunk is bad (layer {layer} checksum mismatch)", path)

    def remove(self, conv, chunk) -> None:
        self.delete(conv.dirname, chunk.file)

    def delete(self, dirname: str, name: str) -> None:
        self.files.delete(dirname, name)

    def remove_dir(self, dirname: str, still_unused) -> None:
        """Removes a conversation directory if still_unused() says so (asked under the directory's lock)."""
        with self.dir_lock(dirname):
            if still_unused():
                self.files.remove_dir(dirname)

    # ---- layer-by-layer writes of an append ------------------------------------

    def stage(self, conv, n: int) -> list:
        """n temporary chunk files for layer-by-layer writes: [(tmp, File)]."""
        self._ensure_dir(conv)
        staged = []
        try:
            for _ in range(n):
                staged.append(self.files.open_tmp(conv.dirname))
        except BaseException:
            self.drop_staged(staged, [])
            raise
        return staged

    def finish_staged(self, conv, chunks, staged, batches) -> list[tuple[str | None, OSError | None]]:
        """Waits for the layers, writes the headers, renames into place: (name, None) or (None, error) per chunk."""
        err = None
        for b in batches:
            try:
                b.wait()
            except OSError as e:
                err = err or e
        files = [f for _, f in staged]
        if err is None:
            try:
                self.files.finish_tmps(files, [self._header(c) for c in chunks])
            except OSError as e:
                err = e
        else:
            for f in files:
                f.close()
        out = []
        for c, (tmp, _) in zip(chunks, staged):
            if err is not None:
                self._discard_quietly(tmp)
                out.append((None, err))
                continue
            try:
                out.append((self._publish(conv, c, tmp), None))
            except OSError as e:
                out.append((None, e))
        return out

    def drop_staged(self, staged, batches) -> None:
        """Abandons layer-by-layer files (after their writes stop touching the blocks)."""
        for b in batches:
            try:
                b.wait()
            except OSError:
                pass  # the files are being thrown away; only their end matters
        for tmp, f in staged:
            f.close()
            self._discard_quietly(tmp)

    def _discard_quietly(self, tmp: str) -> None:
        try:
            self.files.discard_tmp(tmp)
        except OSError:
            pass  # a leftover temporary file is deleted at the next open
