"""Per-frame normalisation and weights for the combine step.

Each registered frame gets, per channel, a robust location and scale measured
on a sub-sample of its valid pixels: the median, and the MAD-based sigma
(``1.4826 * MAD``) after two rounds of 3-sigma clipping of stars (the idea of
Siril's IKSS estimator), taken after subtracting a coarse block-median
background so that a light-pollution gradient does not pass for scale. From these the combine kernel gets a
``scale`` and ``offset`` per frame and channel so that ``v * scale + offset``
puts every frame on the reference frame's level:

* ``none``: scale 1, offset 0;
* ``additive``: offset = loc_ref - loc_i;
* ``multiplicative``: scale = loc_ref / loc_i;
* ``additive+scale``: scale = the reference's star flux over the frame's
  (:func:`signal_ratios`: the summed flux of up to 300 apertures on the
  reference's unsaturated stars, each against its local background), so a
  cloudy frame is lifted and a noisy one is not shrunk;
  where fewer than :data:`MIN_SIGNAL_STARS` can be measured in any frame,
  s_ref / s_i (the old rule, which shrinks a noisy frame's signal);
  offset = loc_ref - loc_i * scale.

Weights (normalised to mean 1): ``none`` (1); ``noise`` (inverse variance
after normalisation, ``1 / (n_i * scale_i)^2``, with ``n_i`` the frame's
noise measured *before* normalisation and registration by
:func:`highpass_noise` on the calibrated mosaic, or s_i where that is unknown); ``psf`` (PSF signal,
after PixInsight's PSF Signal Weight: a star's peak signal over the noise,
``(1 / (n_i * scale_i * fwhm_i^2))^2`` -- the flux is equal after
normalisation and the peak falls as ``1 / fwhm^2``); ``stars`` (the frame's
quality score). With the old dispersion scale, ``n_i * scale_i`` was the
reference's noise for every frame, so ``noise`` weights all came out 1.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from skystack.engine.robust import (MAD_TO_SIGMA, clipped_median_sigma_rows, median_sigma_rows_where, nan_max,
                                   nanmedian_last)

NORMALIZATIONS = ("none", "additive", "multiplicative", "additive+scale")
WEIGHTINGS = ("none", "noise", "psf", "stars")
#: Fewest apertures :func:`signal_ratios` needs for a frame's signal scale: each aperture's
#: ratio scatters by 5-10 % (Bayer sampling of undersampled stars, noise), so fewer
#: apertures than this bias the scale by several percent (measured on simulated sessions).
MIN_SIGNAL_STARS = 20
#: Fewest pixels above 5 sigma that make a star for :func:`star_apertures` (RCD turns a hot
#: pixel into a small blob: on the Seestar M 94 frames, without darks, hot pixels made 300
#: RCD apertures of which most were defects, and a 0.75 star-flux ratio for every frame).
MIN_STAR_AREA = 5
_TABLES_LOCK = threading.Lock()


@dataclass(frozen=True, kw_only=True)
class FrameStats:
    """Robust location and scale of each channel of one frame."""

    location: np.ndarray  # (C,)
    scale: np.ndarray  # (C,)


def _flatten_background(chan: Any, block: int = 32) -> Any:
    """``chan`` ``(..., H, W)`` minus its coarse background (the median of each ``block x block``
    block's finite values, :func:`robust.clipped_median_sigma_rows` with no clipping), cropped to
    whole blocks, where ``chan`` is: the dispersion left is noise-like.

    A light-pollution gradient would otherwise dominate the scale estimate and
    frames would be rescaled by their gradient rather than their signal.
    """
    h, w = chan.shape[-2:]
    hb, wb = h // block, w // block
    if hb < 2 or wb < 2:
        return chan
    lead = tuple(chan.shape[:-2])
    core = chan[..., : hb * block, : wb * block].reshape(*lead, hb, block, wb, block)
    order = (*range(len(lead)), len(lead), len(lead) + 2, len(lead) + 1, len(lead) + 3)
    blocks = core.transpose(order).reshape(-1, block * block)
    # blocks with no data (outside a frame's footprint) get NaN
    med = median_sigma_rows_where(blocks, boxes=True, rounds=0)[0].astype(np.float32)
    return (core - med.reshape(*lead, hb, 1, wb, 1)).reshape(*lead, hb * block, wb * block)


#: Residuals per sub-grid :func:`highpass_noise` measures: the estimate scatters by 0.37 % (0.17 % with
#: 100k; 20 simulated 1200x800 mosaics), 0.7 % in a noise weight, which costs the weighted stack
#: nothing measurable, at 10 ms a 1 MP light instead of 33 ms.
NOISE_SAMPLE = 40_000


def highpass_noise(image: np.ndarray, *, step: int = 1, sample: int = NOISE_SAMPLE) -> float:
    """Per-pixel noise (sigma) of a frame from its finest scale, independent of its level and gradients.

    Each of the ``step x step`` sub-grids (the colours of a Bayer mosaic for
    ``step = 2``) is measured alone: the residual of each pixel against the
    mean of its 4 neighbours keeps the noise and the sharpest structure only;
    its MAD-sigma after two rounds of 3-sigma clipping (stars), divided by
    ``sqrt(1.25)`` (the residual's sigma for white noise), is that grid's
    noise. The result is the RMS over the grids.
    NaNs are ignored.

    On a device two launches (the residuals, ``highpass_residuals`` in
    ``kernels/framestats.cu``; their statistics, :func:`robust.clipped_median_sigma_rows`)
    and one download of a few numbers.

    Parameters
    ----------
    image : ndarray, (H, W)
        A frame before normalisation (e.g. the calibrated mosaic).
    step : int
        1 for a mono or debayered plane, 2 for a Bayer mosaic.
    sample : int
        Most residual values used per grid (rows are sub-sampled beyond).

    Returns
    -------
    float
        The noise in the image's units (NaN if it cannot be measured).
    """
    from skystack.engine.backend import array_module

    xp = array_module(image)
    if image.ndim != 2:
        return float("nan")
    res = highpass_residuals(xp.ascontiguousarray(image, dtype=xp.float32), int(step), int(sample))
    _, sig = clipped_median_sigma_rows(res, min_count=MIN_NOISE_RESIDUALS)
    return float(np.sqrt(np.mean((sig / np.sqrt(1.25)) ** 2)))


#: Fewest finite residuals a sub-grid needs for :func:`highpass_noise` (NaN below).
MIN_NOISE_RESIDUALS = 32


def _residual_grids(h: int, w: int, k: int, sample: int) -> list[tuple[int, int, int, int]]:
    """``(rows, columns, row step, count)`` of each sub-grid's residuals (``highpass_residuals``)."""
    grids = []
    for g in range(k * k):
        hg, wg = (h - g // k + k - 1) // k, (w - g % k + k - 1) // k
        rstep = max(1, (hg * wg) // sample)
        rows = len(range(1, hg - 1, rstep))
        grids.append((hg, wg, rstep, rows * max(0, wg - 2)))
    return grids


def highpass_residuals(x: Any, k: int, sample: int) -> Any:
    """``(k * k, n)`` float32 where ``x`` ``(H, W)`` float32 is: each sub-grid's residuals against the mean
    of its 4 neighbours (rows sub-sampled to about ``sample`` values), NaN-padded
    (``highpass_residuals`` in ``kernels/framestats.cu``, or its twin)."""
    from skystack.engine.backend import array_module, is_device_array, launch, run_cpu

    xp = array_module(x)
    h, w = x.shape
    n = max(1, max(g[3] for g in _residual_grids(h, w, k, sample)))
    out = xp.empty((k * k, n), dtype=xp.float32)
    args = (x, out, np.int64(h), np.int64(w), np.int32(k), np.int64(sample), np.int64(n))
    if is_device_array(x):
        launch("framestats.cu", "highpass_residuals", k * k * n, args)
        return out

    def native(mod: Any) -> np.ndarray:
        mod.launch("highpass_residuals", k * k * n, args)
        return out

    return run_cpu("framestats.cu", "highpass_residuals", k * k * n, lambda: _residuals_twin(x, k, sample, n),
                   native)


def _residuals_twin(x: np.ndarray, k: int, sample: int, n: int) -> np.ndarray:
    """:func:`highpass_residuals` in NumPy."""
    out = np.full((k * k, n), np.nan, dtype=np.float32)
    for g, (hg, wg, rstep, count) in enumerate(_residual_grids(*x.shape, k, sample)):
        if not count:
            continue
        grid = x[g // k::k, g % k::k]
        c = grid[1:hg - 1:rstep]
        m = c.shape[0]
        nb = np.float32(0.25) * (grid[0:hg - 2:rstep][:m, 1:-1] + grid[2:hg:rstep][:m, 1:-1] + c[:, :-2] + c[:, 2:])
        out[g, :count] = (c[:, 1:-1] - nb).ravel()
    return out


def robust_stats(image: Any, *, sample: int = 200_000, scale_sample: int | None = None) -> FrameStats:
    """Median, and the clipped MAD-sigma of the background-flattened frame, per channel.

    ``image`` is ``(C,H,W)`` or ``(H,W)`` (NumPy or CuPy: computed where it
    is, only the numbers leave the device, in one download); NaNs are ignored. The median reads
    about ``sample`` pixels, the MAD-sigma as many in whole rows, or about
    ``scale_sample`` on a grid of every k-th row and column.
    """
    from skystack.engine.backend import array_module, to_host

    xp = array_module(image)
    img = xp.asarray(image, dtype=xp.float32)
    planes = img if img.ndim == 3 else img[None]
    c = planes.shape[0]
    step = max(1, planes[0].size // sample)
    # Sub-sample rows (or rows and columns, for a scale_sample) so that large frames stay cheap.
    if scale_sample is None:
        sub = planes[:, ::step]
    else:
        k = max(1, math.isqrt(planes[0].size // scale_sample))
        sub = planes[:, ::k, ::k]
    # on a device: each statistic one launch a thread a row, no round trip per clipping round
    loc = median_sigma_rows_where(planes.reshape(c, -1)[:, ::step], rounds=0)[0]
    scale = median_sigma_rows_where(_flatten_background(sub).reshape(c, -1))[1]
    got = to_host(xp.concatenate([loc, scale]))
    return FrameStats(location=got[:c].astype(np.float64), scale=got[c:].astype(np.float64))


@dataclass(frozen=True, kw_only=True)
class StarApertures:
    """Apertures around the reference's unsaturated stars, for :func:`signal_ratios`.

    ``boxes`` are ``(y0, y1, x0, x1)`` cut-outs, ``inside`` the aperture (a
    star or a group of close stars, grown by a few pixels) and ``ring`` the
    box's pixels away from every star (its local background); ``ref_flux``
    ``(S,)`` is the reference's flux in each, on the channel sum.
    """

    boxes: list[tuple[int, int, int, int]]
    inside: list[np.ndarray]
    ring: list[np.ndarray]
    ref_flux: np.ndarray
    #: frame width the gather tables index (0: no apertures)
    width: int = 0
    #: device copies of the gather tables, by array module (filled on first use)
    _on: dict = field(default_factory=dict, repr=False, compare=False)

    def tables(self, xp: Any) -> list[ApertureGroup]:
        """The boxes' gather tables on ``xp``'s device, in groups of boxes of similar size.

        Each group's tables are ``(S_g, K)``: its boxes' pixels as flat indices into one
        ``(H, W)`` plane (row-major, padded to the group's largest box), so a few large
        boxes do not pad every small one. Built there from the boxes' corners and one
        byte per box pixel (its kind), so a device receives ~1 byte per aperture pixel
        once per session.
        """
        key = xp.__name__
        with _TABLES_LOCK:  # frames are measured in threads: build (and upload) once
            if key not in self._on:
                self._on[key] = self._build_tables(xp)
        return self._on[key]

    def _build_tables(self, xp: Any) -> list[ApertureGroup]:
        geo = np.array([(y0, x0, x1 - x0, (y1 - y0) * (x1 - x0)) for y0, y1, x0, x1 in self.boxes], np.int64)
        kinds = [np.where(r, 3, np.where(a, 2, 1)).ravel().astype(np.uint8) for a, r in zip(self.inside, self.ring)]
        octave = np.ceil(np.log2(geo[:, 3])).astype(np.int64)  # a group's boxes differ in size by < 2x
        groups = []
        for o in np.unique(octave):
            rows = np.flatnonzero(octave == o)
            g = geo[rows]
            y0, x0, bw, size = (xp.asarray(g[:, c])[:, None] for c in range(4))
            start = xp.asarray(np.concatenate([[0], np.cumsum(g[:-1, 3])]))[:, None]
            k = xp.arange(int(g[:, 3].max()))[None]
            valid = k < size
            kind = xp.asarray(np.concatenate([kinds[r] for r in rows]))
            code = xp.where(valid, kind[xp.where(valid, start + k, 0)], 0)
            index = xp.where(valid, (y0 + k // bw) * self.width + x0 + k % bw, 0)
            groups.append(ApertureGroup(rows=rows, index=index, valid=valid, inside=code == 2, ring=code == 3))
        return groups


@dataclass(frozen=True, kw_only=True)
class ApertureGroup:
    """Gather tables of some of :class:`StarApertures`' boxes (``rows``, host indices), on a device."""

    rows: np.ndarray
    index: Any
    valid: Any
    inside: Any
    ring: Any


def star_apertures(ref: np.ndarray, *, max_stars: int = 300, grow: int = 8, pad: int = 6) -> StarApertures:
    """Apertures on the brightest unsaturated stars of the reference ``(C, H, W)`` or ``(H, W)`` frame.

    Stars are the pixels 5 sigma above the block-median background of the
    channel sum; each connected group, grown by ``grow`` px (so a star blurred
    by worse seeing in another frame still falls inside: a Moffat beta 3 star
    keeps ~99 % of its flux within 3 FWHM of its centre), is one aperture,
    measured against the median of the box's star-free pixels ``pad`` px
    around it. Groups with a channel peak above 90 % of that channel's
    maximum (saturation), touching the edge, or with fewer than 20 background
    pixels are left out; the ``max_stars`` brightest remain.
    """
    from scipy import ndimage

    from skystack.engine.backend import array_module, to_host

    xp = array_module(ref)
    img = xp.asarray(ref, dtype=xp.float32)
    planes = img if img.ndim == 3 else img[None]
    # where the frame is: the channel sum, and the pixels near a channel's maximum (saturation);
    # only these (4 bytes and 1 bit a pixel) leave a device, once per session
    total = xp.nan_to_num(planes.sum(axis=0))
    hot = xp.zeros(total.shape, dtype=bool)
    tops = to_host(nan_max(planes.reshape(planes.shape[0], -1), axis=1))  # one download
    for plane, top in zip(planes, tops):  # nan_to_num(plane) >= 90 % of the plane's maximum, without its copy
        thr = np.float32(0.9) * np.float32(top)
        if np.isposinf(thr):  # nan_to_num makes +inf finite: nothing reaches an infinite maximum
            continue
        hot |= plane >= thr
        if not thr > 0:  # NaN reads 0 there
            hot |= xp.isnan(plane)
    hot = np.unpackbits(to_host(xp.packbits(hot)), count=hot.size).reshape(hot.shape).astype(bool)
    flat = _flatten_background(to_host(total))
    sig = robust_stats(flat).scale[0]
    h, w = flat.shape
    empty = StarApertures(boxes=[], inside=[], ring=[], ref_flux=np.zeros(0))
    if not sig > 0:
        return empty
    core = flat > 5 * sig
    lab, nc = ndimage.label(core)
    if nc:  # a star covers several pixels; a hot pixel or a cosmic ray (one pixel, or a few after
        # demosaicing) would tie the scale to a defect that only the reference has
        area = np.bincount(lab.ravel(), minlength=nc + 1)[1:]
        core = np.isin(lab, 1 + np.flatnonzero(area >= MIN_STAR_AREA))
    grown = ndimage.binary_dilation(core, iterations=grow)
    labels, n = ndimage.label(grown)
    idx = np.arange(1, n + 1)
    # per-label sums as ndimage.sum_labels takes them (one bincount in pixel order: the same float64
    # sums), without its second bincount of the counts
    flux = np.bincount(labels.ravel(), weights=flat.ravel(), minlength=n + 1)[1:]
    ok = np.bincount(labels[hot[:h, :w]], minlength=n + 1)[1:] == 0  # no pixel at 90 % of a channel's maximum
    objects = ndimage.find_objects(labels)
    boxes, inside, ring = [], [], []
    for k in idx[ok][np.argsort(-flux[ok])]:
        sy, sx = objects[k - 1]
        y0, y1, x0, x1 = sy.start - pad, sy.stop + pad, sx.start - pad, sx.stop + pad
        if y0 < 0 or x0 < 0 or y1 > h or x1 > w:
            continue
        bg = ~grown[y0:y1, x0:x1]
        if bg.sum() < 20:
            continue
        boxes.append((y0, y1, x0, x1))
        inside.append(labels[y0:y1, x0:x1] == k)
        ring.append(bg)
        if len(boxes) == max_stars:
            break
    if not boxes:
        return empty
    ap = StarApertures(boxes=boxes, inside=inside, ring=ring, ref_flux=empty.ref_flux, width=planes.shape[-1])
    return StarApertures(boxes=boxes, inside=inside, ring=ring, ref_flux=_aperture_fluxes(planes, ap)[0],
                         width=ap.width, _on=ap._on)


def _aperture_fluxes(planes: Any, ap: StarApertures, *, tops: bool = False) -> tuple[np.ndarray, ...]:
    """``(flux, peak)``: ``(S,)`` flux of the channel sum in each aperture above its background's
    median (NaN if a pixel is missing), and ``(C, S)`` float32 each channel's largest value in each
    box (-inf where a box has no data); with ``tops``, also ``(C,)`` each channel's largest value
    in the whole frame (:func:`robust.nan_max`).

    All boxes at once, where ``planes`` are (NumPy or CuPy; on a device one ``aperture_measure``
    launch a group, writing into one array): only numbers leave the device, in one download.
    """
    from skystack.engine.backend import array_module, to_host

    xp = array_module(planes)
    n_s, c = len(ap.boxes), int(planes.shape[0])
    src = planes if xp is np else xp.ascontiguousarray(planes, dtype=xp.float32)
    measure = _aperture_measure_numpy if xp is np else _aperture_measure_device
    groups = ap.tables(xp)
    # [flux of each group's boxes | each group's (C, S_g) peaks | the channels' maxima]
    spans, f = [], 0  # each group, where its fluxes and its peaks start, its boxes
    for g in groups:
        spans.append((g, f, n_s + c * f, len(g.rows)))
        f += len(g.rows)
    out = xp.empty(n_s * (1 + c) + (c if tops else 0), dtype=xp.float64)
    for g, f, p, m in spans:
        measure(src, g, out[f:f + m], out[p:p + c * m])
    if tops:
        out[n_s * (1 + c):] = nan_max(src.reshape(c, -1), axis=1)
    got = to_host(out)
    flux = np.full(n_s, np.nan)
    peak = np.full((c, n_s), -np.inf, np.float32)
    for g, f, p, m in spans:
        flux[g.rows] = got[f:f + m]
        peak[:, g.rows] = got[p:p + c * m].reshape(c, m)
    return (flux, peak, got[n_s * (1 + c):].astype(np.float32)) if tops else (flux, peak)


def _aperture_measure_numpy(planes: Any, g: ApertureGroup, flux: Any, peak: Any) -> None:
    """A group's fluxes and peaks into ``flux`` ``(S_g,)`` and ``peak`` (``(C, S_g)`` row-major), float64:
    the sum of the box-minus-background values in the aperture, added in order (NaN unless every box
    pixel is finite), and each channel's largest value. Array operations where ``planes`` are; the
    twin of ``aperture_measure`` (kernels/framestats.cu)."""
    from skystack.engine.backend import array_module

    xp = array_module(planes)
    vals = [plane.reshape(-1)[g.index] for plane in planes]
    box = vals[0]
    for v in vals[1:]:  # the channel sum, as planes.sum(axis=0) adds them
        box = box + v
    whole = xp.all(xp.isfinite(box) | ~g.valid, axis=1)
    bg = nanmedian_last(xp.where(g.ring, box, xp.float32(np.nan)))
    dev = xp.where(g.inside, box - bg[:, None], xp.float32(0.0)).astype(xp.float64)
    flux[:] = xp.where(whole, xp.cumsum(dev, axis=1)[:, -1], xp.float64(np.nan))
    low = xp.float32(-np.inf)
    peak[:] = xp.stack([xp.where(g.valid & ~xp.isnan(v), v, low).max(axis=1) for v in vals]).ravel()


def _aperture_measure_device(planes: Any, g: ApertureGroup, flux: Any, peak: Any) -> None:
    """:func:`_aperture_measure_numpy` on a device: one ``aperture_measure`` launch (a thread an aperture)."""
    from skystack.engine.backend import array_module, launch

    xp = array_module(planes)
    src = planes  # C-contiguous float32 (_aperture_fluxes)
    rows, k = (int(s) for s in g.index.shape)
    c, plane = int(src.shape[0]), int(src.shape[1] * src.shape[2])
    work = xp.empty((rows, k), dtype=xp.float32)
    launch("framestats.cu", "aperture_measure", rows, (src, g.index, g.valid, g.inside, g.ring, flux, peak, work,
                                                      np.int64(rows), np.int64(k), np.int32(c), np.int64(plane)))


def signal_ratios(image: np.ndarray, ap: StarApertures) -> np.ndarray:
    """The frame's star flux over the reference's, measured on the channel sum ``(C,)`` (one value repeated).

    The channel sum, because a Bayer camera's undersampled star moves flux
    between the interpolated channels with its position on the mosaic (single
    stars' R and G ratios differ by tens of percent) while its total holds.
    The apertures whose ratio lies within 3 MAD-sigma (at least 5 %) of the
    median ratio (a trail or a cosmic ray crossing one is left out) give the
    ratio of their summed fluxes, which the bright stars dominate. NaN with
    fewer than :data:`MIN_SIGNAL_STARS` measurable apertures (inside the
    frame's data, unsaturated there too).
    """
    from skystack.engine.backend import array_module

    xp = array_module(image)
    img = xp.asarray(image, dtype=xp.float32)
    planes = img if img.ndim == 3 else img[None]
    out = np.full(planes.shape[0], np.nan)
    if not len(ap.boxes):
        return out
    flux, peak, tops = _aperture_fluxes(planes, ap, tops=True)  # no data: no flux, and NaN below
    ref = ap.ref_flux
    good = np.isfinite(flux) & (ref > 0)
    for top, p in zip(tops, peak):  # unsaturated: below 90 % of the channel's maximum
        good &= p < np.float32(0.9) * top
    if good.sum() < MIN_SIGNAL_STARS:
        return out
    ratio = flux[good] / ref[good]
    med = float(np.median(ratio))
    tol = max(3.0 * MAD_TO_SIGMA * float(np.median(np.abs(ratio - med))), 0.05 * abs(med))
    sel = np.abs(ratio - med) <= tol
    out[:] = float(flux[good][sel].sum() / ref[good][sel].sum())
    return out


#: Pixels (every k-th of each row and column) each registered frame's dispersion is measured on. It is only the
#: fallback (the scale when a frame has no star-flux ratio, the weight when a frame has no noise
#: measure), so ~40k pixels do (+-0.7 %), at a fifth of the cost of the median's 200k.
FALLBACK_SCALE_SAMPLE = 40_000


def frame_measures(image: np.ndarray, ap: StarApertures) -> tuple[FrameStats, np.ndarray]:
    """What normalisation needs of one registered frame: :func:`robust_stats` and :func:`signal_ratios`.

    Parameters
    ----------
    image : ndarray
        The frame ``(C, H, W)`` or ``(H, W)`` in the reference grid.
    ap : StarApertures
        The reference's apertures (:func:`star_apertures`).

    Returns
    -------
    (FrameStats, ndarray)
        Its statistics and its ``(C,)`` star-flux ratio to the reference.
    """
    return frame_stats(image), signal_ratios(image, ap)


def frame_stats(image: np.ndarray) -> FrameStats:
    """:func:`frame_measures`' statistics, which need no apertures: :func:`robust_stats` with the
    fallback dispersion from :data:`FALLBACK_SCALE_SAMPLE` pixels."""
    return robust_stats(image, scale_sample=FALLBACK_SCALE_SAMPLE)


def normalization_factors(stats: list[FrameStats], ref: int, method: str,
                          signal: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, offset)`` arrays of shape ``(N, C)`` mapping each frame onto frame ``ref``.

    ``signal`` ``(N, C)``: each frame's star flux over the reference's
    (:func:`signal_ratios`); ``additive+scale`` takes its scale from it when
    it is finite and positive for every frame, else (too few stars) from the
    dispersion ratio for every frame, so all frames share one rule.
    """
    if method not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {method!r}")
    loc = np.stack([s.location for s in stats])
    sc = np.stack([s.scale for s in stats])
    n, c = loc.shape
    scale = np.ones((n, c))
    offset = np.zeros((n, c))
    if method == "additive":
        offset = loc[ref] - loc
    elif method == "multiplicative":
        scale = np.where(np.abs(loc) > 1e-12, loc[ref] / np.where(loc == 0, 1, loc), 1.0)
    elif method == "additive+scale":
        scale = np.where(sc > 0, sc[ref] / np.where(sc > 0, sc, 1), 1.0)
        sig = None if signal is None else np.asarray(signal, dtype=np.float64)
        if sig is not None and sig.shape == scale.shape and np.all(np.isfinite(sig) & (sig > 0)):
            scale = 1.0 / sig
        offset = loc[ref] - loc * scale
    scale = np.nan_to_num(scale, nan=1.0)
    offset = np.nan_to_num(offset, nan=0.0)
    return scale.astype(np.float32), offset.astype(np.float32)


def frame_weights(stats: list[FrameStats], scale: np.ndarray, method: str,
                  scores: list[float] | None = None, noise: list[float | None] | None = None,
                  fwhm: list[float | None] | None = None) -> np.ndarray:
    """Weights ``(N, C)`` for the combine (normalised to mean 1).

    Parameters
    ----------
    stats : list of FrameStats
        Each frame's robust statistics (their scale is the noise fallback).
    scale : ndarray, (N, C)
        The normalisation scale of each frame and channel.
    method : str
        One of :data:`WEIGHTINGS`.
    scores : list of float, optional
        Quality scores (``"stars"``).
    noise : list of float or None, optional
        Each frame's background noise measured before normalisation (``"noise"``, ``"psf"``).
    fwhm : list of float or None, optional
        Each frame's star FWHM (``"psf"``).

    Returns
    -------
    ndarray, (N, C) float32
    """
    if method not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {method!r}")
    n, c = scale.shape
    if method == "none":
        w = np.ones((n, c))
    elif method in ("noise", "psf"):
        sig = _noise_before_normalisation(stats, noise) * scale
        if method == "psf":
            fw = np.array([np.nan if f is None else f for f in (fwhm or [None] * n)], dtype=np.float64)
            fw = np.where(np.isfinite(fw) & (fw > 0), fw, np.nanmedian(fw) if np.isfinite(fw).any() else 1.0)
            sig = sig * (fw ** 2)[:, None]
        w = np.where(sig > 0, 1.0 / np.maximum(sig, 1e-30) ** 2, 0.0)
    else:
        sc = np.asarray(scores if scores is not None else np.ones(n), dtype=np.float64)
        w = np.repeat(np.clip(np.nan_to_num(sc), 0, None)[:, None], c, axis=1)
    w = np.nan_to_num(w)
    mean = w.mean(axis=0, keepdims=True)
    return (w / np.where(mean > 0, mean, 1.0)).astype(np.float32)


def _noise_before_normalisation(stats: list[FrameStats], noise: list[float | None] | None) -> np.ndarray:
    """``(N, C)`` noise of each frame in its own units: ``noise`` (one per frame) where all are known, else s_i."""
    sc = np.stack([s.scale for s in stats])
    nz = np.array([np.nan if v is None else v for v in (noise or [None] * len(stats))], dtype=np.float64)
    if np.all(np.isfinite(nz) & (nz > 0)):
        return np.repeat(nz[:, None], sc.shape[1], axis=1)
    return sc

