"""Batch reprocessing: discovery, calibration matching, settings, journal/resume, executors.

The acceptance tests stack a small simulated archive (4 sessions of 2 cameras,
a shared calibration library, one corrupt light, one unreadable session) on a
real dask LocalCluster with 2 worker processes, then kill a local run with
SIGKILL mid-way, rerun it and compare every output byte for byte.
"""

from __future__ import annotations

import csv
import dataclasses
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

from skystack.engine import batch
from skystack.engine.batch import executors, journal, records
from skystack.engine.batch import (
    CalibrationGroup,
    CalibrationMatchConfig,
    LightSummary,
    batch_command,
    discover_sessions,
    match_calibration,
    plan_batch,
    read_journal,
    run_batch,
    scan_calibration,
    session_settings,
)
from skystack.engine.errors import OutputError, SkystackError
from skystack.engine.stack import StackConfig

# ----------------------------------------------------------------------------- helpers


def _fits(path: Path, imagetyp: str | None, *, camera="Cam A", shape=(16, 16), pattern="RGGB", exp=20.0,
          iso=1600, temp=15.0, date="2025-03-01T21:00:00", filt=None, obj=None) -> Path:
    """A tiny FITS frame with the headers the matcher reads."""
    from astropy.io import fits

    h = fits.Header()
    for key, value in (("IMAGETYP", imagetyp), ("INSTRUME", camera), ("BAYERPAT", pattern), ("EXPTIME", exp),
                       ("ISOSPEED", iso), ("CCD-TEMP", temp), ("DATE-OBS", date), ("FILTER", filt), ("OBJECT", obj)):
        if value is not None and value != "":  # a header left out (numbers may be 0)
            h[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.PrimaryHDU(np.zeros(shape, dtype=np.uint16), header=h).writeto(path)
    return path


def _group(kind, folder, *, source="library", camera="Cam A", shape=(16, 16), pattern="RGGB", iso=1600.0,
           exp=20.0, temp=15.0, date="2025-03-01T21:00:00", n=3, filt=None, master=False):
    return CalibrationGroup(kind=kind, files=tuple(Path(f"/lib/{folder}/{i}.fits") for i in range(n)),
                            source=source, folder=folder, camera=camera, shape=shape, pattern=pattern, iso=iso,
                            gain=None, exposure_s=exp, temperature_c=temp, master=master,
                            time=records._parse_time(date), filter=filt)


LIGHT = LightSummary(count=10, readable=10, camera="Cam A", shape=(16, 16), pattern="RGGB", iso=1600.0,
                     exposure_s=20.0, temperature_c=15.0, time=records._parse_time("2025-03-25T22:00:00"))


def _synth(root: Path, *, seed, model, start, n_lights=5, n_cal=0, temp=15.0, pattern="RGGB",
           drift=(0.04, -0.03)) -> None:
    from skystack.tools.synth import SynthConfig, simulate

    cfg = SynthConfig(seed=seed, width=256, height=192, n_lights=n_lights, n_bias=n_cal, n_darks=n_cal,
                      n_flats=n_cal, n_dark_flats=0, file_format="fits", model=model, start_time=start,
                      temperature_c=temp, pattern=pattern, star_density=20000.0, sky_adu_s=(13.0, 15.0, 11.0),
                      drift_px_per_frame=drift, trail_frames=None, cloudy_frame=None, shake_frame=None)
    simulate(cfg, root)
    for p in (root / "truth.json", root / "truth.npz"):
        p.unlink()
    for d in list(root.iterdir()):
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()


def _build_archive(base: Path) -> tuple[Path, Path]:
    """4 sessions (2 cameras), a shared library, a corrupt light, an unreadable session."""
    from astropy.io import fits

    lib, arch = base / "library", base / "archive"
    # camera A: the sensor (bias pattern, dark current, flat) follows the seed, so library = seed 1
    _synth(lib / "camA-2025-03", seed=1, model="Cam A", start="2025-03-01T21:00:00", n_lights=0, n_cal=3)
    _synth(lib / "camA-2025-06", seed=1, model="Cam A", start="2025-06-01T21:00:00", n_lights=0, n_cal=3,
           temp=25.0)  # decoy: later and 10 C warmer
    _synth(lib / "camB-2025-04", seed=2, model="Cam B", start="2025-04-01T21:00:00", n_lights=0, n_cal=3,
           pattern="GRBG")
    _synth(arch / "camA" / "M42_n1", seed=1, model="Cam A", start="2025-03-02T21:00:00")
    _synth(arch / "camA" / "M42_n2", seed=1, model="Cam A", start="2025-03-09T21:00:00")
    ngc = arch / "camB" / "NGC7000"  # a folder of FITS lights typed by IMAGETYP (no lights/ folder)
    _synth(ngc, seed=2, model="Cam B", start="2025-04-02T21:00:00", pattern="GRBG", drift=(0.2, 0.1))
    for f in sorted((ngc / "lights").iterdir()):
        fits.setval(f, "OBJECT", value="NGC 7000")
        f.rename(ngc / f.name)
    (ngc / "lights").rmdir()
    _synth(arch / "camB" / "M31", seed=2, model="Cam B", start="2025-04-05T21:00:00", pattern="GRBG", n_cal=3,
           drift=(-0.1, 0.2))  # its own bias/darks/flats
    corrupt = sorted((arch / "camA" / "M42_n2" / "lights").iterdir())[2]
    corrupt.write_bytes(np.random.default_rng(3).integers(0, 256, 6000, dtype=np.uint8).tobytes())
    (arch / "broken" / "lights").mkdir(parents=True)
    for i in range(2):
        (arch / "broken" / "lights" / f"l{i}.fits").write_bytes(b"garbage" * 300)
    return arch, lib


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return _build_archive(tmp_path_factory.mktemp("batch"))


@pytest.fixture(scope="module")
def cluster_run(archive, tmp_path_factory):
    """The archive processed on a dask LocalCluster with 2 worker processes."""
    distributed = pytest.importorskip("distributed")
    arch, lib = archive
    out = tmp_path_factory.mktemp("cluster") / "out"
    plan = plan_batch(arch, out, calibration_library=lib)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        res = run_batch(plan, scheduler=cluster.scheduler_address, quiet=True)
    return plan, res, out


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / batch.SUMMARY_NAME, newline="") as fh:
        return {r["session"]: r for r in csv.DictReader(fh)}


def _final_files(out: Path) -> dict[str, bytes]:
    """Every file under OUT except the run log (journal), the lock, the master cache and the summary."""
    skip = {batch.JOURNAL_NAME, ".skystack-batch.lock", batch.SUMMARY_NAME}
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in skip and p.relative_to(out).parts[0] != "masters"}


# ----------------------------------------------------------------------------- discovery and library


def test_discover_sessions_layouts(tmp_path):
    arch = tmp_path / "arch"
    _fits(arch / "2025" / "m42" / "LIGHTS" / "l0.fits", "LIGHT")
    _fits(arch / "2025" / "m42" / "Darks" / "d0.fits", "DARK")
    _fits(arch / "2025" / "m42" / "LIGHTS" / "sub" / "lights" / "x.fits", "LIGHT")  # inside a session
    seestar = arch / "seestar_m94"
    for i in range(3):
        _fits(seestar / f"Light_{i}.fit", "Light")
    _fits(seestar / "dark_0.fit", "Dark")
    (seestar / "bad.fit").write_bytes(b"not a fits file" * 10)
    _fits(arch / "darks" / "d.fits", "LIGHT")  # a folder named like a calibration kind is never a session
    _fits(arch / "notes" / "flat.fits", "FLAT")  # no light: not a session
    _fits(arch / "calib" / "lights" / "l.fits", "LIGHT")  # excluded (the library)
    (arch / "empty" / "lights").mkdir(parents=True)
    found = discover_sessions(arch, exclude=[arch / "calib"])
    names = [s.root.relative_to(arch.resolve()).as_posix() for s in found]
    assert names == ["2025/m42", "empty", "seestar_m94"]
    m42, empty, see = found
    assert [p.name for p in m42.lights] == ["l0.fits"] and [p.name for p in m42.darks] == ["d0.fits"]
    assert empty.lights == ()
    assert [p.name for p in see.lights] == ["Light_0.fit", "Light_1.fit", "Light_2.fit", "bad.fit"]
    assert [p.name for p in see.darks] == ["dark_0.fit"]
    with pytest.raises(SkystackError, match="no such archive folder"):
        discover_sessions(tmp_path / "nope")


def test_scan_calibration_groups(tmp_path):
    lib = tmp_path / "lib"
    for i, t in enumerate((14.0, 15.0, 16.5, 24.0, 25.0)):  # one folder, two temperature clusters
        _fits(lib / "night1" / f"dark_{i}.fits", "DARK", temp=t)
    for i in range(2):  # same settings, two nights in one folder
        _fits(lib / "bias" / f"b{i}.fits", None, date="2025-03-01T20:00:00", exp=0.001)
        _fits(lib / "bias" / f"c{i}.fits", None, date="2025-03-09T20:00:00", exp=0.001)
    _fits(lib / "night1" / "dark_iso800.fits", "DARK", iso=800)
    _fits(lib / "night1" / "flats" / "f0.fits", None, exp=0.5)  # kind from the folder name
    _fits(lib / "odd" / "x.fits", None)  # unknown kind
    _fits(lib / "odd" / "l.fits", "LIGHT")
    (lib / "odd" / "broken.fits").write_bytes(b"\0" * 100)
    groups, problems = scan_calibration(lib)
    by = [(g.kind, g.folder, len(g.files), g.temperature_c, g.iso) for g in groups]
    assert ("darks", "night1", 3, 15.0, 1600.0) in by
    assert ("darks", "night1", 2, 24.5, 1600.0) in by
    assert ("darks", "night1", 1, 15.0, 800.0) in by
    bias = [g for g in groups if g.kind == "bias"]
    assert [(len(g.files), g.time.date().isoformat()) for g in bias] == [(2, "2025-03-01"), (2, "2025-03-09")]
    assert [(g.kind, g.folder) for g in groups if g.kind == "flats"] == [("flats", "night1/flats")]
    assert len(groups) == 6
    assert sorted(p.split(":")[0] for p in problems) == ["odd/broken.fits", "odd/l.fits", "odd/x.fits"]
    assert any("says it is a light" in p for p in problems)
    assert any("kind unknown" in p for p in problems)


def test_scan_calibration_reads_master_headers(tmp_path):
    from skystack.engine.masterfile import write_master
    from skystack.engine.masters import build_master

    frames = [_fits(tmp_path / "raw" / f"d{i}.fits", "DARK", temp=-10.0, exp=120.0) for i in range(3)]
    m = build_master("dark", frames, use_cache=False)
    write_master(m, tmp_path / "lib" / "master_dark_120s.fits")
    groups, problems = scan_calibration(tmp_path / "lib")
    assert problems == []
    (g,) = groups
    assert (g.kind, g.master, g.exposure_s, g.temperature_c, g.shape, g.pattern, g.camera) == (
        "darks", True, 120.0, -10.0, (16, 16), "RGGB", "Cam A")


# ----------------------------------------------------------------------------- matching rules


def test_match_dark_temperature_tolerance_and_nearest():
    far = _group("darks", "cold", temp=5.0)
    near = _group("darks", "warmish", temp=14.0)
    chosen, _ = match_calibration(LIGHT, [far, near])
    assert chosen["darks"] is near
    chosen, notes = match_calibration(LIGHT, [far])
    assert chosen["darks"] is None
    assert any("5.0 C, lights 15.0 C (tolerance 3 C)" in n for n in notes)
    chosen, _ = match_calibration(LIGHT, [far], config=CalibrationMatchConfig(temperature_tolerance_c=12.0))
    assert chosen["darks"] is far


def test_match_dark_exposure_scaling_needs_bias():
    d60 = _group("darks", "d60", exp=60.0)
    d20 = _group("darks", "d20", exp=20.5, date="2024-01-01T00:00:00")  # within 5 %, though a year older
    bias = _group("bias", "bias", exp=0.001)
    chosen, _ = match_calibration(LIGHT, [d60, d20, bias])
    assert chosen["darks"] is d20  # the light's exposure wins over the nearer date
    chosen, notes = match_calibration(LIGHT, [d60, bias])
    assert chosen["darks"] is d60 and any("scaled" in n for n in notes)
    chosen, notes = match_calibration(LIGHT, [d60])
    assert chosen["darks"] is None and any("a bias is needed to scale it" in n for n in notes)
    chosen, _ = match_calibration(LIGHT, [d60, bias], config=CalibrationMatchConfig(scale_darks=False))
    assert chosen["darks"] is None


@pytest.mark.parametrize("bad", [dict(iso=800.0), dict(camera="Cam B"), dict(shape=(16, 18)),
                                 dict(pattern="GRBG")])
def test_match_iso_camera_shape_pattern_exact(bad):
    good = _group("bias", "good", date="2020-01-01T00:00:00")
    odd = _group("bias", "odd", **bad)  # nearer in date but incompatible
    chosen, _ = match_calibration(LIGHT, [odd, good])
    assert chosen["bias"] is good
    chosen, notes = match_calibration(LIGHT, [odd])
    assert chosen["bias"] is None and notes and notes[0].startswith("no bias match: library odd:")


def test_match_nearest_date_flats_and_their_dark_flats():
    march = _group("flats", "march", exp=0.5, date="2025-03-01T20:00:00")
    april = _group("flats", "april", exp=2.0, date="2025-04-01T20:00:00")  # light: 2025-03-25
    other_filter = _group("flats", "ha", exp=2.0, date="2025-03-25T20:00:00", filt="Ha")
    df_short = _group("dark_flats", "df05", exp=0.5, date="2025-04-01T20:00:00")
    df_long = _group("dark_flats", "df2", exp=2.0, date="2025-02-01T20:00:00")
    light = dataclasses.replace(LIGHT, filter="L")
    chosen, _ = match_calibration(light, [march, april, other_filter, df_short, df_long])
    assert chosen["flats"] is april
    assert chosen["dark_flats"] is df_long  # the flats' exposure, not the nearest date
    chosen, _ = match_calibration(dataclasses.replace(light, time=records._parse_time("2025-03-05T00:00:00")),
                                  [march, april, df_short, df_long])
    assert chosen["flats"] is march and chosen["dark_flats"] is df_short


def test_match_prefers_session_frames_when_compatible():
    own = _group("darks", ".", source="session", temp=30.0, exp=60.0)  # the user's choice: soft checks off
    lib = _group("darks", "lib")
    chosen, _ = match_calibration(LIGHT, [lib, own])
    assert chosen["darks"] is own
    own_other_cam = _group("darks", ".", source="session", camera="Cam Z")
    chosen, notes = match_calibration(LIGHT, [lib, own_other_cam])
    assert chosen["darks"] is lib and any(n.startswith("own darks not used") for n in notes)


# ----------------------------------------------------------------------------- settings files


def test_settings_toml_chain_and_errors(tmp_path):
    arch = tmp_path / "arch"
    sess = arch / "cam" / "m42"
    sess.mkdir(parents=True)
    (arch / "skystack.toml").write_text('[stack]\nrejection = "winsorized"\nkappa = [2.0, 2.5]\nmin-stars = 9\n')
    (sess / "skystack.toml").write_text('rejection = "median"\nno-wb = true\nreference = "lights/l3.fits"\n')
    cfg, used = session_settings(arch, sess, StackConfig(max_fwhm=5.0))
    assert (cfg.rejection, cfg.kappa_low, cfg.kappa_high, cfg.min_stars, cfg.apply_wb, cfg.max_fwhm) == (
        "median", 2.0, 2.5, 9, False, 5.0)
    assert cfg.reference == str((sess / "lights" / "l3.fits").resolve())
    assert used == (arch / "skystack.toml", sess / "skystack.toml")
    for text, msg in (('rejection = "best"', "choose one of"), ("min_stars = 2.5", "wrong type"),
                      ("cache_dir = '/x'", "batch-owned"), ("colour = 1", "unknown"),
                      ("rejection = ", "cannot read settings"), ("[stack]\nx=1\n[other]\ny=2", "[stack] table")):
        (sess / "skystack.toml").write_text(text)
        with pytest.raises(SkystackError, match="skystack.toml") as exc:
            session_settings(arch, sess)
        assert msg in str(exc.value)


def test_plan_fingerprint_tracks_inputs_and_settings(tmp_path):
    arch = tmp_path / "arch"
    light = _fits(arch / "s1" / "lights" / "l0.fits", "LIGHT")
    _fits(arch / "s2" / "lights" / "l0.fits", "LIGHT")
    (arch / "s2" / "skystack.toml").write_text("rejection = 7\n")
    lib = tmp_path / "lib"
    dark = _fits(lib / "d0.fits", "DARK")
    out = tmp_path / "out"
    p0 = plan_batch(arch, out, calibration_library=lib)
    s1, s2 = p0.sessions
    assert s1.files.darks == (dark.resolve(),) and s1.error is None
    assert s2.error is not None and "skystack.toml" in s2.error  # only that session is affected
    same = plan_batch(arch, out, calibration_library=lib, stack_config=StackConfig(quiet=True, workers=3))
    assert same.sessions[0].fingerprint == s1.fingerprint  # quiet/decoder threads do not change results
    other = plan_batch(arch, out, calibration_library=lib, stack_config=StackConfig(rejection="median"))
    assert other.sessions[0].fingerprint != s1.fingerprint
    os.utime(dark, ns=(time.time_ns(), time.time_ns() + 10**9))  # a touched calibration frame
    assert plan_batch(arch, out, calibration_library=lib).sessions[0].fingerprint != s1.fingerprint
    os.utime(light, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert plan_batch(arch, out, calibration_library=lib).sessions[0].fingerprint != s1.fingerprint
    with pytest.raises(OutputError, match="must not be the archive"):
        plan_batch(arch, arch)


def test_dry_run_prints_plan_and_writes_nothing(archive, tmp_path, capsys):
    arch, lib = archive
    out = tmp_path / "out"
    assert batch_command(arch, out, calibration_library=lib, dry_run=True) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    for s in ("camA/M42_n1: darks <- library camA-2025-03/darks (3 frames, 20 s, ISO 1600, 15.0 C, 2025-03-01)",
              "camB/NGC7000: flats <- library camB-2025-04/flats (3 frames",
              "camB/M31: bias <- session bias (3 frames", "broken: no readable light header"):
        assert s in text
    assert text.count("to run") == 5
    assert "camA-2025-06" not in text  # the decoy library group is matched by nobody


# ----------------------------------------------------------------------------- acceptance


def test_archive_on_localcluster(archive, cluster_run):
    """4 sessions of 2 cameras + shared library on a 2-process LocalCluster; corrupt frame isolated."""
    from skystack.engine.masterfile import read_master
    from skystack.engine.session import SessionFiles
    from skystack.engine.stack import stack_session

    arch, lib = archive
    plan, res, out = cluster_run
    assert res.executor.startswith("dask:tcp://")
    assert res.failed == ["broken"] and sorted(res.ran) == ["camA/M42_n1", "camA/M42_n2", "camB/M31",
                                                           "camB/NGC7000"]
    by = {s.name: s for s in plan.sessions}
    # matching: camera A's sessions share the March library group (not the warmer June decoy),
    # camera B's typed-FITS session uses the library, M31 its own frames
    for name, where in (("camA/M42_n1", "camA-2025-03"), ("camA/M42_n2", "camA-2025-03"),
                        ("camB/NGC7000", "camB-2025-04")):
        for kind in ("bias", "darks", "flats"):
            g = by[name].calibration[kind]
            assert g.source == "library" and g.folder.split("/")[0] == where and len(g.files) == 3
    assert all(by["camB/M31"].calibration[k].source == "session" for k in ("bias", "darks", "flats"))
    # masters: one per distinct (kind, frames) group, built once for all sessions and processes
    groups = {(k, g.files) for s in plan.sessions for k, g in s.calibration.items() if g is not None}
    assert len(groups) == 9
    assert res.masters_combined == 9
    assert len(list((out / "masters").glob("master-*.fits"))) == 9
    entries = read_journal(out)
    assert sum(e.get("masters_combined", 0) for e in entries) == 0  # sessions only read the cache
    # summary
    rows = _rows(out)
    assert list(rows) == ["broken", "camA/M42_n1", "camA/M42_n2", "camB/M31", "camB/NGC7000"]
    assert rows["broken"]["status"] == "failed" and "no readable light frames" in rows["broken"]["note"]
    for name, used in (("camA/M42_n1", 5), ("camA/M42_n2", 4), ("camB/M31", 5), ("camB/NGC7000", 5)):
        r = rows[name]
        assert (r["status"], int(r["frames_used"]), int(r["frames_in"])) == ("done", used, 5)
        assert float(r["total_exposure_s"]) == 20.0 * used  # synthetic lights are 20 s each
        assert 2.5 <= float(r["fwhm_px"]) <= 4.6  # simulator FWHM 2.5..4.0 px, plus interpolation
        assert float(r["time_s"]) > 0
    assert rows["camB/NGC7000"]["object"] == "NGC 7000" and rows["camA/M42_n1"]["object"] == "synthetic"
    assert rows["camA/M42_n1"]["camera"] == "Skystack Cam A" and rows["camA/M42_n1"]["date"] == "2025-03-02"
    # M42_n2 holds the same 5 simulated frames as M42_n1 minus the corrupt one: fewer frames, more noise
    assert float(rows["camA/M42_n2"]["noise"]) > float(rows["camA/M42_n1"]["noise"])
    # the corrupt light is reported with its reason and the session still stacked
    rep = json.loads((out / "camA/M42_n2/report.json").read_text())
    skipped = [f for f in rep["frames"] if not f["used"]]
    assert [Path(f["path"]).name for f in skipped] == ["light_0002.fits"]
    assert "not a readable FITS file" in skipped[0]["reason"]
    assert rows["camA/M42_n2"]["note"] == "1 frame(s) skipped"
    assert rep["batch"]["calibration"]["darks"]["folder"] == "camA-2025-03/darks"
    assert rep["masters"]["dark"]["path"].startswith("masters/master-dark-")
    assert not set(rep) & {"created", "timings_s", "memory", "machine", "throughput"}
    # the batch's image is exactly what stacking the session with the matched frames gives
    s = by["camA/M42_n1"]
    import tifffile

    direct = stack_session(SessionFiles(**{k: getattr(s.files, k) for k in
                                           ("lights", "darks", "flats", "bias", "dark_flats")}),
                           StackConfig(cache_dir=str(out / "masters"), quiet=True))
    tif = tifffile.imread(out / "camA/M42_n1/M42_n1.tif")
    np.testing.assert_array_equal(tif, np.moveaxis(direct.image, 0, -1))
    # the summary noise is the stack's background noise: the documented estimator on the TIFF read back,
    # and within 40 % of a plain MAD around a median-filtered background (stars widen the plain one)
    from scipy.ndimage import median_filter

    from skystack.engine.normalize import robust_stats

    noise = float(rows["camA/M42_n1"]["noise"])
    assert noise == pytest.approx(float(np.median(robust_stats(np.moveaxis(tif, -1, 0)).scale)), rel=1e-5)
    sig = []
    for c in range(3):
        ch = tif[16:-16, 16:-16, c].astype(np.float64)
        resid = ch - median_filter(ch, size=31)
        sig.append(1.4826 * np.median(np.abs(resid - np.median(resid))))
    assert 0.6 < noise / float(np.median(sig)) < 1.4
    assert read_master(next((out / "masters").glob("master-dark-*.fits"))).meta.count == 3


def test_sigkill_then_rerun_is_byte_identical_and_resumes(archive, cluster_run, tmp_path):
    psutil = pytest.importorskip("psutil")
    arch, lib = archive
    _plan, _res, ref_out = cluster_run
    out = tmp_path / "out"
    code = ("import sys; from skystack.engine.batch import batch_command; "
            "sys.exit(batch_command(sys.argv[1], sys.argv[2], calibration_library=sys.argv[3], workers=1, "
            "quiet=True))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(arch), str(out), str(lib)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    children: list = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done = [e for e in read_journal(out) if e.get("status") == "done"]
            if done or proc.poll() is not None:
                break
            try:
                children = psutil.Process(proc.pid).children(recursive=True) or children
            except psutil.NoSuchProcess:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the batch ended before it could be killed: {proc.stderr.read()!r}"
        time.sleep(0.3)  # well inside the next session
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    finished = {e["session"] for e in read_journal(out) if e.get("status") == "done"}
    assert 1 <= len(finished) < 4
    # the pool's worker dies with the batch (PR_SET_PDEATHSIG): nothing keeps writing into OUT
    gone, alive = psutil.wait_procs(children, timeout=15)
    assert not alive
    before = {name: {p.name: p.stat().st_mtime_ns for p in (out / name).iterdir()} for name in finished}
    res = run_batch(plan_batch(arch, out, calibration_library=lib), workers=1, quiet=True)
    assert set(res.skipped) == finished  # sessions done before the kill were not redone
    assert set(res.ran) == {"camA/M42_n1", "camA/M42_n2", "camB/M31", "camB/NGC7000"} - finished
    assert res.failed == ["broken"]  # failures are retried, and fail again
    for name in finished:
        assert {p.name: p.stat().st_mtime_ns for p in (out / name).iterdir()} == before[name]
    done = [e["session"] for e in read_journal(out) if e.get("status") == "done"]
    assert sorted(done) == sorted(set(done)) and len(done) == 4  # each session stacked exactly once
    assert not [p for p in out.rglob(".*") if p.name != ".skystack-batch.lock"]  # no temp file left
    # byte-identical to the uninterrupted LocalCluster run (another folder, executor and process layout)
    ours, ref = _final_files(out), _final_files(ref_out)
    assert sorted(ours) == sorted(ref) and len(ours) == 21  # 4 sessions x (TIFF, FITS, PNG, JSON, HTML) + index.html
    for name in ref:
        assert ours[name] == ref[name], name
    # summary.csv: identical except the processing time column
    a, b = _rows(out), _rows(ref_out)
    for r in (*a.values(), *b.values()):
        r.pop("time_s")
    assert a == b
    # the master cache holds the same data (its FITS DATE card is the build time, a cache detail)
    from skystack.engine.masterfile import read_master

    for p in sorted((ref_out / "masters").glob("*.fits")):
        np.testing.assert_array_equal(read_master(p).data, read_master(out / "masters" / p.name).data)


def test_rerun_only_changed_sessions(tmp_path, archive):
    """Untouched sessions are skipped; a touched light, a new skystack.toml or a lost output re-runs one."""
    src, lib = archive
    arch = tmp_path / "arch"
    for name in ("camA/M42_n1", "camA/M42_n2"):
        shutil.copytree(src / name, arch / name)
    out = tmp_path / "out"

    def run():
        return run_batch(plan_batch(arch, out, calibration_library=lib), workers=0, quiet=True)

    first = run()
    assert sorted(first.ran) == ["camA/M42_n1", "camA/M42_n2"] and first.ok
    assert run().ran == []  # nothing changed
    # temp files a killed writer leaves are removed; anything else is left alone
    stale = [out / "camA/M42_n1/.M42_n1.tif.k3j_9x2a.part", out / "masters/.master-dark-0a.fits.abcdefgh.tmp"]
    keep = [out / "camA/M42_n1/.notes.txt", out / "camA/M42_n1/.x.tif.toolong99.part"]
    for p in stale + keep:
        p.write_bytes(b"x")
    assert run().ran == []
    assert [p.exists() for p in stale + keep] == [False, False, True, True]
    with open(out / batch.JOURNAL_NAME, "a") as fh:  # a torn line, as a SIGKILL mid-write leaves
        fh.write('{"session": "camA/M42_n1", "status": "do')
    light = sorted((arch / "camA/M42_n1/lights").iterdir())[0]
    os.utime(light, ns=(time.time_ns(), light.stat().st_mtime_ns + 10**9))
    r = run()
    assert r.ran == ["camA/M42_n1"] and r.skipped == ["camA/M42_n2"]
    (arch / "camA/M42_n2/skystack.toml").write_text('[stack]\nrejection = "winsorized"\n')
    r = run()
    assert r.ran == ["camA/M42_n2"]
    rep = json.loads((out / "camA/M42_n2/report.json").read_text())
    assert rep["settings"]["rejection"] == "winsorized"
    assert rep["batch"]["settings_files"] == ["camA/M42_n2/skystack.toml"]
    (out / "camA/M42_n1/M42_n1.png").unlink()
    assert run().ran == ["camA/M42_n1"]
    done = [e["session"] for e in read_journal(out) if e.get("status") == "done"]
    assert done.count("camA/M42_n1") == 3 and done.count("camA/M42_n2") == 2
    # one batch at a time per output folder
    with journal._locked(out):
        with pytest.raises(OutputError, match="another 'skystack batch'"):
            run()


def _crash_on(x):
    if x == "crash":
        os._exit(3)
    return {"status": "done", "value": x, "pid": os.getpid()}


def test_pool_worker_death_fails_only_its_task():
    seen: dict[str, dict] = {}
    pool = executors._Pool(2)
    try:
        pool.map(_crash_on, [("a", 1), ("b", "crash"), ("c", 3), ("d", 4)], lambda k, r: seen.setdefault(k, r))
    finally:
        pool.close()
    assert sorted(seen) == ["a", "b", "c", "d"]
    assert seen["b"]["status"] == "failed" and "worker process died" in seen["b"]["error"]
    assert [seen[k]["value"] for k in ("a", "c", "d")] == [1, 3, 4]
    assert os.getpid() not in {seen[k]["pid"] for k in ("a", "c", "d")}


@pytest.mark.gpu
def test_batch_on_gpu(archive, tmp_path):
    arch, lib = archive
    res = run_batch(plan_batch(arch, tmp_path / "out", calibration_library=lib,
                               stack_config=StackConfig(backend="gpu")), workers=1, quiet=True)
    assert res.executor == "local:1" and res.failed == ["broken"] and len(res.ran) == 4


def test_unicode_session_name_and_html_index(tmp_path):
    """A session folder named "Night Ω été 1" stacks (its name goes into ASCII FITS cards) and the
    index page links its HTML report."""
    from astropy.io import fits

    arch, out = tmp_path / "arch", tmp_path / "out"
    _synth(arch / "Night Ω été 1", seed=1, model="Cam A", start="2025-03-02T21:00:00", n_lights=4, n_cal=2)
    for f in (arch / "Night Ω été 1" / "lights").iterdir():
        fits.delval(f, "OBJECT")  # the target is then named after the folder
    res = run_batch(plan_batch(arch, out), workers=0, quiet=True)
    assert res.ok and res.ran == ["Night Ω été 1"]
    folder = out / "Night Ω été 1"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["Night Ω été 1.fits", "Night Ω été 1.png", "Night Ω été 1.tif", "report.html", "report.json"]
    h = fits.getheader(folder / "Night Ω été 1.fits")
    assert h["OBJECT"].isascii() and "ete" in h["OBJECT"] and h["NCOMBINE"] == 4
    index = (out / batch.INDEX_NAME).read_text()
    assert 'href="Night Ω été 1/report.html"' in index
    page = (folder / "report.html").read_text()
    assert page.count('<tr class="used">') == 4 and 'id="time-plots"' in page


@pytest.mark.gpu
def test_batch_puts_one_worker_process_on_each_gpu(archive, tmp_path, monkeypatch, sim):
    """On a machine of two GPUs (the simulated device's ``SKYSTACK_SIM_DEVICES=2``) a batch runs one
    worker process per GPU by default, each seeing only its own device (``CUDA_VISIBLE_DEVICES``), so
    the sessions spread over both and each keeps its device's whole memory budget; four workers on
    two GPUs share each device by two."""
    import json

    monkeypatch.setenv("SKYSTACK_SIM_DEVICES", "2")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    arch, lib = archive
    plan = plan_batch(arch, tmp_path / "out", calibration_library=lib, stack_config=StackConfig(backend="gpu"))
    res = run_batch(plan, quiet=True)
    assert res.executor == "local:2 on GPUs 0,1" and res.failed == ["broken"] and len(res.ran) == 4
    reports = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("report.json")]
    assert len(reports) == 4
    devices = sorted(r["device"] for r in reports)
    assert set(devices) == {"Simulated CUDA device 0 (g++ emulator)", "Simulated CUDA device 1 (g++ emulator)"}
    assert all(r["settings"].get("memory_limit") is None for r in reports)

    shared = run_batch(plan_batch(arch, tmp_path / "out4", calibration_library=lib,
                                  stack_config=StackConfig(backend="gpu")), workers=4, quiet=True)
    assert shared.executor == "local:4 on GPUs 0,1" and len(shared.ran) == 4
    limits = {r["settings"].get("memory_limit")
              for r in (json.loads(p.read_text()) for p in (tmp_path / "out4").rglob("report.json"))}
    from skystack.engine.backend import get_backend

    assert limits == {get_backend("gpu").memory_budget(None) // 2}
