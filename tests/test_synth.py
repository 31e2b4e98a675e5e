"""Synthetic night simulator: the truth must be what the files contain.

Every test measures the generated frames (or the noise-free renders they are
built from) and compares with the truth or with analytic values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import numpy as np
import pytest
import rawpy
import tifffile
from astropy.io import fits
from scipy import ndimage

from skystack.engine.errors import OutputError, SkystackError
from skystack.tools.synth import (
    SynthConfig,
    build_truth,
    load_truth,
    moffat_alpha,
    simulate,
)

# 7 lights, 10 min apart, 60 s each: 15 deg of field rotation, trailing stars,
# a satellite (1), a cloudy light (2), the reference (3) and a shaken light (5).
CFG = SynthConfig(seed=3, width=400, height=300, n_lights=7, n_bias=2, n_darks=2, n_flats=2,
                  n_dark_flats=2, exposure_s=60.0, interval_s=600.0)
SMALL = SynthConfig(seed=5, width=160, height=120, n_lights=3, n_bias=1, n_darks=1, n_flats=1,
                    n_dark_flats=1, pattern="GBRG")


@pytest.fixture(scope="module")
def truth():
    return build_truth(CFG)


def _files(root):
    return sorted(p for p in root.rglob("*") if p.is_file())


def _digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in _files(root)}


def _calibrated(truth, kind, i):
    """(raw - bias - dark) / flat with the truth's noise-free components: ADU through a perfect flat.

    Hot and cold pixels (dead ones would divide noise by ~0) are replaced by
    the median of their four same-colour neighbours.
    """
    rec = truth.frames(kind)[i]
    raw = truth.render_frame(kind, i).astype(np.float64)
    sig = raw - truth.bias_pattern() - truth.dark_signal(rec.exposure_s, rec.temperature_c)
    cal = sig / truth.flat_field()
    h, w = cal.shape
    out = cal.copy()
    for y, x in np.concatenate([truth.hot_pixels, truth.cold_pixels]):
        nb = [cal[y + dy, x + dx] for dy, dx in ((-2, 0), (2, 0), (0, -2), (0, 2))
              if 0 <= y + dy < h and 0 <= x + dx < w]
        out[y, x] = np.median(nb)
    return out


def _superpixel(a):
    return a[0::2, 0::2] + a[0::2, 1::2] + a[1::2, 0::2] + a[1::2, 1::2]


def _windowed_centroid(img, x, y, sigma=2.0, half=12, iters=200):
    """Iterative Gaussian-windowed centroid (converges to the centre of a point-symmetric profile)."""
    for _ in range(iters):
        ix, iy = int(round(x)), int(round(y))
        ys, xs = np.mgrid[iy - half:iy + half + 1, ix - half:ix + half + 1]
        sub = img[iy - half:iy + half + 1, ix - half:ix + half + 1]
        wgt = np.exp(-0.5 * ((xs - x) ** 2 + (ys - y) ** 2) / sigma**2) * sub
        nx = x + 2.0 * ((wgt * xs).sum() / wgt.sum() - x)
        ny = y + 2.0 * ((wgt * ys).sum() / wgt.sum() - y)
        done = abs(nx - x) < 1e-10 and abs(ny - y) < 1e-10
        x, y = nx, ny
        if done:
            break
    return x, y


def _isolated_bright(truth, i, *, fmin, margin=20, fmax=np.inf, isolation=1e-5):
    lt = truth.lights[i]
    pos = truth.project_stars(i)
    f = truth.stars.flux[:, 1]
    h, w = truth.shape
    alpha = moffat_alpha(lt.fwhm_px, lt.beta)
    cand = np.flatnonzero((pos[:, 0] > margin) & (pos[:, 0] < w - 1 - margin) & (pos[:, 1] > margin)
                          & (pos[:, 1] < h - 1 - margin) & (f > fmin) & (f < fmax))
    keep = []
    for j in cand:
        d2 = (pos[:, 0] - pos[j, 0]) ** 2 + (pos[:, 1] - pos[j, 1]) ** 2
        contam = f * (1.0 + d2 / alpha**2) ** (-lt.beta)  # neighbours' profile at this star
        contam[j] = 0.0
        if contam.max() < isolation * f[j]:
            keep.append(j)
    return np.array(keep, dtype=int), pos


# ----------------------------------------------------------------------------- geometry


def test_star_positions_follow_transforms(truth):
    """Noise-free stars-only renders: windowed centroids == star list through the transforms (< 0.01 px).

    Also: the R/G/B planes and the CFA mosaic render agree pixel for pixel.
    """
    worst, total = 0.0, 0
    for lt in truth.lights:
        img = truth.sky(lt.index, background=False, gradient=False, trail=False)[1]  # G plane, (H, W)
        idx, pos = _isolated_bright(truth, lt.index, fmin=300)
        assert len(idx) >= 3, f"light {lt.index}: only {len(idx)} isolated stars"
        total += len(idx)
        meas = np.array([_windowed_centroid(img, *pos[j]) for j in idx])
        err = np.hypot(*(meas - pos[idx]).T)
        # and back through the frame -> reference transform onto the star list
        back = meas @ lt.transform[:2, :2].T + lt.transform[:2, 2]
        err_ref = np.hypot(*(back - truth.stars.xy[idx]).T)
        worst = max(worst, err.max(), err_ref.max())
    assert total >= 50
    assert worst < 0.01
    for i in (truth.reference_index, next(lt.index for lt in truth.lights if lt.shaken)):
        mosaic = truth.sky(i, cfa=True)
        planes = truth.sky(i)
        picked = np.take_along_axis(planes, truth.channel_index()[None].astype(np.intp), 0)[0]
        np.testing.assert_array_equal(mosaic, picked)


def test_star_fluxes_are_aperture_sums():
    """Star list fluxes (ADU through a perfect flat) x transparency == 15 px aperture sums, per channel."""
    tr = build_truth(dataclasses.replace(CFG, star_density=150.0))  # sparse field: clean apertures
    f = tr.stars.flux
    n = 0
    for lt in tr.lights:
        if lt.cloudy:
            continue
        planes = tr.sky(lt.index, background=False, gradient=False, trail=False)
        pos = tr.project_stars(lt.index)
        alpha = moffat_alpha(lt.fwhm_px, lt.beta)
        yy, xx = np.mgrid[0:300, 0:400]
        for j in np.flatnonzero((pos[:, 0] > 20) & (pos[:, 0] < 379) & (pos[:, 1] > 20) & (pos[:, 1] < 279)):
            d = np.hypot(*(pos - pos[j]).T)
            # upper bound of the neighbours' light inside the aperture (Moffat encircled-flux tail)
            spill = f[:, 1] * (1 + np.maximum(d - 15.0, 0.0) ** 2 / alpha**2) ** (1 - lt.beta)
            spill[j] = 0.0
            if spill.sum() > 1e-3 * f[j, 1]:
                continue
            ap = (xx - pos[j, 0]) ** 2 + (yy - pos[j, 1]) ** 2 <= 15**2
            got = planes[:, ap].sum(axis=1)
            np.testing.assert_allclose(got, f[j] * lt.transparency, rtol=0.01)  # own wings beyond 15 px < 1 %
            n += 1
    assert n >= 15


def test_field_rotation_about_pole_for_an_hour():
    """60 lights of 60 s at the default cadence (62 s): >= 15 deg about a pole outside the frame."""
    cfg = SynthConfig(width=400, height=300, n_lights=60, exposure_s=60.0, n_bias=0, n_darks=0,
                      n_flats=0, n_dark_flats=0)
    tr = build_truth(cfg)
    T = tr.transforms()
    ang = np.degrees(np.arctan2(T[:, 1, 0], T[:, 0, 0]))
    span = ang.max() - ang.min()
    assert span >= 15.0
    assert span == pytest.approx(59 * 62.0 * 15.041 / 3600.0, abs=1e-9)  # sidereal rate
    np.testing.assert_allclose(np.diff(ang), np.diff(ang)[0], atol=1e-9)  # uniform cadence
    assert ang[-1] > ang[0]  # northern sky: counter-clockwise on the image (y down)
    np.testing.assert_array_equal(T[tr.reference_index], np.eye(3))
    px, py = tr.pole_xy
    assert not (-0.5 <= px <= cfg.width - 0.5 and -0.5 <= py <= cfg.height - 0.5)
    for lt, t in zip(tr.lights, T):
        r = t[:2, :2]
        np.testing.assert_allclose(r @ r.T, np.eye(2), atol=1e-12)  # rigid
        pole_sensor = np.array([px, py]) + np.array(lt.shift_px)  # the pole only drifts
        np.testing.assert_allclose(r @ pole_sensor + t[:2, 2], [px, py], atol=1e-9)
        assert np.hypot(*lt.shift_px) < 5.0
    # with a 60 s cadence the hour spans 59 intervals: 14.79 deg between mid-exposures
    tr60 = build_truth(dataclasses.replace(cfg, interval_s=60.0))
    T60 = tr60.transforms()
    a60 = np.degrees(np.arctan2(T60[:, 1, 0], T60[:, 0, 0]))
    assert a60.max() - a60.min() == pytest.approx(59 * 60 * 15.041 / 3600.0, abs=1e-9)


def test_star_list_covers_every_light(truth):
    """Every quadrant of every light holds the designed star density; stars leave and enter."""
    h, w = truth.shape
    expect_q = CFG.star_density * (w / 2) * (h / 2) / 1e6
    seen = []
    for lt in truth.lights:
        pos = truth.project_stars(lt.index)
        inside = (pos[:, 0] >= -0.5) & (pos[:, 0] < w - 0.5) & (pos[:, 1] >= -0.5) & (pos[:, 1] < h - 0.5)
        seen.append(inside)
        for qx in (0, 1):
            for qy in (0, 1):
                q = inside & ((pos[:, 0] >= w / 2 - 0.5) == qx) & ((pos[:, 1] >= h / 2 - 0.5) == qy)
                assert abs(q.sum() - expect_q) < 5 * math.sqrt(expect_q), (lt.index, qx, qy, q.sum(), expect_q)
    left = seen[0] & ~seen[-1]
    entered = seen[-1] & ~seen[0]
    assert left.sum() > 20 and entered.sum() > 20
    # power-law fluxes: N(>F) ~ F^-0.9 between the limits
    f = truth.stars.flux[:, 1]
    fmin = CFG.star_flux_min_adu_s * CFG.exposure_s
    ratio = (f > 10 * fmin).sum() / len(f)
    assert ratio == pytest.approx(10**-0.9, abs=4 * math.sqrt(10**-0.9 / len(f)))
    # colours vary
    rg = truth.stars.flux[:, 0] / f
    assert rg.std() > 0.1


# ----------------------------------------------------------------------------- background, noise, calibration


def _block_reduce(a, b, fn):
    h, w = a.shape
    blocks = a[: h // b * b, : w // b * b].reshape(h // b, b, w // b, b).transpose(0, 2, 1, 3)
    return fn(blocks.reshape(h // b, w // b, -1), axis=-1)


def test_light_background_varies_about_30_percent(truth):
    """Large-scale raw background of a light (gradient x vignetting) varies ~30 % across the frame.

    Metric: (max - min) / mean of block statistics of one green phase, blocks
    1/16 of the frame width (medians in the written frame, means in the design).
    """
    i = truth.reference_index
    lt = truth.lights[i]
    assert not lt.flags
    raw = truth.render_frame("light", i).astype(np.float64)
    sig = raw - truth.bias_pattern() - truth.dark_signal(lt.exposure_s, lt.temperature_c)
    g = sig[0::2, 1::2]  # one green phase of RGGB
    b = g.shape[1] // 16
    blocks = _block_reduce(g, b, np.median)  # robust to stars
    measured = (blocks.max() - blocks.min()) / blocks.mean()
    design = truth.flat_field() * truth.sky(i, stars=False, trail=False, cfa=True)
    dblocks = _block_reduce(design[0::2, 1::2], b, np.mean)
    designed = (dblocks.max() - dblocks.min()) / dblocks.mean()
    assert 0.25 <= designed <= 0.35
    assert 0.25 <= measured <= 0.35
    assert measured == pytest.approx(designed, abs=0.02)


def test_noise_model_photon_transfer(truth):
    """Residual variance vs expected signal follows Poisson + read noise (+ row banding)."""
    c = CFG
    i = truth.reference_index
    raw = truth.render_frame("light", i).astype(np.float64)
    exp = truth.expected_raw("light", i)
    lam_e = (exp - truth.bias_pattern()) * c.gain_e_per_adu
    ok = exp < c.white_level - 200
    res = raw - exp
    assert abs(res[ok].mean()) < 0.5
    edges = np.quantile(lam_e[ok], [0.05, 0.35, 0.65, 0.95])
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = ok & (lam_e >= lo) & (lam_e < hi)
        pred = (lam_e[m] + c.read_noise_e**2).mean() / c.gain_e_per_adu**2 + c.bias_row_noise_adu**2 + 1 / 12
        assert res[m].var() == pytest.approx(pred, rel=0.05)
    # bias frames: read noise and banding only
    b = truth.render_frame("bias", 0).astype(np.float64) - truth.bias_pattern()
    pred_b = (c.read_noise_e / c.gain_e_per_adu) ** 2 + c.bias_row_noise_adu**2 + 1 / 12
    assert b.var() == pytest.approx(pred_b, rel=0.05)
    assert abs(b.mean()) < 0.1


def test_saturation_clips_at_white_level():
    cfg = dataclasses.replace(CFG, white_level=7500)  # low white level: bright star cores saturate
    tr = build_truth(cfg)
    raw = tr.render_frame("light", 0)
    exp = tr.expected_raw("light", 0)
    sat = exp > cfg.white_level + 300
    assert sat.sum() >= 5
    assert np.all(raw[sat] == cfg.white_level)
    assert raw.max() == cfg.white_level
    assert np.mean(raw[exp < cfg.white_level - 300] == cfg.white_level) < 1e-3


def test_bias_pattern_has_levels_and_columns(truth):
    bp = truth.bias_pattern()
    for k, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        assert np.median(bp[dy::2, dx::2]) == pytest.approx(CFG.black_level[k], abs=0.3)
    cols = (bp - np.tile(np.reshape(CFG.black_level, (2, 2)), (150, 200))).mean(axis=0)
    assert cols.std() == pytest.approx(CFG.bias_column_sigma_adu, rel=0.2)
    # a master bias of the written frames converges to the pattern (column pattern visible)
    stack = np.mean([truth.render_frame("bias", k) for k in range(CFG.n_bias)], axis=0)
    meas_cols = (stack - bp).mean(axis=0)
    assert np.abs(meas_cols).max() < 6 * (CFG.read_noise_e / CFG.gain_e_per_adu) / math.sqrt(300 * CFG.n_bias) + 0.2


def test_hot_pixels_show_in_darks(truth):
    rec = truth.darks[0]
    res = truth.render_frame("dark", 0).astype(np.float64) - truth.bias_pattern()
    expected = truth.dark_signal(rec.exposure_s, rec.temperature_c)
    hy, hx = truth.hot_pixels.T
    assert len(hy) >= 10
    med = np.median(res)
    assert np.all(res[hy, hx] > med + 50)
    sigma = np.sqrt(expected[hy, hx] / CFG.gain_e_per_adu + (CFG.read_noise_e / CFG.gain_e_per_adu) ** 2 + 1)
    assert np.all(np.abs(res[hy, hx] - expected[hy, hx]) < 6 * sigma)
    quiet = (truth.defect_map() == 0) & (expected < 20)  # not hot, not in the amp glow
    assert quiet.mean() > 0.9
    assert (res[quiet] > med + 50).sum() == 0
    # amp glow: top-right corner clearly above the opposite corner
    assert res[:20, -20:].mean() - res[-20:, :20].mean() > 20
    # cold pixels: dead in the flat
    cy, cx = truth.cold_pixels.T
    fl = truth.render_frame("flat", 0).astype(np.float64) - truth.bias_pattern()
    assert np.all(fl[cy, cx] < 0.2 * np.median(fl))


def test_dark_signal_linear_in_exposure_and_doubles_per_6C():
    base = dict(seed=9, width=800, height=600, n_lights=0, n_bias=0, n_darks=1, n_flats=0, n_dark_flats=0)
    means, truths = {}, {}
    for key, exp, temp in (("30", 30.0, 15.0), ("120", 120.0, 15.0), ("120w", 120.0, 21.0)):
        tr = build_truth(SynthConfig(exposure_s=exp, dark_temperature_c=temp, **base))
        ok = tr.defect_map() == 0
        res = tr.render_frame("dark", 0).astype(np.float64) - tr.bias_pattern()
        means[key] = res[ok].mean()
        truths[key] = tr.dark_signal(exp, temp)[ok].mean()
        assert means[key] == pytest.approx(truths[key], abs=0.1)
    rate = (means["120"] - means["30"]) / 90.0
    assert rate == pytest.approx(truths["30"] / 30.0, rel=0.03)
    assert means["30"] - 30.0 * rate == pytest.approx(0.0, abs=0.15)  # through the origin
    assert means["120w"] / means["120"] == pytest.approx(2.0, rel=0.03)


def test_flats_measure_flat_field(truth):
    """Flat frames minus bias/dark over their illumination reproduce flat_field (vignetting, dust...)."""
    ratios = []
    for k, rec in enumerate(truth.flats):
        sig = truth.render_frame("flat", k).astype(np.float64) - truth.bias_pattern() - truth.dark_signal(
            rec.exposure_s, rec.temperature_c)
        ratios.append(sig / truth.flat_illumination(k))
    meas = _block_reduce(np.mean(ratios, axis=0), 10, np.mean)
    want = _block_reduce(truth.flat_field(), 10, np.mean)
    np.testing.assert_allclose(meas, want, rtol=0.006)
    v = truth.vignetting()
    assert v.max() == pytest.approx(1.0, abs=1e-3)
    assert v.min() == pytest.approx(1.0 - CFG.vignetting, abs=2e-3)


# ----------------------------------------------------------------------------- special lights


def test_trail_frame_has_trail(truth):
    i = next(lt.index for lt in truth.lights if lt.trailed)
    tr = truth.lights[i].trail
    assert tr["kind"] == "satellite"
    h, w = truth.shape
    length = math.hypot(tr["x1"] - tr["x0"], tr["y1"] - tr["y0"])
    ux, uy = (tr["x1"] - tr["x0"]) / length, (tr["y1"] - tr["y0"]) / length
    s = np.arange(0.0, length, 1.0)
    px, py = tr["x0"] + s * ux, tr["y0"] + s * uy

    # background lines ~12 px either side, offset by even pixel counts so each sample keeps its CFA colour
    ox, oy = 2 * round(-6 * uy), 2 * round(6 * ux)

    def samples(k):
        """Nearest-pixel samples on the trail and on parallel lines, where all three are clear of stars."""
        stars = truth.sky(k, background=False, gradient=False, trail=False, cfa=True) > 30
        x0, y0 = np.rint(px).astype(int), np.rint(py).astype(int)
        xs = [x0, x0 - ox, x0 + ox]
        ys = [y0, y0 - oy, y0 + oy]
        ok = np.ones(len(s), bool)
        for x, y in zip(xs, ys):
            ok &= (x >= 0) & (x < w) & (y >= 0) & (y < h)
        for x, y in zip(xs, ys):
            ok[ok] &= ~stars[y[ok], x[ok]]
        return [(y[ok], x[ok]) for x, y in zip(xs, ys)]

    def excess_and_noise(k):
        cal = _calibrated(truth, "light", k)
        on, left, right = (cal[yx] for yx in samples(k))
        diff = on - 0.5 * (left + right)  # the local background cancels the gradient
        noise = 1.4826 * np.median(np.abs(diff - np.median(diff))) * 1.25 / math.sqrt(len(diff))
        return np.median(diff), noise, len(diff)

    trail_only = truth.sky(i, stars=False, background=False, gradient=False, cfa=True)
    expected = np.median(trail_only[samples(i)[0]])
    excess, noise, n = excess_and_noise(i)
    assert n > 200
    assert excess > 10 * noise
    assert excess == pytest.approx(expected, rel=0.15)
    # the same line in the reference light shows nothing
    excess_r, noise_r, _ = excess_and_noise(truth.reference_index)
    assert abs(excess_r) < 4 * noise_r


def _count_stars(img):
    """Peaks > 8 sigma above a median-filtered background in a 2x2-binned image."""
    bg = ndimage.median_filter(img, size=15)
    res = ndimage.gaussian_filter(img - bg, 1.0)
    sig = 1.4826 * np.median(np.abs(res - np.median(res)))
    peaks = (res == ndimage.maximum_filter(res, size=5)) & (res > 8 * sig)
    return int(peaks[4:-4, 4:-4].sum()), float(np.median(img))


def test_cloudy_frame_loses_stars_and_brightens(truth):
    counts, bgs = {}, {}
    for lt in truth.lights:
        counts[lt.index], bgs[lt.index] = _count_stars(_superpixel(_calibrated(truth, "light", lt.index)))
    cloudy = next(lt.index for lt in truth.lights if lt.cloudy)
    normal = [lt.index for lt in truth.lights if not lt.flags]
    n_normal = np.median([counts[k] for k in normal])
    assert n_normal > 15
    assert counts[cloudy] < 0.2 * n_normal
    assert bgs[cloudy] > 1.3 * np.median([bgs[k] for k in normal])


def _stacked_star(truth, i, *, fmin=5000, fmax=150000, half=12):
    """Flux-weighted stack of the calibrated cut-outs of bright, unsaturated, isolated stars.

    Each cut-out has its per-channel background (window rim) removed and is
    divided by the star's colour (flux_c / flux_G) so the CFA pattern cancels.
    """
    cal = _calibrated(truth, "light", i)
    cidx = truth.channel_index()
    pos, flux = truth.project_stars(i), truth.stars.flux
    f = flux[:, 1]
    h, w = truth.shape
    m = 2 * half
    cand = np.flatnonzero((pos[:, 0] > m) & (pos[:, 0] < w - 1 - m) & (pos[:, 1] > m) & (pos[:, 1] < h - 1 - m)
                          & (f > fmin) & (f < fmax))
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    rim = np.hypot(xx, yy) > half - 3
    acc = np.zeros(xx.shape)
    n = 0
    for j in cand:
        near = (np.hypot(*(pos - pos[j]).T) < 1.5 * half) & (f > 0.05 * f[j])
        near[j] = False
        if near.any():
            continue
        ix, iy = np.rint(pos[j]).astype(int)
        cut = cal[iy - half:iy + half + 1, ix - half:ix + half + 1].copy()
        ch = cidx[iy - half:iy + half + 1, ix - half:ix + half + 1]
        for c in range(3):
            cut[ch == c] -= np.median(cut[(ch == c) & rim])
        acc += cut / (flux[j, ch] / flux[j, 1])
        n += 1
    return acc, n


def _elongation(img, sigma=4.0):
    """(sqrt(major/minor), major-axis angle in degrees) of Gaussian-weighted second moments."""
    half = img.shape[0] // 2
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(float)
    wgt = np.exp(-0.5 * (xx**2 + yy**2) / sigma**2) * img
    cov = np.array([[(wgt * xx * xx).sum(), (wgt * xx * yy).sum()], [(wgt * xx * yy).sum(), (wgt * yy * yy).sum()]])
    ev, evec = np.linalg.eigh(cov / wgt.sum())
    return math.sqrt(ev[1] / ev[0]), math.degrees(math.atan2(evec[1, 1], evec[0, 1]))


def test_shaken_frame_has_elongated_stars(truth):
    """Second moments of the stars in the written frames: the shaken light is elongated along its shake."""
    res = {}
    for lt in truth.lights:
        if lt.cloudy:
            continue
        stack, n = _stacked_star(truth, lt.index)
        assert n >= 3
        res[lt.index] = _elongation(stack)
    shaken = next(lt for lt in truth.lights if lt.shaken)
    normal = [res[lt.index][0] for lt in truth.lights if not lt.flags]
    assert max(normal) < 1.15  # only the short rotation trails
    e, ang = res[shaken.index]
    assert e > 1.3
    ev, evec = np.linalg.eigh(shaken.shake_offsets.T @ shaken.shake_offsets)
    want = math.degrees(math.atan2(evec[1, 1], evec[0, 1]))
    assert abs((ang - want + 90) % 180 - 90) < 10


# ----------------------------------------------------------------------------- files


def test_same_seed_same_bytes_and_different_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    simulate(SMALL, a)
    simulate(SMALL, b)
    simulate(dataclasses.replace(SMALL, seed=6), c)
    da, db, dc = _digest(a), _digest(b), _digest(c)
    assert len(da) == 3 + 4 + 2  # frames + truth.json + truth.npz
    assert da == db
    for name in da:
        if name.startswith(("lights/", "bias/", "darks/", "flats/", "darkflats/")) or name == "truth.npz":
            assert da[name] != dc[name], name


def test_dng_session_reads_back_bit_exact_with_rawpy(tmp_path):
    json_path = simulate(SMALL, tmp_path / "s")
    root = json_path.parent
    tr = load_truth(root)
    assert json_path.name == "truth.json"
    black = list(SMALL.black_level)
    for kind in ("light", "bias", "dark", "flat", "dark_flat"):
        for k, rec in enumerate(tr.frames(kind)):
            path = root / rec.file
            assert path.suffix == ".dng"
            want = tr.render_frame(kind, k)  # noise-free mean + this frame's noise, quantised
            with rawpy.imread(str(path)) as raw:
                np.testing.assert_array_equal(raw.raw_image_visible, want)
                pat = raw.raw_pattern
                assert "".join("RGBG"[pat[i, j]] for i in (0, 1) for j in (0, 1)) == SMALL.pattern
                assert [raw.black_level_per_channel[pat[i, j]] for i in (0, 1) for j in (0, 1)] == black
                assert raw.white_level == SMALL.white_level
                assert raw.other.shutter_speed == pytest.approx(rec.exposure_s, rel=1e-6)
                assert raw.other.iso_speed == SMALL.iso
            with tifffile.TiffFile(path) as tf:
                exif = tf.pages[0].tags["ExifTag"].value
                assert exif["DateTimeOriginal"].replace(":", "-", 2).replace(" ", "T") == rec.time_start[:19]
            assert np.abs(want - tr.expected_raw(kind, k)).mean() < 60


def test_fits_session_keywords(tmp_path):
    cfg = dataclasses.replace(SMALL, file_format="fits", pattern="GRBG")
    root = simulate(cfg, tmp_path / "f").parent
    tr = load_truth(root / "truth.json")
    typ = {"light": "LIGHT", "bias": "BIAS", "dark": "DARK", "flat": "FLAT", "dark_flat": "DARKFLAT"}
    for kind in typ:
        for k, rec in enumerate(tr.frames(kind)):
            path = root / rec.file
            assert path.suffix == ".fits"
            with fits.open(path) as hdul:
                hd = hdul[0].header
                data = hdul[0].data
                assert data.dtype == np.uint16
                np.testing.assert_array_equal(data, tr.render_frame(kind, k))
                assert hd["BITPIX"] == 16 and hd["BZERO"] == 32768
                assert hd["BAYERPAT"] == "GRBG" and hd["ROWORDER"] == "TOP-DOWN"
                assert hd["EXPTIME"] == pytest.approx(rec.exposure_s)
                assert hd["ISOSPEED"] == cfg.iso and hd["GAIN"] == cfg.iso
                assert hd["CCD-TEMP"] == pytest.approx(rec.temperature_c)
                assert hd["DATE-OBS"] == rec.time_start.rstrip("Z")
                assert hd["IMAGETYP"] == typ[kind]
                assert hd["INSTRUME"] == f"{cfg.make} {cfg.model}"


def test_truth_json_and_reload(tmp_path):
    root = simulate(SMALL, tmp_path / "s").parent
    d = json.loads((root / "truth.json").read_text())
    assert d["reference_index"] == 1 and len(d["lights"]) == 3
    assert d["lights"][1]["transform"] == np.eye(3).tolist()
    tr = load_truth(root)
    ref = build_truth(SMALL)
    np.testing.assert_array_equal(tr.transforms(), ref.transforms())
    np.testing.assert_array_equal(tr.stars.xy, ref.stars.xy)
    assert tr.lights[0].file == "lights/light_0000.dng"
    with np.load(root / "truth.npz") as z:
        np.testing.assert_array_equal(z["stars_flux"], ref.stars.flux)
    # a re-run with fewer lights replaces the session, leaving no stale frame
    simulate(dataclasses.replace(SMALL, n_lights=2), root)
    assert sorted(p.name for p in (root / "lights").iterdir()) == ["light_0000.dng", "light_0001.dng"]
    # tampered arrays are detected
    cfg_other = dataclasses.replace(SMALL, n_lights=2, seed=99)
    (root / "truth.npz").write_bytes((simulate(cfg_other, tmp_path / "o").parent / "truth.npz").read_bytes())
    with pytest.raises(SkystackError, match="regenerate"):
        load_truth(root)


def test_refuses_foreign_folder_and_bad_config(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(OutputError, match="not empty"):
        simulate(SMALL, tmp_path / "photos")
    for bad in ({"width": 101}, {"pattern": "RGBX"}, {"file_format": "tiff"}, {"moffat_beta": 1.5},
                {"reference_index": 5}, {"seed": -1}, {"interval_s": 5.0}):
        with pytest.raises(SkystackError):
            build_truth(dataclasses.replace(SMALL, **bad))


def test_cli_synth_writes_session(tmp_path):
    from skystack.cli import main

    out = tmp_path / "cli"
    rc = main(["synth", str(out), "--size", "128x96", "--lights", "2", "--bias", "1", "--darks", "1",
               "--flats", "1", "--dark-flats", "1", "--format", "fits", "--exposure", "10", "-q"])
    assert rc == 0
    tr = load_truth(out)
    assert tr.config.file_format == "fits" and tr.config.exposure_s == 10.0
    assert len(list((out / "lights").glob("*.fits"))) == 2
