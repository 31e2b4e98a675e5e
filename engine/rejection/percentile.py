"""``"percentile"``: percentile clipping (kernel ``percentile_clip_mean``).

Percentile clipping, like Siril's, one pass (any ``max_iter >= 1``):
``c = median(valid)``; unless ``c == 0`` (then nothing is rejected, as in
Siril), drop ``v < c - kl*|c|`` and ``v > c + kh*|c|``. **The kappas are
fractions of the median here** (Siril's defaults are 0.2 and 0.1), not
standard deviations; ``|c|`` keeps the bounds ordered for a negative median
(Siril's data is never negative).
"""

from __future__ import annotations

import numpy as np

from skystack.engine.rejection.base import (ClipResult, RejectionMethod, _clip_range, _kept_mean_interval,
                                            _median_sorted, _normalised, _sort_values)


def _percentile_clip_mean_numpy(cube: np.ndarray, kappa_low: np.float32, kappa_high: np.float32,
                                max_iter: int, scale: np.ndarray, offset: np.ndarray,
                                weights: np.ndarray) -> ClipResult:
    """NumPy twin of the ``percentile_clip_mean`` kernel."""
    n, h, w = cube.shape
    v, valid = _normalised(cube, scale, offset)
    srt = _sort_values(v)
    nvalid = valid.sum(axis=0).astype(np.intp)
    a = np.zeros_like(nvalid)
    b = nvalid.copy()
    idx = np.flatnonzero(nvalid >= 3) if max_iter > 0 else np.empty(0, dtype=np.intp)
    if idx.size:
        s, nv = srt[:, idx], nvalid[idx]
        centre = _median_sorted(s, np.zeros_like(nv), nv)
        ac = np.abs(centre)
        a2, b2 = _clip_range(s, np.zeros_like(nv), nv, nv, centre - kappa_low * ac, centre + kappa_high * ac)
        go = (centre != 0) & ((b2 - a2) >= 3)
        a[idx[go]] = a2[go]
        b[idx[go]] = b2[go]
    return _kept_mean_interval(v, valid, srt, a, b, weights, (h, w))


METHOD = RejectionMethod("percentile", (0.2, 0.1), "fractions of the median", "percentile_clip_mean",
                         _percentile_clip_mean_numpy)
