"""The star measurement kernel (``kernels/detect.cu``: ``window_measure``) against its NumPy twin.

The twin (``centroid._window_measure_numpy``) sums in NumPy's pairwise order and
the kernel star by star, so they agree to rounding: the tolerance documented in
the twin's docstring (``ok`` identical, positions within 1e-9 px, moments and
errors within 1e-9 relative). The emulated and the native build of the kernel
are the same code and give the same bits. Positions are also checked against
the simulated stars' true centres.
"""

from __future__ import annotations

import numpy as np
import pytest

from skystack.engine import backend as be
from skystack.engine import centroid, detect, psf
from skystack.kernels.emulate import emulated, emulator_available, use_emulator

pytestmark = pytest.mark.skipif(not emulator_available(), reason="g++ is not on PATH")

SIGMA = 1.4  # the stars' Gaussian sigma (px)
NOISE = 0.002
SITE_GAIN = np.array([[1.0, 0.55], [0.6, 0.3]])  # a red star on an RGGB mosaic: sites differ
SITE_SKY = np.array([[0.10, 0.12], [0.125, 0.08]])


def _scene(rng, h=100, w=124, sites=4):
    """A frame of isolated Gaussian stars (true centres returned), some at the border,
    one under a NaN patch; per-site colour and sky on a CFA mosaic."""
    gy, gx = np.mgrid[10:h - 5:20, 10:w - 5:20]
    tx = gx.ravel() + rng.uniform(-3, 3, gx.size)
    ty = gy.ravel() + rng.uniform(-3, 3, gy.size)
    tx[:3], ty[:3] = [0.6, w - 1.2, 40.3], [50.2, 20.7, h - 0.8]  # cut by the border
    amp = rng.uniform(0.05, 1.0, tx.size)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w))
    for x0, y0, a in zip(tx, ty, amp):
        img += a * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * SIGMA ** 2))
    if sites == 4:
        img = img * SITE_GAIN[yy % 2, xx % 2] + SITE_SKY[yy % 2, xx % 2]
    img += rng.normal(0, NOISE, img.shape)
    img = img.astype(np.float32)
    img[int(ty[5]) - 1:int(ty[5]) + 2, int(tx[5]) + 2:int(tx[5]) + 4] = np.nan  # no-data beside a star
    # detections: sep-like positions a few tenths of a pixel off
    return img, tx, ty, tx + rng.normal(0, 0.4, tx.size), ty + rng.normal(0, 0.4, ty.size)


def _launch_kernel(mod, img, x, y, sigma_w, sites, n_iter, *, reverse=False):
    half = int(np.ceil(5.0 * sigma_w)) + 1
    k = 2 * half + 2 if sites == 4 else 2 * half + 1
    n = x.size
    out = np.full((7, n), -7.0)
    scratch = np.full(n * (2 * k * k + 2 * k), -7.0)
    h, w = img.shape
    mod.launch("window_measure", n, (out, scratch, img, np.int32(h), np.int32(w), np.int32(sites), x, y,
                                     np.int64(n), np.float64(sigma_w), np.float64(NOISE), np.int32(n_iter),
                                     np.int32(half), np.int32(k)), reverse=reverse)
    return out[0], out[1], out[2], out[3], out[4], out[5], out[6] > 0.5


def assert_within_tolerance(got, ref):
    """The documented kernel-twin tolerance, on the stars the twin measured."""
    ok = ref[6]
    np.testing.assert_array_equal(got[6], ok)
    assert ok.sum() >= 0.8 * ok.size
    for i in (0, 1):  # positions: 1e-9 px
        np.testing.assert_allclose(got[i][ok], ref[i][ok], rtol=0, atol=1e-9)
    scale = np.sqrt(ref[2][ok] * ref[3][ok])  # moments: 1e-9 relative (cxy: of the star's size)
    for i in (2, 3, 4):
        assert np.all(np.abs(got[i][ok] - ref[i][ok]) <= 1e-9 * scale), i
    np.testing.assert_allclose(got[5][ok], ref[5][ok], rtol=1e-9, atol=0)


@pytest.mark.parametrize("sites, sigma_w, n_iter, reverse", [(4, 1.5, 16, False), (4, 2.3, 6, True),
                                                              (1, 1.5, 16, True), (1, 0.8, 16, False)])
def test_emulated_kernel_equals_twin_and_finds_the_true_centres(rng, sites, sigma_w, n_iter, reverse):
    img, tx, ty, x, y = _scene(rng, sites=sites)
    mod = emulated("detect.cu")
    got = _launch_kernel(mod, img, x, y, sigma_w, sites, n_iter, reverse=reverse)
    ref = centroid._window_measure_numpy(img, x, y, sigma_w, sites, NOISE, n_iter=n_iter)
    assert_within_tolerance(got, ref)
    if n_iter == 16:  # converged: the true centres of the clean stars, within their stated errors
        clean = got[6].copy()
        clean[:3] = clean[5] = False
        d = np.hypot(got[0] - tx, got[1] - ty)[clean]
        assert np.median(d) < 0.02 and d.max() < 0.1, d
        z = np.concatenate([(got[0] - tx)[clean], (got[1] - ty)[clean]]) / np.concatenate([got[5][clean]] * 2)
        assert 0.3 < np.sqrt(np.mean(z ** 2)) < 3.0  # pos_err is the scatter's size
    if sites == 1 and sigma_w == 1.5:  # the window matches: the moments give the star's sigma
        size = (got[2] * got[3] - got[4] ** 2) ** 0.25
        assert abs(np.median(size[got[6]]) - SIGMA) < 0.05


@pytest.mark.gpu
def test_device_window_measure_equals_twin(rng):
    """On a device frame (a GPU, or the simulated device) the kernel's measures are the twin's."""
    import cupy

    img, _, _, x, y = _scene(rng)
    got = centroid.window_measure(cupy.asarray(img), x, y, 1.5, 4, NOISE)
    assert all(isinstance(a, np.ndarray) for a in got)  # the measures come down, nothing else
    assert_within_tolerance(got, centroid._window_measure_numpy(img, x, y, 1.5, 4, NOISE))


def test_kernel_edge_cases_equal_twin(rng):
    """A star on no data, one outside the frame, one on a flat sky: not ok in both; the rest as the twin."""
    img, _, _, x, y = _scene(rng)
    img[40:70, 40:70] = np.nan
    x = np.concatenate([x, [55.0, -30.0, 300.0, 10.0]])
    y = np.concatenate([y, [55.0, 20.0, 20.0, -30.0]])
    got = _launch_kernel(emulated("detect.cu"), img, x, y, 1.5, 4, 16)
    ref = centroid._window_measure_numpy(img, x, y, 1.5, 4, NOISE)
    assert not ref[6][-4:].any()
    np.testing.assert_array_equal(got[6], ref[6])
    ok = ref[6]
    np.testing.assert_allclose(got[0][ok], ref[0][ok], rtol=0, atol=1e-9)


def test_native_kernel_equals_emulated_bits_and_twin(rng):
    from skystack.kernels.native import available, native

    if not available():
        pytest.skip("no C++ compiler")
    img, _, _, x, y = _scene(rng, h=130, w=150)
    em = _launch_kernel(emulated("detect.cu"), img, x, y, 1.5, 4, 16)
    nat_mod = native("detect.cu")
    nat_mod.set_threads(2)
    nat = _launch_kernel(nat_mod, img, x, y, 1.5, 4, 16)
    for a, b in zip(nat, em):
        np.testing.assert_array_equal(a, b)
    assert_within_tolerance(nat, centroid._window_measure_numpy(img, x, y, 1.5, 4, NOISE))


def test_window_measure_dispatch_one_implementation_per_process(rng, monkeypatch):
    """The CPU branch times the native kernel against the twin on its first launch, even of a few
    stars, and returns the chosen one's numbers then and after (the same bits every time); the
    device branch builds the right launch (emulator)."""
    from skystack.kernels.native import available, native

    img, _, _, x, y = _scene(rng, h=200, w=200)
    ref = centroid._window_measure_numpy(img, x, y, 1.5, 4, NOISE)
    monkeypatch.setattr(be, "_native_choice", {})
    monkeypatch.delenv("SKYSTACK_NATIVE", raising=False)
    first = centroid.window_measure(img[:60, :60], x[:3], y[:3], 1.5, 4, NOISE)
    choice = be._native_choice[("detect.cu", "window_measure", ())]
    assert choice in (("native", "twin") if available() else ("twin",))  # timed on 3 stars
    chosen = (lambda *a: centroid._window_native(native("detect.cu"), *a)) if choice == "native" else \
        (lambda im, xx, yy, *a: centroid._window_measure_numpy(im, xx, yy, *a[:3], n_iter=a[3]))
    for got in (first, centroid.window_measure(img[:60, :60], x[:3], y[:3], 1.5, 4, NOISE)):
        for a, b in zip(got, chosen(np.ascontiguousarray(img[:60, :60]), x[:3], y[:3], 1.5, 4, NOISE, 16)):
            np.testing.assert_array_equal(a, b)
    assert_within_tolerance(centroid.window_measure(img, x, y, 1.5, 4, NOISE), ref)
    use_emulator(monkeypatch, centroid)
    assert_within_tolerance(centroid.window_measure(img, x, y, 1.5, 4, NOISE), ref)


def test_detect_stars_with_the_kernel_equals_the_twins_stars(monkeypatch):
    """A whole simulated frame: the kernel's star list is the twin's within the tolerance."""
    from skystack.tools.synth import SynthConfig, build_truth

    truth = build_truth(SynthConfig(seed=3, width=640, height=480, n_lights=1))
    cfa, pattern = truth.render_frame("light", 0).astype(np.float32), truth.config.pattern
    monkeypatch.setenv("SKYSTACK_NATIVE", "off")
    twin = detect.detect_stars(cfa, pattern=pattern)
    monkeypatch.delenv("SKYSTACK_NATIVE")
    use_emulator(monkeypatch, centroid)
    use_emulator(monkeypatch, psf)
    kern = detect.detect_stars(cfa, pattern=pattern)
    assert len(twin) >= 15 and len(kern) == len(twin) and kern.n_total == twin.n_total
    np.testing.assert_array_equal(kern.flag, twin.flag)
    np.testing.assert_allclose(kern.x, twin.x, rtol=0, atol=1e-9)
    np.testing.assert_allclose(kern.y, twin.y, rtol=0, atol=1e-9)
    for f in ("fwhm", "ellipticity", "pos_err"):
        np.testing.assert_allclose(getattr(kern, f), getattr(twin, f), rtol=1e-8, atol=1e-12, err_msg=f)
