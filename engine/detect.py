"""Star detection and frame quality (peaks of a background-subtracted luminance image).

Stars are found on a *luminance* image: the 2x2-binned mean of a CFA mosaic
(each bin holds one full Bayer tile, so the colour checkerboard disappears and
the image is four times smaller), the channel mean of a colour image, or a mono
image itself. :mod:`skystack.engine.sources` subtracts its background mesh,
applies SExtractor's matched filter and lists the peaks above the threshold
with their isophotal moments, where the frame is: with the kernels of
``kernels/sources.cu`` on a device (only the list comes down) or their native
builds or NumPy twins on the host, with the same numbers.

Each detection is then measured on the **full-resolution data** by a windowed
centroid (SExtractor's XWIN: the fixed point of a Gaussian-weighted first moment,
with the window matched to the median star) and window-corrected second moments:
the ``window_measure`` kernel of ``kernels/detect.cu`` (a thread per star, on the
device or compiled for the CPU) or its vectorised NumPy twin
(:mod:`skystack.engine.centroid`). On a CFA mosaic
every Bayer site gets its own
sky level and is divided by its share of the star's light, so a star's colour
cannot pull its centroid towards the red or blue pixels (the 2x2 binned image
alone would bias a coloured star by up to half a pixel); the diagonal site pairs
are weighted alike, so their pixel-phase errors cancel. A **PSF model**
(elliptical Moffat with free ``beta``, a Gaussian its limit; Levenberg-Marquardt
with a free amplitude and sky per site) is fitted only to a sample of bright,
isolated, unflagged stars (:attr:`DetectConfig.psf_sample`;
:mod:`skystack.engine.psf`, the ``psf_fit`` kernel or its twin): it sets the
FWHM scale of all stars (moments read Moffat wings as a wider core) and the
centroids of those stars. This gives, per star,

* a centroid (with its 1-sigma error: the sky noise propagated through the
  windowed centroid, scaled up by the misfit of a Gaussian model where shot
  noise or a neighbour dominates; the fit's error for the sampled stars),
* the FWHM along the two axes, reported as their geometric mean, and the
  ellipticity ``1 - b/a`` (FWHM ratio of the minor and major axes).

Coordinates and FWHM are always in **full-resolution sensor pixels** with the
skystack convention ((0, 0) is the centre of the top-left pixel). Binned pixel
``(u, v)`` has its centre at full-resolution ``(2u + 0.5, 2v + 0.5)``. The
FWHM is that of the recorded star, pixel response included, as PSF-fitting
tools (Siril, PixInsight) report it. Detections sharper than
:attr:`DetectConfig.min_fwhm_px` (hot pixels, cosmic rays) or broader than
:attr:`DetectConfig.max_fwhm_px` are dropped.

Frame quality
-------------
:func:`measure_quality` summarises a frame in a :class:`FrameQuality`:
star count, median FWHM, median roundness (``b/a``), background level, background
noise and one **score**::

    score = n_stars * roundness / fwhm_px**2

* ``n_stars`` (sources that pass the shape filters) tracks transparency and
  depth: haze, clouds, moonlight and sky noise all hide the faint stars first.
* ``1 / fwhm**2`` is how concentrated a star's light is (peak surface brightness
  of a fixed flux scales as ``1 / FWHM**2``): focus, seeing and wind.
* ``roundness`` (median ``b/a``, 1 = round) penalises trailing and wind shake.

It is the same idea as DeepSkyStacker's score (a sum over stars of a per-star
quality that rewards sharp, round stars, so more stars score higher) and
Siril's weighted FWHM (FWHM penalised by the loss of stars). Higher is better;
a frame with no star scores 0. The reference frame is the best-scoring one
(:func:`choose_reference`); :func:`select_frames` applies the user's filters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from skystack.engine.backend import array_module
from skystack.engine.centroid import window_measure
from skystack.engine.neighbours import PointIndex
from skystack.engine.psf import fit_psf
from skystack.engine.sources import bin2x2, find_sources

#: 2 * sqrt(2 ln 2): FWHM of a Gaussian of unit sigma.
GAUSS_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))

#: Star flags (bit mask) in :attr:`StarList.flag`.
FLAG_SATURATED = 1  #: peak at or above the saturation level
FLAG_ELONGATED = 2  #: ellipticity above DetectConfig.max_ellipticity (trail, blend)
FLAG_EDGE = 4  #: measurement window cut by the image border
FLAG_FIT_FAILED = 8  #: the measurement did not converge (the isophotal values kept)



@dataclass(frozen=True, kw_only=True)
class DetectConfig:
    """Settings of :func:`detect_stars`.

    Attributes
    ----------
    threshold_sigma : float
        Detection threshold in units of the background noise of the
        luminance image, applied to the matched-filtered image (whose noise
        is 0.375 of the pixels'), so 3 sigma is a conservative cut, as in sep.
    min_area : int
        Fewest pixels above the threshold within 2 px of a peak (in the
        luminance image).
    max_stars : int
        Keep at most this many stars (the brightest) in the returned list.
        :attr:`StarList.n_total` still counts all of them.
    bin2 : bool
        Also bin mono and colour frames 2x2 (faster on big sensors). CFA
        mosaics are always binned 2x2: the Bayer checkerboard would otherwise
        break every star into colour-dependent pieces.
    bkg_box : int
        Background mesh size in luminance pixels.
    bkg_filter : int
        Median filter size of the background mesh (odd, in boxes).
    min_fwhm_px : float
        Detections sharper than this (full-resolution px) are hot pixels or
        cosmic rays and are dropped.
    max_fwhm_px : float
        Detections broader than this (full-resolution px) are galaxies,
        nebula knots or blends and are dropped.
    max_ellipticity : float
        Stars more elongated than this get :data:`FLAG_ELONGATED` (kept, but
        left out of the FWHM and roundness statistics).
    saturation : float or None
        Level (in the input's units) at or above which a pixel is saturated;
        such stars get :data:`FLAG_SATURATED` and are left out of the FWHM
        statistics. ``None``: no check.
    max_measured : int
        Cap on how many detections (brightest first) are measured. Measuring
        stops once ``max_stars`` pass the filters; fainter detections are
        counted in :attr:`StarList.n_total` when their isophotal size is star-like.
    psf : str
        PSF model of the sample fit: ``"moffat"`` (free beta; FWHM right for
        Moffat and Gaussian stars) or ``"gaussian"`` (overestimates the FWHM of
        stars with Moffat wings by ~10 %).
    psf_sample : int
        How many bright, isolated, unflagged stars get the PSF model fit
        (about 0.8 ms each); 0 keeps the moment FWHM (exact for Gaussian stars).
    """

    threshold_sigma: float = 3.0
    min_area: int = 5
    max_stars: int = 400
    bin2: bool = False
    bkg_box: int = 64
    bkg_filter: int = 3
    min_fwhm_px: float = 1.2
    max_fwhm_px: float = 40.0
    max_ellipticity: float = 0.5
    saturation: float | None = None
    max_measured: int = 1000
    psf: str = "moffat"
    psf_sample: int = 30

    def __post_init__(self) -> None:
        if self.psf_sample < 0:
            raise ValueError(f"psf_sample must be >= 0, got {self.psf_sample}")
        if self.bkg_filter < 1 or self.bkg_filter % 2 == 0:
            raise ValueError(f"bkg_filter must be an odd number of boxes, got {self.bkg_filter}")
        if self.psf not in ("moffat", "gaussian"):
            raise ValueError(f"unknown PSF model {self.psf!r}; use 'moffat' or 'gaussian'")


@dataclass(frozen=True, kw_only=True)
class StarList:
    """Stars of one frame, brightest first (arrays of equal length).

    Attributes
    ----------
    x, y : ndarray of float64
        Centroids in full-resolution sensor pixels ((0, 0) = centre of the
        top-left pixel, x right, y down).
    flux : ndarray of float64
        Background-subtracted flux in luminance-image units (isophotal flux about the peak).
    fwhm : ndarray of float64
        FWHM from the window-corrected second moments, scaled to the PSF
        model's FWHM, full-resolution px (geometric mean of the major and
        minor axes).
    ellipticity : ndarray of float64
        ``1 - b/a`` from the second moments (0 = round).
    pos_err : ndarray of float64
        1-sigma centroid uncertainty per axis, full-resolution px.
    flag : ndarray of int32
        Bit mask of ``FLAG_*`` values.
    n_total : int
        Stars found before the :attr:`DetectConfig.max_stars` cut.
    background : float
        Median sky level of the luminance image (input units; NaN if unknown).
    noise : float
        Background noise (rms) of the luminance image (input units).
    binning : int
        1 or 2: the luminance image the stars were found on.
    shape : tuple of int
        ``(H, W)`` of the full-resolution frame.
    """

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    fwhm: np.ndarray
    ellipticity: np.ndarray
    pos_err: np.ndarray
    flag: np.ndarray
    n_total: int = 0
    background: float = float("nan")
    noise: float = float("nan")
    binning: int = 1
    shape: tuple[int, int] = (0, 0)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def xy(self) -> np.ndarray:
        """``(N, 2)`` float64 array of centroids, brightest first."""
        return np.column_stack([self.x, self.y]).astype(np.float64, copy=False)

    @property
    def roundness(self) -> np.ndarray:
        """``b/a`` per star (1 = round)."""
        return 1.0 - self.ellipticity


@dataclass(frozen=True, kw_only=True)
class FrameQuality:
    """Quality summary of one frame (see the module docstring for the score).

    Attributes
    ----------
    n_stars : int
        Stars detected (after the hot-pixel / extended-object filters).
    fwhm_px : float
        Median FWHM of the unflagged stars, full-resolution px (NaN without stars).
    roundness : float
        Median ``b/a`` of the unflagged stars (1 = round; NaN without stars).
    background : float
        Median sky level of the luminance image (input units).
    noise : float
        Background rms of the luminance image (input units).
    score : float
        ``n_stars * roundness / fwhm_px**2``; 0 when no star was measured.
    """

    n_stars: int
    fwhm_px: float
    roundness: float
    background: float
    noise: float
    score: float

    def to_dict(self) -> dict[str, float | int]:
        """JSON-serialisable dict (NaN becomes None)."""
        out: dict[str, float | int] = {}
        for k in self.__dataclass_fields__:
            v = getattr(self, k)
            out[k] = None if isinstance(v, float) and not math.isfinite(v) else v
        return out


# --------------------------------------------------------------------------- luminance


def detection_plane(data: np.ndarray, pattern: str | None = None, *, bin2: bool = False) -> np.ndarray:
    """Return the float32 luminance image stars are detected on.

    Parameters
    ----------
    data : ndarray
        ``(H, W)`` CFA mosaic or mono image, or ``(3, H, W)`` colour image.
    pattern : str or None
        Bayer pattern of a CFA mosaic; ``None`` for mono or colour data.
    bin2 : bool
        Bin mono/colour data 2x2 as well (a CFA mosaic is always binned).

    Returns
    -------
    ndarray of float32
        CFA: the mean of each 2x2 Bayer tile, shape ``(H//2, W//2)``.
        Colour: the mean of the three channels. Mono: the image itself.
        Binned outputs have pixel ``(u, v)`` centred on full-resolution
        ``(2u + 0.5, 2v + 0.5)``.
    """
    data = array_module(data).asarray(data)  # computed where the data is (NumPy or CuPy)
    if data.ndim == 3:
        lum = data.astype("float32").mean(axis=0, dtype="float32")
        return bin2x2(lum) if bin2 else lum
    if data.ndim != 2:
        raise ValueError(f"expected a (H, W) or (3, H, W) image, got shape {data.shape}")
    if pattern is not None or bin2:
        return bin2x2(data)
    return data.astype("float32", copy=True)


# --------------------------------------------------------------------------- detection


def _empty(shape: tuple[int, int], binning: int, background: float = float("nan"),
           noise: float = float("nan")) -> StarList:
    z = np.zeros(0, dtype=np.float64)
    return StarList(x=z, y=z.copy(), flux=z.copy(), fwhm=z.copy(), ellipticity=z.copy(),
                    pos_err=z.copy(), flag=np.zeros(0, dtype=np.int32), n_total=0, background=background,
                    noise=noise, binning=binning, shape=shape)


def detect_stars(image: np.ndarray, *, pattern: str | None = None,
                 config: DetectConfig | None = None) -> StarList:
    """Find and measure the stars of one frame.

    Parameters
    ----------
    image : ndarray
        ``(H, W)`` CFA mosaic or mono frame, or ``(3, H, W)`` colour frame, any
        dtype (raw ``uint16`` or calibrated ``float32``). NaN marks no-data.
    pattern : str or None
        Bayer pattern when ``image`` is a CFA mosaic (it is then binned 2x2).
    config : DetectConfig, optional
        Detection settings.

    Returns
    -------
    StarList
        Stars brightest first, in full-resolution sensor coordinates. An empty,
        black, constant or all-NaN frame gives an empty list (never an error).
    """
    cfg = config or DetectConfig()
    image = array_module(image).asarray(image)  # a device frame stays there: only numbers come down
    shape = (int(image.shape[-2]), int(image.shape[-1]))
    binning = 2 if (pattern is not None and image.ndim == 2) or cfg.bin2 else 1
    if min(shape) < 4 * binning:
        return _empty(shape, binning)
    lum_full = None
    if image.ndim == 3:
        lum_full = detection_plane(image)
        lum = bin2x2(lum_full) if cfg.bin2 else lum_full.copy()
    else:
        lum = detection_plane(image, pattern, bin2=cfg.bin2)
    lum = array_module(lum).ascontiguousarray(lum, dtype="float32")
    box = int(max(8, min(cfg.bkg_box, min(lum.shape) // 2)))
    objs, background, noise, sub = find_sources(lum, threshold_sigma=cfg.threshold_sigma, min_area=cfg.min_area,
                                                box=box, filt=cfg.bkg_filter)
    if objs is None:
        return _empty(shape, binning, background, noise)

    order = np.argsort(-objs["flux"], kind="stable")
    objs = objs[order]
    f = float(binning)
    sx = objs["x"].astype(np.float64) * f + (f - 1.0) / 2.0
    sy = objs["y"].astype(np.float64) * f + (f - 1.0) / 2.0
    s2 = np.clip(objs["a"].astype(np.float64) * objs["b"], 0.1, None) * f * f
    sigma_med = float(np.sqrt(np.median(s2[: max(cfg.max_stars, 50)])))
    half = int(np.clip(math.ceil(4.0 * sigma_med), 4, 24))

    # measure on the full-resolution data: the CFA mosaic itself (per-site
    # amplitude and sky in the fit), or the mono / colour-mean luminance
    if image.ndim == 2 and pattern is not None:
        fit_img, sites = image, 4
    elif binning == 1:  # background-subtracted, no data NaN; the fit has its own sky term
        fit_img, sites = array_module(sub).where(array_module(lum).isfinite(lum), sub, np.float32(np.nan)), 1
    else:
        fit_img, sites = (lum_full if lum_full is not None else image), 1

    sigma_w = _window_sigma(fit_img, sx[:24], sy[:24], sigma_med, sites, noise * f, cfg)

    done, ok, keep, fwhm, ellip, x_full, y_full, perr_f = _measure_brightest(
        objs, fit_img, sx, sy, sigma_w, sites, noise * f, f, shape, cfg)
    flag = _flags(objs[:done], ok, ellip, sx[:done], sy[:done], half, shape, background, cfg)
    scale = _psf_sample(fit_img, sx, sy, s2, x_full, y_full, perr_f, fwhm, keep & (flag == 0), half, sites, cfg)
    fwhm = fwhm * scale
    keep &= ~_duplicates(x_full, y_full, keep)
    idx = np.flatnonzero(keep)
    n_total = int(idx.size) + _star_like_unmeasured(objs, idx, done)
    idx = idx[: cfg.max_stars]
    return StarList(
        x=x_full[idx], y=y_full[idx], flux=objs["flux"][idx].astype(np.float64) * f * f,
        fwhm=fwhm[idx], ellipticity=ellip[idx], pos_err=perr_f[idx], flag=flag[idx],
        n_total=n_total, background=background, noise=noise, binning=binning, shape=shape,
    )


def _measure_brightest(objs, fit_img, sx, sy, sigma_w: float, sites: int, noise_pix: float, f: float,
                       shape: tuple[int, int], cfg: DetectConfig):
    """Measure the brightest detections first, in chunks, until ``max_stars`` pass the filters.

    Returns ``done`` (how many were measured) and, for those, ``ok``, ``keep``,
    FWHM, ellipticity, position and position error (:func:`_star_list`).
    """
    cap = min(len(objs), int(cfg.max_measured))
    mx, my, cxx, cyy, cxy, perr = (np.full(cap, np.nan) for _ in range(6))
    ok = np.zeros(cap, dtype=bool)
    keep = np.zeros(cap, dtype=bool)
    done = 0
    while done < cap:
        want = cfg.max_stars - int(keep[:done].sum())
        sl = slice(done, min(cap, done + max(32, int(want * 1.2) + 8)))
        mx[sl], my[sl], cxx[sl], cyy[sl], cxy[sl], perr[sl], ok[sl] = window_measure(
            fit_img, sx[sl], sy[sl], sigma_w, sites, noise_pix)
        done = sl.stop
        keep[:done], fwhm, ellip, x_full, y_full, cxx_f, cyy_f, cxy_f, perr_f = _star_list(
            objs[:done], ok[:done], mx[:done], my[:done], cxx[:done], cyy[:done], cxy[:done],
            perr[:done], sx[:done], sy[:done], f, shape, cfg)
        if keep[:done].sum() >= cfg.max_stars:
            break
    return done, ok[:done], keep[:done], fwhm, ellip, x_full, y_full, perr_f


#: Kept detections closer than this (full-resolution px) to a brighter one are the same star.
DUPLICATE_PX = 1.5


def _duplicates(x: np.ndarray, y: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Kept detections (brightest first) whose measured centroid lies within :data:`DUPLICATE_PX` of a
    brighter kept one: two peaks of one star (a bump on its wing) that the windowed centroid took
    to the same place."""
    dup = np.zeros(keep.size, dtype=bool)
    kept = np.flatnonzero(keep)
    if kept.size < 2:
        return dup
    xy = np.column_stack([x[kept], y[kept]])
    qi, pj = PointIndex(xy).pairs_within(xy, DUPLICATE_PX)
    dup[kept[qi[pj < qi]]] = True  # a brighter one (a lower index) that close
    return dup


def _flags(objs, ok, ellip, sx, sy, half: int, shape: tuple[int, int], background: float,
           cfg: DetectConfig) -> np.ndarray:
    """The :data:`FLAG_FIT_FAILED`, :data:`FLAG_EDGE`, :data:`FLAG_ELONGATED` and
    :data:`FLAG_SATURATED` bits of each measured detection."""
    flag = np.zeros(len(objs), dtype=np.int32)
    flag[~ok] |= FLAG_FIT_FAILED
    edge = (sx < half) | (sy < half) | (sx > shape[1] - 1 - half) | (sy > shape[0] - 1 - half)
    flag[edge] |= FLAG_EDGE
    flag[ellip > cfg.max_ellipticity] |= FLAG_ELONGATED
    if cfg.saturation is not None:
        sat_level = (float(cfg.saturation) - background) * 0.999
        flag[(objs["peak"] >= sat_level)] |= FLAG_SATURATED
    return flag


def _star_like_unmeasured(objs, idx: np.ndarray, done: int) -> int:
    """Detections not measured whose isophotal size is star-like (0.25x..16x the kept stars' median
    area): they count in ``n_total``; hot pixels and big blobs are left out."""
    if done >= len(objs) or not idx.size:
        return 0
    ab = objs["a"][done:].astype(np.float64) * objs["b"][done:]
    med = float(np.median(objs["a"][idx].astype(np.float64) * objs["b"][idx]))
    return int(np.count_nonzero((ab >= 0.25 * med) & (ab <= 16.0 * med)))


def _window_sigma(img, x, y, sigma0, sites, noise_pix, cfg) -> float:
    """Window size for :func:`window_measure`: the median star's Gaussian sigma.

    The windowed centroid is the maximum-likelihood one for a Gaussian star
    when the window matches the star, so the brightest detections are measured
    once with their isophotal size (moments above the threshold, on the binned image for a CFA
    mosaic: off by tens of per cent) and the median sigma of the star-like ones
    becomes the window.
    """
    sigma0 = float(np.clip(sigma0, 0.8, 8.0))
    _, _, cxx, cyy, cxy, _, ok = window_measure(img, x, y, sigma0, sites, noise_pix, n_iter=6)
    sig = np.maximum(cxx * cyy - cxy * cxy, 0.0) ** 0.25
    fw = GAUSS_FWHM * sig
    good = ok & (fw >= cfg.min_fwhm_px) & (fw <= cfg.max_fwhm_px)
    return float(np.clip(np.median(sig[good]), 0.8, 8.0)) if good.sum() >= 3 else sigma0


def _psf_sample(img, sx, sy, s2, x, y, pos_err, fwhm, clean, half, sites, cfg) -> float:
    """Fit the PSF model to a sample of clean stars; return the FWHM scale for all stars.

    The window-corrected second moments give the FWHM of a Gaussian star
    exactly; Moffat wings make them read wider than the core. The model
    (:func:`fit_psf`) is fitted to the :attr:`DetectConfig.psf_sample`
    brightest unflagged stars with no other detection within ``2 half`` px;
    the median ratio of fitted to moment FWHM is returned (1.0 when fewer
    than 3 fits succeed), to rescale every star's FWHM. These stars, the
    ones registration leans on most, take the fit's centroid and error
    (``x``, ``y``, ``pos_err`` are updated in place).
    """
    if cfg.psf_sample <= 0:
        return 1.0
    # isolated: no detection within 2 half but the star's own
    qi, _ = PointIndex(np.column_stack([sx, sy])).pairs_within(np.column_stack([x, y]),
                                                              np.nextafter(2.0 * half, np.inf))
    cand = np.flatnonzero(clean & (np.bincount(qi, minlength=len(x)) < 2))[: cfg.psf_sample]
    if cand.size < 3:
        return 1.0
    fx, fy, cxx, cyy, cxy, ferr, ok = fit_psf(img, x[cand], y[cand], s2[cand], half, sites,
                                               moffat=cfg.psf == "moffat")
    ok &= np.hypot(fx - x[cand], fy - y[cand]) < 0.5
    x[cand[ok]], y[cand[ok]], pos_err[cand[ok]] = fx[ok], fy[ok], ferr[ok]
    det = np.maximum(cxx * cyy - cxy * cxy, 1e-12)
    ratio = GAUSS_FWHM * det ** 0.25 / fwhm[cand]
    ratio = ratio[ok & np.isfinite(ratio)]
    return float(np.median(ratio)) if ratio.size >= 3 else 1.0


def _star_list(objs, ok, mx, my, cxx, cyy, cxy, perr, sx, sy, f, shape, cfg):
    """Turn fit results (with isophotal fallbacks) into FWHM, ellipticity and the keep mask."""
    cxx = np.where(ok, cxx, objs["x2"] * f * f)
    cyy = np.where(ok, cyy, objs["y2"] * f * f)
    cxy = np.where(ok, cxy, objs["xy"] * f * f)
    x_full = np.where(ok, mx, sx)
    y_full = np.where(ok, my, sy)
    perr = np.where(ok, perr, np.sqrt(np.maximum(objs["errx2"] + objs["erry2"], 0) / 2) * f)
    tr = cxx + cyy
    disc = np.sqrt(np.maximum((cxx - cyy) ** 2 / 4.0 + cxy ** 2, 0.0))
    lam1 = np.maximum(tr / 2.0 + disc, 1e-6)
    lam2 = np.maximum(tr / 2.0 - disc, 1e-6)
    fwhm = GAUSS_FWHM * np.sqrt(np.sqrt(lam1 * lam2))
    ellip = 1.0 - np.sqrt(lam2 / lam1)
    keep = (fwhm >= cfg.min_fwhm_px) & (fwhm <= cfg.max_fwhm_px) & np.isfinite(x_full) & np.isfinite(y_full)
    keep &= (x_full > -0.5) & (x_full < shape[1] - 0.5) & (y_full > -0.5) & (y_full < shape[0] - 0.5)
    return keep, fwhm, ellip, x_full, y_full, cxx, cyy, cxy, perr


# --------------------------------------------------------------------------- quality


def measure_quality(stars: StarList | np.ndarray, star_list: StarList | None = None, *,
                    pattern: str | None = None) -> FrameQuality:
    """Summarise a frame's :class:`StarList` (see the module docstring for the score).

    Parameters
    ----------
    stars : StarList
        Output of :func:`detect_stars` (it carries the background level and
        noise). For convenience the call ``measure_quality(image, stars,
        pattern=...)`` is accepted too; the image is not needed.
    star_list : StarList, optional
        The stars, when the first argument is the image.
    pattern : str or None
        Ignored (kept for the ``(image, stars, pattern=)`` form).

    Returns
    -------
    FrameQuality
    """
    if not isinstance(stars, StarList):
        if not isinstance(star_list, StarList):
            raise TypeError("measure_quality needs the StarList from detect_stars")
        stars = star_list
    n = int(stars.n_total)
    good = (stars.flag & (FLAG_SATURATED | FLAG_ELONGATED | FLAG_FIT_FAILED)) == 0
    if good.sum() < 3:  # too few clean stars: use what there is
        good = np.ones(len(stars), dtype=bool)
    if n == 0 or len(stars) == 0:
        return FrameQuality(n_stars=n, fwhm_px=float("nan"), roundness=float("nan"),
                            background=float(stars.background), noise=float(stars.noise), score=0.0)
    fwhm = float(np.median(stars.fwhm[good]))
    rnd = float(np.median(stars.roundness[good]))
    score = n * rnd / fwhm ** 2 if fwhm > 0 else 0.0
    return FrameQuality(n_stars=n, fwhm_px=fwhm, roundness=rnd, background=float(stars.background),
                        noise=float(stars.noise), score=float(score))


def select_frames(qualities: Sequence[FrameQuality | None], *, keep_best: float | None = None,
                  max_fwhm: float | None = None, min_stars: int = 15,
                  min_roundness: float | None = None) -> list[tuple[bool, str]]:
    """Decide which frames to stack, with a reason for every rejected one.

    The filters run in this order (a frame gets the first reason that hits it):

    1. no quality (unreadable frame) -> rejected;
    2. ``n_stars < min_stars`` (clouds, lens cap, dew) -> rejected;
    3. ``fwhm_px > max_fwhm`` (Siril's FWHM filter) -> rejected;
    4. ``roundness < min_roundness`` (trailing) -> rejected;
    5. ``keep_best`` percent (DeepSkyStacker's "keep the best X %"): of *all*
       frames, ``ceil(keep_best / 100 * n_frames)`` (at least one) are kept,
       chosen by score among those that passed 1-4.

    Parameters
    ----------
    qualities : sequence of FrameQuality or None
        One per frame, in frame order.
    keep_best : float or None
        Percentage (0 < p <= 100) of frames to keep.
    max_fwhm : float or None
        Largest accepted median FWHM, full-resolution px.
    min_stars : int
        Fewest stars a frame needs to be registered.
    min_roundness : float or None
        Smallest accepted median ``b/a``.

    Returns
    -------
    list of (bool, str)
        ``(used, reason)`` per frame; ``reason`` is ``""`` for used frames.
    """
    if keep_best is not None and not (0 < keep_best <= 100):
        raise ValueError(f"keep_best must be a percentage in (0, 100], got {keep_best}")
    out: list[tuple[bool, str]] = []
    for q in qualities:
        if q is None:
            out.append((False, "no quality measurement (frame could not be read)"))
        elif q.n_stars < min_stars:
            out.append((False, f"too few stars: {q.n_stars} < {min_stars} (clouds, lens cap or dew?)"))
        elif max_fwhm is not None and not (q.fwhm_px <= max_fwhm):
            out.append((False, f"FWHM {q.fwhm_px:.2f} px > max-fwhm {max_fwhm:g} px"))
        elif min_roundness is not None and not (q.roundness >= min_roundness):
            out.append((False, f"roundness {q.roundness:.2f} < {min_roundness:g} (trailed stars?)"))
        else:
            out.append((True, ""))
    if keep_best is not None and qualities:
        n_keep = max(1, math.ceil(keep_best / 100.0 * len(qualities) - 1e-9))
        cand = [i for i, (u, _) in enumerate(out) if u]
        cand.sort(key=lambda i: (-qualities[i].score, i))  # type: ignore[union-attr]
        for rank, i in enumerate(cand):
            if rank >= n_keep:
                out[i] = (False, f"not in the best {keep_best:g}% by score "
                                 f"(rank {rank + 1}, score {qualities[i].score:.3g}; "  # type: ignore[union-attr]
                                 f"keeping {n_keep} of {len(qualities)})")
    return out


def choose_reference(qualities: Sequence[FrameQuality | None],
                     used: Sequence[bool] | None = None) -> int:
    """Index of the best-scoring frame (among ``used`` ones when given).

    Ties go to the earliest frame. Raises :class:`~skystack.engine.errors.NotEnoughStars`
    when no candidate frame has any star.
    """
    from skystack.engine.errors import NotEnoughStars

    best, best_score = -1, 0.0
    for i, q in enumerate(qualities):
        if q is None or (used is not None and not used[i]):
            continue
        if q.score > best_score:
            best, best_score = i, q.score
    if best < 0:
        raise NotEnoughStars("no frame has stars to register against; check the lights "
                             "(lens cap, clouds) or pass --reference FILE")
    return best
