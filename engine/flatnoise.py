"""Pixel-scale noise of a master flat, and its Wiener shrinkage.

A master flat combined from ``n`` flat frames holds, at the pixel scale, the
sensor's real pixel response non-uniformity (PRNU, which calibration must
divide out) plus the flats' own shot noise divided by ``sqrt(n)``. With the
few flats most people take, the two are of the same size: five flats of
~5,000 e- carry ~0.6 % noise against a typical 0.5-1 % PRNU. Dividing every
light by that flat prints the flats' noise into each of them at the same
sensor pixels, and a session that barely drifts stacks it coherently: it
does not average down with the number of lights.

:func:`shrink_flat_noise` keeps the flat's large scales (vignetting, dust
donuts) untouched and replaces each pixel's relative deviation from its
neighbourhood ``h = F / S - 1`` (``S``: a least-squares plane through the
:data:`WINDOW`-square neighbourhood, :func:`local_plane`) by its
minimum-mean-square-error estimate
``k h`` with ``k = s_p^2 / (s_p^2 + v)`` (a Wiener factor), where

* ``v`` is the master's noise variance at that pixel, measured from the
  flat frames themselves (the spread of the ``n`` frames at each pixel,
  :class:`FlatNoiseStats`; Poisson-scaled with the flat's level), and
* ``s_p^2`` is the PRNU variance: the variance of ``h`` over the colour
  plane (robust, so dust edges and defects do not count) less ``v``.

So a flat made of many frames (``v << s_p^2``) is left as it is, and pure
noise is averaged away. Deviations far outside the noise (dust-donut edges,
cold or dead pixels: ``|h| > 4 sigma``) are kept whole, and the factor
rises smoothly to 1 between 2 and 4 sigma. Each CFA site (R, G1, G2, B) is
its own plane, and so is each plane of a colour flat.

This is the textbook estimator of a signal in white noise of known variance;
no peer applies it to flats by default. It changes nothing when the flats
are deep and many, and it cannot correct PRNU that the flats did not see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from skystack.engine.robust import mad_sigma
from skystack.engine.workers import map_threads

#: Side (in pixels of one colour plane) of the neighbourhood of the local plane ``S``.
WINDOW = 5
#: Deviations (in sigma of ``h``) below which the Wiener factor applies in
#: full, and above which the flat is kept as it is.
KEEP_FROM_SIGMA = 2.0
KEEP_ABOVE_SIGMA = 4.0
#: Every how many pixels a band's statistics are sampled (per axis).
SAMPLE_STEP = 3


def _planes(shape: tuple[int, ...], cfa: bool) -> list[tuple[Any, ...]]:
    """Index tuples of the independent planes: CFA sites, colour planes, or the whole frame."""
    if len(shape) == 3:
        return [(c, slice(None), slice(None)) for c in range(shape[0])]
    if cfa:
        return [(slice(dy, None, 2), slice(dx, None, 2)) for dy in (0, 1) for dx in (0, 1)]
    return [(slice(None), slice(None))]


def _sampled(planes: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The same planes, every :data:`SAMPLE_STEP`-th pixel of each (per axis)."""
    out = []
    for idx in planes:
        *lead, ys, xs = idx
        out.append((*lead, slice(ys.start, None, (ys.step or 1) * SAMPLE_STEP),
                    slice(xs.start, None, (xs.step or 1) * SAMPLE_STEP)))
    return out


@dataclass
class FlatNoiseStats:
    """Per-plane samples of the flat frames' spread, gathered band by band.

    Parameters
    ----------
    shape : tuple of int
        Shape of one flat (``(H, W)`` or ``(C, H, W)``).
    cfa : bool
        The frames are a Bayer mosaic (four sites, each its own plane).
    n : int
        Number of flat frames combined.
    """

    shape: tuple[int, ...]
    cfa: bool
    n: int
    _rel: list[list[np.ndarray]] = field(default_factory=list, repr=False)
    _level: list[list[np.ndarray]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        k = len(_planes(self.shape, self.cfa))
        self._rel = [[] for _ in range(k)]
        self._level = [[] for _ in range(k)]

    def add_band(self, frames: Any, scale: Any = None) -> None:
        """Sample one band of the offset-removed flat frames.

        Parameters
        ----------
        frames : ndarray (n, h, W) or (n, C, h, W)
            The band of every flat (NumPy or CuPy), offset removed; a CFA
            band starts on an even row, so each site keeps its phase.
        scale : array of n floats, optional
            Multipliers bringing each flat to the first one's level.
        """
        from skystack.engine.backend import array_module, to_host

        if self.n < 3:
            return
        xp = array_module(frames)
        for k, idx in enumerate(_sampled(_planes(self.shape, self.cfa))):
            x = frames[(slice(None),) + idx]  # rows stay in phase: bands start on even rows
            if scale is not None:
                x = x * xp.asarray(np.asarray(scale, dtype=np.float32)).reshape((-1,) + (1,) * (x.ndim - 1))
            m = to_host(x.mean(axis=0, dtype=xp.float64))
            v = to_host(x.var(axis=0, ddof=1, dtype=xp.float64))
            ok = np.isfinite(m) & np.isfinite(v) & (m > 0)
            self._rel[k].append((v[ok] / m[ok] ** 2).astype(np.float32))
            self._level[k].append(m[ok].astype(np.float32))

    def master_rel_var(self) -> list[float]:
        """Per plane: the master's relative noise variance at the plane's median level.

        The median of ``s^2 / m^2 * m / median(m)`` (Poisson-scaled to the
        median level), corrected from the median to the mean of a
        chi-square with ``n - 1`` degrees of freedom, divided by ``n``.
        NaN for a plane with no samples (or fewer than 3 flats).
        """
        dof = self.n - 1
        chi_median = (1.0 - 2.0 / (9.0 * dof)) ** 3 if dof > 0 else math.nan
        out = []
        for rel, lev in zip(self._rel, self._level):
            if not rel or self.n < 3:
                out.append(math.nan)
                continue
            r, lv = np.concatenate(rel), np.concatenate(lev)
            if r.size < 100:
                out.append(math.nan)
                continue
            med_level = float(np.median(lv))
            out.append(float(np.median(r * (lv / med_level))) / chi_median / self.n)
        return out


@dataclass(frozen=True)
class FlatShrinkage:
    """What :func:`shrink_flat_noise` measured and did (per plane, relative units).

    Attributes
    ----------
    noise : tuple of float
        The master's pixel noise (sigma, e.g. 0.006 = 0.6 %) before shrinking.
    prnu : tuple of float
        The estimated PRNU (sigma).
    residual : tuple of float
        Expected pixel error after shrinking, ``sqrt(s_p^2 v / (s_p^2 + v))``.
    """

    noise: tuple[float, ...]
    prnu: tuple[float, ...]
    residual: tuple[float, ...]

    def rms(self) -> tuple[float, float, float]:
        """(noise, PRNU, residual), each the RMS over the planes."""
        def r(v: tuple[float, ...]) -> float:
            return float(np.sqrt(np.mean(np.square(v))))

        return r(self.noise), r(self.prnu), r(self.residual)


def local_plane(f: np.ndarray, good: np.ndarray, window: int) -> np.ndarray:
    """Least-squares plane through the good pixels of each ``window``-square neighbourhood, at its centre.

    Inside the frame it equals the window's mean (a centred window's linear
    moments vanish); at the borders, where the window is one-sided, it
    follows the flat's slope (vignetting) instead of reflecting it. So the
    mean (two box filters) is taken everywhere and the plane is solved only
    where the window is not complete: the borders and around bad pixels.
    """
    from scipy import ndimage

    wgt = good.astype(np.float64)
    m0 = ndimage.uniform_filter(wgt, window, mode="constant", cval=0.0)
    s0 = ndimage.uniform_filter(np.where(good, f, 0.0), window, mode="constant", cval=0.0)
    out = np.where(m0 > 0, s0 / np.maximum(m0, 1e-300), 0.0)
    ys, xs = np.nonzero(m0 < 1.0 - 0.5 / window ** 2)  # some of the window is missing
    for k in range(0, ys.size, _PLANE_CHUNK):
        out[ys[k:k + _PLANE_CHUNK], xs[k:k + _PLANE_CHUNK]] = _plane_at(
            f, good, ys[k:k + _PLANE_CHUNK], xs[k:k + _PLANE_CHUNK], window // 2)
    return out


#: Pixels whose plane :func:`_plane_at` solves at once (memory: 25 x 8 bytes x a few arrays each).
_PLANE_CHUNK = 65536


def _plane_at(f: np.ndarray, good: np.ndarray, ys: np.ndarray, xs: np.ndarray, r: int) -> np.ndarray:
    """The least-squares plane through the good pixels within ``r`` of each ``(ys, xs)``, at that pixel."""
    h, w = f.shape
    dy, dx = (d.ravel().astype(np.float64) for d in np.mgrid[-r:r + 1, -r:r + 1])
    yy = ys[:, None] + dy.astype(np.intp)[None]
    xx = xs[:, None] + dx.astype(np.intp)[None]
    inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    yc, xc = yy.clip(0, h - 1), xx.clip(0, w - 1)
    wgt = (inside & good[yc, xc]).astype(np.float64)
    v = np.where(wgt > 0, f[yc, xc], 0.0)
    m0, cx, cy = wgt.sum(1), wgt @ dx, wgt @ dy
    cxx, cyy, cxy = wgt @ (dx * dx), wgt @ (dy * dy), wgt @ (dx * dy)
    s0, tx, ty = v.sum(1), v @ dx, v @ dy
    # solve [[m0 cx cy] [cx cxx cxy] [cy cxy cyy]] (a, b, c) = (s0, tx, ty) for a (the value at the pixel)
    det = m0 * (cxx * cyy - cxy * cxy) - cx * (cx * cyy - cxy * cy) + cy * (cx * cxy - cxx * cy)
    num = s0 * (cxx * cyy - cxy * cxy) - cx * (tx * cyy - cxy * ty) + cy * (tx * cxy - cxx * ty)
    mean = np.where(m0 > 0, s0 / np.maximum(m0, 1e-300), 0.0)
    ok = np.abs(det) > 1e-9 * np.maximum(m0, 1e-300) ** 3
    return np.where(ok, num / np.where(ok, det, 1.0), mean)


def shrink_flat_noise(flat: np.ndarray, stats: FlatNoiseStats) -> tuple[np.ndarray, FlatShrinkage | None]:
    """Wiener-shrink the pixel-scale deviations of a normalised master flat.

    Parameters
    ----------
    flat : ndarray
        The master flat, normalised (median 1 per colour), ``(H, W)`` or ``(C, H, W)``.
    stats : FlatNoiseStats
        Spread of the flat frames gathered while combining them.

    Returns
    -------
    flat : ndarray (float32)
        The shrunk flat (``flat`` itself when nothing could be measured).
    shrinkage : FlatShrinkage or None
        What was measured, or None when the noise could not be (fewer than
        3 flats, or too few valid pixels).
    """
    rel_var = stats.master_rel_var()
    if not all(math.isfinite(v) and v > 0 for v in rel_var):
        return flat, None
    planes = list(zip(_planes(flat.shape, stats.cfa), rel_var))
    done = map_threads(lambda p: _shrink_plane(flat[p[0]], p[1]), planes)  # independent planes, side by side
    if any(d is None for d in done):
        return flat, None
    out = np.array(flat, dtype=np.float32, copy=True)
    for (idx, _), (shrunk, _) in zip(planes, done):
        out[idx] = shrunk
    noise, prnu, resid = (tuple(d[1][k] for d in done) for k in range(3))
    return out, FlatShrinkage(noise=noise, prnu=prnu, residual=resid)


def _shrink_plane(plane: np.ndarray, v0: float) -> tuple[np.ndarray, tuple[float, float, float]] | None:
    """One independent plane of :func:`shrink_flat_noise` with its flats' relative variance ``v0``:
    the shrunk plane (float32) and its (noise, PRNU, residual), or None when it cannot be measured."""
    f = np.asarray(plane, dtype=np.float64)
    good = np.isfinite(f) & (f > 0)
    if good.mean() < 0.5 or min(f.shape) < 2 * WINDOW:
        return None
    fill = np.where(good, f, np.median(f[good]))
    s = local_plane(f, good, WINDOW)
    s = np.where(s > 0, s, fill)
    h = np.where(good, fill / s - 1.0, 0.0)
    hv = h[good]
    var_h = mad_sigma(hv) ** 2 / (1.0 - 1.0 / WINDOW ** 2)
    v = v0 / np.clip(fill, 0.05, None)  # Poisson: relative variance scales as 1 / level
    sp2 = max(0.0, var_h - float(np.mean(v[good])))
    k = sp2 / (sp2 + v)
    z = np.abs(h) / math.sqrt(var_h) if var_h > 0 else np.zeros_like(h)
    keep = np.clip((z - KEEP_FROM_SIGMA) / (KEEP_ABOVE_SIGMA - KEEP_FROM_SIGMA), 0.0, 1.0)
    k = k + (1.0 - k) * keep
    shrunk = np.where(good, s * (1.0 + k * h), f).astype(np.float32)
    resid = math.sqrt(sp2 * v0 / (sp2 + v0)) if sp2 + v0 > 0 else 0.0
    return shrunk, (math.sqrt(v0), math.sqrt(sp2), resid)
