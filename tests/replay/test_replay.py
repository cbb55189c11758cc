import json

import pytest

from cachedattn import AttentionStore
from cachedattn.replay import cli
from cachedattn.replay.clock import ServiceModel
from cachedattn.replay.metrics import summarize
from cachedattn.replay.systems import SYSTEMS, Capacities, run_system, run_systems, working_set
from cachedattn.replay.trace import build_trace
from cachedattn.serving import Engine

from ..hf.models import VOCAB, tiny_model
from .test_trace import _dataset

CTX, CHUNK = 256, 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = _dataset(tmp_path_factory.mktemp("data"))
    trace = build_trace(6, seed=1, rate=0.5, think_mean=5.0, max_user=40, max_answer=60, max_rounds=4, path=path)
    model = tiny_model("llama")
    from cachedattn.hf.probe import probe

    block = probe(model).spec.kv_bytes_per_token() * CHUNK
    ws = working_set(trace, CTX, CHUNK, block)
    return trace, model, block, ws


def _caps(setup, host_frac=0.3, disk_frac=0.6):
    trace, model, block, ws = setup
    host = max(int(host_frac * ws), 2 * (CTX // CHUNK + 1) * block)
    return Capacities(host, max(int(disk_frac * ws), 2 * block), CHUNK, ws, block)


def _run(setup, name, tmp_path, host_frac=0.3, disk_frac=0.6):
    trace, model, block, ws = setup
    caps = _caps(setup, host_frac, disk_frac)
    tmp_path.mkdir(parents=True, exist_ok=True)
    res = run_system(SYSTEMS[name], trace, model, VOCAB, caps, ServiceModel(), CTX, str(tmp_path))
    return res, summarize(res, caps.host_bytes, caps.disk_bytes)


def _run_together(setup, names, tmp_path, on_job=None):
    trace, model, block, ws = setup
    caps = _caps(setup)
    tmp_path.mkdir(parents=True, exist_ok=True)
    results = run_systems([SYSTEMS[n] for n in names], trace, model, VOCAB, caps, ServiceModel(), CTX, str(tmp_path),
                          on_job=on_job)
    return {r.system.name: (r, summarize(r, caps.host_bytes, caps.disk_bytes)) for r in results}


def _decisions(res):
    keys = ("conversation", "round", "arrival", "start", "finish", "reused", "host_tokens", "disk_tokens", "dropped")
    return [tuple(r[k] for k in keys) for r in res.records]


@pytest.mark.parametrize("name", ["RE", "ideal"])
def test_replay_is_deterministic_for_a_seed_without_disk_io(setup, tmp_path, name):
    # With a disk tier, background writes and prefetches overlap the next job, so whether a chunk
    # is read from host memory or disk (and the modelled load time) may follow their timing.
    a, _ = _run(setup, name, tmp_path / "a")
    b, _ = _run(setup, name, tmp_path / "b")
    assert _decisions(a) == _decisions(b)
    assert len(a.records) == setup[0].rounds


def test_replay_turns_are_the_same_whatever_the_io_timing(setup, tmp_path):
    a, _ = _run(setup, "CA", tmp_path / "a")
    b, _ = _run(setup, "CA", tmp_path / "b")
    def turns(res):
        return sorted((r["conversation"], r["round"], r["prompt_tokens"], r["user_tokens"]) for r in res.records)

    assert turns(a) == turns(b) and len(a.records) == setup[0].rounds
    for r in a.records + b.records:
        assert r["reused"] + r["computed"] == r["prompt_tokens"]
        assert r["host_tokens"] + r["disk_tokens"] == r["reused"]


def test_systems_on_one_trace(setup, tmp_path):
    trace = setup[0]
    rows = {name: row for name, (_, row) in _run_together(setup, ["RE", "CA", "CA-FIFO", "ideal"], tmp_path).items()}
    assert rows["RE"]["hit_rate"] == 0 and rows["RE"]["computed_tokens"] == rows["RE"]["prompt_tokens"]
    assert rows["ideal"]["hit_rate"] == 1.0 and rows["ideal"]["hit_host"] == 1.0
    assert 0 < rows["CA"]["hit_rate"] <= 1 and rows["CA"]["bytes_disk_written"] > 0
    for r in rows.values():
        assert r["jobs"] == trace.rounds
        assert r["hit_rate"] is None or r["hit_host"] + r["hit_disk"] + r["miss"] == pytest.approx(1)
    # Every system computes what it does not reuse, and nothing else.
    assert rows["CA"]["computed_tokens"] < rows["RE"]["computed_tokens"]


def test_systems_run_side_by_side_turn_by_turn(setup, tmp_path):
    names = ["RE", "CA", "CA-LRU"]
    order = []
    results = _run_together(setup, names, tmp_path, on_job=lambda name, turn: order.append((turn, name)))
    rounds = setup[0].rounds
    assert len(order) == rounds * len(names)
    for turn in range(rounds):
        ran = [name for t, name in order[turn * len(names):(turn + 1) * len(names)] if t == turn]
        assert sorted(ran) == sorted(names), f"turn {turn} ran {ran}"  # every system, before the next turn
        k = turn % len(names)
        assert ran == names[k:] + names[:k]  # nobody is always first
    for name, (res, _) in results.items():
        assert res.system.name == name and len(res.records) == rounds


def test_replay_does_not_wait_for_background_io_between_jobs(setup, tmp_path, monkeypatch):
    jobs_done, flushed_at, waits = [0], [], []
    monkeypatch.setattr(Engine, "wait_background_io", lambda self: waits.append(jobs_done[0]))
    real_flush = AttentionStore.flush
    monkeypatch.setattr(AttentionStore, "flush", lambda self: (flushed_at.append(jobs_done[0]), real_flush(self))[1])
    results = _run_together(setup, ["CA", "CA-noPL"], tmp_path,
                            on_job=lambda *_: jobs_done.__setitem__(0, jobs_done[0] + 1))
    total = 2 * setup[0].rounds
    assert jobs_done[0] == total and not waits
    assert flushed_at and all(n == total for n in flushed_at)  # only after the last job, for the stats
    assert all(row["bytes_disk_written"] > 0 for _, row in results.values())


def test_small_replay_from_the_command_line(tmp_path):
    pytest.importorskip("matplotlib")
    path = _dataset(tmp_path)
    out = tmp_path / "out"
    cli.main(["--dataset", str(path), "--conversations", "3", "--max-user", "30", "--max-answer", "30",
              "--max-rounds", "3", "--think-mean", "2", "--systems", "RE,CA,ideal", "--max-context", "512",
              "--chunk-tokens", "32", "--out", str(out), "--workdir", str(tmp_path)])
    res = json.loads((out / "results.json").read_text())
    assert [r["system"] for r in res["rows"]] == ["RE", "CA", "ideal"]
    assert res["config"]["service_model"]["source"].startswith("defaults")
    for f in ["ttft_cdf.png", "hit_rate.png", "table.md"]:
        assert (out / f).stat().st_size > 0


def test_command_line_rejects_unknown_systems(tmp_path):
    with pytest.raises(SystemExit, match="unknown systems"):
        cli.main(["--systems", "CA,XX", "--out", str(tmp_path)])


def test_batched_replay_serves_the_same_turns(setup, tmp_path):
    """--max-batch: jobs queued together run as batches; every turn is the same, only sooner."""
    _, model, block, ws = setup
    path = _dataset(tmp_path)
    trace = build_trace(6, seed=2, rate=50.0, think_mean=0.5, max_user=40, max_answer=60, max_rounds=3, path=path)
    caps = _caps(setup)
    out = {}
    for mb in (1, 4):
        (tmp_path / str(mb)).mkdir()
        res = run_systems([SYSTEMS["RE"], SYSTEMS["CA"]], trace, model, VOCAB, caps, ServiceModel(), CTX,
                          str(tmp_path / str(mb)), max_batch=mb)
        out[mb] = {r.system.name: (r, summarize(r, caps.host_bytes, caps.disk_bytes)) for r in res}

    def turns(res):
        return sorted((r["conversation"], r["round"], r["prompt_tokens"], r["answer_tokens"]) for r in res.records)

    for name in ("RE", "CA"):
        one, four = out[1][name], out[4][name]
        assert turns(one[0]) == turns(four[0]) and len(four[0].records) == trace.rounds
        assert max(r["batch_size"] for r in four[0].records) > 1 and one[1]["batch_mean"] == 1
        assert four[1]["throughput"] > 0 and four[1]["throughput_modelled"] > 0
        # one at a time, a run is a job: throughput is the per-job prefill throughput
        assert one[1]["throughput"] == pytest.approx(one[1]["prefill_throughput"])
        for r in four[0].records:
            assert r["reused"] + r["computed"] == r["prompt_tokens"]
            assert r["host_tokens"] + r["disk_tokens"] == r["reused"]
    assert out[4]["CA"][1]["hit_rate"] > 0 and out[4]["RE"][1]["hit_rate"] == 0


def test_virtual_clock_charges_a_batch_once():
    from types import SimpleNamespace

    from cachedattn.replay.clock import VirtualClock

    m = ServiceModel()
    clock = VirtualClock(m, bytes_per_token=100)
    jobs = [SimpleNamespace(computed_tokens=c, prompt_tokens=p, answer_tokens=a, tier_tokens={"host": h, "disk": 0})
            for c, p, a, h in [(10, 50, 4, 40), (30, 30, 9, 0)]]
    clock.charge_batch(jobs)
    prefill = m.c0 + m.c1 * 40 + m.c2 * (10 * 50 + 30 * 30) / 1000 + 40 * 100 / m.host_bw
    total = prefill + 9 * (m.d0 + m.d1 * 2 * (50 + 9) / 1000)
    assert clock.now == pytest.approx(total) and clock.busy == pytest.approx(total)
    assert all(j.service_time == pytest.approx(total) for j in jobs)
    assert sum(j.modelled_prefill for j in jobs) == pytest.approx(prefill)


def test_command_line_rejects_a_bad_max_batch(tmp_path):
    with pytest.raises(SystemExit, match="max-batch"):
        cli.main(["--max-batch", "0", "--out", str(tmp_path)])
