import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cachedattn import AttentionStore, ChunkCorruptError, KVSpec

from .conftest import CHUNK, SPEC, assert_kv_equal, make_kv, read_all


def _chunk_files(root):
    return sorted(p for p in Path(root).rglob("*.kv"))


def test_second_store_on_same_directory_is_refused(make_store, tmp_path):
    make_store()
    with pytest.raises(OSError) as ei:
        AttentionStore(host_bytes=1 << 20, disk_dir=str(tmp_path / "kv"), chunk_tokens=CHUNK, spec=SPEC)
    assert ei.value.errno == errno.EBUSY and "in use" in str(ei.value)
    code = f"from cachedattn import AttentionStore; AttentionStore(host_bytes=1<<20, disk_dir={str(tmp_path / 'kv')!r})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0 and "in use by another cachedattn store" in out.stderr


def test_another_model_never_sees_this_models_kv(make_store, tokens, tmp_path):
    s = make_store()
    s.append("a", tokens[:50], make_kv(SPEC, 50, 1)).result()
    s.close()
    other = KVSpec.uniform(3, 2, 8, torch.float32, model_digest="different-weights")
    s2 = make_store(spec=other)
    assert s2.lookup("a", tokens) == 0 and s2.conversations() == []
    with pytest.raises(ValueError, match="needs a store of its own"):
        s2.attach(SPEC)


def test_flipped_byte_is_a_miss_and_is_removed(make_store, tokens, caplog):
    s = make_store()
    kv = make_kv(SPEC, 64, 1)  # 4 full chunks
    s.append("a", tokens[:64], kv).result()
    s.close()
    files = _chunk_files(s.config.disk_dir)
    victim = files[2]  # chunk 2
    with open(victim, "r+b") as f:
        f.seek(4096 + 2 * 4096 + 100)  # header, layers 0 and 1, then into layer 2's keys
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x40]))
    s2 = make_store()
    assert s2.lookup("a", tokens) == 64  # headers are fine; the data is not
    with s2.load("a", 64) as ld:
        ld.read_layer(0)
        ld.read_layer(1)
        with pytest.raises(ChunkCorruptError) as ei:
            ld.read_layer(2)
    assert ei.value.errno == errno.EBADMSG and victim.name in ei.value.filename
    assert s2.lookup("a", tokens) == 32  # chunks 2.. are gone, 0-1 still served
    assert not victim.exists()
    st = s2.stats()
    assert st["corrupt_chunks"] == 1 and st["disk"]["misses"] == 1
    assert_kv_equal(read_all(s2, "a", 32), kv, upto=32)


def test_damaged_header_is_dropped_at_recovery(make_store, tokens):
    s = make_store()
    s.append("a", tokens[:64], make_kv(SPEC, 64, 1)).result()
    s.close()
    files = _chunk_files(s.config.disk_dir)
    with open(files[1], "r+b") as f:
        f.seek(60)
        f.write(b"\xff\xff")
    s2 = make_store()
    assert s2.lookup("a", tokens) == 16
    assert s2.stats()["corrupt_chunks"] == 1
    assert len(_chunk_files(s.config.disk_dir)) == 1  # damaged chunk and its orphans removed


def test_truncated_file_and_leftover_temporaries(make_store, tokens):
    s = make_store()
    s.append("a", tokens[:48], make_kv(SPEC, 48, 1)).result()
    s.close()
    files = _chunk_files(s.config.disk_dir)
    with open(files[2], "r+b") as f:
        f.truncate(10000)
    (files[0].parent / ".tmp-deadbeef").write_bytes(b"partial")
    s2 = make_store()
    assert s2.lookup("a", tokens) == 32
    assert not (files[0].parent / ".tmp-deadbeef").exists()


WRITER = textwrap.dedent(
    """
    import sys, numpy as np, torch
    from cachedattn import AttentionStore, KVSpec
    spec = KVSpec.uniform(3, 2, 8, torch.float32, "tiny-test-model")
    s = AttentionStore(host_bytes=64 << 20, disk_dir=sys.argv[1], disk_bytes=1 << 30, chunk_tokens=16, spec=spec,
                       hugepages="off")
    for i in range(10**6):
        rng = np.random.default_rng(i)
        toks = rng.integers(0, 32000, 16 * (1 + i % 7) + i % 5)
        g = torch.Generator().manual_seed(i)
        kv = [(torch.randn(2, len(toks), 8, generator=g), torch.randn(2, len(toks), 8, generator=g)) for _ in range(3)]
        s.append(f"conv-{i}", toks, kv)
        if i == 5:
            print("ready", flush=True)
    """
)


def test_kill_9_mid_write_serves_only_complete_data(tmp_path):
    d = str(tmp_path / "kv")
    p = subprocess.Popen([sys.executable, "-c", WRITER, d], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    time.sleep(0.3)  # mid-stream: writes are in flight
    p.send_signal(signal.SIGKILL)
    p.wait()
    with AttentionStore(host_bytes=64 << 20, disk_dir=d, disk_bytes=1 << 30, chunk_tokens=16, spec=SPEC) as s:
        convs = s.conversations()
        assert len(convs) > 5
        served = 0
        for c in convs:
            i = int(c.split("-")[1])
            rng = np.random.default_rng(i)
            toks = rng.integers(0, 32000, 16 * (1 + i % 7) + i % 5)
            n = s.lookup(c, toks)
            if n == 0:
                continue
            g = torch.Generator().manual_seed(i)
            kv = [(torch.randn(2, len(toks), 8, generator=g), torch.randn(2, len(toks), 8, generator=g)) for _ in range(3)]
            assert_kv_equal(read_all(s, c, n), kv, upto=n)  # whatever is served is exact
            served += 1
        assert served > 5
        assert s.stats()["corrupt_chunks"] == 0  # renames made partial files invisible
    assert not list(Path(d).rglob(".tmp-*"))


def test_chunk_file_deleted_behind_the_stores_back(make_store, tokens):
    s = make_store()
    kv = make_kv(SPEC, 48, 1)
    s.append("a", tokens[:48], kv).result()
    s.flush()
    s.demote("a")
    _chunk_files(s.config.disk_dir)[1].unlink()
    with pytest.raises(ChunkCorruptError) as ei:
        s.load("a", 48)
    assert ei.value.errno == errno.ENOENT
    assert s.lookup("a", tokens) == 16
    assert_kv_equal(read_all(s, "a", 16), kv, upto=16)


def test_history_cut_during_an_append_stores_nothing(make_store, tokens):
    s = make_store()
    kv = make_kv(SPEC, 64, 1)
    s.append("a", tokens[:64], kv).result()
    txn = s.begin_append("a", tokens[:80], 64)
    txn.put(make_kv(SPEC, 16, 2))
    conv = s._index.convs["a"]
    s._on_bad_chunk(conv, conv.chunks[1], "test")  # what a load finding chunk 1 damaged does
    with pytest.raises(ValueError, match="was cut"):
        txn.commit().result()
    assert s.lookup("a", tokens) == 16
    assert_kv_equal(read_all(s, "a", 16), kv, upto=16)


def _crash_copy(store, dest) -> str:
    """What a kill -9 right now would leave on disk (the directory as it is)."""
    import shutil

    shutil.copytree(store.config.disk_dir, dest)
    return str(dest)


@pytest.mark.parametrize("how", ["extend", "regenerate", "several_chunks"])
def test_a_crash_while_the_tail_chunk_is_rewritten_keeps_the_last_complete_save(make_store, tmp_path, how):
    """The partial last chunk is rewritten by the next save: until the new file is
    complete, the old one stays what a reopen finds (it used to be deleted at commit)."""
    import threading

    from .kvtruth import check_load, truth_kv

    rng = np.random.default_rng(5)
    old = rng.integers(0, 32000, 55)
    s = make_store(io_threads=1)
    s.append("a", old, truth_kv(old)).result()
    new = np.concatenate([old, rng.integers(0, 32000, 60 if how == "several_chunks" else 10)])
    start = 55
    if how == "regenerate":  # a regenerated answer from token 50 on
        new = np.concatenate([old[:50], rng.integers(0, 32000, 3)])  # shorter than the old save
        start = 50
    gate = threading.Event()
    s._executor.submit(gate.wait)  # the new files' completion waits behind this
    done = s.append("a", new, truth_kv(new, start), start=start)
    copy = _crash_copy(s, tmp_path / "crashed")
    gate.set()
    done.result()
    with AttentionStore(host_bytes=64 << 20, disk_dir=copy, chunk_tokens=CHUNK, spec=SPEC, hugepages="off") as r:
        assert r.lookup("a", old) == 55  # the last complete save, whole
        with r.load("a", 55) as ld:
            check_load(ld, old)
    s.close()
    copy2 = _crash_copy(s, tmp_path / "after")
    files = list(Path(copy2).rglob("*.kv"))
    assert len(files) == -(-len(new) // CHUNK)  # the old files went once the new ones were complete
    for f in Path(copy).rglob("*.kv"):  # a crash between the new save's last rename and those deletions
        if not (Path(copy2) / f.relative_to(copy)).exists():
            (Path(copy2) / f.relative_to(copy)).write_bytes(f.read_bytes())
    with AttentionStore(host_bytes=64 << 20, disk_dir=copy2, chunk_tokens=CHUNK, spec=SPEC, hugepages="off") as r:
        assert r.lookup("a", new) == len(new)  # the newest complete save, even where the old one is longer
        with r.load("a", len(new)) as ld:
            check_load(ld, new)


def test_writing_a_chunk_again_never_reuses_the_name_of_its_earlier_file():
    """A chunk whose file was evicted (deletion pending until the lock is released or the
    last load ends) and then written again must get another name: else the pending deletion
    would remove the new file."""
    from cachedattn.store.chunk_files import file_name, parse_file_name, parse_version

    key = bytes(range(16))
    a, b = file_name(3, 16, key, gen=12345, tail=True), file_name(3, 16, key, gen=12345, tail=True)
    assert a != b
    assert parse_file_name(a) == (3, 16, key) and parse_version(a) == (12345, True)
    assert parse_version(file_name(0, 5, key, gen=7, tail=False)) == (7, False)
    assert parse_version("00000000.00016." + key.hex() + ".0a1b2c3d4e5f.kv") == (-1, False)  # an older store's
