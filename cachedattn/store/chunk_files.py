"""The disk tier's files: one file per chunk under
``disk_dir/cachedattn-v1/<model fingerprint>/<conversation digest>/``, plus an
``id`` file per conversation directory holding the conversation's id.

Files are written under a temporary name and renamed when complete; at open
the directories are listed (no manifest to rewrite on every put), temporary
leftovers of a crash are deleted, and chunk headers are read lazily, when a
conversation is first used. A lock file refuses a second store on the same
directory while the first is open (the kernel drops it if the process dies).

Nothing here ever reads, writes or deletes outside ``disk_dir``, whatever was
planted inside it: every file and directory is reached through directory
descriptors without following symbolic links (cachedattn.store.fsdir). What is
not a directory or regular file where one is expected is never followed: a
link, FIFO or device under a chunk or temporary name is unlinked itself, one
under a directory's name is skipped at open and replaced when the store needs
that name, and a directory where a file belongs is never entered (moved aside
under a temporary name when the store needs that name). Each open logs such
finds in one warning.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import weakref
from pathlib import Path

import numpy as np

from cachedattn.store import keys
from cachedattn.store.record import ChunkHeader, header_bytes
from cachedattn.store.fsdir import DIR, FILE, Dir
from cachedattn.store.spec import ChunkGeometry

log = logging.getLogger("cachedattn")
LOCK_NAME = ".cachedattn.lock"
SUFFIX = ".kv"
TMP_PREFIX = ".tmp-"


# ---- file names: ``{index:08d}.{ntokens:05d}.{key hex}.{generation:016x}{tail}{random:06x}.kv``
#
# The key names the content; the generation (one per save, increasing, also across restarts)
# names this one write of it, so that rewriting a chunk (the same turn twice, a conversation
# dropped and stored anew) never produces the name of a file that something may still delete,
# and recovery can tell the newest complete save; tail is 1 on the last chunk of its save; the
# random part tells two writes of one chunk apart. Names with a random version or none (older
# stores) are read too, ranked oldest.


def file_name(index: int, ntokens: int, key: bytes, gen: int, tail: bool) -> str:
    """A fresh chunk file name. Its version: the generation of the save that made the chunk
    (16 hex digits, increasing across saves and restarts), whether the chunk was that save's
    last (a chain from the root to such a chunk is a complete save: recovery.py), and 6
    random hex digits, so that writing the same chunk again (after its file was evicted)
    never makes the name of a file whose deletion may still be pending."""
    return f"{index:08d}.{ntokens:05d}.{key.hex()}.{gen:016x}{int(bool(tail))}{os.urandom(3).hex()}{SUFFIX}"


def parse_version(name: str) -> tuple[int, bool]:
    """(generation, is a save's last chunk) of a chunk file name; (-1, False) for names
    of older stores (a random version, or none), which rank below every generation."""
    parts = name[: -len(SUFFIX)].split(".")
    if len(parts) == 4 and len(parts[3]) == 23 and parts[3][16] in "01":
        return int(parts[3][:16], 16), parts[3][16] == "1"
    return -1, False


def parse_file_name(name: str) -> tuple[int, int, bytes] | None:
    """(index, ntokens, key) from a chunk file name, or None if it is not one."""
    if not name.endswith(SUFFIX) or name.startswith("."):
        return None
    parts = name[: -len(SUFFIX)].split(".")
    if len(parts) not in (3, 4) or len(parts[2]) != 32:
        return None
    if len(parts) == 4 and not (parts[3] and all(ch in "0123456789abcdef" for ch in parts[3])):
        return None
    try:
        return int(parts[0]), int(parts[1]), bytes.fromhex(parts[2])
    except ValueError:
        return None



class DirectoryLock:
    """An exclusive lock on disk_dir for one store at a time, by flock on
    ``disk_dir/.cachedattn.lock``, which holds the owner's pid for messages."""

    def __init__(self, disk_dir: str):
        self.path = os.path.join(disk_dir, LOCK_NAME)
        with Dir.open_path(disk_dir) as d:
            try:
                fd = d.open_fd(LOCK_NAME, os.O_RDWR | os.O_CREAT)
            except OSError as e:
                raise OSError(
                    e.errno, f"cannot use the store's lock file ({e.strerror}; remove it if it is not a store's)", self.path
                ) from None
        self._fd = fd
        # A lock that is never released explicitly goes with its object.
        self._finalizer = weakref.finalize(self, os.close, fd)
        try:
            self._take(disk_dir)
        except BaseException:
            self.release()
            raise

    def _take(self, disk_dir: str) -> None:
        if os.fstat(self._fd).st_nlink != 1:
            # A hard link planted under this name: writing the pid would write into another file.
            raise OSError(errno.EMLINK, "the store's lock file has other hard links; refusing to write it", self.path)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "unknown"
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
            self._fd = -1
            self._finalizer()  # closes the descriptor


class ChunkFiles:
    """The files of one model's chunks (their space is counted by the index: index.DiskSpace)."""

    def __init__(self, disk_dir: str, fingerprint: str, geometry: ChunkGeometry, engine, sync: bool):
        self.root = Path(disk_dir) / "cachedattn-v1" / fingerprint  # for messages
        self.sync = sync
        self._root_path = str(self.root)
        with Dir.open_path(disk_dir) as base:
            with self._own_dir(base, "cachedattn-v1") as top:
                self._root = self._own_dir(top, fingerprint, shared=True)
        self.geometry = geometry
        self.header_bytes = header_bytes(geometry.spec.num_layers, geometry.chunk_tokens)
        self.file_bytes = self.header_bytes + geometry.block_bytes
        self.engine = engine

    def close(self) -> None:
        self._root.close()

    def _own_dir(self, parent: Dir, name: str, shared: bool = False) -> Dir:
        """parent/name as a directory of the store's, created if absent. Whatever else
        holds that name (a link, a file) is removed itself, never followed."""
        try:
            return parent.subdir(name, create=True, shared=shared)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
        what = parent.clear(name, TMP_PREFIX)
        log.warning(
            "cachedattn: %s is not a directory (a symbolic link or other file, never followed); %s",
            parent.child(name),
            what,
        )
        d = parent.subdir(name, create=True, shared=shared)
        if self.sync:
            parent.fsync()
        return d

    def _conv_dir(self, dirname: str) -> Dir | None:
        """An existing conversation directory, or None when that name holds none
        (absent, or a link or file in its place: never followed)."""
        try:
            return self._root.subdir(dirname)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                return None
            raise

    def _required_conv_dir(self, dirname: str) -> Dir:
        cdir = self._conv_dir(dirname)
        if cdir is None:
            raise FileNotFoundError(errno.ENOENT, "conversation directory is missing", str(self.root / dirname))
        return cdir

    # ---- discovery ------------------------------------------------------------

    def scan(self) -> dict[str, tuple[str, list[tuple[int, int, bytes, str]]]]:
        """{conversation id: (dirname, [(index, ntokens, key, file name)])}."""
        found: dict[str, tuple[str, list]] = {}
        odd: list[str] = []  # entries that are not what belongs there: never followed
        for e in self._root.entries():
            cdir = self._conv_dir(e.name) if e.kind == DIR else None
            if cdir is None:
                odd.append(self._root.child(e.name))
                continue
            with cdir:
                conv_id = self._read_id(cdir, e.name)
                files = self._scan_conversation(cdir, odd) if conv_id is not None else None
            if conv_id is None:
                log.warning("cachedattn: removing conversation directory without a readable id: %s", cdir.path)
                self.remove_dir(e.name)
                continue
            found[conv_id] = (e.name, files)
        if odd:
            log.warning(
                "cachedattn: %d entries in %s are not the regular files or directories the store expects there "
                "(symbolic links, FIFOs, devices, directories in place of files); none was followed, links and "
                "special files under chunk or temporary names were removed themselves: %s",
                len(odd),
                self.root,
                ", ".join(odd[:5]) + (", ..." if len(odd) > 5 else ""),
            )
        return found

    @staticmethod
    def _read_id(cdir: Dir, dirname: str) -> str | None:
        try:
            # Bytes, not text: text mode would turn '\r' and '\r\n' in an id into '\n'.
            conv_id = cdir.read_small("id", keys.MAX_ID_BYTES).decode("utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        if not conv_id or keys.conversation_dirname(conv_id) != dirname:
            return None  # not this directory's id: damaged or not the store's
        return conv_id

    def _scan_conversation(self, cdir: Dir, odd: list[str]) -> list:
        files = []
        for f in cdir.entries():
            temporary = f.name.startswith(TMP_PREFIX)
            parsed = None if temporary else parse_file_name(f.name)
            if not temporary and parsed is None:
                continue  # the id file, or not the store's
            if f.kind == DIR:
                odd.append(cdir.child(f.name))  # never entered
            elif temporary or f.kind != FILE:
                # A write a crash cut short, or a link or special file under a store name: the entry itself goes.
                if f.kind != FILE:
                    odd.append(cdir.child(f.name))
                try:
                    cdir.unlink(f.name)
                except IsADirectoryError:
                    pass  # became a directory meanwhile: left alone
            else:
                files.append((*parsed, f.name))
        return files

    def read_header(self, dirname: str, name: str) -> ChunkHeader:
        cdir = self._required_conv_dir(dirname)
        with cdir:
            fd = cdir.open_fd(name, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            data = os.pread(fd, self.header_bytes, 0)
        finally:
            os.close(fd)
        if size != self.file_bytes:
            raise ValueError(f"chunk file is {size} bytes, expected {self.file_bytes}")
        return ChunkHeader.decode(data)

    # ---- writing --------------------------------------------------------------

    def ensure_conversation_dir(self, dirname: str, conv_id: str) -> None:
        with self._own_dir(self._root, dirname) as cdir:
            kind = cdir.kind("id")
            if kind == FILE:
                return
            if kind is not None:
                what = cdir.clear("id", TMP_PREFIX)
                log.warning("cachedattn: %s is not a regular file (never followed); %s", cdir.child("id"), what)
            tmp, _ = cdir.new_temp(f"{TMP_PREFIX}id-", lambda n: cdir.write_new(n, conv_id.encode("utf-8"), self.sync))
            try:
                cdir.rename(tmp, "id")
            except OSError:
                cdir.unlink(tmp)
                raise
            if self.sync:
                cdir.fsync()
                self._root.fsync()  # the conversation directory's own entry

    def _open_new(self, dirname: str):
        """A new temporary chunk file (O_EXCL, never through a link): (token, File)."""
        cdir = self._required_conv_dir(dirname)
        with cdir:
            name, f = cdir.new_temp(TMP_PREFIX, lambda n: cdir.open_native(n, "x"))
        return f"{self._root_path}/{dirname}/{name}", f

    def write_tmp(self, dirname: str, header: ChunkHeader, block_ptr: int) -> str:
        """Writes a whole chunk file under a temporary name; returns its token for publish/discard_tmp."""
        tmp, f = self._open_new(dirname)
        head = np.frombuffer(header.encode(), dtype=np.uint8)
        try:
            with f:
                self.engine.write(
                    [(f, 0, head.ctypes.data, head.size), (f, self.header_bytes, block_ptr, self.geometry.block_bytes)]
                ).wait()
                if self.sync:
                    f.sync()
        except OSError:
            self._unlink_tmp(tmp)
            raise
        return tmp

    def open_tmp(self, dirname: str):
        """A new chunk file under a temporary name, for layer-by-layer writes: (token, File)."""
        return self._open_new(dirname)

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
        """Renames a temporary file to its chunk name within its directory (and, with
        sync, makes the rename durable). A link at that name is replaced itself."""
        tmp_dir, tmp_name = self._split_tmp(tmp)
        if tmp_dir != dirname:
            raise ValueError(f"temporary file {tmp} is not in conversation directory {dirname}")
        cdir = self._required_conv_dir(dirname)
        with cdir:
            try:
                cdir.rename(tmp_name, name)
            except OSError:
                if cdir.kind(name) != DIR:
                    raise
                what = cdir.clear(name, TMP_PREFIX)
                log.warning("cachedattn: a directory stood at chunk file %s (never entered); %s", cdir.child(name), what)
                cdir.rename(tmp_name, name)
            if self.sync:
                cdir.fsync()  # a rename is durable once its directory is

    def discard_tmp(self, tmp: str) -> None:
        """Removes a temporary file (its reservation is the caller's to give back)."""
        self._unlink_tmp(tmp)

    def _split_tmp(self, tmp: str) -> tuple[str, str]:
        root, dirname, name = tmp.rsplit("/", 2)
        if root != self._root_path or not name.startswith(TMP_PREFIX):
            raise ValueError(f"not a temporary file of this store: {tmp}")
        return dirname, name

    def _unlink_tmp(self, tmp: str) -> None:
        dirname, name = self._split_tmp(tmp)
        cdir = self._conv_dir(dirname)
        if cdir is not None:
            with cdir:
                cdir.unlink(name)

    # ---- reading --------------------------------------------------------------

    def path(self, dirname: str, name: str) -> str:
        """Where a file lives, for messages: nothing is opened through it."""
        return str(self.root / dirname / name)

    def open_file(self, dirname: str, name: str):
        """A chunk file opened for reading (native.File), never through a link, only if regular."""
        cdir = self._required_conv_dir(dirname)
        with cdir:
            return cdir.open_native(name, "r")

    def read_layer(self, files: list, blocks: list, layer: int):
        """Submits one layer's range of each chunk file into its block; returns the IoBatch."""
        off, length = self.geometry.layer_range(layer)
        hb = self.header_bytes
        return self.engine.read([(f, hb + off, b.ptr + off, length) for f, b in zip(files, blocks)])

    # ---- removal --------------------------------------------------------------

    def delete(self, dirname: str, name: str) -> None:
        """Removes a chunk file (space accounting is the caller's, under its lock)."""
        cdir = self._conv_dir(dirname)
        if cdir is None:
            return  # nothing of the store's there
        with cdir:
            self._delete_in(cdir, name, cdir.kind(name))

    def _delete_in(self, cdir: Dir, name: str, kind: str | None) -> None:
        if kind == DIR:
            log.warning("cachedattn: %s is a directory, not a chunk file; left alone (never entered)", cdir.child(name))
            return
        try:
            cdir.unlink(name)  # a link goes itself, never its target
        except IsADirectoryError:
            return

    def remove_dir(self, dirname: str) -> None:
        cdir = self._conv_dir(dirname)
        if cdir is None:
            if self._root.kind(dirname) not in (None, DIR):
                self._root.unlink(dirname)  # a link or file under the name: the entry itself
            return
        with cdir:
            for e in cdir.entries():
                self._delete_in(cdir, e.name, e.kind)
        try:
            self._root.rmdir(dirname)
        except OSError:
            pass  # a write still in flight re-creates nothing; its job removes its own file
