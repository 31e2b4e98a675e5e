"""Background extraction against the simulator's truth: a 20 % gradient goes, star fluxes stay.

The test image is the simulator's noise-free sky in the reference grid
(uniform sky + light-pollution gradient + stars) with the noise of a
16-frame stack, in the stack's normalised units. The simulator's gradient
(``gradient=0.2``, default light-pollution colour) adds 20 % of the green sky
level from one side of the field to the other (31 % in red, 19 % in blue).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from skystack.engine.background import (
    BackgroundConfig,
    apply_background,
    extract_background,
    fit_background,
    _box_edges,
    _box_stride,
    box_stats,
    coarse_background,
    object_mask,
)
from skystack.engine.errors import SkystackError
from skystack.engine.robust import sigma_clipped_rows, sigma_clipped_stats
from skystack.kernels.emulate import emulator_available
from skystack.tools.synth import SynthConfig, build_truth

from aperture import aperture_sums

UNIT = 1.0 / 14335.0  # ADU -> normalised units of a 14-bit stack (white - black)


@pytest.fixture(scope="module")
def field():
    cfg = SynthConfig(seed=3, width=800, height=600, n_lights=1, gradient=0.2, exposure_s=20.0,
                      star_density=3000, star_flux_index=0.6)
    truth = build_truth(cfg)
    full = truth.sky(None, stars=True, background=True, gradient=True)
    stars = truth.sky(None, stars=True, background=False, gradient=False)
    rng = np.random.default_rng(1)
    gain, read, n = cfg.gain_e_per_adu, cfg.read_noise_e, 16
    sigma = np.sqrt(full * gain + read ** 2) / gain / np.sqrt(n)
    img = ((full + sigma * rng.standard_normal(full.shape)) * UNIT).astype(np.float32)
    sky_mask = ~ndimage.binary_dilation((stars > 0.5 * sigma.min()).any(axis=0), iterations=3)
    return {"truth": truth, "cfg": cfg, "img": img, "stars": stars, "bg": full - stars, "sky": sky_mask}


def _large_scale_residual(img: np.ndarray, stars: np.ndarray, sky: np.ndarray, block: int = 32) -> np.ndarray:
    """Per channel: peak-to-peak of the star-free background's 32-px block medians / its median level."""
    out = []
    for c in range(img.shape[0]):
        a = np.where(sky, img[c] / UNIT - stars[c], np.nan).astype(np.float64)
        h, w = a.shape
        blk = a[: h // block * block, : w // block * block].reshape(h // block, block, w // block, block)
        blk = blk.transpose(0, 2, 1, 3).reshape(h // block, w // block, -1)
        med = np.nanmedian(blk, axis=2)
        level = np.nanmedian(med)
        out.append((np.nanmax(med) - np.nanmin(med)) / level)
    return np.array(out)


def test_gradient_is_20_percent(field):
    bg = field["bg"]
    g = bg[1]
    assert (g.max() - g.min()) / g.min() == pytest.approx(0.20, abs=1e-6)
    before = _large_scale_residual(field["img"], field["stars"], field["sky"])
    # the metric sees it (measured 25.5 / 17.0 / 16.0 % R/G/B: the blocks average
    # the outermost 16 px and the level is the median, not the minimum)
    assert before[1] > 0.15
    assert before.min() > 0.15


@pytest.mark.parametrize("cfg", [BackgroundConfig(), BackgroundConfig(degree=4),
                                 BackgroundConfig(model="rbf")], ids=["poly3-default", "poly4", "rbf"])
def test_gradient_removed_below_1_percent(field, cfg):
    out, model = extract_background(field["img"], cfg)
    res = _large_scale_residual(out, field["stars"], field["sky"])
    # measured peak-to-peak: poly3 0.39/0.31/0.51 %, poly4 0.40/0.29/0.52 %, rbf 0.40/0.32/0.58 %
    # (R/G/B; about 0.3 % of it is the noise of the 32-px block medians themselves)
    assert res.max() < 0.01, res
    # the level kept is the model's median, close to the true sky at the median of the ramp
    truth_med = np.median(field["bg"].reshape(3, -1), axis=1)
    assert np.allclose(model.pedestal / UNIT, truth_med, rtol=0.01)
    assert model.used.sum() > 0.6 * model.used.size


def test_degree_1_cannot_follow_the_curved_ramp(field):
    # the simulator's ramp is (distance)^1.5: a plane leaves a few per cent (measured 4.9 / 3.3 / 3.1 %)
    out, _ = extract_background(field["img"], BackgroundConfig(degree=1))
    assert _large_scale_residual(out, field["stars"], field["sky"]).max() > 0.02


#: The apertures of these tests: radius 9 px, sky annulus 14-22 px.
_APERTURE = {"r": 9.0, "r_in": 14.0, "r_out": 22.0, "half": 25}


def _bright_isolated(truth, h: int, w: int, fmin: float) -> np.ndarray:
    xy, f = truth.stars.xy, truth.stars.flux
    tree = cKDTree(xy)
    inside = (xy[:, 0] > 30) & (xy[:, 0] < w - 31) & (xy[:, 1] > 30) & (xy[:, 1] < h - 31) & (f[:, 1] > fmin)
    keep = [i for i in np.flatnonzero(inside)
            if all(f[j, 1] < 0.01 * f[i, 1] for j in tree.query_ball_point(xy[i], 25) if j != i)]
    return np.array(keep, dtype=int)


def test_star_fluxes_unchanged(field):
    img, stars = field["img"], field["stars"]
    out, model = extract_background(img, BackgroundConfig())
    sel = _bright_isolated(field["truth"], *img.shape[1:], fmin=1e5)
    assert len(sel) >= 5
    xy = field["truth"].stars.xy[sel]
    # local-sky photometry before vs after: measured max 0.16 %
    before, after = aperture_sums(img, xy, **_APERTURE), aperture_sums(out, xy, **_APERTURE)
    assert np.abs(after / before - 1).max() < 0.01
    # absolute: the flat sky the output keeps (the pedestal) removed, the aperture
    # holds the truth star light to within the model's error under the star
    # (measured max 0.24 %)
    absolute = aperture_sums(out - model.pedestal[:, None, None].astype(np.float32), xy, **_APERTURE,
                             annulus=False) / UNIT
    truth_flux = aperture_sums(stars, xy, **_APERTURE, annulus=False)
    assert np.abs(absolute / truth_flux - 1).max() < 0.01


def test_divide_removes_vignetting(field):
    """A multiplicative fall-off (vignetting the flats missed) is divided out, stars scaled back."""
    truth = field["truth"]
    h, w = truth.shape
    yy, xx = np.mgrid[0:h, 0:w]
    rho2 = ((xx - w / 2) ** 2 + (yy - h / 2) ** 2) / ((w / 2) ** 2 + (h / 2) ** 2)
    vig = (1.0 - 0.15 * rho2).astype(np.float32)  # 15 % darker in the corners
    sky = truth.sky(None, stars=True, background=True, gradient=False)
    stars = field["stars"]
    rng = np.random.default_rng(4)
    img = ((sky * vig + 8.0 * rng.standard_normal(sky.shape)) * UNIT).astype(np.float32)
    out, model = extract_background(img, BackgroundConfig(mode="divide", degree=2))
    sky_mask = field["sky"]
    res = _large_scale_residual(out, stars * (model.pedestal[:, None, None] / model.model), sky_mask)
    assert res.max() < 0.01, res
    before = _large_scale_residual(img, stars * vig, sky_mask)
    assert before.min() > 0.05
    # a corner star gets its flux back (relative to the centre level)
    sel = _bright_isolated(truth, h, w, fmin=5e4)
    xy = truth.stars.xy[sel]
    ratio = aperture_sums(out, xy, **_APERTURE) / UNIT / aperture_sums(stars, xy, **_APERTURE, annulus=False)
    flat_level = model.pedestal[1] / UNIT / np.median(sky[1])
    assert np.allclose(ratio[:, 1] / flat_level, 1.0, atol=0.02)


def test_extended_object_is_not_fitted():
    """A big faint 'galaxy' (r ~ 60 px) is rejected from the sky boxes and survives extraction."""
    rng = np.random.default_rng(7)
    h, w = 480, 640
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    sky = 0.05 + 0.01 * (xx / w) + 0.004 * (yy / h) ** 2
    blob = 0.004 * np.exp(-(((xx - 420) ** 2 + (yy - 200) ** 2) / (2 * 40.0 ** 2)))
    img = np.stack([sky + blob] * 3) + 0.0008 * rng.standard_normal((3, h, w))
    out, model = extract_background(img.astype(np.float32), BackgroundConfig(degree=2))
    # the blob's peak is kept (measured loss ~1 %), the sky is flat (0.05 + 0.007 - pedestal ~ 0)
    peak = out[1, 190:211, 410:431].mean() - model.pedestal[1]
    assert peak == pytest.approx(blob[190:211, 410:431].mean(), rel=0.05)
    far = out[1][(np.hypot(xx - 420, yy - 200) > 160)]
    assert abs(np.median(far) - model.pedestal[1]) < 5e-5
    # boxes on the blob were not used
    near = np.hypot(model.box_xy[:, 0] - 420, model.box_xy[:, 1] - 200) < 40
    assert not model.used[near].any()


def test_object_mask_finds_stars_and_nan(field):
    img = field["img"].copy()
    img[:, :10, :] = np.nan
    mask, noise = object_mask(img)
    assert mask[:10].all()
    bright = field["stars"][1] > 100.0  # ADU: 10x the pixel noise of the stack
    bright[:10] = False
    assert mask[bright].mean() > 0.99
    assert mask[10:].mean() < 0.6  # a dense field, but most of it is sky
    assert noise > 0


def test_sigma_clipped_stats_matches_gaussian(rng):
    v = rng.normal(5.0, 2.0, 200_000)
    v[:2000] = 1e3  # 1 % outliers
    med, sig, n = sigma_clipped_stats(v)
    assert med == pytest.approx(5.0, abs=0.02)
    assert sig == pytest.approx(2.0, rel=0.03)
    assert n < v.size - 2000
    assert sigma_clipped_stats(np.full(10, np.nan))[2] == 0


def _clipped_loop(values, kappa=2.5, iters=5):
    """The per-array loop the vectorised statistics replaced (the reference: np.median on float32)."""
    v = np.asarray(values, dtype=np.float32).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), 0
    med = float(np.median(v))
    sig = 1.4826 * float(np.median(np.abs(v - med)))
    for _ in range(iters):
        if not sig > 0:
            break
        keep = np.abs(v - med) <= kappa * sig
        if keep.all():
            break
        v = v[keep]
        med = float(np.median(v))
        sig = 1.4826 * float(np.median(np.abs(v - med)))
    return med, sig, int(v.size)


def test_sigma_clipped_rows_equal_the_loop(rng):
    """Every row (odd/even sizes, ties, outliers, heavy tails, NaN, inf, empty) as the loop, bit for bit."""
    rows = np.full((400, 301), np.nan, np.float32)
    for r in range(rows.shape[0]):
        n = int(rng.integers(0, 302))
        kind = r % 4
        v = (rng.normal(0.1, 0.01, n) if kind == 0 else rng.integers(0, 5, n).astype(float) if kind == 1
             else rng.standard_cauchy(n) * 1e-3 + 0.05 if kind == 2
             else np.where(rng.random(n) < 0.1, 0.5, rng.normal(0.1, 0.01, n)))
        v[rng.random(n) < 0.05] = np.inf
        rows[r, rng.permutation(301)[:n]] = v
    for kappa in (1.5, 2.5):
        med, sig, n = sigma_clipped_rows(rows, kappa=kappa, chunk=3000)  # several chunks
        ref = np.array([_clipped_loop(r, kappa) for r in rows])
        np.testing.assert_array_equal(med, ref[:, 0])
        np.testing.assert_array_equal(sig, ref[:, 1])
        np.testing.assert_array_equal(n, ref[:, 2])
        assert (n < np.isfinite(rows).sum(axis=1)).sum() > 100  # clipping happened


def test_sigma_clipped_stats_of_one_row_equal_the_loop(rng):
    """One row (its own path: counts over the deviations, not searches over rows) as the loop, bit for bit:
    sizes from none to 100k, ties, outliers, heavy tails, NaN, inf, and a clip that stops on sigma 0."""
    cases = [np.full(5, np.nan), np.array([2.0]), np.array([1.0, 3.0]), np.array([1.0, 1.0, 1.0, 9.0]),
             np.r_[np.full(50, 0.25), 0.26, 7.0]]
    for n in (3, 10, 301, 4000, 100_001):
        cases += [rng.normal(0.1, 0.01, n), rng.integers(0, 5, n).astype(float),
                  rng.standard_cauchy(n) * 1e-3 + 0.05, np.where(rng.random(n) < 0.1, 0.5, rng.normal(0.1, 0.01, n))]
    for v in cases[5:]:
        v[rng.random(v.size) < 0.03] = np.inf
        v[rng.random(v.size) < 0.03] = np.nan
    clipped = 0
    for v in cases:
        for kappa, iters in ((1.5, 5), (2.5, 5), (3.0, 1)):
            got = sigma_clipped_stats(v, kappa=kappa, iters=iters)
            ref = _clipped_loop(v, kappa, iters)
            np.testing.assert_array_equal(got, ref)
            clipped += got[2] < np.isfinite(v).sum()
    assert clipped > 20


def test_box_statistics_equal_the_per_box_loop(field):
    """coarse_background and fit_background's box values equal the per-box loop on a masked, NaN-edged image
    (the loop reads every k-th row and column of a box, k from BOX_SAMPLE: 2 for these 50-px boxes)."""
    img = field["img"].copy()
    img[:, :40, :] = np.nan  # 80 % of the top row of 50-px boxes: those are skipped
    lum = img.mean(axis=0)
    bg, noise = coarse_background(lum, grid=24)
    ys, xs = _box_edges(*lum.shape, 24)
    k = _box_stride(ys, xs)
    assert k == 2
    ref = np.array([[_clipped_loop(lum[ys[j]:ys[j + 1]:k, xs[i]:xs[i + 1]:k]) for i in range(xs.size - 1)]
                    for j in range(ys.size - 1)])
    whole = np.array([[_clipped_loop(lum[ys[j]:ys[j + 1], xs[i]:xs[i + 1]])[0] for i in range(xs.size - 1)]
                      for j in range(ys.size - 1)])  # every pixel: the sample's medians scatter about it by noise
    dev = (ref[..., 0] - whole) / ref[..., 1]
    # pure noise: 1.25 sqrt(1/625 - 1/2500) = 0.043 sigma; this crowded field's stars add to it (0.072 measured)
    assert np.nanstd(dev) < 0.1 and np.nanmax(np.abs(dev)) < 0.4
    sig = np.where(ref[..., 2] >= 16, ref[..., 1], np.nan)
    assert noise == float(np.nanmedian(sig))
    for chunk in (1 << 22, 20_000):  # one band of boxes, or one row of boxes at a time
        np.testing.assert_array_equal(np.column_stack(box_stats(lum, ys, xs, chunk=chunk)), ref.reshape(-1, 3))
    cfg = BackgroundConfig(grid=16)
    mask, _ = object_mask(img, grid=cfg.grid)
    model = fit_background(img, cfg, mask=mask)
    ys, xs = _box_edges(*lum.shape, cfg.grid)
    k = _box_stride(ys, xs)
    want = np.full(model.box_values.shape, np.nan)
    for j in range(ys.size - 1):
        for i in range(xs.size - 1):
            good = ~mask[ys[j]:ys[j + 1], xs[i]:xs[i + 1]]
            if good.sum() >= max(16, cfg.min_valid * good.size):  # usable by all its pixels; measured on the sample
                want[j * (xs.size - 1) + i] = [_clipped_loop(c[ys[j]:ys[j + 1]:k, xs[i]:xs[i + 1]:k][good[::k, ::k]])[0]
                                               for c in img]
    np.testing.assert_array_equal(model.box_values, want)
    assert np.isnan(want[:, 0]).sum() >= xs.size - 1  # the NaN rows' boxes were skipped


def test_fit_background_temporaries_stay_below_three_images():
    """The box statistics gather the boxes band by band: the fit's peak allocation (tracemalloc) is
    2.5 images (the model and the object mask's steps); before (per-box loop, float64 model sums) 8.2."""
    import tracemalloc

    img = (0.1 + 0.01 * np.random.default_rng(4).standard_normal((3, 400, 600))).astype(np.float32)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fit_background(img)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * img.nbytes, peak / img.nbytes


def test_apply_background_modes():
    img = np.full((3, 20, 30), 2.0, np.float32)
    bg = fit_background(img + np.linspace(0, 1, 30, dtype=np.float32)[None, None, :],
                        BackgroundConfig(degree=1, grid=6))
    sub = apply_background(img, bg, "subtract")
    div = apply_background(img, bg, "divide")
    assert sub.shape == div.shape == img.shape
    with pytest.raises(SkystackError, match="subtract"):
        apply_background(img, bg, "bogus")


@pytest.mark.parametrize("kw", [{"model": "spline"}, {"mode": "add"}, {"degree": 5}, {"degree": 0},
                                {"grid": 2}])
def test_bad_config(kw):
    with pytest.raises(SkystackError):
        BackgroundConfig(**kw)


def test_too_few_sky_boxes_is_a_clear_error():
    img = np.full((3, 64, 64), np.nan, np.float32)
    img[:, :8, :8] = 1.0
    with pytest.raises(SkystackError, match="sky boxes"):
        fit_background(img, BackgroundConfig(grid=8))


def test_nanmedian_last_gives_numpys_bits():
    """The vectorised median equals np.nanmedian bit for bit: odd and even counts, NaNs, all-NaN rows."""
    import warnings

    from skystack.engine.robust import nanmedian_last

    rng = np.random.default_rng(3)
    for dtype in (np.float32, np.float64):
        a = rng.normal(100, 10, (4, 7, 1001)).astype(dtype)
        a[0, :3] = np.nan  # all-NaN rows
        a[1, 2, ::3] = np.nan  # an even count left
        a[2, :, :500] = np.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ref = np.nanmedian(a, axis=-1)
        got = nanmedian_last(a)
        assert got.dtype == ref.dtype
        np.testing.assert_array_equal(got, ref)


def _clipped_median_mad_sigma_rounds(v):
    """clipped_median_mad_sigma as rounds of np.median: the last round's median and MAD-sigma."""
    from skystack.engine.robust import MAD_TO_SIGMA

    med = float(np.median(v))
    sig = MAD_TO_SIGMA * float(np.median(np.abs(v - med)))
    for _ in range(2):
        if sig <= 0:
            break
        keep = np.abs(v - med) <= 3.0 * sig
        if int(keep.sum()) < 16:
            break
        v = v[keep]
        med = float(np.median(v))
        sig = MAD_TO_SIGMA * float(np.median(np.abs(v - med)))
    return med, sig


def test_clipped_mad_sigma_from_one_sort_gives_the_rounds_of_medians():
    """The host sorts once and reads each round's median and MAD off the sorted values: the same number
    as the rounds of np.median, for odd and even counts, ties, a zero MAD, outliers and heavy tails."""
    from skystack.engine.robust import clipped_median_mad_sigma

    rng = np.random.default_rng(5)
    for trial in range(600):
        n = int(rng.integers(2, 300)) if trial % 4 else int(rng.integers(300, 20000))
        v = [rng.normal(100, 5, n), np.round(rng.normal(100, 5, n)),
             np.concatenate([rng.normal(0, 1, n), rng.normal(50, 1, 1 + n // 10)]),
             rng.integers(0, 3, n).astype(float), rng.standard_cauchy(n)][trial % 5]
        v = v.astype(np.float32 if trial % 2 else np.float64)
        assert clipped_median_mad_sigma(np, v) == _clipped_median_mad_sigma_rounds(v), (trial, n, v.dtype)


@pytest.mark.skipif(not emulator_available(), reason="g++ is not on PATH")
def test_clipped_mad_sigma_rows_kernel_gives_the_rounds_of_medians():
    """``clipped_mad_sigma_rows`` (kernels/framestats.cu, a thread a row) gives, under the emulator,
    the rounds of np.median of each row's finite values (the last median and MAD-sigma), and so does its host twin: odd and even
    counts, ties, a zero MAD, fewer than 16 kept, heavy tails, NaN and inf among the values, rows
    with one value or none."""
    from skystack.engine.robust import clipped_median_sigma_rows
    from skystack.kernels.emulate import emulated

    rng = np.random.default_rng(11)
    mod = emulated("framestats.cu")
    for trial in range(40):
        n = int(rng.integers(1, 300)) if trial % 4 else int(rng.integers(300, 5000))
        rows = [rng.normal(100, 5, n), np.round(rng.normal(100, 5, n)), rng.integers(0, 3, n).astype(float),
                np.concatenate([rng.normal(0, 1, n - n // 3), rng.normal(50, 1, n // 3)]),
                rng.standard_cauchy(n), np.full(n, 7.0), rng.normal(0, 1, n)]
        v = np.array(rows, dtype=np.float32)
        v[6, rng.random(n) < 0.3] = rng.choice([np.nan, np.inf, -np.inf])
        v[5, : max(0, n - 1)] = np.nan  # one value left (or none)
        if trial % 7 == 0:
            v[4] = np.nan  # no finite value: NaN
        ref = np.array([_clipped_median_mad_sigma_rounds(r[np.isfinite(r)]) if np.isfinite(r).any()
                        else (np.nan, np.nan) for r in v]).T
        out = np.full((2, len(v)), -1.0)
        mod.launch("clipped_mad_sigma_rows", len(v), (v, np.empty((len(v), 2 * n), np.float32), out[0], out[1],
                                                      np.int64(len(v)), np.int64(n), np.int32(2), np.int64(1)))
        np.testing.assert_array_equal(out, ref, err_msg=f"trial {trial}, n {n}")
        np.testing.assert_array_equal(np.array(clipped_median_sigma_rows(v)), ref)


@pytest.mark.parametrize("size,shape", [(3, (17, 40)), (7, (200, 300)), (7, (5, 9)), (5, (64, 1))])
def test_moving_median_equals_scipys_median_filter(rng, size, shape):
    """The band-wise moving median selects exactly what SciPy's median filter (edges replicated) does."""
    from scipy.ndimage import median_filter

    from skystack.engine.robust import moving_median

    img = rng.normal(size=shape).astype(np.float32)
    img[::3, ::2] = 0.5  # ties
    assert np.array_equal(moving_median(img, size), median_filter(img, size=size, mode="nearest"))
    with pytest.raises(ValueError):
        moving_median(img, 4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_median_gives_numpys_median(rng, dtype):
    """``robust.median`` (one partition) is ``float(np.median(v))``, bit for bit: odd and even sizes
    (the mean of the two middle values in the array's type), ties, NaN anywhere, tiny arrays."""
    from skystack.engine.robust import median

    cases = [rng.normal(0.05, 0.01, n).astype(dtype) for n in (1, 2, 3, 4, 1001, 240_000, 240_001)]
    cases.append(np.round(rng.normal(0, 3, 10_000)).astype(dtype))  # many ties
    cases.append(np.array([np.float32(0.1), np.float32(0.3)], dtype=dtype))  # a mean that rounds
    for v in cases:
        got, want = median(v), float(np.median(v))
        assert np.array_equal(np.float64(got), np.float64(want)), (v.size, got, want)
        w = v.copy()
        w[rng.integers(0, v.size)] = np.nan
        assert np.isnan(median(w)) and np.isnan(np.median(w))
    v = rng.normal(size=(30, 41)).astype(dtype)  # not flat
    assert median(v) == float(np.median(v))
    big = rng.normal(size=50_001).astype(dtype)
    big[:30_000] = np.nan  # more than half NaN
    assert np.isnan(median(big))
