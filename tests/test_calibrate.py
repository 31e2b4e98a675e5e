"""Calibration on the CFA mosaic: formula, compatibility, dark scaling/optimisation, acceptance on
simulator frames (vignetting, hot pixels, colour balance), kernels vs twins."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from skystack.engine import calibrate as cal
from skystack.engine.backend import get_backend, to_host
from skystack.engine.calibrate import (
    CalibrationConfig,
    CalibrationSet,
    build_calibration_set,
    calibrate,
    calibrate_light,
    check_compatible,
    dark_scale_for,
    make_calibration_set,
    optimize_dark_scale,
)
from skystack.engine.cosmetic import _correct_defects_numpy, correct_defects
from skystack.engine.debayer import pattern_code
from skystack.engine.errors import CalibrationError
from skystack.engine.frame import BAYER_PATTERNS, FrameMeta
from skystack.engine.io import read_frame
from skystack.engine.masterfile import Master, MasterMeta
from skystack.engine.masters import STATS
from skystack.engine.rawconv import cfa_to_float
from skystack.tools.synth import SynthConfig, load_truth, simulate
from skystack.kernels.emulate import emulated, emulator_available, use_emulator

needs_gxx = pytest.mark.skipif(not emulator_available(), reason="g++ is not on PATH")


def _master(kind, data, *, exposure=None, pattern="RGGB", camera="Cam", bias_subtracted=False, path=None):
    data = np.asarray(data, np.float32)
    return Master(data=data, meta=MasterMeta(kind=kind, count=5, shape=data.shape, pattern=pattern, camera=camera,
                                             exposure_s=exposure, bias_subtracted=bias_subtracted, path=path))


def _meta(shape, *, exposure=None, pattern="RGGB", camera="Cam", iso=None):
    return FrameMeta(path="/data/light_001.cr2", format="raw", shape=shape, pattern=pattern, exposure_s=exposure,
                     camera=camera, iso=iso)


# ----------------------------------------------------------------------------- formula


def test_formula_against_float64(backend, rng):
    h, w = 16, 20
    L = rng.uniform(0.05, 0.5, (h, w)).astype(np.float32)
    B = rng.normal(0.0, 0.002, (h, w)).astype(np.float32)
    D = rng.uniform(0.0, 0.02, (h, w)).astype(np.float32)
    F = rng.uniform(0.6, 1.1, (h, w)).astype(np.float32)
    F[3, 4], F[5, 6], F[7, 8] = 0.0, -0.2, np.nan
    xb = backend.asarray
    got = to_host(calibrate(xb(L), bias=xb(B), dark=xb(D), dark_scale=1.7, flat=xb(F)))
    ok = F > 0
    exp = (L.astype(np.float64) - B - 1.7 * D) / np.where(ok, F, 1.0)
    np.testing.assert_allclose(got[ok], exp[ok], rtol=2e-6, atol=1e-8)
    assert np.isnan(got[~ok]).all() and (~ok).sum() == 3  # flat <= 0 or NaN: no data
    # each missing master skips its step
    np.testing.assert_allclose(to_host(calibrate(xb(L), flat=xb(F)))[ok], L[ok] / F[ok], rtol=2e-6)
    np.testing.assert_allclose(to_host(calibrate(xb(L), bias=xb(B))), L - B, rtol=2e-6, atol=1e-9)
    np.testing.assert_array_equal(to_host(calibrate(xb(L))), L)


def test_fused_defects_equal_separate_correction(backend, rng):
    h, w = 24, 30
    L = rng.uniform(0.1, 0.3, (h, w)).astype(np.float32)
    F = rng.uniform(0.8, 1.0, (h, w)).astype(np.float32)
    mask = np.zeros((h, w), np.uint8)
    mask[[0, 5, 5, 12, 23], [0, 7, 9, 13, 29]] = 1
    L[mask.astype(bool)] = 3.0
    xb = backend.asarray
    fused = to_host(calibrate(xb(L), flat=xb(F), defects=xb(mask), pattern="GBRG"))
    plain = calibrate(L, flat=F)
    sep, n = correct_defects(plain, mask, pattern="GBRG")
    np.testing.assert_allclose(fused, sep, rtol=1e-6)
    assert n == 5 and fused.max() < 1.0


def test_shape_mismatch_is_refused():
    with pytest.raises(CalibrationError, match="master dark"):
        calibrate(np.zeros((4, 6), np.float32), dark=np.zeros((4, 8), np.float32))


# ----------------------------------------------------------------------------- compatibility, dark scale


def test_check_compatible_errors_name_master_and_fix():
    meta = _meta((40, 60), camera="Canon EOS 550D")
    good = _master("dark", np.zeros((40, 60)), camera="canon eos  550d", path="/cal/master_dark.fits")
    assert check_compatible(meta, CalibrationSet(dark=good)) == ()
    cases = [
        (_master("dark", np.zeros((40, 62)), camera="Canon EOS 550D", path="/cal/md.fits"), "62x40"),
        (_master("flat", np.zeros((40, 60)), pattern="GRBG", camera="Canon EOS 550D", path="/cal/mf.fits"), "GRBG"),
        (_master("bias", np.zeros((40, 60)), camera="Nikon D750", path="/cal/mb.fits"), "Nikon"),
    ]
    for m, what in cases:
        kind = m.kind
        with pytest.raises(CalibrationError) as exc:
            check_compatible(meta, CalibrationSet(**{kind: m}))
        msg = str(exc.value)
        assert m.meta.path in msg and what in msg and "light_001.cr2" in msg and "same camera" in msg


def test_check_compatible_notes():
    meta = dataclasses.replace(_meta((4, 6)), iso=1600.0, temperature_c=20.0)
    dark = _master("dark", np.zeros((4, 6)))
    dark = dataclasses.replace(dark, meta=dataclasses.replace(dark.meta, iso=800.0, temperature_c=5.0))
    notes = check_compatible(meta, CalibrationSet(dark=dark))
    assert any("ISO 800" in n for n in notes) and any("5.0 C" in n for n in notes)


def test_dark_scale_for():
    assert dark_scale_for(120.0, 60.0) == 2.0
    assert dark_scale_for(None, 60.0) == 1.0 and dark_scale_for(30.0, None) == 1.0
    assert dark_scale_for(30.0, 0.0) == 1.0


def test_calibrate_light_scales_thermal_dark_only():
    h, w = 8, 10
    L = np.full((h, w), 0.3, np.float32)
    B = np.full((h, w), 0.01, np.float32)
    D = np.full((h, w), 0.02, np.float32)
    meta = _meta((h, w), exposure=60.0)
    thermal = make_calibration_set(bias=_master("bias", B), dark=_master("dark", D, exposure=30.0,
                                                                          bias_subtracted=True))
    r = calibrate_light(L, meta, thermal)
    assert r.dark_scale == 2.0 and r.n_defects == 0
    np.testing.assert_allclose(r.data, 0.3 - 0.01 - 2 * 0.02, rtol=1e-6)
    # a dark that still holds the bias (no master bias) cannot be scaled: k = 1 and a note
    raw = make_calibration_set(dark=_master("dark", D + B, exposure=30.0))
    r = calibrate_light(L, meta, raw)
    assert r.dark_scale == 1.0 and any("not scaled" in n for n in r.notes)
    np.testing.assert_allclose(r.data, 0.3 - 0.03, rtol=1e-6)
    # a bias-holding dark given together with a bias is made thermal
    both = make_calibration_set(bias=_master("bias", B), dark=_master("dark", D + B, exposure=30.0))
    assert both.dark.meta.bias_subtracted
    np.testing.assert_allclose(calibrate_light(L, meta, both).data, 0.3 - 0.01 - 2 * 0.02, rtol=1e-6)


def _thermal_scene(rng, k_true, h=200, w=240):
    """Thermal master (DSNU + hot pixels + glow), a light holding k_true x it, sky, stars, noise.

    Returns light, master dark and the mask of pixels away from the stars.
    """
    yy, xx = np.mgrid[0:h, 0:w]
    thermal = 0.002 * rng.lognormal(0.0, 0.3, (h, w)) + 0.004 * np.exp(-np.hypot(yy, xx) / 40)
    hot = rng.random((h, w)) < 2e-3
    thermal[hot] += rng.uniform(0.01, 0.2, hot.sum())
    sky = 0.05 + 0.02 * xx / w
    stars = np.zeros((h, w))
    for x0, y0 in rng.uniform(5, [w - 5, h - 5], (60, 2)):
        stars += 0.3 * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * 1.3 ** 2))
    light = k_true * thermal + sky + stars + rng.normal(0, 0.002, (h, w))
    master = thermal + rng.normal(0, 0.0003, (h, w))
    return light.astype(np.float32), master.astype(np.float32), stars < 1e-4


def _hp_rms(a, sel):
    """RMS of the same-colour high-pass (what dark optimisation minimises) over ``sel``."""
    a = a.astype(np.float64)
    r = a[2:-2, 2:-2] - 0.25 * (a[:-4, 2:-2] + a[4:, 2:-2] + a[2:-2, :-4] + a[2:-2, 4:])
    return float(np.sqrt(np.mean(r[sel[2:-2, 2:-2]] ** 2)))


@pytest.mark.parametrize("k_true", [0.6, 1.0, 1.7])
def test_optimize_dark_scale_finds_the_noise_minimum(backend, rng, k_true):
    light, dark, clear = _thermal_scene(rng, k_true)
    k = optimize_dark_scale(backend.asarray(light), backend.asarray(dark))
    assert abs(k - k_true) < 0.02 * k_true  # measured within ~0.5 %
    # it is the minimum of the noise: higher a bit either side, and at the naive k = 1
    n0 = _hp_rms(light - k * dark, clear)
    for other in (0.95 * k, 1.05 * k):
        assert _hp_rms(light - other * dark, clear) > n0
    if k_true != 1.0:
        assert _hp_rms(light - dark, clear) > 1.2 * n0
    r = calibrate_light(light, _meta(light.shape, exposure=10.0),
                        make_calibration_set(dark=_master("dark", dark, exposure=10.0, bias_subtracted=True)),
                        config=CalibrationConfig(dark_optimize=True))
    assert r.dark_scale == pytest.approx(optimize_dark_scale(light, dark), rel=1e-6)


# ----------------------------------------------------------------------------- acceptance on simulator frames

SESSION = SynthConfig(seed=5, width=512, height=384, n_lights=3, n_bias=8, n_darks=8, n_flats=8, n_dark_flats=8,
                      file_format="fits", vignetting=0.3, gradient=0.0, sky_adu_s=(200.0, 240.0, 180.0),
                      trail_frames=None, cloudy_frame=None, shake_frame=None)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    root = tmp_path_factory.mktemp("calsession")
    tr = load_truth(simulate(SESSION, root))
    cache = tmp_path_factory.mktemp("calcache")

    def files(kind):
        return [tr.file_path(kind, i) for i in range(len(tr.frames(kind)))]

    def build():
        return build_calibration_set(bias=files("bias"), darks=files("dark"), flats=files("flat"),
                                     dark_flats=files("dark_flat"), cache_dir=cache)

    return tr, build(), build, cache


def _light(tr, i):
    fr = read_frame(tr.file_path("light", i))
    m = fr.meta
    return cfa_to_float(fr.data, pattern=m.pattern, black_level=m.black_level, white_level=m.white_level), m


def _expected_calibrated(tr, i, meta):
    """Noise-free calibrated light: sky through a perfect flat x the per-colour flat median, normalised."""
    ff = tr.flat_field()
    col = tr.channel_index()
    med = np.array([np.median(ff[col == c]) for c in range(3)])
    return tr.sky(i, cfa=True) * med[col] / (meta.white_level - np.asarray(meta.black_level)[0])


def _star_mask(tr, i, level_adu=3.0):
    from scipy.ndimage import binary_dilation

    return binary_dilation(tr.sky(i, background=False, gradient=False, cfa=True) > level_adu, iterations=2)


def _large_scale_variation(tr, img, stars, block=64):
    """(max - min) / mean of a quadratic surface fitted to star-masked block medians, worst CFA colour.

    Per colour, the median of each 64x64 block's unmasked pixels of that colour; a least-squares
    quadratic in (x, y) through them (smooths the ~0.1 % block noise); evaluated at the block centres.
    """
    h, w = img.shape
    col = tr.channel_index()
    worst = 0.0
    for c in range(3):
        xs, ys, vs = [], [], []
        for y0 in range(0, h, block):
            for x0 in range(0, w, block):
                sl = (slice(y0, y0 + block), slice(x0, x0 + block))
                sel = (col[sl] == c) & ~stars[sl] & np.isfinite(img[sl])
                vs.append(np.median(img[sl][sel]))
                xs.append((x0 + block / 2) / w - 0.5)
                ys.append((y0 + block / 2) / h - 0.5)
        x, y, v = np.array(xs), np.array(ys), np.array(vs)
        A = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)
        fit = A @ np.linalg.lstsq(A, v, rcond=None)[0]
        worst = max(worst, (fit.max() - fit.min()) / fit.mean())
    return worst


def test_vignetting_is_flattened(session):
    tr, cset, _, _ = session
    for i in range(len(tr.lights)):
        light, meta = _light(tr, i)
        stars = _star_mask(tr, i)
        before = _large_scale_variation(tr, light, stars)
        after = _large_scale_variation(tr, calibrate_light(light, meta, cset).data, stars)
        # measured: before ~0.26-0.27 (30 % cos^4 fall-off at the far corner), after ~0.001-0.002
        assert 0.2 < before < 0.4, before
        assert after < 0.005, after


def test_calibrated_light_matches_truth_and_keeps_colour_balance(session):
    tr, cset, _, _ = session
    light, meta = _light(tr, 0)
    out = calibrate_light(light, meta, cset).data
    exp = _expected_calibrated(tr, 0, meta)
    col = tr.channel_index()
    good = ~_star_mask(tr, 0) & (tr.defect_map() == 0)
    for c in range(3):
        sel = good & (col == c)
        # background level right to 0.3 % per colour (so R/G and B/G are kept: the flat's own
        # colour, (0.95, 1, 1.1), is divided out per colour instead of tinting the light)
        assert np.median(out[sel]) / np.median(exp[sel]) == pytest.approx(1.0, abs=0.003)


def test_hot_and_cold_pixels_are_gone(session):
    tr, cset, _, _ = session
    truth = tr.defect_map()
    hot, cold = truth == 1, truth == 2
    assert hot.sum() >= 30 and cold.sum() >= 3
    assert cset.defects.hot[hot].all() and cset.defects.cold[cold].all()  # all found in the dark/flat
    col = tr.channel_index()
    for i in range(len(tr.lights)):
        light, meta = _light(tr, i)
        exp = _expected_calibrated(tr, i, meta)

        def residual_z(img):
            r = img - exp
            z = np.empty_like(r)
            for c in range(3):
                sel = (col == c) & (truth == 0)
                m = np.median(r[sel])
                z[col == c] = (r[col == c] - m) / (1.4826 * np.median(np.abs(r[sel] - m)))
            return z

        z = residual_z(calibrate_light(light, meta, cset).data)
        gone_hot = np.mean(z[hot] < 5.0)
        gone_cold = np.mean(np.abs(z[cold]) < 5.0)
        assert gone_hot >= 0.99 and gone_cold >= 0.99, (gone_hot, gone_cold)
        # the test can fail: with bias and flat alone many hot pixels stand out above this bright
        # sky (measured ~49 % beyond 5 sigma)
        flat_only = calibrate_light(light, meta, CalibrationSet(bias=cset.bias, flat=cset.flat))
        assert np.mean(residual_z(flat_only.data)[hot] > 5.0) > 0.3


def test_no_star_core_is_flagged(session):
    tr, cset, _, _ = session
    truth = tr.defect_map()
    flagged = cset.defects.mask.astype(bool) & (truth == 0)
    assert flagged.sum() <= 5  # measured: 0-2 (a few 5-sigma outliers of the lognormal dark current)
    bright = tr.stars.flux[:, 1] > 300
    for i in range(len(tr.lights)):
        xy = np.rint(tr.project_stars(i)[bright]).astype(int)
        ok = (xy[:, 0] >= 1) & (xy[:, 0] < tr.shape[1] - 1) & (xy[:, 1] >= 1) & (xy[:, 1] < tr.shape[0] - 1)
        for x, y in xy[ok]:
            assert not flagged[y - 1:y + 2, x - 1:x + 2].any(), (i, x, y)


def test_second_run_uses_cached_masters_and_gives_identical_output(session):
    tr, cset, build, _ = session
    n_comb, n_read = STATS.combined, STATS.frames_read
    again = build()
    assert (STATS.combined, STATS.frames_read) == (n_comb, n_read)  # nothing re-combined or re-read
    assert all(m.from_cache for m in again.masters.values())
    np.testing.assert_array_equal(again.defects.mask, cset.defects.mask)
    light, meta = _light(tr, 1)
    np.testing.assert_array_equal(calibrate_light(light, meta, again).data, calibrate_light(light, meta, cset).data)


# ----------------------------------------------------------------------------- kernels vs twins


def _operands(rng, shape):
    L = rng.uniform(-0.05, 1.0, shape).astype(np.float32)
    B = rng.normal(0, 0.01, shape).astype(np.float32)
    D = rng.uniform(0, 0.1, shape).astype(np.float32)
    F = rng.uniform(0.5, 1.2, shape).astype(np.float32)
    for a in (L, B, D, F):
        a.reshape(-1)[rng.integers(0, a.size, size=max(1, a.size // 17))] = np.nan
    F.reshape(-1)[rng.integers(0, F.size, size=max(1, F.size // 13))] = 0.0
    F.reshape(-1)[rng.integers(0, F.size)] = -1.0
    L.reshape(-1)[rng.integers(0, L.size)] = np.inf
    return L, B, D, F


@needs_gxx
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (9, 1), (13, 17), (3, 8, 9)])
@pytest.mark.parametrize("flags", [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1),
                                   (1, 1, 1)])
def test_emulated_calibrate_kernel_equals_twin(rng, shape, flags):
    L, B, D, F = _operands(rng, shape)
    k = np.float32(1.37)
    n = L.size
    out = np.full(shape, -7, np.float32)
    emulated("calibrate.cu").launch("calibrate_kernel", n, (out, L, B, D, F, np.int64(n),
                                                            *(np.int32(f) for f in flags), k))
    twin = cal._calibrate_numpy(L, B if flags[0] else None, D if flags[1] else None, k, F if flags[2] else None)
    np.testing.assert_array_equal(out, twin)


@needs_gxx
@pytest.mark.parametrize("code", [-1] + [pattern_code(p) for p in BAYER_PATTERNS])
@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (1, 11), (15, 19), (3, 10, 12)])
def test_emulated_fused_kernel_equals_twins(rng, code, shape):
    L, B, D, F = _operands(rng, shape)
    h, w = shape[-2:]
    mask = (rng.random((h, w)) < 0.15).astype(np.uint8)
    mask[0, 0] = 1
    k = np.float32(0.8)
    n = L.size
    out = np.full(shape, -7, np.float32)
    emulated("calibrate.cu").launch("calibrate_cosmetic_kernel", n,
                                    (out, L, B, D, F, mask, np.int64(n), np.int32(h), np.int32(w), np.int32(code),
                                     np.int32(1), np.int32(1), np.int32(1), k), reverse=True)
    planes = cal._calibrate_numpy(L, B, D, k, F).reshape((-1, h, w))
    np.testing.assert_array_equal(out, _correct_defects_numpy(planes, mask, code).reshape(shape))


@needs_gxx
def test_operation_gpu_branch_in_emulator(monkeypatch, rng):
    L, B, D, F = _operands(rng, (20, 26))
    mask = (rng.random((20, 26)) < 0.05).astype(np.uint8)
    twin_plain = calibrate(L, bias=B, dark=D, dark_scale=1.2, flat=F)
    twin_fused = calibrate(L, dark=D, dark_scale=1.2, flat=F, defects=mask, pattern="BGGR")
    use_emulator(monkeypatch, cal)
    np.testing.assert_array_equal(calibrate(L, bias=B, dark=D, dark_scale=1.2, flat=F), twin_plain)
    np.testing.assert_array_equal(calibrate(L, dark=D, dark_scale=1.2, flat=F, defects=mask, pattern="BGGR"),
                                  twin_fused)


@pytest.mark.gpu
def test_gpu_calibrate_light_matches_cpu(session):
    tr, cset, _, _ = session
    gpu = get_backend("gpu")
    light, meta = _light(tr, 0)
    cpu_out = calibrate_light(light, meta, cset).data
    gpu_out = calibrate_light(gpu.asarray(light), meta, cset.to_backend(gpu)).data
    np.testing.assert_allclose(to_host(gpu_out), cpu_out, rtol=1e-6, atol=1e-9, equal_nan=True)
