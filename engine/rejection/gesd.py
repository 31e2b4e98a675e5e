"""``"gesd"``: the generalized extreme Studentized deviate test (kernel ``gesd_clip_mean``).

Generalized extreme Studentized deviate test (Rosner 1983), as in Siril and PixInsight;
one pass (any ``max_iter >= 1``). **kl is the largest fraction of outliers** (default
0.3) **and kh the significance** (default 0.01; Siril's 0.05 rejects ~1.5 % of pure
noise at 13 values). With the ``n`` valid values sorted, ``r = int(kl * n)`` steps
(while at least 3 values are left): ``mean`` and ``std1`` of the kept values; the value
farthest from the mean (the highest on a tie) has deviation ``dev``; step ``j`` is
significant if ``dev > lambda(m) * std1`` for the ``m`` values tested, with Rosner's
critical value ``lambda(m) = (m-1) t / sqrt((m-2+t^2) m)``, ``t`` the ``1 - kh/(2m)``
quantile of Student's t with ``m - 2`` degrees of freedom
(:func:`gesd_critical_values`); drop that value. The outliers are the values dropped up
to the last significant step. The statistics come from running sums (one step costs
O(1)): with ``d = s - k``, ``k`` the sorted middle value ``s[(n-1)//2]``, ``S1 =
sum(d)`` and ``S2 = sum(d*d)`` in rank order, ``mean = k + S1/m`` and ``std1 =
sqrt(max(0, (S2 - S1 * (S1/m)) / (m-1)))``; a dropped ``d`` is subtracted from ``S1``
and ``d*d`` from ``S2``, except where ``d*d > S2/2`` (a large outlier, whose difference
would lose bits): there both sums are recomputed over the values left.
"""

from __future__ import annotations

import numpy as np

from skystack.engine.errors import SkystackError
from skystack.engine.rejection.base import (ClipResult, RejectionMethod, _HALF, _ZERO, _kept_mean_ranks,
                                            _normalised, _rank_mask, _seqsum, _sorted, _zeroed)


def gesd_critical_values(n_frames: int, alpha: float) -> np.ndarray:
    """Rosner's GESD critical values ``lambda[m]`` for ``m = 0..n_frames`` tested values, float32.

    ``lambda[m] = (m-1) t / sqrt((m-2+t^2) m)`` with ``t`` the ``1 - alpha/(2m)``
    quantile of Student's t with ``m - 2`` degrees of freedom; ``inf`` below 3
    values (the test needs 3).

    Parameters
    ----------
    n_frames : int
        Largest number of values tested.
    alpha : float
        Significance of each step, in (0, 1).

    Returns
    -------
    ndarray, (n_frames + 1,) float32
    """
    # scipy.special's inverse t CDF, which scipy.stats.t.ppf calls: importing scipy.stats would
    # add ~0.9 s to the first combine of a stack (scipy.special is loaded by then)
    from scipy.special import stdtrit

    lam = np.full(n_frames + 1, np.inf)
    m = np.arange(3, n_frames + 1, dtype=np.float64)
    if m.size:
        t = stdtrit(m - 2.0, 1.0 - alpha / (2.0 * m))
        lam[3:] = (m - 1.0) * t / np.sqrt((m - 2.0 + t * t) * m)
    return lam.astype(np.float32)


def _gesd_clip_mean_numpy(cube: np.ndarray, kappa_low: np.float32, kappa_high: np.float32,
                          max_iter: int, scale: np.ndarray, offset: np.ndarray,
                          weights: np.ndarray) -> ClipResult:
    """NumPy twin of the ``gesd_clip_mean`` kernel (``kappa_high`` sets the critical values).

    Running sums of the values shifted by their sorted middle value, as in the
    kernel: each step costs O(pixels still active), not O(frames x pixels).
    """
    n, h, w = cube.shape
    v, valid = _normalised(cube, scale, offset)
    srt, order = _sorted(v)
    lam = gesd_critical_values(n, float(kappa_high))
    nvalid = valid.sum(axis=0).astype(np.intp)
    r = (kappa_low * nvalid.astype(np.float32)).astype(np.intp) if max_iter > 0 else np.zeros_like(nvalid)
    r[nvalid < 3] = 0
    cols = np.arange(v.shape[1])
    with np.errstate(invalid="ignore"):  # no data: NaN - NaN, zeroed
        d = _zeroed(srt - srt[(np.maximum(nvalid, 1) - 1) // 2, cols])
    s1, s2 = _seqsum(d), _seqsum(d * d)
    a, b = np.zeros_like(nvalid), nvalid.copy()
    a_out, b_out = a.copy(), b.copy()
    idx = np.flatnonzero(r > 0)
    for j in range(1, int(r.max(initial=0)) + 1):
        idx = idx[(j <= r[idx]) & (b[idx] - a[idx] >= 3)]
        if idx.size == 0:
            break
        ai, bi, t1, t2 = a[idx], b[idx], s1[idx], s2[idx]
        mf = (bi - ai).astype(np.float32)
        md = t1 / mf
        sd = np.sqrt(np.fmax((t2 - t1 * md) / (mf - np.float32(1.0)), _ZERO))
        lo_v, hi_v = d[ai, idx], d[bi - 1, idx]
        lo_d, hi_d = md - lo_v, hi_v - md
        high = hi_d >= lo_d
        hit = np.where(high, hi_d, lo_d) > lam[bi - ai] * sd
        x = np.where(high, hi_v, lo_v)
        b[idx] = bi - high
        a[idx] = ai + ~high
        a_out[idx[hit]] = a[idx[hit]]
        b_out[idx[hit]] = b[idx[hit]]
        x2 = x * x
        big = x2 > t2 * _HALF
        s1[idx], s2[idx] = t1 - x, t2 - x2
        if big.any():  # a large value left: recompute over the new range, not a lossy difference
            sub = idx[big]
            dz = d[:, sub] * _rank_mask(a[sub], b[sub], n)
            s1[sub], s2[sub] = _seqsum(dz), _seqsum(dz * dz)
    return _kept_mean_ranks(v, valid, order, _rank_mask(a_out, b_out, n), weights, (h, w))


def _check(kl: float, kh: float) -> None:
    """GESD's kappas are an outlier fraction (at most 1) and a significance (in (0, 1))."""
    if not (kl <= 1 and 0 < kh < 1):
        raise SkystackError(f"gesd takes an outlier fraction <= 1 and a significance in (0, 1), got {kl:g} {kh:g}")


def _tables(n_frames: int, kh: float) -> tuple[np.ndarray]:
    """The kernel's ``lambda``: the critical values at the significance ``kh`` as the kernel gets it (float32)."""
    return (gesd_critical_values(n_frames, float(np.float32(kh))),)


METHOD = RejectionMethod("gesd", (0.3, 0.01), "outlier fraction, significance", "gesd_clip_mean",
                         _gesd_clip_mean_numpy, check=_check, tables=_tables)
