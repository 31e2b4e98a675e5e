"""Stacking engine acceptance, measured against the simulator's truth.

One synthetic night (14 lights with a satellite and an aircraft trail, a
cloudy and a wind-shaken frame, hot pixels, vignetting, a gradient) is
calibrated and registered once; the registered store is then combined with
every rejection method.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from skystack.engine.session import discover_session
from skystack.engine.stack import StackConfig, combine_registered, register_session, stack_session
from skystack.tools.synth import SynthConfig, load_truth, simulate

REJECTING = ("sigma", "winsorized", "linear", "percentile", "minmax", "median")


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    root = tmp_path_factory.mktemp("night")
    cfg = SynthConfig(seed=7, width=640, height=480, n_lights=14, n_bias=5, n_darks=5, n_flats=5,
                      n_dark_flats=0, exposure_s=20.0, sky_adu_s=(13.0, 15.0, 11.0))
    simulate(cfg, root)
    return root, load_truth(root / "truth.json")


@pytest.fixture(scope="module")
def registered(night, tmp_path_factory):
    root, truth = night
    ref_file = truth.file_path("light", truth.reference_index)
    cfg = StackConfig(quiet=True, reference=str(ref_file),
                      cache_dir=str(tmp_path_factory.mktemp("cache")))
    reg = register_session(discover_session(root), cfg)
    yield reg
    reg.close()


@pytest.fixture(scope="module")
def masks(night, registered):
    """Truth masks in the reference grid: stars, trails, hot pixels; and the evaluation area."""
    _root, truth = night
    h, w = truth.shape
    stars = truth.sky(None, stars=True, background=False, gradient=False, trail=False)
    # ~0.2 sigma of the stack's noise in ADU: anything brighter is "star".
    star = ndimage.binary_dilation((stars > 2.0).any(axis=0), iterations=2)
    trail = np.zeros((h, w), bool)
    for lt in truth.lights:
        if lt.trail is None or not registered.records[lt.index].transform:
            continue
        t_img = truth.sky(lt.index, stars=False, background=False, gradient=False, trail=True).sum(axis=0)
        ys, xs = np.nonzero(t_img > 0.6 * t_img.max())  # the trail's core
        p = lt.transform @ np.vstack([xs, ys, np.ones_like(xs)])
        xr, yr = np.rint(p[0]).astype(int), np.rint(p[1]).astype(int)
        ok = (xr >= 0) & (xr < w) & (yr >= 0) & (yr < h)
        trail[yr[ok], xr[ok]] = True
    hot = np.zeros((h, w), bool)
    hot[truth.hot_pixels[:, 0], truth.hot_pixels[:, 1]] = True  # reference light: identity
    inner = np.zeros((h, w), bool)
    inner[24:-24, 24:-24] = True
    return {"star": star, "trail": trail & ~star, "hot": hot & ~star & ~trail, "inner": inner}


def _residual(img: np.ndarray) -> np.ndarray:
    """Image minus its 15-px median (removes gradient and sky, keeps noise and thin features)."""
    return np.stack([c - ndimage.median_filter(np.nan_to_num(c), size=15) for c in img])


def _sigma(res: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-channel RMS of ``res`` over ``mask``, 5-sigma clipped (3 rounds).

    An RMS, not a MAD: debayered noise is not stationary over the 2x2 grid
    (native and interpolated pixels differ), and a MAD under-reads the RMS of
    such a mixture in an unwarped frame but not in the warped stack.
    """
    out = []
    for v in res[:, mask]:
        v = v[np.isfinite(v)].astype(np.float64)
        for _ in range(3):
            m, s = v.mean(), v.std()
            v = v[np.abs(v - m) < 5 * s]
        out.append(v.std())
    return np.asarray(out)


@pytest.fixture(scope="module")
def stacks(registered):
    out = {}
    for method in ("mean", *REJECTING):
        out[method] = combine_registered(registered, StackConfig(rejection=method))
    return out


def test_frames_used_and_skipped_with_reasons(night, registered):
    _root, truth = night
    cloudy = [lt.index for lt in truth.lights if lt.cloudy]
    assert cloudy
    for i in cloudy:
        assert not registered.records[i].transform and "stars" in registered.records[i].reason
    assert len(registered.used) == len(truth.lights) - len(cloudy)


@pytest.mark.parametrize("method,factor", [("mean", 0.95), ("sigma", 0.9), ("winsorized", 0.9)])
def test_noise_gain(registered, stacks, masks, method, factor):
    n = len(registered.used)
    area = masks["inner"] & ~masks["star"] & ~masks["trail"] & ~masks["hot"]
    single = _sigma(_residual(registered.frame(registered.ref)), area)
    stacked = _sigma(_residual(stacks[method].image), area)
    gain = single / stacked
    assert np.all(gain >= factor * math.sqrt(n)), (gain, math.sqrt(n))


@pytest.mark.parametrize("method", REJECTING)
def test_trails_and_hot_pixels_rejected(stacks, masks, method):
    res = _residual(stacks[method].image)
    area = masks["inner"] & ~masks["star"] & ~masks["trail"]
    sigma = _sigma(res, area)
    for name in ("trail", "hot"):
        m = masks[name] & masks["inner"]
        assert m.sum() > 20
        dev = np.abs(np.nanmean(res[:, m], axis=1))
        assert np.all(dev < sigma), (name, dev / sigma)


def test_plain_mean_keeps_the_trail(stacks, masks):
    res = _residual(stacks["mean"].image)
    area = masks["inner"] & ~masks["star"] & ~masks["trail"]
    sigma = _sigma(res, area)
    dev = np.nanmean(res[:, masks["trail"] & masks["inner"]], axis=1)
    assert np.all(dev > sigma), dev / sigma  # the bound the rejecting methods stay under


@pytest.fixture(scope="module")
def model(night, registered):
    """Noise-free truth of the stack: each used light rendered exactly as in its file
    (its own PSF, trailing, shake and transparency; stars only), resampled into the
    reference grid by scipy's cubic spline (an interpolator independent of ours), averaged."""
    _root, truth = night
    h, w = truth.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    ref_pts = np.vstack([xx.ravel(), yy.ravel(), np.ones(h * w)])
    acc = np.zeros((3, h, w))
    for i in registered.used:
        img = truth.sky(i, stars=True, background=False, gradient=False, trail=False)
        q = truth.sensor_from_reference(i) @ ref_pts
        coords = [q[1].reshape(h, w), q[0].reshape(h, w)]
        for c in range(3):
            acc[c] += ndimage.map_coordinates(img[c], coords, order=3, mode="constant", cval=0.0)
    return (acc / len(registered.used)).astype(np.float32)


def _photometry(img: np.ndarray, x: float, y: float, r: float) -> float:
    """Aperture sum minus the median of an annulus, summed over channels."""
    yy, xx = np.mgrid[0:img.shape[-2], 0:img.shape[-1]]
    d = np.hypot(xx - x, yy - y)
    total = 0.0
    for c in np.atleast_3d(img.T).T if img.ndim == 3 else [img]:
        bg = np.nanmedian(c[(d > r + 3) & (d < r + 9)])
        total += float(np.nansum(c[d <= r] - bg))
    return total


def _aperture_noise(img: np.ndarray, masks, r: float = 9.0, n: int = 200) -> float:
    """Std of the aperture photometry of star-free places: the real photometric noise
    (debayering and warping correlate neighbouring pixels, so it exceeds sigma * sqrt(area))."""
    free = masks["inner"] & ~ndimage.binary_dilation(masks["star"] | masks["trail"], iterations=12)
    ys, xs = np.nonzero(free[30:-30, 30:-30])
    pick = np.random.default_rng(0).choice(len(ys), n, replace=False)
    return float(np.std([_photometry(img, xs[j] + 30, ys[j] + 30, r) for j in pick]))


def _measurable_stars(truth, masks, model, ap_noise: float, r: float = 9.0, snr: float = 150.0):
    """Unsaturated stars off the trails whose stack flux is measurable to 1/snr.

    Neighbours need not be avoided: the model holds them too, and both images
    are measured with the same aperture and annulus. Saturated ones must: the
    model's clipped core is not the stack's, so a star with one inside its
    annulus (star 954 of this night: a 2.8e6 ADU neighbour 10 px away) is
    measured in the neighbour's wings.
    """
    h, w = truth.shape
    xy = truth.stars.xy
    flux = truth.stars.flux.sum(axis=1)
    cfg = truth.config
    headroom = 0.5 * (cfg.white_level - max(cfg.black_level)) - 2 * max(cfg.sky_adu_s) * cfg.exposure_s
    peaks = truth.sky(None, stars=True, background=False, gradient=False, trail=False).max(axis=0)
    near_trail = ndimage.binary_dilation(masks["trail"], iterations=int(r) + 9)
    picked = []
    for k in np.argsort(-flux):
        x, y = xy[k]
        if not (30 < x < w - 30 and 30 < y < h - 30):
            continue
        xi, yi = int(round(x)), int(round(y))
        if peaks[yi - 2:yi + 3, xi - 2:xi + 3].max() > headroom or near_trail[yi, xi]:
            continue
        ro = int(r) + 10  # the annulus' outer radius, plus a pixel
        if peaks[max(0, yi - ro):yi + ro + 1, max(0, xi - ro):xi + ro + 1].max() > headroom:
            continue
        if _photometry(model, x, y, r) > snr * ap_noise:
            picked.append(k)
    return picked


@pytest.mark.parametrize("method", ["sigma", "winsorized"])
def test_star_fluxes_within_2_percent(night, stacks, masks, model, method):
    _root, truth = night
    # The stack is in normalised units, the model in ADU: one scale per channel,
    # fitted on the model's star pixels.
    img = stacks[method].image
    scale = np.array([np.nansum(img[c] * model[c]) / np.sum(model[c] ** 2) for c in range(3)])
    img = img / scale[:, None, None]
    idx = _measurable_stars(truth, masks, model, _aperture_noise(img, masks))
    assert len(idx) >= 5, len(idx)
    xy = truth.stars.xy
    got = np.array([_photometry(img, *xy[k], 9.0) for k in idx])
    want = np.array([_photometry(model, *xy[k], 9.0) for k in idx])
    ratio = got / want
    # 2.5 %: RCD (the default debayer) is not linear in a sharp star's flux (0.5-1.9 % gained
    # at 1.8-4 px FWHM, with the star's colour and pixel phase); measured 2.0 % at most here
    assert np.max(np.abs(ratio / np.median(ratio) - 1)) < 0.025, ratio / np.median(ratio)
    # Rejection takes no systematic share of star light (clipped cores): against the
    # unclipped mean, the typical star keeps its flux within 2 % (measured: ~1 % loss).
    # Single stars may differ more where the mean itself holds a rejected artefact.
    mean = stacks["mean"].image / scale[:, None, None]
    ratio_mean = np.array([_photometry(mean, *xy[k], 9.0) for k in idx]) / want
    assert abs(np.median(ratio / ratio_mean) - 1) < 0.02


@pytest.mark.parametrize("method", ["sigma", "auto"])
def test_star_fwhm_matches_truth_psf(registered, stacks, model, method):
    # Measured: plain mean +8.7 %, std-based sigma clip +9.2 %, robust (MAD) sigma and the
    # default (GESD at 13 frames) +10.0 %: the 30 brightest stars saturate here, and any
    # rejection trims some of their flat tops (on the next 70 stars GESD equals the old clip).
    from skystack.engine.detect import detect_stars

    img = stacks[method].image if method in stacks else combine_registered(registered, StackConfig()).image
    expected = np.median(detect_stars(model[1]).fwhm[:30])
    got = np.median(detect_stars(img[1]).fwhm[:30])
    assert abs(got / expected - 1) < 0.11, (got, expected)


def test_rejected_fraction_reported(stacks, registered):
    res = stacks["sigma"]
    used = [f for f in res.frames if f.used]
    assert len(used) == len(registered.used)
    assert all(f.rejected_fraction is not None and 0 <= f.rejected_fraction < 0.2 for f in used)
    # The trail frames lose the most pixels to rejection.
    assert max(used, key=lambda f: f.rejected_fraction).rejected_fraction > 0


@pytest.mark.gpu
def test_gpu_stack_matches_cpu(night, stacks, tmp_path):
    """The whole pipeline on the GPU gives the CPU's image (kernels vs NumPy twins, end to end)."""
    root, truth = night
    cfg = StackConfig(quiet=True, backend="gpu", rejection="sigma",
                      reference=str(truth.file_path("light", truth.reference_index)), cache_dir=str(tmp_path))
    with register_session(discover_session(root), cfg) as reg:
        gpu = combine_registered(reg, cfg).image
    cpu = stacks["sigma"].image
    both = np.isfinite(gpu) & np.isfinite(cpu)
    assert both.mean() > 0.95
    scale = np.nanmax(np.abs(cpu))
    assert np.max(np.abs(gpu[both] - cpu[both])) < 1e-4 * scale


def test_telescope_session_has_no_landscape(tmp_path):
    """A rotating telescope field without darks has still structure at the sensor's bottom, but
    stars keep crossing it: the default ``--foreground auto`` must not stack it as ground.

    Before: "landscape below a horizon at rows 966-1200 (4 % of the frame), stacked
    unregistered"; the star density there is 78 % of the sky's with sep's detection, 73 % with
    skystack's (which reaches fainter stars on the clean sky than on the glowing strip): still
    nearly three times the 25 % below which it would be ground.
    """
    from skystack.engine.foreground import MAX_STARS_BELOW

    cfg = SynthConfig(seed=5, n_lights=6, n_bias=0, n_darks=0, n_flats=0, n_dark_flats=0, file_format="fits")
    simulate(cfg, tmp_path / "s")
    res = stack_session(discover_session(tmp_path / "s"), StackConfig(quiet=True, cache_dir=str(tmp_path / "c")))
    assert res.landscape is None
    msg = res.registration["foreground"]
    assert msg.startswith("auto: no landscape") and "stars, not ground" in msg
    seen = float(msg.split("shows ")[1].split(" %")[0]) / 100.0
    assert seen > 2.5 * MAX_STARS_BELOW


def test_statistics_are_measured_on_the_way_into_the_store(night, registered, tmp_path, monkeypatch):
    """Every used frame's normalisation statistics come with the registered store (no second pass
    over it), before a float16 spill cache rounds them, so its stack keeps float32's noise (rounding
    at 1/2048 of a value: far below a light's photon noise)."""
    from skystack.engine import memory, normalize

    assert set(registered.frame_stats) >= set(registered.used)
    root, truth = night
    base = combine_registered(registered, StackConfig(quiet=True))
    monkeypatch.setattr(memory, "DEFAULT_STORE_RAM", 1 << 20)  # spill
    cfg = StackConfig(quiet=True, reference=str(truth.file_path("light", truth.reference_index)),
                      cache_dir=str(tmp_path), store_dtype="float16")
    reads = []
    real = normalize.frame_measures
    with register_session(discover_session(root), cfg) as reg:
        assert reg.store.on_disk and reg.store.dtype == np.float16
        monkeypatch.setattr(normalize, "frame_measures", lambda *a: reads.append(1) or real(*a))
        half = combine_registered(reg, cfg)
    assert reads == []  # measured as the frames went in
    diff = (half.image - base.image)[:, 40:-40, 40:-40]
    sky = np.nanstd(base.image[:, 40:-40, 40:-40] - ndimage.median_filter(base.image[:, 40:-40, 40:-40], size=(1, 9, 9)))
    assert np.nanstd(diff) < 0.05 * sky, (np.nanstd(diff), sky)
