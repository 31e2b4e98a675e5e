"""Windowed centroids and second moments of stars: the ``window_measure`` kernel and its twin.

SExtractor's XWIN measurement of each detection on the full-resolution data
(:func:`window_measure`): the fixed point of a Gaussian-weighted first moment,
window-corrected second moments and a centroid error, per Bayer site on a CFA
mosaic. On a device frame the kernel of ``kernels/detect.cu`` runs there; on the
host its native build or the NumPy twin :func:`_window_measure_numpy`, whichever
is faster. Also the stamp geometry (:func:`window_half`, :func:`stamp_side`,
:func:`cut_stamps`) that the PSF fit (:mod:`skystack.engine.psf`) shares.
:mod:`skystack.engine.detect` finds the stars and calls these.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from skystack.engine.backend import array_module, is_device_array, launch, run_cpu, to_host

#: Kernel source of the star measurement.
_SRC = "detect.cu"
#: Fewest stars of a CPU launch that may time a star kernel (``window_measure``, ``psf_fit``)
#: against its twin: the first launch decides, whatever its size (the twin's fixed cost alone is
#: ~10x the kernel's on 24 stars), and returns the chosen one's result, so a process measures
#: every star with one of them.
NATIVE_MIN_STARS = 1
#: Threads per block of the star kernels: a launch has only hundreds of stars, so small
#: blocks spread them over the multiprocessors of a GPU.
STAR_BLOCK = 32


def window_half(sigma_w: float) -> int:
    """Stamp half-size of the window measurement (5 window sigmas and a pixel), kernel and twin alike."""
    return int(math.ceil(5.0 * sigma_w)) + 1


def stamp_side(half: int, sites: int) -> int:
    """Side of a stamp reaching ``half`` px from its star (one more on a CFA, to start on an even pixel)."""
    return 2 * half + 2 if sites == 4 else 2 * half + 1


def cut_stamps(img: np.ndarray, x: np.ndarray, y: np.ndarray, half: int, sites: int):
    """Cut ``(N, K, K)`` float64 stamps around ``(x, y)`` (pixels of the host image ``img``: the
    twins' input; on a device the kernels read the frame at each stamp).

    With ``sites == 4`` (CFA) every stamp starts on an even row and column,
    so the Bayer site of stamp pixel ``(r, c)`` is ``2 * (r % 2) + c % 2`` for
    every star. Returns stamps, a validity mask (inside the image and finite),
    and the stamp origins.
    """
    h, w = img.shape
    k = stamp_side(half, sites)
    ox = np.floor(x).astype(np.int64) - half
    oy = np.floor(y).astype(np.int64) - half
    if sites == 4:
        ox -= ox & 1
        oy -= oy & 1
    r = np.arange(k, dtype=np.int64)
    xx = ox[:, None, None] + r[None, None, :]
    yy = oy[:, None, None] + r[None, :, None]
    inside = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
    st = np.asarray(img)[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)].astype(np.float64)
    valid = inside & np.isfinite(st)
    st = np.where(valid, st, 0.0)
    return st, valid, ox, oy


def host_float32(img: np.ndarray) -> np.ndarray | None:
    """A host frame as the star kernels read it (C-contiguous float32), or None when float32 cannot
    hold its values exactly (float64, 32-bit integers): the twins measure those."""
    dt = np.asarray(img).dtype
    if not (dt == np.float32 or (dt.kind in "uif" and dt.itemsize <= 2)):
        return None
    return np.ascontiguousarray(img, dtype=np.float32)


def window_measure(img: Any, x: np.ndarray, y: np.ndarray, sigma_w: float, sites: int,
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
    x, y = (np.ascontiguousarray(v, dtype=np.float64) for v in (x, y))
    args = (sigma_w, sites, noise_pix, n_iter)
    if is_device_array(img):
        xp = array_module(img)
        return _window_launch(lambda kn, n, a: launch(_SRC, kn, n, a, block=STAR_BLOCK), xp,
                              xp.ascontiguousarray(img, dtype=xp.float32), x, y, *args)
    f32 = host_float32(img) if x.size else None
    if f32 is None:
        return _window_measure_numpy(img, x, y, sigma_w, sites, noise_pix, n_iter=n_iter)
    return run_cpu(_SRC, "window_measure", x.size,
                   lambda: _window_measure_numpy(img, x, y, sigma_w, sites, noise_pix, n_iter=n_iter),
                   lambda mod: _window_native(mod, f32, x, y, *args), min_items=NATIVE_MIN_STARS,
                   same_bits=False)


def _window_native(mod, img: np.ndarray, x: np.ndarray, y: np.ndarray, *args):
    """``window_measure`` built for the host, on one core: a launch is a few hundred stars (~5 ms),
    and an OpenMP team costs more than it saves there (2-core VM: 34 stars 0.6 ms on one core,
    5.0 ms on two; 299 stars 5.3 against 8.2 ms); frames are detected in parallel already."""
    mod.set_threads(1)
    return _window_launch(lambda kn, n, a: mod.launch(kn, n, a, block=STAR_BLOCK), np, img, x, y, *args)


def _window_launch(run, xp, img, x, y, sigma_w: float, sites: int, noise_pix: float, n_iter: int):
    """Launch ``window_measure`` through ``run(kernel, n_items, args)`` on ``img`` (float32, of ``xp``);
    the star positions go up, the ``(7, N)`` outputs come down."""
    n = int(x.size)
    if n == 0:
        z = np.zeros(0)
        return z, z.copy(), z.copy(), z.copy(), z.copy(), z.copy(), np.zeros(0, dtype=bool)
    half = window_half(sigma_w)
    k = stamp_side(half, sites)
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
    half = window_half(sigma_w)
    st, valid, ox, oy = cut_stamps(img, x, y, half, sites)
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
