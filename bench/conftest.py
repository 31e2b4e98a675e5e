"""Fixtures of the micro-benchmarks (``python -m pytest bench/bench_kernels.py --benchmark-enable``).

``bench/`` is outside ``testpaths``, so the normal test suite never runs
these. The ``backend`` fixture runs each benchmark on the CPU always and on
the GPU when CuPy finds a CUDA device (the GPU cases are skipped otherwise).
Frame size: ``SKYSTACK_BENCH_SIZE=WIDTHxHEIGHT`` (default 1800x1200).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from skystack.tools.pytest_gpu import backend, pytest_collection_modifyitems

#: Shared with the other conftest (pytest finds a hook or fixture a conftest imports).
__all__ = ["backend", "pytest_collection_modifyitems"]


@pytest.fixture(scope="session")
def frame_size() -> tuple[int, int]:
    """``(H, W)`` of the benchmark frames (even)."""
    text = os.environ.get("SKYSTACK_BENCH_SIZE", "1800x1200")
    w, h = (int(v) for v in text.lower().split("x"))
    return h - h % 2, w - w % 2


@pytest.fixture
def sync(backend):
    """``sync(result)``: wait for the device so a benchmark times the work, not the launch."""

    def _sync(result=None):
        if backend.is_gpu:
            backend.xp.cuda.Device().synchronize()
        return result

    return _sync


@pytest.fixture(scope="session")
def bench_rng() -> np.random.Generator:
    return np.random.default_rng(2024)
