"""CachedAttnConnector on the GPU plan, both roles, in the vLLM environment's Python (connector_device_plan.py):
chosen by vLLM's device (CUDA), other layouts refused by shape, keys apart from the CPU layout's, a finished
request's blocks saved D2H and reported, a later request matched with load_async=False and its blocks loaded
layer by layer byte for byte. Skipped, saying why, where that environment does not exist."""

from __future__ import annotations

import os
import subprocess

import pytest

from .test_vllm_engine import ROOT, VENV_PY


def test_the_connector_selects_and_runs_the_gpu_plan_on_cuda_layouts():
    if not VENV_PY.exists():
        pytest.skip(f"no vLLM environment at {VENV_PY}: run `bash scripts/setup.sh --vllm` (or set CACHEDATTN_VLLM_PYTHON)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's cachedattn, whatever the environment points at
    p = subprocess.run([str(VENV_PY), str(ROOT / "tests" / "vllm" / "connector_device_plan.py")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert p.returncode == 0 and "RESULT ok" in p.stdout, f"rc {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
