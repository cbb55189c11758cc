"""The store never reads, writes or deletes anything outside disk_dir, whatever
was planted inside it (symbolic links, hard links, FIFOs, directories in place
of files), and keeps working for every conversation it can.

Each test plants something in a store directory that points to (or stands for)
a sentinel tree outside disk_dir, runs the store through open, put, load,
demote, drop, reopen and close, and checks that the sentinel tree is exactly as
it was: same entries, contents and modification times.
"""

import errno
import logging
import os
import shutil
import stat
import threading
import uuid
from pathlib import Path

import pytest

from cachedattn import AttentionStore
from cachedattn.store import keys

from .conftest import CHUNK, SPEC, assert_kv_equal, chunk_bytes, make_kv, read_all

N = 40  # tokens per conversation: chunks of 16, 16 and 8
FINGERPRINT = SPEC.fingerprint


@pytest.fixture
def outside(tmp_path):
    """A tree outside disk_dir shaped like store content, so following a link into it would touch it."""
    out = tmp_path / "outside"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "data.txt").write_bytes(b"outside data")
    (out / FINGERPRINT / "sub").mkdir(parents=True)
    (out / FINGERPRINT / "sub" / "data.txt").write_bytes(b"outside data too")
    (out / "id").write_bytes(b"intruder")
    (out / "sentinel.kv").write_bytes(os.urandom(3000))
    return out


def snapshot(root: Path) -> dict:
    """Every entry under root, never following links: type, size, mtime and file bytes."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in [".", *dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            data = Path(p).read_bytes() if stat.S_ISREG(st.st_mode) else None
            snap[os.path.relpath(p, root)] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns, data)
    return snap


@pytest.fixture
def stores():
    opened = []
    yield opened
    for s in opened:
        s.close()


@pytest.fixture
def disk(tmp_path):
    return tmp_path / "kv"


def open_store(stores, disk, **kw):
    s = AttentionStore(
        host_bytes=64 * chunk_bytes(),
        disk_dir=str(disk),
        disk_bytes=256 * (chunk_bytes() + 4096),
        chunk_tokens=CHUNK,
        spec=SPEC,
        hugepages="off",
        **kw,
    )
    stores.append(s)
    return s


def conv_dir(disk, conv_id):
    return disk / "cachedattn-v1" / FINGERPRINT / keys.conversation_dirname(conv_id)


def chunk_file(disk, conv_id, index):
    (path,) = [p for p in conv_dir(disk, conv_id).iterdir() if p.name.startswith(f"{index:08d}.")]
    return path


TOKS = {"victim": list(range(100, 100 + N)), "other": list(range(500, 500 + N))}
KV = {"victim": make_kv(SPEC, N, 1), "other": make_kv(SPEC, N, 2)}


def check(s, conv_id, expect=N):
    """The store serves exactly what was put for the tokens it reports."""
    n = s.lookup(conv_id, TOKS[conv_id])
    assert n == expect
    if n:
        assert_kv_equal(read_all(s, conv_id, n), KV[conv_id], upto=n)


def put(s, conv_id, upto=N, start=0):
    kv = [(k[:, start:upto], v[:, start:upto]) for k, v in KV[conv_id]]
    s.append(conv_id, TOKS[conv_id][:upto], kv, start=start).result()
    s.flush()


def first_session(stores, disk):
    s = open_store(stores, disk)
    for cid in TOKS:
        put(s, cid)
    s.close()


def full_lifecycle(stores, disk):
    """Open, put, load from host and from disk, reopen, drop, reopen, close."""
    s = open_store(stores, disk)
    for cid in TOKS:
        put(s, cid)
        check(s, cid)
        s.demote(cid)
        check(s, cid)
    s.close()
    s = open_store(stores, disk)
    for cid in TOKS:
        check(s, cid)
    s.drop("victim")
    s.close()
    s = open_store(stores, disk)
    assert s.conversations() == ["other"]
    check(s, "other")
    s.close()


def warned(caplog, text):
    return any(text in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# ---- the lock file ---------------------------------------------------------------


@pytest.mark.parametrize("planted", ["symlink", "dangling symlink", "hard link"])
def test_lock_file_planted_as_a_link_is_refused_and_its_target_untouched(stores, disk, outside, planted):
    disk.mkdir()
    lock = disk / ".cachedattn.lock"
    if planted == "symlink":
        lock.symlink_to(outside / "sentinel.kv")
    elif planted == "dangling symlink":
        lock.symlink_to(outside / "created-by-the-store")
    else:
        os.link(outside / "sentinel.kv", lock)
    before = snapshot(outside)
    with pytest.raises(OSError) as ei:
        open_store(stores, disk)
    assert ei.value.filename == str(lock)
    assert snapshot(outside) == before


# ---- directories -------------------------------------------------------------------


@pytest.mark.parametrize("where", ["cachedattn-v1", "fingerprint", "conversation"])
def test_symlinked_store_directory_is_never_entered(stores, disk, outside, caplog, where):
    """A link in place of a store directory is not followed: opening does not delete through it,
    chunk files are not written into its target, drop() deletes nothing there."""
    target = {
        "cachedattn-v1": disk / "cachedattn-v1",
        "fingerprint": disk / "cachedattn-v1" / FINGERPRINT,
        "conversation": conv_dir(disk, "victim"),
    }[where]
    target.parent.mkdir(parents=True)
    target.symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    full_lifecycle(stores, disk)
    assert snapshot(outside) == before
    assert warned(caplog, "never followed")


def test_symlinked_conversation_directory_is_skipped_at_open(stores, disk, outside, caplog):
    first_session(stores, disk)
    d = conv_dir(disk, "victim")
    shutil.rmtree(d)
    d.symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    s = open_store(stores, disk)
    assert s.conversations() == ["other"]
    assert warned(caplog, str(d))
    check(s, "other")
    put(s, "victim")  # the link is replaced by a directory of the store's own
    s.close()
    s = open_store(stores, disk)
    check(s, "victim")
    check(s, "other")
    s.close()
    assert snapshot(outside) == before


# ---- files inside a conversation directory -----------------------------------------------


def test_symlinked_chunk_file_is_never_read_and_is_unlinked_itself(stores, disk, outside, tmp_path, caplog):
    """A link in place of chunk 1, to a valid chunk of the same conversation holding other KV:
    the store never serves it, removes the link (not its target) and keeps chunk 0."""
    first_session(stores, disk)
    elsewhere = tmp_path / "elsewhere"
    s = open_store(stores, elsewhere)
    s.append("victim", TOKS["victim"], make_kv(SPEC, N, 99)).result()
    s.close()
    shutil.copy(chunk_file(elsewhere, "victim", 1), outside / "valid-other.kv")
    link = chunk_file(disk, "victim", 1)
    link.unlink()
    link.symlink_to(outside / "valid-other.kv")
    before = snapshot(outside)
    s = open_store(stores, disk)
    check(s, "victim", expect=CHUNK)
    check(s, "other")
    assert not os.path.lexists(link)
    assert warned(caplog, str(link))
    put(s, "victim", start=CHUNK)
    s.drop("other")
    s.close()
    s = open_store(stores, disk)
    check(s, "victim")
    s.drop("victim")
    s.close()
    assert snapshot(outside) == before


def test_symlinked_id_file_is_never_read(stores, disk, outside, caplog):
    first_session(stores, disk)
    idf = conv_dir(disk, "victim") / "id"
    idf.unlink()
    idf.symlink_to(outside / "id")  # says "intruder"
    before = snapshot(outside)
    s = open_store(stores, disk)
    assert s.conversations() == ["other"]
    assert warned(caplog, "without a readable id")
    check(s, "other")
    put(s, "victim")
    s.close()
    s = open_store(stores, disk)
    assert sorted(s.conversations()) == ["other", "victim"]
    check(s, "victim")
    s.drop("victim")
    s.close()
    assert snapshot(outside) == before


def test_symlinked_temporary_file_name_is_never_written_through(stores, disk, outside, monkeypatch):
    """The first temporary names the store picks are links planted ahead of it (as if guessed)."""
    first_session(stores, disk)
    planted = uuid.UUID(int=0x5EED)
    d = conv_dir(disk, "victim")
    for prefix in (".tmp-", ".tmp-id-"):
        (d / f"{prefix}{planted.hex}").symlink_to(outside / "sentinel.kv")
    real = uuid.uuid4
    calls = []

    def guessed():
        calls.append(1)
        return planted if len(calls) <= 3 else real()

    before = snapshot(outside)
    s = open_store(stores, disk)
    monkeypatch.setattr(uuid, "uuid4", guessed)
    s.drop("victim")
    put(s, "victim")
    monkeypatch.setattr(uuid, "uuid4", real)
    assert len(calls) > 3
    check(s, "victim")
    s.demote("victim")
    check(s, "victim")
    s.close()
    s = open_store(stores, disk)
    check(s, "victim")
    check(s, "other")
    s.close()
    assert snapshot(outside) == before
    assert not [p for p in d.iterdir() if p.name.startswith(".tmp-")]


def test_fifo_in_place_of_a_chunk_never_blocks(stores, disk, outside, caplog):
    first_session(stores, disk)
    fifo = chunk_file(disk, "victim", 1)
    fifo.unlink()
    os.mkfifo(fifo)
    result = {}

    def run():
        try:
            s = open_store(stores, disk)
            result["victim"] = s.lookup("victim", TOKS["victim"])
            check(s, "other")
            s.close()
        except BaseException as e:  # reported below
            result["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    if t.is_alive():  # blocked opening the FIFO: a writer end releases it, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(60)
        pytest.fail("the store blocked opening a FIFO planted in place of a chunk file")
    if "error" in result:
        raise result["error"]
    assert result["victim"] == CHUNK
    assert not os.path.lexists(fifo)
    assert warned(caplog, str(fifo))
    s = open_store(stores, disk)
    check(s, "victim", expect=CHUNK)
    s.close()


def test_directory_in_place_of_a_chunk_is_never_entered(stores, disk, outside, caplog):
    first_session(stores, disk)
    planted = chunk_file(disk, "victim", 1)
    planted.unlink()
    planted.mkdir()
    (planted / "keep.txt").write_bytes(b"not the store's")
    (planted / "link").symlink_to(outside / "sentinel.kv")
    before = snapshot(outside)
    s = open_store(stores, disk)
    check(s, "victim", expect=CHUNK)
    check(s, "other")
    assert warned(caplog, str(planted))
    put(s, "victim", start=CHUNK)  # needs the planted directory's name back
    s.drop("other")
    s.close()
    s = open_store(stores, disk)
    check(s, "victim")
    s.drop("victim")
    s.close()
    assert snapshot(outside) == before
    kept = [p for p in disk.rglob("keep.txt")]
    assert len(kept) == 1 and kept[0].read_bytes() == b"not the store's"
    assert (kept[0].parent / "link").is_symlink()


# ---- lifecycle and names ---------------------------------------------------------------


def _bad_spec(stores, disk, monkeypatch):
    AttentionStore(host_bytes=16, disk_dir=str(disk), disk_bytes=1 << 30, chunk_tokens=CHUNK, spec=SPEC)


def _disk_full_writing_the_lock(stores, disk, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    try:
        open_store(stores, disk)
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("fail", [_bad_spec, _disk_full_writing_the_lock], ids=["bad spec", "disk full writing the lock"])
def test_failed_constructor_releases_the_directory(stores, disk, monkeypatch, fail):
    with pytest.raises((OSError, ValueError)):
        fail(stores, disk, monkeypatch)
    s = open_store(stores, disk)  # the same process opens the directory again
    put(s, "other")
    check(s, "other")


@pytest.mark.parametrize(
    "conv_id",
    ["carriage\rreturn", "crlf\r\nline", "trailing\r", "new\nline", "\n", "\r", "nel\x85ls\u2028ps\u2029", "tab\tsp ace",
     "../..//x", " ", "\u00e9\U0001f600", "\x7f\x01"],
)
def test_conversation_id_survives_a_reopen(stores, disk, conv_id):
    s = open_store(stores, disk)
    kv = KV["other"]
    s.append(conv_id, TOKS["other"], kv).result()
    s.close()
    s = open_store(stores, disk)
    assert s.conversations() == [conv_id]
    assert s.lookup(conv_id, TOKS["other"]) == N
    assert_kv_equal(read_all(s, conv_id, N), kv)


def test_sync_writes_makes_each_rename_durable(stores, disk, monkeypatch):
    """With sync_writes=True the conversation directory is fsynced after a chunk file is renamed into it."""
    synced_dirs = []
    real_fsync = os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            names = sorted(os.listdir(fd))
            synced_dirs.append(((st.st_dev, st.st_ino), names))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    s = open_store(stores, disk, sync_writes=True)
    put(s, "victim")
    st = os.stat(conv_dir(disk, "victim"))
    published = sorted(p.name for p in conv_dir(disk, "victim").iterdir() if p.name.endswith(".kv"))
    assert len(published) == 3
    seen = set()
    for inode, names in synced_dirs:
        if inode == (st.st_dev, st.st_ino):
            seen.update(n for n in names if n.endswith(".kv"))
    assert seen == set(published)


def test_planted_entries_are_reported_in_one_warning_per_open(stores, disk, outside, caplog):
    first_session(stores, disk)
    fp = disk / "cachedattn-v1" / FINGERPRINT
    (fp / "link-to-dir").symlink_to(outside, target_is_directory=True)
    os.mkfifo(fp / "fifo")
    chunk = chunk_file(disk, "other", 2)
    chunk.unlink()
    chunk.symlink_to(outside / "sentinel.kv")
    before = snapshot(outside)
    caplog.clear()
    s = open_store(stores, disk)
    check(s, "victim")
    check(s, "other", expect=2 * CHUNK)
    s.close()
    found = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(found) == 1 and "3 entries" in found[0]
    assert snapshot(outside) == before
