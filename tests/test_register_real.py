"""Registration of real Seestar S50 frames (../shared/realdata/seestar-m94).

Session 1: 20 lights of one night (dithered by up to ~35 px); session 3: two
lights from another S50 two weeks later, rotated by about 69.4 degrees and
shifted by about 660 binned px (a partial overlap). The frames are raw GRBG
mosaics; detection bins them 2x2 and fits the stars on the full mosaic.
"""

from __future__ import annotations

import numpy as np
import pytest

from skystack.engine.detect import choose_reference, detect_stars, measure_quality
from skystack.engine.match import grid_rms, match_stars

pytestmark = pytest.mark.realdata

SHAPE = (1920, 1080)


def _read(path):
    from astropy.io import fits

    try:
        from skystack.engine.io import read_frame

        fr = read_frame(path)
        return fr.data, fr.meta.pattern
    except ImportError:  # pragma: no cover - io.py is built by another helper
        return fits.getdata(path), fits.getheader(path).get("BAYERPAT", "GRBG").strip()


@pytest.fixture(scope="module")
def m94(realdata):
    root = realdata / "seestar-m94"
    s1 = sorted((root / "lights_session1").glob("*.fit"))
    s3 = sorted((root / "lights_session3_rotated").glob("*.fit"))
    if len(s1) != 20 or len(s3) != 2:
        pytest.skip("seestar-m94 is incomplete")
    stars = []
    for p in s1 + s3:
        data, pattern = _read(p)
        assert data.shape == SHAPE and pattern == "GRBG"
        stars.append(detect_stars(data, pattern=pattern))
    return stars[:20], stars[20:]


def test_session1_all_frames_register_to_one_reference(m94):
    s1, _ = m94
    qual = [measure_quality(s) for s in s1]
    assert all(q.n_stars >= 25 for q in qual)
    assert all(2.0 < q.fwhm_px < 3.5 for q in qual)  # Seestar S50: ~2.4 px stars
    ref = choose_reference(qual)
    residuals, transforms = [], []
    for i, s in enumerate(s1):
        res = match_stars(s, s1[ref])
        residuals.append(res.residual_rms_px)
        transforms.append(res.transform)
        assert res.n_inliers >= 20
        assert abs(res.rotation_deg) < 0.1 and abs(res.scale - 1) < 1e-3
        assert np.all(np.abs(res.transform[:2, 2]) < 60)  # dither shifts, ~35 px at most
    print("\nsession 1 residual RMS of matched stars (px): "
          + " ".join(f"{r:.3f}" for r in residuals) + f"; reference frame {ref}")
    assert max(residuals) < 0.5
    # consistency: matching frame a to frame b directly agrees with going through the reference
    for a, b in ((0, 19), (3, 11), (7, 15)):
        direct = match_stars(s1[a], s1[b]).transform
        via_ref = np.linalg.inv(transforms[b]) @ transforms[a]
        assert grid_rms(direct, via_ref, SHAPE) < 0.1


def test_session3_rotated_frames_register_to_session1(m94):
    s1, s3 = m94
    ref = choose_reference([measure_quality(s) for s in s1])
    out = []
    for s in s3:
        res = match_stars(s, s1[ref])
        out.append(res)
        assert res.rotation_deg == pytest.approx(69.4, abs=1.0)
        assert res.scale == pytest.approx(1.0, abs=0.005)
        assert res.n_inliers >= 10
        assert res.residual_rms_px < 0.5
    print("\nsession 3 -> session 1: " + "; ".join(
        f"rotation {r.rotation_deg:.2f} deg, {r.n_inliers} stars, residual {r.residual_rms_px:.3f} px" for r in out))
    # the two session-3 frames agree with each other through session 1
    direct = match_stars(s3[0], s3[1]).transform
    via = np.linalg.inv(out[1].transform) @ out[0].transform
    assert grid_rms(direct, via, SHAPE) < 0.5


@pytest.mark.parametrize("k,pattern", [(2, "GBRG"), (1, "RGGB"), (3, "BGGR")])
def test_real_frame_rotated_by_multiples_of_90_degrees(realdata, k, pattern):
    """A session-1 frame turned by k x 90 degrees (np.rot90, exact) registers to itself.

    The Bayer pattern turns with the pixels (GRBG -> GBRG at 180 degrees). The
    truth is exact, and the pixels are the same, so any error comes from the
    detection or matching not being rotation-equivariant (a colour bias of a
    2x2-binned centroid, for example, would show here).
    """
    path = sorted((realdata / "seestar-m94" / "lights_session1").glob("*.fit"))[0]
    data, pat = _read(path)
    assert pat == "GRBG"
    rot = np.ascontiguousarray(np.rot90(data, k))
    h, w = data.shape
    # np.rot90 turns counter-clockwise on the array: new (x', y') came from old (x, y)
    truth = {
        1: np.array([[0.0, -1.0, w - 1], [1.0, 0.0, 0.0], [0, 0, 1]]),
        2: np.array([[-1.0, 0.0, w - 1], [0.0, -1.0, h - 1], [0, 0, 1]]),
        3: np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, h - 1], [0, 0, 1]]),
    }[k]
    ref = detect_stars(data, pattern="GRBG")
    st = detect_stars(rot, pattern=pattern)
    res = match_stars(st, ref)
    err = grid_rms(res.transform, truth, rot.shape)
    print(f"\nrot90 k={k}: {res.n_inliers} stars, residual {res.residual_rms_px:.4f} px, error vs exact {err:.4f} px")
    assert res.n_inliers >= 25
    assert err < 0.02
