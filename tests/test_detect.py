"""Star detection and frame quality against planted stars (positions, FWHM, shapes, sky)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial import cKDTree
from scipy.special import erf

from skystack.engine.detect import (
    FLAG_SATURATED,
    DetectConfig,
    FrameQuality,
    StarList,
    choose_reference,
    detect_stars,
    detection_plane,
    measure_quality,
    select_frames,
)
from skystack.engine.errors import NotEnoughStars

H, W = 240, 320


def _gauss_stamp(xs, ys, x, y, fwhm):
    """Exactly pixel-integrated circular Gaussian (unit flux) on pixels xs x ys."""
    s = fwhm / (2 * math.sqrt(2 * math.log(2))) * math.sqrt(2)
    px = 0.5 * (erf((xs + 0.5 - x) / s) - erf((xs - 0.5 - x) / s))
    py = 0.5 * (erf((ys + 0.5 - y) / s) - erf((ys - 0.5 - y) / s))
    return np.outer(py, px)


def _general_stamp(xs, ys, x, y, fwhm, beta=None, ellip=0.0, theta=0.0, sub=5):
    """Supersampled (sub x sub per pixel) Moffat or elliptical Gaussian, unit flux.

    ``fwhm`` is the geometric mean of the major and minor FWHM; ``ellip = 1 - b/a``.
    """
    o = (np.arange(sub) + 0.5) / sub - 0.5
    gx = (xs[None, :, None, None] + o[None, None, None, :]) - x
    gy = (ys[:, None, None, None] + o[None, None, :, None]) - y
    c, s = math.cos(theta), math.sin(theta)
    # b/a = 1 - e with the geometric-mean FWHM kept: x' stretched, y' squeezed
    u = (c * gx + s * gy) * math.sqrt(1 - ellip)
    v = (-s * gx + c * gy) / math.sqrt(1 - ellip)
    r2 = u * u + v * v
    if beta is None:
        sig = fwhm / (2 * math.sqrt(2 * math.log(2)))
        prof = np.exp(-0.5 * r2 / sig ** 2)
    else:
        alpha = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
        prof = (1 + r2 / alpha ** 2) ** (-beta)
    img = prof.mean(axis=(2, 3))
    return img / img.sum()


def render(xy, flux, fwhm, *, shape=(H, W), beta=None, ellip=0.0, theta=0.0, sky=100.0, noise=2.0,
           rng=None, colour=None, pattern=None):
    """Star field in full-resolution pixels; with ``pattern`` a CFA mosaic of coloured stars."""
    h, w = shape
    chans = 3 if pattern else 1
    img = np.zeros((chans, h, w))
    r = int(math.ceil(3 * fwhm)) + 4
    for i, ((x, y), f) in enumerate(zip(xy, flux)):
        x0, y0 = int(round(x)), int(round(y))
        xs = np.arange(max(0, x0 - r), min(w, x0 + r + 1))
        ys = np.arange(max(0, y0 - r), min(h, y0 + r + 1))
        if beta is None and ellip == 0.0:
            st = _gauss_stamp(xs, ys, x, y, fwhm)
        else:
            st = _general_stamp(xs, ys, x, y, fwhm, beta, ellip, theta)
        for c in range(chans):
            k = 1.0 if colour is None else colour[i][c]
            img[c, ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1] += f * k * st
    if pattern:
        mos = np.zeros((h, w))
        idx = {"R": 0, "G": 1, "B": 2}
        for k, ch in enumerate(pattern):
            mos[k // 2::2, k % 2::2] = img[idx[ch], k // 2::2, k % 2::2]
        img = mos
    else:
        img = img[0]
    if rng is not None:
        img = img + rng.normal(0.0, noise, img.shape)
    return (img + sky).astype(np.float32)


def _field(rng, n=50, margin=12, shape=(H, W), flux=(3000, 20000), min_sep=14.0):
    """Random star positions at least ``min_sep`` apart (no blends) and fluxes."""
    h, w = shape
    pts: list[tuple[float, float]] = []
    while len(pts) < n:
        p = (rng.uniform(margin, w - margin), rng.uniform(margin, h - margin))
        if all((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 >= min_sep ** 2 for q in pts):
            pts.append(p)
    return np.array(pts), rng.uniform(*flux, n)


def _pair(stars: StarList, xy: np.ndarray, tol: float = 1.0):
    d, i = cKDTree(xy).query(stars.xy)
    m = d < tol
    return m, i[m], stars.xy[m] - xy[i[m]]


# --------------------------------------------------------------------------- detection_plane


def test_luminance_bins_cfa_tiles_and_averages_colour():
    a = np.arange(4 * 6, dtype=np.uint16).reshape(4, 6)
    lum = detection_plane(a, "GRBG")
    assert lum.dtype == np.float32 and lum.shape == (2, 3)
    assert lum[0, 0] == pytest.approx((0 + 1 + 6 + 7) / 4)
    assert lum[1, 2] == pytest.approx((16 + 17 + 22 + 23) / 4)
    rgb = np.stack([a, 2 * a, 3 * a]).astype(np.float32)
    np.testing.assert_allclose(detection_plane(rgb), 2 * a)
    mono = detection_plane(a)
    np.testing.assert_array_equal(mono, a.astype(np.float32))
    mono[0, 0] = -1  # a copy, never a view on the input
    assert a[0, 0] == 0


# --------------------------------------------------------------------------- positions and FWHM

@pytest.mark.parametrize("fwhm", [2.5, 4.0, 6.0])
def test_gaussian_stars_positions_and_fwhm(rng, fwhm):
    xy, flux = _field(rng, min_sep=max(14.0, 4 * fwhm))
    img = render(xy, flux, fwhm, rng=rng)
    st = detect_stars(img)
    m, idx, err = _pair(st, xy)
    assert m.sum() >= 0.95 * len(xy)  # every planted star found
    assert len(st) - m.sum() <= 1  # no spurious detections
    rms = float(np.sqrt(np.mean(np.sum(err ** 2, axis=1))))
    assert rms < 0.05, rms
    assert abs(np.median(st.fwhm) / fwhm - 1) < 0.10
    # the pixel response (1/12 px^2) is the only expected widening
    expected = 2 * math.sqrt(2 * math.log(2)) * math.sqrt((fwhm / 2.3548) ** 2 + 1 / 12)
    assert np.median(st.fwhm) == pytest.approx(expected, rel=0.04)


@pytest.mark.parametrize("beta", [2.5, 4.0])
def test_moffat_fwhm(rng, beta):
    xy, flux = _field(rng, n=30, min_sep=20)
    img = render(xy, flux, 4.0, beta=beta, rng=rng)
    st = detect_stars(img)
    m, _idx, err = _pair(st, xy)
    assert m.sum() >= 28
    assert abs(np.median(st.fwhm[m]) / 4.0 - 1) < 0.10, np.median(st.fwhm[m])
    assert float(np.sqrt(np.mean(np.sum(err ** 2, axis=1)))) < 0.05


def test_gaussian_psf_option(rng):
    xy, flux = _field(rng, n=30, min_sep=20)
    gauss = render(xy, flux, 4.0, rng=rng)
    st = detect_stars(gauss, config=DetectConfig(psf="gaussian"))
    m, _i, err = _pair(st, xy)
    assert m.sum() >= 29 and float(np.sqrt(np.mean(np.sum(err ** 2, axis=1)))) < 0.05
    assert np.median(st.fwhm) == pytest.approx(4.0, rel=0.05)
    # a Gaussian model reads Moffat wings as a wider core; the default Moffat fit does not
    moffat = render(xy, flux, 4.0, beta=2.5, rng=rng)
    g = np.median(detect_stars(moffat, config=DetectConfig(psf="gaussian")).fwhm)
    mo = np.median(detect_stars(moffat).fwhm)
    assert g > 1.05 * mo and abs(mo / 4.0 - 1) < 0.05
    with pytest.raises(ValueError):
        DetectConfig(psf="airy")



def test_moments_alone_and_the_psf_sample(rng):
    """Windowed moments give a Gaussian star's FWHM; the PSF fit on a sample fixes Moffat wings."""
    xy, flux = _field(rng, n=30, min_sep=20)
    gauss = render(xy, flux, 4.0, rng=rng)
    st = detect_stars(gauss, config=DetectConfig(psf_sample=0))
    m, _i, err = _pair(st, xy)
    assert m.sum() >= 29 and float(np.sqrt(np.mean(np.sum(err ** 2, axis=1)))) < 0.05
    expected = 2 * math.sqrt(2 * math.log(2)) * math.sqrt((4.0 / 2.3548) ** 2 + 1 / 12)
    assert np.median(st.fwhm) == pytest.approx(expected, rel=0.03)
    moffat = render(xy, flux, 4.0, beta=2.5, rng=rng)
    moments = np.median(detect_stars(moffat, config=DetectConfig(psf_sample=0)).fwhm)
    sampled = detect_stars(moffat, config=DetectConfig(psf_sample=10))
    assert moments > 1.05 * 4.0  # the wings widen the moments
    assert np.median(sampled.fwhm) == pytest.approx(4.0, rel=0.06)
    with pytest.raises(ValueError):
        DetectConfig(psf_sample=-1)

def test_cfa_coloured_stars_have_no_colour_bias(rng):
    """CFA detection reports full-resolution positions; star colour must not shift them."""
    xy, flux = _field(rng, n=40)
    colour = np.column_stack([rng.uniform(0.2, 2.0, 40), np.ones(40), rng.uniform(0.2, 2.0, 40)])
    img = render(xy, flux, 3.0, rng=rng, colour=colour, pattern="GRBG", noise=3.0)
    img[0::2, 1::2] += 40.0  # red sky brighter than green: per-site sky
    st = detect_stars(img, pattern="GRBG")
    assert st.binning == 2
    m, idx, err = _pair(st, xy)
    assert m.sum() >= 38
    rms = float(np.sqrt(np.mean(np.sum(err ** 2, axis=1))))
    assert rms < 0.05, rms
    # a red star seen through the binned mosaic would move by up to 0.5 px; the
    # per-site fit leaves no correlation of the error with colour
    redness = np.log(colour[idx, 0] / colour[idx, 2])
    slope_x = np.polyfit(redness, err[:, 0], 1)[0]
    slope_y = np.polyfit(redness, err[:, 1], 1)[0]
    assert abs(slope_x) < 0.01 and abs(slope_y) < 0.01, (slope_x, slope_y)
    assert abs(np.median(st.fwhm) / 3.0 - 1) < 0.10


def test_mono_bin2_gives_the_same_positions(rng):
    xy, flux = _field(rng, n=30)
    img = render(xy, flux, 3.5, rng=rng)
    a = detect_stars(img)
    b = detect_stars(img, config=DetectConfig(bin2=True))
    assert b.binning == 2
    m, _i, err = _pair(b, xy)
    assert m.sum() >= 28
    assert float(np.sqrt(np.mean(np.sum(err ** 2, axis=1)))) < 0.05
    assert np.median(b.fwhm) == pytest.approx(np.median(a.fwhm), rel=0.03)


def test_colour_image_detection(rng):
    xy, flux = _field(rng, n=25)
    mono = render(xy, flux, 3.0, rng=rng)
    rgb = np.stack([mono * 0.8, mono, mono * 1.2])
    st = detect_stars(rgb)
    m, _i, err = _pair(st, xy)
    assert m.sum() >= 24
    assert float(np.sqrt(np.mean(np.sum(err ** 2, axis=1)))) < 0.05


def test_elongated_stars_roundness(rng):
    xy, flux = _field(rng, n=30, min_sep=20)
    img = render(xy, flux, 4.0, ellip=0.3, theta=0.6, rng=rng)
    st = detect_stars(img)
    q = measure_quality(st)
    assert q.roundness == pytest.approx(0.7, abs=0.04)
    assert q.fwhm_px == pytest.approx(4.0, rel=0.10)


def test_brightest_first_and_max_stars(rng):
    xy, flux = _field(rng, n=40)
    img = render(xy, flux, 3.0, rng=rng)
    st = detect_stars(img, config=DetectConfig(max_stars=10))
    assert len(st) == 10 and st.n_total >= 38
    assert np.all(np.diff(st.flux) <= 0)
    m, idx, _e = _pair(st, xy)
    brightest = set(np.argsort(-flux)[:12])
    assert set(idx) <= brightest


def test_hot_pixels_and_cosmics_are_not_stars(rng):
    xy, flux = _field(rng, n=20)
    img = render(xy, flux, 3.0, rng=rng)
    hot = np.column_stack([rng.integers(5, W - 5, 30), rng.integers(5, H - 5, 30)])
    img[hot[:, 1], hot[:, 0]] += 3000.0
    st = detect_stars(img)
    m, _i, _e = _pair(st, xy)
    assert m.sum() >= 19
    d, _ = cKDTree(hot + 0.0).query(st.xy)
    assert np.count_nonzero(d < 1.0) == 0


def test_sky_level_and_noise(rng):
    xy, flux = _field(rng, n=15)
    img = render(xy, flux, 3.0, rng=rng, sky=250.0, noise=4.0)
    st = detect_stars(img)
    assert st.background == pytest.approx(250.0, abs=0.5)
    assert st.noise == pytest.approx(4.0, rel=0.05)
    cfa = detect_stars(img, pattern="RGGB")  # binned 2x2 mean: noise halves
    assert cfa.noise == pytest.approx(2.0, rel=0.05)


def test_position_errors_are_realistic(rng):
    """The fit's centroid error estimate matches the scatter of repeated noisy measurements."""
    xy, flux = _field(rng, n=30, flux=(800, 1500))
    clean = render(xy, flux, 3.0)
    errs, est = [], []
    for _ in range(6):
        st = detect_stars(clean + rng.normal(0, 3.0, clean.shape).astype(np.float32))
        m, _i, e = _pair(st, xy)
        errs.append(e)
        est.append(st.pos_err[m])
    errs = np.concatenate(errs)
    est = np.concatenate(est)
    ratio = float(np.sqrt(np.mean(errs ** 2)) / np.sqrt(np.mean(est ** 2)))
    assert 0.7 < ratio < 1.4, ratio


def test_saturation_flag(rng):
    xy, flux = _field(rng, n=10)
    flux[0] = 2e6
    img = np.minimum(render(xy, flux, 3.0, rng=rng), 20000.0)
    st = detect_stars(img, config=DetectConfig(saturation=20000.0))
    m, idx, _e = _pair(st, xy)
    sat = st.flag[m][idx == 0]
    assert sat.size == 1 and sat[0] & FLAG_SATURATED
    assert np.all(st.flag[m][idx != 0] & FLAG_SATURATED == 0)


# --------------------------------------------------------------------------- bad frames


@pytest.mark.parametrize("kind", ["zeros", "constant", "nan", "noise", "tiny", "lens_cap_uint16"])
def test_frames_without_stars_give_empty_lists(rng, kind):
    img = {
        "zeros": np.zeros((H, W), np.float32),
        "constant": np.full((H, W), 0.3, np.float32),
        "nan": np.full((H, W), np.nan, np.float32),
        "noise": rng.normal(100, 3, (H, W)).astype(np.float32),
        "tiny": np.ones((3, 3), np.float32),
        "lens_cap_uint16": rng.poisson(50, (H, W)).astype(np.uint16),
    }[kind]
    st = detect_stars(img, pattern="RGGB" if kind == "lens_cap_uint16" else None)
    assert len(st) <= 2  # pure noise may give a stray blip, never a star field
    q = measure_quality(st)
    assert q.n_stars <= 2
    if len(st) == 0:
        assert q.score == 0.0 and math.isnan(q.fwhm_px)


def test_nan_holes_do_not_break_detection(rng):
    xy, flux = _field(rng, n=30)
    img = render(xy, flux, 3.0, rng=rng)
    img[:, :40] = np.nan  # e.g. a warped frame's no-data border
    img[100:110, 200:210] = np.nan
    st = detect_stars(img)
    inside = (xy[:, 0] > 48)
    m, idx, err = _pair(st, xy)
    assert m.sum() >= inside.sum() - 2
    assert np.all(np.isfinite(st.xy))
    assert float(np.sqrt(np.mean(np.sum(err ** 2, axis=1)))) < 0.1


# --------------------------------------------------------------------------- quality and selection


def test_score_ranks_sharp_clear_frames_first(rng):
    xy, _flux = _field(rng, n=60)
    flux = 10 ** rng.uniform(1.5, 4.0, 60)  # many faint stars, as on a real sky
    sharp = measure_quality(detect_stars(render(xy, flux, 3.0, rng=rng)))
    soft = measure_quality(detect_stars(render(xy, flux, 5.0, rng=rng)))
    cloudy = measure_quality(detect_stars(render(xy, flux * 0.1, 3.0, rng=rng)))
    trailed = measure_quality(detect_stars(render(xy, flux, 3.0, ellip=0.45, rng=rng)))
    assert sharp.n_stars > cloudy.n_stars
    assert soft.fwhm_px > sharp.fwhm_px * 1.5
    assert sharp.score > soft.score and sharp.score > cloudy.score and sharp.score > trailed.score
    assert sharp.score == pytest.approx(sharp.n_stars * sharp.roundness / sharp.fwhm_px ** 2)
    d = sharp.to_dict()
    assert set(d) == {"n_stars", "fwhm_px", "roundness", "background", "noise", "score"}


def _q(n, fwhm, score, rnd=0.9):
    return FrameQuality(n_stars=n, fwhm_px=fwhm, roundness=rnd, background=0.1, noise=0.01, score=score)


def test_select_frames_reasons():
    qs = [_q(50, 3.0, 5.0), _q(3, float("nan"), 0.0), _q(40, 6.0, 1.0), _q(45, 3.2, 4.0),
          _q(48, 3.1, 4.5), None, _q(30, 3.5, 2.0, rnd=0.4)]
    out = select_frames(qs, min_stars=15, max_fwhm=5.0, min_roundness=0.6)
    used = [u for u, _ in out]
    assert used == [True, False, False, True, True, False, False]
    assert "too few stars: 3 < 15" in out[1][1]
    assert "FWHM 6.00 px > max-fwhm 5" in out[2][1]
    assert "could not be read" in out[5][1]
    assert "roundness 0.40" in out[6][1]
    assert all(r == "" for u, r in out if u)


def test_keep_best_percent():
    qs = [_q(50, 3.0, s) for s in (1.0, 5.0, 3.0, 4.0, 2.0, 0.5, 6.0, 2.5, 3.5, 0.1)]
    out = select_frames(qs, keep_best=30)
    kept = [i for i, (u, _) in enumerate(out) if u]
    assert kept == [1, 3, 6]  # the three best scores
    assert "not in the best 30%" in out[0][1]
    # the percentage counts all frames; hard filters run first
    qs[6] = _q(5, 3.0, 6.0)
    out = select_frames(qs, keep_best=30, min_stars=15)
    assert "too few stars" in out[6][1]
    assert [i for i, (u, _) in enumerate(out) if u] == [1, 3, 8]
    assert select_frames(qs[:1], keep_best=1)[0][0]  # at least one frame is kept
    with pytest.raises(ValueError):
        select_frames(qs, keep_best=0)


def test_choose_reference():
    qs = [_q(50, 3.0, 2.0), _q(50, 3.0, 7.0), None, _q(50, 3.0, 7.0), _q(50, 3.0, 9.0)]
    assert choose_reference(qs) == 4
    assert choose_reference(qs, used=[True, True, True, True, False]) == 1  # ties: earliest
    with pytest.raises(NotEnoughStars):
        choose_reference([_q(0, float("nan"), 0.0), None])


def test_measure_quality_accepts_image_and_stars(rng):
    xy, flux = _field(rng, n=20)
    img = render(xy, flux, 3.0, rng=rng)
    st = detect_stars(img)
    assert measure_quality(img, st, pattern=None) == measure_quality(st)


def test_two_peaks_of_one_star_are_one_detection():
    """Kept detections whose measured centroids lie within DUPLICATE_PX of a brighter one are dropped
    (two peaks of one star); a star 2 px away is kept, and so are stars not kept in the first place."""
    from skystack.engine.detect import DUPLICATE_PX, _duplicates

    x = np.array([10.0, 10.8, 30.0, 32.0, 50.0, 50.5])
    y = np.array([10.0, 10.5, 30.0, 30.0, 50.0, 50.0])
    keep = np.array([True, True, True, True, False, True])
    assert DUPLICATE_PX == 1.5
    np.testing.assert_array_equal(_duplicates(x, y, keep), [False, True, False, False, False, False])


@pytest.mark.parametrize("kw", [{"bkg_filter": 2}, {"bkg_filter": 0}, {"psf_sample": -1}, {"psf": "airy"}])
def test_bad_detect_config_is_refused_at_construction(kw):
    with pytest.raises(ValueError):
        DetectConfig(**kw)
