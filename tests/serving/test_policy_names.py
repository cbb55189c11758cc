"""README's `AttentionStore(..., eviction="queue")` must work in a fresh
interpreter, before anything from cachedattn.serving was imported."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("name", ["queue", "predictive"])
def test_serving_policies_are_known_to_a_fresh_store(tmp_path, name):
    code = (
        "import cachedattn, sys\n"
        "assert 'cachedattn.serving' not in sys.modules\n"
        f"s = cachedattn.AttentionStore(host_bytes='8M', disk_dir={str(tmp_path)!r}, eviction={name!r})\n"
        "print(type(s.policy).__name__)\n"
        "s.close()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == {"queue": "QueueAwarePolicy", "predictive": "PredictivePolicy"}[name]
