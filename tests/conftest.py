import numpy as np
import pytest

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
