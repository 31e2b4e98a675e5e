"""Backend selection (auto/cpu/gpu, SKYSTACK_BACKEND), its CLI errors, and the launch helpers."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from skystack import cli
from skystack.engine import backend as be
from skystack.engine.errors import BackendUnavailable

HAS_GPU = be._gpu_cached()[0] is not None
no_gpu_only = pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU fallback; this machine has a GPU")
FALLBACK = re.compile(r"^GPU unavailable \(.+\); using CPU$")


@pytest.fixture
def fresh(monkeypatch):
    """No SKYSTACK_BACKEND, and the once-per-process fallback message not printed yet."""
    monkeypatch.delenv("SKYSTACK_BACKEND", raising=False)
    monkeypatch.setattr(be, "_warned_fallback", False)


def test_cpu_backend(fresh):
    b = be.get_backend("cpu")
    assert b is be.CPU and b.name == "cpu" and b.xp is np and not b.is_gpu
    assert b.device_name
    free = b.free_memory()
    assert free > 0
    assert 0 < b.memory_budget() <= free
    assert b.memory_budget(1000) == 1000
    assert b.memory_budget(10**18) < 10**18


@no_gpu_only
def test_gpu_raises_one_line_reason(fresh):
    with pytest.raises(BackendUnavailable) as err:
        be.get_backend("gpu")
    msg = str(err.value)
    assert "\n" not in msg
    reason = be._gpu_cached()[1]
    assert reason and reason in msg and msg.startswith("GPU unavailable (")


def _fallback_records(caplog) -> list:
    return [r for r in caplog.records if r.name == "skystack" and "GPU unavailable" in r.getMessage()]


@no_gpu_only
def test_auto_falls_back_and_logs_it_once(fresh, caplog, capsys):
    """The library logs (never prints) the fallback, once: a warning when CuPy is installed but finds
    no device, only info when CuPy is not installed (the user did not ask for a GPU)."""
    import importlib.util
    import logging

    caplog.set_level(logging.INFO, logger="skystack")
    assert be.get_backend("auto") is be.CPU
    assert be.get_backend("auto") is be.CPU
    assert be.get_backend(None) is be.CPU
    recs = _fallback_records(caplog)
    assert len(recs) == 1 and FALLBACK.match(recs[0].getMessage()), recs
    want = logging.INFO if importlib.util.find_spec("cupy") is None else logging.WARNING
    assert recs[0].levelno == want
    assert capsys.readouterr().err == ""


@no_gpu_only
def test_auto_quiet_logs_nothing(fresh, caplog, capsys):
    import logging

    caplog.set_level(logging.DEBUG, logger="skystack")
    assert be.get_backend("auto", quiet=True) is be.CPU
    assert capsys.readouterr().err == "" and not _fallback_records(caplog)


@no_gpu_only
@pytest.mark.parametrize("cupy_installed", [False, True])
def test_cli_gpu_line_only_when_cupy_is_installed(fresh, capsys, monkeypatch, tmp_path, cupy_installed):
    """CLI: no GPU line at all without CuPy; with CuPy but no device, one warning line."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if cupy_installed else None) if name == "cupy" else real(name, *a))
    (tmp_path / "empty").mkdir()
    for _ in range(2):
        assert cli.main(["stack", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("GPU unavailable") == (1 if cupy_installed else 0), err
    if cupy_installed:
        assert "warning: GPU unavailable (" in err


def test_environment_variable(fresh, monkeypatch, capsys):
    monkeypatch.setenv("SKYSTACK_BACKEND", "cpu")
    assert be.get_backend() is be.CPU
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("SKYSTACK_BACKEND", "CPU")
    assert be.get_backend() is be.CPU
    monkeypatch.setenv("SKYSTACK_BACKEND", "tpu")
    with pytest.raises(BackendUnavailable, match="unknown backend 'tpu'"):
        be.get_backend()
    monkeypatch.setenv("SKYSTACK_BACKEND", "cpu")
    assert be.get_backend("cpu") is be.CPU  # explicit name wins
    if not HAS_GPU:
        monkeypatch.setenv("SKYSTACK_BACKEND", "gpu")
        with pytest.raises(BackendUnavailable):
            be.get_backend()


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@no_gpu_only
@pytest.mark.parametrize("argv", [
    ["--backend", "gpu", "info", "x.dng"],
    ["info", "x.dng", "--backend", "gpu"],
    ["info", "--backend", "gpu", "x.dng"],
])
def test_cli_gpu_backend_exits_2(fresh, capsys, argv):
    assert cli.main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "GPU unavailable (" in line and be._gpu_cached()[1] in line


@no_gpu_only
def test_real_cli_gpu_backend_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "skystack", "--backend", "gpu", "info", "x.dng"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "COLUMNS": "60", "HOME": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc.stderr)
    assert re.search(r"GPU unavailable \(.+\); use --backend cpu or auto", line), line
    assert proc.stdout == ""


def test_helpers_on_numpy():
    a = np.arange(6, dtype=np.float32)
    assert not be.is_device_array(a) and not be.is_device_array(3.0)
    assert be.array_module(a) is np
    assert be.to_host(a) is a
    np.testing.assert_array_equal(be.to_host([1, 2]), [1, 2])


@pytest.mark.parametrize("n, block, blocks", [
    (0, 256, 1), (1, 256, 1), (256, 256, 1), (257, 256, 2), (1000, 100, 10),
    (10**12, 256, be.MAX_BLOCKS),
])
def test_grid_for(n, block, blocks):
    assert be.grid_for(n, block) == blocks


def test_launch_checks_arguments_before_touching_cupy():
    # NumPy arrays are not device arrays: refused with the parameter named, even without CuPy.
    x = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match=r"argument 0 'raw' .*expected a CuPy array"):
        be.launch("rawconv.cu", "cfa_to_float_f32", 4, (x, x, np.int64(4), np.int32(2), np.int32(2),
                                                         *(np.float32(0),) * 4, *(np.float32(1),) * 4))
    with pytest.raises(ValueError, match="no kernel 'nope'"):
        be.launch("rawconv.cu", "nope", 4, ())


@pytest.mark.gpu
def test_gpu_backend():
    b = be.get_backend("gpu")
    assert b.is_gpu and b.device_name and b.free_memory() > 0
    x = b.asarray(np.arange(5, dtype=np.float32))
    assert be.is_device_array(x) and be.array_module(x) is b.xp
    np.testing.assert_array_equal(be.to_host(x), np.arange(5))


@pytest.mark.gpu
def test_gpu_launch_rejects_wrong_dtype():
    b = be.get_backend("gpu")
    x = b.xp.zeros(4, dtype=b.xp.float64)
    with pytest.raises(TypeError, match="expected a float32 array"):
        be.launch("rawconv.cu", "cfa_to_float_f32", 4, (x, x, np.int64(4), np.int32(2), np.int32(2),
                                                         *(np.float32(0),) * 4, *(np.float32(1),) * 4))
