"""Batched turns: tokens/s of prefill and of decode for batch sizes 1..16, each
batch with its histories cached next to the same batch recomputing them.

Every row is a conversation with H history tokens, N new ones and D generated
(min_new_tokens = max_new_tokens = D, so every row decodes D tokens).
- cached: the histories are stored (host-memory tier); each row computes its N
  new tokens, then the batch decodes;
- recompute: the same batch with nothing stored: each row computes H + N.
Both run through cachedattn.batch_session (same padded layout, save=False so
that every round is the same turn: the cost of storing the new KV is left out).
Prefill tok/s: prompt tokens served (history included, B * (H + N)) over the
time to the batch's first token. Decode tok/s: B * (D - 1) over the rest.
Model: the demo's small llama (6 layers, hidden 256, 8 heads, 2 KV heads, fp32).
Shape: CACHEDATTN_BENCH_BATCH="H:N:D" (default 512:32:32).

    python3 -m pytest bench/test_batching.py
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

import cachedattn
from cachedattn.hf.demo import small_model

H, N, D = map(int, os.environ.get("CACHEDATTN_BENCH_BATCH", "512:32:32").split(":"))
BATCHES = [1, 2, 4, 8, 16]
CASES = [(b, mode) for b in BATCHES for mode in ("recompute", "cached")]  # side by side per batch size
_PREFILL: dict[int, float] = {}  # recompute's prefill tok/s per batch size, for the ratio
_DECODE: dict[int, float] = {}


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(os.cpu_count() or 1)
    model = small_model()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    convs = [f"b{i}" for i in range(max(BATCHES))]
    ids = [torch.randint(1, vocab, (H + N,), generator=g) for _ in convs]
    store = cachedattn.AttentionStore(host_bytes=1 << 30, chunk_tokens=128)
    cachedattn.patch(model, store)
    with torch.no_grad():
        for c, x in zip(convs, ids):
            with cachedattn.session(model, c):
                model(x[None, :H])  # stores the history
    store.flush()
    yield model, convs, ids
    cachedattn.unpatch(model)
    store.close()


@pytest.mark.parametrize("batch,mode", CASES, ids=[f"B{b}-{m}" for b, m in CASES])
def test_batch_throughput(benchmark, report, setup, batch, mode):
    model, convs, ids = setup
    # Recompute: conversations with nothing stored, same ids.
    names = convs[:batch] if mode == "cached" else [f"new-{c}" for c in convs[:batch]]
    rows = ids[:batch]
    ttft, total = [], []

    def run():
        bs = cachedattn.batch_session(model, names, save=False)
        with torch.no_grad():
            t = time.perf_counter()
            out = bs.generate(rows, max_new_tokens=D, min_new_tokens=D, do_sample=False, pad_token_id=0,
                              return_dict_in_generate=True)
            total.append(time.perf_counter() - t)
        ttft.append(bs.rows[0].ttft)
        reused = [r.reused_tokens for r in bs.rows]
        if reused != ([H] * batch if mode == "cached" else [0] * batch):
            raise RuntimeError(f"{mode}: rows reused {reused} tokens")  # the comparison would be meaningless
        if any(g.numel() != D for g in out.rows):
            raise RuntimeError("a row did not decode D tokens")

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    t_pre = statistics.median(ttft[1:])
    t_dec = statistics.median(t - f for t, f in zip(total[1:], ttft[1:]))
    prefill = batch * (H + N) / t_pre
    decode = batch * (D - 1) / t_dec
    row = {"suite": "batching", "case": f"B{batch} {mode}", "batch": batch, "prefill tok/s": prefill,
           "decode tok/s": decode, "TTFT ms": 1e3 * t_pre, "turn ms": 1e3 * statistics.median(total[1:])}
    if mode == "recompute":
        _PREFILL[batch], _DECODE[batch] = prefill, decode
    elif batch in _PREFILL:
        row.update({"prefill x recompute": prefill / _PREFILL[batch], "decode x recompute": decode / _DECODE[batch]})
    report.append(row)
