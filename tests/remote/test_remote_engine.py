"""The serving engine's scheduler-aware fetcher prefetches from the remote tier: a job
queued behind another finds its history (served by another server) in host memory."""

import torch

import cachedattn
from cachedattn import AttentionStore
from cachedattn.serving import Engine
from tests.hf.models import VOCAB, tiny_model


def _store(tmp_path, name, url):
    return AttentionStore(host_bytes=8 << 20, disk_dir=str(tmp_path / name), disk_bytes=64 << 20, chunk_tokens=16,
                          hugepages="off", remote=url)


def test_the_engine_prefetches_a_queued_jobs_history_from_the_remote_tier(redis_server, tmp_path):
    g = torch.Generator().manual_seed(0)
    hist = {c: torch.randint(1, VOCAB, (1, 64), generator=g) for c in "xy"}
    other, store = _store(tmp_path, "a", redis_server.url), _store(tmp_path, "b", redis_server.url)
    try:
        ma = tiny_model("llama")
        cachedattn.patch(ma, other)
        for c in "xy":  # served by server A
            with torch.no_grad(), cachedattn.session(ma, c):
                ma(hist[c])
        other.flush()
        mb = tiny_model("llama")
        with Engine(mb, store, background=False) as engine:
            # Something local first, so that the look-ahead window is not empty.
            engine.submit("warm", torch.randint(1, VOCAB, (1, 40), generator=g), answer=torch.ones(1, 2, dtype=torch.long))
            engine.step()
            engine.wait_background_io()
            jx = engine.submit("x", torch.cat([hist["x"], torch.ones(1, 5, dtype=torch.long)], 1), answer=torch.ones(1, 2, dtype=torch.long))
            jy = engine.submit("y", torch.cat([hist["y"], torch.ones(1, 5, dtype=torch.long)], 1), answer=torch.ones(1, 2, dtype=torch.long))
            engine.step()  # x runs; y, queued behind it, is prefetched from Redis meanwhile
            engine.wait_background_io()
            assert store.residency("y")["host_bytes"] > 0  # before y's turn
            engine.step()
            assert jx.result().shape[1] == jy.result().shape[1] == 71
            assert jx.reused_tokens == jy.reused_tokens == 64
    finally:
        other.close()
        store.close()
