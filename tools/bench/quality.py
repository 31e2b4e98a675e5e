"""Image-quality measures of a stacked image against the simulator's truth (the Siril comparison's).

Background noise in star-free regions chosen from the truth (in light-frame
ADU, through a photometric scale measured on the same stars), median star
FWHM, faint-star completeness, and background residual against the
noise-free truth sky (:func:`truth_quality`, :class:`QualityMetrics`), and the
noise's power spectrum in frequency bands (:func:`noise_spectrum`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from skystack.engine.errors import SkystackError
from skystack.engine.robust import mad_sigma


@dataclass(frozen=True, kw_only=True)
class QualityMetrics:
    """Image-quality measures of one stacked image against the simulator's truth.

    Attributes
    ----------
    noise_adu : tuple of float
        Background noise per channel (R, G, B) in light-frame ADU: robust
        sigma after a plane fit, in star-free boxes, divided by ``scale``.
    noise_binned_adu : tuple of float
        The same for 4x4 block means, times 4: equal to ``noise_adu`` for
        white noise, lower when a pipeline's interpolation smooths pixel
        noise into correlated noise (which binning does not average away),
        so it compares pipelines at equal (coarse) resolution.
    scale : tuple of float
        Image units per ADU of the reference light per channel: median ratio
        of aperture fluxes of bright truth stars in the image and in the
        noise-free truth rendering of that light.
    fwhm_px : float
        Median FWHM of the stars :func:`~skystack.engine.detect.detect_stars` finds.
    n_stars : int
        Stars detected.
    bg_residual_adu : float
        RMS (over channels and star-free boxes) of ``image / scale`` minus the
        noise-free truth background (one offset per channel removed): noise
        plus calibration/gradient errors.
    bg_large_scale_adu : float
        RMS of the per-box median residuals: the large-scale (flat, gradient)
        error without the pixel noise.
    n_boxes : int
        Star-free boxes used.
    n_phot_stars : int
        Stars used for the photometric scale.
    colour_noise_adu : tuple of float
        Chroma noise: the same robust sigma of ``R/scale_R - G/scale_G`` and
        ``B/scale_B - G/scale_G`` (empty for mono images).
    completeness : float
        Fraction of the truth stars in a faint band (G flux between the 15th
        and 35th percentiles of the stars every light covers) that a
        PSF-matched filter finds at 5 sigma within 1.5 px
        (:func:`matched_filter_peaks`, :func:`_completeness`).
    limit_flux_adu : float
        G flux (ADU of one light) at which half the truth stars are found.
    """

    noise_adu: tuple[float, ...]
    noise_binned_adu: tuple[float, ...]
    scale: tuple[float, ...]
    fwhm_px: float
    n_stars: int
    bg_residual_adu: float
    bg_large_scale_adu: float
    n_boxes: int
    n_phot_stars: int
    colour_noise_adu: tuple[float, ...] = ()
    completeness: float = float("nan")
    limit_flux_adu: float = float("nan")

    @property
    def colour_noise_mean_adu(self) -> float:
        """Mean of the R-G and B-G chroma noise."""
        v = [x for x in self.colour_noise_adu if math.isfinite(x)]
        return float(np.mean(v)) if v else float("nan")

    @property
    def noise_mean_adu(self) -> float:
        """Mean of the per-channel noise."""
        v = [x for x in self.noise_adu if math.isfinite(x)]
        return float(np.mean(v)) if v else float("nan")

    @property
    def noise_binned_mean_adu(self) -> float:
        """Mean of the per-channel binned noise."""
        v = [x for x in self.noise_binned_adu if math.isfinite(x)]
        return float(np.mean(v)) if v else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["noise_mean_adu"] = self.noise_mean_adu
        d["noise_binned_mean_adu"] = self.noise_binned_mean_adu
        d["colour_noise_mean_adu"] = self.colour_noise_mean_adu
        return d


def _truth_star_xy(truth, ref_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Star positions in light ``ref_index``'s pixels and their per-channel flux (ADU per light)."""
    return truth.project_stars(ref_index), np.asarray(truth.stars.flux, dtype=np.float64)


def _star_radius(flux_g: np.ndarray, truth) -> np.ndarray:
    c = truth.config
    fmin = float(c.star_flux_min_adu_s) * float(c.exposure_s)
    f = np.maximum(np.asarray(flux_g, dtype=np.float64) / max(fmin, 1e-9), 1.0)
    return 3.0 * float(c.fwhm_range[1]) * (1.0 + 0.5 * np.log10(f))


def star_free_mask(truth, ref_index: int, shape: tuple[int, int] | None = None) -> np.ndarray:
    """``(H, W)`` bool: True where no truth star lies within its exclusion radius.

    The radius grows with the star's flux: ``3 FWHM_max (1 + log10(F / F_min) / 2)``.
    """
    h, w = truth.shape if shape is None else shape
    xy, flux = _truth_star_xy(truth, ref_index)
    rad = _star_radius(flux[:, 1], truth)
    mask = np.ones((h, w), dtype=bool)
    inside = (xy[:, 0] > -rad) & (xy[:, 0] < w - 1 + rad) & (xy[:, 1] > -rad) & (xy[:, 1] < h - 1 + rad)
    for (x, y), r in zip(xy[inside], rad[inside]):
        x0, x1 = max(0, int(math.floor(x - r))), min(w, int(math.ceil(x + r)) + 1)
        y0, y1 = max(0, int(math.floor(y - r))), min(h, int(math.ceil(y + r)) + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.ogrid[y0:y1, x0:x1]
        mask[y0:y1, x0:x1] &= (xx - x) ** 2 + (yy - y) ** 2 > r * r
    return mask


def _common_footprint(truth, ref_index: int, pts: np.ndarray, margin: float) -> np.ndarray:
    """True for points of the ``ref_index`` grid that every light covers (``margin`` px inside)."""
    h, w = truth.shape
    tr = truth.transforms()
    to_truth = tr[ref_index]
    ok = np.ones(len(pts), dtype=bool)
    hom = np.column_stack([pts, np.ones(len(pts))])
    for t in tr:
        m = np.linalg.inv(t) @ to_truth  # ref-grid pixel -> this light's pixel
        q = hom @ m.T
        q = q[:, :2] / q[:, 2:3]
        ok &= (q[:, 0] >= margin) & (q[:, 0] <= w - 1 - margin) & (q[:, 1] >= margin) & (q[:, 1] <= h - 1 - margin)
    return ok


def _photometric_scale(image: np.ndarray, truth, ref_index: int, star_image: np.ndarray | None = None, *,
                       max_stars: int = 300) -> tuple[np.ndarray, int]:
    """Image units per ADU of light ``ref_index``, per channel, by aperture photometry.

    The same apertures (radius ``4 FWHM_max``, background: a plane fitted to
    an annulus) are measured on ``image`` and on the noise-free truth stars of light
    ``ref_index`` (``star_image``, rendered when not given), so faint
    neighbours, PSF wings and the light's transparency cancel out; the scale
    is the median ratio over bright, unsaturated, fairly isolated stars
    that every light covers.
    """
    from scipy.spatial import cKDTree

    c = truth.config
    img = image if image.ndim == 3 else image[None]
    nch, h, w = img.shape
    if star_image is None:
        star_image = truth.sky(ref_index, background=False, gradient=False, trail=False)
    tru = star_image if nch == 3 else star_image[1][None]
    xy, flux = _truth_star_xy(truth, ref_index)
    fwhm_hi = float(c.fwhm_range[1])
    r_ap = 4.0 * fwhm_hi
    r_in, r_out = r_ap + 3.0, r_ap + 9.0
    # unsaturated: Moffat peak (of a narrow PSF) of the brightest channel well below the white level
    alpha = float(c.fwhm_range[0]) / (2.0 * math.sqrt(2.0 ** (1.0 / c.moffat_beta) - 1.0))
    peak_per_flux = (c.moffat_beta - 1.0) / (math.pi * alpha * alpha)
    headroom = float(c.white_level) - max(c.black_level) - 2.0 * max(c.sky_adu_s) * c.exposure_s
    fmax = flux.max(axis=1)
    if not len(flux):
        return np.full(nch, np.nan), 0
    cand = (fmax * peak_per_flux < 0.5 * headroom) & (flux[:, 1] >= np.quantile(flux[:, 1], 0.5))
    cand &= (xy[:, 0] > r_out + 2) & (xy[:, 0] < w - r_out - 3) & (xy[:, 1] > r_out + 2) & (xy[:, 1] < h - r_out - 3)
    if cand.any():
        cand[cand] &= _common_footprint(truth, ref_index, xy[cand], r_out + 2)
    # fairly isolated: no neighbour brighter than 20 % of the star inside its aperture + 2 FWHM
    tree = cKDTree(xy)
    keep = []
    for i in np.flatnonzero(cand):
        nb = tree.query_ball_point(xy[i], r_ap + 2.0 * fwhm_hi)
        if all(j == i or flux[j, 1] < 0.2 * flux[i, 1] for j in nb):
            keep.append(i)
    if len(keep) > max_stars:
        keep = list(np.sort(np.random.default_rng(0).choice(keep, max_stars, replace=False)))
    if len(keep) < 5:
        return np.full(nch, np.nan), len(keep)
    R = int(math.ceil(r_out)) + 1
    oy, ox = np.mgrid[-R:R + 1, -R:R + 1]
    ratios: list[list[float]] = [[] for _ in range(nch)]
    for i in keep:
        x, y = xy[i]
        ix, iy = int(round(x)), int(round(y))
        dx, dy = ox + ix - x, oy + iy - y
        d = np.hypot(dx, dy)
        ap, ann = d <= r_ap, (d >= r_in) & (d <= r_out)
        sl = (slice(None), slice(iy - R, iy + R + 1), slice(ix - R, ix + R + 1))
        stamp, tstamp = img[sl], tru[sl]
        # a plane fitted to the annulus (least squares: linear in the data, so the same
        # neighbours and wings in both images cancel exactly; a sky gradient is removed)
        plane_ap = np.array([ap.sum(), dx[ap].sum(), dy[ap].sum()])
        for ch in range(nch):
            s, t = stamp[ch], tstamp[ch]
            if not np.isfinite(s[ap]).all():
                continue
            use = ann & np.isfinite(s)
            if use.sum() < 20:
                continue
            design = np.column_stack([np.ones(use.sum()), dx[use], dy[use]])
            pinv = np.linalg.pinv(design)
            f_img = float(np.sum(s[ap], dtype=np.float64) - plane_ap @ (pinv @ s[use].astype(np.float64)))
            f_true = float(np.sum(t[ap]) - plane_ap @ (pinv @ t[use]))
            if f_true > 0:
                ratios[ch].append(f_img / f_true)
    scale = np.array([np.median(r) if len(r) >= 5 else np.nan for r in ratios])
    return scale, len(keep)


def box_stats(image: np.ndarray, mask: np.ndarray, boxes: np.ndarray, box: int, *, binning: int = 4
               ) -> tuple[np.ndarray, np.ndarray]:
    """Per box and channel: robust sigma of the pixels and of ``binning``-square block means.

    Both after a least-squares plane fit over the star-free pixels (blocks:
    the fully star-free ones). Block sigmas are multiplied by ``binning`` so
    that white noise reads the same at both scales.
    """
    img = image if image.ndim == 3 else image[None]
    nch = img.shape[0]
    b = int(binning)
    nb = box // b
    yy, xx = np.mgrid[0:box, 0:box]
    by, bx = np.mgrid[0:nb, 0:nb]
    sig = np.full((len(boxes), nch), np.nan)
    sigb = np.full((len(boxes), nch), np.nan)
    for k, (y0, x0) in enumerate(boxes):
        m = mask[y0:y0 + box, x0:x0 + box]
        a = np.column_stack([np.ones(m.sum()), xx[m] - box / 2, yy[m] - box / 2])
        mb = m[:nb * b, :nb * b].reshape(nb, b, nb, b).all(axis=(1, 3))
        ab = np.column_stack([np.ones(mb.sum()), bx[mb] - nb / 2, by[mb] - nb / 2])
        for ch in range(nch):
            tile = img[ch, y0:y0 + box, x0:x0 + box].astype(np.float64)
            v = tile[m]
            if not np.isfinite(v).all():
                continue
            coef, *_ = np.linalg.lstsq(a, v, rcond=None)
            sig[k, ch] = mad_sigma(v - a @ coef)
            if mb.sum() >= 6:
                vb = tile[:nb * b, :nb * b].reshape(nb, b, nb, b).mean(axis=(1, 3))[mb]
                cb, *_ = np.linalg.lstsq(ab, vb, rcond=None)
                sigb[k, ch] = b * mad_sigma(vb - ab @ cb)
    return sig, sigb


def colour_noise(img: np.ndarray, scale: np.ndarray, mask: np.ndarray, boxes: np.ndarray, box: int
                  ) -> tuple[float, ...]:
    """Robust sigma (median over star-free boxes, plane removed) of R - G and B - G in ADU."""
    if img.ndim != 3 or img.shape[0] != 3 or not len(boxes) or not np.isfinite(scale).all():
        return ()
    g = img[1] / scale[1]
    diffs = (img[0] / scale[0] - g, img[2] / scale[2] - g)
    sig, _ = box_stats(np.stack(diffs), mask, boxes, box)
    return tuple(float(np.nanmedian(sig[:, k])) for k in range(2))


def matched_filter_peaks(image: np.ndarray, scale: np.ndarray, mask: np.ndarray, fwhm_px: float, *,
                         nsigma: float = 5.0) -> np.ndarray:
    """``(N, 2)`` x, y of the peaks of a PSF-matched filter above ``nsigma`` of its own noise.

    The photometrically scaled luminance, less a coarse median background, is
    convolved with a Gaussian of the image's own FWHM (the optimal detector of
    point sources in white noise); peaks (5x5 maxima) count above ``nsigma``
    robust sigmas of the filtered star-free pixels. Because the threshold is
    the *filtered* noise, smoothing an image beforehand neither helps nor
    hurts: this compares depth at the source scale, whatever the resampling.
    """
    from scipy import ndimage

    img = image if image.ndim == 3 else image[None]
    lum = np.nan_to_num(np.mean([img[c] / scale[c] for c in range(img.shape[0])], axis=0))
    h, w = lum.shape
    bg = ndimage.median_filter(lum[::4, ::4], size=16, mode="nearest")
    lum = lum - np.kron(bg, np.ones((4, 4), dtype=lum.dtype))[:h, :w]
    f = ndimage.gaussian_filter(lum, max(float(fwhm_px), 1.0) / 2.3548)
    r = f[mask]
    sig = mad_sigma(r)
    peak = (f == ndimage.maximum_filter(f, 5)) & (f > nsigma * sig)
    yy, xx = np.nonzero(peak)
    return np.column_stack([xx, yy]).astype(np.float64)


def _completeness(detected_xy: np.ndarray, truth, ref_index: int, shape: tuple[int, int], *,
                  margin: float = 12.0, radius: float = 1.5) -> tuple[float, float]:
    """Faint-star completeness and the 50 % limiting flux of a detection list.

    Truth stars every light covers (``margin`` px inside, off the landscape)
    count as found with a detection within ``radius`` px. Completeness is the
    fraction found among those whose G flux lies between the 15th and 35th
    percentiles of them (a band fixed by the truth alone, where detection
    fades on the simulator's sessions); the limiting flux is the G flux (ADU
    of one light) where the fraction found, in bins of 5 % of the stars,
    first reaches one half (interpolated in log flux).
    """
    from scipy.spatial import cKDTree

    h, w = shape
    xy, flux = _truth_star_xy(truth, ref_index)
    ok = np.isfinite(xy).all(axis=1)
    ok &= (xy[:, 0] >= margin) & (xy[:, 0] < w - margin) & (xy[:, 1] >= margin) & (xy[:, 1] < h - margin)
    if ok.any():
        ok[ok] &= _common_footprint(truth, ref_index, xy[ok], margin)
    land = truth.horizon_mask()
    if land.any() and ok.any():
        ii = np.rint(xy[ok]).astype(int)
        ok[np.flatnonzero(ok)[land[ii[:, 1], ii[:, 0]]]] = False
    if ok.sum() < 100:
        return float("nan"), float("nan")
    f = flux[ok, 1]
    found = np.zeros(len(f), dtype=bool)
    if len(detected_xy):
        d, _ = cKDTree(detected_xy).query(xy[ok], k=1)
        found = d <= radius
    lo, hi = np.quantile(f, [0.15, 0.35])
    band = (f >= lo) & (f <= hi)
    edges = np.quantile(f, np.linspace(0.0, 1.0, 21))
    centre = np.sqrt(edges[:-1] * edges[1:])
    frac = np.array([found[(f >= a) & (f <= b)].mean() for a, b in zip(edges[:-1], edges[1:])])
    limit = float("nan")
    k = np.flatnonzero(frac >= 0.5)
    if len(k) and k[0] > 0:
        j = k[0]
        t = (0.5 - frac[j - 1]) / max(frac[j] - frac[j - 1], 1e-9)
        limit = float(np.exp(np.log(centre[j - 1]) + t * (np.log(centre[j]) - np.log(centre[j - 1]))))
    return float(found[band].mean()), limit


def _boxes(truth, ref_index: int, mask: np.ndarray, box: int, *, min_free: float = 0.6,
           max_boxes: int = 1500, seed: int = 0) -> np.ndarray:
    h, w = mask.shape
    ys = np.arange(0, h - box + 1, box)
    xs = np.arange(0, w - box + 1, box)
    cand = np.array([(y, x) for y in ys for x in xs], dtype=np.intp).reshape(-1, 2)
    if not len(cand):
        return cand
    free = np.array([mask[y:y + box, x:x + box].mean() for y, x in cand])
    cand = cand[free >= min_free]
    corners = []
    for dy, dx in ((0, 0), (0, box - 1), (box - 1, 0), (box - 1, box - 1)):
        corners.append(_common_footprint(truth, ref_index,
                                         np.column_stack([cand[:, 1] + dx, cand[:, 0] + dy]).astype(float), 6.0))
    cand = cand[np.logical_and.reduce(corners)] if len(cand) else cand
    if len(cand) > max_boxes:
        cand = cand[np.sort(np.random.default_rng(seed).choice(len(cand), max_boxes, replace=False))]
    return cand


def truth_quality(image: np.ndarray, truth, ref_index: int, *, box: int = 24,
                    mask: np.ndarray | None = None, star_image: np.ndarray | None = None,
                    background: np.ndarray | None = None, detect: bool = True) -> QualityMetrics:
    """Quality of a stacked image in the grid of light ``ref_index`` (see :class:`QualityMetrics`).

    Parameters
    ----------
    image : ndarray (3, H, W) or (H, W)
        Stacked image (any linear units; NaN = no data).
    truth : SynthTruth
        The session's truth (:func:`skystack.tools.synth.load_truth`).
    ref_index : int
        Light whose pixel grid ``image`` is in.
    box : int
        Side of the star-free boxes (px).
    mask : ndarray, optional
        Precomputed :func:`star_free_mask` (it is the same for every image
        of a comparison).
    star_image, background : ndarray (3, H, W), optional
        Precomputed ``truth.sky(ref_index, background=False, gradient=False, trail=False)``
        and ``truth.sky(ref_index, stars=False, trail=False)`` (noise-free
        stars and background of light ``ref_index``, ADU).
    detect : bool
        Also detect stars for the median FWHM.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.shape[-2:] != tuple(truth.shape):
        raise SkystackError(f"image shape {img.shape} does not match the session's {truth.shape}")
    mask = star_free_mask(truth, ref_index) if mask is None else mask
    boxes = _boxes(truth, ref_index, mask, box)
    scale, n_phot = _photometric_scale(img, truth, ref_index, star_image)
    sig, sigb = box_stats(img, mask, boxes, box)
    noise = tuple(float(np.nanmedian(sig[:, ch]) / scale[ch]) if len(boxes) else float("nan")
                  for ch in range(sig.shape[1]))
    noise_b = tuple(float(np.nanmedian(sigb[:, ch]) / scale[ch]) if np.isfinite(sigb[:, ch]).any()
                    else float("nan") for ch in range(sigb.shape[1]))
    # residual against the noise-free truth background (reference light's sky, no stars or trails)
    bg_res = bg_ls = float("nan")
    if len(boxes) and np.isfinite(scale).all():
        sky = truth.sky(ref_index, stars=False, trail=False) if background is None else background
        sky = sky if img.ndim == 3 else sky[1][None]
        resid_all, box_meds = [], []
        for ch in range(sky.shape[0]):
            vals, meds = [], []
            for (y0, x0) in boxes:
                m = mask[y0:y0 + box, x0:x0 + box]
                r = img[ch if img.ndim == 3 else 0, y0:y0 + box, x0:x0 + box][m] / scale[ch] - \
                    sky[ch, y0:y0 + box, x0:x0 + box][m]
                vals.append(r)
                meds.append(np.median(r))
            v = np.concatenate(vals)
            off = np.median(v)
            resid_all.append(v - off)
            box_meds.append(np.asarray(meds) - off)
        bg_res = float(np.sqrt(np.mean(np.concatenate(resid_all) ** 2)))
        bg_ls = float(np.sqrt(np.mean(np.concatenate(box_meds) ** 2)))
    fwhm, n_stars, complete, limit = float("nan"), 0, float("nan"), float("nan")
    if detect:
        from skystack.engine.detect import detect_stars, measure_quality as _mq

        st = detect_stars(np.nan_to_num(img, nan=0.0))
        q = _mq(st)
        fwhm, n_stars = float(q.fwhm_px), int(q.n_stars)
        if np.isfinite(scale).all() and math.isfinite(fwhm):
            peaks = matched_filter_peaks(img, np.asarray(scale), mask, fwhm)
            complete, limit = _completeness(peaks, truth, ref_index, img.shape[-2:])
    return QualityMetrics(noise_adu=noise, noise_binned_adu=noise_b, scale=tuple(float(s) for s in scale),
                          fwhm_px=fwhm,
                          n_stars=n_stars, bg_residual_adu=bg_res, bg_large_scale_adu=bg_ls,
                          n_boxes=int(len(boxes)), n_phot_stars=n_phot,
                          colour_noise_adu=colour_noise(img, np.asarray(scale), mask, boxes, box),
                          completeness=complete, limit_flux_adu=limit)


#: Radial frequency bands (cycles per pixel) of :func:`noise_spectrum`.
SPECTRUM_BANDS: tuple[tuple[float, float], ...] = (
    (0.03, 0.06), (0.06, 0.1), (0.1, 0.15), (0.15, 0.2), (0.2, 0.25), (0.25, 0.3),
    (0.3, 0.35), (0.35, 0.4), (0.4, 0.5), (0.5, 0.75))


@dataclass(frozen=True, kw_only=True)
class NoiseSpectrum:
    """Mean noise power per radial frequency band, in ADU^2 of one light (white noise: its variance).

    Attributes
    ----------
    bands : tuple of (float, float)
        Band edges in cycles per pixel.
    power : tuple of float
        Mean over R, G and B of the power in each band.
    chroma : tuple of float
        Mean over R - G and B - G (empty for mono images).
    n_boxes : int
        Boxes averaged.
    """

    bands: tuple[tuple[float, float], ...]
    power: tuple[float, ...]
    chroma: tuple[float, ...]
    n_boxes: int


def noise_spectrum(image: np.ndarray, truth, ref_index: int, *, box: int = 48, min_free: float = 0.5,
                   scale: np.ndarray | None = None, background: np.ndarray | None = None,
                   mask: np.ndarray | None = None) -> NoiseSpectrum:
    """Power spectrum of ``image / scale`` minus the noise-free truth background, by frequency band.

    The residual is measured in ``box``-square tiles that are at least
    ``min_free`` star-free and covered by every light; star pixels are set to
    zero (the same mask for every image compared), each tile is Hann-windowed,
    and the periodograms are normalised by the window's power, so white noise
    of variance ``s^2`` reads ``s^2`` in every band (frequencies under 0.03
    cycles per pixel, which the tile's mean and its window blur, are left out).
    Comparing two pipelines
    band by band separates resolution (high frequencies) from noise that no
    resampling kernel trades away (low frequencies).
    """
    img = np.asarray(image, dtype=np.float32)
    img = img if img.ndim == 3 else img[None]
    mask = star_free_mask(truth, ref_index) if mask is None else mask
    if scale is None:
        scale, _ = _photometric_scale(img, truth, ref_index)
    sky = truth.sky(ref_index, stars=False, trail=False) if background is None else background
    sky = sky if img.shape[0] == 3 else sky[1][None]
    h, w = mask.shape
    tiles = [(y, x) for y in range(0, h - box + 1, box) for x in range(0, w - box + 1, box)
             if mask[y:y + box, x:x + box].mean() >= min_free]
    if tiles:
        yx = np.array(tiles, dtype=float)
        covered = np.logical_and.reduce([_common_footprint(truth, ref_index, yx[:, ::-1] + d, 6.0)
                                         for d in (0.0, box - 1.0)])
        tiles = [t for t, ok in zip(tiles, covered) if ok]
    hann = np.outer(np.hanning(box), np.hanning(box))
    nch = img.shape[0]
    power = np.zeros((nch, box, box))
    chroma = np.zeros((2, box, box))
    norm = 0.0
    for y, x in tiles:
        m = mask[y:y + box, x:x + box]
        r = img[:, y:y + box, x:x + box].astype(np.float64) / np.asarray(scale)[:, None, None] - \
            sky[:, y:y + box, x:x + box]
        r = (r - np.array([np.median(c[m]) for c in r])[:, None, None]) * (hann * m)
        power += np.abs(np.fft.fft2(r)) ** 2
        if nch == 3:
            chroma += np.abs(np.fft.fft2(r[[0, 2]] - r[1])) ** 2
        norm += float(((hann * m) ** 2).sum())
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(box), np.fft.fftfreq(box)))
    sel = [(f >= lo) & (f < hi) for lo, hi in SPECTRUM_BANDS]
    norm = max(norm, 1e-300)
    return NoiseSpectrum(bands=SPECTRUM_BANDS, n_boxes=len(tiles),
                         power=tuple(float(power[:, s].mean() / norm) for s in sel),
                         chroma=tuple(float(chroma[:, s].mean() / norm) for s in sel) if nch == 3 else ())
