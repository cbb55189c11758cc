import pytest

from cachedattn import AttentionStore


@pytest.fixture
def store_dir(tmp_path):
    return str(tmp_path / "kv")


@pytest.fixture
def make_store(store_dir):
    opened = []

    def make(**kw):
        s = AttentionStore(**{"host_bytes": 64 << 20, "disk_dir": store_dir, "chunk_tokens": 16, "hugepages": "off", **kw})
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()
