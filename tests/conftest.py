import numpy as np
import pytest

from cachedattn import native


def pytest_collection_modifyitems(config, items):
    if native.cuda_available():
        return
    skip = pytest.mark.skip(reason=f"no usable GPU: {native.cuda_unavailable_reason()}")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
