"""The PSF fit kernel (``kernels/psf.cu``: ``psf_fit``) against its NumPy twin.

The twin (``psf._fit_psf_numpy``) fits all stars at once in NumPy's
summation order, the kernel star by star; both take the same Levenberg-Marquardt
steps, so they agree to rounding: ``ok`` identical, positions within 1e-9 px,
the moments within 1e-9 relative, the centroid errors within 1e-9 relative (the
tolerance of ``docs/architecture.md``). The emulated and the native build are
the same code and give the same bits. The fits are also checked against the
simulated Moffat stars' true centres and FWHM.
"""

from __future__ import annotations

import numpy as np
import pytest

from skystack.engine import backend as be
from skystack.engine import detect, psf
from skystack.kernels.emulate import emulated, emulator_available, use_emulator

pytestmark = pytest.mark.skipif(not emulator_available(), reason="g++ is not on PATH")

FWHM = 3.2  # the stars' true FWHM (px)
BETA = 3.0
NOISE = 0.002
SITE_GAIN = np.array([[1.0, 0.55], [0.6, 0.3]])  # a red star on an RGGB mosaic: sites differ
SITE_SKY = np.array([[0.10, 0.12], [0.125, 0.08]])
HALF = 7


def _scene(rng, h=140, w=160, sites=4):
    """Isolated Moffat stars (true centres returned), one beside a NaN patch, per-site colour and
    sky on a CFA mosaic; the detections are a few tenths of a pixel off."""
    gy, gx = np.mgrid[12:h - 8:22, 12:w - 8:22]
    tx = gx.ravel() + rng.uniform(-3, 3, gx.size)
    ty = gy.ravel() + rng.uniform(-3, 3, gy.size)
    amp = rng.uniform(0.05, 1.0, tx.size)
    yy, xx = np.mgrid[0:h, 0:w]
    alpha = FWHM / (2 * np.sqrt(2 ** (1 / BETA) - 1))
    img = np.zeros((h, w))
    for x0, y0, a in zip(tx, ty, amp):
        img += a * (1 + ((xx - x0) ** 2 + (yy - y0) ** 2) / alpha ** 2) ** -BETA
    if sites == 4:
        img = img * SITE_GAIN[yy % 2, xx % 2] + SITE_SKY[yy % 2, xx % 2]
    img += rng.normal(0, NOISE, img.shape)
    img = img.astype(np.float32)
    img[int(ty[5]) - 1:int(ty[5]) + 2, int(tx[5]) + 2:int(tx[5]) + 4] = np.nan
    s2 = np.full(tx.size, 1.8 ** 2)
    return img, tx, ty, tx + rng.normal(0, 0.4, tx.size), ty + rng.normal(0, 0.4, ty.size), s2


def _kernel(mod, img, x, y, s2, sites, moffat, *, reverse=False):
    """One launch of ``psf_fit`` (working memory and outputs poisoned first)."""
    k = 2 * HALF + 2 if sites == 4 else 2 * HALF + 1
    n = x.size
    out = np.full((7, n), -7.0)
    scratch = np.full(n * 6 * k * k, -7.0)
    h, w = img.shape
    mod.launch("psf_fit", n, (out, scratch, img, np.int32(h), np.int32(w), np.int32(sites), x, y, s2,
                              np.int64(n), np.int32(HALF), np.int32(k), np.int32(moffat), np.int32(25),
                              np.float64(0.02), np.float64(0.8)), block=32, reverse=reverse)
    return out[0], out[1], out[2], out[3], out[4], out[5], out[6] > 0.5


def assert_within_tolerance(got, ref):
    """The documented kernel-twin tolerance, on the stars the twin fitted."""
    ok = ref[6]
    np.testing.assert_array_equal(got[6], ok)
    assert ok.sum() >= 0.8 * ok.size
    for i in (0, 1):
        np.testing.assert_allclose(got[i][ok], ref[i][ok], rtol=0, atol=1e-9)
    scale = np.sqrt(ref[2][ok] * ref[3][ok])
    for i in (2, 3, 4):
        assert np.all(np.abs(got[i][ok] - ref[i][ok]) <= 1e-9 * scale), i
    np.testing.assert_allclose(got[5][ok], ref[5][ok], rtol=1e-9, atol=0)


@pytest.mark.parametrize("sites, moffat, reverse", [(4, True, False), (4, False, True), (1, True, True),
                                                    (1, False, False)])
def test_emulated_kernel_equals_twin_and_finds_the_true_stars(rng, sites, moffat, reverse):
    img, tx, ty, x, y, s2 = _scene(rng, sites=sites)
    got = _kernel(emulated("psf.cu"), img, x, y, s2, sites, moffat, reverse=reverse)
    assert_within_tolerance(got, psf._fit_psf_numpy(img, x, y, s2, HALF, sites, moffat=moffat))
    ok = got[6].copy()
    ok[5] = False
    d = np.hypot(got[0] - tx, got[1] - ty)[ok]
    assert np.median(d) < 0.03 and d.max() < 0.15, d
    if moffat:  # the model is the truth's: the FWHM of the Gaussian with the same FWHM is the truth's
        fwhm = detect.GAUSS_FWHM * (got[2] * got[3] - got[4] ** 2) ** 0.25
        assert abs(np.median(fwhm[ok]) / FWHM - 1) < 0.01


def test_kernel_edge_cases_equal_twin(rng):
    """A star on no data and stars outside the frame: not ok in both; the rest as the twin."""
    img, _, _, x, y, s2 = _scene(rng)
    img[40:70, 40:70] = np.nan
    x = np.concatenate([x, [55.0, -30.0, 300.0, 10.0]])
    y = np.concatenate([y, [55.0, 20.0, 20.0, -30.0]])
    s2 = np.concatenate([s2, [3.0] * 4])
    got = _kernel(emulated("psf.cu"), img, x, y, s2, 4, True)
    ref = psf._fit_psf_numpy(img, x, y, s2, HALF, 4)
    assert not ref[6][-4:].any()
    assert_within_tolerance(got, ref)


def test_native_kernel_equals_emulated_bits_and_twin(rng):
    from skystack.kernels.native import available, native

    if not available():
        pytest.skip("no C++ compiler")
    img, _, _, x, y, s2 = _scene(rng)
    em = _kernel(emulated("psf.cu"), img, x, y, s2, 4, True)
    mod = native("psf.cu")
    mod.set_threads(2)
    nat = _kernel(mod, img, x, y, s2, 4, True)
    for a, b in zip(nat, em):
        np.testing.assert_array_equal(a, b)
    assert_within_tolerance(nat, psf._fit_psf_numpy(img, x, y, s2, HALF, 4))


def test_fit_psf_dispatch(rng, monkeypatch):
    """The CPU branch times the native kernel against the twin on its first launch and keeps the
    faster; either is within the tolerance. The device branch builds the right launch (emulator)."""
    from skystack.kernels.native import available

    img, _, _, x, y, s2 = _scene(rng)
    ref = psf._fit_psf_numpy(img, x, y, s2, HALF, 4)
    monkeypatch.setattr(be, "_native_choice", {})
    monkeypatch.delenv("SKYSTACK_NATIVE", raising=False)
    assert_within_tolerance(psf.fit_psf(img, x, y, s2, HALF, 4), ref)
    choice = be._native_choice[("psf.cu", "psf_fit", ())]
    assert choice in (("native", "twin") if available() else ("twin",))
    use_emulator(monkeypatch, psf)
    assert_within_tolerance(psf.fit_psf(img, x, y, s2, HALF, 4), ref)


@pytest.mark.gpu
def test_device_psf_fit_equals_twin(rng):
    """On a device frame (a GPU, or the simulated device) the fits are the twin's; only the
    per-star outputs come down."""
    import cupy

    img, _, _, x, y, s2 = _scene(rng)
    got = psf.fit_psf(cupy.asarray(img), x, y, s2, HALF, 4)
    assert all(isinstance(a, np.ndarray) for a in got)
    assert_within_tolerance(got, psf._fit_psf_numpy(img, x, y, s2, HALF, 4))
