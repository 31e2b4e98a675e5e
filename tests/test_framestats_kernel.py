"""A frame in the reference's star apertures on a device (``kernels/framestats.cu``) against its twin.

``aperture_measure`` runs a thread per aperture of a group; under the g++ emulator it must give
``normalize._aperture_measure_numpy``'s numbers bit for bit: the flux of the box-minus-background in
the aperture (NaN unless the box is whole) and the channel maxima, for odd and even ring counts, NaN
and inf in the frame, a ring with no data, padding, one channel and three.
"""

from __future__ import annotations

import numpy as np
import pytest

from skystack.engine import normalize
from skystack.kernels.emulate import emulated, emulator_available

pytestmark = pytest.mark.skipif(not emulator_available(), reason="g++ is not on PATH")


def _frame_and_apertures(rng, channels: int):
    h, w = 320, 420
    yy, xx = np.mgrid[0:h, 0:w]
    ref = rng.normal(50, 2, (channels, h, w)).astype(np.float32)
    for y, x, f in zip(rng.uniform(20, h - 20, 40), rng.uniform(20, w - 20, 40), rng.uniform(300, 5000, 40)):
        sigma = rng.choice([1.0, 3.0], p=[0.7, 0.3]) * rng.uniform(0.8, 1.2)  # a few wide stars: two box groups
        ref += (f * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma ** 2))).astype(np.float32)
    ap = normalize.star_apertures(ref)
    frame = (ref * np.float32(0.93) + rng.normal(0, 2, ref.shape).astype(np.float32)).astype(np.float32)
    frame[:, :, :40] = np.nan  # boxes with missing pixels, rings with none
    frame[0, 150:170, 100:200] = np.inf
    frame[-1, 60:80, 200:330] = -np.inf
    return frame, ap


@pytest.mark.parametrize("channels", [1, 3])
def test_aperture_measure_gives_the_twins_arrays(rng, channels):
    frame, ap = _frame_and_apertures(rng, channels)
    groups = ap.tables(np)
    assert len(ap.boxes) >= 15 and len(groups) >= 2
    mod = emulated("framestats.cu")
    c, plane = frame.shape[0], frame.shape[1] * frame.shape[2]
    for g in groups:
        rows, k = g.index.shape
        flux, peak = np.full(rows, -1.0), np.full(c * rows, 7.0)
        mod.launch("aperture_measure", rows, (frame, g.index, g.valid, g.inside, g.ring, flux, peak,
                                              np.empty((rows, k), np.float32), np.int64(rows), np.int64(k),
                                              np.int32(c), np.int64(plane)))
        t_flux, t_peak = np.full(rows, -2.0), np.full(c * rows, 8.0)
        normalize._aperture_measure_numpy(frame, g, t_flux, t_peak)
        np.testing.assert_array_equal(flux, t_flux)
        np.testing.assert_array_equal(peak, t_peak)
        # against float64 sums of each whole box's aperture less the median of its ring (float32 medians)
        for r in range(rows):
            box = frame.reshape(c, -1)[:, g.index[r]].sum(axis=0, dtype=np.float32)
            ring = box[g.ring[r] & ~np.isnan(box)]
            whole = np.isfinite(box[g.valid[r]]).all()
            want = (box[g.inside[r]].astype(np.float64) - np.median(ring)).sum() if whole and ring.size else np.nan
            np.testing.assert_allclose(flux[r], want, rtol=1e-5, atol=1e-3)
            tops = [np.nanmax(np.where(g.valid[r], frame.reshape(c, -1)[ch, g.index[r]], np.nan), initial=-np.inf)
                    for ch in range(c)]
            np.testing.assert_array_equal(peak.reshape(c, rows)[:, r], tops)
    # the cases the frame was made for are there: a partial box, and an even and an odd ring count
    n_ring = np.concatenate([(g.ring & g.valid).sum(axis=1) for g in groups])
    assert {0, 1} <= set(n_ring % 2)
    flux, _peak = normalize._aperture_fluxes(frame, ap)
    assert np.isnan(flux).any() and np.isfinite(flux).sum() >= 10


@pytest.mark.parametrize("shape,k,sample", [((121, 97), 2, 40_000), ((121, 97), 1, 2_000), ((6, 9), 2, 40_000),
                                            ((2, 50), 1, 40_000)])
def test_highpass_residuals_give_the_twins_and_the_four_neighbours(rng, shape, k, sample):
    """``highpass_residuals`` under the emulator: the twin's array bit for bit (odd sizes, so the
    Bayer sub-grids differ in size; sub-sampled rows; grids too small for any residual), and the
    twin's values are each sub-grid pixel less the float32 mean of its four neighbours there."""
    x = rng.normal(100, 3, shape).astype(np.float32)
    x[rng.random(shape) < 0.05] = np.nan
    grids = normalize._residual_grids(*shape, k, sample)
    n = max(1, max(g[3] for g in grids))
    out = np.full((k * k, n), -1.0, np.float32)
    emulated("framestats.cu").launch("highpass_residuals", k * k * n,
                                     (x, out, np.int64(shape[0]), np.int64(shape[1]), np.int32(k), np.int64(sample),
                                      np.int64(n)))
    ref = normalize._residuals_twin(x, k, sample, n)
    np.testing.assert_array_equal(out, ref)
    for g, (hg, wg, rstep, count) in enumerate(grids):
        grid = x[g // k::k, g % k::k].astype(np.float64)
        want = [grid[i, j] - 0.25 * (grid[i - 1, j] + grid[i + 1, j] + grid[i, j - 1] + grid[i, j + 1])
                for i in range(1, hg - 1, rstep) for j in range(1, wg - 1)]
        assert count == len(want) and np.isnan(ref[g, count:]).all()
        np.testing.assert_allclose(ref[g, :count], want, rtol=0, atol=1e-3)
    if shape == (121, 97) and sample == 2_000:
        assert grids[0][2] == 5  # rows sub-sampled


def test_rows_without_clipping_and_with_too_few_values(rng):
    """``clipped_mad_sigma_rows`` with no rounds gives each row's median of its finite values (np.median's
    number) and their MAD-sigma; a row with fewer finite values than ``min_count`` gives NaN. The
    kernel (emulated) and its twin agree bit for bit."""
    from skystack.engine import robust

    v = rng.normal(10, 2, (6, 101)).astype(np.float32)
    v[1, :60] = np.nan  # 41 values left
    v[2, ::3] = np.inf
    v[3, :] = np.nan
    v[4, :70] = np.nan  # 31 left: under min_count 32
    for rounds, min_count in ((0, 1), (0, 32), (2, 32)):
        out = np.full((2, 6), -1.0)
        emulated("framestats.cu").launch("clipped_mad_sigma_rows", 6, (v, np.empty((6, 202), np.float32), out[0], out[1],
                                                                       np.int64(6), np.int64(101), np.int32(rounds),
                                                                       np.int64(min_count)))
        twin = np.array(robust.clipped_median_sigma_rows(v, rounds=rounds, min_count=min_count))
        np.testing.assert_array_equal(out, twin)
        for r in range(6):
            f = v[r][np.isfinite(v[r])].astype(np.float32)
            if f.size < max(1, min_count):
                assert np.isnan(out[:, r]).all()
            elif rounds == 0:
                med = np.median(f)
                assert out[0, r] == float(med)
                assert out[1, r] == 1.4826 * float(np.median(np.abs(f - med)))
    assert np.isfinite(out[:, 4]).sum() == 0 and np.isfinite(out[:, 1]).all()
