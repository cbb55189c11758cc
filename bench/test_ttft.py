"""Time to first token of one turn with H history tokens and N new ones.

Systems, measured side by side on the same model in one run:
- recompute: the plain model on all H + N tokens;
- ideal: the history's DynamicCache kept alive in memory, N tokens computed;
- host: cachedattn, history in the host-memory tier;
- disk: cachedattn, history demoted to the disk tier before each round.
Model: the demo's small llama (6 layers, hidden 256, 8 heads, 2 KV heads, fp32).
Grid: CACHEDATTN_BENCH_TTFT="H:N,H:N,..." (default below).

    python3 -m pytest bench/test_ttft.py
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from transformers import DynamicCache

import cachedattn
from cachedattn.hf.demo import small_model

GRID = [tuple(map(int, p.split(":"))) for p in os.environ.get(
    "CACHEDATTN_BENCH_TTFT", "512:64,2048:64,4096:32,4096:64,4096:512,8192:64").split(",")]
SYSTEMS = ["recompute", "ideal", "host", "disk"]
_TIMES: dict[tuple[int, int, str], float] = {}


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(os.cpu_count() or 1)
    model = small_model()
    with tempfile.TemporaryDirectory(dir=os.environ.get("CACHEDATTN_BENCH_DIR", "/var/tmp")) as d:
        store = cachedattn.AttentionStore(host_bytes=1 << 30, disk_dir=d, disk_bytes=8 << 30, chunk_tokens=256)
        cachedattn.patch(model, store)
        yield model, store
        store.close()


def _stored_history(model, store, h, n, conv):
    """A turn's ids (h history tokens, n new ones), with the history stored under conv; and the model's
    cache keyword."""
    vocab = model.config.vocab_size
    history = torch.randint(1, vocab, (1, h), generator=torch.Generator().manual_seed(h))
    ids = torch.cat([history, torch.randint(1, vocab, (1, n), generator=torch.Generator().manual_seed(n))], 1)
    if conv not in store:
        with torch.no_grad(), cachedattn.session(model, conv):
            model(ids[:, :h])  # stores the history
        store.flush()
    return ids, conv, model._cachedattn.kv.cache_kwarg


@pytest.mark.parametrize("system", SYSTEMS)
@pytest.mark.parametrize("h,n", GRID, ids=[f"H{h}-N{n}" for h, n in GRID])
def test_ttft(benchmark, report, setup, h, n, system):
    model, store = setup
    ids, conv, kwarg = _stored_history(model, store, h, n, f"H{h}")
    with torch.no_grad():
        if system == "recompute":
            benchmark.pedantic(lambda: model(ids), rounds=9, warmup_rounds=2)
        elif system == "ideal":
            cache = DynamicCache(config=model.config)
            model(ids[:, :h], use_cache=True, **{kwarg: cache})

            def ideal():
                model(ids[:, h:], use_cache=True, **{kwarg: cache})
                cache.crop(-n)

            benchmark.pedantic(ideal, rounds=9, warmup_rounds=2)
        else:
            def turn():
                with cachedattn.session(model, conv, save=False) as s:
                    model(ids)
                assert s.reused_tokens == h

            def setup_round():  # history on disk only, or all in host memory, before each round
                if system == "disk":
                    store.demote(conv)
                else:
                    store.prefetch(conv).result()

            benchmark.pedantic(turn, setup=setup_round, rounds=9, warmup_rounds=2)
    secs = benchmark.stats.stats.median
    _TIMES[(h, n, system)] = secs
    row = {"suite": "ttft", "case": f"H={h} N={n} {system}", "ms": secs * 1e3}
    if system in ("host", "disk") and (h, n, "ideal") in _TIMES:
        row["vs ideal"] = secs / _TIMES[(h, n, "ideal")]
        row["below recompute"] = 1 - secs / _TIMES[(h, n, "recompute")]
    report.append(row)


RATIO_GRID = [tuple(map(int, p.split(":"))) for p in os.environ.get(
    "CACHEDATTN_BENCH_TTFT_RATIO", "2048:64,4096:64").split(",")]


@pytest.mark.parametrize("h,n", RATIO_GRID, ids=[f"H{h}-N{n}" for h, n in RATIO_GRID])
def test_cached_turn_vs_ideal_interleaved(report, setup, h, n):
    """host and disk against ideal, alternating turn by turn (ideal, host, disk, ideal, ...) so that all
    three see the same machine load: the medians' ratios are what the history load costs over a cache
    kept alive in memory. 31 rounds after 3 warm-up rounds."""
    import time

    model, store = setup
    ids, conv, kwarg = _stored_history(model, store, h, n, f"H{h}")
    times = {"ideal": [], "host": [], "disk": []}
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(ids[:, :h], use_cache=True, **{kwarg: cache})

        def ideal():
            model(ids[:, h:], use_cache=True, **{kwarg: cache})
            cache.crop(-n)

        def cached():
            with cachedattn.session(model, conv, save=False) as s:
                model(ids)
            assert s.reused_tokens == h

        for rnd in range(34):
            for system in times:
                if system == "disk":
                    store.demote(conv)
                elif system == "host":
                    store.prefetch(conv).result()
                t0 = time.perf_counter()
                ideal() if system == "ideal" else cached()
                if rnd >= 3:
                    times[system].append(time.perf_counter() - t0)
    med = {s: float(torch.tensor(v).median()) for s, v in times.items()}
    for system in ("host", "disk"):
        report.append({"suite": "ttft", "case": f"H={h} N={n} {system} (interleaved)", "ms": med[system] * 1e3,
                       "vs ideal": med[system] / med["ideal"]})
