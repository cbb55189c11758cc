"""A store lets go of everything it holds however it ends: a constructor that
fails, a store collected without close(), close() with loads and appends still
open; after close every call raises one clear error."""

import errno
import gc
import os
from pathlib import Path

import pytest
from cachedattn import AttentionStore

from .conftest import CHUNK, SPEC, chunk_bytes
from .kvtruth import check_load, truth_kv


def _open(d, **kw):
    args = dict(host_bytes=64 * chunk_bytes(), disk_dir=str(d), disk_bytes=256 * (chunk_bytes() + 4096),
                chunk_tokens=CHUNK, spec=SPEC, hugepages="off")
    args.update(kw)
    return AttentionStore(**args)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_lock_that_cannot_be_written_is_released(tmp_path, monkeypatch):
    real = os.pwrite

    def full(fd, data, off):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    before = _fds()
    with pytest.raises(OSError, match="No space"):
        _open(tmp_path / "kv")
    monkeypatch.setattr(os, "pwrite", real)
    assert _fds() == before
    _open(tmp_path / "kv").close()  # the same process opens it again


@pytest.mark.parametrize("bad", ["host_bytes", "disk_bytes", "spec"])
def test_a_failed_constructor_releases_the_directory(tmp_path, bad):
    d = tmp_path / "kv"
    before = _fds()
    kw = {"host_bytes": {"host_bytes": 16}, "disk_bytes": {"disk_bytes": 16}, "spec": {"spec": object()}}[bad]
    with pytest.raises((ValueError, TypeError, AttributeError)):
        _open(d, **kw)
    assert _fds() == before
    with _open(d) as s2:
        assert s2.conversations() == []


def test_a_store_collected_without_close_releases_its_lock(tmp_path, tokens):
    s = _open(tmp_path / "kv")
    t = tokens[:40]
    s.append("a", t, truth_kv(t)).result()
    del s
    gc.collect()
    with _open(tmp_path / "kv") as s2:  # opens: the lock went with the collected store
        with s2.load("a", 40) as ld:
            check_load(ld, t)


def test_a_store_handed_to_a_call_that_raises_is_released(tmp_path):
    def patch_like(model, store):
        raise TypeError("not a model")

    with pytest.raises(TypeError):
        patch_like(object(), _open(tmp_path / "kv"))
    gc.collect()
    _open(tmp_path / "kv").close()


@pytest.mark.parametrize("where", ["host", "disk"])
def test_close_ends_open_loads(tmp_path, tokens, where):
    s = _open(tmp_path / "kv")
    t = tokens[:64]
    s.append("a", t, truth_kv(t)).result()
    if where == "disk":
        s.demote("a")
    ld = s.load("a", 64, readahead=1)
    ld.read_layer(0)
    s.close()
    with pytest.raises(ValueError, match="store is closed"):
        ld.read_layer(1)
    ld.close()  # harmless
    _open(tmp_path / "kv").close()


def test_close_aborts_open_appends_and_leaves_no_temporary_file(tmp_path, tokens):
    s = _open(tmp_path / "kv")
    t = tokens[:64]
    before = _fds()
    txn = s.begin_append("a", t, 0)
    kv = truth_kv(t)
    txn.put_layer(0, *kv[0])
    s.close()
    with pytest.raises(ValueError, match="store is closed"):
        txn.put_layer(1, *kv[1])
    txn.abort()
    with pytest.raises(ValueError, match="store is closed"):
        txn.commit()
    assert not list(Path(tmp_path / "kv").rglob(".tmp-*"))
    assert _fds() <= before
    with _open(tmp_path / "kv") as s2:
        assert s2.lookup("a", t) == 0


def test_an_append_whose_block_release_raises_still_gives_back_its_lease_and_other_blocks(tmp_path, tokens):
    """A release that raises (here a checkpoint watcher: a block still under a copy) must not keep the
    append's lease: store.close() waits for every lease."""
    import threading

    from cachedattn.transfer import checkpoints

    class RefuseFirst:
        raised = 0

        def host_release(self, ptr, nbytes):
            if not self.raised:
                self.raised += 1
                raise RuntimeError("host block released under a pending copy")

    s = _open(tmp_path / "kv")
    txn = s.begin_append("a", tokens[:64], 0)  # 4 chunks: 4 host blocks
    used = s.stats()["host"]["used_bytes"]
    watcher = RefuseFirst()
    checkpoints.watch(watcher)
    try:
        with pytest.raises(RuntimeError, match="pending copy"):
            txn.abort()
    finally:
        checkpoints.unwatch(watcher)
    assert s.stats()["host"]["used_bytes"] == used // 4  # the refused block stays out; the others went back
    closer = threading.Thread(target=s.close, daemon=True)
    closer.start()
    closer.join(20)
    assert not closer.is_alive(), "store.close() hangs on the aborted append's lease"


CALLS = {
    "lookup": lambda s, t: s.lookup("a", t),
    "load": lambda s, t: s.load("a", 10),
    "load_prefix": lambda s, t: s.load_prefix("a", t),
    "begin_append": lambda s, t: s.begin_append("a", t, 0),
    "append": lambda s, t: s.append("a", t[:20], truth_kv(t[:20])),
    "prefetch": lambda s, t: s.prefetch("a"),
    "demote": lambda s, t: s.demote("a"),
    "drop": lambda s, t: s.drop("a"),
    "stored_tokens": lambda s, t: s.stored_tokens("a"),
    "conversations": lambda s, t: s.conversations(),
    "contains": lambda s, t: "a" in s,
    "residency": lambda s, t: s.residency("a"),
    "host_free_bytes": lambda s, t: s.host_free_bytes(),
    "mean_conversation_bytes": lambda s, t: s.mean_conversation_bytes(),
    "make_host_room": lambda s, t: s.make_host_room(1),
    "attach": lambda s, t: s.attach(SPEC),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_every_call_on_a_closed_store_raises_one_clear_error(tmp_path, tokens, call):
    s = _open(tmp_path / "kv")
    t = tokens[:40]
    s.append("a", t, truth_kv(t)).result()
    s.close()
    with pytest.raises(ValueError, match="the store is closed"):
        CALLS[call](s, t)
    s.close()  # a second close is a no-op
    s.stats()  # counters stay readable


def test_sync_writes_makes_each_rename_durable(tmp_path, tokens, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    s = _open(tmp_path / "kv", sync_writes=True)
    t = tokens[:40]
    s.append("a", t, truth_kv(t)).result()
    conv_dir = next(Path(tmp_path / "kv").rglob("*.kv")).parent
    assert synced.count(str(conv_dir)) >= 3  # one per chunk rename (3 chunks), plus its creation
    assert str(conv_dir.parent) in synced  # the new directory's own entry
    s.close()
