"""The disk tier: chunks carried between host blocks and chunk files, one layer
at a time (tier.py's interface), on top of the file operations of ChunkFiles
(chunk_files.py).

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
from cachedattn.store.chunk_files import ChunkFiles, file_name
from cachedattn.store.record import ChunkCorruptError, ChunkHeader, bad_layer
from cachedattn.store.tier import ChunkReader, ChunkWriter, Tier


class DiskTier(Tier):
    name = "disk"

    def __init__(self, files: ChunkFiles):
        self.files = files
        self.geometry = files.geometry
        self._dir_locks: dict[str, threading.Lock] = {}
        self._dir_locks_guard = threading.Lock()

    # ---- reading ------------------------------------------------------------------

    def open_read(self, conv, chunks: list) -> DiskReader:
        return DiskReader(self.files, conv.dirname, chunks)

    def read_chunk(self, conv, chunk, block) -> None:
        """A whole chunk into a host block, checked; ChunkCorruptError when it cannot be."""
        reader = self.open_read(conv, [chunk])
        try:
            if reader.open_error is not None:
                raise reader.open_error
            for layer in range(self.geometry.spec.num_layers):
                reader.read_layer(layer, [block]).wait()
        except OSError as e:
            raise ChunkCorruptError(e.errno or errno.EIO, f"stored KV chunk is unreadable ({e.strerror or e})", reader.path(0)) from e
        finally:
            reader.close()
        layer = bad_layer(self.geometry, block.view().numpy(), chunk.checksums)
        if layer is not None:
            raise ChunkCorruptError(errno.EBADMSG, f"stored KV chunk is bad (layer {layer} checksum mismatch)", reader.path(0))

    # ---- writing ------------------------------------------------------------------

    def dir_lock(self, dirname: str) -> threading.Lock:
        with self._dir_locks_guard:
            lock = self._dir_locks.get(dirname)
            if lock is None:
                lock = lock_order.ordered(threading.Lock(), lock_order.DIRECTORY, "directory")
                self._dir_locks[dirname] = lock
            return lock

    def ensure_dir(self, conv) -> None:
        with self.dir_lock(conv.dirname):
            self.files.ensure_conversation_dir(conv.dirname, conv.id)  # durable with sync_writes

    def header(self, chunk) -> ChunkHeader:
        return ChunkHeader(chunk.index, chunk.key, chunk.parent, chunk.tokens, chunk.checksums, self.geometry.chunk_tokens)

    def publish(self, conv, chunk, tmp: str) -> str:
        name = file_name(chunk.index, chunk.ntokens, chunk.key, chunk.gen, chunk.tail)
        try:
            self.files.publish(tmp, conv.dirname, name)
        except OSError:
            self.files.discard_tmp(tmp)
            raise
        return name  # with sync_writes, publish() made the rename durable

    def write_chunk(self, conv, chunk, block) -> str:
        """Writes the chunk's file from a host block; returns its (new, unique) name."""
        self.ensure_dir(conv)
        tmp = self.files.write_tmp(conv.dirname, self.header(chunk), block.ptr)
        return self.publish(conv, chunk, tmp)

    def open_write(self, conv, n: int) -> DiskWriter:
        return DiskWriter(self, conv, n)

    # ---- removal ------------------------------------------------------------------

    def delete(self, dirname: str, name: str) -> None:
        self.files.delete(dirname, name)

    def remove_dir(self, dirname: str, still_unused) -> None:
        """Removes a conversation directory if still_unused() says so (asked under the directory's lock)."""
        with self.dir_lock(dirname):
            if still_unused():
                self.files.remove_dir(dirname)

    def discard_quietly(self, tmp: str) -> None:
        try:
            self.files.discard_tmp(tmp)
        except OSError:
            pass  # a leftover temporary file is deleted at the next open


class DiskReader(ChunkReader):
    """Chunk files opened for a load; each layer read straight into the blocks."""

    def __init__(self, files: ChunkFiles, dirname: str, chunks: list):
        self._files, self._dirname, self._chunks = files, dirname, chunks
        self._open: list = []
        self.open_error = None
        for c in chunks:
            try:
                self._open.append(files.open_file(dirname, c.file))
            except OSError as e:
                self.open_error = e
                break
        self.opened = len(self._open)

    def read_layer(self, layer: int, blocks: list):
        return self._files.read_layer(self._open, blocks, layer)

    def position(self, err: OSError) -> int | None:
        return next((i for i, f in enumerate(self._open) if f.path == err.filename), None)

    def path(self, i: int) -> str:
        return self._files.path(self._dirname, self._chunks[i].file or "?")

    def close(self) -> None:
        for f in self._open:
            f.close()
        self._open = []


class DiskWriter(ChunkWriter):
    """An append's new chunk files, written under temporary names as layers arrive."""

    def __init__(self, tier: DiskTier, conv, n: int):
        self._tier, self._conv = tier, conv
        self._batches: list = []
        self._staged: list = []  # (tmp, File) per chunk
        tier.ensure_dir(conv)
        try:
            for _ in range(n):
                self._staged.append(tier.files.open_tmp(conv.dirname))
        except BaseException:
            self.abandon()
            raise

    def write_layer(self, layer: int, blocks: list) -> None:
        self._batches.append(self._tier.files.write_layer([f for _, f in self._staged], blocks, layer))

    def _wait(self) -> OSError | None:
        err = None
        for b in self._batches:
            try:
                b.wait()
            except OSError as e:
                err = err or e
        self._batches = []
        return err

    def finish(self, chunks: list) -> list[tuple[str | None, OSError | None]]:
        tier = self._tier
        err = self._wait()
        files = [f for _, f in self._staged]
        if err is None:
            try:
                tier.files.finish_tmps(files, [tier.header(c) for c in chunks])
            except OSError as e:
                err = e
        else:
            for f in files:
                f.close()
        out = []
        for c, (tmp, _) in zip(chunks, self._staged):
            if err is not None:
                tier.discard_quietly(tmp)
                out.append((None, err))
                continue
            try:
                out.append((tier.publish(self._conv, c, tmp), None))
            except OSError as e:
                out.append((None, e))
        self._staged = []
        return out

    def abandon(self) -> None:
        self._wait()  # the files are being thrown away; only that the writes stopped reading the blocks matters
        for tmp, f in self._staged:
            f.close()
            self._tier.discard_quietly(tmp)
        self._staged = []
