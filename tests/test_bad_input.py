"""Every bad input handled: one clear line naming the file and the fix, bad frames skipped and
reported, nothing left behind (issue 16's reliability catalogue, one test per item)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from skystack import cli
from skystack.engine.errors import SkystackError
from skystack.tools.synth import SynthConfig, simulate

from sessions import write_small_session


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """6 FITS lights (uint16, BLKLEVEL in the header) with 3 bias, 3 darks and 3 flats."""
    return write_small_session(tmp_path_factory.mktemp("bad") / "s", bias=3, darks=3, flats=3, file_format="fits")


def _copy(session: Path, tmp_path: Path, *kinds: str) -> Path:
    """The lights plus the calibration folders named (a session with only those)."""
    s = tmp_path / "s"
    for k in ("lights", *kinds):
        shutil.copytree(session / k, s / k)
    return s


def _stack(tmp_path: Path, *args: str) -> tuple[int, dict | None]:
    out = tmp_path / "o" / "m.tif"
    rc = cli.main(["--backend", "cpu", "stack", *args, "-o", str(out), "-q", "--cache-dir", str(tmp_path / "c")])
    rep = out.with_suffix(".json")
    return rc, (json.loads(rep.read_text()) if rep.is_file() else None)


def _err_line(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def _scale_adu(path: Path, add: float = 0.0, mul: float = 1.0) -> None:
    with fits.open(path, mode="update") as h:
        h[0].data = np.clip(h[0].data.astype(np.float64) * mul + add, 0, 65535).astype(np.uint16)


# ----------------------------------------------------------------------------- 1. options validated first


@pytest.mark.parametrize("value", ["0", "150", "-5"])
def test_keep_best_out_of_range_is_one_line_before_any_work(session, tmp_path, capsys, monkeypatch, value):
    from skystack.engine import stack

    monkeypatch.setattr(stack, "register_session", lambda *a, **k: pytest.fail("the pipeline ran"))
    rc, _ = _stack(tmp_path, str(session), "--keep-best", value)
    assert rc == 2
    line = _err_line(capsys)
    assert f"--keep-best {value}" in line and "(0, 100]" in line and "Traceback" not in line


def test_stack_config_validates_at_construction():
    from skystack.engine.stack import StackConfig

    t0 = time.perf_counter()
    for kw, needle in ((dict(rejection="sigmaa"), "--rejection 'sigmaa'"), (dict(keep_best=0.0), "--keep-best"),
                       (dict(normalization="x"), "--normalization"), (dict(max_fwhm=-1.0), "--max-fwhm"),
                       (dict(kappa_low=0.0), "--kappa"), (dict(workers=0), "--workers")):
        with pytest.raises(SkystackError, match=needle.replace("(", r"\(")):
            StackConfig(**kw)
    assert time.perf_counter() - t0 < 1.0
    assert StackConfig().rejection == "auto"


# ----------------------------------------------------------------------------- 2. float FITS with BLKLEVEL


def test_float_fits_light_with_blklevel_is_read_on_its_own_scale(session, tmp_path):
    """A 0..1 float light whose header kept BLKLEVEL (ADU) converts exactly like its uint16 original,
    and stacks with the others instead of aborting the stack."""
    from skystack.engine.io import read_frame
    from skystack.engine.rawconv import cfa_to_float

    s = _copy(session, tmp_path)
    light = sorted((s / "lights").iterdir())[2]
    orig = read_frame(light)
    assert orig.meta.black_level[0] > 1
    with fits.open(light, mode="update") as h:
        h[0].data = (h[0].data.astype(np.float32) / np.float32(65535.0))
        assert h[0].header["BLKLEVEL"] > 1
    flt = read_frame(light)
    assert flt.meta.white_level == 1.0
    a = cfa_to_float(orig.data, pattern=orig.meta.pattern, black_level=orig.meta.black_level,
                     white_level=orig.meta.white_level)
    b = cfa_to_float(flt.data, pattern=flt.meta.pattern, black_level=flt.meta.black_level,
                     white_level=flt.meta.white_level)
    np.testing.assert_allclose(b, a, atol=2e-6)
    rc, rep = _stack(tmp_path, str(s))
    assert rc == 0 and rep["frames_used"] == 6


# ----------------------------------------------------------------------------- 3, 8. masters brighter than lights


def test_bias_brighter_than_the_lights_is_named(session, tmp_path, capsys):
    s = _copy(session, tmp_path, "bias")
    for f in (s / "bias").iterdir():
        _scale_adu(f, add=3000.0)  # far above the lights' sky
    rc, _ = _stack(tmp_path, str(s))
    assert rc == 2
    line = _err_line(capsys)
    assert "below zero" in line and "master bias" in line and "brighter than this light" in line
    assert "light_0000.fits" in line and "stars" not in line


def test_dark_brighter_than_the_lights_is_named_not_too_few_stars(session, tmp_path, capsys):
    s = _copy(session, tmp_path, "darks")
    for f in (s / "darks").iterdir():
        _scale_adu(f, add=3000.0)
    rc, _ = _stack(tmp_path, str(s))
    assert rc == 2
    line = _err_line(capsys)
    assert "master dark" in line and "brighter than this light" in line and "too few stars" not in line


# ----------------------------------------------------------------------------- 6. the odd set is blamed


def test_darks_of_another_camera_are_blamed_not_the_bias(session, tmp_path, capsys):
    s = _copy(session, tmp_path, "bias", "darks")
    for f in (s / "darks").iterdir():
        fits.setval(f, "INSTRUME", value="Other Cam 2")
    rc, _ = _stack(tmp_path, str(s))
    assert rc == 2
    line = _err_line(capsys)
    assert "the dark frames" in line and "Other Cam 2" in line and "but the lights are" in line
    assert "master bias" not in line


def test_one_odd_dark_is_skipped_and_reported(session, tmp_path):
    s = _copy(session, tmp_path, "bias", "darks")
    odd = sorted((s / "darks").iterdir())[1]
    fits.setval(odd, "INSTRUME", value="Other Cam 2")
    rc, rep = _stack(tmp_path, str(s))
    assert rc == 0 and rep["frames_used"] == 6 and rep["masters"]["dark"]["count"] == 2
    assert any(odd.name in n and "Other Cam 2" in n for n in rep["notes"])


# ----------------------------------------------------------------------------- 7. the unscaled dark is explained


def test_unscaled_dark_without_bias_is_explained(session, tmp_path, capsys):
    s = _copy(session, tmp_path, "darks")
    for f in (s / "darks").iterdir():
        fits.setval(f, "EXPTIME", value=40.0)  # the lights are 20 s
        fits.setval(f, "EXPOSURE", value=40.0)
    rc, rep = _stack(tmp_path, str(s))
    assert rc == 0
    note = "the master dark holds the bias (no master bias), so it is not scaled"
    assert any(note in n for n in rep["notes"])
    err = capsys.readouterr().err
    assert err.count(note) == 1 and "warning:" in err
    assert note in (tmp_path / "o" / "m.html").read_text()


# ----------------------------------------------------------------------------- 9. bad calibration frames skipped


def test_bad_calibration_frames_are_skipped_with_a_reason(session, tmp_path, capsys):
    s = _copy(session, tmp_path, "bias", "flats")
    bias = sorted((s / "bias").iterdir())
    data = bias[0].read_bytes()
    bias[0].write_bytes(data[: len(data) // 2])  # truncated
    (s / "bias" / "empty.fits").write_bytes(b"")  # empty file
    flat = sorted((s / "flats").iterdir())[1]
    with fits.open(flat, mode="update") as h:
        h[0].data = np.zeros_like(h[0].data)  # all-zero flat
    rc, rep = _stack(tmp_path, str(s))
    assert rc == 0 and rep["frames_used"] == 6
    assert rep["masters"]["bias"]["count"] == 2 and rep["masters"]["flat"]["count"] == 2
    notes = " ".join(rep["notes"])
    for name in (bias[0].name, "empty.fits", flat.name):
        assert name in notes
    assert "every pixel is 0" in notes


# ----------------------------------------------------------------------------- 4. stale files of killed runs


def test_stale_spill_folders_and_partials_are_removed_never_a_live_runs(tmp_path):
    """A killed run's spill folder and temporaries (nobody holds their lock) go; a live one's stay."""
    from skystack.engine.framestore import FrameStore
    from skystack.engine.output import atomic_path, live_dir, remove_stale_partials

    code = ("import sys, time; from skystack.engine.output import live_dir, _locked_temp; from pathlib import Path; "
            "d, fd = live_dir('skystack-store-', sys.argv[1]); (d / 'frames.bin').write_bytes(b'x' * 1000); "
            "fd2, t = _locked_temp(Path(sys.argv[1]) / 'm.tif'); print(d, t, flush=True); time.sleep(60)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        dead_dir, dead_part = procs[0].stdout.readline().split()
        live_dir_, live_part = procs[1].stdout.readline().split()
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(timeout=30)
        legacy = tmp_path / "skystack-store-legacy1"  # from a version without locks, 2 days old
        legacy.mkdir()
        os.utime(legacy, (time.time() - 2 * 86400,) * 2)
        fresh_legacy = tmp_path / "skystack-store-legacy2"
        fresh_legacy.mkdir()
        old_tmp = tmp_path / ".master-dark-0a.fits.abcdefgh.tmp"
        old_tmp.write_bytes(b"x")
        store = FrameStore(2, (1, 8, 8), ram_budget=1, spill_dir=tmp_path)  # spilling cleans up first
        assert store.on_disk
        assert not Path(dead_dir).exists() and not legacy.exists()
        assert Path(live_dir_).exists() and fresh_legacy.exists()
        assert remove_stale_partials(tmp_path) == 2  # the killed run's .part and the old .tmp
        assert not Path(dead_part).exists() and not old_tmp.exists() and Path(live_part).exists()
        with atomic_path(tmp_path / "x.json") as tmp:  # a write in progress is never taken for stale
            tmp.write_text("{}")
            assert remove_stale_partials(tmp_path) == 0 and tmp.exists()
        store.close()
        d, fd = live_dir("skystack-store-", tmp_path)
        assert d.exists() and Path(live_dir_).exists()
        os.close(fd)
    finally:
        for p in procs:
            p.kill()
            p.wait()


# ----------------------------------------------------------------------------- 5. full disk named with the fix


def test_full_disk_while_spilling_names_the_folder_and_the_fix(tmp_path, monkeypatch):
    import errno

    from skystack.engine.errors import OutputError
    from skystack.engine.framestore import FrameStore

    store = FrameStore(2, (1, 8, 8), ram_budget=1, spill_dir=tmp_path)

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OutputError) as ei:
        store.put(0, np.zeros((8, 8), np.float32))
    msg = str(ei.value)
    assert str(tmp_path) in msg and "disk full" in msg and "--memory-limit" in msg and "Errno" not in msg
    store.close()


def test_os_errors_reaching_the_cli_name_the_path(tmp_path, capsys, monkeypatch):
    from skystack.engine import session as sess

    def boom(*_a, **_k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "lights"))

    monkeypatch.setattr(sess, "split_inputs", boom)
    assert cli.main(["--backend", "cpu", "stack", str(tmp_path)]) == 2
    line = _err_line(capsys)
    assert str(tmp_path / "lights") in line and "permissions" in line and "Errno" not in line


# ----------------------------------------------------------------------------- 10. Ctrl-C on batch


def test_ctrl_c_on_batch_stops_promptly_and_journals_what_completed(tmp_path):
    from skystack.engine import batch

    arch = tmp_path / "arch"
    for i in range(4):
        simulate(SynthConfig(seed=1, width=256, height=192, n_lights=5, n_bias=0, n_darks=0, n_flats=0,
                             n_dark_flats=0, file_format="fits", model="Cam A", star_density=20000.0,
                             start_time=f"2025-03-0{i + 1}T21:00:00", trail_frames=None, cloudy_frame=None,
                             shake_frame=None), arch / f"n{i}")
    out = tmp_path / "out"
    # A terminal's Ctrl-C: SIGINT acts as in an interactive shell even where this test runs in a
    # background job (whose children inherit SIGINT ignored, and Python then never raises KeyboardInterrupt).
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); from skystack import cli; "
            "sys.exit(cli.main(['batch', sys.argv[1], '-o', sys.argv[2], '--workers', '1', '-q']))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(arch), str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if any(e.get("status") == "done" for e in batch.read_journal(out)):
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read()
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole process group
        t0 = time.monotonic()
        proc.wait(timeout=30)
        stopped_in = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130 and stopped_in < 2.0, (proc.returncode, stopped_in)
    done = {e["session"] for e in batch.read_journal(out) if e.get("status") == "done"}
    written = {p.parent.name for p in out.glob("*/*.tif")}
    assert done and written == done  # every session with outputs is journaled, and only those
    assert len(done) < 4
    time.sleep(1.0)  # nothing keeps running after the interrupt
    assert {p.parent.name for p in out.glob("*/*.tif")} == written
    assert (out / batch.SUMMARY_NAME).is_file()
