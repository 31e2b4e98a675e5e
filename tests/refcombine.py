"""Float64 reference combine for the tests: pixel by pixel, straight from the definitions.

Shared by ``test_combine.py`` (sigma clipping) and ``test_reject.py`` (the other
rejection methods); independent of the twins and kernels they check.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def reference_combine(cube: np.ndarray, keep_of: Callable[[np.ndarray, np.ndarray], np.ndarray], *,
                      scale=None, offset=None, weights=None, median: bool = False
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Combine an ``(N, H, W)`` cube in float64: ``(mean, count, rejected per frame)``.

    Each pixel's values are ``cube * scale + offset``; ``keep_of(v, valid)`` says
    which of them are kept (``valid``: the finite ones) and the result is their
    ``weights``-weighted mean. With ``median`` the result is the median of the
    finite values instead (nothing rejected, ``keep_of`` not called).
    """
    n, h, w = cube.shape
    scale = np.ones(n) if scale is None else np.asarray(scale, np.float64)
    offset = np.zeros(n) if offset is None else np.asarray(offset, np.float64)
    weights = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    mean = np.full((h, w), np.nan)
    count = np.zeros((h, w), np.int64)
    rejected = np.zeros(n, np.int64)
    for y in range(h):
        for x in range(w):
            v = cube[:, y, x].astype(np.float64) * scale + offset
            valid = np.isfinite(v)
            if median:
                count[y, x] = valid.sum()
                if valid.any():
                    mean[y, x] = np.median(v[valid])
                continue
            keep = keep_of(v, valid)
            count[y, x] = keep.sum()
            if keep.any() and weights[keep].sum() > 0:
                mean[y, x] = np.sum(weights[keep] * v[keep]) / weights[keep].sum()
            rejected += valid & ~keep
    return mean, count, rejected


def clip_round(v: np.ndarray, within: np.ndarray, keep: np.ndarray, centre: float, sigma: float,
               kappa_low: float, kappa_high: float) -> np.ndarray | None:
    """One clipping round: the values of ``within`` inside ``[centre - kappa_low sigma, centre +
    kappa_high sigma]``, or None (stop) when fewer than 2 remain or ``keep`` would not change."""
    new = within & (v >= centre - kappa_low * sigma) & (v <= centre + kappa_high * sigma)
    if new.sum() < 2 or (new == keep).all():
        return None
    return new
