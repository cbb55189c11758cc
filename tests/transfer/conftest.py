import pytest

import cachedattn
from cachedattn.transfer.factory import FAKE_ENV


@pytest.fixture
def fake_engine(monkeypatch):
    """Models on the CPU get the deferred fake copy engine: the GPU branch of the code runs."""
    monkeypatch.setenv(FAKE_ENV, "1")


@pytest.fixture
def store(tmp_path):
    s = cachedattn.AttentionStore(host_bytes=64 << 20, disk_dir=str(tmp_path / "kv"), chunk_tokens=16, hugepages="off")
    yield s
    s.close()
