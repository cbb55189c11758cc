import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from cachedattn import AttentionStore, StoreConfig

from .conftest import CHUNK, SPEC, assert_kv_equal, make_kv, read_all


@pytest.mark.parametrize("conv_id", ["../../etc/passwd", "/abs/path", "a/b\\c", "..", ".", "~", "é漢字🙂", "x" * 4000])
def test_ids_cannot_escape_the_store(make_store, tokens, tmp_path, conv_id):
    s = make_store()
    kv = make_kv(SPEC, 20, 1)
    s.append(conv_id, tokens[:20], kv).result()
    s.close()
    root = (tmp_path / "kv").resolve()
    for p in Path(tmp_path).rglob("*"):
        assert p.resolve().is_relative_to(root), p
    s2 = make_store()
    assert s2.conversations() == [conv_id]  # the id survives a restart exactly
    assert_kv_equal(read_all(s2, conv_id, 20), kv)


@pytest.mark.parametrize("conv_id,exc", [("", ValueError), ("a\0b", ValueError), (42, TypeError), ("x" * 5000, ValueError)])
def test_bad_ids_are_rejected(make_store, tokens, conv_id, exc):
    s = make_store()
    with pytest.raises(exc):
        s.append(conv_id, tokens[:5], make_kv(SPEC, 5, 1))


def test_unknown_conversation_and_bad_ranges(make_store, tokens):
    s = make_store()
    with pytest.raises(KeyError, match="unknown conversation"):
        s.load("nobody", 1)
    with pytest.raises(KeyError):
        s.drop("nobody")
    s.append("a", tokens[:20], make_kv(SPEC, 20, 1)).result()
    with pytest.raises(ValueError, match="has 20 tokens"):
        s.load("a", 21)
    with s.load("a", 10) as ld:
        with pytest.raises(ValueError, match="outside"):
            ld.read_layer(0, start=5, end=11)
        with pytest.raises(ValueError, match="layer 3 out of range"):
            ld.read_layer(3)


def test_wrong_shape_or_dtype_for_the_model(make_store, tokens):
    s = make_store()
    with s.begin_append("a", tokens[:10], 0) as txn:
        with pytest.raises(ValueError, match="needs"):
            txn.put_layer(0, torch.randn(2, 10, 8).half(), torch.randn(2, 10, 8).half())
        with pytest.raises(ValueError, match="needs"):
            txn.put_layer(0, torch.randn(3, 10, 8), torch.randn(3, 10, 8))
        with pytest.raises(ValueError, match="needs"):
            txn.put_layer(0, torch.randn(2, 9, 8), torch.randn(2, 9, 8))
        with pytest.raises(ValueError, match="out of range"):
            txn.put_layer(5, torch.randn(2, 10, 8), torch.randn(2, 10, 8))
        txn.put_layer(0, torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8))  # a batch of one is fine


@pytest.mark.parametrize(
    "toks,match", [(np.array([[1, 2], [3, 4]]), "1-D"), (np.array([1.5, 2.0]), "integers"), (np.array([-1, 3]), "2\\*\\*31")]
)
def test_bad_token_ids(make_store, toks, match):
    s = make_store()
    with pytest.raises(ValueError, match=match):
        s.lookup("a", toks)


def test_unwritable_disk_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError) as ei:
        AttentionStore(host_bytes=1 << 20, disk_dir=str(blocker / "kv"), chunk_tokens=CHUNK)
    assert str(blocker) in str(ei.value)


def test_not_attached_and_closed(tmp_path, tokens):
    s = AttentionStore(host_bytes=1 << 20, chunk_tokens=CHUNK)
    with pytest.raises(ValueError, match="not attached"):
        s.lookup("a", tokens)
    s.attach(SPEC)
    s.attach(SPEC)  # the same model again is fine
    s.close()
    with pytest.raises(ValueError, match="closed"):
        s.lookup("a", tokens)
    s.close()


def test_host_bytes_smaller_than_a_chunk():
    with pytest.raises(ValueError, match="host_bytes"):
        AttentionStore(host_bytes=4096, chunk_tokens=CHUNK, spec=SPEC)


def test_concurrent_writers_and_readers(make_store):
    s = make_store(host_chunks=48)
    errors = []

    def worker(w):
        try:
            rng = np.random.default_rng(w)
            for turn in range(15):
                cid = f"w{w}-c{turn % 3}"
                toks = rng.integers(0, 999, int(rng.integers(1, 60)))
                kv = make_kv(SPEC, len(toks), w * 1000 + turn)
                s.append(cid, toks, kv).result()
                n = s.lookup(cid, toks)
                if n:  # may have been evicted to disk meanwhile, never wrong
                    assert_kv_equal(read_all(s, cid, n), kv, upto=n)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    s.flush()
    st = s.stats()
    assert st["host"]["used_bytes"] <= st["host"]["capacity_bytes"]


# ---- configuration ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(host_bytes=0), "host_bytes"),
        (dict(host_bytes="lots"), "host_bytes"),
        (dict(disk_bytes=-1), "disk_bytes"),
        (dict(chunk_tokens=0), "chunk_tokens"),
        (dict(chunk_tokens=1.5), "chunk_tokens"),
        (dict(io_backend="spdk"), "io_backend"),
        (dict(io_threads=0), "io_threads"),
        (dict(write_through="maybe"), "write_through"),
        (dict(hugepages="yes"), "hugepages"),
    ],
)
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        StoreConfig(**kw)


def test_config_sizes_and_env(tmp_path):
    assert StoreConfig(host_bytes="8G").host_bytes == 8 << 30
    assert StoreConfig(host_bytes="512MiB").host_bytes == 512 << 20
    env = {
        "CACHEDATTN_HOST_BYTES": "2M",
        "CACHEDATTN_DISK_DIR": str(tmp_path / "kv"),
        "CACHEDATTN_DISK_BYTES": "1G",
        "CACHEDATTN_CHUNK_TOKENS": "32",
        "CACHEDATTN_WRITE_THROUGH": "0",
    }
    cfg = StoreConfig.from_env(env)
    assert (cfg.host_bytes, cfg.disk_bytes, cfg.chunk_tokens, cfg.write_through) == (2 << 20, 1 << 30, 32, False)
    with pytest.raises(ValueError, match="chunk_tokens"):
        StoreConfig.from_env({"CACHEDATTN_CHUNK_TOKENS": "many"})
    assert StoreConfig.from_env(env, chunk_tokens=64).chunk_tokens == 64


def test_store_from_env(monkeypatch, tmp_path, tokens):
    monkeypatch.setenv("CACHEDATTN_HOST_BYTES", "4M")
    monkeypatch.setenv("CACHEDATTN_DISK_DIR", str(tmp_path / "envkv"))
    monkeypatch.setenv("CACHEDATTN_CHUNK_TOKENS", "16")
    with AttentionStore.from_env(spec=SPEC) as s:
        s.append("a", tokens[:20], make_kv(SPEC, 20, 1)).result()
        s.flush()
    assert list((tmp_path / "envkv").rglob("*.kv"))


def test_config_object_and_fields_are_exclusive():
    with pytest.raises(ValueError, match="not both"):
        AttentionStore(host_bytes=1 << 20, config=StoreConfig())


@pytest.mark.parametrize("huge", [2**62, 10**30, "1000000T"])
def test_huge_host_bytes_is_refused_at_construction_naming_the_limit(huge):
    from cachedattn.store.config import physical_memory_bytes

    with pytest.raises(ValueError, match=rf"host_bytes: .*\({physical_memory_bytes()} bytes\)"):
        AttentionStore(host_bytes=huge, chunk_tokens=CHUNK, hugepages="off")
    with pytest.raises(ValueError, match="host_bytes"):
        StoreConfig(host_bytes=huge)
