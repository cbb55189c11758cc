import pytest
import torch

import cachedattn
from cachedattn import AttentionStore
from cachedattn.serving import Engine, QueueAwarePolicy

from ..hf.models import VOCAB, tiny_model


def make_store(tmp_path, host_bytes=1 << 24, **kw):
    return AttentionStore(host_bytes=host_bytes, disk_dir=str(tmp_path / "kv"), chunk_tokens=16, hugepages="off", **kw)


def _on_disk(model, store, convs: str, n: int) -> dict:
    """Stores n random tokens of KV for each conversation, then moves them all to disk."""
    ids = {c: torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(i)) for i, c in enumerate(convs)}
    cachedattn.patch(model, store)
    with torch.no_grad():
        for c in convs:
            with cachedattn.session(model, c):
                model(ids[c])
    store.flush()
    for c in convs:
        store.demote(c)
    return ids


def test_engine_results_equal_recompute_and_keep_order(tmp_path):
    model = tiny_model("llama")
    store = make_store(tmp_path, eviction=QueueAwarePolicy())
    g = torch.Generator().manual_seed(0)
    hist = {c: torch.zeros(1, 0, dtype=torch.long) for c in "abc"}
    with Engine(model, store) as engine:
        for turn in range(3):
            jobs = {}
            for c in "abc":
                full = torch.cat([hist[c], torch.randint(1, VOCAB, (1, 20), generator=g)], 1)
                jobs[c] = (engine.submit(c, full, max_new_tokens=5, do_sample=False, pad_token_id=0), full)
            for c, (job, full) in jobs.items():
                out = job.result(timeout=60)
                with torch.no_grad():  # outside a session: plain recompute
                    ref = model.generate(full, max_new_tokens=5, do_sample=False, pad_token_id=0)
                assert torch.equal(out, ref)
                assert job.reused_tokens == max(hist[c].shape[1] - 1, 0) and job.ttft is not None
                assert sum(job.tier_tokens.values()) == job.reused_tokens
                hist[c] = out
            starts = [jobs[c][0].started for c in "abc"]
            assert starts == sorted(starts)  # first come, first served
    store.close()


def _answer_turns(model, engine_kw, tmp_path, host_bytes=1 << 24):
    """Three conversations x three turns with known answers; returns per-job logits of the last answer token."""
    store = make_store(tmp_path, host_bytes=host_bytes, eviction="queue")
    g = torch.Generator().manual_seed(1)
    hist = {c: torch.zeros(1, 0, dtype=torch.long) for c in "xyz"}
    results = []
    with Engine(model, store, background=False, **engine_kw) as engine:
        for turn in range(3):
            jobs = []
            for c in "xyz":
                full = torch.cat([hist[c], torch.randint(1, VOCAB, (1, 30), generator=g)], 1)
                answer = torch.randint(1, VOCAB, (1, 12), generator=g)
                jobs.append((c, engine.submit(c, full, answer=answer), full, answer))
            while engine.step() is not None:
                engine.wait_background_io()
            for c, job, full, answer in jobs:
                seq = job.result()
                assert torch.equal(seq, torch.cat([full, answer], 1))
                results.append(job)
                hist[c] = seq
    stats = store.stats()
    store.close()
    return results, hist, stats


@pytest.mark.parametrize("opts", [{}, {"layerwise": False, "read_buffer": False}, {"prefetch": False}])
def test_answer_jobs_store_prompt_and_answer(tmp_path, opts):
    model = tiny_model("llama")
    jobs, hist, _ = _answer_turns(model, opts, tmp_path)
    # Turn t reuses everything before it: the previous prompt and the fed answer.
    for j in jobs[3:]:
        assert j.reused_tokens == j.input_ids.shape[1] - 30 and j.answer_tokens == 12
    # The stored KV is what recompute gives: next-token logits through a session equal the plain model's.
    store = make_store(tmp_path)
    cachedattn.unpatch(model)
    cachedattn.patch(model, store)
    for c, ids in hist.items():
        probe = torch.cat([ids, torch.tensor([[5, 6, 7]])], 1)
        with torch.no_grad(), cachedattn.session(model, c, save=False) as s:
            got = model(probe).logits[0, -3:]
        assert s.reused_tokens == ids.shape[1]
        cachedattn.unpatch(model)
        with torch.no_grad():
            ref = model(probe).logits[0, -3:]
        cachedattn.patch(model, store)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    store.close()


def test_recompute_engine_stores_nothing(tmp_path):
    model = tiny_model("llama")
    jobs, _, stats = _answer_turns(model, {"save": False}, tmp_path)
    assert all(j.reused_tokens == 0 for j in jobs) and stats["tokens_stored"] == 0


def test_engine_prefetches_queued_conversations_from_disk(tmp_path):
    model = tiny_model("llama")
    store = make_store(tmp_path)
    ids = _on_disk(model, store, "xyz", 40)
    with Engine(model, store, background=False) as engine:
        jobs = [engine.submit(c, torch.cat([ids[c], ids[c][:, :5]], 1), answer=ids[c][:, :3]) for c in "xyz"]
        while engine.step() is not None:
            engine.wait_background_io()
    assert store.stats()["host"]["prefetches"] > 0
    assert jobs[0].tier_tokens["disk"] > 0  # the first job had nothing ahead of it
    assert jobs[1].tier_tokens == {"host": 40, "disk": 0} and jobs[2].tier_tokens["disk"] == 0
    store.close()


def test_engine_keeps_the_reserve_free(tmp_path):
    model = tiny_model("llama")
    per_chunk = None
    store = make_store(tmp_path, host_bytes=1 << 20)
    with Engine(model, store, background=False, reserve=0.5, read_buffer=False, prefetch=False) as engine:
        per_chunk = store._geometry.block_bytes
        g = torch.Generator().manual_seed(3)
        for i in range(8):
            engine.submit(f"c{i}", torch.randint(1, VOCAB, (1, 60), generator=g), answer=torch.tensor([[1, 2]]))
            engine.step()
            engine.wait_background_io()
            st = store.stats()["host"]
            assert st["capacity_bytes"] - st["used_bytes"] >= 0.5 * st["capacity_bytes"] - per_chunk
    store.close()


def test_engine_validates_options(tmp_path):
    model = tiny_model("llama")
    store = make_store(tmp_path)
    with pytest.raises(ValueError, match="reserve"):
        Engine(model, store, reserve=1.5)
    store.close()


def test_engine_handles_context_overflow_and_keeps_reusing(tmp_path):
    model = tiny_model("llama")
    store = make_store(tmp_path)
    g = torch.Generator().manual_seed(4)
    hist = torch.zeros(1, 0, dtype=torch.long)
    with Engine(model, store, background=False, max_context=96) as engine:
        jobs = []
        for turn in range(5):
            full = torch.cat([hist, torch.randint(1, VOCAB, (1, 20), generator=g)], 1)
            answer = torch.randint(1, VOCAB, (1, 10), generator=g)
            job = engine.submit("long", full, answer=answer)
            engine.step()
            hist = job.result()
            assert hist.shape[1] <= 96 and torch.equal(hist[:, -10:], answer)
            jobs.append(job)
    assert sum(j.dropped_tokens for j in jobs) > 0
    after_drop = [j for j in jobs if j.dropped_tokens]
    assert all(j.reused_tokens > 0 for j in after_drop)  # positions re-applied, history reused
    store.close()


@pytest.mark.parametrize("read_buffer", [True, False])
def test_read_buffer_loads_the_next_job_while_this_one_decodes(tmp_path, read_buffer):
    model = tiny_model("llama")
    store = make_store(tmp_path)
    ids = _on_disk(model, store, "pq", 48)
    # No look-ahead prefetch: only the read buffer can bring q in before its turn.
    with Engine(model, store, background=False, prefetch=False, read_buffer=read_buffer) as engine:
        jobs = [engine.submit(c, torch.cat([ids[c], ids[c][:, :4]], 1), answer=ids[c][:, :6]) for c in "pq"]
        while engine.step() is not None:
            engine.wait_background_io()
    assert jobs[0].tier_tokens == {"host": 0, "disk": 48}
    assert jobs[1].tier_tokens == ({"host": 48, "disk": 0} if read_buffer else {"host": 0, "disk": 48})
    store.close()
