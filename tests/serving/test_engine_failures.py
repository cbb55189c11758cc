"""A job the engine cannot serve fails alone: bad arguments raise at submit, a turn that raises
fails its own future, and the queue (and the worker thread) goes on."""

import logging

import numpy as np
import pytest
import torch

import cachedattn
from cachedattn import AttentionStore
from cachedattn.serving import Engine, fetching

from ..hf.models import VOCAB, tiny_model

TIMEOUT = 120  # generous on a loaded machine; only reached when a worker hangs


@pytest.fixture(scope="module")
def _model():
    return tiny_model("llama")


@pytest.fixture
def model(_model):
    yield _model
    if getattr(_model, "_cachedattn", None) is not None:
        cachedattn.unpatch(_model)  # the engine patched it with this test's store


def _store(tmp_path, **kw):
    return AttentionStore(host_bytes=1 << 24, disk_dir=str(tmp_path / "kv"), chunk_tokens=16, hugepages="off", **kw)


def _ids(seed: int, n: int = 20) -> torch.Tensor:
    return torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _recompute(model, ids, n=4):
    with torch.no_grad():  # outside a session: plain recompute
        return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)


def _job_warnings(caplog, conv_id):
    return [r for r in caplog.records if r.levelno >= logging.WARNING and f"job of {conv_id!r}" in r.getMessage()]


BAD_SUBMITS = [
    (dict(conv_id=5), TypeError, "conversation id must be a str"),
    (dict(conv_id=""), ValueError, "conversation id must not be empty"),
    (dict(conv_id=b"alice"), TypeError, "conversation id must be a str"),
    (dict(input_ids=torch.tensor(5)), ValueError, r"input_ids must be 1-D or \[1, n\].*shape \(\)"),
    (dict(input_ids=5), ValueError, r"input_ids must be 1-D or \[1, n\]"),
    (dict(input_ids=[]), ValueError, "input_ids must not be empty"),
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), ValueError, "input_ids must not be empty"),
    (dict(input_ids=torch.ones(2, 4, dtype=torch.long)), ValueError, r"one conversation per job.*\(2, 4\)"),
    (dict(input_ids=torch.ones(1, 1, 4, dtype=torch.long)), ValueError, r"input_ids must be 1-D or \[1, n\]"),
    (dict(input_ids=torch.ones(1, 4)), TypeError, "input_ids must hold integer token ids.*float32"),
    (dict(input_ids=torch.ones(4, dtype=torch.bool)), TypeError, "input_ids must hold integer token ids.*bool"),
    (dict(input_ids=[[1, 2], [3]]), TypeError, "input_ids must be a tensor or a sequence of token ids"),
    (dict(input_ids="hello"), TypeError, "input_ids must be a tensor or a sequence of token ids"),
    (dict(input_ids=None), TypeError, "input_ids must be a tensor or a sequence of token ids"),
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens must be >= 0"),
    (dict(max_new_tokens=2.5), TypeError, "max_new_tokens must be an int"),
    (dict(max_new_tokens="8"), TypeError, "max_new_tokens must be an int"),
    (dict(max_new_tokens=True), TypeError, "max_new_tokens must be an int"),
    (dict(answer=torch.tensor(7)), ValueError, r"answer must be 1-D or \[1, n\]"),
    (dict(answer=[]), ValueError, "answer must not be empty"),
    (dict(answer=[0.5, 1.5]), TypeError, "answer must hold integer token ids"),
    (dict(answer=torch.ones(3, 2, dtype=torch.long)), ValueError, "answer must be 1-D or"),
    (dict(submitted="now"), TypeError, "submitted must be a number of seconds"),
    (dict(submitted=float("nan")), ValueError, "submitted must be a finite number"),
]


def _rejects(model, tmp_path, bad, error, match, background):
    store = _store(tmp_path)
    with Engine(model, store, background=background) as engine:
        args = dict(conv_id="alice", input_ids=_ids(0), max_new_tokens=4)
        args.update(bad)
        with pytest.raises(error, match=match):
            engine.submit(args.pop("conv_id"), args.pop("input_ids"), **args)
        assert engine.queued_conversations() == []
        # The engine is unharmed: the next job runs and equals recompute.
        job = engine.submit("bob", _ids(1), max_new_tokens=4, do_sample=False, pad_token_id=0)
        if not background:
            assert engine.step() is job
        assert torch.equal(job.result(timeout=TIMEOUT), _recompute(model, _ids(1)))
    store.close()


@pytest.mark.parametrize("bad,error,match", BAD_SUBMITS, ids=[f"{k}={v!r}"[:40] for (d, _, _) in BAD_SUBMITS
                                                             for k, v in d.items()])
def test_submit_rejects_bad_arguments_before_queueing(model, tmp_path, bad, error, match):
    _rejects(model, tmp_path, bad, error, match, background=False)


@pytest.mark.parametrize("case", [0, 3], ids=["int conversation id", "0-d input_ids"])
def test_a_bad_submit_leaves_the_background_worker_serving(model, tmp_path, case):
    _rejects(model, tmp_path, *BAD_SUBMITS[case], background=True)


@pytest.mark.parametrize("ids", [[3, 4, 5], np.array([[3, 4, 5]]), torch.tensor([3, 4, 5], dtype=torch.int32)],
                         ids=["list", "numpy", "int32"])
def test_submit_accepts_token_ids_as_sequences_and_integer_tensors(model, tmp_path, ids):
    store = _store(tmp_path)
    with Engine(model, store, background=False) as engine:
        job = engine.submit("alice", ids, max_new_tokens=np.int64(2), do_sample=False, pad_token_id=0)
        engine.step()
        ref = _recompute(model, torch.tensor([[3, 4, 5]]), 2)
        assert torch.equal(job.result(), ref)
    store.close()


def _session_fails_for(conv_id):
    real = cachedattn.session

    def session(model, cid, *a, **kw):
        if cid == conv_id:
            raise RuntimeError("the session broke")
        return real(model, cid, *a, **kw)

    return session


JOB_FAILURES = {
    # generate() rejects a keyword it does not know: transformers' business, this job's failure.
    "unknown generate kwarg": (dict(no_such_generate_option=1), None, ValueError),
    "token id past the vocabulary": (dict(), torch.full((1, 6), VOCAB + 5), IndexError),
    "session failure": (dict(), None, RuntimeError),
}


@pytest.mark.parametrize("kind", list(JOB_FAILURES))
@pytest.mark.parametrize("background", [False, True], ids=["step", "background"])
def test_a_failing_job_fails_alone_and_the_next_job_completes(model, tmp_path, monkeypatch, caplog, kind, background):
    kwargs, bad_ids, error = JOB_FAILURES[kind]
    if kind == "session failure":
        monkeypatch.setattr(cachedattn, "session", _session_fails_for("bad"))
    store = _store(tmp_path, eviction="queue")
    with caplog.at_level(logging.WARNING, logger="cachedattn"), Engine(model, store, background=background) as engine:
        good1 = engine.submit("good", _ids(1), max_new_tokens=4, do_sample=False, pad_token_id=0)
        bad = engine.submit("bad", _ids(2) if bad_ids is None else bad_ids, max_new_tokens=4, do_sample=False,
                            pad_token_id=0, **kwargs)
        good2 = engine.submit("other", _ids(3), max_new_tokens=4, do_sample=False, pad_token_id=0)
        if not background:
            assert [engine.step() for _ in range(4)] == [good1, bad, good2, None]
        with pytest.raises(error):
            bad.result(timeout=TIMEOUT)
        assert torch.equal(good1.result(timeout=TIMEOUT), _recompute(model, _ids(1)))
        assert torch.equal(good2.result(timeout=TIMEOUT), _recompute(model, _ids(3)))
        assert bad.finished is not None and good2.finished is not None
        # The conversation that failed is served next time.
        again = engine.submit("good", torch.cat([good1.result(), _ids(4, 8)], 1), max_new_tokens=4, do_sample=False,
                              pad_token_id=0)
        if not background:
            engine.step()
        assert torch.equal(again.result(timeout=TIMEOUT), _recompute(model, torch.cat([good1.result(), _ids(4, 8)], 1)))
        assert again.reused_tokens > 0
    logged = _job_warnings(caplog, "bad")
    assert len(logged) == 1 and error.__name__ in logged[0].getMessage()  # once per job, naming the failure
    assert not _job_warnings(caplog, "good") and not _job_warnings(caplog, "other")
    store.close()


class _BrokenClock:
    """A virtual clock whose charge fails."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def charge(self, job):
        raise RuntimeError("the clock broke")


def _broken(monkeypatch, hook, engine_kw):
    def fail(*a, **kw):
        raise OSError(5, f"{hook} broke")

    if hook == "clock.charge":
        engine_kw["clock"] = _BrokenClock()
    elif hook == "prefetch":
        monkeypatch.setattr(fetching, "prefetch_window", fail)
    elif hook in ("policy.on_submit", "policy.on_finish"):
        from cachedattn.serving.policies import QueueAwarePolicy

        monkeypatch.setattr(QueueAwarePolicy, hook.split(".")[1], fail)
    elif hook == "look-ahead window":
        monkeypatch.setattr(Engine, "prefetch_window", fail)
    elif hook == "demotion":
        monkeypatch.setattr(AttentionStore, "make_host_room", fail)


HOOKS = ["clock.charge", "prefetch", "look-ahead window", "policy.on_submit", "policy.on_finish", "demotion"]


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("background", [False, True], ids=["step", "background"])
def test_a_failing_engine_hook_costs_no_job(model, tmp_path, monkeypatch, caplog, hook, background):
    """Prefetch, read-ahead, demotion, clock and policy hooks are optimisations or bookkeeping:
    when they fail every job still gets its right answer, the worker lives on, one warning per job."""
    engine_kw = {}
    _broken(monkeypatch, hook, engine_kw)
    store = _store(tmp_path, eviction="queue")
    hist = {c: torch.zeros(1, 0, dtype=torch.long) for c in "xy"}
    with caplog.at_level(logging.WARNING, logger="cachedattn"), \
            Engine(model, store, background=background, **engine_kw) as engine:
        for turn in range(2):
            jobs = []
            for i, c in enumerate("xy"):
                full = torch.cat([hist[c], _ids(10 * turn + i)], 1)
                jobs.append((c, full, engine.submit(c, full, max_new_tokens=3, do_sample=False, pad_token_id=0)))
            if not background:
                while engine.step() is not None:
                    pass
            for c, full, job in jobs:
                out = job.result(timeout=TIMEOUT)
                assert torch.equal(out, _recompute(model, full, 3))
                hist[c] = out
    for c in "xy":
        assert len(_job_warnings(caplog, c)) == 2  # one per job (two turns), whatever failed around it
    store.close()
