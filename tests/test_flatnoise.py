"""engine/flatnoise.py: the local plane the flat's pixel noise is measured against."""

import numpy as np

from skystack.engine.flatnoise import local_plane


def _plane_reference(f, good, window):
    """Per pixel, np.linalg.lstsq of a plane through the good pixels of its window (float64)."""
    h, w = f.shape
    r = window // 2
    out = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            y0, y1, x0, x1 = max(0, y - r), min(h, y + r + 1), max(0, x - r), min(w, x + r + 1)
            yy, xx = np.mgrid[y0:y1, x0:x1]
            m = good[y0:y1, x0:x1]
            a = np.column_stack([np.ones(m.sum()), (xx - x)[m], (yy - y)[m]])
            out[y, x] = np.linalg.lstsq(a, f[y0:y1, x0:x1][m], rcond=None)[0][0]
    return out


def test_local_plane_is_the_windows_least_squares_plane():
    """Borders (one-sided windows, a vignetting slope) and holes (bad pixels) as well as the inside."""
    rng = np.random.default_rng(5)
    h, w = 30, 41
    yy, xx = np.mgrid[0:h, 0:w]
    f = 1.0 + 0.4 * ((xx - 20) / 20.0) ** 2 + 0.2 * yy / h + rng.normal(0, 0.01, (h, w))
    good = rng.random((h, w)) > 0.05
    good[10:12, 5:15] = False  # a dust spot's defect line
    ref = _plane_reference(f, good, 5)
    got = local_plane(f, good, 5)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
    # and a plane is reproduced exactly, even at the corners
    plane = 2.0 + 0.01 * xx - 0.02 * yy
    np.testing.assert_allclose(local_plane(plane, good, 5), plane, rtol=1e-10)
