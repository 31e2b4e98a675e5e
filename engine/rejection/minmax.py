"""``"minmax"``: min/max rejection (kernel ``minmax_clip_mean``).

Drop the ``k_low`` lowest and ``k_high`` highest valid values, ``k = int(kappa)``
for ``kappa >= 1`` and ``k = 1`` below (so ``kappa`` 0 still drops one
value per side); nothing is dropped unless ``k_low + k_high + 3`` values
are valid. Equal values are ranked in frame order (a stable sort), which
decides which frame loses a tied value.
"""

from __future__ import annotations

import numpy as np

from skystack.engine.rejection.base import (MAX_SUPPORTED_FRAMES, ClipResult, RejectionMethod,
                                            _kept_mean_ranks, _normalised, _rank_mask, _sorted)


def _minmax_count(kappa: np.float32) -> int:
    """Values ``"minmax"`` drops on one side for ``kappa`` (as the kernel computes it)."""
    k = np.float32(kappa)
    if not k >= 1:
        return 1
    return int(k) if k < MAX_SUPPORTED_FRAMES else MAX_SUPPORTED_FRAMES


def _minmax_clip_mean_numpy(cube: np.ndarray, kappa_low: np.float32, kappa_high: np.float32,
                            max_iter: int, scale: np.ndarray, offset: np.ndarray,
                            weights: np.ndarray) -> ClipResult:
    """NumPy twin of the ``minmax_clip_mean`` kernel."""
    n, h, w = cube.shape
    v, valid = _normalised(cube, scale, offset)
    _srt, order = _sorted(v)
    nvalid = valid.sum(axis=0).astype(np.intp)
    k_low, k_high = _minmax_count(kappa_low), _minmax_count(kappa_high)
    go = (nvalid - k_low - k_high >= 3) & (max_iter > 0)
    a = np.where(go, k_low, 0)
    b = np.where(go, nvalid - k_high, nvalid)
    return _kept_mean_ranks(v, valid, order, _rank_mask(a, b, n), weights, (h, w))


METHOD = RejectionMethod("minmax", (1.0, 1.0), "values per side", "minmax_clip_mean", _minmax_clip_mean_numpy)
