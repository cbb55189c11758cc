import torch

import cachedattn
from cachedattn import AttentionStore
from cachedattn.serving import Engine, QueueAwarePolicy

from ..hf.models import VOCAB, tiny_model


def test_queue_aware_order():
    queue = ["c", "a", "c", "e"]
    p = QueueAwarePolicy(lambda: queue, lambda: 2)
    for conv in ["a", "b", "c", "d", "e"]:
        p.on_insert(conv)
    p.on_access("b")  # b used more recently than d
    assert p.order(["a", "b", "c", "d", "e"], "host") == ["d", "b", "e", "a", "c"]
    # Disk: the eviction window (first 2 queued jobs: c, a) is never dropped.
    assert p.order(["a", "b", "c", "d", "e"], "disk") == ["d", "b", "e"]


def test_engine_results_equal_recompute_and_keep_order(tmp_path):
    model = tiny_model("llama")
    store = AttentionStore(host_bytes=1 << 24, disk_dir=str(tmp_path / "kv"), chunk_tokens=16, hugepages="off",
                           eviction=QueueAwarePolicy())
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
                hist[c] = out
            starts = [jobs[c][0].started for c in "abc"]
            assert starts == sorted(starts)  # first come, first served
    assert sum(j.tier_hits["host"] + j.tier_hits["disk"] for j, _ in jobs.values()) > 0
    store.close()


def test_engine_prefetches_queued_conversations_from_disk(tmp_path):
    model = tiny_model("llama")
    store = AttentionStore(host_bytes=1 << 24, disk_dir=str(tmp_path / "kv"), chunk_tokens=16, hugepages="off")
    ids = {c: torch.randint(1, VOCAB, (1, 40), generator=torch.Generator().manual_seed(i)) for i, c in enumerate("xyz")}
    cachedattn.patch(model, store)
    with torch.no_grad():
        for c in "xyz":
            with cachedattn.session(model, c):
                model(ids[c])
    store.flush()
    for c in "xyz":
        store.demote(c)
    with Engine(model, store) as engine:
        jobs = [engine.submit(c, torch.cat([ids[c], ids[c][:, :5]], 1), max_new_tokens=2, do_sample=False,
                              pad_token_id=0) for c in "xyz"]
        for j in jobs:
            j.result(timeout=60)
    store.flush()
    assert store.stats()["host"]["prefetches"] > 0
    store.close()
