"""Star candidates (``engine/sources.py``, ``kernels/sources.cu``) against planted stars, and each
kernel under the g++ emulator against its NumPy twin, bit for bit."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import erf

from skystack.engine import sources
from skystack.kernels.emulate import emulated, emulator_available

SKY, NOISE, SIGMA = 400.0, 6.0, 1.1  # luminance units; star Gaussian sigma in px


def _stars(rng, shape, n, flux):
    h, w = shape
    return np.column_stack([rng.uniform(4, w - 4, n), rng.uniform(4, h - 4, n), flux])


def _render(shape, stars, sigma=SIGMA):
    """Float64 image of pixel-integrated circular Gaussians (``stars``: x, y, flux)."""
    h, w = shape
    img = np.zeros(shape)
    s = sigma * math.sqrt(2.0)
    for x, y, f in stars:
        x0, x1, y0, y1 = int(max(0, x - 8)), int(min(w, x + 9)), int(max(0, y - 8)), int(min(h, y + 9))
        ex = np.diff(erf((np.arange(x0, x1 + 1) - 0.5 - x) / s)) / 2
        ey = np.diff(erf((np.arange(y0, y1 + 1) - 0.5 - y) / s)) / 2
        img[y0:y1, x0:x1] += f * np.outer(ey, ex)
    return img


def _field(rng, shape=(300, 420), n=120, gradient=0.05):
    """A sky with a gradient and white noise, stars of S/N 5..300 (peak flux over the noise)."""
    peak_snr = np.exp(rng.uniform(math.log(5), math.log(300), n))
    flux = peak_snr * NOISE * 2 * math.pi * SIGMA ** 2
    stars = _stars(rng, shape, n, flux)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    truth = SKY + gradient * xx + 0.02 * yy
    img = truth + _render(shape, stars) + rng.normal(0.0, NOISE, shape)
    return img.astype(np.float32), stars, peak_snr, truth


def test_background_and_noise_are_the_skys(rng):
    """The mesh's noise is the planted one, the subtracted image's sky is 0 within 0.05 sigma and
    has no gradient left, edges included; the frame's background is the sky's median (the mesh's
    median: the short boxes at the edges weigh as much as whole ones)."""
    img, _, _, truth = _field(rng)
    mesh = sources.background_mesh(img, box=64, filt=3)
    sub = sources.subtract_mesh(img, mesh)
    mesh = sources.residual_noise(mesh, img, sub, filt=3)
    assert abs(mesh.noise / NOISE - 1) < 0.03, mesh.noise
    assert abs(mesh.background - np.median(truth)) < 0.25 * NOISE
    resid = sub - (img - truth)  # the mesh's error at each pixel
    assert abs(np.median(resid)) < 0.05 * NOISE
    assert np.abs(np.median(resid, axis=0)).max() < 0.1 * NOISE  # the 0.05/px gradient (21 ADU) is gone, edges too


def test_stars_are_found_and_noise_is_not(rng):
    """Every star of peak S/N >= 12 with no other star within 8 px is found within 0.5 px (the
    catalogue's first moment), and fewer than 3 % of the candidates lie away from any star; the
    fluxes are the isophotal share of the planted flux (above 60 %)."""
    img, stars, snr, _ = _field(rng)
    cat, bg, noise, _ = sources.find_sources(img, threshold_sigma=3.0, min_area=5, box=64, filt=3)
    d = np.hypot(stars[:, 0, None] - cat["x"][None], stars[:, 1, None] - cat["y"][None])
    near = d.min(axis=1)
    sep = np.hypot(stars[:, 0, None] - stars[None, :, 0], stars[:, 1, None] - stars[None, :, 1])
    np.fill_diagonal(sep, np.inf)
    bright = (snr >= 12) & (sep.min(axis=1) > 8.0)  # (a 12x brighter star 6.6 px away pulls by 0.85 px)
    assert np.all(near[bright] < 0.5), np.sort(near[bright])[-5:]
    far = d.min(axis=0) > 2.0
    assert far.sum() < 0.03 * len(cat), (far.sum(), len(cat))
    j = d.argmin(axis=1)[bright]
    ratio = cat["flux"][j] / stars[bright, 2]
    assert 0.6 < np.median(ratio) <= 1.02, np.median(ratio)
    # moments (of the filtered image, as sep's): a Gaussian's sigma^2 + 1/12 (the pixel) + 1/2 (the
    # filter), less what the threshold cuts off
    assert 0.7 < np.median(cat["a"][j] * cat["b"][j]) / (SIGMA ** 2 + 1 / 12 + 0.5) < 1.05


def test_pure_noise_gives_almost_no_candidates(rng):
    """3 pixel sigma on the filtered image (8 of its own sigma) with 5 pixels above it: a 0.13 MP
    frame of white noise yields no candidate."""
    img = (SKY + rng.normal(0.0, NOISE, (300, 420))).astype(np.float32)
    cat, *_ = sources.find_sources(img, threshold_sigma=3.0, min_area=5, box=64, filt=3)
    assert cat is None, len(cat)


def test_two_close_stars_are_two_candidates(rng):
    """Stars 4 px apart (sep without deblending makes one object of them) are two peaks; a flat-topped
    plateau of equal values is one."""
    shape = (80, 80)
    stars = np.array([[30.0, 40.0, 6000.0], [34.0, 40.0, 4000.0]])
    img = (SKY + _render(shape, stars) + rng.normal(0, 1.0, shape)).astype(np.float32)
    cat, *_ = sources.find_sources(img, threshold_sigma=3.0, min_area=5, box=40, filt=3)
    assert len(cat) == 2 and np.allclose(np.sort(cat["x"]), [30.0, 34.0], atol=0.5), cat[["x", "y"]]
    f = np.zeros((20, 20), dtype=np.float32)
    f[8:11, 8:11] = 5.0  # a plateau: only its first pixel in raster order is the peak
    idx, total = sources.find_peaks(f, np.float32(1.0), 5)
    assert total == 1 and list(idx) == [8 * 20 + 8]


def test_no_data_holes_and_empty_images(rng):
    """NaN columns and a NaN box leave the sky alone; an all-NaN or constant image has no sources."""
    img, stars, snr, _ = _field(rng)
    img[:, 100:103] = np.nan
    img[:64, :64] = np.nan
    cat, bg, noise, sub = sources.find_sources(img, threshold_sigma=3.0, min_area=5, box=64, filt=3)
    assert abs(noise / NOISE - 1) < 0.05 and np.all(sub[:, 100:103] == 0)
    assert np.isfinite(cat["x"]).all() and len(cat) > 50
    assert sources.find_sources(np.full((50, 60), np.nan, np.float32), threshold_sigma=3, min_area=5, box=32,
                                filt=3)[0] is None
    assert sources.find_sources(np.full((50, 60), 7, np.float32), threshold_sigma=3, min_area=5, box=32,
                                filt=3)[0] is None


@pytest.mark.skipif(not emulator_available(), reason="g++ is not on PATH")
def test_kernels_give_their_twins_bits(rng):
    """mesh_subtract, match_filter, find_peaks, peak_moments, bin2_mean and box_rows under the emulator: the twins' arrays
    bit for bit, on a field with a gradient, NaN and inf pixels, stars at the edges, a plateau."""
    img, stars, _, _ = _field(rng, shape=(130, 170), n=60)
    img[5, 7:40] = np.nan
    img[60, 60] = np.inf
    img[0:3, 160:163] = SKY + 500.0  # a plateau at the corner
    h, w = img.shape
    mod = emulated("sources.cu")
    mesh = sources.background_mesh(img, box=32, filt=3)
    mesh = sources.residual_noise(mesh, img, sources.subtract_mesh(img, mesh), filt=3)
    tx, ty = sources.interpolation_tables(w, 32), sources.interpolation_tables(h, 32)
    ref = sources._subtract_twin(img, mesh.back, *tx, *ty)
    sub = np.full_like(img, -1)
    mod.launch("mesh_subtract", h * w, (img, mesh.back, *tx, *ty, sub, np.int64(h), np.int64(w),
                                        np.int64(mesh.back.shape[1])))
    np.testing.assert_array_equal(sub, ref)
    f = np.full_like(img, -1)
    mod.launch("match_filter", h * w, (sub, f, np.int64(h), np.int64(w)))
    np.testing.assert_array_equal(f, sources._filter_twin(sub))
    thr = np.float32(1.2 * mesh.noise)  # a low threshold: many peaks, some ties of noise
    idx = np.full(4096, -1, np.int64)
    count = np.zeros(1, np.uint64)
    mod.launch("find_peaks", h * w, (f, idx, count, np.int64(h), np.int64(w), thr, np.int32(5), np.int64(4096)))
    ref_idx, total = sources._peaks_twin(f, thr, 5)
    assert int(count[0]) == total > 40
    np.testing.assert_array_equal(np.sort(idx[:total]), ref_idx)
    out = np.full((11, total), -1.0)
    mod.launch("peak_moments", total, (sub, f, ref_idx, out, np.int64(total), np.int64(h), np.int64(w), thr))
    np.testing.assert_array_equal(out, sources._moments_twin(sub, f, ref_idx, thr))
    for src in (img, img[:-1, :-1]):  # bin2_mean: an even and an odd size (its last row and column left out)
        hh, ww = src.shape
        binned = np.full((hh // 2, ww // 2), -1.0, np.float32)
        c = np.ascontiguousarray(src)
        mod.launch("bin2_mean", binned.size, (c, binned, np.int64(hh), np.int64(ww)))
        np.testing.assert_array_equal(binned, sources._bin2_twin(c))
        quads = c[:hh // 2 * 2, :ww // 2 * 2].reshape(hh // 2, 2, ww // 2, 2).astype(np.float64)
        np.testing.assert_allclose(binned, quads.mean(axis=(1, 3)), rtol=1e-6)
    for box, step in ((32, 2), (32, 1), (30, 4)):  # box_rows of sub where img has data; whole and cut boxes
        ny, nx, side = -(-h // box), -(-w // box), -(-box // step)
        rows = np.full((ny * nx, side * side), -1.0, np.float32)
        mod.launch("box_rows", rows.size, (sub, img, rows, np.int64(h), np.int64(w), np.int64(box), np.int64(step),
                                           np.int64(nx), np.int64(ny * nx)))
        ref = sources._box_rows_twin(img, sub, box, step)
        np.testing.assert_array_equal(rows, ref)
        for b in (0, nx + 1, ny * nx - 1):  # a box by hand: its pixels' values, NaN off the data and the image
            y0, x0 = (b // nx) * box, (b % nx) * box
            cut = np.full((box, box), np.nan, np.float32)
            part = np.where(np.isfinite(img), sub, np.nan)[y0:y0 + box, x0:x0 + box]
            cut[:part.shape[0], :part.shape[1]] = part
            np.testing.assert_array_equal(ref[b], cut[::step, ::step].ravel())


def test_interpolation_tables_reach_each_box_centre():
    """The tables reproduce a linear ramp exactly: between box centres, beyond the outer ones
    (extrapolated), and at a short last box's own middle; one box is flat."""
    i0, i1, w0, w1 = sources.interpolation_tables(100, 32)  # boxes 0-31, 32-63, 64-95, 96-99
    centres = np.array([15.5, 47.5, 79.5, 97.5])
    value = centres[i0] * w0 + centres[i1] * w1
    np.testing.assert_allclose(value, np.arange(100), atol=1e-4)
    np.testing.assert_allclose(w0 + w1, 1.0, atol=1e-6)
    i0, i1, w0, w1 = sources.interpolation_tables(20, 32)
    assert np.all(i0 == 0) and np.all(i1 == 0) and np.all(w0 == 1) and np.all(w1 == 0)


def test_noise_is_the_pixels_not_the_gradient_across_a_box(rng):
    """A steep sky (a wide lens's vignetting: 0.5 sigma per pixel, 32 sigma across a box): the noise
    is the planted one within 5 %, where each box's own spread would read it ~9x too high."""
    h, w = 256, 320
    yy, xx = np.mgrid[:h, :w]
    img = (SKY + 0.5 * NOISE * xx + rng.normal(0.0, NOISE, (h, w))).astype(np.float32)
    cat, bg, noise, sub = sources.find_sources(img, threshold_sigma=3.0, min_area=5, box=64, filt=3)
    assert abs(noise / NOISE - 1) < 0.05, noise
    assert cat is None  # no star, and the ramp leaves nothing behind


def test_a_glowing_band_is_not_a_row_of_stars(rng):
    """A bright band across the frame (a horizon's glow, 4 sigma, 6 px wide) has noise peaks, but none
    of them is prominent: along the band the filtered image hardly falls. They are dropped; the
    stars away from it, and one on it, are kept."""
    shape = (200, 300)
    stars = np.array([[60.0, 40.0, 3000.0], [200.0, 50.0, 2500.0], [150.0, 170.0, 4000.0], [240.0, 103.0, 3000.0]])
    img = SKY + _render(shape, stars) + rng.normal(0, NOISE, shape)
    img[100:106] += 4 * NOISE
    img = img.astype(np.float32)
    mesh = sources.background_mesh(img, box=64, filt=3)
    f = sources.match_filter(sources.subtract_mesh(img, mesh))
    idx, _ = sources.find_peaks(f, np.float32(3.0 * NOISE), 5)
    assert np.sum(np.abs(idx // shape[1] - 102.5) < 5) >= 5  # the band's own peaks
    cat, *_ = sources.find_sources(img, threshold_sigma=3.0, min_area=5, box=64, filt=3)
    assert len(cat) == 4, cat[["x", "y", "prominence"]]
    np.testing.assert_allclose(np.sort(cat["x"]), [60.0, 150.0, 200.0, 240.0], atol=0.5)


def test_a_cloud_is_not_a_cluster_of_stars(rng):
    """A smooth cloud (a 25 px Gaussian blob, 8 sigma at its top) with noise on it: one peak at most
    survives (its top, which is a source), not a cluster of its noise bumps."""
    shape = (200, 300)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = SKY + 8 * NOISE * np.exp(-((xx - 150) ** 2 + (yy - 100) ** 2) / (2 * 25.0 ** 2)) + rng.normal(0, NOISE, shape)
    idx_all = sources.find_peaks(sources.match_filter(sources.subtract_mesh(
        img.astype(np.float32), sources.background_mesh(img.astype(np.float32), box=64, filt=3))),
        np.float32(3.0 * NOISE), 5)[0]
    cat, *_ = sources.find_sources(img.astype(np.float32), threshold_sigma=3.0, min_area=5, box=64, filt=3)
    assert idx_all.size >= 5
    assert cat is None or len(cat) <= 1, cat[["x", "y", "prominence"]]


def test_too_many_peaks_raise_the_threshold(rng, monkeypatch):
    """Past MAX_PEAKS (a frame full of nebulosity) the threshold doubles until the peaks fit: the
    bright stars are still found, and no more than MAX_PEAKS candidates are measured."""
    img, stars, snr, _ = _field(rng)
    cat_all, *_ = sources.find_sources(img, threshold_sigma=0.5, min_area=1, box=64, filt=3)
    assert len(cat_all) > 200  # a low threshold: the noise's peaks too
    monkeypatch.setattr(sources, "MAX_PEAKS", 150)
    cat, *_ = sources.find_sources(img, threshold_sigma=0.5, min_area=1, box=64, filt=3)
    assert 0 < len(cat) <= 150
    d = np.hypot(stars[:, 0, None] - cat["x"][None], stars[:, 1, None] - cat["y"][None]).min(axis=1)
    assert np.mean(d[snr >= 30] < 1.0) > 0.9
