"""Stack + finish end to end; saves preview pictures to ``artifacts/finish/`` for a look.

* a small synthetic night (the ``skystack demo`` pipeline at 800x600, 12 lights),
  checked against the simulator's truth: crop coverage, flat sky, white stars;
* the real Seestar S50 session of M 94 (``realdata``; skipped without it).

Each writes ``*_stack.png`` (the stack's own preview stretch) and
``*_finished.jpg`` (``finish`` with its defaults).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from skystack.engine.background import object_mask
from skystack.engine.finish import FinishConfig, finish_image, write_finished
from skystack.engine.output import write_preview
from skystack.engine.session import discover_session
from skystack.engine.stack import StackConfig, combine_registered, register_session
from skystack.engine.stretch import autostretch

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "finish"


def _stack_with_coverage(files, cfg: StackConfig):
    """Stack, and count the registered frames with data at each pixel (the coverage map)."""
    with register_session(files, cfg) as reg:
        coverage = np.zeros(reg.store.shape[1:], dtype=np.int32)
        for i in reg.used:
            coverage += np.isfinite(reg.frame(i)[0]).astype(np.int32)
        result = combine_registered(reg, cfg)
    return result, coverage


def _block_ptp(img: np.ndarray, sky: np.ndarray, block: int) -> np.ndarray:
    """Per channel: peak-to-peak of sky-pixel block medians over their median."""
    import warnings

    out = []
    h, w = img.shape[1:]
    for c in img:
        a = np.where(sky, c, np.nan).astype(np.float64)
        blk = a[: h // block * block, : w // block * block].reshape(h // block, block, w // block, block)
        blk = blk.transpose(0, 2, 1, 3).reshape(h // block, w // block, -1)
        enough = np.isfinite(blk).sum(axis=2) > 0.3 * block * block
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # blocks without sky
            med = np.nanmedian(np.where(enough[..., None], blk, np.nan), axis=2)
        out.append((np.nanmax(med) - np.nanmin(med)) / np.nanmedian(med))
    return np.array(out)


def _photometry(img, xy, r, r_in, r_out):
    out = []
    half = int(math.ceil(r_out)) + 1
    for x, y in xy:
        x0, y0 = int(round(x)) - half, int(round(y)) - half
        sub = img[:, y0:y0 + 2 * half + 1, x0:x0 + 2 * half + 1].astype(np.float64)
        yy, xx = np.mgrid[y0:y0 + 2 * half + 1, x0:x0 + 2 * half + 1]
        d2 = (xx - x) ** 2 + (yy - y) ** 2
        ap, an = d2 <= r * r, (d2 >= r_in ** 2) & (d2 < r_out ** 2)
        out.append([(c[ap] - np.median(c[an])).sum() for c in sub])
    return np.array(out)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from skystack.tools.synth import SynthConfig, load_truth, simulate

    root = tmp_path_factory.mktemp("demo")
    cfg = SynthConfig(seed=1, width=800, height=600, n_lights=12, n_bias=4, n_darks=4, n_flats=4,
                      n_dark_flats=0)
    simulate(cfg, root / "session")
    truth = load_truth(root / "session")
    # the truth's reference light, so the stack's grid is the truth's reference grid
    scfg = StackConfig(quiet=True, cache_dir=str(root / "cache"),
                       reference=str(truth.file_path("light", truth.reference_index)))
    result, coverage = _stack_with_coverage(discover_session(root / "session"), scfg)
    fin = finish_image(result.image, count=coverage, n_frames=result.n_used, config=FinishConfig())
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    write_preview(ARTIFACTS / "demo_stack.png", autostretch(result.image))
    write_finished(fin, ARTIFACTS / "demo_finished.jpg")
    return {"truth": truth, "result": result, "coverage": coverage, "fin": fin}


def test_demo_crop_keeps_only_well_covered_pixels(demo):
    y0, y1, x0, x1 = demo["fin"].crop
    n = demo["result"].n_used
    cov = demo["coverage"]
    assert cov.min() < 0.9 * n  # field rotation and drift left ragged edges
    assert cov[y0:y1, x0:x1].min() >= 0.9 * n
    assert (y1 - y0) * (x1 - x0) > 0.85 * cov.size  # measured 96.7 %


def test_demo_sky_is_flat_and_stars_are_white(demo):
    truth, fin, result = demo["truth"], demo["fin"], demo["result"]
    y0, y1, x0, x1 = fin.crop
    stars = truth.sky(None, stars=True, background=False, gradient=False)[:, y0:y1, x0:x1]
    sky = ~ndimage.binary_dilation(stars.max(axis=0) > 3.0, iterations=3)  # > ~0.2 sigma of the stack
    before = _block_ptp(result.image[:, y0:y1, x0:x1], sky, 32)
    after = _block_ptp(fin.linear, sky, 32)
    # the stack keeps the simulator's light-pollution gradient (27 % of green, 42 % in red);
    # measured before 36.6 / 20.8 / 17.4 %, after 0.68 / 0.42 / 0.55 % (R/G/B peak-to-peak)
    assert before.max() > 0.15
    assert after.max() < 0.01, after
    # the average star is white: the calibration's reference stars (all real stars of the
    # truth), photometered here with other apertures. (test_colour checks the gains against
    # the truth colours; here the stack's own colour response sits in between.)
    xy = fin.colour.stars_xy
    h, w = fin.linear.shape[1:]
    xy = xy[(xy[:, 0] > 20) & (xy[:, 0] < w - 21) & (xy[:, 1] > 20) & (xy[:, 1] < h - 21)]
    tree = cKDTree(truth.stars.xy - [x0, y0])
    matched = np.array([len(js) > 0 for js in tree.query_ball_point(xy, 2.0)])
    assert len(xy) >= 30 and matched.mean() > 0.95
    ph = _photometry(fin.linear, xy, 7.0, 10.0, 16.0)
    average = np.median(ph / ph[:, 1:2], axis=0)
    # measured 1.001 : 1 : 1.007 over 59 stars when written; 1.018 : 1 : 0.994 (2.4 %) at d9dfa9b and
    # 1.024 : 1 : 0.987 (3.7 %) with skystack's own detection: on the same stacked image the white
    # reference stars and their median colours agree with sep's within 0.1 %, and the registrations
    # are as close to the truth (0.007-0.019 px); the stars the calibration picks on the new stack
    # differ. The stack's own are 1.01 : 1 : 1.05.
    assert average.max() / average.min() - 1 < 0.04, average
    # The stack keeps its lights' star colours: the normalisation scales every channel of a
    # light by one star-flux ratio. (The old per-channel dispersion scale lifted red by ~19 %:
    # 1.198 : 1 : 0.956 here, against ~1.0 : 1 : 1.05 in the lights themselves.)
    before = _photometry(result.image[:, y0:y1, x0:x1], xy, 7.0, 10.0, 16.0)
    assert abs(np.median(before / before[:, 1:2], axis=0)[0] - 1) < 0.05


@pytest.mark.slow
@pytest.mark.realdata
def test_seestar_m94_finish(realdata):
    """20 Seestar S50 frames of M 94: stack (~30 s on 2 cores), finish, save the pictures."""
    lights = realdata / "seestar-m94" / "lights_session1"
    if not lights.is_dir():
        pytest.skip("seestar-m94 session 1 is absent")
    from skystack.engine.session import split_inputs

    scfg = StackConfig(quiet=True)
    result, coverage = _stack_with_coverage(split_inputs([str(lights)]), scfg)
    n = result.n_used
    assert n >= 18
    fin = finish_image(result.image, count=coverage, n_frames=n, config=FinishConfig())
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    write_preview(ARTIFACTS / "seestar_m94_stack.png", autostretch(result.image))
    write_finished(fin, ARTIFACTS / "seestar_m94_finished.jpg")

    # dithered frames (shifts up to ~35 px): the crop removes the poorly covered border
    y0, y1, x0, x1 = fin.crop
    assert coverage.min() < 0.9 * n
    assert coverage[y0:y1, x0:x1].min() >= 0.9 * n
    assert (y1 - y0) * (x1 - x0) > 0.8 * coverage.size
    # flat sky (stars masked, and the galaxy with its faint halo: 300 px around it). The
    # field had little gradient: measured 0.98 / 0.88 / 0.64 % before, 0.44 / 0.51 / 0.66 % after
    # (R/G/B peak-to-peak of 64-px blocks; blue is noisier after its 1.87x white-balance gain)
    mask, _ = object_mask(fin.linear)
    sky = ~ndimage.binary_dilation(mask, iterations=4)
    lum = ndimage.gaussian_filter(np.nan_to_num(fin.linear.mean(axis=0)), 15)
    gy, gx = np.unravel_index(int(np.argmax(lum)), lum.shape)
    yy, xx = np.mgrid[0:lum.shape[0], 0:lum.shape[1]]
    sky &= np.hypot(xx - gx, yy - gy) > 300
    assert abs(gx - lum.shape[1] / 2) < 150 and abs(gy - lum.shape[0] / 2) < 150  # M 94 is central
    after = _block_ptp(fin.linear, sky, 64)
    assert after.max() < 0.01, after
    # the median star is white (stars found by the calibration, measured here independently,
    # in an aperture of twice the FWHM measured here): measured 0.998 : 1 : 0.994 over 57 stars
    # (RCD, r = 4.65 px; bilinear 1.006 : 1 : 0.992 at 6.37 px). The Seestar's star images are
    # broader in R and B than in G, so star colours depend on the aperture: with RCD at 6 px
    # (2.5 FWHM) 1.031 : 1 : 1.020, at 8 px 1.043 : 1 : 1.065 (bilinear: 1.003 : 1 : 0.990
    # and 1.012 : 1 : 1.006)
    xy = fin.colour.stars_xy
    assert len(xy) >= 20
    from skystack.engine.detect import detect_stars

    found = detect_stars(np.nan_to_num(fin.linear.mean(axis=0)))
    r = 2.0 * float(np.median(found.fwhm[found.flag == 0]))
    assert 4.0 < r < 7.0, r
    ph = _photometry(fin.linear, xy, r, r + 3.0, r + 9.0)
    ok = (ph > 0).all(axis=1)
    med = np.median(ph[ok] / ph[ok, 1:2], axis=0)
    assert med.max() / med.min() - 1 < 0.03, med
    # the raw Seestar colour was far from it (no camera white balance in the FITS)
    assert abs(fin.colour.gains[2] - 1.0) > 0.3
