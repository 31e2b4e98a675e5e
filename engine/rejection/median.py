"""``"median"``: the median of the valid values (kernel ``median_combine``).

The median of the valid values (``count`` = valid values, nothing
rejected). Weights, kappas and ``max_iter`` are ignored.
"""

from __future__ import annotations

import numpy as np

from skystack.engine.rejection.base import (ClipResult, RejectionMethod, _median_sorted, _normalised,
                                            _sort_values)


def _median_combine_numpy(cube: np.ndarray, kappa_low: np.float32, kappa_high: np.float32,
                          max_iter: int, scale: np.ndarray, offset: np.ndarray,
                          weights: np.ndarray) -> ClipResult:
    """NumPy twin of the ``median_combine`` kernel (kappas, max_iter and weights unused)."""
    n, h, w = cube.shape
    v, valid = _normalised(cube, scale, offset)
    srt = _sort_values(v)  # NaN last
    nvalid = valid.sum(axis=0).astype(np.intp)
    has = nvalid > 0
    med = _median_sorted(srt, np.zeros_like(nvalid), np.maximum(nvalid, 1))
    med = np.where(has, med, np.float32(np.nan)).astype(np.float32)
    return ClipResult(mean=med.reshape(h, w), count=nvalid.astype(np.int32).reshape(h, w),
                      rejected=np.zeros(n, dtype=np.int64))


METHOD = RejectionMethod("median", (3.0, 3.0), "", "median_combine", _median_combine_numpy)
