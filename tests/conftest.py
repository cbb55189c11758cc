import os

import numpy as np
import pytest
import torch

# The GPU path's tests run under the stream-ordering race detector (docs/gpu-ordering.md): every
# test under these paths, and any test marked gpu_path. A report fails the test.
RACE_CHECKED = ("tests/transfer/", "tests/hf/test_async_saving.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu_path: runs under the stream-ordering race detector")
    config.addinivalue_line("markers", "expect_races: breaks ordering on purpose; the detector must report it")
    config.addinivalue_line("markers", "no_race_detector: runs without the race detector (it installs its own)")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def _race_checked(request) -> bool:
    node = request.node
    if node.get_closest_marker("no_race_detector") is not None:
        return False
    if getattr(getattr(node, "callspec", None), "params", {}).get("gpu") == "cuda":
        return False  # a real card: its own ordering, nothing simulated
    path = node.nodeid.replace("\\", "/")
    return node.get_closest_marker("gpu_path") is not None or path.startswith(RACE_CHECKED)


@pytest.fixture(autouse=True)
def race_detector(request):
    """The detector of this test (None where it does not run); fails the test on any report."""
    if not _race_checked(request):
        yield None
        return
    from cachedattn.testing.race import Detector

    expect = request.node.get_closest_marker("expect_races") is not None
    with Detector() as det:
        yield det
    if request.node.get_closest_marker("xfail") is not None:
        return  # an expected failure calls det.check() itself, inside the test
    if expect:
        assert det.reports, "the ordering was broken on purpose, and the race detector reported nothing"
    else:
        det.check()


# ---- the seam between GPU-path tests and the engine they run on ------------------------------------------

GPU_TESTS_ENV = "CACHEDATTN_GPU_TESTS"  # "1": GPU-path tests taking `gpu` also run on the card (bench/gpu_suite.sh)
DTYPE_ENV = "CACHEDATTN_TEST_DTYPE"  # the models' dtype for tests taking `gpu` (default float32; the suite: bfloat16)


class GpuPath:
    """Where a GPU-path test runs. "fake": a CPU model, the deferred fake copy engine, under the race detector;
    "cuda": the model on the card, the native copy engine (no detector: real streams)."""

    def __init__(self, kind: str, monkeypatch):
        from cachedattn.transfer.factory import FAKE_ENV

        self.kind = kind
        self.device = torch.device("cuda" if kind == "cuda" else "cpu")
        self.dtype = getattr(torch, os.environ.get(DTYPE_ENV, "float32"))
        if kind == "fake":
            monkeypatch.setenv(FAKE_ENV, "1")
        else:
            monkeypatch.delenv(FAKE_ENV, raising=False)

    @property
    def exact(self) -> bool:
        return self.dtype == torch.float32

    def model(self, arch: str, **overrides):
        from tests.hf.models import tiny_model

        return tiny_model(arch, **overrides).to(self.device, self.dtype)

    def ids(self, t):
        return t.to(self.device)

    def engine(self, model):
        """The model's copy engine, of the kind this run expects."""
        from cachedattn import native
        from cachedattn.testing.fake_engine import FakeCopyEngine

        eng = model._cachedattn.gpu.engine
        assert isinstance(eng, FakeCopyEngine if self.kind == "fake" else native.CopyEngine), type(eng)
        return eng

    def tolerance(self, ref) -> float:
        """Cached equals recompute: within 1e-4 in fp32; in bf16 within 5% of the logits' spread (the new
        tokens' matmuls have other shapes than recompute's, so bf16 rounds differently)."""
        return 1e-4 if self.exact else 0.05 * ref.float().std().item()

    def assert_close(self, out, ref):
        torch.testing.assert_close(out.float(), ref.float(), atol=self.tolerance(ref), rtol=0)


def _gpu_kinds():
    kinds = ["fake"]
    if os.environ.get(GPU_TESTS_ENV) == "1":
        kinds.append("cuda")
    return kinds


@pytest.fixture(params=_gpu_kinds())
def gpu(request, monkeypatch):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no usable GPU")
    return GpuPath(request.param, monkeypatch)
