"""A frame in the reference's star apertures on a device (``kernels/framestats.cu``) against its twin.

``aperture_measure`` runs a thread per aperture of a group; under the g++ emulator it must give
``normalize._aperture_arrays_numpy``'s arrays bit for bit: box-minus-background in the aperture,
the channel maxima and whether the box is whole, for odd and even ring counts, NaN and inf in the
frame, a ring with no data, padding, one channel and three.
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
        dev, peak, whole = np.full((rows, k), -1.0), np.full((c, rows), 7.0, np.float32), np.zeros(rows, bool)
        mod.launch("aperture_measure", rows, (frame, g.index, g.valid, g.inside, g.ring, dev, peak, whole,
                                              np.empty((rows, k), np.float32), np.int64(rows), np.int64(k),
                                              np.int32(c), np.int64(plane)))
        t_dev, t_peak, t_whole = normalize._aperture_arrays_numpy(frame, g)
        np.testing.assert_array_equal(dev, t_dev)
        np.testing.assert_array_equal(peak, t_peak)
        np.testing.assert_array_equal(whole, t_whole)
    # the cases the frame was made for are there: a partial box, and an even and an odd ring count
    n_ring = np.concatenate([(g.ring & g.valid).sum(axis=1) for g in groups])
    assert {0, 1} <= set(n_ring % 2)
    flux, _peak = normalize._aperture_fluxes(frame, ap)
    assert np.isnan(flux).any() and np.isfinite(flux).sum() >= 10
