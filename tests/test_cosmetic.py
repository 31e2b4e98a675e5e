"""Cosmetic correction: same-colour median replacement, defect detection from darks and lights."""

from __future__ import annotations

import numpy as np
import pytest

from skystack.engine import cosmetic as cos
from skystack.engine.backend import to_host
from skystack.engine.cosmetic import (
    CosmeticConfig,
    DefectMap,
    correct_defects,
    find_defects_from_dark,
    find_defects_from_lights,
    neighbour_offsets,
)
from skystack.engine.debayer import cfa_colour_map, pattern_code
from skystack.engine.frame import BAYER_PATTERNS
from skystack.engine.io import read_frame
from skystack.engine.rawconv import cfa_to_float
from skystack.tools.synth import SynthConfig, load_truth, simulate
from skystack.kernels.emulate import emulated, emulator_available, use_emulator

needs_gxx = pytest.mark.skipif(not emulator_available(), reason="g++ is not on PATH")


# ----------------------------------------------------------------------------- correction


def _reference_median(img: np.ndarray, mask: np.ndarray, pattern: str | None, y: int, x: int) -> float:
    """Plain-Python median of the usable same-colour neighbours (float64), from the documented rule."""
    h, w = img.shape
    vals = []
    for dy, dx in neighbour_offsets(pattern, y, x):
        yy, xx = y + dy, x + dx
        if 0 <= yy < h and 0 <= xx < w and not mask[yy, xx] and np.isfinite(img[yy, xx]):
            vals.append(float(img[yy, xx]))
    return float(np.median(vals)) if vals else float("nan")


def test_neighbour_sets_are_same_colour():
    for pattern in BAYER_PATTERNS:
        cm = cfa_colour_map(pattern, (8, 8))
        for y in (2, 3):
            for x in (2, 3):
                offs = neighbour_offsets(pattern, y, x)
                assert len({tuple(o) for o in offs}) == 8
                assert all(cm[y + dy, x + dx] == cm[y, x] for dy, dx in offs)
                # the nearest ones: greens at distance sqrt(2) and 2, red/blue at 2 and 2*sqrt(2)
                d = sorted(np.hypot(*o) for o in offs)
                assert d[0] == pytest.approx(np.sqrt(2) if cm[y, x] == 1 else 2.0)


@pytest.mark.parametrize("pattern", list(BAYER_PATTERNS) + [None])
def test_correct_defects_matches_reference(backend, rng, pattern):
    h, w = 23, 31
    img = rng.normal(0.2, 0.01, size=(h, w)).astype(np.float32)
    mask = np.zeros((h, w), bool)
    pts = [(0, 0), (0, 1), (22, 30), (11, 15), (11, 17), (11, 16), (5, 2), (6, 2), (12, 0)]
    for y, x in pts:
        mask[y, x] = True
        img[y, x] = 5.0  # hot
    img[7, 9] = np.nan  # a NaN neighbour is skipped
    mask[7, 11] = True
    out, count = correct_defects(backend.asarray(img), mask, pattern=pattern)
    out = to_host(out)
    assert count == int(mask.sum())
    for y, x in zip(*np.nonzero(mask)):
        exp = _reference_median(img, mask, pattern, y, x)
        assert out[y, x] == pytest.approx(exp, rel=1e-6), (y, x)
    keep = ~mask
    np.testing.assert_array_equal(out[keep], img[keep])
    assert np.all(out[mask] < 1.0)


def test_isolated_defect_without_usable_neighbours_becomes_nan():
    img = np.ones((3, 3), np.float32)
    mask = np.zeros((3, 3), bool)
    mask[1, 1] = True
    out, n = correct_defects(img, mask, pattern="RGGB")  # (1,1) is B: its neighbours at distance 2 are outside
    assert n == 1 and np.isnan(out[1, 1])


def test_colour_planes_use_adjacent_pixels(backend, rng):
    img = rng.random((3, 9, 10)).astype(np.float32)
    mask = np.zeros((9, 10), bool)
    mask[4, 4] = True
    out, n = correct_defects(backend.asarray(img), DefectMap(hot=mask, cold=np.zeros_like(mask), source="dark"),
                             pattern=None)
    out = to_host(out)
    for c in range(3):
        assert out[c, 4, 4] == pytest.approx(np.median(np.delete(img[c, 3:6, 3:6].ravel(), 4)), rel=1e-6)


def _random_case(rng, planes, h, w, frac):
    data = rng.normal(0.1, 0.05, size=(planes, h, w)).astype(np.float32)
    data.reshape(-1)[rng.integers(0, data.size, size=max(1, data.size // 20))] = np.nan
    data.reshape(-1)[rng.integers(0, data.size)] = np.inf
    mask = (rng.random((h, w)) < frac).astype(np.uint8)
    mask[0, 0] = 1
    return data, mask


@needs_gxx
@pytest.mark.parametrize("code", [-1] + [pattern_code(p) for p in BAYER_PATTERNS])
@pytest.mark.parametrize("planes, h, w, frac", [(1, 1, 1, 1.0), (1, 1, 9, 0.3), (1, 9, 1, 0.3), (1, 2, 2, 0.5),
                                                (1, 17, 23, 0.1), (3, 12, 13, 0.2), (1, 40, 33, 0.6)])
def test_emulated_kernel_equals_twin(rng, code, planes, h, w, frac):
    data, mask = _random_case(rng, planes, h, w, frac)
    n = planes * h * w
    out = np.full(data.shape, -7, np.float32)
    emulated("cosmetic.cu").launch("cosmetic_kernel", n, (out, data, mask, np.int64(n), np.int32(h), np.int32(w),
                                                          np.int32(code)), reverse=bool(h % 2))
    np.testing.assert_array_equal(out, cos._correct_defects_numpy(data, mask, code))


@needs_gxx
@pytest.mark.parametrize("code", [-1] + [pattern_code(p) for p in BAYER_PATTERNS])
@pytest.mark.parametrize("h, w", [(1, 1), (1, 9), (9, 1), (2, 2), (17, 23), (40, 33)])
def test_neighbour_mean_kernel_equals_twin(rng, code, h, w):
    """The defect detection's neighbour mean: emulated and native kernels give the twin's bits
    (holes, infinities, frame edges), and so does the operation whichever the host picks."""
    from skystack.kernels.native import native

    data, _ = _random_case(rng, 1, h, w, 0.0)
    img = data[0]
    twin = cos._neighbour_mean_numpy(img, code)
    for mod in (emulated("cosmetic.cu"), native("cosmetic.cu")):
        out = np.full((h, w), -7, np.float32)
        mod.launch("neighbour_mean_kernel", h * w, (out, img, np.int32(h), np.int32(w), np.int32(code)),
                   reverse=bool(w % 2))
        np.testing.assert_array_equal(out, twin)
    np.testing.assert_array_equal(cos._neighbour_mean(img, code), twin)
    assert np.isfinite(twin).sum() > 0.5 * img.size or min(h, w) < 3


@needs_gxx
def test_operation_gpu_branch_in_emulator(monkeypatch, rng):
    data, mask = _random_case(rng, 1, 30, 27, 0.05)
    twin, n1 = correct_defects(data[0], mask, pattern="GRBG")
    use_emulator(monkeypatch, cos)
    got, n2 = correct_defects(data[0], mask, pattern="GRBG")
    np.testing.assert_array_equal(got, twin)
    assert n1 == n2 == int(mask.sum())


@pytest.mark.gpu
def test_gpu_matches_twin(rng):
    import cupy

    data, mask = _random_case(rng, 1, 64, 75, 0.05)
    for pattern in list(BAYER_PATTERNS) + [None]:
        twin, _ = correct_defects(data[0], mask, pattern=pattern)
        got, _ = correct_defects(cupy.asarray(data[0]), cupy.asarray(mask), pattern=pattern)
        np.testing.assert_array_equal(got.get(), twin)


# ----------------------------------------------------------------------------- detection from a dark


def _synthetic_dark(rng, h=120, w=160):
    """Thermal dark: read noise + a bright amp-glow corner + known hot and cold pixels."""
    yy, xx = np.mgrid[0:h, 0:w]
    glow = 0.01 * np.exp(-np.hypot(yy, xx - (w - 1)) / 40.0)  # 50 sigma at the corner
    dark = (0.001 + glow + rng.normal(0, 2e-4, size=(h, w))).astype(np.float32)
    hot = [(10, 10), (50, 80), (51, 80), (3, w - 4), (h - 1, 0), (70, 30)]
    cold = [(90, 100), (20, 140)]
    for y, x in hot:
        dark[y, x] += 0.01
    for y, x in cold:
        dark[y, x] -= 0.005
    return dark, hot, cold


@pytest.mark.parametrize("pattern", ["RGGB", None])
def test_dark_defects_found_and_amp_glow_ignored(rng, pattern):
    dark, hot, cold = _synthetic_dark(rng)
    dm = find_defects_from_dark(dark, pattern=pattern)
    assert dm.source == "dark"
    found_hot = {tuple(p) for p in np.argwhere(dm.hot)}
    found_cold = {tuple(p) for p in np.argwhere(dm.cold)}
    assert found_hot == set(hot)  # (50,80)/(51,80) are adjacent (different colours): both found
    assert found_cold == set(cold)
    assert dm.count == len(hot) + len(cold)
    assert dm.mask.dtype == np.uint8 and dm.mask.sum() == dm.count


def test_dark_defects_cap_keeps_the_most_extreme(rng):
    dark, hot, _ = _synthetic_dark(rng)
    dark[10, 10] += 1.0  # the most extreme
    dm = find_defects_from_dark(dark, pattern="RGGB", config=CosmeticConfig(max_fraction=1.5 / dark.size))
    assert dm.count == 1 and dm.hot[10, 10]


def test_dead_pixels_from_flat(rng):
    dark, hot, cold = _synthetic_dark(rng)
    h, w = dark.shape
    yy, xx = np.mgrid[0:h, 0:w]
    flat = (1.0 - 0.3 * (np.hypot(yy - h / 2, xx - w / 2) / np.hypot(h, w)) ** 2).astype(np.float32)
    flat *= (1 + rng.normal(0, 0.005, size=flat.shape)).astype(np.float32)
    flat[60:70, 60:70] *= 0.93  # a dust shadow is not a defect
    flat[33, 44] *= 0.1
    flat[100, 3] = 0.0
    dm = find_defects_from_dark(dark, pattern="BGGR", flat=flat)
    found = cos.dark_outliers(dark, pattern="BGGR")  # found beforehand (while the flat is built)
    cold_before = found.cold.copy()
    again = find_defects_from_dark(dark, pattern="BGGR", flat=flat, outliers=found)
    np.testing.assert_array_equal(again.hot, dm.hot)
    np.testing.assert_array_equal(again.cold, dm.cold)
    np.testing.assert_array_equal(found.cold, cold_before)  # the flat's dead pixels join a copy
    assert dm.cold[33, 44] and dm.cold[100, 3]
    assert not dm.cold[60:70, 60:70].any()
    assert {tuple(p) for p in np.argwhere(dm.cold)} == set(cold) | {(33, 44), (100, 3)}


# ----------------------------------------------------------------------------- detection from lights


@pytest.fixture(scope="module")
def dithered_session(tmp_path_factory):
    """7 lights, 2 px dither between lights, no calibration frames (FITS, 512x384)."""
    cfg = SynthConfig(seed=4, width=512, height=384, n_lights=7, n_bias=0, n_darks=0, n_flats=0, n_dark_flats=0,
                      file_format="fits", drift_px_per_frame=(2.0, -1.4), jitter_px=0.5,
                      trail_frames=None, cloudy_frame=None, shake_frame=None)
    root = tmp_path_factory.mktemp("dithered")
    return load_truth(simulate(cfg, root))


def _lights(tr):
    for i in range(len(tr.lights)):
        fr = read_frame(tr.file_path("light", i))
        m = fr.meta
        yield cfa_to_float(fr.data, pattern=m.pattern, black_level=m.black_level, white_level=m.white_level)


def test_defects_from_lights(dithered_session):
    tr = dithered_session
    cfg = tr.config
    dm = find_defects_from_lights(_lights(tr), pattern=cfg.pattern)
    assert dm.source == "lights"
    truth = tr.defect_map()
    # every hot pixel 8 sigma above one light's sky noise must be found (sigma: the noisiest
    # colour, G, at the optical centre: ~31 e-; fainter ones are lost in single lights)
    sky_e = max(s * r for s, r in zip(cfg.sky_adu_s, cfg.channel_response)) * cfg.exposure_s * cfg.gain_e_per_adu
    noise_e = np.sqrt(sky_e + cfg.read_noise_e ** 2)
    hot_e = tr.hot_rate_e_s * tr.dark_factor(cfg.temperature_c) * cfg.exposure_s
    strong = hot_e > 8 * noise_e
    yx = tr.hot_pixels
    assert strong.sum() >= 10
    assert dm.hot[yx[strong, 0], yx[strong, 1]].all()
    # no false hot pixels at all, and in particular no star core
    false_hot = dm.hot & (truth != 1)
    assert not false_hot.any(), np.argwhere(false_hot)
    cores = np.zeros(tr.shape, bool)
    bright = tr.stars.flux[:, 1] > 200
    for i in range(len(tr.lights)):
        xy = np.rint(tr.project_stars(i)[bright]).astype(int)
        ok = (xy[:, 0] >= 0) & (xy[:, 0] < cfg.width) & (xy[:, 1] >= 0) & (xy[:, 1] < cfg.height)
        cores[xy[ok, 1], xy[ok, 0]] = True
    assert cores.sum() > 1000
    assert not (dm.mask.astype(bool) & cores & (truth == 0)).any()


def test_defects_from_too_few_lights_is_empty(rng):
    img = rng.normal(0.1, 0.01, size=(20, 20)).astype(np.float32)
    img[5, 5] = 1.0
    dm = find_defects_from_lights([img, img], pattern="RGGB")
    assert dm.count == 0
    dm = find_defects_from_lights([img, img, img], pattern="RGGB")
    assert dm.count == 1 and dm.hot[5, 5]
