"""transfer/checkpoints.py: where production announces host releases, device frees and host reads. In production
nothing watches them and the test doubles are never loaded; under the fake copy engine, testing/checkpoint_watch.py
watches them (the engines' release checks, the race detector)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cachedattn.transfer import checkpoints
from cachedattn.transfer.factory import FAKE_ENV

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.no_race_detector  # the checkpoints themselves, with made-up pointers

# Loads every module that announces a checkpoint, and the factory, as a CPU model's patch does.
_LOAD = """
import importlib, sys
for m in ("cachedattn", "cachedattn.hf.patch", "cachedattn.hf.session", "cachedattn.hf.batch",
          "cachedattn.store.block_pool", "cachedattn.store.load", "cachedattn.transfer.staging"):
    importlib.import_module(m)
from cachedattn.transfer import checkpoints, factory
engine = factory.engine_for("cpu", 2)
doubles = sorted(m for m in sys.modules if m.startswith("cachedattn.testing") or m.endswith("fake_engine"))
print(type(engine).__name__, len(checkpoints._watchers), doubles)
"""


def _load(fake: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != FAKE_ENV}
    if fake:
        env[FAKE_ENV] = "1"
    return subprocess.run([sys.executable, "-c", _LOAD], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True, timeout=300).stdout.strip()


def test_production_loads_no_test_double_and_nothing_watches_its_checkpoints():
    assert _load(fake=False) == "NoneType 0 []"


def test_the_fake_engine_when_asked_for_brings_the_watch_on_the_checkpoints():
    doubles = ["cachedattn.testing", "cachedattn.testing.checkpoint_watch", "cachedattn.testing.fake_engine"]
    assert _load(fake=True) == f"FakeCopyEngine 1 {doubles}"


def test_a_watcher_sees_every_checkpoint_with_its_arguments_until_unwatched():
    seen = []

    class Watcher:
        def host_release(self, ptr, nbytes):
            seen.append(("host_release", ptr, nbytes))

        def device_free(self, ptr, nbytes, stream, recorded):
            seen.append(("device_free", ptr, nbytes, stream, tuple(recorded)))

        def host_reads(self, what, *tensors):
            seen.append(("host_reads", what, tensors))

    w = Watcher()
    checkpoints.watch(w)
    checkpoints.watch(w)  # installed once
    try:
        checkpoints.host_release(16, 32)
        checkpoints.device_free(64, 8, 3, [5])
        checkpoints.host_reads("the first token", "a", "b")
    finally:
        checkpoints.unwatch(w)
    checkpoints.host_release(16, 32)
    assert seen == [
        ("host_release", 16, 32), ("device_free", 64, 8, 3, (5,)), ("host_reads", "the first token", ("a", "b")),
    ]
    assert w not in checkpoints._watchers
