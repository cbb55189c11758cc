"""The SSD tier: one file per chunk under
``disk_dir/cachedattn-v1/<model fingerprint>/<conversation digest>/``, plus an
``id`` file per conversation directory holding the conversation's id.

Files are written under a temporary name and renamed when complete; at open
the directories are listed (no manifest to rewrite on every put), temporary
leftovers of a crash are deleted, and chunk headers are read lazily, when a
conversation is first used. A lock file refuses a second store on the same
directory while the first is open (the kernel drops it if the process dies).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import uuid
from pathlib import Path

import numpy as np

from cachedattn import native
from cachedattn.store.chunk_file import TMP_PREFIX, ChunkHeader, header_bytes, parse_file_name
from cachedattn.store.spec import ChunkGeometry

log = logging.getLogger("cachedattn")
LOCK_NAME = ".cachedattn.lock"


class DirectoryLock:
    def __init__(self, disk_dir: str):
        os.makedirs(disk_dir, exist_ok=True)
        self.path = os.path.join(disk_dir, LOCK_NAME)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise OSError(
                errno.EBUSY, f"disk_dir is in use by another cachedattn store (pid {holder})", disk_dir
            ) from None
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:  # e.g. disk full: a lock we cannot fill in is no lock, and must not leak
            self.release()
            raise

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


class DiskTier:
    def __init__(self, disk_dir: str, fingerprint: str, capacity: int, geometry: ChunkGeometry, engine, sync: bool):
        self.root = Path(disk_dir) / "cachedattn-v1" / fingerprint
        self.root.mkdir(parents=True, exist_ok=True)
        self.capacity = capacity
        self.geometry = geometry
        self.header_bytes = header_bytes(geometry.spec.num_layers, geometry.chunk_tokens)
        self.file_bytes = self.header_bytes + geometry.block_bytes
        self.engine = engine
        self.sync = sync
        self.used = 0  # bytes of chunk files present or being written

    # ---- space ----------------------------------------------------------------

    def reserve(self) -> bool:
        if self.used + self.file_bytes > self.capacity:
            return False
        self.used += self.file_bytes
        return True

    def unreserve(self) -> None:
        self.used -= self.file_bytes

    # ---- discovery ------------------------------------------------------------

    def scan(self) -> dict[str, tuple[str, list[tuple[int, int, bytes, str]]]]:
        """{conversation id: (dirname, [(index, ntokens, key, file name)])}; counts space used."""
        found: dict[str, tuple[str, list]] = {}
        for d in os.scandir(self.root):
            if not d.is_dir():
                continue
            try:
                conv_id = (Path(d.path) / "id").read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                log.warning("cachedattn: removing conversation directory without a readable id: %s", d.path)
                self.remove_dir(d.name)
                continue
            files = []
            for f in os.scandir(d.path):
                if f.name.startswith(TMP_PREFIX):
                    os.unlink(f.path)  # a write that a crash cut short
                    continue
                parsed = parse_file_name(f.name)
                if parsed is not None:
                    files.append((*parsed, f.name))
                    self.used += self.file_bytes
            found[conv_id] = (d.name, files)
        return found

    def read_header(self, dirname: str, name: str) -> ChunkHeader:
        path = self.root / dirname / name
        with open(path, "rb") as f:
            data = f.read(self.header_bytes)
            f.seek(0, os.SEEK_END)
            size = f.tell()
        if size != self.file_bytes:
            raise ValueError(f"chunk file is {size} bytes, expected {self.file_bytes}")
        return ChunkHeader.decode(data)

    # ---- writing --------------------------------------------------------------

    def ensure_conversation_dir(self, dirname: str, conv_id: str) -> None:
        d = self.root / dirname
        if (d / "id").exists():
            return
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f"{TMP_PREFIX}id-{uuid.uuid4().hex}"
        tmp.write_text(conv_id, encoding="utf-8")
        os.replace(tmp, d / "id")

    def write_tmp(self, dirname: str, header: ChunkHeader, block_ptr: int) -> str:
        """Writes a whole chunk file under a temporary name; returns that path."""
        tmp = str(self.root / dirname / f"{TMP_PREFIX}{uuid.uuid4().hex}")
        head = np.frombuffer(header.encode(), dtype=np.uint8)
        try:
            with native.File(tmp, "w") as f:
                self.engine.write(
                    [(f, 0, head.ctypes.data, head.size), (f, self.header_bytes, block_ptr, self.geometry.block_bytes)]
                ).wait()
                if self.sync:
                    f.sync()
        except OSError:
            self._unlink(tmp)
            raise
        return tmp

    def open_tmp(self, dirname: str):
        """A new chunk file under a temporary name, for layer-by-layer writes: (path, File)."""
        tmp = str(self.root / dirname / f"{TMP_PREFIX}{uuid.uuid4().hex}")
        return tmp, native.File(tmp, "w")

    def write_layer(self, files: list, blocks: list, layer: int):
        """Submits one layer's range of each block into its (temporary) chunk file; returns the IoBatch."""
        off, length = self.geometry.layer_range(layer)
        hb = self.header_bytes
        return self.engine.write([(f, hb + off, b.ptr + off, length) for f, b in zip(files, blocks)])

    def finish_tmps(self, files: list, headers: list[ChunkHeader]) -> None:
        """Writes the headers of layer-by-layer files (one batch), makes them durable if asked, closes them."""
        heads = [np.frombuffer(h.encode(), dtype=np.uint8) for h in headers]
        try:
            self.engine.write([(f, 0, h.ctypes.data, h.size) for f, h in zip(files, heads)]).wait()
            if self.sync:
                for f in files:
                    f.sync()
        finally:
            for f in files:
                f.close()

    def publish(self, tmp: str, dirname: str, name: str) -> None:
        os.replace(tmp, self.root / dirname / name)

    def discard_tmp(self, tmp: str) -> None:
        """Removes a temporary file (its reservation is the caller's to give back)."""
        self._unlink(tmp)

    def sync_dir(self, dirname: str | None = None) -> None:
        """fsyncs a conversation directory (or the fingerprint directory): makes renames and new entries durable."""
        fd = os.open(self.root / dirname if dirname else self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ---- reading --------------------------------------------------------------

    def path(self, dirname: str, name: str) -> str:
        return str(self.root / dirname / name)

    def open_file(self, dirname: str, name: str):
        """A chunk file opened for reading."""
        return native.File(self.path(dirname, name), "r")

    def read_layer(self, files: list, blocks: list, layer: int):
        """Submits one layer's range of each chunk file into its block; returns the IoBatch."""
        off, length = self.geometry.layer_range(layer)
        hb = self.header_bytes
        return self.engine.read([(f, hb + off, b.ptr + off, length) for f, b in zip(files, blocks)])

    # ---- removal --------------------------------------------------------------

    def delete(self, dirname: str, name: str) -> None:
        """Removes a chunk file (space accounting is the caller's, under its lock)."""
        self._unlink(str(self.root / dirname / name))

    def remove_dir(self, dirname: str) -> None:
        d = self.root / dirname
        try:
            entries = list(os.scandir(d))
        except FileNotFoundError:
            return
        for e in entries:
            if parse_file_name(e.name) is not None:
                self.delete(dirname, e.name)
            else:
                self._unlink(e.path)
        try:
            d.rmdir()
        except OSError:
            pass  # a write still in flight re-creates nothing; its job removes its own file

    @staticmethod
    def _unlink(path: str) -> bool:
        try:
            os.unlink(path)
            return True
        except FileNotFoundError:
            return False
