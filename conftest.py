"""Shared by tests/ and bench/: `cuda`-marked items skip, saying why, where no GPU is usable."""

import pytest

from cachedattn import native


def pytest_collection_modifyitems(config, items):
    if native.cuda_available():
        return
    skip = pytest.mark.skip(reason=f"no usable GPU: {native.cuda_unavailable_reason()}")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
