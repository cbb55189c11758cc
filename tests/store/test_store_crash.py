"""kill -9 never loses a complete save: >= 200 rounds of a forked writer (torch already
imported) killed at random instants, during reopen and recovery, during saves and the
rewrites of partial last chunks; after each reopen every conversation is its last
complete save or a newer complete one, and its KV equals recompute (crash_zygote.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_kill_9_at_random_instants_never_loses_a_complete_save(tmp_path):
    d = tmp_path / "kv"
    d.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "tests.store.crash_zygote", str(d), "200", "7"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert not out["failures"], out["failures"]
    assert out["rounds"] == 200
    assert out["killed_before_verified"] >= 20  # kills during reopen and recovery
    assert out["killed_mid_save"] >= 50  # kills while a save (most rewrite a partial last chunk) was running
    assert out["seconds"] < 180
