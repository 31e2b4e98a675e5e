"""From stack to picture: crop, background, colour, stretch, contrast, saturation.

:func:`finish_image` runs, on a linear ``(3, H, W)`` stack (NaN = no data):

1. **Autocrop** (:mod:`skystack.engine.crop`): the largest rectangle that at
   least ``crop_fraction`` of the frames covered (from the stack's coverage
   map), or, without a map, the largest rectangle with data in every channel.
2. **Background and gradient extraction** (:mod:`skystack.engine.background`):
   a polynomial or RBF model through sigma-clipped box medians of the sky,
   subtracted (light pollution) or divided out (vignetting residue).
3. **Colour** (:mod:`skystack.engine.colour`): background neutralisation and
   white balance with the stars as the white reference.
4. **Stretch**: the MTF autostretch of :mod:`skystack.engine.stretch` with one
   curve for all channels (shadows clipped where the noisiest channel's
   background is ``shadows_sigma`` below the median; the midtones balance
   puts the sky on ``target_background``), so a neutral sky stays neutral
   and star colours keep their order.
5. **Black point**: ``(x - b) / (1 - b)``, clipped.
6. **S-curve** (``contrast`` c in [0, 1]): ``x - c / (2 pi) sin(2 pi x)`` --
   monotonic, symmetric about 0.5, fixed points 0, 0.5 and 1, slope ``1 + c``
   in the midtones and ``1 - c`` at the ends.
7. **Saturation** without colour noise: the image is split into luminance
   ``L`` (channel mean) and chroma ``x - L``; only a low-pass chroma (Gaussian,
   ``chroma_blur`` px) is amplified, by ``(saturation - 1) * w`` where the
   weight ``w`` rises from 0 on the sky to 1 where a lightly smoothed
   luminance is ``snr_full`` background sigmas above the sky. The noise of
   the sky is thus left exactly as it was, and signal gets its colour
   boosted.

:func:`finish_command` is ``skystack finish STACK -o picture.jpg``: it reads a
stack (TIFF or FITS; the coverage map from the FITS's ``COVERAGE`` extension
when there is one), finishes it and writes the picture (8-bit JPEG/PNG,
optionally a 16-bit TIFF, the linear result and a JSON summary).
"""

from __future__ import annotations

import dataclasses

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from skystack.engine.background import BackgroundConfig
from skystack.engine.colour import ColourConfig
from skystack.engine.errors import FrameReadError, InputNotFound, SkystackError

BACKGROUND_MODES = ("none", "subtract", "divide")


@dataclass(frozen=True, kw_only=True)
class FinishConfig:
    """Settings of :func:`finish_image` (``skystack finish`` options).

    Attributes
    ----------
    crop : bool
        Autocrop the edges that fewer than ``crop_fraction`` of the frames covered.
    crop_fraction : float
        Fraction of the frames a kept pixel needs (0 < f <= 1).
    background : str
        ``"subtract"``, ``"divide"`` or ``"none"``.
    bg_model : str
        ``"poly"`` or ``"rbf"``.
    bg_degree : int
        Polynomial degree 1..4.
    bg_grid : int
        Sample boxes along the longer side.
    bg_reject : float
        Box rejection threshold (robust sigmas).
    bg_smoothing : float
        RBF smoothing.
    neutralize : bool
        Make the sky background neutral grey.
    white_balance : bool
        Make the median star white.
    target_background : float
        Sky level after the stretch (0..1).
    shadows_sigma : float
        Shadows clip, background sigmas below the sky.
    black_point : float
        Black point on the stretched image (0 <= b < 1).
    contrast : float
        S-curve strength (0 = none, 1 = strongest monotonic curve).
    saturation : float
        Chroma gain (1 = unchanged, 0 = grey).
    chroma_blur : float
        Gaussian sigma (px) of the chroma that the saturation boost amplifies.
    snr_full : float
        Luminance SNR (background sigmas) at which the boost is complete.
    """

    crop: bool = True
    crop_fraction: float = 0.9
    background: str = "subtract"
    bg_model: str = BackgroundConfig.model
    bg_degree: int = BackgroundConfig.degree
    bg_grid: int = BackgroundConfig.grid
    bg_reject: float = BackgroundConfig.reject
    bg_smoothing: float = BackgroundConfig.rbf_smoothing
    neutralize: bool = ColourConfig.neutralize
    white_balance: bool = ColourConfig.white_balance
    target_background: float = 0.2
    shadows_sigma: float = 2.8
    black_point: float = 0.0
    contrast: float = 0.2
    saturation: float = 1.4
    chroma_blur: float = 1.0
    snr_full: float = 5.0

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise SkystackError(f"finish: {msg}")

        if self.background not in BACKGROUND_MODES:
            bad(f"--background {self.background!r}: use none, subtract or divide")
        if not 0.0 < self.crop_fraction <= 1.0:
            bad(f"--crop-fraction {self.crop_fraction}: use a value in (0, 1], e.g. 0.9")
        if not 0.0 < self.target_background < 1.0:
            bad(f"--target-background {self.target_background}: use a value in (0, 1), e.g. 0.2")
        if not 0.0 <= self.black_point < 1.0:
            bad(f"--black-point {self.black_point}: use a value in [0, 1)")
        if not 0.0 <= self.contrast <= 1.0:
            bad(f"--contrast {self.contrast}: use a value in [0, 1]")
        if not 0.0 <= self.saturation <= 4.0:
            bad(f"--saturation {self.saturation}: use a value in [0, 4] (1 = unchanged)")
        if self.background != "none":
            self.background_config()  # validates model, degree, grid

    def background_config(self):
        """The :class:`~skystack.engine.background.BackgroundConfig` these settings describe."""
        mode = "divide" if self.background == "divide" else "subtract"
        return BackgroundConfig(model=self.bg_model, degree=self.bg_degree, mode=mode, grid=self.bg_grid,
                                reject=self.bg_reject, rbf_smoothing=self.bg_smoothing)

    def colour_config(self):
        """The :class:`~skystack.engine.colour.ColourConfig` these settings describe."""
        return ColourConfig(neutralize=self.neutralize, white_balance=self.white_balance)


@dataclass(kw_only=True)
class FinishResult:
    """The finished picture and every intermediate number.

    Attributes
    ----------
    image : ndarray
        ``(C, h, w)`` float32 display image in [0, 1] (no NaN).
    linear : ndarray
        ``(C, h, w)`` float32 linear image after crop, background and colour
        (NaN where the stack had no data).
    crop : tuple or None
        ``(y0, y1, x0, x1)`` of the crop in the stack's pixels (half-open).
    crop_source : str
        ``"coverage"`` (count map), ``"data"`` (NaN pattern) or ``""`` (no crop).
    background : BackgroundModel or None
    colour : ColourCalibration or None
    stretch : dict
        ``c0`` (shadows clip) and ``m`` (midtones balance) of the shared curve.
    warnings : list of str
    timings : dict
    """

    image: np.ndarray
    linear: np.ndarray
    crop: tuple[int, int, int, int] | None
    crop_source: str
    background: Any
    colour: Any
    stretch: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "shape": list(self.image.shape),
            "crop": None if self.crop is None else {"y0": self.crop[0], "y1": self.crop[1],
                                                    "x0": self.crop[2], "x1": self.crop[3],
                                                    "source": self.crop_source},
            "background": None if self.background is None else self.background.summary(),
            "colour": None if self.colour is None else self.colour.summary(),
            "stretch": dict(self.stretch),
            "warnings": list(self.warnings),
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
        }


# ----------------------------------------------------------------------------- curves


def s_curve(x: np.ndarray, contrast: float) -> np.ndarray:
    """Symmetric contrast curve ``x - c/(2 pi) sin(2 pi x)`` on [0, 1].

    Monotonic for ``0 <= c <= 1`` (slope ``1 - c cos(2 pi x) >= 0``), with
    fixed points 0, 0.5 and 1; ``c = 0`` is the identity.
    """
    x = np.asarray(x, dtype=np.float32)
    if contrast == 0:
        return x.copy()
    out = x - np.float32(contrast / (2.0 * math.pi)) * np.sin(np.float32(2.0 * math.pi) * x)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def black_point(x: np.ndarray, level: float) -> np.ndarray:
    """``(x - level) / (1 - level)`` clipped to [0, 1]."""
    x = np.asarray(x, dtype=np.float32)
    if level == 0:
        return np.clip(x, 0.0, 1.0)
    return np.clip((x - np.float32(level)) / np.float32(1.0 - level), 0.0, 1.0)


def boost_saturation(image: np.ndarray, factor: float, *, chroma_blur: float = 1.0,
                     snr_full: float = 5.0) -> np.ndarray:
    """Scale the chroma of a stretched ``(3, H, W)`` image without amplifying colour noise.

    ``out = L + C + (factor - 1) * w * G(C)``, with ``L`` the channel mean,
    ``C = x - L`` the chroma, ``G`` a Gaussian of ``chroma_blur`` px and ``w``
    a weight that is 0 on the sky and 1 where the luminance (smoothed by a
    1.5-px Gaussian) is ``snr_full`` background sigmas above the sky median
    (smooth ramp in between). Neutral pixels (R = G = B) are unchanged.
    Values are clipped to [0, 1].
    """
    from scipy import ndimage

    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3 or img.shape[0] != 3 or factor == 1.0:
        return img.copy()
    lum = img.mean(axis=0, dtype=np.float32)
    chroma = img - lum[None]
    if factor < 1.0:  # desaturating adds no noise: apply everywhere
        return np.clip(lum[None] + np.float32(factor) * chroma, 0.0, 1.0)
    sm = ndimage.gaussian_filter(lum, 1.5)
    from skystack.engine.robust import sigma_clipped_stats

    step = max(1, sm.size // 500_000)
    med, sig, _ = sigma_clipped_stats(sm.ravel()[::step])
    if not sig > 0:
        sig = 1e-6
    t = np.clip((sm - med) / (snr_full * sig), 0.0, 1.0)
    wgt = (t * t * (3.0 - 2.0 * t)).astype(np.float32)  # smoothstep
    cs = np.stack([ndimage.gaussian_filter(c, chroma_blur) for c in chroma]) if chroma_blur > 0 else chroma
    out = img + np.float32(factor - 1.0) * wgt[None] * cs
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def _shared_stretch(img: np.ndarray, config: FinishConfig) -> tuple[float, float]:
    """One MTF curve for all channels: ``(c0, m)``."""
    from skystack.engine.stretch import StretchConfig, mtf, stretch_params

    scfg = StretchConfig(shadows_sigma=config.shadows_sigma, target_background=config.target_background)
    params = [stretch_params(c, scfg) for c in img]
    lum = img.mean(axis=0, dtype=np.float32).ravel()
    v = lum[:: max(1, lum.size // scfg.sample)]
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 0.5
    med = float(np.median(v))
    c0 = min(min(p[0] for p in params), med)
    x = (med - c0) / (1.0 - c0) if c0 < 1.0 else 0.0
    if x <= 0.0:
        return c0, 0.5
    m = float(mtf(min(x, 1.0), config.target_background))
    return c0, min(max(m, 1e-6), 1.0 - 1e-6)


def stretch_shared(img: np.ndarray, c0: float, m: float) -> np.ndarray:
    """Apply ``MTF_m((x - c0) / (1 - c0))`` to every channel, NaN -> 0.

    Runs over bands of rows, so its float64 temporaries take a few MB, not
    several copies of the image (the same values: the operation is per pixel).
    """
    from skystack.engine.stretch import mtf

    out = np.empty(img.shape, dtype=np.float32)
    rows = max(1, _STRETCH_BAND_PX // max(1, int(np.prod(img.shape)) // max(1, img.shape[-2])))
    for r0 in range(0, img.shape[-2], rows):
        band = img[..., r0:r0 + rows, :]
        x = np.clip((band - np.float32(c0)) / np.float32(max(1.0 - c0, 1e-12)), 0.0, 1.0)
        x = np.nan_to_num(x, nan=0.0)
        out[..., r0:r0 + rows, :] = np.clip(mtf(x, m), 0.0, 1.0)
    return out


#: Pixels (all channels) per band of :func:`stretch_shared`.
_STRETCH_BAND_PX = 1 << 18


# ----------------------------------------------------------------------------- pipeline


def _grow(mask: np.ndarray, px: float) -> np.ndarray:
    """``mask`` grown by ``px`` pixels."""
    from scipy.ndimage import distance_transform_edt

    return distance_transform_edt(~mask) <= px


def _hold_below(model: np.ndarray, land: np.ndarray) -> np.ndarray:
    """A ``(C, H, W)`` sky model continued below each column's horizon (first landscape row) at its
    value just above it: the ground is not lit by the light dome the sky fit extrapolates."""
    h, w = land.shape
    top = np.where(land.any(axis=0), land.argmax(axis=0), h)  # first landscape row per column
    rows = np.arange(h)[:, None]
    src = np.minimum(rows, np.maximum(top - 1, 0)[None, :])  # (H, W) row to read the model from
    return np.take_along_axis(model, np.broadcast_to(src, model.shape), axis=1).astype(np.float32)


def finish_image(image: np.ndarray, *, count: np.ndarray | None = None, n_frames: int | None = None,
                 config: FinishConfig = FinishConfig(), landscape: np.ndarray | None = None) -> FinishResult:
    """Turn a linear stack into a finished picture.

    Parameters
    ----------
    image : ndarray
        ``(3, H, W)`` (or ``(H, W)`` mono) linear float stack, NaN = no data.
    count : ndarray, optional
        ``(H, W)`` frames contributing to each pixel (StackResult.count).
    n_frames : int, optional
        Frames in the stack (default: ``count.max()``).
    config : FinishConfig
        Settings.
    landscape : ndarray, optional
        ``(H, W)`` bool: the still landscape of a fixed-tripod stack. The
        sky's background and colour are then measured on the sky alone, the
        background model is taken off the sky only (the landscape keeps its
        own brightness, less the sky's mean background level, blended over a
        feathered seam), and the crop keeps everything with data: a tripod
        night's edges are the sky seen by fewer frames, not stacking borders.

    Returns
    -------
    FinishResult
    """
    from skystack.engine import crop as _crop

    t: dict[str, float] = {}
    t0 = time.perf_counter()
    img = np.asarray(image, dtype=np.float32)
    mono = img.ndim == 2
    if mono:
        img = img[None]
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise SkystackError(f"finish: expected a (3, H, W) or (H, W) image, got shape {np.shape(image)}")
    h, w = img.shape[1:]
    warns: list[str] = []

    # 1. crop
    box, source = None, ""
    land = None if landscape is None or not np.any(landscape) else np.asarray(landscape, dtype=bool)
    if land is not None and land.shape != (h, w):
        raise SkystackError(f"finish: landscape mask {land.shape} does not match the image {(h, w)}")
    if config.crop:
        box, source = _crop_box(img, land, count, n_frames, config, warns)
        if box is not None:
            img = np.ascontiguousarray(_crop.apply_box(img, box))
            land = None if land is None else _crop.apply_box(land, box)
    t["crop"] = time.perf_counter() - t0

    # 2. background
    t1 = time.perf_counter()
    bg = mask = None
    if config.background != "none":
        img, bg, mask = _remove_background(img, land, config)
    t["background"] = time.perf_counter() - t1

    # 3. colour
    t1 = time.perf_counter()
    col = None
    if img.shape[0] == 3 and (config.neutralize or config.white_balance):
        from skystack.engine.colour import calibrate_colour

        img, col = calibrate_colour(img, config.colour_config(), mask=mask)
        if col.warning:
            warns.append(col.warning)
    t["colour"] = time.perf_counter() - t1

    # 4-7. stretch, black point, S-curve, saturation
    t1 = time.perf_counter()
    out, c0, m = _tone(img, config)
    t["stretch"] = time.perf_counter() - t1
    t["total"] = time.perf_counter() - t0
    if mono:
        out, img = out[0], img[0]
    return FinishResult(image=out, linear=img, crop=box, crop_source=source, background=bg, colour=col,
                        stretch={"c0": float(c0), "m": float(m)}, warnings=warns, timings=t)


def _crop_box(img: np.ndarray, land: np.ndarray | None, count: np.ndarray | None, n_frames: int | None,
              config: FinishConfig, warns: list[str]) -> tuple[tuple[int, int, int, int] | None, str]:
    """The autocrop's box of ``img`` and what it came from (``"coverage"``, ``"data"`` or ``""``).

    A tripod stack (``land``) is cut to its data only; else the coverage map
    decides, else the area with data. Why no coverage crop was made is
    appended to ``warns``.
    """
    from skystack.engine import crop as _crop

    h, w = img.shape[1:]
    box, source = None, ""
    if land is not None:
        box, source = (_crop.finite_box(img), "data") if not np.isfinite(img).all() else (None, "")
    elif count is not None:
        cnt = np.asarray(count)
        if cnt.shape != (h, w):
            raise SkystackError(f"finish: coverage map {cnt.shape} does not match the image {(h, w)}")
        box, source = _crop.coverage_box(cnt, n_frames=n_frames, fraction=config.crop_fraction), "coverage"
    elif not np.isfinite(img).all():
        box, source = _crop.finite_box(img), "data"
        warns.append("no coverage map: cropped to the area with data only (pass the stack's FITS "
                     "with its COVERAGE extension for a coverage crop)")
    else:
        warns.append("no coverage map: edges not cropped (pass the stack's FITS with its COVERAGE "
                     "extension, or --no-crop to silence this)")
    if box is not None and (box[1] - box[0] < 16 or box[3] - box[2] < 16):
        raise SkystackError(f"finish: the autocrop leaves only {box[1] - box[0]}x{box[3] - box[2]} px; "
                            "lower --crop-fraction or pass --no-crop")
    return box, source


def _remove_background(img: np.ndarray, land: np.ndarray | None, config: FinishConfig):
    """Fit the sky background of ``img`` and take it off: ``(image, BackgroundModel, object mask)``.

    Stars and objects (and a tripod stack's landscape, grown by 12 px) are
    masked from the fit; below the horizon the model keeps its value on it.
    """
    from skystack.engine.background import apply_background, fit_background, object_mask

    bcfg = config.background_config()
    mask, _ = object_mask(img, sigma=bcfg.star_sigma, grow=bcfg.mask_grow, grid=bcfg.grid, kappa=bcfg.kappa)
    if land is not None:
        mask = mask | _grow(land, 12)
    bg = fit_background(img, bcfg, mask=mask)
    if land is not None:  # below the horizon the model stays at its value on the horizon
        bg = dataclasses.replace(bg, model=_hold_below(bg.model, land))
    return apply_background(img, bg, bcfg.mode), bg, mask


def _tone(img: np.ndarray, config: FinishConfig) -> tuple[np.ndarray, float, float]:
    """Steps 4-7 on the linear ``(C, H, W)`` image: the shared stretch, black point, S-curve and
    (colour) saturation; returns the picture in [0, 1] and the stretch's ``c0`` and ``m``."""
    c0, m = _shared_stretch(img, config)
    out = stretch_shared(img, c0, m)
    out = black_point(out, config.black_point)
    out = s_curve(out, config.contrast)
    if out.shape[0] == 3:
        out = boost_saturation(out, config.saturation, chroma_blur=config.chroma_blur, snr_full=config.snr_full)
    return out, c0, m


def preview_image(image: np.ndarray, *, linked: bool = True) -> np.ndarray:
    """The stack's default preview, in [0, 1]: a neutral, gradient-free sky under one linked stretch.

    Linked, it is :func:`finish_image` without the crop, the S-curve and the
    saturation boost: the background model is subtracted and the sky
    neutralised (the same steps as ``skystack finish``), then one MTF curve
    stretches every channel, so a light-pollution cast and its gradient do not
    tint the preview. Where those steps fail (too small or too empty a stack)
    it warns and falls back to the plain linked autostretch. Unlinked, it is
    the per-channel autostretch of :mod:`skystack.engine.stretch`.

    Parameters
    ----------
    image : ndarray
        ``(3, H, W)`` or ``(H, W)`` linear stack, NaN = no data.
    linked : bool
        One curve for all channels (default) or one per channel.

    Returns
    -------
    ndarray
        Same shape, float32 in [0, 1] (no data -> 0).
    """
    from skystack.engine.stretch import StretchConfig, autostretch

    shown = np.where(np.isfinite(image), image, np.nan).astype(np.float32)
    if linked:
        cfg = FinishConfig(crop=False, contrast=0.0, saturation=1.0, white_balance=False,
                           target_background=StretchConfig().target_background)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                return finish_image(shown, config=cfg).image
        except (SkystackError, ValueError, np.linalg.LinAlgError) as exc:
            warnings.warn(f"preview: background/colour steps skipped ({exc}); plain autostretch", stacklevel=2)
    return autostretch(shown, StretchConfig(linked=linked))


# ----------------------------------------------------------------------------- files


@dataclass(kw_only=True)
class StackFile:
    """A stack read back from disk: ``image`` (C, H, W) float32, ``count`` (H, W) or None."""

    image: np.ndarray
    count: np.ndarray | None
    n_frames: int | None
    path: Path
    coverage_path: Path | None = None
    landscape: np.ndarray | None = None  # (H, W) bool from the FITS's LANDSCAPE extension


def _read_fits_stack(p: Path) -> tuple[np.ndarray, np.ndarray | None, int | None]:
    from astropy.io import fits

    from skystack.engine.output import fits_rows

    try:
        with fits.open(p, memmap=False) as hdul:
            data = hdul[0].data
            n = hdul[0].header.get("NCOMBINE")
            cov = None
            if "COVERAGE" in hdul:
                cov = fits_rows(np.asarray(hdul["COVERAGE"].data), hdul["COVERAGE"].header)
                n = hdul["COVERAGE"].header.get("NFRAMES", n)
            if data is None:
                raise FrameReadError(f"{p}: the FITS has no image in its primary HDU; pass the stack FITS "
                                     "written by 'skystack stack'")
            img = fits_rows(np.asarray(data, dtype=np.float32), hdul[0].header)
            return img, cov, (int(n) if n is not None else None)
    except (OSError, ValueError, TypeError) as exc:
        raise FrameReadError(f"{p}: cannot read the FITS ({exc}); pass a stack written by 'skystack stack'") from None


def _read_coverage(p: Path) -> tuple[np.ndarray | None, int | None]:
    from astropy.io import fits

    from skystack.engine.output import fits_rows

    try:
        with fits.open(p, memmap=False) as hdul:
            if "COVERAGE" not in hdul:
                return None, None
            n = hdul["COVERAGE"].header.get("NFRAMES", hdul[0].header.get("NCOMBINE"))
            cov = fits_rows(np.asarray(hdul["COVERAGE"].data), hdul["COVERAGE"].header)
            return cov, (int(n) if n is not None else None)
    except (OSError, ValueError, TypeError) as exc:
        raise FrameReadError(f"{p}: cannot read the coverage map ({exc}); pass --coverage with the stack's "
                             "FITS or use --no-crop") from None


def _read_landscape(p: Path) -> np.ndarray | None:
    """The LANDSCAPE extension of a stack FITS (True = still landscape), or None."""
    from astropy.io import fits

    from skystack.engine.output import fits_rows

    try:
        with fits.open(p, memmap=False) as hdul:
            if "LANDSCAPE" not in hdul:
                return None
            return fits_rows(np.asarray(hdul["LANDSCAPE"].data), hdul["LANDSCAPE"].header) > 0
    except (OSError, ValueError, TypeError):
        return None


def read_stack(path: str | Path, *, coverage: str | Path | None = None) -> StackFile:
    """Read a stack (32-bit TIFF or FITS) and, when available, its coverage map.

    The coverage map comes from ``coverage`` (a FITS with a ``COVERAGE``
    extension), else from the stack itself when it is such a FITS, else from
    the FITS beside a TIFF (same name, ``.fits``), if it has one.

    Raises
    ------
    InputNotFound, FrameReadError
        Missing or unreadable file (the message names it).
    """
    p = Path(path)
    if not p.is_file():
        raise InputNotFound(f"{p}: no such stack; pass the TIFF or FITS written by 'skystack stack'")
    suffix = p.suffix.lower()
    cov, n = None, None
    cov_path = None
    if suffix in (".fits", ".fit", ".fts"):
        img, cov, n = _read_fits_stack(p)
        cov_path = p if cov is not None else None
    elif suffix in (".tif", ".tiff"):
        import tifffile

        try:
            a = tifffile.imread(p)
        except Exception as exc:  # tifffile raises many types
            raise FrameReadError(f"{p}: cannot read the TIFF ({exc}); pass a stack written by "
                                 "'skystack stack'") from None
        if a.size == 0:
            raise FrameReadError(f"{p}: cannot read the TIFF (no image in it); pass a stack written by 'skystack stack'")
        if a.ndim == 3 and a.shape[-1] in (3, 4):
            a = np.moveaxis(a[..., :3], -1, 0)
        if np.issubdtype(a.dtype, np.integer):
            a = a.astype(np.float32) / np.float32(np.iinfo(a.dtype).max)
        img = np.asarray(a, dtype=np.float32)
    else:
        raise FrameReadError(f"{p}: not a TIFF or FITS stack; pass the .tif or .fits written by 'skystack stack'")
    if coverage is not None:
        cp = Path(coverage)
        if not cp.is_file():
            raise InputNotFound(f"{cp}: no such coverage file; pass the stack's FITS or use --no-crop")
        cov, n2 = _read_coverage(cp)
        if cov is None:
            raise FrameReadError(f"{cp}: has no COVERAGE extension; pass the FITS written by 'skystack stack' "
                                 "or use --no-crop")
        n, cov_path = n2 or n, cp
    elif cov is None:
        side = p.with_suffix(".fits")
        if side != p and side.is_file():
            c2, n2 = _read_coverage(side)
            if c2 is not None:
                cov, n, cov_path = c2, n2, side
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[0] not in (1, 3)):
        raise FrameReadError(f"{p}: expected an RGB or mono image, got shape {img.shape}")
    if img.ndim == 3 and img.shape[0] == 1:
        img = img[0]
    if cov is not None and cov.shape != img.shape[-2:]:
        raise FrameReadError(f"{cov_path}: coverage map {cov.shape} does not match the stack "
                             f"{img.shape[-2:]}; pass the FITS of the same stack")
    fits_file = p if suffix in (".fits", ".fit", ".fts") else p.with_suffix(".fits")
    land = _read_landscape(fits_file) if fits_file.is_file() else None
    if land is not None and land.shape != img.shape[-2:]:
        land = None
    return StackFile(image=img, count=cov, n_frames=n, path=p, coverage_path=cov_path, landscape=land)


def write_tiff16(path: str | Path, image: np.ndarray, *, inputs: Iterable = ()) -> Path:
    """Write a 16-bit TIFF of a display image in [0, 1] ((3, H, W) -> RGB)."""
    import tifffile

    from skystack.engine.output import atomic_path

    a = np.clip(np.nan_to_num(np.asarray(image, dtype=np.float32)) * 65535.0 + 0.5, 0, 65535).astype(np.uint16)
    photometric = "minisblack"
    if a.ndim == 3:
        a = np.ascontiguousarray(np.moveaxis(a, 0, -1))
        photometric = "rgb"
    with atomic_path(path, inputs=inputs) as tmp:
        tifffile.imwrite(tmp, a, photometric=photometric, metadata=None)
    return Path(path)


def write_finished(result: FinishResult, picture: str | Path | None, *, linear: str | Path | None = None,
                   tiff16: str | Path | None = None, report: str | Path | None = None, inputs: Iterable = (),
                   quality: int = 92) -> dict[str, str]:
    """Write the picture (8-bit JPEG/PNG by suffix) and the optional outputs; return their paths."""
    from skystack import __version__
    from skystack.engine.output import write_json, write_preview, write_tiff

    inputs = list(inputs)
    out: dict[str, str] = {}
    if picture:
        sfx = Path(picture).suffix.lower()
        if sfx in (".tif", ".tiff"):
            out["picture"] = str(write_tiff16(picture, result.image, inputs=inputs))
        elif sfx in (".jpg", ".jpeg", ".png"):
            out["picture"] = str(write_preview(picture, result.image, inputs=inputs, quality=quality))
        else:
            raise SkystackError(f"{picture}: unknown picture type; use .jpg, .png or .tif (16-bit)")
    if tiff16:
        out["tiff16"] = str(write_tiff16(tiff16, result.image, inputs=inputs))
    if linear:
        out["linear"] = str(write_tiff(linear, result.linear, inputs=inputs,
                                       description=f"skystack {__version__} finish (linear)"))
    if report:
        out["report"] = str(report)
        write_json(report, {"software": f"skystack {__version__}", **result.summary(), "outputs": out},
                   inputs=inputs)
    return out


def finish_command(stack: str | Path, output: str | Path, *, config: FinishConfig = FinishConfig(),
                   coverage: str | Path | None = None, linear: str | Path | None = None,
                   tiff16: str | Path | None = None, report: str | Path | None = None,
                   quality: int = 92) -> tuple[FinishResult, dict[str, str]]:
    """``skystack finish STACK -o PICTURE``: read, finish and write.

    Parameters
    ----------
    stack : path
        Stack TIFF or FITS written by ``skystack stack``.
    output : path
        Picture to write (``.jpg``, ``.png``, or ``.tif`` for 16 bits).
    config : FinishConfig
        Settings.
    coverage : path, optional
        FITS holding the coverage map (``COVERAGE`` extension); default: the
        stack itself or the ``.fits`` beside it.
    linear, tiff16, report : path, optional
        Also write the linear result (32-bit TIFF), a 16-bit TIFF of the
        picture, a JSON summary.
    quality : int
        JPEG quality.

    Returns
    -------
    (FinishResult, dict)
        The result and the paths written.
    """
    st = read_stack(stack, coverage=coverage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = finish_image(st.image, count=st.count, n_frames=st.n_frames, config=config, landscape=st.landscape)
    inputs = [st.path] + ([st.coverage_path] if st.coverage_path else [])
    written = write_finished(res, output, linear=linear, tiff16=tiff16, report=report, inputs=inputs,
                             quality=quality)
    return res, written
