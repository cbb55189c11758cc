"""A directory held open by descriptor, and every operation inside it done
relative to that descriptor without following symbolic links.

The store owns what lies under its ``disk_dir``, but anyone with access can
plant a symbolic link, a FIFO or a device node there. Working by path would
follow a link out of the directory (and read, overwrite or delete whatever it
points to), and opening a FIFO would block. Here nothing is ever followed:
directories are opened with O_NOFOLLOW|O_DIRECTORY, files with O_NOFOLLOW and
only when they are regular files (checked before opening, so a device is never
opened, and again on the descriptor), and removal is unlinkat/rmdir on the
entry itself. Only the directory the caller names (``Dir.open_path``) is
reached through its path as given: it is the caller's own choice.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import uuid
import weakref
from dataclasses import dataclass

from cachedattn import native
from cachedattn.store import lock_order

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in between the check and the open must not block it.
_FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK

# What opening a new name with O_EXCL|O_NOFOLLOW meets when something already holds it.
_OCCUPIED = (errno.EEXIST, errno.ELOOP, errno.EISDIR, errno.EINVAL)
_TEMP_TRIES = 8

FILE, DIR, OTHER = "file", "dir", "other"  # what an entry is, never looking through a link


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # FILE, DIR or OTHER (a symbolic link, FIFO, socket or device)


def kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return FILE
    if stat.S_ISDIR(mode):
        return DIR
    return OTHER


def check_name(name: str) -> str:
    """A single entry name: never a path, so no operation can leave its directory."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"not a single file name: {name!r}")
    return name


class Dir:
    """An open directory. A shared one (held long, used by many threads) is
    closed by close() once the operations in flight end, so a descriptor number
    is never reused under one of them, or when collected. One that is not
    shared lives in one thread's `with` block and costs no bookkeeping."""

    def __init__(self, fd: int, path: str, shared: bool = True):
        self.path = path  # for messages only: nothing is ever opened through it
        self._fd = fd
        self._shared = shared
        if shared:
            self._users = 0
            users = lock_order.ordered(threading.RLock(), lock_order.FS_DIR, "directory users")
            self._cond = threading.Condition(users)
            self._finalizer = weakref.finalize(self, os.close, fd)

    # ---- opening and closing ------------------------------------------------

    @classmethod
    def open_path(cls, path: str, create: bool = True) -> Dir:
        """The caller's own directory, by its path (which may itself be a link)."""
        if create:
            os.makedirs(path, exist_ok=True)
        return cls(os.open(path, _DIR_FLAGS), os.fspath(path))

    def close(self) -> None:
        if not self._shared:
            fd, self._fd = self._fd, -1
            if fd >= 0:
                os.close(fd)
            return
        with self._cond:
            self._cond.wait_for(lambda: self._users == 0)
            self._fd = -1
            self._finalizer()

    def __enter__(self) -> Dir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def _acquire(self) -> int:
        with self._cond:
            if self._fd < 0:
                raise OSError(errno.EBADF, "directory is closed", self.path)
            self._users += 1
            return self._fd

    def _release(self) -> None:
        with self._cond:
            self._users -= 1
            if self._users == 0:
                self._cond.notify_all()

    def _op(self, fn, *args, **kw):
        if not self._shared:
            if self._fd < 0:
                raise OSError(errno.EBADF, "directory is closed", self.path)
            return fn(self._fd, *args, **kw)
        fd = self._acquire()
        try:
            return fn(fd, *args, **kw)
        finally:
            self._release()

    def child(self, name: str) -> str:
        return os.path.join(self.path, name)

    # ---- looking --------------------------------------------------------------

    def kind(self, name: str) -> str | None:
        """FILE, DIR or OTHER for the entry itself (a link is OTHER), None if absent."""
        check_name(name)

        def run(fd):
            try:
                return kind_of(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
            except FileNotFoundError:
                return None

        return self._op(run)

    def entries(self) -> list[Entry]:
        """What the directory holds, each entry typed by lstat (never through a link)."""

        def run(fd):
            out = []
            with os.scandir(fd) as it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            kind = DIR
                        elif e.is_file(follow_symlinks=False):
                            kind = FILE
                        else:
                            kind = OTHER
                    except FileNotFoundError:
                        continue  # removed while listing
                    out.append(Entry(e.name, kind))
            return out

        return self._op(run)

    # ---- directories ------------------------------------------------------------

    def subdir(self, name: str, create: bool = False, shared: bool = False) -> Dir:
        """The directory `name` opened without following a link. OSError when it is
        absent (unless create), or a link or anything else that is not a directory
        (ENOTDIR). Not shared unless asked: use it in a `with` block."""
        check_name(name)

        def run(fd):
            try:
                return os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
            try:
                os.mkdir(name, 0o755, dir_fd=fd)
            except FileExistsError:
                pass  # made by another thread meanwhile
            return os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)

        try:
            sub = self._op(run)
        except OSError as e:
            raise _named(e, self.child(name)) from None
        return Dir(sub, self.child(name), shared)

    def rmdir(self, name: str) -> None:
        check_name(name)
        self._op(lambda fd: os.rmdir(name, dir_fd=fd))

    def fsync(self) -> None:
        """Makes the directory's entries (creations, renames) durable."""
        self._op(os.fsync)

    # ---- files --------------------------------------------------------------------

    def open_fd(self, name: str, flags: int, mode: int = 0o644) -> int:
        """A descriptor on the regular file `name` (flags: os.O_RDONLY, os.O_RDWR | os.O_CREAT, ...).
        A link, directory, FIFO or device there raises OSError; a device is never opened."""
        check_name(name)
        path = self.child(name)

        def run(dfd):
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                if not flags & os.O_CREAT:
                    raise
            else:
                _require_regular(st.st_mode, path)
            fd = os.open(name, flags | _FILE_FLAGS, mode, dir_fd=dfd)
            try:
                _require_regular(os.fstat(fd).st_mode, path)
                os.set_blocking(fd, True)
            except BaseException:
                os.close(fd)
                raise
            return fd

        try:
            return self._op(run)
        except OSError as e:
            raise _named(e, path) from None

    def open_native(self, name: str, mode: str = "r", direct: str = "auto"):
        """`name` as a native.File for the I/O engine, under the same rules as open_fd."""
        check_name(name)
        return self._op(lambda fd: native.File.openat(fd, name, mode, direct, label=self.child(name)))

    def read_small(self, name: str, limit: int) -> bytes:
        """All of a small regular file; OSError if it is larger than `limit` bytes."""
        fd = self.open_fd(name, os.O_RDONLY)
        try:
            data = b""
            while len(data) <= limit:
                more = os.read(fd, limit + 1 - len(data))
                if not more:
                    return data
                data += more
        finally:
            os.close(fd)
        raise OSError(f"{self.child(name)} is larger than {limit} bytes")

    def temp_name(self, prefix: str) -> str:
        return f"{prefix}{uuid.uuid4().hex}"

    def new_temp(self, prefix: str, create):
        """(name, create(name)) for a fresh temporary name; create must refuse an
        existing entry (O_EXCL). A name someone planted something under is passed over."""
        for _ in range(_TEMP_TRIES - 1):
            name = self.temp_name(prefix)
            try:
                return name, create(name)
            except OSError as e:
                if e.errno not in _OCCUPIED:
                    raise
        name = self.temp_name(prefix)
        return name, create(name)

    def write_new(self, name: str, data: bytes, sync: bool = False) -> None:
        """Creates `name` (which must not exist: O_EXCL) holding `data`."""
        fd = self.open_fd(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if sync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            self.unlink(name)
            raise
        os.close(fd)

    # ---- names ----------------------------------------------------------------------

    def rename(self, src: str, dst: str) -> None:
        """renameat within this directory: an entry at dst that is not a directory
        (a link, a FIFO) is replaced itself, never what it points to."""
        check_name(src), check_name(dst)
        try:
            self._op(lambda fd: os.rename(src, dst, src_dir_fd=fd, dst_dir_fd=fd))
        except OSError as e:
            raise _named(e, self.child(dst)) from None

    def unlink(self, name: str) -> bool:
        """Removes the entry `name` itself (a link, never its target); False if absent.
        IsADirectoryError for a directory, which is never entered."""
        check_name(name)

        def run(fd):
            try:
                os.unlink(name, dir_fd=fd)
                return True
            except FileNotFoundError:
                return False

        try:
            return self._op(run)
        except OSError as e:
            raise _named(e, self.child(name)) from None

    def clear(self, name: str, prefix: str) -> str:
        """Makes `name` free: a link or other non-directory is unlinked (itself), a
        directory is renamed aside under `prefix` (never entered). Returns what was done."""
        if self.kind(name) == DIR:
            aside = self.temp_name(prefix)
            self.rename(name, aside)
            return f"moved aside to {aside}"
        self.unlink(name)
        return "removed"


def _require_regular(mode: int, path: str) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISLNK(mode):
        raise OSError(errno.ELOOP, "refusing to open a symbolic link", path)
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "not a regular file (a directory)", path)
    raise OSError(errno.EINVAL, "not a regular file", path)


def _named(e: OSError, path: str) -> OSError:
    """The same error naming the full path (os functions with dir_fd name only the entry)."""
    if e.filename == path or e.errno is None:
        return e
    msg = "refusing to follow a symbolic link" if e.errno == errno.ELOOP else e.strerror
    return type(e)(e.errno, msg, path)

