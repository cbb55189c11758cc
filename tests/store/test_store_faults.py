"""The file system refusing a delete, a rename or a write (EPERM, EROFS, EIO), a
full disk whose policy has no victim: one warning, host memory only, nothing in
host memory lost, and the conversation goes on turn after turn."""

import errno
import logging
import os
from pathlib import Path

import pytest

from cachedattn.store import EvictionPolicy, LRUPolicy

from .conftest import chunk_bytes
from .kvtruth import check_load, truth_kv

ERRNOS = [errno.EPERM, errno.EROFS, errno.EIO]


def _refuse(monkeypatch, name, err, under):
    """os.<name> fails with err for paths under `under` (the store's directory), and for
    names relative to a directory descriptor (how the store reaches everything below it)."""
    real = getattr(os, name)

    def refused(*args, **kw):
        relative = kw.get("dir_fd") is not None or kw.get("src_dir_fd") is not None
        if relative or any(str(a).startswith(str(under)) for a in args if isinstance(a, (str, os.PathLike))):
            raise OSError(err, os.strerror(err), str(args[0]))
        return real(*args, **kw)

    monkeypatch.setattr(os, name, refused)


def _warnings(caplog):
    return [r for r in caplog.records if r.levelno >= logging.WARNING and "host memory only" in r.getMessage()]


@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize("when", ["drop", "same turn twice", "shorter tail", "disk eviction"])
def test_a_refused_delete_is_one_warning_and_the_conversation_goes_on(make_store, tokens, monkeypatch, caplog, err, when):
    s = make_store(host_chunks=64, disk_chunks=6)
    t = tokens[:40]
    s.append("a", t, truth_kv(t)).result()
    s.flush()
    _refuse(monkeypatch, "unlink", err, s.config.disk_dir)
    with caplog.at_level(logging.WARNING, logger="cachedattn"):
        if when == "drop":
            s.drop("a")
            s.append("a", t, truth_kv(t)).result()
        elif when == "same turn twice":
            s.append("a", t, truth_kv(t, 39), start=39).result()
        elif when == "shorter tail":
            s.append("a", t[:20], truth_kv(t[:20], 16), start=16).result()
            t = t[:20]
        else:
            for i in range(3):  # 3 chunks each: the disk (6 chunks) must evict "a"
                u = tokens[40 + i : 80 + i]
                s.append(f"b{i}", u, truth_kv(u)).result()
        s.flush()
        # Later turns of the same conversation work and are exact.
        with s.load_prefix("a", t) as ld:
            check_load(ld, t)
        t2 = tokens[: len(t) + 30]
        t2[: len(t)] = t
        s.append("a", t2, truth_kv(t2, len(t)), start=len(t)).result()
        s.demote("a")
        with s.load("a", len(t2)) as ld:
            check_load(ld, t2)
    assert len(_warnings(caplog)) == 1
    assert s.stats()["disk_error"]


@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
def test_a_refused_rename_keeps_the_turn_in_host_memory(make_store, tokens, monkeypatch, caplog, err):
    s = make_store()
    _refuse(monkeypatch, "replace", err, s.config.disk_dir)
    _refuse(monkeypatch, "rename", err, s.config.disk_dir)
    t = tokens[:40]
    with caplog.at_level(logging.WARNING, logger="cachedattn"):
        s.append("a", t, truth_kv(t)).result()
        s.flush()
        s.demote("a")  # nowhere to go: stays
        with s.load("a", 40) as ld:
            check_load(ld, t)
        t2 = tokens[:60]
        s.append("a", t2, truth_kv(t2, 40), start=40).result()
        s.drop("b") if "b" in s else None
        s.drop("a")
    assert len(_warnings(caplog)) == 1
    assert not list(Path(s.config.disk_dir).rglob(".tmp-*"))  # a failed rename leaves no temporary file


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO, errno.EROFS], ids=errno.errorcode.get)
@pytest.mark.parametrize("write_through", [True, False])
def test_demote_after_the_disk_failed_keeps_host_only_kv(make_store, tokens, monkeypatch, err, write_through):
    s = make_store(write_through=write_through)
    from cachedattn.store.chunk_files import ChunkFiles

    def fails(self, *a, **k):
        raise OSError(err, os.strerror(err), str(self.root))

    monkeypatch.setattr(ChunkFiles, "write_tmp", fails)
    monkeypatch.setattr(ChunkFiles, "finish_tmps", fails)
    t = tokens[:40]
    s.append("a", t, truth_kv(t)).result()
    s.flush()
    if not write_through:
        s.demote("a")  # the first write fails here
    s.demote("a")
    assert s.lookup("a", t) == 40
    with s.load("a", 40) as ld:
        check_load(ld, t)
    assert s.make_host_room(1 << 40) >= 0  # nothing to demote to: nothing dropped
    assert s.lookup("a", t) == 40


class _NoVictim(LRUPolicy):
    def order(self, candidates, tier):
        return [] if tier == "disk" else super().order(candidates, tier)


@pytest.mark.parametrize("policy", ["queue", "none"])
def test_a_full_disk_with_no_victim_stores_the_turn_in_host_memory_only(make_store, tokens, caplog, policy):
    from cachedattn.store import QueueView
    from cachedattn.store.queue_policies import QueueAwarePolicy

    if policy == "queue":
        pol = QueueAwarePolicy()
        convs = tuple(f"c{i}" for i in range(6))
        pol.on_queue(QueueView(convs, disk_window=len(convs)))  # every conversation queued inside the disk window
    else:
        pol = _NoVictim()
    assert isinstance(pol, EvictionPolicy)
    s = make_store(host_chunks=64, disk_chunks=6, eviction=pol)
    with caplog.at_level(logging.WARNING, logger="cachedattn"):
        for i in range(6):  # 3 chunks each: from the third on the disk is full
            u = tokens[i : 40 + i]
            s.append(f"c{i}", u, truth_kv(u)).result()
        s.flush()
    st = s.stats()
    assert st["disk"]["used_bytes"] <= st["disk"]["capacity_bytes"]
    assert sum("no conversation to evict" in r.getMessage() for r in caplog.records) == 1
    for i in range(6):
        u = tokens[i : 40 + i]
        with s.load("c{}".format(i), 40) as ld:
            check_load(ld, u)
    assert pol.victim([], "disk") is None


def test_a_refused_directory_creation_degrades_to_host_memory(make_store, tokens, monkeypatch, caplog):
    s = make_store()
    _refuse(monkeypatch, "mkdir", errno.EACCES, s.config.disk_dir)
    t = tokens[:40]
    with caplog.at_level(logging.WARNING, logger="cachedattn"):
        s.append("a", t, truth_kv(t)).result()
        s.append("b", t, truth_kv(t)).result()
    assert len(_warnings(caplog)) == 1
    with s.load("b", 40) as ld:
        check_load(ld, t)
    assert chunk_bytes() > 0


@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
def test_a_refused_read_is_a_miss_from_that_chunk_on(make_store, tokens, monkeypatch, err):
    from cachedattn.store import ChunkCorruptError
    from cachedattn.store.chunk_files import ChunkFiles

    s = make_store()
    t = tokens[:64]
    s.append("a", t, truth_kv(t)).result()
    s.demote("a")
    real = ChunkFiles.open_file

    def refused(self, dirname, name):
        if name.startswith("00000002."):
            raise OSError(err, os.strerror(err), name)
        return real(self, dirname, name)

    monkeypatch.setattr(ChunkFiles, "open_file", refused)
    with pytest.raises(ChunkCorruptError) as ei:  # the documented "recompute from here"
        s.load("a", 64)
    assert ei.value.errno == err
    assert s.lookup("a", t) == 32
    assert s.prefetch("a").result(timeout=30) >= 0
    s.append("a", t, truth_kv(t, 32), start=32).result()  # the turn redone from the cut
    s.demote("a")
    monkeypatch.setattr(ChunkFiles, "open_file", real)
    with s.load("a", 64) as ld:
        check_load(ld, t)
