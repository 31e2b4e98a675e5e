"""Background and gradient extraction (light pollution, moonlight, vignetting residue).

The sky is sampled on a grid of boxes (``grid`` boxes along the longer side,
square-ish). In every box, per channel, the background is the sigma-clipped
median of the pixels left after masking stars and other objects (a
threshold mask on the channel-mean luminance, dilated). Boxes that are
mostly masked, and boxes that disagree with their neighbours or with the
fitted model (a galaxy, a nebula, a bright star's halo) by more than
``reject`` robust sigmas, are left out. A smooth model is fitted through the
remaining box values of each channel:

* ``"poly"`` -- a 2-D polynomial of total degree 1..4 in normalised
  coordinates (least squares, iterated with box rejection), or
* ``"rbf"`` -- a smoothing thin-plate spline through the box values
  (:class:`scipy.interpolate.RBFInterpolator`), for gradients that a low
  degree polynomial cannot follow (it follows nebulosity more easily too).

The model is then **subtracted** (additive light: light pollution, airglow,
moonlight; the median of the model is added back so the sky keeps its level
and nothing goes negative) or the image is **divided** by it (multiplicative:
vignetting the flats did not remove), again rescaled by the model's median.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from skystack.engine.errors import SkystackError
from skystack.engine.robust import mad_sigma, sigma_clipped_rows, sigma_clipped_stats

MODELS = ("poly", "rbf")
MODES = ("subtract", "divide")


@dataclass(frozen=True, kw_only=True)
class BackgroundConfig:
    """Settings of :func:`extract_background`.

    Attributes
    ----------
    model : str
        ``"poly"`` (2-D polynomial) or ``"rbf"`` (smoothing thin-plate spline).
    degree : int
        Total degree of the polynomial, 1..4.
    mode : str
        ``"subtract"`` (additive gradient) or ``"divide"`` (multiplicative).
    grid : int
        Boxes along the longer side of the image (the other side gets boxes
        of about the same size).
    kappa : float
        Sigma-clipping threshold of the per-box median.
    reject : float
        Boxes further than this many robust sigmas from their neighbours or
        from the fit are not sky.
    star_sigma : float
        Pixels brighter than the coarse background by this many noise sigmas
        (after a 1-pixel Gaussian smoothing) are masked as stars or objects.
    mask_grow : int
        Dilation of that mask, in pixels (star wings).
    min_valid : float
        Fraction of unmasked finite pixels a box needs to be used.
    rbf_smoothing : float
        Smoothing of the thin-plate spline (``RBFInterpolator(smoothing=)``)
        with the box values in units of their noise (0 interpolates exactly).
    """

    model: str = "poly"
    degree: int = 3
    mode: str = "subtract"
    grid: int = 24
    kappa: float = 2.5
    reject: float = 2.5
    star_sigma: float = 3.0
    mask_grow: int = 3
    min_valid: float = 0.4
    rbf_smoothing: float = 0.05

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise SkystackError(f"background model {self.model!r}: use one of {', '.join(MODELS)}")
        if self.mode not in MODES:
            raise SkystackError(f"background mode {self.mode!r}: use 'subtract' or 'divide'")
        if not 1 <= int(self.degree) <= 4:
            raise SkystackError(f"background degree {self.degree}: use 1, 2, 3 or 4")
        if not 4 <= int(self.grid) <= 256:
            raise SkystackError(f"background grid {self.grid}: use 4..256 boxes per side")
        if not self.reject > 0 or not self.kappa > 0:
            raise SkystackError("background kappa and reject must be > 0")


@dataclass(kw_only=True)
class BackgroundModel:
    """A fitted background and how it was obtained.

    Attributes
    ----------
    model : ndarray
        ``(C, H, W)`` float32 smooth background model.
    pedestal : ndarray
        ``(C,)`` median of the model per channel (the level kept in the output).
    box_xy : ndarray
        ``(N, 2)`` box centres ``(x, y)`` in pixels.
    box_values : ndarray
        ``(N, C)`` sigma-clipped box medians (NaN for unusable boxes).
    used : ndarray of bool
        ``(N,)`` boxes the final fit used.
    residual_rms : ndarray
        ``(C,)`` RMS of (box value - model) over the used boxes, relative to
        the pedestal.
    noise : float
        Pixel noise (robust sigma) of the luminance background.
    """

    model: np.ndarray
    pedestal: np.ndarray
    box_xy: np.ndarray
    box_values: np.ndarray
    used: np.ndarray
    residual_rms: np.ndarray
    noise: float

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers (no arrays bigger than C)."""
        return {
            "pedestal": [float(v) for v in self.pedestal],
            "boxes": int(self.used.size),
            "boxes_used": int(self.used.sum()),
            "residual_rms": [float(v) for v in self.residual_rms],
            "noise": float(self.noise),
        }


def _box_edges(h: int, w: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column edges of a grid with about ``grid`` boxes along the longer side."""
    side = max(h, w) / float(grid)
    ny = max(2, int(round(h / side)))
    nx = max(2, int(round(w / side)))
    ys = np.round(np.linspace(0, h, ny + 1)).astype(np.int64)
    xs = np.round(np.linspace(0, w, nx + 1)).astype(np.int64)
    return ys, xs


#: Most pixels of a box :func:`box_stats` reads (every k-th row and column beyond): a box's
#: clipped median then scatters by ~1.25 sigma / 32 = 0.04 sigma, far below what a smooth
#: background model through hundreds of boxes can resolve, and a large frame's boxes cost
#: a fraction of reading them whole (a 3000x2000 frame's 24x24 grid: boxes of 10k pixels).
BOX_SAMPLE = 1024


def _box_stride(ys: np.ndarray, xs: np.ndarray) -> int:
    """The row and column step that keeps the largest box of a grid within :data:`BOX_SAMPLE` pixels."""
    px = int(np.diff(ys).max()) * int(np.diff(xs).max())
    return max(1, math.ceil(math.sqrt(px / BOX_SAMPLE)))


def _box_rows(image: np.ndarray, ys: np.ndarray, xs: np.ndarray, keep: np.ndarray | None,
              stride: int = 1) -> np.ndarray:
    """The pixels of every box of a grid as one row each: ``(ny * nx, max box height * max box width)``.

    Boxes are row-major (edges ``ys``/``xs`` in pixels); a box smaller than
    the largest is padded with NaN, as are the pixels where ``keep``
    (``(H, W)`` bool) is False. ``stride``: every ``stride``-th row and
    column of each box, from its first.
    """
    bh, bw = int(np.diff(ys).max()), int(np.diff(xs).max())
    ry = ys[:-1, None] + np.arange(0, bh, stride)[None, :]  # (ny, ceil(bh / stride))
    rx = xs[:-1, None] + np.arange(0, bw, stride)[None, :]  # (nx, ceil(bw / stride))
    iy = np.minimum(ry, image.shape[0] - 1)[:, None, :, None]
    ix = np.minimum(rx, image.shape[1] - 1)[None, :, None, :]
    ok = (ry < ys[1:, None])[:, None, :, None] & (rx < xs[1:, None])[None, :, None, :]
    if keep is not None:
        ok = ok & keep[iy, ix]
    rows = np.where(ok, image[iy, ix].astype(np.float32, copy=False), np.float32(np.nan))
    return rows.reshape(ry.shape[0] * rx.shape[0], ry.shape[1] * rx.shape[1])


def box_stats(image: np.ndarray, ys: np.ndarray, xs: np.ndarray, *, keep: np.ndarray | None = None,
              kappa: float = 2.5, iters: int = 5, chunk: int = 1 << 22) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`sigma_clipped_stats` of the pixels of every box of a grid, all boxes at once
    (at most about :data:`BOX_SAMPLE` of each box: every k-th row and column).

    Parameters
    ----------
    image : ndarray
        ``(H, W)`` values (NaN and inf are no data).
    ys, xs : ndarray
        Box edges in pixels (:func:`_box_edges`).
    keep : ndarray of bool, optional
        ``(H, W)`` pixels to use (default: all).
    kappa, iters : float, int
        As :func:`sigma_clipped_stats`.
    chunk : int
        Most pixels gathered at once: rows of boxes go in bands of about this
        many, so the temporaries stay a fraction of a large image.

    Returns
    -------
    (median, sigma, n_kept)
        ``(ny * nx,)`` each, boxes row-major.
    """
    img = np.asarray(image)
    k = _box_stride(ys, xs)
    bh, bw = -(-int(np.diff(ys).max()) // k), -(-int(np.diff(xs).max()) // k)
    step = max(1, chunk // (bh * bw * (xs.size - 1)))
    parts = [sigma_clipped_rows(_box_rows(img, ys[j:j + step + 1], xs, keep, k), kappa=kappa, iters=iters,
                                chunk=chunk)
             for j in range(0, ys.size - 1, step)]
    return tuple(np.concatenate(p) for p in zip(*parts))


def _bilinear_upsample(values: np.ndarray, yc: np.ndarray, xc: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear interpolation of a grid given at centres ``(yc, xc)`` to ``(h, w)`` (edges clamped)."""

    def axis(centres: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        p = np.arange(n, dtype=np.float64)
        if centres.size == 1:
            return np.zeros(n, dtype=np.int64), np.zeros(n)
        i = np.clip(np.searchsorted(centres, p) - 1, 0, centres.size - 2)
        t = np.clip((p - centres[i]) / (centres[i + 1] - centres[i]), 0.0, 1.0)
        return i, t

    iy, ty = axis(yc, h)
    ix, tx = axis(xc, w)
    ny = values.shape[0]
    v = values.astype(np.float64)
    # along x for every grid row, then along y
    rows = v[:, ix] * (1.0 - tx)[None, :] + v[:, np.minimum(ix + 1, v.shape[1] - 1)] * tx[None, :]
    out = rows[iy] * (1.0 - ty)[:, None] + rows[np.minimum(iy + 1, ny - 1)] * ty[:, None]
    return out.astype(np.float32)


def _fill_nan_grid(g: np.ndarray) -> np.ndarray:
    """Replace NaN cells by the mean of their finite neighbours, repeatedly (global median if none)."""
    g = g.astype(np.float64).copy()
    if np.isfinite(g).all():
        return g
    if not np.isfinite(g).any():
        return np.zeros_like(g)
    for _ in range(max(g.shape)):
        bad = ~np.isfinite(g)
        if not bad.any():
            break
        p = np.pad(g, 1, constant_values=np.nan)
        stack = np.stack([p[1 + dy:1 + dy + g.shape[0], 1 + dx:1 + dx + g.shape[1]]
                          for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            nb = np.nanmean(stack, axis=0)
        g[bad] = nb[bad]
    g[~np.isfinite(g)] = np.nanmedian(g)
    return g


def luminance(image: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """Channel mean of a ``(C, H, W)`` image (NaN where any channel is NaN) in ``dtype``; a mono image as is."""
    img = np.asarray(image, dtype=dtype)
    return img.mean(axis=0, dtype=dtype) if img.ndim == 3 else img.astype(dtype, copy=False)


def coarse_background(lum: np.ndarray, *, grid: int = 24, kappa: float = 2.5) -> tuple[np.ndarray, float]:
    """Box sigma-clipped medians of a 2-D image, bilinearly upsampled; and the pixel noise.

    Returns ``(background (H, W) float32, noise sigma)``.
    """
    h, w = lum.shape
    ys, xs = _box_edges(h, w, grid)
    ny, nx = ys.size - 1, xs.size - 1
    m, s, n = box_stats(lum, ys, xs, kappa=kappa)
    med = np.where(n >= 16, m, np.nan).reshape(ny, nx)
    sig = np.where(n >= 16, s, np.nan).reshape(ny, nx)
    noise = float(np.nanmedian(sig)) if np.isfinite(sig).any() else float("nan")
    yc = (ys[:-1] + ys[1:] - 1) / 2.0
    xc = (xs[:-1] + xs[1:] - 1) / 2.0
    return _bilinear_upsample(_fill_nan_grid(med), yc, xc, h, w), noise


def object_mask(image: np.ndarray, *, sigma: float = 3.0, grow: int = 3, grid: int = 24,
                kappa: float = 2.5) -> tuple[np.ndarray, float]:
    """Mask of stars, galaxies, nebulae and no-data pixels.

    The channel-mean luminance minus its coarse background is smoothed with
    a 1-pixel Gaussian; pixels above ``sigma`` times the smoothed image's
    noise are objects. The mask is dilated by ``grow`` pixels; NaN pixels are
    always masked.

    Returns
    -------
    (mask, noise)
        ``(H, W)`` bool (True = not sky) and the pixel noise (robust sigma) of
        the luminance.
    """
    from scipy import ndimage

    lum = luminance(image)
    finite = np.isfinite(lum)
    bg, noise = coarse_background(lum, grid=grid, kappa=kappa)
    resid = np.where(finite, lum - bg, 0.0).astype(np.float32)
    sm = ndimage.gaussian_filter(resid, 1.0)
    _, sm_sigma, _ = sigma_clipped_stats(sm[finite][:: max(1, int(finite.sum()) // 400_000)], kappa=kappa)
    if not (sm_sigma > 0):
        sm_sigma = noise / (2.0 * math.sqrt(math.pi)) if noise > 0 else 0.0
    mask = sm > sigma * sm_sigma if sm_sigma > 0 else np.zeros(lum.shape, bool)
    if grow > 0 and mask.any():
        mask = ndimage.binary_dilation(mask, iterations=int(grow))
    mask |= ~finite
    return mask, noise


# ----------------------------------------------------------------------------- models


def _poly_terms(degree: int) -> list[tuple[int, int]]:
    return [(d - j, j) for d in range(degree + 1) for j in range(d + 1)]


def _norm_coords(x: np.ndarray, n: int) -> np.ndarray:
    half = max((n - 1) / 2.0, 0.5)
    return (np.asarray(x, dtype=np.float64) - (n - 1) / 2.0) / half


def _design(u: np.ndarray, v: np.ndarray, degree: int) -> np.ndarray:
    return np.column_stack([u ** i * v ** j for i, j in _poly_terms(degree)])


def _eval_poly(coef: np.ndarray, degree: int, h: int, w: int) -> np.ndarray:
    u = _norm_coords(np.arange(w), w)
    v = _norm_coords(np.arange(h), h)
    # separable: sum_j v^j * (sum_i c_ij u^i), one (h, degree + 1) @ (degree + 1, w) product
    rows = np.zeros((degree + 1, w), dtype=np.float64)
    for c, (i, j) in zip(coef, _poly_terms(degree)):
        rows[j] += c * u ** i
    vpow = np.stack([v ** j for j in range(degree + 1)], axis=1)
    return (vpow @ rows).astype(np.float32)


def _neighbour_outliers(grid: np.ndarray, reject: float, floor: float) -> np.ndarray:
    """Boxes differing from the median of their (finite) 8 neighbours by > reject robust sigmas."""
    p = np.pad(grid, 1, constant_values=np.nan)
    ny, nx = grid.shape
    stack = np.stack([p[1 + dy:1 + dy + ny, 1 + dx:1 + dx + nx]
                      for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        nb = np.nanmedian(stack, axis=0)
    d = grid - nb
    ok = np.isfinite(d)
    if ok.sum() < 4:
        return np.zeros(grid.shape, bool)
    s = mad_sigma(d[ok])
    s = max(s, floor)
    return ok & (np.abs(d) > reject * s)


def _sky_boxes(a: np.ndarray, lum_box: np.ndarray, valid: np.ndarray, grid_shape: tuple[int, int], *,
               reject: float, floor: float, need: int) -> np.ndarray:
    """The boxes the model is fitted to: ``valid`` ones within ``reject`` robust sigmas (at least
    ``floor``) of an iterated least-squares fit of design ``a`` to the luminance ``lum_box``, the
    first round also without the outliers among their neighbours; at least ``need`` are kept."""
    used = valid.copy()
    for it in range(20):
        coef, *_ = np.linalg.lstsq(a[used], lum_box[used], rcond=None)
        r = lum_box - a @ coef
        ru = r[used]
        s = max(mad_sigma(ru), floor)
        new = valid & (np.abs(r) <= reject * s)
        if it == 0:
            new &= ~_neighbour_outliers(np.where(valid, r, np.nan).reshape(grid_shape), reject, floor).ravel()
        if new.sum() < need or np.array_equal(new, used):
            if new.sum() >= need:
                used = new
            break
        used = new
    return used


def fit_background(image: np.ndarray, config: BackgroundConfig = BackgroundConfig(), *,
                   mask: np.ndarray | None = None) -> BackgroundModel:
    """Fit a smooth background model to a linear image.

    Parameters
    ----------
    image : ndarray
        ``(C, H, W)`` or ``(H, W)`` linear image (NaN = no data).
    config : BackgroundConfig
        Settings.
    mask : ndarray of bool, optional
        ``(H, W)`` pixels to leave out (True = not sky). Default: stars and
        objects from :func:`object_mask`.

    Returns
    -------
    BackgroundModel

    Raises
    ------
    SkystackError
        When too few sky boxes are left to fit the model (an image filled by
        a nebula, or almost no data): lower the degree or the grid.
    """
    img = np.asarray(image, dtype=np.float32)
    chans = img[None] if img.ndim == 2 else img
    c, h, w = chans.shape
    noise = float("nan")
    if mask is None:
        mask, noise = object_mask(chans, sigma=config.star_sigma, grow=config.mask_grow,
                                  grid=config.grid, kappa=config.kappa)
    else:
        mask = np.asarray(mask, bool) | ~np.isfinite(chans).all(axis=0)
    ys, xs = _box_edges(h, w, config.grid)
    ny, nx = ys.size - 1, xs.size - 1
    sky = ~mask
    n_sky = np.add.reduceat(np.add.reduceat(sky.astype(np.int64), ys[:-1], axis=0), xs[:-1], axis=1).ravel()
    npx = np.outer(np.diff(ys), np.diff(xs)).ravel()
    unusable = n_sky < np.maximum(16, config.min_valid * npx)
    vals = np.stack([box_stats(chans[ch], ys, xs, keep=sky, kappa=config.kappa)[0] for ch in range(c)], axis=1)
    sigs = box_stats(luminance(chans), ys, xs, keep=sky, kappa=config.kappa)[1]
    vals[unusable], sigs[unusable] = np.nan, np.nan
    if not math.isfinite(noise):
        noise = float(np.nanmedian(sigs)) if np.isfinite(sigs).any() else 0.0
    yc = (ys[:-1] + ys[1:] - 1) / 2.0
    xc = (xs[:-1] + xs[1:] - 1) / 2.0
    gx, gy = np.meshgrid(xc, yc)
    box_xy = np.column_stack([gx.ravel(), gy.ravel()])
    box_vals = vals.reshape(-1, c)
    lum_box = box_vals.mean(axis=1)
    valid = np.isfinite(box_vals).all(axis=1)

    # a box value's own noise (median of the box pixels read) and a floor so that a
    # model that is slightly too stiff does not throw away half the sky
    box_px = float(np.median(np.diff(ys))) * float(np.median(np.diff(xs)))
    floor = max(noise, 1e-12) * max(1.25 / math.sqrt(max(box_px / _box_stride(ys, xs) ** 2, 1.0)), 0.1)
    u = _norm_coords(box_xy[:, 0], w)
    v = _norm_coords(box_xy[:, 1], h)
    # boxes are rejected against a robust polynomial fit (degree 4 for the
    # flexible RBF model) and against their neighbours in its residuals, so
    # the gradient itself never makes an edge box look like an outlier
    rej_degree = config.degree if config.model == "poly" else 4
    nterms = len(_poly_terms(rej_degree))
    need = nterms + 3
    if valid.sum() < need:
        raise SkystackError(f"background: only {int(valid.sum())} sky boxes left of {valid.size} "
                            f"(need {need}); lower --bg-degree or --bg-grid, or skip it with --background none")
    a = _design(u, v, rej_degree)
    used = _sky_boxes(a, lum_box, valid, (ny, nx), reject=config.reject, floor=floor, need=need)

    model = np.empty((c, h, w), dtype=np.float32)
    if config.model == "poly":
        for ch in range(c):
            coef, *_ = np.linalg.lstsq(a[used], box_vals[used, ch], rcond=None)
            model[ch] = _eval_poly(coef, rej_degree, h, w)
    else:
        model[:] = _rbf_model(box_xy[used], box_vals[used], h, w, noise=floor, smoothing=config.rbf_smoothing,
                              step=max(2, int(round(math.sqrt(box_px) / 4))))
    pred = np.stack([model[ch][np.clip(np.rint(box_xy[:, 1]).astype(int), 0, h - 1),
                               np.clip(np.rint(box_xy[:, 0]).astype(int), 0, w - 1)] for ch in range(c)], axis=1)
    finite = np.isfinite(chans).all(axis=0)
    pedestal = np.array([float(np.median(model[ch][finite])) if finite.any() else float(np.median(model[ch]))
                         for ch in range(c)])
    res = (box_vals[used] - pred[used]) / np.where(pedestal != 0, np.abs(pedestal), 1.0)[None, :]
    rms = np.sqrt(np.mean(res ** 2, axis=0)) if used.any() else np.full(c, np.nan)
    return BackgroundModel(model=model, pedestal=pedestal, box_xy=box_xy, box_values=box_vals, used=used,
                           residual_rms=rms, noise=float(noise))


def _rbf_model(xy: np.ndarray, vals: np.ndarray, h: int, w: int, *, noise: float, smoothing: float,
               step: int) -> np.ndarray:
    """Smoothing thin-plate spline through box values, evaluated on a coarse grid and upsampled."""
    from scipy.interpolate import RBFInterpolator

    u = _norm_coords(xy[:, 0], w)
    v = _norm_coords(xy[:, 1], h)
    pts = np.column_stack([u, v])
    gy = np.arange(0, h + step - 1, step, dtype=np.float64)
    gy = np.minimum(gy, h - 1)
    gx = np.minimum(np.arange(0, w + step - 1, step, dtype=np.float64), w - 1)
    gy, gx = np.unique(gy), np.unique(gx)
    uu, vv = np.meshgrid(_norm_coords(gx, w), _norm_coords(gy, h))
    q = np.column_stack([uu.ravel(), vv.ravel()])
    out = np.empty((vals.shape[1], h, w), dtype=np.float32)
    scale = max(noise, 1e-12)
    for ch in range(vals.shape[1]):
        z = vals[:, ch] / scale  # unit noise: smoothing is in units of the box noise
        zc = float(np.median(z))
        rbf = RBFInterpolator(pts, z - zc, kernel="thin_plate_spline", smoothing=float(smoothing),
                              degree=1)
        g = (rbf(q).reshape(gy.size, gx.size) + zc) * scale
        out[ch] = _bilinear_upsample(g, gy, gx, h, w)
    return out


def apply_background(image: np.ndarray, bg: BackgroundModel, mode: str = "subtract") -> np.ndarray:
    """Remove a fitted background: ``image - model + pedestal`` or ``image * pedestal / model``."""
    img = np.asarray(image, dtype=np.float32)
    chans = img[None] if img.ndim == 2 else img
    ped = bg.pedestal.astype(np.float32)[:, None, None]
    if mode == "subtract":
        out = chans - bg.model + ped
    elif mode == "divide":
        if not (bg.model > 0).all():
            raise SkystackError("background model is not positive everywhere; use --background subtract "
                                "(division only suits vignetting on a positive sky)")
        out = chans * (ped / bg.model)
    else:
        raise SkystackError(f"background mode {mode!r}: use 'subtract' or 'divide'")
    out = out.astype(np.float32, copy=False)
    return out[0] if img.ndim == 2 else out


def extract_background(image: np.ndarray, config: BackgroundConfig = BackgroundConfig(), *,
                       mask: np.ndarray | None = None) -> tuple[np.ndarray, BackgroundModel]:
    """Fit the background (:func:`fit_background`) and remove it (:func:`apply_background`).

    Returns
    -------
    (image, model)
        The corrected image (same shape, float32, NaN kept) and the model.
    """
    bg = fit_background(image, config, mask=mask)
    return apply_background(image, bg, config.mode), bg
