"""Combine a stack of registered frames: kappa-sigma clipped, weighted mean per pixel.

The operation works on one ``(N, H, W)`` float32 tile (N frames; NaN, or any
non-finite value, means "no data" there). Per frame ``f`` the values are first
normalised, ``v = cube[f] * scale[f] + offset[f]``, then clipped per pixel like
Siril's sigma clipping:

1. ``kept`` = the valid values of the pixel;
2. ``centre`` = median of ``kept``; ``sigma`` = standard deviation of ``kept``
   (ddof = 0, around their mean);
3. drop ``v < centre - kappa_low * sigma`` and ``v > centre + kappa_high * sigma``;
4. repeat from 2 until nothing changes or ``max_iter`` rounds ran.

A pixel never drops below 3 kept values: a round that would leave fewer is
not applied and clipping stops there (so pixels with 1 or 2 valid values are
averaged unclipped). The result is the ``weights``-weighted mean of the kept
values (NaN where there are none), their count, and how many valid values of
each frame were rejected over the tile.

All sums run in frame order in float32 without fused multiply-add, in the CUDA
kernel (``kernels/combine.cu``, one thread per pixel) and in the NumPy twin
alike, so both backends return the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from skystack.engine.backend import array_module, is_device_array, launch
from skystack.engine.errors import NotBuiltYet, SkystackError

__all__ = ["ClipResult", "sigma_clip_mean", "combine", "MAX_SUPPORTED_FRAMES", "max_frames_define"]

#: Compile-time sizes of the kernel's per-thread sort buffer (``-DMAX_FRAMES=``).
_FRAME_BUCKETS = (64, 256, 1024, 4096)
#: Most frames one tile may hold (on either backend, so results never depend on it).
MAX_SUPPORTED_FRAMES = _FRAME_BUCKETS[-1]


@dataclass(frozen=True, kw_only=True)
class ClipResult:
    """Result of :func:`sigma_clip_mean` (arrays on the input's backend).

    Attributes
    ----------
    mean : ndarray, (H, W) float32
        Weighted mean of the kept values; NaN where a pixel has none.
    count : ndarray, (H, W) int32
        Number of values kept per pixel.
    rejected : ndarray, (N,) int64
        Per frame, how many of its valid values were rejected.
    """

    mean: Any
    count: Any
    rejected: Any


def max_frames_define(n_frames: int) -> tuple[str, ...]:
    """The ``MAX_FRAMES`` define of the kernel build used for ``n_frames`` frames."""
    for cap in _FRAME_BUCKETS:
        if n_frames <= cap:
            return (f"MAX_FRAMES={cap}",)
    raise SkystackError(
        f"sigma clipping takes at most {MAX_SUPPORTED_FRAMES} frames per tile, got {n_frames}; "
        "stack in groups and combine the group results"
    )


def _per_frame(xp, v, n: int, default: float, name: str, *, nonneg: bool = False):
    if v is None:
        return xp.full(n, default, dtype=xp.float32)
    a = xp.ascontiguousarray(xp.asarray(v, dtype=xp.float32).ravel())
    if a.shape != (n,):
        raise SkystackError(f"{name} must hold one value per frame ({n}), got {a.size} values")
    bad = ~xp.isfinite(a)
    if nonneg:
        bad |= a < 0
    if bool(bad.any()):
        raise SkystackError(f"{name} must be finite{' and >= 0' if nonneg else ''} for every frame")
    return a


def _sigma_clip_mean_numpy(cube: np.ndarray, kappa_low: np.float32, kappa_high: np.float32,
                           max_iter: int, scale: np.ndarray, offset: np.ndarray,
                           weights: np.ndarray) -> ClipResult:
    """NumPy twin of the ``sigma_clip_mean`` kernel: vectorised over pixels, same float32 ops."""
    n, h, w = cube.shape
    p = h * w
    v = cube.reshape(n, p) * scale[:, None] + offset[:, None]  # two roundings, like the kernel
    valid = np.isfinite(v)
    v[~valid] = np.nan
    srt = np.sort(v, axis=0)  # NaN last
    nvalid = valid.sum(axis=0)
    a = np.zeros(p, dtype=np.intp)
    b = nvalid.astype(np.intp)
    half = np.float32(0.5)
    zero = np.float32(0.0)
    idx = np.flatnonzero(b >= 3) if max_iter > 0 else np.empty(0, dtype=np.intp)
    for _ in range(max_iter):
        if idx.size == 0:
            break
        vs, ss_ = v[:, idx], srt[:, idx]
        ai, bi = a[idx], b[idx]
        cnt = bi - ai
        cols = np.arange(idx.size)
        centre = (ss_[ai + (cnt - 1) // 2, cols] + ss_[ai + cnt // 2, cols]) * half
        kept = (vs >= ss_[ai, cols]) & (vs <= ss_[bi - 1, cols])
        total = np.zeros(idx.size, dtype=np.float32)
        for f in range(n):  # frame order, like the kernel
            total += np.where(kept[f], vs[f], zero)
        cntf = cnt.astype(np.float32)
        mean = total / cntf
        sq = np.zeros(idx.size, dtype=np.float32)
        for f in range(n):
            d = np.where(kept[f], vs[f] - mean, zero)
            sq += d * d
        sigma = np.sqrt(sq / cntf)
        lo = centre - kappa_low * sigma
        hi = centre + kappa_high * sigma
        n_below = (ss_ < lo).sum(axis=0)  # sorted: a prefix (NaN compares False)
        n_above = (ss_ > hi).sum(axis=0)  # and a suffix of the valid values
        a2 = np.minimum(np.maximum(ai, n_below), bi)
        b2 = np.maximum(a2, np.minimum(bi, nvalid[idx] - n_above))
        go = ((b2 - a2) >= 3) & ((a2 != ai) | (b2 != bi))
        a[idx[go]] = a2[go]
        b[idx[go]] = b2[go]
        idx = idx[go]
    cnt = b - a
    cols = np.arange(p)
    has = cnt > 0
    lo_v = np.where(has, srt[np.minimum(a, n - 1), cols], np.float32(np.inf))
    hi_v = np.where(has, srt[np.maximum(b - 1, 0), cols], np.float32(-np.inf))
    acc = np.zeros(p, dtype=np.float32)
    wsum = np.zeros(p, dtype=np.float32)
    rejected = np.zeros(n, dtype=np.int64)
    for f in range(n):
        kept = (v[f] >= lo_v) & (v[f] <= hi_v)
        acc += np.where(kept, weights[f] * v[f], zero)
        wsum += np.where(kept, weights[f], zero)
        rejected[f] = int(np.count_nonzero(valid[f] & ~kept))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(wsum > 0, acc / wsum, np.float32(np.nan)).astype(np.float32)
    return ClipResult(mean=mean.reshape(h, w), count=cnt.astype(np.int32).reshape(h, w),
                      rejected=rejected)


def sigma_clip_mean(cube: Any, *, kappa_low: float = 3.0, kappa_high: float = 3.0,
                    max_iter: int = 10, scale: Any | None = None, offset: Any | None = None,
                    weights: Any | None = None) -> ClipResult:
    """Per-pixel iterative kappa-sigma clipped, weighted mean of an ``(N, H, W)`` tile.

    Parameters
    ----------
    cube : ndarray (NumPy or CuPy), (N, H, W)
        Registered frames, float (converted to float32); NaN/inf = no data.
    kappa_low, kappa_high : float
        Rejection thresholds below/above the median, in standard deviations (>= 0).
    max_iter : int
        Most clipping rounds (0: plain weighted mean of the valid values).
    scale, offset : array-like (N,), optional
        Per-frame normalisation ``v * scale + offset`` applied before clipping
        (default 1 and 0); the mean is in normalised units.
    weights : array-like (N,), optional
        Per-frame weights (>= 0) of the mean of the kept values (default 1).

    Returns
    -------
    ClipResult
        ``mean`` (H, W) float32, ``count`` (H, W) int32, ``rejected`` (N,) int64,
        on the backend of ``cube``.

    Raises
    ------
    SkystackError
        For a cube that is not (N, H, W), more than :data:`MAX_SUPPORTED_FRAMES`
        frames, negative kappas, or bad per-frame arrays.
    """
    if cube.ndim != 3 or cube.shape[0] < 1:
        raise SkystackError(f"combine needs an (N, H, W) tile with N >= 1, got shape {tuple(cube.shape)}")
    n, h, w = (int(s) for s in cube.shape)
    defines = max_frames_define(n)
    kl, kh = float(kappa_low), float(kappa_high)
    if not (np.isfinite(kl) and np.isfinite(kh) and kl >= 0 and kh >= 0):
        raise SkystackError(f"kappa values must be finite and >= 0, got {kl:g} and {kh:g}")
    if int(max_iter) < 0:
        raise SkystackError(f"max_iter must be >= 0, got {max_iter}")
    xp = array_module(cube)
    cube = xp.ascontiguousarray(cube, dtype=xp.float32)
    scale_a = _per_frame(xp, scale, n, 1.0, "scale")
    offset_a = _per_frame(xp, offset, n, 0.0, "offset")
    weights_a = _per_frame(xp, weights, n, 1.0, "weights", nonneg=True)
    if not is_device_array(cube):
        return _sigma_clip_mean_numpy(cube, np.float32(kl), np.float32(kh), int(max_iter),
                                      scale_a, offset_a, weights_a)
    mean = xp.empty((h, w), dtype=xp.float32)
    count = xp.empty((h, w), dtype=xp.int32)
    rejected = xp.zeros(n, dtype=xp.uint64)
    npix = h * w
    launch("combine.cu", "sigma_clip_mean", npix,
           (cube, np.int64(npix), np.int32(n), scale_a, offset_a, weights_a,
            np.float32(kl), np.float32(kh), np.int32(max_iter), mean, count, rejected),
           defines=defines)
    return ClipResult(mean=mean, count=count, rejected=rejected.view(xp.int64))


def combine(cube: Any, *, method: str = "sigma", kappa_low: float = 3.0, kappa_high: float = 3.0,
            max_iter: int = 10, scale: Any | None = None, offset: Any | None = None,
            weights: Any | None = None) -> ClipResult:
    """Combine an ``(N, H, W)`` tile with the rejection ``method``.

    ``"sigma"`` is :func:`sigma_clip_mean`; ``"mean"`` is the weighted mean of
    every valid value (no rejection). Other methods are not built yet.
    """
    if method == "sigma":
        return sigma_clip_mean(cube, kappa_low=kappa_low, kappa_high=kappa_high, max_iter=max_iter,
                               scale=scale, offset=offset, weights=weights)
    if method == "mean":
        return sigma_clip_mean(cube, max_iter=0, scale=scale, offset=offset, weights=weights)
    raise NotBuiltYet(f"rejection method {method!r} is not built yet; use --rejection sigma or mean")
