"""bench/test_gpu_ttft.py in its CPU dry mode (tiny llama, fp32, the copy-engine
systems through the fake engine): every system and check of the GPU TTFT
benchmark runs, so the benchmark cannot rot between GPU runs."""

import importlib.util
from pathlib import Path

import torch

from cachedattn.transfer.factory import FAKE_ENV

BENCH = Path(__file__).resolve().parents[2] / "bench" / "test_gpu_ttft.py"


def test_gpu_ttft_benchmark_runs_on_the_cpu(monkeypatch):
    monkeypatch.setenv("CACHEDATTN_TTFT_DRY", "cpu")
    monkeypatch.setenv("CACHEDATTN_TTFT_H", "64")
    monkeypatch.setenv(FAKE_ENV, "1")  # also undoes the bench's own setting at teardown
    spec = importlib.util.spec_from_file_location("gpu_ttft_bench_dry", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        rows = bench.run_all(lambda fn, setup: bench.simple_timer(fn, setup, rounds=1, warmup=1))
    finally:
        torch.set_num_threads(threads)  # the dry run uses one
    cases = {r["case"]: r for r in rows}
    for system in bench.SYSTEMS:
        assert cases[f"H=64 N=16 {system}"]["ms"] > 0
    for system in bench.ENGINE_SYSTEMS:
        assert cases[f"H=64 N=16 {system}"]["stall_ms"] >= 0
    # the bounded default stages fewer layers than "all" (defect 5: its cost is measured beside it)
    assert 0 < cases["H=64 N=16 engine-default"]["staged_MB"] < cases["H=64 N=16 engine-ra-all"]["staged_MB"]
    for system in bench.CACHED_SYSTEMS:
        assert cases[f"exact fp32 tiny H=200 N=17 {system}"]["max_abs_diff"] <= 1e-4
        assert cases[f"exact float32 argmax H=64 {system}"]["argmax_same"]
