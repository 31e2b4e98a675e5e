"""``"winsorized"``: winsorized sigma clipping (kernel ``winsorized_clip_mean``).

Winsorized sigma clipping, like Siril's but from a robust start. Per
round: ``c = median(kept)``; the robust sigma starts at
``sigma = MAD-sigma(kept)`` (stop if it is 0; Siril starts from the std,
which an outlier inflates) and repeats (at most
:data:`WINSOR_MAX_ITER` times) ``L = max(L, c - 1.5 sigma)``,
``U = min(U, c + 1.5 sigma)`` (``L, U`` start at -inf, +inf),
``w = clip(kept, L, U)``, ``sigma' = 1.134 * std1(w)``, until
``|sigma' - sigma| <= 0.0005 * sigma``; ``std1`` divides by ``n - 1``
like Siril's (with ``n`` it would average 0.94 sigma on 20 Gaussian
values instead of 0.98). Siril winsorizes its working copy cumulatively,
which is the running ``L``/``U``; 1.134 corrects the std of Gaussian data
winsorized at 1.5 sigma (0.882 sigma) back to sigma. Then the *original*
kept values below ``c - kl*sigma'`` or above ``c + kh*sigma'`` are
dropped. Rounds repeat like ``"sigma"``. (Siril has no cap on the inner
loop; the cap stops a pixel whose sigma shrinks geometrically towards 0,
e.g. four equal values and one other, from running into subnormal numbers.)

The rules every method shares (the smallest kept count, ``max_iter = 0``, the median,
the std, the MAD-sigma) are in :mod:`skystack.engine.combine`; kl and kh are
``kappa_low`` and ``kappa_high``.
"""

from __future__ import annotations

import numpy as np

from skystack.engine.rejection.base import (ROBUST_MIN_KEPT, ClipResult, RejectionMethod, _clip_range,
                                            _kept_mean_interval, _mad_sigma, _median_sorted, _normalised,
                                            _rank_mask, _seqsum, _sort_values, _zeroed)

#: Most rounds of the winsorized (Huber) sigma loop (``WINSOR_MAX_ITER`` in combine.cu).
WINSOR_MAX_ITER = 50


def _winsorized_sigma(sz: np.ndarray, inside: np.ndarray, cntf: np.ndarray, dof: np.ndarray,
                      centre: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """The Huber-like sigma of ``"winsorized"`` per column, from the start ``sigma``.

    ``sz``: sorted values, 0 where none; ``inside``: 0/1 float mask of the kept ranks.
    """
    sigma = sigma.copy()
    lo = np.full(sigma.shape, -np.inf, dtype=np.float32)
    hi = np.full(sigma.shape, np.inf, dtype=np.float32)
    act = np.arange(sigma.size)
    for _ in range(WINSOR_MAX_ITER):
        if act.size == 0:
            break
        c, sg, ins, cf, df = centre[act], sigma[act], inside[:, act], cntf[act], dof[act]
        lo_a = np.maximum(lo[act], c - np.float32(1.5) * sg)
        hi_a = np.minimum(hi[act], c + np.float32(1.5) * sg)
        lo[act], hi[act] = lo_a, hi_a
        wv = np.minimum(hi_a, np.maximum(lo_a, sz[:, act]))
        wv *= ins
        mean_w = _seqsum(wv) / cf
        d = wv - mean_w
        d *= ins
        new = np.float32(1.134) * np.sqrt(_seqsum(d * d) / df)
        sigma[act] = new
        act = act[np.abs(new - sg) > sg * np.float32(0.0005)]
    return sigma


def _winsorized_clip_mean_numpy(cube: np.ndarray, kappa_low: np.float32, kappa_high: np.float32,
                                max_iter: int, scale: np.ndarray, offset: np.ndarray,
                                weights: np.ndarray) -> ClipResult:
    """NumPy twin of the ``winsorized_clip_mean`` kernel."""
    n, h, w = cube.shape
    v, valid = _normalised(cube, scale, offset)
    srt = _sort_values(v)
    srt_z = _zeroed(srt)
    nvalid = valid.sum(axis=0)
    a = np.zeros(v.shape[1], dtype=np.intp)
    b = nvalid.astype(np.intp)
    idx = np.flatnonzero(b >= 3) if max_iter > 0 else np.empty(0, dtype=np.intp)
    for _ in range(max_iter):
        if idx.size == 0:
            break
        s, sz, ai, bi = srt[:, idx], srt_z[:, idx], a[idx], b[idx]
        cntf = (bi - ai).astype(np.float32)
        dof = (bi - ai - 1).astype(np.float32)
        inside = _rank_mask(ai, bi, n).astype(np.float32)
        centre = _median_sorted(s, ai, bi)
        start = _mad_sigma(s, ai, bi, centre)
        sigma = _winsorized_sigma(sz, inside, cntf, dof, centre, start)
        a2, b2 = _clip_range(s, ai, bi, nvalid[idx], centre - kappa_low * sigma, centre + kappa_high * sigma)
        go = (start > 0) & ((b2 - a2) >= ROBUST_MIN_KEPT) & ((a2 != ai) | (b2 != bi))
        a[idx[go]] = a2[go]
        b[idx[go]] = b2[go]
        idx = idx[go]
    return _kept_mean_interval(v, valid, srt, a, b, weights, (h, w))


METHOD = RejectionMethod("winsorized", (3.0, 3.0), "standard deviations", "winsorized_clip_mean",
                         _winsorized_clip_mean_numpy)
