"""What the test suite and the micro-benchmarks share: the ``backend`` fixture and the GPU skip.

``tests/conftest.py`` and ``bench/conftest.py`` import these two names, so
pytest finds them in both: every test using ``backend`` runs on the CPU, and
on the GPU when CuPy finds a device (or the simulated one of ``tests/fakecupy``);
``gpu``-marked tests are skipped without one.
"""

from __future__ import annotations

import pytest


def _gpu_available() -> bool:
    from skystack.engine.backend import _gpu_cached

    return _gpu_cached()[0] is not None


def pytest_collection_modifyitems(config, items):
    """Skip the ``gpu``-marked items when there is no CUDA device."""
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
