import numpy as np
import pytest
import torch

from cachedattn import AttentionStore, KVSpec

SPEC = KVSpec.uniform(num_layers=3, kv_heads=2, head_dim=8, dtype=torch.float32, model_digest="tiny-test-model")
CHUNK = 16


def make_kv(spec: KVSpec, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(h, n, d, generator=g).to(spec.dtype), torch.randn(h, n, d, generator=g).to(spec.dtype))
        for h, d in spec.layers
    ]


def read_all(store, conv_id, n, spec=SPEC):
    with store.load(conv_id, n) as ld:
        return [ld.read_layer(layer) for layer in range(spec.num_layers)]


def assert_kv_equal(got, want, upto=None):
    for (gk, gv), (wk, wv) in zip(got, want):
        wk, wv = (wk, wv) if upto is None else (wk[:, :upto], wv[:, :upto])
        assert torch.equal(gk, wk) and torch.equal(gv, wv)


def chunk_bytes(spec=SPEC, chunk=CHUNK):
    from cachedattn.store.spec import ChunkGeometry

    return ChunkGeometry(spec, chunk).block_bytes


@pytest.fixture(autouse=True)
def lock_order_checked(monkeypatch):
    """Every lock the store makes in these tests raises when taken out of the package's order."""
    monkeypatch.setenv("CACHEDATTN_LOCK_ORDER", "1")


@pytest.fixture
def tokens():
    return np.random.default_rng(7).integers(0, 32000, 200)


@pytest.fixture
def make_store(tmp_path):
    opened = []

    def make(disk=True, host_chunks=64, disk_chunks=256, spec=SPEC, **kw):
        s = AttentionStore(
            host_bytes=host_chunks * chunk_bytes(spec),
            disk_dir=str(tmp_path / "kv") if disk else None,
            disk_bytes=disk_chunks * (chunk_bytes(spec) + 4096),
            chunk_tokens=CHUNK,
            spec=spec,
            hugepages="off",
            **kw,
        )
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()
