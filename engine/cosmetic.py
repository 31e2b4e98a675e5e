"""Cosmetic correction: find hot and cold pixels, replace them by a local median.

Finding defects
---------------
Both detectors compare each pixel with its *same-colour neighbours* (below),
so smooth structure (amp glow, vignetting, sky gradients) is never flagged:
the residual ``pixel - mean(neighbours)`` picks candidates, the residual from
the neighbours' *median* confirms them, and the threshold is ``hot_sigma`` /
``cold_sigma`` times the robust spread (1.4826 x MAD) of the residual in that
CFA colour.

:func:`find_defects_from_dark` (preferred) looks at the master dark (hot and
cold pixels; also candidates far from the colour's global median, so a defect
next to another defect is not hidden). Stars are never in a dark, so no star
can be flagged this way. Given the master flat too, pixels responding less
than ``cold_flat_fraction`` of their neighbours' median (dead or low-response
pixels; dust shadows are smooth and stay) are cold as well.

:func:`find_defects_from_lights` is the fallback without darks: it counts per
sensor position how often a pixel is a hot (or cold) outlier in a light, and a
position is a defect when that happens in *most* lights (more than
``lights_fraction`` of them, 0.5 by default). A hot pixel must moreover stand
alone: its 4 adjacent pixels (any colour) may rise by less than ``isolation``
(0.2) times its own excess, since a star spreads over its neighbours and a hot
pixel does not. Stars move on the sensor between lights (drift, dithering,
field rotation) and their cores are outliers at a given position in only a few
lights; on an undithered session where the stars stay on the same pixels a few
faint, sharp stars can still pass, so prefer darks there.

Both cap the map at ``max_fraction`` of the pixels, keeping the most extreme.

Correcting
----------
:func:`correct_defects` replaces each defect by the median of its usable
*same-colour* neighbours (inside the frame, not a defect, finite):

* CFA green: the 4 diagonal pixels ``(+-1, +-1)`` and the 4 at distance 2 along
  the row and column, i.e. the 8 nearest greens;
* CFA red or blue: the 8 pixels at ``(+-2, 0)``, ``(0, +-2)``, ``(+-2, +-2)``, the 8
  nearest pixels of that colour;
* mono data or colour planes: the 8 adjacent pixels.

An even count takes the mean of the two middle values; a pixel with no usable
neighbour becomes NaN (no data). The CUDA kernel is ``kernels/cosmetic.cu``
(``cosmetic_kernel``); calibration can fuse it (``calibrate_cosmetic_kernel``
in ``kernels/calibrate.cu``).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from skystack.engine.backend import array_module, is_device_array, launch, run_cpu, to_host
from skystack.engine.debayer import cfa_colours, pattern_code
from skystack.engine.errors import SkystackError
from skystack.engine.robust import finite_median_sigma

__all__ = [
    "CosmeticConfig",
    "DefectMap",
    "find_defects_from_dark",
    "find_defects_from_lights",
    "correct_defects",
    "neighbour_offsets",
]

# Offsets (dy, dx) of the 8 candidate neighbours, by kind: 0 mono, 1 CFA green,
# 2 CFA red/blue. Same tables and order as kernels/cosmetic.cu.
_OFFSETS = np.array([
    [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)],
    [(-1, -1), (-1, 1), (1, -1), (1, 1), (-2, 0), (0, -2), (0, 2), (2, 0)],
    [(-2, -2), (-2, 0), (-2, 2), (0, -2), (0, 2), (2, -2), (2, 0), (2, 2)],
], dtype=np.int64)


@dataclass(frozen=True, kw_only=True)
class CosmeticConfig:
    """Settings of defect detection.

    Attributes
    ----------
    hot_sigma, cold_sigma : float
        Thresholds above/below the median, in robust standard deviations.
    max_fraction : float
        Most pixels the map may hold, as a fraction of the frame (the most
        extreme are kept).
    lights_fraction : float
        Without darks: a position is a defect when it is an outlier in more
        than this fraction of the lights.
    min_lights : int
        Without darks: fewest lights to decide from (fewer gives an empty map).
    cold_flat_fraction : float
        With a master flat: a pixel responding less than this fraction of its
        same-colour neighbours' median is cold (dead).
    isolation : float
        Without darks: a hot pixel's 4 adjacent pixels must rise, on average,
        by less than this fraction of its own excess over its neighbourhood
        (star cores spread over their neighbours; hot pixels do not).
    """

    hot_sigma: float = 5.0
    cold_sigma: float = 5.0
    max_fraction: float = 0.005
    lights_fraction: float = 0.5
    min_lights: int = 3
    cold_flat_fraction: float = 0.5
    isolation: float = 0.2


@dataclass(frozen=True, kw_only=True)
class DefectMap:
    """Hot and cold pixels of a sensor (host arrays).

    Attributes
    ----------
    hot, cold : ndarray (H, W) bool
        Defect positions.
    source : str
        ``"dark"`` or ``"lights"``.
    """

    hot: np.ndarray
    cold: np.ndarray
    source: str

    @property
    def mask(self) -> np.ndarray:
        """``(H, W)`` uint8: 1 where a pixel is hot or cold (the kernels' mask)."""
        return (self.hot | self.cold).astype(np.uint8)

    @property
    def n_hot(self) -> int:
        return int(np.count_nonzero(self.hot))

    @property
    def n_cold(self) -> int:
        return int(np.count_nonzero(self.cold))

    @functools.cached_property
    def count(self) -> int:
        """Number of defective pixel positions (counted once: each light's calibration reports it)."""
        return int(np.count_nonzero(self.hot | self.cold))

    def to_dict(self) -> dict[str, Any]:
        """Counts for the report."""
        return {"source": self.source, "hot": self.n_hot, "cold": self.n_cold, "total": self.count}


def neighbour_offsets(pattern: str | None, y: int, x: int) -> np.ndarray:
    """``(8, 2)`` offsets ``(dy, dx)`` of the same-colour neighbours used for pixel (y, x)."""
    if pattern is None:
        return _OFFSETS[0].copy()
    colour = cfa_colours(pattern)[((y & 1) << 1) | (x & 1)]
    return _OFFSETS[1 if colour == 1 else 2].copy()


# ----------------------------------------------------------------------------- helpers


def _code(pattern: str | None) -> int:
    return -1 if pattern is None else pattern_code(pattern)


def _kind_map(code: int, shape: tuple[int, int]) -> np.ndarray:
    """Per pixel 0 (mono), 1 (CFA green) or 2 (CFA red/blue)."""
    h, w = shape
    if code < 0:
        return np.zeros((h, w), dtype=np.int8)
    tile = np.array([1 if ((code >> (2 * k)) & 3) == 1 else 2 for k in range(4)], dtype=np.int8)
    return np.tile(tile.reshape(2, 2), ((h + 1) // 2, (w + 1) // 2))[:h, :w]


def _position_planes(code: int, shape: tuple[int, int]) -> list[np.ndarray]:
    """Index sets of each colour: 3 boolean masks for CFA, one for mono."""
    h, w = shape
    if code < 0:
        return [np.ones((h, w), dtype=bool)]
    cm = np.tile(np.array([(code >> (2 * k)) & 3 for k in range(4)], dtype=np.int8).reshape(2, 2),
                 ((h + 1) // 2, (w + 1) // 2))[:h, :w]
    return [cm == c for c in range(3)]


def _cap(hot: np.ndarray, cold: np.ndarray, score: np.ndarray, max_fraction: float
         ) -> tuple[np.ndarray, np.ndarray]:
    """Keep at most ``max_fraction`` of the pixels, the highest ``score`` first."""
    limit = int(max_fraction * hot.size)
    both = hot | cold
    n = int(np.count_nonzero(both))
    if n <= limit:
        return hot, cold
    idx = np.flatnonzero(both)
    keep = idx[np.argsort(-score.ravel()[idx], kind="stable")[:limit]]
    sel = np.zeros(hot.size, dtype=bool)
    sel[keep] = True
    sel = sel.reshape(hot.shape)
    return hot & sel, cold & sel


# ----------------------------------------------------------------------------- detection


def _gather(img: np.ndarray, ys: np.ndarray, xs: np.ndarray, code: int) -> np.ndarray:
    """``(K, 8)`` same-colour neighbour values of pixels (ys, xs); NaN outside the frame."""
    h, w = img.shape
    kinds = _kind_map(code, (h, w))[ys, xs].astype(np.int64)
    off = _OFFSETS[kinds]
    yy = ys[:, None] + off[:, :, 0]
    xx = xs[:, None] + off[:, :, 1]
    inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    vals = img[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)]
    return np.where(inside, vals, np.float32(np.nan))


def _neighbour_mean(img: np.ndarray, code: int) -> np.ndarray:
    """Mean of the finite same-colour neighbours of every pixel (NaN if none), on the host.

    ``neighbour_mean_kernel`` built natively where it is faster than the twin
    (:func:`skystack.engine.backend.run_cpu`): the same bits.
    """
    img = np.ascontiguousarray(img, dtype=np.float32)
    h, w = img.shape

    def native(mod) -> np.ndarray:
        out = np.empty((h, w), dtype=np.float32)
        mod.launch("neighbour_mean_kernel", h * w, (out, img, np.int32(h), np.int32(w), np.int32(code)))
        return out

    return run_cpu("cosmetic.cu", "neighbour_mean_kernel", h * w, lambda: _neighbour_mean_numpy(img, code), native)


def _neighbour_mean_numpy(img: np.ndarray, code: int) -> np.ndarray:
    """Twin of ``neighbour_mean_kernel``."""
    h, w = img.shape
    kinds = _kind_map(code, (h, w))
    p = np.pad(img, 2, mode="constant", constant_values=np.nan)
    acc = np.zeros((h, w), dtype=np.float32)
    cnt = np.zeros((h, w), dtype=np.int32)
    for k in range(8):
        if code < 0:
            dy, dx = _OFFSETS[0, k]
            v = p[2 + dy:2 + dy + h, 2 + dx:2 + dx + w]
        else:
            (gy, gx), (ry, rx) = _OFFSETS[1, k], _OFFSETS[2, k]
            v = np.where(kinds == 1, p[2 + gy:2 + gy + h, 2 + gx:2 + gx + w],
                         p[2 + ry:2 + ry + h, 2 + rx:2 + rx + w])
        ok = np.isfinite(v)
        acc += np.where(ok, v, np.float32(0))
        cnt += ok
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, acc / np.maximum(cnt, 1), np.float32(np.nan)).astype(np.float32)


def _local_outliers(img: np.ndarray, code: int, hot_sigma: float, cold_sigma: float, *,
                    global_candidates: bool, isolation: float | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels far above/below the median of their same-colour neighbours.

    ``sigma`` is the robust spread (1.4826 MAD) of ``img - neighbour mean`` per
    colour. Candidates are pixels whose residual from the neighbours' *mean*
    passes the threshold (plus, with ``global_candidates``, pixels beyond the
    threshold from the colour's global median, which catches a defect whose
    neighbour is also a defect); each is confirmed against the neighbours'
    *median*. Smooth structure (amp glow, vignetting, sky) is not flagged.
    With ``isolation``, a hot pixel must also stand alone: the mean residual
    of its 4 adjacent pixels (any colour) must be below ``isolation`` times its
    own (a star spreads over its neighbours, a hot pixel does not).

    Returns hot, cold (bool) and ``|residual| / sigma`` (float64) maps.
    """
    h, w = img.shape
    img = np.ascontiguousarray(img, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        resid = img - _neighbour_mean(img, code)
    hot = np.zeros((h, w), dtype=bool)
    cold = np.zeros((h, w), dtype=bool)
    score = np.zeros((h, w), dtype=np.float64)
    for sel in _position_planes(code, (h, w)):
        r = resid[sel]
        step = max(1, r.size // 200_000)
        _med, sigma = finite_median_sigma(r[::step])
        if not (math.isfinite(sigma) and sigma > 0):
            continue
        with np.errstate(invalid="ignore"):
            cand_hot = sel & (resid > hot_sigma * sigma)
            cand_cold = sel & (resid < -cold_sigma * sigma)
            if global_candidates:
                gmed, _ = finite_median_sigma(img[sel][::step])
                cand_hot |= sel & (img > gmed + hot_sigma * sigma)
                cand_cold |= sel & (img < gmed - cold_sigma * sigma)
        ys, xs = np.nonzero(cand_hot | cand_cold)
        if ys.size == 0:
            continue
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            z = (img[ys, xs] - np.nanmedian(_gather(img, ys, xs, code), axis=1)) / sigma
        z = np.where(np.isfinite(z), z, 0.0)
        is_hot = z > hot_sigma
        if isolation is not None and np.any(is_hot):
            adj = _adjacent_mean(resid, ys, xs)
            with np.errstate(invalid="ignore"):
                is_hot &= ~(adj >= isolation * resid[ys, xs])
        hot[ys, xs] = is_hot
        cold[ys, xs] = z < -cold_sigma
        score[ys, xs] = np.abs(z)
    return hot, cold, score


def _adjacent_mean(a: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Mean of the finite values of ``a`` at the 4 pixels adjacent to each (ys, xs)."""
    h, w = a.shape
    acc = np.zeros(ys.shape, dtype=np.float64)
    cnt = np.zeros(ys.shape, dtype=np.int64)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        yy, xx = ys + dy, xs + dx
        ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        v = a[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)]
        ok &= np.isfinite(v)
        acc += np.where(ok, v, 0.0)
        cnt += ok
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, acc / np.maximum(cnt, 1), 0.0)


@dataclass(frozen=True, kw_only=True)
class DarkOutliers:
    """The hot and cold pixels of a master dark and their scores (:func:`dark_outliers`), before a
    flat's dead pixels join them and the cap applies (:func:`find_defects_from_dark`)."""

    hot: np.ndarray
    cold: np.ndarray
    score: np.ndarray


def dark_outliers(dark: Any, *, pattern: str | None, config: CosmeticConfig = CosmeticConfig()) -> DarkOutliers:
    """The dark's part of :func:`find_defects_from_dark` (the costly part: it may run while the
    flat is still being built)."""
    d = to_host(dark).astype(np.float32, copy=False)
    if d.ndim != 2:
        raise SkystackError(f"defect detection needs an (H, W) master dark, got shape {d.shape}")
    hot, cold, score = _local_outliers(d, _code(pattern), config.hot_sigma, config.cold_sigma, global_candidates=True)
    return DarkOutliers(hot=hot, cold=cold, score=score)


def find_defects_from_dark(dark: Any, *, pattern: str | None, flat: Any | None = None,
                           config: CosmeticConfig = CosmeticConfig(),
                           outliers: DarkOutliers | None = None) -> DefectMap:
    """Hot and cold pixels of a master dark (and dead pixels of a master flat).

    A pixel is hot (cold) when it exceeds (falls below) the median of its
    same-colour neighbours by more than ``hot_sigma`` (``cold_sigma``) robust
    sigmas of the dark's pixel-to-pixel scatter in that colour. Smooth
    structure such as amp glow is not flagged. With ``flat``, pixels whose flat
    response is below ``config.cold_flat_fraction`` of their neighbours' median
    (dead or low-response pixels; dust shadows are smooth and stay) are cold too.

    Parameters
    ----------
    dark : ndarray (H, W)
        Master dark (normalised units; bias-subtracted or not).
    pattern : str or None
        Bayer pattern, None for mono.
    flat : ndarray (H, W), optional
        Master flat.
    config : CosmeticConfig
        Thresholds.
    outliers : DarkOutliers, optional
        :func:`dark_outliers` of this dark, pattern and config, when already found.

    Returns
    -------
    DefectMap
        ``source="dark"``.
    """
    found = outliers if outliers is not None else dark_outliers(dark, pattern=pattern, config=config)
    d_shape = np.shape(found.hot)
    code = _code(pattern)
    hot, cold, score = found.hot, found.cold.copy(), found.score
    if flat is not None:
        f = to_host(flat).astype(np.float32, copy=False)
        if f.shape != d_shape:
            raise SkystackError(f"master flat {f.shape} and master dark {d_shape} differ in size; "
                                "use calibration frames of one camera mode")
        dead = _dead_in_flat(f, code, config.cold_flat_fraction)
        cold |= dead
        score = np.where(dead, np.inf, score)
    hot, cold = _cap(hot, cold, score, config.max_fraction)
    return DefectMap(hot=hot, cold=cold & ~hot, source="dark")


def _dead_in_flat(flat: np.ndarray, code: int, fraction: float) -> np.ndarray:
    """Pixels whose flat response is below ``fraction`` of their same-colour neighbours' median."""
    ref = _neighbour_mean(flat, code)
    with np.errstate(invalid="ignore"):
        cand = np.nonzero(~(flat >= np.float32(fraction) * ref))
    ys, xs = cand
    out = np.zeros(flat.shape, dtype=bool)
    if ys.size == 0:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(_gather(flat, ys, xs, code), axis=1)
    with np.errstate(invalid="ignore"):
        dead = (med > 0) & ~(flat[ys, xs] >= np.float32(fraction) * med)
    out[ys[dead], xs[dead]] = True
    return out


def find_defects_from_lights(lights: Iterable[Any], *, pattern: str | None,
                             config: CosmeticConfig = CosmeticConfig()) -> DefectMap:
    """Hot and cold pixels seen at the same sensor position in most lights.

    Parameters
    ----------
    lights : iterable of ndarray (H, W)
        Lights in normalised units (raw or bias/flat-calibrated), consumed one
        at a time (a generator keeps memory to one frame).
    pattern : str or None
        Bayer pattern, None for mono.
    config : CosmeticConfig
        Thresholds, ``lights_fraction`` and ``min_lights``.

    Returns
    -------
    DefectMap
        ``source="lights"``; empty when fewer than ``config.min_lights`` lights.
    """
    code = _code(pattern)
    hot_n = cold_n = None
    n = 0
    shape = None
    for light in lights:
        img = to_host(light)
        if img.ndim != 2:
            raise SkystackError(f"defect detection needs (H, W) lights, got shape {img.shape}")
        if shape is None:
            shape = img.shape
            hot_n = np.zeros(shape, dtype=np.int32)
            cold_n = np.zeros(shape, dtype=np.int32)
        elif img.shape != shape:
            raise SkystackError(f"lights differ in size ({shape} vs {img.shape}); "
                                "defect detection needs one sensor mode")
        h, c, _ = _local_outliers(img, code, config.hot_sigma, config.cold_sigma, global_candidates=False,
                                  isolation=config.isolation)
        hot_n += h
        cold_n += c
        n += 1
    if shape is None:
        raise SkystackError("find_defects_from_lights got no lights")
    if n < config.min_lights:
        empty = np.zeros(shape, dtype=bool)
        return DefectMap(hot=empty, cold=empty.copy(), source="lights")
    need = config.lights_fraction * n
    hot = hot_n > need
    cold = (cold_n > need) & ~hot
    score = np.maximum(hot_n, cold_n).astype(np.float64)
    hot, cold = _cap(hot, cold, score, config.max_fraction)
    return DefectMap(hot=hot, cold=cold, source="lights")


# ----------------------------------------------------------------------------- correction


def _as_planes(xp, data):
    if data.ndim == 2:
        return data.reshape((1,) + tuple(data.shape))
    if data.ndim == 3:
        return data
    raise SkystackError(f"cosmetic correction needs (H, W) or (C, H, W) data, got shape {tuple(data.shape)}")


def _as_mask(xp, mask, shape: tuple[int, int]):
    if isinstance(mask, DefectMap):
        mask = mask.mask
    if tuple(mask.shape) != tuple(shape):
        raise SkystackError(f"defect map is {tuple(mask.shape)} but the frame is {tuple(shape)}; "
                            "build the map from frames of this sensor mode")
    return xp.ascontiguousarray(xp.asarray(mask).astype(xp.uint8, copy=False))


def correct_defects(data: Any, mask: Any, *, pattern: str | None) -> tuple[Any, int]:
    """Replace defective pixels by the median of their same-colour neighbours.

    Parameters
    ----------
    data : ndarray (H, W) or (C, H, W), float32
        CFA mosaic / mono frame (or colour planes with ``pattern=None``); NumPy
        or CuPy (CUDA kernel).
    mask : ndarray (H, W) bool/uint8, or DefectMap
        Defect positions (applied to every plane).
    pattern : str or None
        Bayer pattern of a CFA mosaic, None otherwise.

    Returns
    -------
    (ndarray, int)
        Corrected copy of ``data`` (same shape and backend) and the number of
        defective pixel positions replaced.
    """
    xp = array_module(data)
    data = xp.ascontiguousarray(data, dtype=xp.float32)
    planes = _as_planes(xp, data)
    m = _as_mask(xp, mask, planes.shape[1:])
    code = _code(pattern)
    count = int(xp.count_nonzero(m))
    if not is_device_array(data):
        return _correct_defects_numpy(planes, m, code).reshape(data.shape), count
    out = xp.empty_like(planes)
    p, h, w = planes.shape
    n = p * h * w
    launch("cosmetic.cu", "cosmetic_kernel", n,
           (out, planes, m, np.int64(n), np.int32(h), np.int32(w), np.int32(code)))
    return out.reshape(data.shape), count


def _correct_defects_numpy(planes: np.ndarray, mask: np.ndarray, code: int) -> np.ndarray:
    """Twin of ``cosmetic_kernel`` on ``(P, H, W)`` planes and an ``(H, W)`` uint8 mask."""
    out = planes.astype(np.float32, copy=True)
    _, h, w = planes.shape
    m = mask.astype(bool)
    ys, xs = np.nonzero(m)
    if ys.size == 0:
        return out
    kinds = _kind_map(code, (h, w))[ys, xs].astype(np.int64)
    off = _OFFSETS[kinds]  # (K, 8, 2)
    yy = ys[:, None] + off[:, :, 0]
    xx = xs[:, None] + off[:, :, 1]
    inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    yc, xc = np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)
    usable = inside & ~m[yc, xc]
    rows = np.arange(ys.size)
    for p in range(planes.shape[0]):
        vals = planes[p][yc, xc]
        ok = usable & np.isfinite(vals)
        s = np.sort(np.where(ok, vals, np.float32(np.inf)), axis=1)
        k = ok.sum(axis=1)
        half = k // 2
        lo = s[rows, np.maximum(half - 1, 0)]
        hi = s[rows, np.minimum(half, 7)]
        with np.errstate(invalid="ignore", over="ignore"):
            even = (lo + hi) * np.float32(0.5)
        med = np.where(k == 0, np.float32(np.nan), np.where(k % 2 == 1, hi, even))
        out[p][ys, xs] = med.astype(np.float32)
    return out
