"""Two servers (two AttentionStores with their own disk, one Redis) on one tiny model:
a conversation's next turn on the other server reuses its history from the remote
tier and gives the logits of recomputing it; also after both restart with empty disks."""

import pytest
import torch

import cachedattn
from cachedattn import AttentionStore
from tests.hf.models import VOCAB, tiny_model


def _plain_logits(model, ids):
    state = model._cachedattn
    cachedattn.unpatch(model)
    try:
        with torch.no_grad():
            return model(ids).logits[0]
    finally:
        cachedattn.patch(model, state.store)


def _server(tmp_path, name, url):
    model = tiny_model("llama")  # the same weights in every process: the same fingerprint
    store = AttentionStore(host_bytes=8 << 20, disk_dir=str(tmp_path / name), disk_bytes=64 << 20, chunk_tokens=16,
                           hugepages="off", remote=url)
    cachedattn.patch(model, store)
    return model, store


def _turn(model, ids, conv="conv"):
    with torch.no_grad(), cachedattn.session(model, conv) as s:
        logits = model(ids).logits[0]
    model._cachedattn.store.flush()
    return logits, s.reused_tokens


@pytest.mark.parametrize("where", ["redis_server", "redis_cluster"])
def test_the_next_turn_on_another_server_reuses_the_history_and_equals_recompute(where, request, tmp_path):
    url = request.getfixturevalue(where).url
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (1, 150), generator=g)
    (ma, sa), (mb, sb) = _server(tmp_path, "a", url), _server(tmp_path, "b", url)
    try:
        _, reused = _turn(ma, ids[:, :70])  # turn 1 on server A
        assert reused == 0
        got, reused = _turn(mb, ids[:, :110])  # turn 2 on server B: A's history from Redis
        assert reused == 70 and sb.stats()["remote"]["hits"] == 5
        torch.testing.assert_close(got, _plain_logits(mb, ids[:, :110])[70:], atol=1e-4, rtol=1e-4)
    finally:
        sa.close()
        sb.close()
    # Both restart with empty local tiers: only Redis remembers.
    (ma, sa), (mb, sb) = _server(tmp_path, "a2", url), _server(tmp_path, "b2", url)
    try:
        got, reused = _turn(ma, ids)
        assert reused == 110
        torch.testing.assert_close(got, _plain_logits(ma, ids)[110:], atol=1e-4, rtol=1e-4)
        assert sb.lookup("conv", ids[0]) == 150
    finally:
        sa.close()
        sb.close()
