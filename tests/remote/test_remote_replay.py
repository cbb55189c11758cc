"""replay --servers: two servers, turns at random, with and without a shared Redis."""

import pytest

from cachedattn.replay import cli
from cachedattn.replay.servers import run_servers
from cachedattn.replay.systems import Capacities, working_set
from cachedattn.replay.trace import build_trace
from tests.hf.models import tiny_model
from tests.replay.test_trace import _dataset

CTX, CHUNK = 1024, 16  # no conversation reaches the window: every history is reusable


def test_two_servers_with_the_remote_tier_reuse_what_the_other_served(redis_server, tmp_path):
    trace = build_trace(5, seed=2, rate=0.5, think_mean=5.0, max_user=40, max_answer=40, max_rounds=4,
                        path=_dataset(tmp_path))
    model = tiny_model("llama")
    from cachedattn.hf.probe import probe

    block = probe(model).spec.kv_bytes_per_token() * CHUNK
    ws = working_set(trace, CTX, CHUNK, block)
    caps = Capacities(max(ws, 2 * (CTX // CHUNK + 1) * block), ws, CHUNK, ws, block)
    rows, records = run_servers(trace, model, 320, caps, CTX, str(tmp_path), 2, redis_server.url, seed=0)
    local, remote = rows
    assert local["setup"] == "local only" and remote["setup"] == "remote tier"
    assert local["turns"] == remote["turns"] == trace.rounds
    # Every store is big enough: only a turn on the other server misses, and the remote tier serves it.
    assert remote["hit_rate"] > local["hit_rate"] and remote["hit_rate"] > 0.95
    assert remote["remote_hits"] > 0 and remote["remote_errors"] == 0 and local["remote_hits"] == 0
    moved = [r for r in records if r["setup"] == "remote tier" and r["round"] > 0]
    assert all(r["reused"] > 0 for r in moved)


def test_replay_servers_flags_are_checked():
    with pytest.raises(SystemExit, match="--servers"):
        cli.main(["--servers", "1", "--remote", "redis://127.0.0.1:1"])
    with pytest.raises(SystemExit, match="unknown scheme"):
        cli.main(["--servers", "2", "--remote", "http://x"])
