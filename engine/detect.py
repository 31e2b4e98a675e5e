"""Star detection and frame quality (sep on a background-subtracted luminance image).

Stars are found with `sep <https://sep.readthedocs.io>`_ (SExtractor as a
library) on a *luminance* image: the 2x2-binned mean of a CFA mosaic (each bin
holds one full Bayer tile, so the colour checkerboard disappears and the image
is four times smaller), the channel mean of a colour image, or a mono image
itself. The background mesh is subtracted first.

Each detection is then measured on the **full-resolution data** by a windowed
centroid (SExtractor's XWIN: the fixed point of a Gaussian-weighted first moment,
with the window matched to the median star) and window-corrected second moments:
the ``window_measure`` kernel of ``kernels/detect.cu`` (a thread per star, on the
device or compiled for the CPU) or its vectorised NumPy twin. On a CFA mosaic
every Bayer site gets its own
sky level and is divided by its share of the star's light, so a star's colour
cannot pull its centroid towards the red or blue pixels (the 2x2 binned image
alone would bias a coloured star by up to half a pixel); the diagonal site pairs
are weighted alike, so their pixel-phase errors cancel. A **PSF model**
(elliptical Moffat with free ``beta``, a Gaussian its limit; Levenberg-Marquardt
with a free amplitude and sky per site) is fitted only to a sample of bright,
isolated, unflagged stars (:attr:`DetectConfig.psf_sample`): it sets the
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
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from skystack.engine.backend import array_module, is_device_array, launch, run_cpu, to_host

#: 2 * sqrt(2 ln 2): FWHM of a Gaussian of unit sigma.
GAUSS_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))

#: Star flags (bit mask) in :attr:`StarList.flag`.
FLAG_SATURATED = 1  #: peak at or above the saturation level
FLAG_ELONGATED = 2  #: ellipticity above DetectConfig.max_ellipticity (trail, blend)
FLAG_EDGE = 4  #: measurement window cut by the image border
FLAG_FIT_FAILED = 8  #: the measurement did not converge (sep's isophotal values kept)

_SEP_PIXSTACK = 3_000_000
_pixstack_lock = threading.Lock()


#: Range of the Moffat wing parameter u = 1/beta (beta from 50, almost Gaussian, to 1.25).
_U_MIN, _U_MAX = 0.02, 0.8


@dataclass(frozen=True, kw_only=True)
class DetectConfig:
    """Settings of :func:`detect_stars`.

    Attributes
    ----------
    threshold_sigma : float
        Detection threshold in units of the background noise of the
        luminance image (sep matched filter on; the threshold is applied to the
        filtered image, so 3 sigma is a conservative cut).
    min_area : int
        Minimum connected pixels above threshold (in the luminance image).
    max_stars : int
        Keep at most this many stars (the brightest) in the returned list.
        :attr:`StarList.n_total` still counts all of them.
    bin2 : bool
        Also bin mono and colour frames 2x2 (faster on big sensors). CFA
        mosaics are always binned 2x2: the Bayer checkerboard would otherwise
        break every star into colour-dependent pieces.
    deblend : bool
        Run sep's deblender (slower; helps crowded fields).
    bkg_box : int
        Background mesh size in luminance pixels.
    bkg_filter : int
        Median filter size of the background mesh.
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
        counted in :attr:`StarList.n_total` when sep's size of them is star-like.
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
    deblend: bool = False
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
        Background-subtracted flux in luminance-image units (sep isophotal flux).
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


def _bin2(img: Any) -> Any:
    h, w = img.shape[-2] // 2 * 2, img.shape[-1] // 2 * 2
    a = img[..., :h, :w]
    out = a[..., 0::2, 0::2].astype("float32")
    out += a[..., 0::2, 1::2]
    out += a[..., 1::2, 0::2]
    out += a[..., 1::2, 1::2]
    out *= np.float32(0.25)
    return out


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
        return _bin2(lum) if bin2 else lum
    if data.ndim != 2:
        raise ValueError(f"expected a (H, W) or (3, H, W) image, got shape {data.shape}")
    if pattern is not None or bin2:
        return _bin2(data)
    return data.astype("float32", copy=True)


# --------------------------------------------------------------------------- detection


def _detection_image(lum: Any) -> np.ndarray:
    """The binned detection image on the host, sent as float16 around its sky: 0.5 byte per light pixel.

    The image minus an offset (the median of a fixed subsample: one of its
    values, so NumPy and CuPy agree exactly), scaled by a power of two that puts
    its largest deviation below 32768, is rounded to float16 where ``lum`` is
    and restored to float32 on the host. The rounding is relative (2^-11 of each
    deviation from the sky), far below the noise for any 16-bit frame; the
    stars' measurement reads the full-precision mosaic, not this image. Host
    frames take the same rounding, so both paths detect the same stars.
    """
    xp = array_module(lum)
    flat = lum.ravel()
    sample = xp.sort(flat[:: max(1, flat.size // 4095)][:4095])  # NaN sorts last on both
    n_finite = int(to_host(xp.isfinite(sample).sum()))
    offset = np.float32(to_host(sample[n_finite // 2])) if n_finite else np.float32(0.0)
    dev = lum - xp.float32(offset)
    peak = float(to_host(xp.nanmax(xp.abs(dev)))) if n_finite else 0.0
    scale = np.float32(2.0 ** math.ceil(math.log2(peak / 32768.0))) if math.isfinite(peak) and peak > 0 \
        else np.float32(1.0)
    half = (dev * xp.float32(1.0 / scale)).astype(xp.float16)
    out = to_host(half).astype(np.float32)
    out *= scale
    out += offset
    return out


def _grow_pixstack(exc: Exception) -> bool:
    """After sep's "pixel buffer full": raise its (process-wide) buffer tenfold, up to
    :data:`_SEP_PIXSTACK`; True when it was raised (the extraction is worth repeating).

    sep allocates the whole buffer on every extraction: its default (300 000 pixels)
    costs ~3 ms on a 0.25 MP image, 3 000 000 costs ~50 ms and 100 MB of page faults,
    so it grows only for the frames that need it.
    """
    import sep

    if "pixel buffer full" not in str(exc):
        return False
    with _pixstack_lock:
        now = sep.get_extract_pixstack()
        if now >= _SEP_PIXSTACK:
            return False
        sep.set_extract_pixstack(min(_SEP_PIXSTACK, now * 10))
    return True


def _empty(shape: tuple[int, int], binning: int, background: float = float("nan"),
           noise: float = float("nan")) -> StarList:
    z = np.zeros(0, dtype=np.float64)
    return StarList(x=z, y=z.copy(), flux=z.copy(), fwhm=z.copy(), ellipticity=z.copy(),
                    pos_err=z.copy(), flag=np.zeros(0, dtype=np.int32), n_total=0, background=background,
                    noise=noise, binning=binning, shape=shape)


def _window_half(sigma_w: float) -> int:
    """Stamp half-size of the window measurement (5 window sigmas and a pixel), kernel and twin alike."""
    return int(math.ceil(5.0 * sigma_w)) + 1


def _stamp_side(half: int, sites: int) -> int:
    """Side of a stamp reaching ``half`` px from its star (one more on a CFA, to start on an even pixel)."""
    return 2 * half + 2 if sites == 4 else 2 * half + 1


def _stamps(img: np.ndarray, x: np.ndarray, y: np.ndarray, half: int, sites: int):
    """Cut ``(N, K, K)`` float64 stamps around ``(x, y)`` (image pixels).

    With ``sites == 4`` (CFA) every stamp starts on an even row and column,
    so the Bayer site of stamp pixel ``(r, c)`` is ``2 * (r % 2) + c % 2`` for
    every star. Returns stamps, a validity mask (inside the image and finite),
    and the stamp origins.
    """
    h, w = img.shape
    k = _stamp_side(half, sites)
    ox = np.floor(x).astype(np.int64) - half
    oy = np.floor(y).astype(np.int64) - half
    if sites == 4:
        ox -= ox & 1
        oy -= oy & 1
    r = np.arange(k, dtype=np.int64)
    xx = ox[:, None, None] + r[None, None, :]
    yy = oy[:, None, None] + r[None, :, None]
    inside = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
    st = _gather_stamps(img, ox, oy, k).astype(np.float64)
    valid = inside & np.isfinite(st)
    st = np.where(valid, st, 0.0)
    return st, valid, ox, oy


def _gather_stamps(img: Any, ox: np.ndarray, oy: np.ndarray, k: int) -> np.ndarray:
    """``img``'s ``(N, k, k)`` pixels from origins ``(ox, oy)`` (clamped to the image), on the host.

    On a device the indices are made there from the origins, and only the
    stamps come down (not the frame).
    """
    xp = array_module(img)
    h, w = img.shape
    r = xp.arange(k, dtype=xp.int64)
    xx = xp.clip(xp.asarray(ox)[:, None, None] + r[None, None, :], 0, w - 1)
    yy = xp.clip(xp.asarray(oy)[:, None, None] + r[None, :, None], 0, h - 1)
    return to_host(img[yy, xx])


def _solve_linear(g: np.ndarray, data: np.ndarray, valid: np.ndarray, blocks: list[slice]):
    """Per-site amplitude and background minimising ``sum (data - a_s g - b_s)^2``.

    ``g``, ``data``, ``valid``: ``(N, P)`` with the pixels of each Bayer site in
    one contiguous block (``blocks``). Returns the model ``(N, P)`` and the
    amplitude of every pixel's site ``(N, P)``.
    """
    model = np.empty_like(g)
    amp = np.empty_like(g)
    for sl in blocks:
        gs, ds, vs = g[:, sl] * valid[:, sl], data[:, sl], valid[:, sl]
        sgg = np.einsum("np,np->n", gs, gs)
        sg = gs.sum(1)
        sn = vs.sum(1)
        sgd = np.einsum("np,np->n", gs, ds)
        sd = ds.sum(1)  # data is zero where invalid
        det = sgg * sn - sg * sg
        ok = det > 1e-12 * np.maximum(sgg * sn, 1e-300)
        det = np.where(ok, det, 1.0)
        a = np.where(ok, (sgd * sn - sg * sd) / det, 0.0)
        b = np.where(ok, (sgg * sd - sg * sgd) / det, sd / np.maximum(sn, 1))
        model[:, sl] = a[:, None] * g[:, sl] + b[:, None]
        amp[:, sl] = a[:, None]
    return model, amp


#: Kernel source of the star measurement.
_SRC = "detect.cu"
#: Kernel source of the PSF fit.
_PSF_SRC = "psf.cu"
#: Fewest stars of a CPU launch that may time the native ``window_measure`` against its twin: the
#: first launch decides, whatever its size (the twin's fixed cost alone is ~10x the kernel's on
#: 24 stars), and returns the chosen one's result, so a process measures every star with one of them.
_NATIVE_MIN_STARS = 1
#: Threads per block of ``window_measure``: a launch has only hundreds of stars, so small
#: blocks spread them over the multiprocessors of a GPU.
_STAR_BLOCK = 32


def _fit_psf(img: Any, x: np.ndarray, y: np.ndarray, s2: np.ndarray,
             half: int, sites: int, *, moffat: bool = True, n_iter: int = 25):
    """Fit the PSF model to every star: the ``psf_fit`` kernel or its twin :func:`_fit_psf_numpy`.

    On a device frame the kernel runs there (``kernels/psf.cu``, a thread per
    star reading the frame at its stamp) and only the seven per-star outputs come
    down. On the host, :func:`skystack.engine.backend.run_cpu` runs the kernel
    built natively or the twin, whichever is faster; a frame whose dtype float32
    cannot hold exactly always takes the twin. The two agree within the
    tolerance documented in ``docs/architecture.md``.

    Returns ``x, y, cxx, cyy, cxy, pos_err, ok`` as :func:`_fit_psf_numpy`.
    """
    x = np.ascontiguousarray(x, dtype=np.float64)
    y = np.ascontiguousarray(y, dtype=np.float64)
    s2 = np.ascontiguousarray(s2, dtype=np.float64)
    args = (half, sites, moffat, n_iter)
    if is_device_array(img):
        xp = array_module(img)
        return _psf_launch(lambda kn, n, a: launch(_PSF_SRC, kn, n, a, block=_STAR_BLOCK), xp,
                           xp.ascontiguousarray(img, dtype=xp.float32), x, y, s2, *args)
    dt = np.asarray(img).dtype
    if x.size == 0 or not (dt == np.float32 or (dt.kind in "uif" and dt.itemsize <= 2)):
        return _fit_psf_numpy(img, x, y, s2, half, sites, moffat=moffat, n_iter=n_iter)
    f32 = np.ascontiguousarray(img, dtype=np.float32)

    def native(mod):
        mod.set_threads(1)  # a launch is tens of stars; frames are detected in parallel already
        return _psf_launch(lambda kn, n, a: mod.launch(kn, n, a, block=_STAR_BLOCK), np, f32, x, y, s2, *args)

    return run_cpu(_PSF_SRC, "psf_fit", x.size,
                   lambda: _fit_psf_numpy(img, x, y, s2, half, sites, moffat=moffat, n_iter=n_iter),
                   native, min_items=_NATIVE_MIN_STARS, same_bits=False)


def _psf_launch(run, xp, img, x, y, s2, half: int, sites: int, moffat: bool, n_iter: int):
    """Launch ``psf_fit`` through ``run(kernel, n_items, args)`` on ``img`` (float32, of ``xp``);
    the star positions and sizes go up, the ``(7, N)`` outputs come down."""
    n = int(x.size)
    if n == 0:
        z = np.zeros(0)
        return z, z.copy(), z.copy(), z.copy(), z.copy(), z.copy(), np.zeros(0, dtype=bool)
    k = _stamp_side(half, sites)
    h, w = img.shape
    out = xp.empty((7, n), dtype=xp.float64)
    scratch = xp.empty(n * 6 * k * k, dtype=xp.float64)
    run("psf_fit", n, (out, scratch, img, np.int32(h), np.int32(w), np.int32(sites), xp.asarray(x),
                       xp.asarray(y), xp.asarray(s2), np.int64(n), np.int32(half), np.int32(k),
                       np.int32(bool(moffat)), np.int32(n_iter), np.float64(_U_MIN), np.float64(_U_MAX)))
    o = to_host(out)
    return o[0], o[1], o[2], o[3], o[4], o[5], o[6] > 0.5


def _fit_psf_numpy(img: np.ndarray, x: np.ndarray, y: np.ndarray, s2: np.ndarray,
                   half: int, sites: int, *, moffat: bool = True, n_iter: int = 25):
    """Fit an elliptical Moffat (or Gaussian) PSF to every star (Levenberg-Marquardt, vectorised):
    the NumPy twin of the ``psf_fit`` kernel (``kernels/psf.cu``), and its reference.

    The model of a stamp pixel of Bayer site ``s`` is ``a_s * G(p) + b_s`` with
    ``G = (1 + c(u) q)^(-1/u)``, ``c(u) = (2^u - 1) / (2 ln 2)`` (a Moffat of
    ``beta = 1/u``, free) or ``G = exp(-q / 2)`` (Gaussian), where
    ``q = d^T Q d``, ``d = p - mu``. With this parametrisation ``Q`` alone sets
    the FWHM (as for a Gaussian of covariance ``Q^-1``) and ``u`` only the
    wings, so the two do not trade off; ``u -> 0`` is the Gaussian. The
    centre ``mu`` and shape ``Q`` are shared by all sites,
    a free amplitude and background per CFA site (so star colour and the
    per-channel sky level cannot bias the centroid); ``sites == 1`` for mono
    data. ``G`` is sampled at pixel centres of the full-resolution image.
    The amplitudes and backgrounds are solved exactly at every step (variable
    projection); stars leave the loop once their step is below 1e-4 px.

    Returns ``x, y, cxx, cyy, cxy, pos_err, ok`` where ``C`` is the covariance
    of the Gaussian with the same FWHM along each axis.
    """
    n = x.shape[0]
    npar = 6 if moffat else 5
    st, valid, ox, oy = _stamps(img, x, y, half, sites)
    k = st.shape[1]
    r = np.arange(k, dtype=np.float64)
    px = np.tile(r, k)  # stamp-relative pixel coordinates, flattened row-major
    py = np.repeat(r, k)
    site = (py.astype(np.int64) % 2) * 2 + px.astype(np.int64) % 2 if sites == 4 \
        else np.zeros(k * k, dtype=np.int64)
    perm = np.argsort(site, kind="stable")  # each site's pixels contiguous
    px, py, site = px[perm], py[perm], site[perm]
    bounds = np.searchsorted(site, np.arange(sites + 1))
    blocks = [slice(int(bounds[i]), int(bounds[i + 1])) for i in range(sites)]
    data_all = st.reshape(n, -1)[:, perm]
    vmask_all = valid.reshape(n, -1)[:, perm].astype(np.float64)
    # parameters: mu_x, mu_y (stamp-relative), Q11, Q12, Q22 (shape), u = 1/beta (Moffat)
    th = np.empty((n, npar))
    th[:, 0] = x - ox
    th[:, 1] = y - oy
    s2 = np.clip(s2, 0.3, (half / 1.5) ** 2)
    th[:, 2] = 1.0 / s2
    th[:, 3] = 0.0
    th[:, 4] = 1.0 / s2
    if moffat:
        th[:, 5] = 1.0 / 3.0
    lo_p, hi_p = 1.0 / (half / 1.2) ** 2, 1.0 / 0.05

    def admissible(t):
        det = t[:, 2] * t[:, 4] - t[:, 3] ** 2
        ok_ = ((t[:, 2] > lo_p) & (t[:, 4] > lo_p) & (t[:, 2] < hi_p) & (t[:, 4] < hi_p)
               & (det > lo_p * lo_p * 0.5)
               & (t[:, 0] > 0) & (t[:, 0] < k - 1) & (t[:, 1] > 0) & (t[:, 1] < k - 1))
        if moffat:
            ok_ &= (t[:, 5] >= _U_MIN) & (t[:, 5] <= _U_MAX)
        return ok_

    def evaluate(t, data, vmask):
        dx = px[None, :] - t[:, 0:1]
        dy = py[None, :] - t[:, 1:2]
        q = t[:, 2:3] * dx * dx + 2 * t[:, 3:4] * dx * dy + t[:, 4:5] * dy * dy
        if moffat:
            u = t[:, 5:6]
            c = (np.exp2(u) - 1.0) / (2.0 * math.log(2.0))
            lq = np.log1p(c * np.maximum(q, 0.0))
            g = np.exp(-lq / u)
        else:
            lq = None
            g = np.exp(-0.5 * np.minimum(q, 200.0))
        model, amp = _solve_linear(g, data, vmask, blocks)
        res = (data - model) * vmask
        return np.einsum("np,np->n", res, res), g, q, lq, dx, dy, amp, res

    def jacobian(t, g, q, lq, dx, dy, amp, vmask):
        ag = amp * vmask
        if moffat:
            u = t[:, 5:6]
            c = (np.exp2(u) - 1.0) / (2.0 * math.log(2.0))
            dc = np.exp2(u) / 2.0  # dc/du
            one_cq = 1.0 + c * q
            dg = -(c / u) * g / one_cq  # dG/dq
            dgu = g * (lq / (u * u) - q * dc / (u * one_cq))  # dG/du
        else:
            dg = -0.5 * g
        adg = ag * dg
        j = np.empty((t.shape[0], npar, g.shape[1]))
        j[:, 0] = -2.0 * adg * (t[:, 2:3] * dx + t[:, 3:4] * dy)
        j[:, 1] = -2.0 * adg * (t[:, 3:4] * dx + t[:, 4:5] * dy)
        j[:, 2] = adg * dx * dx
        j[:, 3] = 2.0 * adg * dx * dy
        j[:, 4] = adg * dy * dy
        if moffat:
            j[:, 5] = ag * dgu
        # Kaufman's variable projection: remove from each column its part that the
        # per-site amplitude and sky would absorb (superlinear convergence; without
        # it width and amplitude trade off and the shape converges only linearly)
        for sl in blocks:
            gs, vs = g[:, sl] * vmask[:, sl], vmask[:, sl]
            sgg = np.einsum("nk,nk->n", gs, gs)
            sg = gs.sum(1)
            sn = vs.sum(1)
            det = sgg * sn - sg * sg
            det = np.where(det > 1e-12 * np.maximum(sgg * sn, 1e-300), det, np.inf)
            js = j[:, :, sl]
            jg = np.einsum("npk,nk->np", js, gs)
            j1 = js.sum(2)
            al = (jg * sn[:, None] - sg[:, None] * j1) / det[:, None]
            be = (sgg[:, None] * j1 - sg[:, None] * jg) / det[:, None]
            j[:, :, sl] = js - (al[:, :, None] * g[:, None, sl] + be[:, :, None]) * vs[:, None, :]
        return j

    cost = evaluate(th, data_all, vmask_all)[0]
    lam = np.full(n, 1e-3)
    done = ~admissible(th)
    eye = np.eye(npar)[None]
    for _ in range(n_iter):
        act = np.flatnonzero(~done)
        if act.size == 0:
            break
        t_a, d_a, v_a = th[act], data_all[act], vmask_all[act]
        _, g, q, lq, dx, dy, amp, res = evaluate(t_a, d_a, v_a)
        j = jacobian(t_a, g, q, lq, dx, dy, amp, v_a)
        jtj = np.einsum("npk,nqk->npq", j, j)
        jtr = np.einsum("npk,nk->np", j, res)
        diag = np.einsum("npp->np", jtj)
        a_mat = jtj + (lam[act, None] * np.maximum(diag, 1e-12))[:, :, None] * eye
        a_mat[~np.isfinite(a_mat).all(axis=(1, 2))] = np.eye(npar)
        try:
            step = np.linalg.solve(a_mat, jtr[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            step = np.zeros_like(t_a)
            for i in range(act.size):
                try:
                    step[i] = np.linalg.solve(a_mat[i], jtr[i])
                except np.linalg.LinAlgError:
                    pass
        step = np.where(np.isfinite(step), step, 0.0)
        cand = t_a + step
        # project onto the bounds (a Gaussian star drives u to its lower bound)
        cand[:, 2] = np.clip(cand[:, 2], lo_p * 1.0001, hi_p * 0.9999)
        cand[:, 4] = np.clip(cand[:, 4], lo_p * 1.0001, hi_p * 0.9999)
        if moffat:
            cand[:, 5] = np.clip(cand[:, 5], _U_MIN, _U_MAX)
        step = cand - t_a
        adm = admissible(cand)
        c_cost = evaluate(np.where(adm[:, None], cand, t_a), d_a, v_a)[0]
        better = adm & (c_cost < cost[act])
        th[act[better]] = cand[better]
        cost[act[better]] = c_cost[better]
        lam[act] = np.where(better, lam[act] / 3.0, lam[act] * 4.0)
        small = (np.abs(step[:, :2]).max(1) < 1e-4) & (np.abs(step[:, 2:5] / t_a[:, 2:5].max(1, keepdims=True))
                                                       .max(1) < 1e-4)
        done[act] |= small | (lam[act] > 1e7)

    # parameter errors from the final Jacobian
    _, g, q, lq, dx, dy, amp, res = evaluate(th, data_all, vmask_all)
    j = jacobian(th, g, q, lq, dx, dy, amp, vmask_all)
    jtj = np.einsum("npk,nqk->npq", j, j)
    det = th[:, 2] * th[:, 4] - th[:, 3] ** 2
    cxx, cyy, cxy = th[:, 4] / det, th[:, 2] / det, -th[:, 3] / det
    dof = np.maximum(vmask_all.sum(1) - npar - 2 * sites, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        good_j = np.isfinite(jtj).all(axis=(1, 2)) & (np.linalg.det(np.where(
            np.isfinite(jtj), jtj, 0.0)) > 0)
        jtj[~good_j] = np.eye(npar)
        cov = np.linalg.inv(jtj)
        var = (cov[:, 0, 0] + cov[:, 1, 1]) / 2 * cost / dof
    var = np.where(good_j & np.isfinite(var) & (var >= 0), var, np.inf)
    pos_err = np.sqrt(var)
    amp_sum = np.array([amp[:, b].mean(1) for b in blocks]).sum(0)
    ok = admissible(th) & (amp_sum > 0) & np.isfinite(pos_err)
    return th[:, 0] + ox, th[:, 1] + oy, cxx, cyy, cxy, pos_err, ok


def _window_measure(img: Any, x: np.ndarray, y: np.ndarray, sigma_w: float, sites: int,
                    noise_pix: float, *, n_iter: int = 16):
    """Windowed centroids and second moments of every star: the ``window_measure`` kernel or its twin.

    On a device frame the kernel runs there (``kernels/detect.cu``, a thread per
    star reading the frame at its stamp) and only the seven per-star outputs come
    down. On the host, :func:`skystack.engine.backend.run_cpu` runs the kernel
    built natively or the twin :func:`_window_measure_numpy`, whichever is faster;
    a frame whose dtype float32 cannot hold exactly (float64) always takes the twin.
    The kernel agrees with the twin within the tolerance documented there.

    Returns ``x, y, cxx, cyy, cxy, pos_err, ok`` (image pixels).
    """
    x = np.ascontiguousarray(x, dtype=np.float64)
    y = np.ascontiguousarray(y, dtype=np.float64)
    args = (sigma_w, sites, noise_pix, n_iter)
    if is_device_array(img):
        xp = array_module(img)
        return _window_launch(lambda kn, n, a: launch(_SRC, kn, n, a, block=_STAR_BLOCK), xp,
                              xp.ascontiguousarray(img, dtype=xp.float32), x, y, *args)
    dt = np.asarray(img).dtype
    if x.size == 0 or not (dt == np.float32 or (dt.kind in "uif" and dt.itemsize <= 2)):
        return _window_measure_numpy(img, x, y, sigma_w, sites, noise_pix, n_iter=n_iter)
    f32 = np.ascontiguousarray(img, dtype=np.float32)
    return run_cpu(_SRC, "window_measure", x.size,
                   lambda: _window_measure_numpy(img, x, y, sigma_w, sites, noise_pix, n_iter=n_iter),
                   lambda mod: _window_native(mod, f32, x, y, *args), min_items=_NATIVE_MIN_STARS,
                   same_bits=False)


def _window_native(mod, img: np.ndarray, x: np.ndarray, y: np.ndarray, *args):
    """``window_measure`` built for the host, on one core: a launch is a few hundred stars (~5 ms),
    and an OpenMP team costs more than it saves there (2-core VM: 34 stars 0.6 ms on one core,
    5.0 ms on two; 299 stars 5.3 against 8.2 ms); frames are detected in parallel already."""
    mod.set_threads(1)
    return _window_launch(lambda kn, n, a: mod.launch(kn, n, a, block=_STAR_BLOCK), np, img, x, y, *args)


def _window_launch(run, xp, img, x, y, sigma_w: float, sites: int, noise_pix: float, n_iter: int):
    """Launch ``window_measure`` through ``run(kernel, n_items, args)`` on ``img`` (float32, of ``xp``);
    the star positions go up, the ``(7, N)`` outputs come down."""
    n = int(x.size)
    if n == 0:
        z = np.zeros(0)
        return z, z.copy(), z.copy(), z.copy(), z.copy(), z.copy(), np.zeros(0, dtype=bool)
    half = _window_half(sigma_w)
    k = _stamp_side(half, sites)
    h, w = img.shape
    out = xp.empty((7, n), dtype=xp.float64)
    scratch = xp.empty(n * (2 * k * k + 2 * k), dtype=xp.float64)
    run("window_measure", n, (out, scratch, img, np.int32(h), np.int32(w), np.int32(sites), xp.asarray(x),
                              xp.asarray(y), np.int64(n), np.float64(sigma_w), np.float64(noise_pix),
                              np.int32(n_iter), np.int32(half), np.int32(k)))
    o = to_host(out)
    return o[0], o[1], o[2], o[3], o[4], o[5], o[6] > 0.5


def _window_measure_numpy(img: np.ndarray, x: np.ndarray, y: np.ndarray, sigma_w: float, sites: int,
                          noise_pix: float, *, n_iter: int = 16):
    """Windowed centroids and second moments of every star (SExtractor's XWIN, vectorised):
    the NumPy twin of the ``window_measure`` kernel (``kernels/detect.cu``), and its reference.

    The centre is iterated to the fixed point of ``sum w (p - mu) I = 0`` with a
    circular Gaussian window ``w`` of standard deviation ``sigma_w`` (pixels of
    ``img``), the Newton step of SExtractor (factor 2 when the window matches
    the star). The sky is the median of each Bayer site's pixels beyond
    ``3.5 sigma_w``. On a CFA mosaic (``sites == 4``) every site's data are
    divided by that site's share of the windowed flux, so a star's colour cannot
    pull its centre (the four sites sample the same profile); a site with under
    a tenth of the brightest site's share is left out (noise, a hot pixel).

    The window-weighted second moments ``M`` are corrected for the window
    (exact for a Gaussian star: ``C^-1 = M^-1 - sigma_w^-2 I``), so ``C`` is the
    covariance of the star itself, pixel response included. The centroid error
    per axis propagates ``noise_pix`` (per-pixel sky noise) through the fixed
    point: ``var_x = sum (w dx)^2 s^2 / (S (1 - M_xx / sigma_w^2))^2``.

    The kernel does the same float64 operations per star, but sums a star's
    pixels in row-major order (per Bayer site in the iteration, the four sums then
    weighted by the site gains; NumPy sums pairwise) and forms the window as the
    product of its x and y factors (``exp(-dx^2/2s^2) exp(-dy^2/2s^2)``, here one
    ``exp``); the sky medians are the same values. So the two agree to rounding
    (~1e-14), not bit for bit. Tolerance, for the stars the twin calls ``ok``
    (tested in ``tests/test_detect_kernel.py``): ``ok`` identical; ``x, y`` within
    1e-9 px; ``cxx, cyy`` and ``pos_err`` within 1e-9 relative, ``cxy`` within 1e-9
    of ``sqrt(cxx cyy)``. (Both stop iterating when a step is under 1e-5 px: a
    step within rounding of that threshold would stop one of them a step earlier,
    a change beyond the tolerance but far below 1e-5 px; the tests never met one.)

    Returns ``x, y, cxx, cyy, cxy, pos_err, ok`` (image pixels).
    """
    half = _window_half(sigma_w)
    st, valid, ox, oy = _stamps(img, x, y, half, sites)
    k = st.shape[1]
    r = np.arange(k, dtype=np.float64)
    px, py = r[None, None, :], r[None, :, None]
    site = ((r[:, None].astype(np.int64) % 2) * 2 + r[None, :].astype(np.int64) % 2) if sites == 4 \
        else np.zeros((k, k), dtype=np.int64)
    smask = [site == s for s in range(sites)]
    cx, cy = x - ox, y - oy
    c0 = (k - 1) / 2.0  # the ring is fixed on the stamp grid: one pixel set for every star
    ring = ((r[:, None] - c0) ** 2 + (r[None, :] - c0) ** 2) > (3.5 * sigma_w) ** 2
    data = np.empty_like(st)
    for m in smask:  # local sky per site
        vals = st[:, ring & m]
        holes = ~valid[:, ring & m].all(1)
        sky = np.median(vals, axis=1)
        if holes.any():  # stamps cut by the border or no-data
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a star without sky pixels
                sky[holes] = np.nanmedian(np.where(valid[holes][:, ring & m], vals[holes], np.nan), axis=1)
        sky = np.where(np.isfinite(sky), sky, 0.0)
        data = np.where(m, st - sky[:, None, None], data)
    data *= valid
    inv2 = 1.0 / (2.0 * sigma_w * sigma_w)
    active = np.ones(x.shape[0], dtype=bool)
    ok = np.ones(x.shape[0], dtype=bool)

    def moments(idx):
        dx = px - cx[idx, None, None]
        dy = py - cy[idx, None, None]
        w = np.exp(-(dx * dx + dy * dy) * inv2) * valid[idx]
        wd = w * data[idx]
        gain = norm = np.ones((idx.size, k, k))
        if sites == 4:
            share = np.stack([(wd * m).sum((1, 2)) for m in smask], 1)
            ref = share.max(1, keepdims=True)
            use = share > 0.1 * ref
            mean = np.where(use, share, 0.0).sum(1, keepdims=True) / np.maximum(use.sum(1, keepdims=True), 1)
            g = np.where(use, share / np.maximum(mean, 1e-300), np.inf)
            # data / g is colourless (pixel variance noise^2 / g^2). Sites 0 and 3 sample
            # the same x and y phases as sites 1 and 2 shifted by one pixel: each diagonal
            # pair gets one weight, so the sampling (pixel-phase) bias of the pairs cancels
            # whatever the colour, and the pairs are combined by inverse variance.
            ig2 = 1.0 / (g * g)
            wp = np.empty_like(g)
            wp[:, [0, 3]] = 1.0 / np.maximum(ig2[:, [0]] + ig2[:, [3]], 1e-300)
            wp[:, [1, 2]] = 1.0 / np.maximum(ig2[:, [1]] + ig2[:, [2]], 1e-300)
            for s, m in enumerate(smask):
                norm = np.where(m, 1.0 / g[:, s, None, None], norm)
                gain = np.where(m, wp[:, s, None, None] / g[:, s, None, None], gain)
            wd = wd * gain
        s0 = wd.sum((1, 2))
        return dx, dy, w, wd, gain, norm, s0

    with np.errstate(all="ignore"):
        for _ in range(n_iter):
            idx = np.flatnonzero(active)
            if idx.size == 0:
                break
            dx, dy, w, wd, gain, norm, s0 = moments(idx)
            stx = 2.0 * (wd * dx).sum((1, 2)) / s0
            sty = 2.0 * (wd * dy).sum((1, 2)) / s0
            bad = ~(np.isfinite(stx) & np.isfinite(sty) & (s0 > 0))
            stx, sty = np.where(bad, 0.0, np.clip(stx, -1.0, 1.0)), np.where(bad, 0.0, np.clip(sty, -1.0, 1.0))
            cx[idx] += stx
            cy[idx] += sty
            ok[idx[bad]] = False
            active[idx] = ~bad & (np.maximum(np.abs(stx), np.abs(sty)) > 1e-5)
        idx = np.arange(x.shape[0])
        dx, dy, w, wd, gain, norm, s0 = moments(idx)
        mxx = (wd * dx * dx).sum((1, 2)) / s0
        myy = (wd * dy * dy).sum((1, 2)) / s0
        mxy = (wd * dx * dy).sum((1, 2)) / s0
        # star covariance C = (M^-1 - W^-1)^-1 (Gaussian window and star)
        det_m = np.maximum(mxx * myy - mxy * mxy, 1e-12)
        pxx, pyy, pxy = myy / det_m - 2.0 * inv2, mxx / det_m - 2.0 * inv2, -mxy / det_m
        det_p = pxx * pyy - pxy * pxy
        pos_def = (det_p > 1e-8) & (pxx > 0)
        det_p = np.where(pos_def, det_p, 1.0)
        cxx = np.where(pos_def, pyy / det_p, 1e4)
        cyy = np.where(pos_def, pxx / det_p, 1e4)
        cxy = np.where(pos_def, -pxy / det_p, 0.0)
        var_pix = (noise_pix * gain) ** 2
        var_norm = (noise_pix * norm) ** 2
        dxn = s0 * (1.0 - mxx * 2.0 * inv2)
        dyn = s0 * (1.0 - myy * 2.0 * inv2)
        varx = ((w * dx) ** 2 * var_pix).sum((1, 2)) / dxn ** 2
        vary = ((w * dy) ** 2 * var_pix).sum((1, 2)) / dyn ** 2
        pos_err = np.sqrt((varx + vary) / 2.0) * _misfit(data * norm, w * (norm > 0), dx, dy, pxx, pyy, pxy,
                                                         var_norm, pos_def)
    inside = (cx > 1) & (cx < k - 2) & (cy > 1) & (cy < k - 2)
    ok &= inside & np.isfinite(pos_err) & (s0 > 0) & (dxn > 0) & (dyn > 0)
    return cx + ox, cy + oy, cxx, cyy, cxy, pos_err, ok


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
    import sep

    image = array_module(image).asarray(image)  # a device frame stays there: the detection image
    shape = (int(image.shape[-2]), int(image.shape[-1]))  # and the stars' stamps come down
    binning = 2 if (pattern is not None and image.ndim == 2) or cfg.bin2 else 1
    if min(shape) < 4 * binning:
        return _empty(shape, binning)
    lum_full = None
    if image.ndim == 3:
        lum_full = detection_plane(image)
        lum = _bin2(lum_full) if cfg.bin2 else lum_full.copy()
    else:
        lum = detection_plane(image, pattern, bin2=cfg.bin2)
    lum = _detection_image(lum) if binning == 2 else np.ascontiguousarray(to_host(lum), dtype=np.float32)
    bad = ~np.isfinite(lum)
    if bad.all():
        return _empty(shape, binning)
    if bad.any():
        lum[bad] = np.float32(np.median(lum[~bad]))
    box = int(max(8, min(cfg.bkg_box, min(lum.shape) // 2)))
    try:
        bkg = sep.Background(lum, mask=bad if bad.any() else None, bw=box, bh=box,
                             fw=cfg.bkg_filter, fh=cfg.bkg_filter)
    except Exception:  # sep refuses degenerate images
        return _empty(shape, binning)
    background, noise = float(bkg.globalback), float(bkg.globalrms)
    if not (math.isfinite(noise) and noise > 0):
        return _empty(shape, binning, background, noise)
    bkg.subfrom(lum)
    if bad.any():
        lum[bad] = 0.0

    thresh = float(cfg.threshold_sigma)
    objs = None
    tries = 0
    while objs is None and tries < 4:  # a frame full of nebulosity can overflow sep's buffers
        try:
            objs = sep.extract(lum, thresh, err=noise, minarea=int(cfg.min_area),
                               deblend_cont=0.005 if cfg.deblend else 1.0,
                               clean=cfg.deblend)
        except Exception as exc:
            if not _grow_pixstack(exc):  # a larger pixel buffer gives the same result; else a higher threshold
                thresh *= 2.0
                tries += 1
    if objs is None or len(objs) == 0:
        return _empty(shape, binning, background, noise)
    if bad.any():
        lum[bad] = np.nan  # no-data again for the PSF fit

    order = np.argsort(-objs["flux"], kind="stable")
    objs = objs[order]
    n_obj = len(objs)
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
    elif binning == 1:
        fit_img, sites = lum, 1  # background-subtracted; the fit has its own sky term
    else:
        fit_img, sites = (lum_full if lum_full is not None else image), 1

    sigma_w = _window_sigma(fit_img, sx[:24], sy[:24], sigma_med, sites, noise * f, cfg)

    # measure the brightest first, in chunks, until max_stars pass the filters
    cap = min(n_obj, int(cfg.max_measured))
    mx, my, cxx, cyy, cxy, perr = (np.full(cap, np.nan) for _ in range(6))
    ok = np.zeros(cap, dtype=bool)
    keep = np.zeros(cap, dtype=bool)
    done = 0
    while done < cap:
        want = cfg.max_stars - int(keep[:done].sum())
        sl = slice(done, min(cap, done + max(32, int(want * 1.2) + 8)))
        mx[sl], my[sl], cxx[sl], cyy[sl], cxy[sl], perr[sl], ok[sl] = _window_measure(
            fit_img, sx[sl], sy[sl], sigma_w, sites, noise * f)
        done = sl.stop
        keep[:done], fwhm, ellip, x_full, y_full, cxx_f, cyy_f, cxy_f, perr_f = _star_list(
            objs[:done], ok[:done], mx[:done], my[:done], cxx[:done], cyy[:done], cxy[:done],
            perr[:done], sx[:done], sy[:done], f, shape, cfg)
        if keep[:done].sum() >= cfg.max_stars:
            break

    flag = np.zeros(done, dtype=np.int32)
    flag[~ok[:done]] |= FLAG_FIT_FAILED
    edge = ((sx[:done] < half) | (sy[:done] < half) | (sx[:done] > shape[1] - 1 - half)
            | (sy[:done] > shape[0] - 1 - half))
    flag[edge] |= FLAG_EDGE
    flag[ellip > cfg.max_ellipticity] |= FLAG_ELONGATED
    if cfg.saturation is not None:
        sat_level = (float(cfg.saturation) - background) * 0.999
        flag[(objs["peak"][:done] >= sat_level)] |= FLAG_SATURATED
    keep = keep[:done]
    scale = _psf_sample(fit_img, sx, sy, s2, x_full, y_full, perr_f, fwhm, keep & (flag == 0), half, sites, cfg)
    fwhm = fwhm * scale
    idx = np.flatnonzero(keep)
    # detections not fitted are counted when sep's size is star-like (0.25x..16x the
    # fitted stars' median area): hot pixels and big blobs are left out
    n_total = int(idx.size)
    if done < n_obj and idx.size:
        ab = objs["a"][done:].astype(np.float64) * objs["b"][done:]
        med = float(np.median(objs["a"][idx].astype(np.float64) * objs["b"][idx]))
        n_total += int(np.count_nonzero((ab >= 0.25 * med) & (ab <= 16.0 * med)))
    idx = idx[: cfg.max_stars]
    return StarList(
        x=x_full[idx], y=y_full[idx], flux=objs["flux"][idx].astype(np.float64) * f * f,
        fwhm=fwhm[idx], ellipticity=ellip[idx], pos_err=perr_f[idx], flag=flag[idx],
        n_total=n_total, background=background, noise=noise, binning=binning, shape=shape,
    )


def _misfit(data, w, dx, dy, pxx, pyy, pxy, var_pix, pos_def) -> np.ndarray:
    """``sqrt`` of the window-weighted reduced chi-square of a Gaussian model, at least 1.

    The model is the Gaussian of precision matrix ``P`` (the window-corrected
    moments) at the windowed centre, with its amplitude solved by weighted
    least squares. Star shot noise, a blended neighbour or a cosmic ray raise
    the residuals above the sky noise, and the centroid error with them (as
    the residual-scaled covariance of a least-squares fit does).
    """
    q = pxx[:, None, None] * dx * dx + 2.0 * pxy[:, None, None] * dx * dy + pyy[:, None, None] * dy * dy
    g = np.exp(-0.5 * np.minimum(q, 200.0))
    amp = (w * data * g).sum((1, 2)) / np.maximum((w * g * g).sum((1, 2)), 1e-300)
    res = data - amp[:, None, None] * g
    chi = (w * res * res).sum((1, 2)) / np.maximum((w * var_pix).sum((1, 2)), 1e-300)
    chi = np.where(pos_def & np.isfinite(chi), chi, 1.0)
    return np.sqrt(np.maximum(chi, 1.0))


def _window_sigma(img, x, y, sigma0, sites, noise_pix, cfg) -> float:
    """Window size for :func:`_window_measure`: the median star's Gaussian sigma.

    The windowed centroid is the maximum-likelihood one for a Gaussian star
    when the window matches the star, so the brightest detections are measured
    once with sep's size (isophotal moments, on the binned image for a CFA
    mosaic: off by tens of per cent) and the median sigma of the star-like ones
    becomes the window.
    """
    sigma0 = float(np.clip(sigma0, 0.8, 8.0))
    _, _, cxx, cyy, cxy, _, ok = _window_measure(img, x, y, sigma0, sites, noise_pix, n_iter=6)
    sig = np.maximum(cxx * cyy - cxy * cxy, 0.0) ** 0.25
    fw = GAUSS_FWHM * sig
    good = ok & (fw >= cfg.min_fwhm_px) & (fw <= cfg.max_fwhm_px)
    return float(np.clip(np.median(sig[good]), 0.8, 8.0)) if good.sum() >= 3 else sigma0


def _psf_sample(img, sx, sy, s2, x, y, pos_err, fwhm, clean, half, sites, cfg) -> float:
    """Fit the PSF model to a sample of clean stars; return the FWHM scale for all stars.

    The window-corrected second moments give the FWHM of a Gaussian star
    exactly; Moffat wings make them read wider than the core. The model
    (:func:`_fit_psf`) is fitted to the :attr:`DetectConfig.psf_sample`
    brightest unflagged stars with no other detection within ``2 half`` px;
    the median ratio of fitted to moment FWHM is returned (1.0 when fewer
    than 3 fits succeed), to rescale every star's FWHM. These stars, the
    ones registration leans on most, take the fit's centroid and error
    (``x``, ``y``, ``pos_err`` are updated in place).
    """
    if cfg.psf_sample <= 0:
        return 1.0
    from scipy.spatial import cKDTree

    d, _ = cKDTree(np.column_stack([sx, sy])).query(np.column_stack([x, y]), k=2)
    cand = np.flatnonzero(clean & (d[:, 1] > 2.0 * half))[: cfg.psf_sample]
    if cand.size < 3:
        return 1.0
    fx, fy, cxx, cyy, cxy, ferr, ok = _fit_psf(img, x[cand], y[cand], s2[cand], half, sites,
                                               moffat=cfg.psf == "moffat")
    ok &= np.hypot(fx - x[cand], fy - y[cand]) < 0.5
    x[cand[ok]], y[cand[ok]], pos_err[cand[ok]] = fx[ok], fy[ok], ferr[ok]
    det = np.maximum(cxx * cyy - cxy * cxy, 1e-12)
    ratio = GAUSS_FWHM * det ** 0.25 / fwhm[cand]
    ratio = ratio[ok & np.isfinite(ratio)]
    return float(np.median(ratio)) if ratio.size >= 3 else 1.0


def _star_list(objs, ok, mx, my, cxx, cyy, cxy, perr, sx, sy, f, shape, cfg):
    """Turn fit results (with sep fallbacks) into FWHM, ellipticity and the keep mask."""
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
