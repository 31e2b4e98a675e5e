"""Master frames: agreement with the simulator's noise-free truth, FITS provenance, cache, errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from skystack.engine import masters as ms
from skystack.engine.errors import CalibrationError, FrameMismatchError, InputNotFound, OutputError, SkystackError
from skystack.engine.io import read_meta
from skystack.engine.masterfile import is_master_file, read_master, write_master
from skystack.engine.masters import (
    STATS,
    MasterConfig,
    build_master,
    load_or_build_master,
    master_command,
    normalize_flat,
)
from skystack.tools.synth import SynthConfig, load_truth, simulate

SESSION = SynthConfig(seed=3, width=512, height=384, n_lights=1, n_bias=8, n_darks=8, n_flats=8, n_dark_flats=8,
                      file_format="dng", vignetting=0.3, trail_frames=None, cloudy_frame=None, shake_frame=None)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    root = tmp_path_factory.mktemp("session")
    tr = load_truth(simulate(SESSION, root))
    return tr


def _files(tr, kind):
    return [tr.file_path(kind, i) for i in range(len(tr.frames(kind)))]


@pytest.fixture(scope="module")
def built(session, tmp_path_factory):
    """Masters built once (bias, dark-flat, thermal dark, flat) in a private cache."""
    cache = tmp_path_factory.mktemp("cache")
    b = build_master("bias", _files(session, "bias"), cache_dir=cache)
    df = build_master("dark-flat", _files(session, "dark_flat"), cache_dir=cache)
    d = build_master("dark", _files(session, "dark"), bias=b, cache_dir=cache)
    f = build_master("flat", _files(session, "flat"), bias=b, dark_flat=df, cache_dir=cache,
                     config=MasterConfig(flat_shrink=False))  # the combine alone
    return {"bias": b, "dark-flat": df, "dark": d, "flat": f, "cache": cache}


def _levels(tr):
    """Per-pixel black level and range (white - black) the reader reports, as (H, W) arrays."""
    m = read_meta(tr.file_path("bias", 0))
    pos = np.add.outer((np.arange(tr.shape[0]) % 2) * 2, np.arange(tr.shape[1]) % 2)
    black = np.asarray(m.black_level)[pos]
    return black, m.white_level - black


def _read_var_adu(cfg) -> float:
    """Per-frame variance (ADU^2) of a zero-signal pixel: read noise, row banding, rounding."""
    return (cfg.read_noise_e / cfg.gain_e_per_adu) ** 2 + cfg.bias_row_noise_adu ** 2 + 1.0 / 12.0


# ----------------------------------------------------------------------------- masters vs truth
#
# Bound used below: with per-frame noise sigma_pix, an N-frame mean has sigma_pix / sqrt(N);
# the 3-sigma clipped mean of N = 8 frames is within a few % of that (Gaussian efficiency).
# So z = (master - truth) / expected_sigma must have an RMS in [0.95, 1.10] (1 = ideal mean;
# the RMS itself is known to 0.2 % over 196 608 pixels). Measured: bias 1.00, dark 1.00, flat 1.00.


def test_master_bias_equals_truth(session, built):
    cfg = session.config
    black, rng = _levels(session)
    truth = (session.bias_pattern() - black) / rng
    sigma = np.sqrt(_read_var_adu(cfg) / cfg.n_bias) / rng
    z = (built["bias"].data - truth) / sigma
    assert 0.95 < np.sqrt(np.mean(z ** 2)) < 1.10
    # no offset: the mean error is within 5 sigma of what read noise and row banding allow
    mean_sigma_adu = np.sqrt(_read_var_adu(cfg) / (cfg.n_bias * truth.size)
                             + cfg.bias_row_noise_adu ** 2 / (cfg.n_bias * cfg.height))
    assert abs(np.mean((built["bias"].data - truth) * rng)) < 5 * mean_sigma_adu


def test_master_dark_is_thermal_signal(session, built):
    cfg = session.config
    black, rng = _levels(session)
    signal = session.dark_signal(cfg.exposure_s)  # ADU above bias, hot pixels and amp glow included
    var_dark = _read_var_adu(cfg) + signal / cfg.gain_e_per_adu  # + dark shot noise
    sigma = np.sqrt(var_dark / cfg.n_darks + _read_var_adu(cfg) / cfg.n_bias) / rng
    z = (built["dark"].data - signal / rng) / sigma
    assert built["dark"].meta.bias_subtracted
    assert 0.95 < np.sqrt(np.mean(z ** 2)) < 1.10


def test_master_flat_equals_truth_per_colour(session, built):
    cfg = session.config
    ff = session.flat_field()
    col = session.channel_index()
    g = cfg.gain_e_per_adu
    level = np.asarray(cfg.flat_level_adu * np.asarray(cfg.flat_color))[col]
    dark_flat = session.dark_signal(cfg.flat_exposure_s, cfg.temperature_c)
    signal = ff * level
    var_flat = (signal + dark_flat) / g + _read_var_adu(cfg)
    var_df = dark_flat / g + _read_var_adu(cfg)
    rel_sigma = np.sqrt(var_flat / cfg.n_flats + var_df / cfg.n_dark_flats) / signal
    truth = ff.copy()
    for c in range(3):
        truth[col == c] /= np.median(ff[col == c])
    flat = built["flat"].data
    z = (flat / truth - 1.0) / rel_sigma
    good = session.defect_map() == 0  # dead pixels have ~0 signal: relative error undefined
    assert 0.95 < np.sqrt(np.mean(z[good] ** 2)) < 1.10
    for c in range(3):  # median 1 per colour, so dividing by it keeps the colour balance
        assert abs(np.median(flat[col == c]) - 1.0) < 1e-6
    assert built["flat"].meta.flat_offset == "dark-flat"
    meds = built["flat"].meta.flat_medians
    # medians before normalising follow the flat's colour x CFA response (ratios within 1 %)
    exp = np.array([np.median((ff * level)[col == c]) for c in range(3)])
    np.testing.assert_allclose(np.array(meds) / meds[1], exp / exp[1], rtol=0.01)


def _flat_truth(session):
    """Noise-free flat (median 1 per colour) and each pixel's relative noise in a master of the session's flats."""
    cfg = session.config
    ff = session.flat_field()
    col = session.channel_index()
    level = np.asarray(cfg.flat_level_adu * np.asarray(cfg.flat_color))[col]
    dark_flat = session.dark_signal(cfg.flat_exposure_s, cfg.temperature_c)
    signal = ff * level
    var_flat = (signal + dark_flat) / cfg.gain_e_per_adu + _read_var_adu(cfg)
    var_df = dark_flat / cfg.gain_e_per_adu + _read_var_adu(cfg)
    truth = ff.copy()
    for c in range(3):
        truth[col == c] /= np.median(ff[col == c])
    return truth, np.sqrt(var_flat / cfg.n_flats + var_df / cfg.n_dark_flats) / signal


def test_flat_shrink_removes_the_flats_noise_and_keeps_the_prnu(session, built):
    """Default master flat: pixel error against the truth at the Wiener bound, large scales unbiased.

    The truth's PRNU (``prnu``) and each pixel's noise (shot and read noise of
    the flats, as in the test above) predict the error of the minimum-mean-
    square estimate, ``sqrt(p^2 v / (p^2 + v))`` per pixel. The shrunk flat must
    reach it within 12 %, beat the plain combine by that margin, and leave every
    large scale (vignetting, dust) as right as the plain combine has it: 16x16
    block means no farther from the truth's.
    """
    cfg = session.config
    shrunk = build_master("flat", _files(session, "flat"), bias=built["bias"], dark_flat=built["dark-flat"],
                          use_cache=False)
    truth, rel_sigma = _flat_truth(session)
    good = session.defect_map() == 0
    err_plain = (built["flat"].data / truth - 1.0)[good]
    err = (shrunk.data / truth - 1.0)[good]
    v, p2 = rel_sigma[good] ** 2, cfg.prnu ** 2
    bound = np.sqrt(np.mean(p2 * v / (p2 + v)))
    rms, rms_plain = np.sqrt(np.mean(err ** 2)), np.sqrt(np.mean(err_plain ** 2))
    assert rms_plain == pytest.approx(np.sqrt(np.mean(v)), rel=0.06)
    assert rms == pytest.approx(bound, rel=0.12)
    assert rms < 0.85 * rms_plain
    h, w = truth.shape

    def blocks(a):
        return a[: h // 16 * 16, : w // 16 * 16].reshape(h // 16, 16, w // 16, 16).mean(axis=(1, 3))

    b_shrunk, b_plain = blocks(shrunk.data / truth), blocks(built["flat"].data / truth)
    assert np.std(b_shrunk) <= 1.02 * np.std(b_plain)
    assert np.abs(b_shrunk - 1).max() <= 1.05 * np.abs(b_plain - 1).max()
    noise, prnu, resid = shrunk.meta.flat_noise
    assert noise == pytest.approx(np.sqrt(np.mean(v)), rel=0.10)
    assert prnu == pytest.approx(cfg.prnu, rel=0.15)
    assert resid == pytest.approx(bound, rel=0.15)
    back = read_master(write_master(shrunk, built["cache"] / "shrunk.fits").meta.path)
    assert back.meta.flat_noise == pytest.approx(shrunk.meta.flat_noise)


def test_fits_provenance_headers(session, built):
    d = built["dark"]
    assert d.meta.path and Path(d.meta.path).parent == built["cache"]
    h = fits.getheader(d.meta.path)
    cfg = session.config
    assert h["IMAGETYP"] == "Master Dark" and h["SSKIND"] == "dark"
    assert h["NCOMBINE"] == cfg.n_darks
    assert h["EXPTIME"] == pytest.approx(cfg.exposure_s)
    assert h["ISOSPEED"] == pytest.approx(cfg.iso)
    assert "CCD-TEMP" not in h  # the DNG files record no temperature: none is invented
    assert h["METHOD"] == "sigma" and h["CLIPLOW"] == 3.0 and h["CLIPHIGH"] == 3.0
    assert h["BAYERPAT"] == cfg.pattern and h["ROWORDER"] == "TOP-DOWN"
    assert h["INSTRUME"] == f"{cfg.make} {cfg.model}"
    assert h["BIASSUB"] is True and h["SSKEY"] == d.meta.key
    assert len(h["HISTORY"]) == cfg.n_darks
    f = fits.getheader(built["flat"].meta.path)
    assert f["FLATOFFS"] == "dark-flat" and f["FLATNORM"] == "per-colour median"
    assert {"FLATMEDR", "FLATMEDG", "FLATMEDB"} <= set(f.keys())
    back = read_master(d.meta.path)
    np.testing.assert_array_equal(back.data, d.data)
    assert back.meta.count == d.meta.count and back.meta.bias_subtracted and back.meta.key == d.meta.key
    assert back.meta.pattern == cfg.pattern and back.meta.exposure_s == pytest.approx(cfg.exposure_s)


def test_masters_open_as_ccddata_and_honour_the_umask(built):
    """BUNIT is a valid (dimensionless) unit, so astropy's CCDData reads every master."""
    import astropy.units as u
    from astropy.nddata import CCDData

    for kind in ("bias", "dark", "flat"):
        path = built[kind].meta.path
        ccd = CCDData.read(path)
        assert ccd.unit == u.dimensionless_unscaled
        np.testing.assert_array_equal(ccd.data, read_master(path).data)
        umask = os.umask(0)
        os.umask(umask)
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


# ----------------------------------------------------------------------------- cache


def test_second_run_reuses_cache(session, built):
    before = (STATS.combined, STATS.frames_read, STATS.cache_hits)
    b = build_master("bias", _files(session, "bias"), cache_dir=built["cache"])
    df = build_master("dark-flat", _files(session, "dark_flat"), cache_dir=built["cache"])
    d = build_master("dark", _files(session, "dark"), bias=b, cache_dir=built["cache"])
    f = build_master("flat", list(reversed(_files(session, "flat"))), bias=b, dark_flat=df, cache_dir=built["cache"],
                     config=MasterConfig(flat_shrink=False))
    # nothing re-combined, not a single frame read; identical data
    assert (STATS.combined, STATS.frames_read) == before[:2]
    assert STATS.cache_hits == before[2] + 4
    for m, key in ((b, "bias"), (df, "dark-flat"), (d, "dark"), (f, "flat")):
        assert m.from_cache
        np.testing.assert_array_equal(m.data, built[key].data)
        assert m.meta.key == built[key].meta.key


def test_changed_input_invalidates(session, built, tmp_path):
    cache = tmp_path / "cache"
    (tmp_path / "bias").mkdir()
    files = []
    for f in _files(session, "bias"):  # private copies: the session's files stay untouched
        files.append(tmp_path / "bias" / f.name)
        files[-1].write_bytes(f.read_bytes())
    first = build_master("bias", files, cache_dir=cache)
    st = os.stat(files[0])
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched
    n = STATS.combined
    again = build_master("bias", files, cache_dir=cache)
    assert not again.from_cache and STATS.combined == n + 1
    np.testing.assert_array_equal(again.data, first.data)  # same content, new identity
    assert again.meta.key != first.meta.key
    # a dependent master follows its dependency's key
    d1 = build_master("dark", _files(session, "dark")[:3], bias=first, cache_dir=cache)
    d2 = build_master("dark", _files(session, "dark")[:3], bias=again, cache_dir=cache)
    assert not d2.from_cache and d1.meta.key != d2.meta.key
    # other settings: other key
    c = build_master("bias", files, config=MasterConfig(kappa_low=2.5), cache_dir=cache)
    assert not c.from_cache
    # fewer frames: other key
    assert not build_master("bias", files[:5], cache_dir=cache).from_cache
    # new content (replaced file): rebuilt, and the result changes
    files[1].write_bytes(_files(session, "dark")[0].read_bytes())
    changed = build_master("bias", files, cache_dir=cache)
    assert not changed.from_cache and not np.array_equal(changed.data, again.data)
    assert build_master("bias", files, cache_dir=cache).from_cache


def test_band_size_and_spill_do_not_change_result(session, built, monkeypatch):
    files = _files(session, "dark")
    small = build_master("dark", files, bias=built["bias"], use_cache=False,
                         config=MasterConfig(band_bytes=200_000))  # ~15 bands
    np.testing.assert_array_equal(small.data, built["dark"].data)
    monkeypatch.setattr(ms, "_host_budget", lambda: 1000)  # force the memory-mapped cube
    spilled = build_master("dark", files, bias=built["bias"], use_cache=False)
    np.testing.assert_array_equal(spilled.data, built["dark"].data)


def test_masters_built_side_by_side_equal_those_built_in_turn(session, tmp_path):
    """build_calibration_set with 2 workers (the default) gives the bits of a one-at-a-time build, and
    the defect map of the masters assembled afterwards."""
    from skystack.engine.calibrate import build_calibration_set, make_calibration_set

    kw = dict(bias=_files(session, "bias"), darks=_files(session, "dark"), flats=_files(session, "flat"),
              dark_flats=_files(session, "dark_flat"), use_cache=False)
    two = build_calibration_set(master_config=MasterConfig(), **kw)
    one = build_calibration_set(master_config=MasterConfig(workers=1), **kw)
    assert MasterConfig().workers == 2
    for kind in ("bias", "dark", "flat", "dark-flat"):
        np.testing.assert_array_equal(two.masters[kind].data, one.masters[kind].data)
    # the dark's hot and cold pixels, found in the pool while the flat is built: the map found at the end
    ref = make_calibration_set(bias=one.masters["bias"], dark=one.masters["dark"], flat=one.masters["flat"])
    assert ref.defects.count > 0
    for cset in (two, one):
        np.testing.assert_array_equal(cset.defects.hot, ref.defects.hot)
        np.testing.assert_array_equal(cset.defects.cold, ref.defects.cold)
    with pytest.raises(SkystackError, match="workers"):
        MasterConfig(workers=0)


# ----------------------------------------------------------------------------- hand-made frames


def _write_fits(path: Path, data: np.ndarray, **hdr) -> Path:
    h = fits.Header()
    for k, v in hdr.items():
        h[k] = v
    fits.PrimaryHDU(data=data, header=h).writeto(path)
    return path


def _frames(tmp_path, values, shape=(6, 8), **hdr):
    out = []
    for i, v in enumerate(values):
        a = np.full(shape, v, dtype=np.uint16)
        out.append(_write_fits(tmp_path / f"f{i}.fits", a, BAYERPAT="RGGB", BLKLEVEL=100, INSTRUME="Cam A",
                               EXPTIME=30.0, **{"CCD-TEMP": -5.0 + 0.2 * i}, **hdr))
    return out


@pytest.mark.parametrize("method, expected_adu", [("median", 103.0), ("mean", 120.2), ("sigma", 102.75)])
def test_combine_methods(tmp_path, method, expected_adu):
    files = _frames(tmp_path, [101, 102, 103, 190, 105])
    # sigma, kappa 2: round 1 (median 103, std 34.9) drops 190; round 2 (median 102.5, std 1.48) keeps the rest
    cfg = MasterConfig(method=method, kappa_low=2.0, kappa_high=2.0)
    m = build_master("bias", files, config=cfg, use_cache=False)
    # normalised: (adu - black) / (white - black), white 65535 for 16-bit FITS
    np.testing.assert_allclose(m.data, (expected_adu - 100.0) / (65535.0 - 100.0), rtol=1e-5)
    assert m.meta.method == method and m.meta.count == 5 and m.meta.exposure_s == 30.0
    assert m.meta.temperature_c == pytest.approx(-4.6) and m.meta.camera == "Cam A"
    back = read_master(write_master(m, tmp_path / "m.fits").meta.path)
    h = fits.getheader(tmp_path / "m.fits")
    assert h["CCD-TEMP"] == pytest.approx(-4.6) and h["EXPTIME"] == 30.0 and h["METHOD"] == method
    assert back.meta.temperature_c == pytest.approx(-4.6)


def test_mismatched_frames_name_the_odd_file(tmp_path):
    files = _frames(tmp_path, [100, 100])
    odd = _write_fits(tmp_path / "odd.fits", np.zeros((6, 10), np.uint16), BAYERPAT="RGGB", INSTRUME="Cam A")
    with pytest.raises(FrameMismatchError, match="odd.fits is 10x6 RGGB.*f0.fits is 8x6"):
        build_master("dark", files + [odd], use_cache=False)
    other = _write_fits(tmp_path / "pat.fits", np.zeros((6, 8), np.uint16), BAYERPAT="GRBG", INSTRUME="Cam A")
    with pytest.raises(FrameMismatchError, match="pat.fits"):
        build_master("dark", files + [other], use_cache=False)
    cam = _write_fits(tmp_path / "cam.fits", np.zeros((6, 8), np.uint16), BAYERPAT="RGGB", INSTRUME="Cam B")
    with pytest.raises(FrameMismatchError, match="cam.fits.*Cam B"):
        build_master("dark", files + [cam], use_cache=False)
    with pytest.raises(InputNotFound):
        build_master("bias", [tmp_path / "missing.fits"], use_cache=False)


def test_dependency_of_wrong_size_is_refused(tmp_path):
    bias = build_master("bias", _frames(tmp_path, [100, 101]), use_cache=False)
    (tmp_path / "d").mkdir()
    darks = _frames(tmp_path / "d", [120, 121], shape=(6, 10))
    with pytest.raises(CalibrationError, match="master bias.*8x6.*10x6"):
        build_master("dark", darks, bias=bias, use_cache=False)


def test_empty_flat_is_refused(tmp_path):
    bias = build_master("bias", _frames(tmp_path, [100, 100]), use_cache=False)
    (tmp_path / "f").mkdir()
    flats = _frames(tmp_path / "f", [100, 100])
    with pytest.raises(CalibrationError, match="empty flat|median"):
        build_master("flat", flats, bias=bias, use_cache=False)


def test_colour_frames_are_combined_per_plane(tmp_path):
    """(3, H, W) colour frames (e.g. already-debayered FITS): the flat is normalised per plane."""
    files = []
    for i in range(3):
        cube = np.stack([np.full((6, 8), v * (1 + 0.1 * i), np.float64) for v in (1100, 2100, 4100)])
        cube[1, 2, 3] *= 0.5  # a darker pixel in G
        files.append(_write_fits(tmp_path / f"c{i}.fits", cube.astype(np.uint16), BLKLEVEL=100))
    m = build_master("flat", files, use_cache=False, config=MasterConfig(band_bytes=500))
    assert m.data.shape == (3, 6, 8) and m.meta.pattern is None
    for c in range(3):
        assert np.median(m.data[c]) == pytest.approx(1.0, abs=1e-6)
    # no offset given: each flat (adu - black) is scaled to the first one's median, then averaged
    exp = np.mean([(1050 * (1 + 0.1 * i) - 100) / (2100 * (1 + 0.1 * i) - 100) for i in range(3)])
    assert m.data[1, 2, 3] == pytest.approx(exp, rel=1e-5)


def test_normalize_flat_per_colour():
    flat = np.empty((4, 6), np.float32)
    flat[0::2, 0::2] = 2.0  # R
    flat[0::2, 1::2] = 4.0  # G
    flat[1::2, 0::2] = 4.4  # G (the other green site)
    flat[1::2, 1::2] = 8.0  # B
    out, meds = normalize_flat(flat, "RGGB")
    assert meds == pytest.approx((2.0, 4.2, 8.0))
    np.testing.assert_allclose(out[0::2, 0::2], 1.0)
    np.testing.assert_allclose(out[1::2, 1::2], 1.0)
    # both greens share one median, so their real difference stays in the flat
    np.testing.assert_allclose(out[0::2, 1::2], 4.0 / 4.2, rtol=1e-6)
    np.testing.assert_allclose(out[1::2, 0::2], 4.4 / 4.2, rtol=1e-6)


def test_master_command_and_master_files(tmp_path):
    files = _frames(tmp_path, [100, 102, 104])
    out = tmp_path / "out" / "master_bias.fits"
    m = master_command("bias", files, out, use_cache=False)
    assert out.is_file() and m.meta.path == str(out)
    assert is_master_file(out) and not is_master_file(files[0])
    back = load_or_build_master("bias", out)
    np.testing.assert_array_equal(back.data, m.data)
    with pytest.raises(CalibrationError, match="not a master dark"):
        load_or_build_master("dark", out)
    with pytest.raises(OutputError, match="input"):
        master_command("bias", files, files[0], use_cache=False)
    with pytest.raises(CalibrationError, match="not a skystack master"):
        read_master(files[0])
    before = files[0].read_bytes()
    with pytest.raises(OutputError):
        write_master(m, files[0])
    assert files[0].read_bytes() == before
    # a dark with the bias given as a master file is thermal
    (tmp_path / "d").mkdir()
    darks = _frames(tmp_path / "d", [110, 112, 114])
    d = master_command("dark", darks, tmp_path / "md.fits", bias=out, use_cache=False)
    assert d.meta.bias_subtracted
    np.testing.assert_allclose(d.data, 10.0 / (65535.0 - 100.0), rtol=1e-4)


@pytest.mark.gpu
def test_gpu_master_matches_cpu(session):
    from skystack.engine.backend import get_backend

    cpu = build_master("bias", _files(session, "bias"), use_cache=False, backend=get_backend("cpu"))
    gpu = build_master("bias", _files(session, "bias"), use_cache=False, backend=get_backend("gpu"))
    np.testing.assert_allclose(gpu.data, cpu.data, rtol=1e-6, atol=1e-9)
    # a flat: the shrinkage's noise statistics are gathered on the device
    flats = _files(session, "flat")[:4]
    cpu_f = build_master("flat", flats, bias=cpu, use_cache=False, backend=get_backend("cpu"))
    gpu_f = build_master("flat", flats, bias=cpu, use_cache=False, backend=get_backend("gpu"))
    assert cpu_f.meta.flat_noise is not None
    np.testing.assert_allclose(gpu_f.meta.flat_noise, cpu_f.meta.flat_noise, rtol=1e-5)
    np.testing.assert_allclose(gpu_f.data, cpu_f.data, rtol=1e-5, atol=1e-7)
