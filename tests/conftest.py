"""Shared fixtures: backends, seeded RNG, real-data folder, synthetic sessions."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SKYSTACK_SHARED", REPO.parent / "shared"))
REALDATA = SHARED / "realdata"


def _gpu_available() -> bool:
    from skystack.engine.backend import _gpu_cached

    return _gpu_cached()[0] is not None


def pytest_collection_modifyitems(config, items):
    if _gpu_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device / CuPy")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def backend(request):
    """Each test using this runs on the CPU always, and on the GPU when one exists."""
    from skystack.engine.backend import get_backend

    return get_backend(request.param, quiet=True)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(scope="session")
def realdata() -> Path:
    """``../shared/realdata``; tests using it skip when it is absent."""
    if not REALDATA.is_dir():
        pytest.skip("../shared/realdata is absent")
    return REALDATA
