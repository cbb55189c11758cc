"""The engine with max_batch > 1: every job gets what it gets alone, the store's look-ahead
and eviction see the running batch."""

import logging

import pytest
import torch

import cachedattn
from cachedattn.serving import Engine, fetching

from ..hf.models import VOCAB, tiny_model
from .test_engine import _on_disk, make_store

GEN = 5
# Tokens of history per conversation before the batched turn: none, short, across 16-token
# chunk boundaries; all of it is read after a restart (the first batch from disk, the second
# as the look-ahead prefetched it); "r*" conversations were also demoted before the restart.
HISTORY = {"n0": 0, "s5": 5, "b20": 20, "b37": 37, "r33": 33, "r70": 70}
NEW = {"n0": 9, "s5": 3, "b20": 21, "b37": 14, "r33": 6, "r70": 11}


def _histories(model, store, g):
    """Each conversation's first turn, alone; returns its ids so far."""
    hist = {}
    cachedattn.patch(model, store)
    with torch.no_grad():
        for c, n in HISTORY.items():
            hist[c] = torch.randint(1, VOCAB, (1, n), generator=g)
            if n:
                with cachedattn.session(model, c):
                    model(hist[c])
    cachedattn.unpatch(model)
    return hist


def _stored_kv_equals_recompute(model, store, conv, seq):
    load = store.load_prefix(conv, seq[0])
    assert load is not None and load.n_tokens >= seq.shape[1] - 1, conv
    with torch.no_grad():
        pkv = model(seq[:, : load.n_tokens], use_cache=True).past_key_values
    for layer in range(len(pkv.layers)):
        k, v = load.read_layer(layer)
        assert (k - pkv.layers[layer].keys[0]).abs().max() <= 1e-4, (conv, layer)
        assert (v - pkv.layers[layer].values[0]).abs().max() <= 1e-4, (conv, layer)
    load.close()


def test_batched_generate_jobs_equal_each_alone_with_recompute(tmp_path):
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    store = make_store(tmp_path)
    hist = _histories(model, store, g)
    store.flush()
    for c in ("r33", "r70"):
        store.demote(c)
    store.close()  # restart: the store comes back from disk
    store = make_store(tmp_path)
    full = {c: torch.cat([h, torch.randint(1, VOCAB, (1, NEW[c]), generator=g)], 1) for c, h in hist.items()}
    with Engine(model, store, background=False, max_batch=4) as engine:
        jobs = {c: engine.submit(c, ids, max_new_tokens=GEN, do_sample=False, pad_token_id=0) for c, ids in full.items()}
        sizes = []
        while batch := engine.step_batch():
            sizes.append(len(batch))
    assert sizes == [4, 2]
    cachedattn.unpatch(model)
    for c, job in jobs.items():
        out = job.result()
        with torch.no_grad():  # unpatched: plain recompute of this conversation alone
            ref = model.generate(full[c], max_new_tokens=GEN, do_sample=False, pad_token_id=0)
        assert torch.equal(out, ref), c
        assert job.reused_tokens == HISTORY[c] and job.batch_size in (4, 2), c
        assert sum(job.tier_tokens.values()) == job.reused_tokens, c
        if job.batch_id == 1:  # after the restart, nothing was in host memory before the first batch
            assert job.tier_tokens["disk"] == job.reused_tokens, c
        assert job.ttft is not None and job.answer_tokens == GEN
        _stored_kv_equals_recompute(model, store, c, out)
        # The next turn's logits through the stored KV equal recompute's (fp32, 1e-4).
        probe = torch.cat([out, torch.tensor([[5, 6, 7]])], 1)
        cachedattn.patch(model, store)
        with torch.no_grad(), cachedattn.session(model, c, save=False) as s:
            got = model(probe).logits[0, -3:]
        cachedattn.unpatch(model)
        assert s.reused_tokens == out.shape[1] - 1  # the last generated token has no KV yet
        with torch.no_grad():
            torch.testing.assert_close(got, model(probe).logits[0, -3:], atol=1e-4, rtol=1e-4)
    store.close()


def _answer_turns(model, tmp_path, max_batch):
    """Four conversations x three turns of fed answers of different lengths."""
    store = make_store(tmp_path / f"b{max_batch}", eviction="queue")
    g = torch.Generator().manual_seed(1)
    hist = {c: torch.zeros(1, 0, dtype=torch.long) for c in "wxyz"}
    done = []
    with Engine(model, store, background=False, max_batch=max_batch) as engine:
        for turn in range(3):
            jobs = []
            for i, c in enumerate("wxyz"):
                full = torch.cat([hist[c], torch.randint(1, VOCAB, (1, 7 + 9 * i), generator=g)], 1)
                answer = torch.randint(1, VOCAB, (1, 3 + 5 * i), generator=g)
                jobs.append((c, engine.submit(c, full, answer=answer), full, answer))
            while engine.step_batch():
                engine.wait_background_io()
            for c, job, full, answer in jobs:
                hist[c] = job.result()
                assert torch.equal(hist[c], torch.cat([full, answer], 1))
                done.append(job)
    cachedattn.unpatch(model)
    return store, done, hist


def test_batched_answer_jobs_store_what_one_at_a_time_stores(tmp_path):
    model = tiny_model("llama")
    store1, solo, _ = _answer_turns(model, tmp_path, 1)
    store1.close()
    store4, batched, hist = _answer_turns(model, tmp_path, 4)
    assert [j.batch_size for j in batched] == [4] * 12 and [j.batch_size for j in solo] == [1] * 12
    assert [j.reused_tokens for j in batched] == [j.reused_tokens for j in solo]
    assert all(j.reused_tokens == j.input_ids.shape[1] - (7 + 9 * (i % 4)) for i, j in enumerate(batched[4:]))
    for c, seq in hist.items():
        _stored_kv_equals_recompute(model, store4, c, seq)
    store4.close()


def test_look_ahead_starts_after_the_running_batch(tmp_path, monkeypatch):
    model = tiny_model("llama")
    store = make_store(tmp_path)
    convs = "abcdef"
    ids = _on_disk(model, store, convs, 40)
    calls = []
    real = fetching.prefetch_window

    def spy(store_, window, running, need):
        calls.append((list(window), set([running] if isinstance(running, str) else running), need))
        return real(store_, window, running, need)

    monkeypatch.setattr(fetching, "prefetch_window", spy)
    with Engine(model, store, background=False, max_batch=2, read_buffer=False) as engine:
        jobs = [engine.submit(c, torch.cat([ids[c], ids[c][:, :5]], 1), answer=ids[c][:, :3]) for c in convs]
        engine.step_batch()
        window, running, need = calls[0]
        assert running == {"a", "b"} and window[:4] == list("cdef")
        assert need == 2 * 48 * store.spec.kv_bytes_per_token()  # both rows' prompt and answer
        engine.wait_background_io()
        while engine.step_batch():
            engine.wait_background_io()
    assert [j.batch_size for j in jobs] == [2] * 6
    assert jobs[0].tier_tokens["disk"] == 40  # nothing ran before the first batch to fetch it
    assert all(j.tier_tokens == {"host": 40, "disk": 0} for j in jobs[2:])  # prefetched while the batch ahead ran
    store.close()


def test_running_batch_chunks_are_not_evicted(tmp_path):
    model = tiny_model("llama")
    store = make_store(tmp_path)
    ids = _on_disk(model, store, "pqi", 48)
    for c in "pqi":  # everything back in host memory
        store.prefetch(c).result()
    seen = {}
    with Engine(model, store, background=False, max_batch=2, prefetch=False) as engine:
        def squeeze(current, problems):  # runs while the batch decodes (the read-buffer hook)
            running = [j.conv_id for j in current]
            before = {c: store.residency(c)["host_bytes"] for c in "pqi"}
            store.make_host_room(store.stats()["host"]["capacity_bytes"])  # evict all that may go
            seen.update(running=running, before=before, after={c: store.residency(c)["host_bytes"] for c in "pqi"})
            with pytest.raises(ValueError, match="in use"):
                store.demote(running[0])

        engine._read_ahead = squeeze
        jobs = [engine.submit(c, torch.cat([ids[c], ids[c][:, :4]], 1), answer=ids[c][:, :6]) for c in "pq"]
        engine.step_batch()
    assert seen["running"] == ["p", "q"]
    assert all(seen["after"][c] == seen["before"][c] > 0 for c in "pq")  # running: kept in host memory
    assert seen["before"]["i"] > 0 and seen["after"]["i"] == 0  # idle: demoted
    assert all(j.reused_tokens == 48 for j in jobs)
    for c, j in zip("pq", jobs):
        _stored_kv_equals_recompute(model, store, c, j.result())
    store.close()


def test_jobs_that_cannot_batch_run_alone_reason_logged_once(tmp_path, caplog):
    model = tiny_model("llama")
    store = make_store(tmp_path)
    g = torch.Generator().manual_seed(2)
    with caplog.at_level(logging.WARNING, logger="cachedattn"), Engine(model, store, background=False,
                                                                          max_batch=4) as engine:
        for c in "abc":
            engine.submit(c, torch.randint(1, VOCAB, (1, 8), generator=g), max_new_tokens=3, do_sample=True,
                          pad_token_id=0)
        sizes = []
        while batch := engine.step_batch():
            sizes.append(len(batch))
    assert sizes == [1, 1, 1]
    assert sum("sampling" in r.message for r in caplog.records) == 1
    store.close()


def test_sliding_window_model_runs_one_at_a_time(tmp_path, caplog):
    model = tiny_model("mistral")
    store = make_store(tmp_path)
    g = torch.Generator().manual_seed(3)
    with caplog.at_level(logging.WARNING, logger="cachedattn"), Engine(model, store, background=False,
                                                                          max_batch=4) as engine:
        jobs = [engine.submit(c, torch.randint(1, VOCAB, (1, 8), generator=g), answer=torch.tensor([[1, 2]]))
                for c in "ab"]
        while engine.step_batch():
            pass
    assert [j.batch_size for j in jobs] == [1, 1] and all(j.done() for j in jobs)
    assert sum("sliding-window" in r.message for r in caplog.records) == 1
    store.close()


def test_batch_token_budget_and_kinds_end_a_batch(tmp_path):
    model = tiny_model("llama")
    store = make_store(tmp_path)
    g = torch.Generator().manual_seed(4)
    with Engine(model, store, background=False, max_batch=8, max_batch_tokens=40) as engine:
        a = [engine.submit(f"a{i}", torch.randint(1, VOCAB, (1, 10), generator=g), answer=torch.tensor([[1, 2]]))
             for i in range(4)]  # 12 tokens each: three fit in 40
        b = engine.submit("b", torch.randint(1, VOCAB, (1, 5), generator=g), max_new_tokens=2, pad_token_id=0)
        c = engine.submit("a3", torch.randint(1, VOCAB, (1, 5), generator=g), max_new_tokens=2, pad_token_id=0)
        sizes = []
        while batch := engine.step_batch():
            sizes.append([j.conv_id for j in batch])
    # answer jobs and a generate job never share a batch; one conversation appears once per batch
    assert sizes == [["a0", "a1", "a2"], ["a3"], ["b", "a3"]]
    assert all(j.done() for j in a + [b, c])
    store.close()


@pytest.mark.parametrize("kw", [{"max_batch": 0}, {"max_batch": -2}, {"max_batch": 2.5}, {"max_batch": True},
                                {"max_batch_tokens": 0}, {"max_batch_tokens": "8"}])
def test_engine_validates_batch_options(tmp_path, kw):
    model = tiny_model("llama")
    store = make_store(tmp_path)
    with pytest.raises(ValueError, match=next(iter(kw))):
        Engine(model, store, **kw)
    assert getattr(model, "_cachedattn", None) is None  # refused before patching
    store.close()


def test_a_failed_batch_reruns_its_jobs_one_at_a_time(tmp_path, monkeypatch, caplog):
    from cachedattn.hf.batch import BatchSession

    def broken(self, *a, **k):
        raise RuntimeError("batch broke")

    monkeypatch.setattr(BatchSession, "forward_turns", broken)
    model = tiny_model("llama")
    store = make_store(tmp_path)
    g = torch.Generator().manual_seed(5)
    with caplog.at_level(logging.WARNING, logger="cachedattn"), Engine(model, store, background=False,
                                                                          max_batch=4) as engine:
        full = [torch.randint(1, VOCAB, (1, 9), generator=g) for _ in range(3)]
        jobs = [engine.submit(f"f{i}", x, answer=torch.tensor([[3, 4]])) for i, x in enumerate(full)]
        assert len(engine.step_batch()) == 3
    assert all(j.batch_size == 1 and torch.equal(j.result(), torch.cat([x, torch.tensor([[3, 4]])], 1))
               for j, x in zip(jobs, full))
    assert any("batch broke" in r.message for r in caplog.records)
    store.close()


class _Stream:
    def __init__(self):
        self.tokens, self.ends = [], 0

    def put(self, value):
        self.tokens.append(value.reshape(-1).tolist())

    def end(self):
        self.ends += 1


class _StopAt:
    """A per-request stop: once the answer holds `k` tokens (as a server's stop string or cancel flag)."""

    def __init__(self, prompt_len, k):
        self.prompt_len, self.k = prompt_len, k

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - self.prompt_len >= self.k, dtype=torch.bool)


def _hooked_jobs(model, tmp_path, max_batch):
    """Server-like jobs: each with its own streamer, stop criterion and seeded sampler (or greedy)."""
    from cachedattn.server.generation import Sampler

    store = make_store(tmp_path / f"b{max_batch}")
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(1, VOCAB, (1, n), generator=g) for n in (7, 15, 4, 26, 11)]
    seeded = [None, 11, 12, None, 11]  # rows 1 and 4: same seed, different prompts
    stops = [None, None, 3, None, 2]
    bounds = [6, 6, 6, 4, 6]
    with Engine(model, store, background=False, max_batch=max_batch) as engine:
        jobs, streams = [], []
        for i, (x, seed, k, b) in enumerate(zip(prompts, seeded, stops, bounds)):
            s = _Stream()
            streams.append(s)
            jobs.append(engine.submit(
                f"h{i}", x, max_new_tokens=b, do_sample=False, pad_token_id=0, streamer=s,
                stopping_criteria=[_StopAt(x.shape[1], k)] if k else [],
                logits_processor=[Sampler(0.9, 0.95, seed, top_k=50)] if seed else []))
        while engine.step_batch():
            pass
    store.close()
    return prompts, jobs, streams


def test_jobs_with_streamers_stops_and_seeded_samplers_batch_and_equal_alone(tmp_path):
    model = tiny_model("llama")
    prompts, alone, alone_streams = _hooked_jobs(model, tmp_path, 1)
    cachedattn.unpatch(model)
    _, batched, streams = _hooked_jobs(model, tmp_path, 8)
    assert [j.batch_size for j in batched] == [5] * 5  # they ran as one batch
    for x, a, b, sa, sb in zip(prompts, alone, batched, alone_streams, streams):
        assert torch.equal(a.result(), b.result()), x.shape
        assert sb.tokens == sa.tokens and sb.ends == sa.ends == 1  # the prompt, then each token, then end()
        assert sb.tokens[0] == x[0].tolist() and b.answer_tokens == a.answer_tokens
    assert [j.answer_tokens for j in batched][2::2] == [3, 2] and batched[3].answer_tokens <= 4


def test_a_failed_batch_fails_the_jobs_it_already_streamed(tmp_path, monkeypatch):
    """Running a job again after its streamer had tokens would stream them twice: it fails instead;
    the rows that streamed nothing run again alone."""
    from cachedattn.hf.batch import BatchSession

    real = BatchSession.generate

    def breaks_midway(self, ids, **kw):
        class Boom:
            def __init__(self, row):
                self.row = row

            def __call__(self, input_ids, scores, **k):
                if input_ids.shape[1] - ids[self.row].numel() >= 2:
                    raise RuntimeError("batch broke")
                return torch.zeros(1, dtype=torch.bool)

        kw["row_stopping_criteria"] = [Boom(0)] + list(kw["row_stopping_criteria"][1:])
        return real(self, ids, **kw)

    monkeypatch.setattr(BatchSession, "generate", breaks_midway)
    model = tiny_model("llama")
    store = make_store(tmp_path)
    g = torch.Generator().manual_seed(8)
    with Engine(model, store, background=False, max_batch=4) as engine:
        s0, s2 = _Stream(), _Stream()
        j0 = engine.submit("x0", torch.randint(1, VOCAB, (1, 6), generator=g), max_new_tokens=4, pad_token_id=0,
                           streamer=s0)
        j1 = engine.submit("x1", torch.randint(1, VOCAB, (1, 9), generator=g), max_new_tokens=4, pad_token_id=0)
        engine.step_batch()
    with pytest.raises(RuntimeError, match="batch broke"):
        j0.result()
    assert j1.result().shape[1] == 9 + 4 and j1.batch_size == 1  # streamed nothing: ran again alone
    store.close()
