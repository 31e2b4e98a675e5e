"""Plain float64 aperture photometry for the tests (independent of the engine's)."""

from __future__ import annotations

import numpy as np


def aperture_sums(img: np.ndarray, xy: np.ndarray, *, r: float, r_in: float, r_out: float, half: int,
                  annulus: bool = True) -> np.ndarray:
    """float64 sums (N, C) of ``img`` ``(C, H, W)`` within ``r`` of each ``(x, y)``, less the median
    of the annulus ``r_in <= d < r_out`` when ``annulus``, from a ``2 half + 1`` px cut-out."""
    out = []
    size = 2 * half + 1
    for x, y in xy:
        x0, y0 = int(x) - half, int(y) - half
        sub = img[:, y0:y0 + size, x0:x0 + size].astype(np.float64)
        yy, xx = np.mgrid[y0:y0 + size, x0:x0 + size]
        d2 = (xx - x) ** 2 + (yy - y) ** 2
        ap, an = d2 <= r * r, (d2 >= r_in ** 2) & (d2 < r_out ** 2)
        out.append([(c[ap] - (np.median(c[an]) if annulus else 0.0)).sum() for c in sub])
    return np.array(out)
