"""Shared fixtures: backends, seeded RNG, real-data folder, synthetic sessions."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from skystack.tools.pytest_gpu import backend, pytest_collection_modifyitems

#: Shared with the other conftest (pytest finds a hook or fixture a conftest imports).
__all__ = ["backend", "pytest_collection_modifyitems"]

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SKYSTACK_SHARED", REPO.parent / "shared"))
REALDATA = SHARED / "realdata"
#: The simulated CuPy device (``--sim-device`` or ``SKYSTACK_SIM_DEVICE=1``).
FAKECUPY = Path(__file__).resolve().parent / "fakecupy"


def pytest_addoption(parser):
    parser.addoption("--sim-device", action="store_true", default=False,
                     help="run the GPU path on the simulated CuPy device (tests/fakecupy): kernels in the "
                          "g++ emulator, CuPy's transfer rules enforced, bytes and syncs counted")


def sim_device_requested(config=None) -> bool:
    """True when the tests run on the simulated device."""
    opt = bool(config and config.getoption("--sim-device", default=False))
    return opt or os.environ.get("SKYSTACK_SIM_DEVICE", "") not in ("", "0")


def use_sim_device() -> None:
    """Make ``import cupy`` give the simulated device, here and in child processes."""
    import sys

    if "cupy" in sys.modules and not sys.modules["cupy"].__file__.startswith(str(FAKECUPY)):
        raise RuntimeError("the real CuPy is imported already; the simulated device needs a fresh process")
    if str(FAKECUPY) not in sys.path:
        sys.path.insert(0, str(FAKECUPY))
    os.environ["SKYSTACK_SIM_DEVICE"] = "1"
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if str(FAKECUPY) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(FAKECUPY)] + [p for p in paths if p])


def pytest_configure(config):
    if sim_device_requested(config):
        use_sim_device()


@pytest.fixture
def sim():
    """The simulated device's counters (reset), or a skip when the tests run without it."""
    import sys

    mod = sys.modules.get("cupy")
    if mod is None or not hasattr(mod, "sim"):
        import importlib

        try:
            mod = importlib.import_module("cupy")
        except ImportError:
            mod = None
    if mod is None or not hasattr(mod, "sim"):
        pytest.skip("needs the simulated device (--sim-device or SKYSTACK_SIM_DEVICE=1)")
    mod.sim.reset()
    return mod.sim


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(scope="session")
def realdata() -> Path:
    """``../shared/realdata``; tests using it skip when it is absent."""
    if not REALDATA.is_dir():
        pytest.skip("../shared/realdata is absent")
    return REALDATA
