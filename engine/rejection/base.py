"""What every rejection method declares, and the NumPy building blocks of their twins.

A method is a :class:`RejectionMethod`: its name, default kappas and what they
mean, its kernel in ``kernels/combine.cu`` and the kernel's NumPy twin. The twins
are vectorised over pixels and run the kernels' float32 operations in the
kernels' order, with the helpers below (each names the ``combine.cu`` helper it
mirrors), so a kernel and its twin give the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from skystack.engine.robust import MAD_TO_SIGMA

__all__ = ["ClipResult", "RejectionMethod", "MAX_SUPPORTED_FRAMES", "ROBUST_MIN_KEPT", "WINSOR_MAX_ITER"]

#: Compile-time sizes of the kernel's per-thread sort buffer (``-DMAX_FRAMES=``).
FRAME_BUCKETS = (64, 256, 1024, 4096)
#: Most frames one tile may hold (on either backend, so results never depend on it).
MAX_SUPPORTED_FRAMES = FRAME_BUCKETS[-1]
#: Sigma and winsorized (robust centre and scale) may reject down to this many kept values.
ROBUST_MIN_KEPT = 2
#: Most rounds of the winsorized (Huber) sigma loop (``WINSOR_MAX_ITER`` in combine.cu).
WINSOR_MAX_ITER = 50

_ZERO = np.float32(0.0)
_HALF = np.float32(0.5)


@dataclass(frozen=True, kw_only=True)
class ClipResult:
    """Result of :func:`skystack.engine.combine.combine` (arrays on the input's backend).

    Attributes
    ----------
    mean : ndarray, (H, W) float32
        Weighted mean of the kept values (for ``"median"``: the median); NaN
        where a pixel has none.
    count : ndarray, (H, W) int32
        Number of values kept per pixel.
    rejected : ndarray, (N,) int64
        Per frame, how many of its valid values were rejected.
    """

    mean: Any
    count: Any
    rejected: Any


@dataclass(frozen=True)
class RejectionMethod:
    """One rejection method of :func:`skystack.engine.combine.combine`.

    Each module of :mod:`skystack.engine.rejection` declares one as ``METHOD``;
    the registry, the settings' choices, the CLI's choices and ``--kappa`` help
    and the default kappas follow from it.
    """

    name: str
    #: default ``(kappa_low, kappa_high)``
    kappas: tuple[float, float]
    #: what the kappas are, for ``--help`` ("" when the method takes none: its kernel gets 0, 0)
    meaning: str
    #: entry point in ``kernels/combine.cu``
    kernel: str
    #: the kernel's NumPy twin (the reference every backend is tested against):
    #: ``twin(cube, kappa_low, kappa_high, max_iter, scale, offset, weights) -> ClipResult``
    twin: Callable[..., ClipResult]
    #: ``check(kappa_low, kappa_high)`` raises ``SkystackError`` for kappas the method refuses
    #: (None: any finite kappas >= 0)
    check: Callable[[float, float], None] | None = None
    #: ``tables(n_frames, kappa_high)``: host arrays the kernel takes between ``weights`` and
    #: ``kappa_low`` (GESD: its critical values); None: none
    tables: Callable[[int, float], tuple[np.ndarray, ...]] | None = None
    #: a fixed ``max_iter`` ("mean": 0, no round of sigma's kernel); None: the caller's
    max_iter: int | None = None


# ----------------------------------------------------------------------------- NumPy building blocks


def _normalised(cube: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(v, valid)``, both ``(N, H*W)``: ``cube*scale + offset`` (two roundings, like the kernels), NaN = no data."""
    n = cube.shape[0]
    v = cube.reshape(n, -1) * scale[:, None] + offset[:, None]
    valid = np.isfinite(v)
    v[~valid] = np.nan
    return v, valid


def _seqsum(x: np.ndarray) -> np.ndarray:
    """Sum over axis 0 of a 2-D float32 array, row after row from +0 (the kernels' loop order).

    NumPy's reduce keeps that order only where each row is the contiguous
    inner loop; on one column, or on a non-C-contiguous array (the fancy-indexed
    and ``np.where`` temporaries of the twins can be F-ordered), it sums pairwise
    instead, which flips values on a clip boundary. Hence the contiguous copy,
    and ``np.add.accumulate`` (sequential by definition) on one column.
    """
    if x.shape[1] == 1:
        return np.add.accumulate(np.concatenate(([_ZERO], x[:, 0])))[-1:]
    return np.add.reduce(np.ascontiguousarray(x), axis=0, initial=_ZERO)


def _sort_values(v: np.ndarray) -> np.ndarray:
    """Each pixel's values sorted ascending, NaN last, ``(N, P)`` (sorting the contiguous transpose is fastest)."""
    t = np.array(v.T, order="C")  # a copy, even where v.T is contiguous already (one pixel)
    t.sort(axis=1)
    return np.ascontiguousarray(t.T)


def _sorted(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each pixel's values like the kernels' pair sort: ``(srt, order)``, both ``(N, P)``.

    Ascending by value, ties in frame order (-0 ties with +0), NaN last;
    ``order[r, p]`` is the frame holding rank ``r`` of pixel ``p``. One sort of
    64-bit keys (the float's bits mapped to an ordered unsigned int, then the
    frame number) is several times faster than a stable argsort.
    """
    n = v.shape[0]
    t = np.ascontiguousarray(v.T)  # (P, N)
    bits = (t + _ZERO).view(np.uint32)  # a copy; -0 + 0 = +0
    flip = bits >> np.uint32(31)
    np.negative(flip, out=flip)  # 0 -> 0, 1 -> 0xFFFFFFFF
    flip |= np.uint32(0x80000000)
    bits ^= flip  # negative: all bits flipped, positive: sign bit set -> unsigned order = float order
    key = bits.astype(np.uint64)
    key <<= np.uint64(16)
    key |= np.arange(n, dtype=np.uint64)
    key.sort(axis=1)
    order = (key & np.uint64(0xFFFF)).astype(np.int32)
    srt = np.take_along_axis(t, order, axis=1)
    return np.ascontiguousarray(srt.T), np.ascontiguousarray(order.T)


def _median_sorted(srt: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Median of the sorted ranks ``[a, b)`` of each column (``b > a``), like ``combine_median``."""
    cnt = b - a
    cols = np.arange(srt.shape[1])
    return (srt[a + (cnt - 1) // 2, cols] + srt[a + cnt // 2, cols]) * _HALF


_MAD_FACTORS = np.array([1.0, 1.0, 1.196, 1.495, 1.363, 1.206, 1.200, 1.140, 1.129, 1.107], np.float32)


def _mad_sigma(srt: np.ndarray, a: np.ndarray, b: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """MAD-sigma of the sorted ranks ``[a, b)`` of each column around ``centre``, like ``combine_mad_sigma``."""
    d = np.abs(srt - centre)
    d[~_rank_mask(a, b, srt.shape[0])] = np.inf
    d.sort(axis=0)
    m = b - a
    cols = np.arange(srt.shape[1])
    mad = (d[(m - 1) // 2, cols] + d[m // 2, cols]) * _HALF
    mf = m.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(m < _MAD_FACTORS.size, _MAD_FACTORS[np.minimum(m, _MAD_FACTORS.size - 1)],
                          mf / (mf - np.float32(0.8))).astype(np.float32)
    return (np.float32(MAD_TO_SIGMA) * factor) * mad


def _rank_mask(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """``(N, P)`` bool: rank ``r`` lies in ``[a, b)``."""
    r = np.arange(n)[:, None]
    return (r >= a) & (r < b)


def _std_masked(sz: np.ndarray, maskf: np.ndarray, cntf: np.ndarray, div: np.ndarray) -> np.ndarray:
    """Std of the rows of each column where ``maskf`` is 1: ``sqrt(sum((s - mean)^2) / div)``, row-order sums.

    ``sz`` must be finite (0 where there is no data): masking multiplies by
    0/1, which is exact, and the +-0 it adds leaves a sum started at +0
    unchanged, while ``np.where`` on irregular masks is several times slower.
    """
    mean = _seqsum(sz * maskf) / cntf
    d = sz - mean
    d *= maskf
    return np.sqrt(_seqsum(d * d) / div)


def _zeroed(a: np.ndarray) -> np.ndarray:
    """Copy of ``a`` with NaN (no data) replaced by 0, for mask-by-multiplication."""
    return np.where(np.isnan(a), _ZERO, a)


def _running_count(kf: np.ndarray) -> np.ndarray:
    """Cumulative sum over axis 0 of a 0/1 float32 mask (a loop over rows: ``np.cumsum`` over axis 0 is slow)."""
    c = np.empty_like(kf)
    c[0] = kf[0]
    for r in range(1, kf.shape[0]):
        np.add(c[r - 1], kf[r], out=c[r])
    return c


def _clip_range(s: np.ndarray, a: np.ndarray, b: np.ndarray, nvalid: np.ndarray,
                lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shrink each sorted rank range ``[a, b)`` to the values in ``[lo, hi]``, like ``combine_clip_range``."""
    n_below = (s < lo).sum(axis=0)  # sorted: a prefix (NaN compares False)
    n_above = (s > hi).sum(axis=0)  # and a suffix of the valid values
    a2 = np.minimum(np.maximum(a, n_below), b)
    b2 = np.maximum(a2, np.minimum(b, nvalid - n_above))
    return a2, b2


def _kept_mean(v: np.ndarray, valid: np.ndarray, kept: np.ndarray, weights: np.ndarray,
               shape: tuple[int, int]) -> ClipResult:
    """Weighted mean (frame order), count and per-frame rejections of the ``kept`` ``(N, P)`` mask."""
    n, p = v.shape
    vz = _zeroed(v)
    keptf = kept.astype(np.float32)
    acc = np.zeros(p, dtype=np.float32)
    wsum = np.zeros(p, dtype=np.float32)
    for f in range(n):  # frame order; a value not kept adds +-0
        acc += (weights[f] * vz[f]) * keptf[f]
        wsum += weights[f] * keptf[f]
    rejected = valid.sum(axis=1, dtype=np.int64) - kept.sum(axis=1, dtype=np.int64)  # kept is a subset
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(wsum > 0, acc / wsum, np.float32(np.nan)).astype(np.float32)
    count = kept.sum(axis=0, dtype=np.int32)
    return ClipResult(mean=mean.reshape(shape), count=count.reshape(shape), rejected=rejected)


def _kept_mean_interval(v: np.ndarray, valid: np.ndarray, srt: np.ndarray, a: np.ndarray, b: np.ndarray,
                        weights: np.ndarray, shape: tuple[int, int]) -> ClipResult:
    """:func:`_kept_mean` for kept sorted ranks ``[a, b)`` that hold every value in ``[srt[a], srt[b-1]]``."""
    n, p = v.shape
    cols = np.arange(p)
    has = b > a
    lo_v = np.where(has, srt[np.minimum(a, n - 1), cols], np.float32(np.inf))
    hi_v = np.where(has, srt[np.maximum(b - 1, 0), cols], np.float32(-np.inf))
    return _kept_mean(v, valid, (v >= lo_v) & (v <= hi_v), weights, shape)


def _kept_mean_ranks(v: np.ndarray, valid: np.ndarray, order: np.ndarray, kept_ranks: np.ndarray,
                     weights: np.ndarray, shape: tuple[int, int]) -> ClipResult:
    """:func:`_kept_mean` for a kept mask over sorted ranks (mapped to frames through ``order``)."""
    n, p = order.shape
    itype = np.int32 if n * p < 2**31 else np.int64  # flat indices (faster than put_along_axis)
    flat = order.astype(itype) * itype(p)
    flat += np.arange(p, dtype=itype)
    kept = np.empty_like(kept_ranks)
    kept.ravel()[flat.ravel()] = kept_ranks.ravel()
    return _kept_mean(v, valid, kept, weights, shape)


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


def _robust_clip_mean(winsorized: bool, cube: np.ndarray, kappa_low: np.float32, kappa_high: np.float32,
                      max_iter: int, scale: np.ndarray, offset: np.ndarray, weights: np.ndarray) -> ClipResult:
    """Twin of the sigma (``winsorized`` False) and winsorized kernels, whose rounds are ``combine_robust_rounds``.

    The kept set is every valid value in an interval, so the kept values are a
    rank range ``[a, b)`` of each pixel's sorted values.
    """
    n, h, w = cube.shape
    v, valid = _normalised(cube, scale, offset)
    srt = _sort_values(v)  # NaN last
    srt_z = _zeroed(srt)
    nvalid = valid.sum(axis=0)
    a = np.zeros(v.shape[1], dtype=np.intp)
    b = nvalid.astype(np.intp)
    idx = np.flatnonzero(b >= 3) if max_iter > 0 else np.empty(0, dtype=np.intp)
    for it in range(max_iter):
        if idx.size == 0:
            break
        s, ai, bi = srt[:, idx], a[idx], b[idx]
        centre = _median_sorted(s, ai, bi)
        cntf = (bi - ai).astype(np.float32)
        if winsorized or it == 0:
            start = sigma = _mad_sigma(s, ai, bi, centre)
        else:
            start = sigma = _std_masked(srt_z[:, idx], _rank_mask(ai, bi, n).astype(np.float32), cntf, cntf)
        if winsorized:
            inside = _rank_mask(ai, bi, n).astype(np.float32)
            sigma = _winsorized_sigma(srt_z[:, idx], inside, cntf, (bi - ai - 1).astype(np.float32), centre, start)
        nv = nvalid[idx]
        lo, hi = (ai, bi) if winsorized else (np.zeros_like(nv), nv)  # sigma: from every valid value
        a2, b2 = _clip_range(s, lo, hi, nv, centre - kappa_low * sigma, centre + kappa_high * sigma)
        go = (start > 0) & ((b2 - a2) >= ROBUST_MIN_KEPT) & ((a2 != ai) | (b2 != bi))
        a[idx[go]] = a2[go]
        b[idx[go]] = b2[go]
        idx = idx[go]
        idx = idx[b[idx] - a[idx] >= 3]  # the kernel's loop needs 3 kept values
    return _kept_mean_interval(v, valid, srt, a, b, weights, (h, w))
