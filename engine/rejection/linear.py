"""``"linear"``: linear fit clipping (kernel ``linear_fit_clip_mean``).

Linear fit clipping, like Siril's. Per round, the ``m`` kept values sorted
ascending ``s_j`` against their rank ``x_j = j`` (0..m-1) get a least-squares
line ``fit_j = ym + slope * (x_j - xm)`` (``xm = (m-1)/2``, ``ym`` = mean,
``slope = sum((x-xm)(s-ym)) / sum((x-xm)^2)``); ``sigma`` = mean of
``|s_j - fit_j|``; values with ``fit_j - s_j > kl*sigma`` or
``s_j - fit_j > kh*sigma`` are dropped (Siril divides by sigma instead; the
product form gives no rejection when sigma is 0). Ranks are recounted over
the values kept each round; rounds repeat like ``"sigma"``. A residual
alone on its side of the line is exactly ``m/2`` sigma (the residuals sum
to 0), so kappas of 1.5, 2, 2.5 meet 3, 4, 5 values on that edge, where
rounding decides.
"""

from __future__ import annotations

import numpy as np

from skystack.engine.rejection.base import (ClipResult, RejectionMethod, _HALF, _kept_mean_ranks, _normalised,
                                            _rank_mask, _running_count, _seqsum, _sorted, _zeroed)


def _linear_fit_clip_mean_numpy(cube: np.ndarray, kappa_low: np.float32, kappa_high: np.float32,
                                max_iter: int, scale: np.ndarray, offset: np.ndarray,
                                weights: np.ndarray) -> ClipResult:
    """NumPy twin of the ``linear_fit_clip_mean`` kernel.

    Works on the sorted ranks with a kept mask; a rejected rank adds an exact
    zero (+0 or -0, which leave a sum started at +0 unchanged) to every sum,
    so the sums equal the kernel's over its compacted array.
    """
    n, h, w = cube.shape
    v, valid = _normalised(cube, scale, offset)
    srt, order = _sorted(v)
    nvalid = valid.sum(axis=0)
    kept = _rank_mask(0, nvalid, n)  # over ranks of srt
    idx = np.flatnonzero(nvalid >= 3) if max_iter > 0 else np.empty(0, dtype=np.intp)
    sz, k = _zeroed(srt[:, idx]), kept[:, idx]
    m = nvalid[idx]
    for _ in range(max_iter):
        if idx.size == 0:
            break
        kf = k.astype(np.float32)
        mf = m.astype(np.float32)
        xm = (m - 1).astype(np.float32) * _HALF
        s0 = sz * kf
        ym = _seqsum(s0) / mf
        t = _running_count(kf)  # rank among the kept values, + 1
        t -= xm + np.float32(1.0)  # x - xm, exact
        t *= kf  # rejected ranks: +-0
        slope = _seqsum(t * (s0 - ym)) / _sum_sq_dev_ranks(m)
        r = t * slope
        r += ym  # the fit
        np.subtract(s0, r, out=r)  # s - fit
        sigma = _seqsum(np.abs(r) * kf) / mf
        bad = r < -(kappa_low * sigma)  # fit - s > kappa_low*sigma (negation is exact)
        bad |= r > kappa_high * sigma
        new = np.greater(k, bad)  # kept and not bad
        m2 = new.sum(axis=0)
        go = (m2 >= 3) & (m2 != m)
        kept[:, idx[go]] = new[:, go]
        idx, sz, k, m = idx[go], sz[:, go], new[:, go], m2[go]
    return _kept_mean_ranks(v, valid, order, kept, weights, (h, w))


def _sum_sq_dev_ranks(m: np.ndarray) -> np.ndarray:
    """``sum((x - xm)^2)`` over ranks ``x = 0..m-1``, ``m (m^2 - 1) / 12`` in float32 (like the kernel)."""
    mf = m.astype(np.float32)
    return mf * (mf * mf - np.float32(1.0)) / np.float32(12.0)


#: Linear fit's sigma is the mean absolute residual (~0.8 sigma) and the tails of sorted Gaussian
#: values bend away from the line, so kappa 3 rejects ~4.5 % of pure noise (noise gain 0.90 sqrt(N)
#: at N = 20), hence its larger default.
METHOD = RejectionMethod("linear", (4.0, 4.0), "standard deviations", "linear_fit_clip_mean",
                         _linear_fit_clip_mean_numpy)
