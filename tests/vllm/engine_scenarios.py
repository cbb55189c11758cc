"""Scenarios of a real vLLM engine with and without CachedAttnConnector, run
in the vLLM environment (.venv-vllm) by test_vllm_engine.py; prints one JSON
object: each scenario's greedy tokens with and without the connector and the
store's counters.

    .venv-vllm/bin/python tests/vllm/engine_scenarios.py MODEL_DIR WORK_DIR [REDIS_URL]
"""

from __future__ import annotations

import gc
import json
import os
import random
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: its store can be inspected


def make_llm(model, extra=None):
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kw = dict(model=model, enforce_eager=True, dtype="float32", max_model_len=1024, enable_prefix_caching=False,
              gpu_memory_utilization=0.5, seed=0)
    if extra is not None:
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="CachedAttnConnector", kv_connector_module_path="cachedattn.vllm", kv_role="kv_both",
            kv_connector_extra_config=extra,
        )
    return LLM(**kw)


def shut(llm):
    from cachedattn.vllm import connector

    llm.llm_engine.engine_core.shutdown()  # the worker-side connector shuts down and closes its store
    del llm
    gc.collect()
    if len(connector.open_workers):
        raise AssertionError(f"the connector left {len(connector.open_workers)} store(s) open after vLLM shut down")


def store_stats():
    from cachedattn.vllm import connector

    (worker,) = list(connector.open_workers)
    worker.transfers.wait_idle(60)
    s = worker.store.stats()
    return {"host_hits": s["host"]["hits"], "disk_hits": s["disk"]["hits"], "remote_hits": s["remote"]["hits"],
            "corrupt": s["corrupt_chunks"] + s["remote"]["corrupt"], "conversations": s["conversations"]}


def gen(llm, prompts, n=12, salt=None):
    from vllm import SamplingParams

    salted = {"cache_salt": salt} if salt is not None else {}
    outs = llm.generate([{"prompt_token_ids": p, **salted} for p in prompts], SamplingParams(max_tokens=n, temperature=0), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def conversation(llm, first, follow_ups):
    """Turns of one conversation: each prompt is the history, the answer and the next message."""
    prompt, answers = list(first), []
    for msg in [None, *follow_ups]:
        if msg is not None:
            prompt = prompt + answers[-1] + list(msg)
        answers.append(gen(llm, [prompt])[0])
    return answers


def churn(llm, toks, rnd):
    """200 requests through the engine's own loop, a shared prefix on half of them, some aborted mid-stream
    (also while their load runs); then steps until nothing is held. Returns what must be back to zero."""
    from vllm import SamplingParams

    eng = llm.llm_engine
    params = SamplingParams(max_tokens=8, temperature=0)
    shared = toks(140)
    aborted = 0
    for i in range(200):
        prompt = shared + toks(rnd.randrange(1, 200)) if i % 2 else toks(rnd.randrange(100, 400))
        eng.add_request(f"c{i}", {"prompt_token_ids": prompt}, params)
        if i % 10 == 9:
            for _ in range(2):
                eng.step()
            eng.abort_request([f"c{i}", f"c{i - 3}"])
            aborted += 2
    while eng.has_unfinished_requests():
        eng.step()
    core = eng.engine_core.engine_core
    sched = core.scheduler
    # The last requests' saves run in the background and their blocks come back at a later step: vLLM keeps
    # stepping while it holds them (has_requests); so does this loop, for as long as the saves take.
    deadline = time.monotonic() + 120
    while sched.has_requests() and time.monotonic() < deadline:
        core.step()
        time.sleep(0.005)
    from cachedattn.vllm import connector

    (worker,) = list(connector.open_workers)
    worker.transfers.wait_idle(60)
    pool = sched.kv_cache_manager.block_pool
    store = worker.store
    stored = store.conversations()
    stats = store.stats()
    for conv in stored:
        store.drop(conv)
    return {
        "aborted": aborted,
        "vllm_free_blocks": pool.get_num_free_blocks(),
        "vllm_blocks": pool.num_gpu_blocks - 1,  # the null block is never free
        "requests_left": len(sched.requests),
        "saves_in_flight": sched.connector.planner.saves_in_flight,
        "stored": len(stored),
        "host_used_after_drop": store.stats()["host"]["used_bytes"],
        "host_hits": stats["host"]["hits"],
        "transfers": dict(worker.transfers.stats),
    }


def main():
    model, work = sys.argv[1], sys.argv[2]
    redis_url = sys.argv[3] if len(sys.argv) > 3 else None
    rnd = random.Random(0)
    toks = lambda n: [rnd.randrange(5, 1000) for _ in range(n)]  # noqa: E731
    conv = (toks(300), [toks(40), toks(60)])
    system = toks(260)
    shared = [system + toks(30), system + toks(50), system + toks(20)]
    late = (toks(280), [toks(50)])
    tenant = toks(200)
    tenant_next = tenant + toks(20)
    out = {}

    ref = make_llm(model)
    out["ref"] = {"conv": conversation(ref, *conv), "shared": gen(ref, shared), "late": conversation(ref, *late),
                  "tenant": gen(ref, [tenant_next])}
    shut(ref)

    disk = os.path.join(work, "kv")
    llm = make_llm(model, {"host_bytes": "64M", "disk_dir": disk})
    out["host"] = {"conv": conversation(llm, *conv), "shared": [gen(llm, [p])[0] for p in shared]}
    out["host_late_first"] = gen(llm, [late[0]])  # stored now, reused after the restart
    gen(llm, [toks(5)], 1)  # a step more: in-process, a finished request's save runs at the next step
    out["host_stats"] = store_stats()
    # vLLM's cache_salt: a prefix stored for one tenant is reused by that tenant only.
    gen(llm, [tenant], salt="tenant-a")
    gen(llm, [toks(5)], 1)
    hits = [store_stats()["host_hits"]]
    out["salt"] = {"b": gen(llm, [tenant_next], salt="tenant-b")[0]}
    hits.append(store_stats()["host_hits"])
    out["salt"]["a"] = gen(llm, [tenant_next], salt="tenant-a")[0]
    hits.append(store_stats()["host_hits"])
    out["salt"]["host_hits"] = hits
    shut(llm)

    llm = make_llm(model, {"host_bytes": "64M", "disk_dir": disk})  # a restart: only the disk remembers
    out["restart"] = {"conv": conversation(llm, *conv)}
    out["restart_stats"] = store_stats()
    shut(llm)

    # A damaged byte in every stored chunk file: the load fails its checksum, vLLM recomputes.
    n = 0
    for root, _, files in os.walk(disk):
        for f in files:
            p = os.path.join(root, f)
            if os.path.getsize(p) > 8192:
                with open(p, "r+b") as fh:
                    fh.seek(os.path.getsize(p) // 2)
                    b = fh.read(1)
                    fh.seek(-1, 1)
                    fh.write(bytes([b[0] ^ 0xFF]))
                n += 1
    out["damaged_files"] = n
    llm = make_llm(model, {"host_bytes": "64M", "disk_dir": disk})
    out["damaged"] = {"late": conversation(llm, *late)}
    out["damaged_stats"] = store_stats()
    shut(llm)

    # "loads": "async": copies while the request waits in vLLM's queue, reported before it is scheduled.
    llm = make_llm(model, {"host_bytes": "64M", "disk_dir": os.path.join(work, "async"), "loads": "async"})
    out["async"] = {"conv": conversation(llm, *conv)}
    out["async_stats"] = store_stats()
    shut(llm)

    llm = make_llm(model, {"host_bytes": "64M", "disk_dir": os.path.join(work, "churn")})
    out["churn"] = churn(llm, toks, rnd)
    shut(llm)

    if redis_url:
        a = make_llm(model, {"host_bytes": "64M", "disk_dir": os.path.join(work, "a"), "remote": redis_url})
        out["remote_a"] = {"conv": conversation(a, *conv)}
        a_stats = store_stats()
        shut(a)
        b = make_llm(model, {"host_bytes": "64M", "disk_dir": os.path.join(work, "b"), "remote": redis_url})
        out["remote_b"] = {"conv": conversation(b, *conv)}
        out["remote_stats"] = {"a": a_stats, "b": store_stats()}
        shut(b)
    print("SCENARIOS " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
