"""Frame weights that weigh: a light with twice the noise, against the simulator's truth.

One small session (6 lights, 480x360 px, no calibration frames so that the
extra noise is not diluted by the masters' own) where light 1 is rendered
with twice the natural noise (``SynthConfig.noisy_frames``). Its inverse
variance weight must come out at a quarter of the others', the weighted
stack's noise must improve on the unweighted one as theory predicts, and the
normalisation scale must follow the signal (the star flux), not the noise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from skystack.engine import normalize
from skystack.engine.report import build_report
from skystack.engine.session import discover_session
from skystack.engine.stack import StackConfig, combine_registered, register_session
from skystack.tools.synth import SynthConfig, load_truth, simulate

NOISY = 1


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    root = tmp_path_factory.mktemp("noisy")
    cfg = SynthConfig(seed=11, width=480, height=360, n_lights=6, n_bias=0, n_darks=0, n_flats=0,
                      n_dark_flats=0, file_format="fits", star_density=8000.0, cloudy_frame=None,
                      shake_frame=None, trail_frames=None, noisy_frames=(NOISY,))
    simulate(cfg, root)
    truth = load_truth(root / "truth.json")
    reg = register_session(discover_session(root), StackConfig(quiet=True,
                                                               cache_dir=str(tmp_path_factory.mktemp("c"))))
    assert reg.used == list(range(6))
    yield truth, reg
    reg.close()


def _residual(img: np.ndarray) -> np.ndarray:
    return np.stack([c - ndimage.median_filter(np.nan_to_num(c), size=15) for c in img])


def _noise(img: np.ndarray, area: np.ndarray) -> float:
    """Mean over channels of the 5-sigma clipped RMS of the residual over ``area``."""
    out = []
    for v in _residual(img)[:, area]:
        v = v[np.isfinite(v)].astype(np.float64)
        for _ in range(3):
            v = v[np.abs(v - v.mean()) < 5 * v.std()]
        out.append(v.std())
    return float(np.mean(out))


@pytest.fixture(scope="module")
def sky(session):
    """Star-free pixels of the reference grid (from the truth's noise-free stars)."""
    truth, _reg = session
    h, w = truth.shape
    stars = truth.sky(None, stars=True, background=False, gradient=False, trail=False)
    area = ~ndimage.binary_dilation((stars > 5.0).any(axis=0), iterations=2)
    area[:16] = area[-16:] = False
    area[:, :16] = area[:, -16:] = False
    assert area.sum() > 20000
    return area


def test_noisy_light_weighs_a_quarter(session):
    _truth, reg = session
    res = combine_registered(reg, StackConfig())  # default weighting
    assert res.settings["weighting"] == "noise"
    w = np.array([f.weight for f in res.frames])
    others = np.delete(w, NOISY)
    assert abs(w[NOISY] / others.mean() - 0.25) < 0.05, w
    # every frame's weight is in the report
    assert [f["weight"] for f in build_report(res)["frames"]] == pytest.approx(list(w))


def test_weighted_noise_improves_as_theory_predicts(session, sky):
    _truth, reg = session
    # theory from each registered light's own measured noise (truth's star-free sky): inverse
    # variance weights give 1 / sum(1/s^2) against sum(s^2) / N^2 for equal weights
    s = np.array([_noise(reg.frame(i), sky) for i in reg.used])
    assert s[NOISY] / np.median(np.delete(s, NOISY)) == pytest.approx(2.0, rel=0.03)
    theory = math.sqrt((1 / np.sum(1 / s**2)) / (np.sum(s**2) / len(s) ** 2))  # ~0.875
    got = {wt: _noise(combine_registered(reg, StackConfig(rejection="mean", weighting=wt)).image, sky)
           for wt in ("none", "noise")}
    ratio = got["noise"] / got["none"]
    # measured 0.886 against 0.875: within 10 % of the predicted ratio (the acceptance), and
    # within 0.02 of it (weights within a few percent of the inverse variances)
    assert abs(ratio / theory - 1) < 0.10 and abs(ratio - theory) < 0.02, (ratio, theory)


@pytest.fixture(scope="module")
def bilinear_session(session, tmp_path_factory):
    """The same lights registered with the bilinear debayer (linear in the star flux)."""
    truth, reg = session
    reg_b = register_session(discover_session(truth.root),
                             StackConfig(quiet=True, debayer="bilinear",
                                         cache_dir=str(tmp_path_factory.mktemp("cb"))))
    yield truth, reg_b
    reg_b.close()


@pytest.mark.parametrize("debayer, tol", [("rcd", 0.04), ("bilinear", 0.03)])
def test_scale_follows_the_signal_not_the_noise(request, debayer, tol):
    """The star-flux ratio is the truth's transparency ratio, for the noisy light too (the
    dispersion ratio, the old scale, reads ~1.95 for it: its signal would be halved).

    RCD (the default debayer) is not linear in a sharp star's flux: its ratio-corrected
    green gains 0.5-1.9 % on stars of 1.8-4 px FWHM, with the seeing, so the frames'
    ratios carry up to ~3 % of seeing (measured 3.1 % on light 4 here, bilinear 1.4 %).
    """
    truth, reg = request.getfixturevalue("session" if debayer == "rcd" else "bilinear_session")
    ap = normalize.star_apertures(reg.frame(reg.ref))
    assert len(ap.boxes) >= normalize.MIN_SIGNAL_STARS
    t = np.array([lt.transparency for lt in truth.lights])
    for i in reg.used:
        ratio = normalize.signal_ratios(reg.frame(i), ap)
        assert ratio == pytest.approx(t[i] / t[reg.ref], rel=tol), (i, ratio)


def test_highpass_noise_ignores_level_and_gradient(rng):
    img = rng.normal(0.0, 0.01, size=(300, 400)).astype(np.float32)
    yy, xx = np.mgrid[0:300, 0:400]
    ramp = (0.5 + 0.002 * xx + 0.001 * yy).astype(np.float32)
    for step in (1, 2):
        assert normalize.highpass_noise(img, step=step) == pytest.approx(0.01, rel=0.03)
        assert normalize.highpass_noise(img + ramp, step=step) == pytest.approx(0.01, rel=0.03)
        assert normalize.highpass_noise(3 * img, step=step) == pytest.approx(0.03, rel=0.03)


def test_star_apertures_leave_out_hot_pixels(rng):
    """Hot pixels of the reference are not stars: the star-flux ratio follows the stars.

    Seestar frames without darks carry hundreds of hot pixels; on the reference they
    made most of the apertures (measured: 300 apertures and a 0.75 ratio for every
    frame after RCD, instead of 39 and ~0.99).
    """
    h, w = 300, 400
    yy, xx = np.mgrid[0:h, 0:w]
    stars = np.zeros((h, w))
    for x, y, f in zip(rng.uniform(20, w - 20, 30), rng.uniform(20, h - 20, 30), rng.uniform(2e3, 2e4, 30)):
        stars += f / (2 * np.pi * 1.3 ** 2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.3 ** 2))

    def frame(scale):
        img = 100.0 + scale * stars + rng.normal(0.0, 3.0, (h, w))
        hot = rng.integers(0, h * w, 300)  # different hot pixels in every frame (the frames are dithered)
        img.ravel()[hot] += 400.0
        return np.stack([img, img, img]).astype(np.float32)

    ref, other = frame(1.0), frame(0.8)
    ap = normalize.star_apertures(ref)
    assert 20 <= len(ap.boxes) <= 30
    assert normalize.signal_ratios(other, ap)[0] == pytest.approx(0.8, rel=0.02)


def test_frame_measures_fallback_dispersion_from_a_sample(rng):
    """The registered frames' dispersion (only a fallback) is read on ~40k pixels of a 1 MP frame:
    within 1.5 % of the truth's sigma on a flat sky, within 4 % with a strong gradient (the 32-px
    block flattening leaves ~3 % there on every pixel too), and the median within 0.01 sigma."""
    h, w = 800, 1200
    yy, xx = np.mgrid[0:h, 0:w]
    sig = np.array([3.0, 5.0, 8.0])
    empty = normalize.StarApertures(boxes=[], inside=[], ring=[], ref_flux=np.zeros(0))
    for sky, tol in ((np.full((h, w), 100.0), 0.015), (100.0 + 0.01 * xx + 0.02 * yy, 0.04)):
        img = np.stack([sky + rng.normal(0.0, s, (h, w)) for s in sig]).astype(np.float32)
        st, _ = normalize.frame_measures(img, empty)
        assert st.scale == pytest.approx(sig, rel=tol)
        assert np.all(np.abs(st.location - np.median(sky)) < 0.01 * sig + 0.02)
