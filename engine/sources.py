"""Star candidates of a detection image: background mesh, matched filter, peaks and their moments.

The detection image (:func:`skystack.engine.detect.detection_plane`: a binned
CFA mosaic, a colour frame's channel mean, a mono frame) is searched where it
is, on the host or on the device, with the same kernels (``kernels/sources.cu``)
and the same numbers; only the candidates' list leaves a device. The steps are
SExtractor's (and sep's), with a peak finder in place of its connected
regions:

1. **Background mesh.** The image is cut into ``box`` x ``box`` boxes. Each
   box's sky is the median of its finite pixels (every other row and column)
   after two rounds of 3-sigma clipping (:func:`robust.clipped_median_sigma_rows`,
   one launch). Boxes without data take the median box; the mesh is median
   filtered (``filt`` x ``filt``) about its least-squares plane, so an
   outlying box goes and a gradient stays. The frame's background is the
   median of the mesh.
2. **Subtraction.** The mesh is interpolated bilinearly between the box centres
   (and extrapolated to the edges) and subtracted (no-data pixels become 0).
   The noise is then the median of the boxes' clipped MAD-sigma of the
   result: a box's own spread would include the sky's gradient across it.
3. **Matched filter.** The result is convolved with SExtractor's 3 x 3 pyramid
   (normalised), the matched filter of a star of ~1.5 px FWHM, and compared
   with ``threshold_sigma`` times the pixels' noise, as sep compares it. The
   filtered noise is 0.375 of the pixels' (6/16 for white noise), so 3 sigma
   is 8 sigma of the filtered image: noise alone almost never passes.
4. **Peaks.** A candidate is a pixel above the threshold that no pixel within
   2 px beats (ties go to the earlier pixel in raster order) and that has at
   least ``min_area`` pixels above the threshold within 2 px: a noise spike
   has one or two, a star of the faintest useful kind five or more. Unlike
   sep without deblending, two stars 3 px apart are two candidates.
5. **Moments.** Over the pixels above the threshold within :data:`RADIUS` px
   of each peak to which the filtered image never rises by more than the
   threshold above the lowest value passed on the straight way from the peak
   (a neighbour's hill is left out, as a deblender would; noise on a wing
   is not): the flux and the peak pixel of the image, and the centroid, the
   second moments and the centroid's variance per unit variance of the
   filtered image, as sep measures them (its sizes are ~1.4x the unfiltered
   image's for a small star, and the detection's windows and stamps are
   scaled by them).
6. **Extended light out.** The *prominence* of a peak is how far the
   filtered image falls on the way from it to the window's border, where it
   falls least (its peak less the highest saddle towards the border). A
   peak less prominent than :data:`PROMINENCE` times the threshold is a
   noise bump on extended light (a cloud, a nebula, a horizon's glow) and is
   dropped; sep made one broad object of such light, which the FWHM cut then
   dropped. A star on that light rises above it and stays.

The list is what :func:`skystack.engine.detect.detect_stars` used from sep:
a structured array with sep's field names (``x``, ``y``, ``flux``, ``peak``,
``x2``, ``y2``, ``xy``, ``a``, ``b``, ``errx2``, ``erry2``, ``npix``) and
``prominence``, in raster order of the peak pixels; every star is then measured on the
full-resolution frame (:mod:`skystack.engine.centroid`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from skystack.engine.backend import NATIVE_MIN_ITEMS, array_module, launch, run_cpu, to_host
from skystack.engine.robust import clipped_median_sigma_rows, moving_median

_SRC = "sources.cu"
#: Half-width of a peak's moments window (``SOURCES_R`` of ``kernels/sources.cu``).
RADIUS = 5
#: A box's statistics read every MESH_STEP-th row and column of it: a quarter of a 64 x 64 box is
#: 1024 values, whose median is within 0.04 sigma of the sky (the mesh's other errors are larger),
#: for a quarter of the sorting.
MESH_STEP = 2
#: Least prominence of a source, in units of the threshold (see the module docstring).
PROMINENCE = 0.5
#: Largest number of peaks kept; beyond it the threshold doubles (a frame full of nebulosity).
MAX_PEAKS = 65536
#: The 3 x 3 pyramid (SExtractor's default filter).
PYRAMID = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=np.float32)
#: The catalogue's fields: what the peak_moments kernel writes, then the ones derived on the host.
KERNEL_FIELDS = ("x", "y", "flux", "peak", "x2", "y2", "xy", "errx2", "erry2", "npix", "prominence")
FIELDS = KERNEL_FIELDS + ("a", "b")


@dataclass(frozen=True)
class Mesh:
    """A detection image's background mesh.

    Attributes
    ----------
    back : ndarray of float32
        ``(ny, nx)`` sky level per box, median filtered.
    box : int
        Box size, pixels.
    background : float
        The median of ``back``: the frame's sky.
    rms : ndarray of float32 or None
        ``(ny, nx)`` noise per box of the image less the mesh, median filtered
        (:func:`residual_noise`; None before it).
    noise : float
        The median of ``rms``: the frame's noise (NaN before :func:`residual_noise`).
    """

    back: np.ndarray
    box: int
    background: float
    rms: np.ndarray | None = None
    noise: float = math.nan


def find_sources(lum: Any, *, threshold_sigma: float, min_area: int, box: int,
                 filt: int) -> tuple[np.ndarray | None, float, float, Any]:
    """Background, noise and star candidates of a float32 detection image, where it is.

    Parameters
    ----------
    lum : ndarray (NumPy or CuPy)
        ``(H, W)`` float32 detection image; NaN or inf marks no data.
    threshold_sigma : float
        Detection threshold on the filtered image, in units of the pixels' noise.
    min_area : int
        Fewest pixels above the threshold within 2 px of a peak.
    box, filt : int
        Background box size and the size of the median filter over the mesh.

    Returns
    -------
    (catalogue or None, background, noise, sub)
        The catalogue (:data:`FIELDS`, raster order) is None when the image has no
        sky to measure or nothing above the threshold. ``sub`` is the image less
        its background (no data: 0), where ``lum`` is (None without a mesh).
    """
    mesh = background_mesh(lum, box=box, filt=filt)
    if mesh is None:
        return None, float("nan"), float("nan"), None
    sub = subtract_mesh(lum, mesh)
    mesh = residual_noise(mesh, lum, sub, filt=filt)
    if not (math.isfinite(mesh.noise) and mesh.noise > 0):
        return None, mesh.background, mesh.noise, None
    f = match_filter(sub)
    thr = np.float32(threshold_sigma * mesh.noise)
    for _ in range(4):
        idx, total = find_peaks(f, thr, min_area)
        if total <= MAX_PEAKS:
            break
        thr = np.float32(2.0 * thr)
    if idx.size == 0:
        return None, mesh.background, mesh.noise, sub
    cat = peak_moments(sub, f, idx, thr, var=mesh.noise ** 2)
    cat = cat[(cat["npix"] > 0) & (cat["prominence"] >= PROMINENCE * thr)]
    return (cat if cat.size else None), mesh.background, mesh.noise, sub


# --------------------------------------------------------------------------- mesh


def box_rows(lum: Any, box: int, step: int = 1, *, values: Any = None) -> Any:
    """The image's boxes as rows (row-major boxes), every ``step``-th row and column of each, NaN
    past the image's edges and where ``lum`` is not finite: ``(ny * nx, ceil(box / step) ** 2)``
    float32 where ``lum`` is, of ``values`` (default ``lum``; the same shape) at those pixels."""
    xp = array_module(lum)
    h, w = lum.shape
    ny, nx = -(-h // box), -(-w // box)
    side = -(-box // step)
    src = lum if values is None else values
    out = xp.empty((ny * nx, side * side), dtype=xp.float32)
    args = (src, lum, out, np.int64(h), np.int64(w), np.int64(box), np.int64(step), np.int64(nx), np.int64(ny * nx))
    got = _run("box_rows", out.size, args, lambda: _box_rows_twin(lum, src, box, step), xp, lambda: out)
    return out if got is None else got


def bin2x2(img: Any) -> Any:
    """The mean of each 2x2 block of a ``(..., H, W)`` image (an odd last row or column left out), float32
    where ``img`` is: ``bin2_mean`` for one float32 plane, else its twin's array expressions."""
    xp = array_module(img)
    if img.ndim != 2 or img.dtype != np.float32 or min(img.shape) < 2:
        return _bin2_twin(img)
    h, w = img.shape
    src = xp.ascontiguousarray(img)
    out = xp.empty((h // 2, w // 2), dtype=xp.float32)
    got = _run("bin2_mean", out.size, (src, out, np.int64(h), np.int64(w)), lambda: _bin2_twin(src), xp,
               lambda: out)
    return out if got is None else got


def _bin2_twin(img: Any) -> Any:
    h, w = img.shape[-2] // 2 * 2, img.shape[-1] // 2 * 2
    a = img[..., :h, :w]
    out = a[..., 0::2, 0::2].astype("float32")
    out += a[..., 0::2, 1::2]
    out += a[..., 1::2, 0::2]
    out += a[..., 1::2, 1::2]
    out *= np.float32(0.25)
    return out


def _box_rows_twin(lum: np.ndarray, src: np.ndarray, box: int, step: int) -> np.ndarray:
    h, w = lum.shape
    ny, nx = -(-h // box), -(-w // box)
    padded = np.full((ny * box, nx * box), np.float32(np.nan), dtype=np.float32)
    padded[:h, :w] = np.where(np.isfinite(lum), src, np.float32(np.nan))
    boxes = padded.reshape(ny, box, nx, box)[:, ::step, :, ::step]
    return np.ascontiguousarray(boxes.transpose(0, 2, 1, 3)).reshape(ny * nx, -1)


def background_mesh(lum: Any, *, box: int, filt: int) -> Mesh | None:
    """The image's :class:`Mesh`, its sky only (None when no box has data)."""
    h, w = lum.shape
    ny, nx = -(-h // box), -(-w // box)
    med, _ = clipped_median_sigma_rows(box_rows(lum, box, MESH_STEP), boxes=True)
    good = np.isfinite(med)
    if not good.any():
        return None
    med[~good] = np.median(med[good])
    back = _median_filter_about_plane(med.reshape(ny, nx), filt).astype(np.float32)
    return Mesh(back=back, box=box, background=float(np.median(back)))


def residual_noise(mesh: Mesh, lum: Any, sub: Any, *, filt: int) -> Mesh:
    """``mesh`` with its noise measured on ``sub`` (the image less the interpolated mesh): the
    clipped MAD-sigma of each box, median filtered, and their median (unchanged when no box has
    data).

    A box's own spread includes the sky's gradient across it (a wide lens's vignetting and a
    horizon's glow: a 1e-4 per pixel ramp over 64 px adds as much as the noise); the threshold
    is meant for the noise alone.
    """
    ny, nx = mesh.back.shape
    _, sig = clipped_median_sigma_rows(box_rows(lum, mesh.box, MESH_STEP, values=sub), boxes=True)
    good = np.isfinite(sig)
    if not good.any():
        return mesh
    sig[~good] = np.median(sig[good])
    rms = moving_median(sig.reshape(ny, nx), filt).astype(np.float32)
    return dataclasses.replace(mesh, rms=rms, noise=float(np.median(rms)))


def _median_filter_about_plane(m: np.ndarray, size: int) -> np.ndarray:
    """:func:`robust.moving_median` of the mesh's residual from its least-squares plane, the plane added
    back: an outlying box (a galaxy, a bright star's halo) is replaced as before, and a gradient
    is kept exactly, where a median filter of the mesh itself bends it at the edges."""
    design, solve = _plane_fit(*m.shape)
    plane = (design @ (solve @ m.ravel())).reshape(m.shape)
    return moving_median(m - plane, size) + plane


@functools.lru_cache(maxsize=16)
def _plane_fit(ny: int, nx: int) -> tuple[np.ndarray, np.ndarray]:
    """A ``(ny, nx)`` mesh's plane design ``(ny nx, 3)`` (1, x, y) and its least-squares solver
    (the pseudo-inverse, ``(3, ny nx)``): computed once per mesh size, read-only."""
    yy, xx = np.mgrid[0:ny, 0:nx]
    design = np.column_stack([np.ones(ny * nx), xx.ravel(), yy.ravel()])
    return _read_only(design, np.linalg.pinv(design))


@functools.lru_cache(maxsize=16)
def interpolation_tables(n: int, box: int) -> tuple[np.ndarray, ...]:
    """Linear interpolation tables along one axis of ``n`` pixels cut in boxes: for each pixel two
    neighbouring boxes (int32) and their weights (float32, summing to 1), between box centres, and
    extrapolated from the outer two boxes beyond the outer centres (a gradient runs on to the
    edge); one box: weight 1 on it. Computed once for every frame of a size: read-only arrays."""
    nb = -(-n // box)
    centre = np.array([(i * box + min(n, (i + 1) * box) - 1) / 2.0 for i in range(nb)])
    pos = np.arange(n, dtype=np.float64)
    if nb == 1:
        zero = np.zeros(n, dtype=np.int32)
        return _read_only(zero, zero.copy(), np.ones(n, dtype=np.float32), np.zeros(n, dtype=np.float32))
    i0 = np.clip(np.searchsorted(centre, pos, side="right") - 1, 0, nb - 2)
    t = (pos - centre[i0]) / (centre[i0 + 1] - centre[i0])
    return _read_only(i0.astype(np.int32), (i0 + 1).astype(np.int32), (1.0 - t).astype(np.float32),
                      t.astype(np.float32))


@functools.lru_cache(maxsize=16)
def _tables_on(xp: Any, n: int, box: int) -> tuple[Any, ...]:
    """:func:`interpolation_tables` where ``xp`` computes (a device's copies: sent up once per frame size)."""
    tables = interpolation_tables(n, box)
    return tables if xp is np else tuple(xp.asarray(a) for a in tables)


def _read_only(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """``arrays``, each made read-only (they are shared)."""
    for a in arrays:
        a.setflags(write=False)
    return arrays


# --------------------------------------------------------------------------- pixel kernels


def _run(kernel: str, n_items: int, args: tuple, twin: Any, xp: Any, result: Any,
         min_items: int = NATIVE_MIN_ITEMS) -> Any:
    """``kernel`` over ``n_items`` on the device (``xp`` CuPy: returns None, the outputs are in
    ``args``) or on the host: its native build (``result()`` reads the outputs) or its twin
    (``min_items``: as :func:`run_cpu`'s; a peak is a heavy item)."""
    if xp is not np:
        launch(_SRC, kernel, n_items, args)
        return None

    def native(mod: Any) -> Any:
        mod.launch(kernel, n_items, args)
        return result()

    return run_cpu(_SRC, kernel, n_items, twin, native, min_items=min_items)


def subtract_mesh(lum: Any, mesh: Mesh) -> Any:
    """``lum`` less the mesh interpolated bilinearly (float32, where ``lum`` is); no data becomes 0."""
    xp = array_module(lum)
    h, w = lum.shape
    ix0, ix1, wx0, wx1 = interpolation_tables(w, mesh.box)
    iy0, iy1, wy0, wy1 = interpolation_tables(h, mesh.box)
    lum = xp.ascontiguousarray(lum, dtype=xp.float32)
    sub = xp.empty((h, w), dtype=xp.float32)
    tables = [xp.asarray(mesh.back), *_tables_on(xp, w, mesh.box), *_tables_on(xp, h, mesh.box)]
    args = (lum, *tables, sub, np.int64(h), np.int64(w), np.int64(mesh.back.shape[1]))
    got = _run("mesh_subtract", h * w, args, lambda: _subtract_twin(lum, mesh.back, ix0, ix1, wx0, wx1, iy0, iy1,
                                                                    wy0, wy1), xp, lambda: sub)
    return sub if got is None else got


def _subtract_twin(lum, m, ix0, ix1, wx0, wx1, iy0, iy1, wy0, wy1) -> np.ndarray:
    rows = m[:, ix0] * wx0 + m[:, ix1] * wx1  # (ny, W): t along every mesh row
    back = rows[iy0] * wy0[:, None] + rows[iy1] * wy1[:, None]
    sub = lum - back
    sub[~np.isfinite(lum)] = 0.0
    return sub


def match_filter(sub: Any) -> Any:
    """``sub`` convolved with :data:`PYRAMID` / 16 (float32, pixels off the image left out)."""
    xp = array_module(sub)
    h, w = sub.shape
    f = xp.empty((h, w), dtype=xp.float32)
    got = _run("match_filter", h * w, (sub, f, np.int64(h), np.int64(w)), lambda: _filter_twin(sub), xp,
               lambda: f)
    return f if got is None else got


def _filter_twin(sub: np.ndarray) -> np.ndarray:
    h, w = sub.shape
    p = np.pad(sub, 1)
    acc = np.zeros((h, w), dtype=np.float32)
    for dy in range(3):
        for dx in range(3):
            acc = acc + PYRAMID[dy, dx] * p[dy:dy + h, dx:dx + w]
    return acc * np.float32(0.0625)


def find_peaks(f: Any, thr: np.float32, min_area: int) -> tuple[Any, int]:
    """Flat indices of the peaks of ``f`` in raster order (at most :data:`MAX_PEAKS`, where ``f``
    is) and how many there are."""
    xp = array_module(f)
    h, w = f.shape
    idx = xp.empty(MAX_PEAKS, dtype=xp.int64)
    count = xp.zeros(1, dtype=xp.uint64)
    args = (f, idx, count, np.int64(h), np.int64(w), np.float32(thr), np.int32(min_area), np.int64(MAX_PEAKS))

    def result() -> tuple[np.ndarray, int]:
        total = int(count[0])
        count[0] = 0  # a launch appends: the next (the benchmark runs it twice) starts afresh
        return np.sort(idx[: min(total, MAX_PEAKS)]), total

    got = _run("find_peaks", h * w, args, lambda: _peaks_twin(f, thr, min_area), xp, result)
    if got is not None:
        return got
    total = int(to_host(count)[0])
    return xp.sort(idx[: min(total, MAX_PEAKS)]), total


def _peaks_twin(f: np.ndarray, thr: np.float32, min_area: int) -> tuple[np.ndarray, int]:
    h, w = f.shape
    p = np.pad(f, 2, constant_values=-np.inf)
    over = f > thr
    above = np.zeros((h, w), dtype=np.int32)
    beaten = np.zeros((h, w), dtype=bool)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            u = p[2 + dy:2 + dy + h, 2 + dx:2 + dx + w]
            above += u > thr
            if dy or dx:
                beaten |= (u > f) | ((u == f) & (dy < 0 or (dy == 0 and dx < 0)))
    idx = np.flatnonzero(over & ~beaten & (above >= min_area))
    return idx[:MAX_PEAKS].astype(np.int64), int(idx.size)


# --------------------------------------------------------------------------- moments


def peak_moments(sub: Any, f: Any, idx: Any, thr: np.float32, *, var: float) -> np.ndarray:
    """The catalogue (:data:`FIELDS`, on the host) of the peaks ``idx`` (flat indices, where ``sub`` is)."""
    xp = array_module(sub)
    h, w = sub.shape
    n = int(idx.size)
    out = xp.empty((len(KERNEL_FIELDS), n), dtype=xp.float64)
    args = (sub, f, idx, out, np.int64(n), np.int64(h), np.int64(w), np.float32(thr))
    got = _run("peak_moments", n, args, lambda: _moments_twin(sub, f, idx, thr), xp, lambda: out, min_items=1)
    cols = to_host(out) if got is None else got
    return _catalogue(cols, var)


def _moments_twin(sub: np.ndarray, f: np.ndarray, idx: np.ndarray, thr: np.float32) -> np.ndarray:
    h, w = sub.shape
    r = RADIUS
    sp, fp = np.pad(sub, r), np.pad(f, r, constant_values=-np.inf)
    py, px = idx // w, idx % w
    z = np.zeros(idx.size)
    n, s, sx, sy, sxx, syy, sxy, ux, uy, uxx, uyy, flux = (z.copy() for _ in range(12))
    pk = np.full(idx.size, -np.inf, dtype=np.float32)
    edge = pk.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            fv = fp[py + r + dy, px + r + dx]
            m = (fv > thr) & _downhill(fp, py + r, px + r, dx, dy, thr)
            pix = sp[py + r + dy, px + r + dx]
            wd = np.where(m, fv, np.float32(0.0)).astype(np.float64)  # (off the image f is -inf)
            n = np.where(m, n + 1.0, n)
            s = np.where(m, s + wd, s)
            sx = np.where(m, sx + wd * dx, sx)
            sy = np.where(m, sy + wd * dy, sy)
            sxx = np.where(m, sxx + wd * dx * dx, sxx)
            syy = np.where(m, syy + wd * dy * dy, syy)
            sxy = np.where(m, sxy + wd * dx * dy, sxy)
            ux = np.where(m, ux + dx, ux)
            uy = np.where(m, uy + dy, uy)
            uxx = np.where(m, uxx + float(dx * dx), uxx)
            uyy = np.where(m, uyy + float(dy * dy), uyy)
            flux = np.where(m, flux + pix.astype(np.float64), flux)
            pk = np.where(m & (pix > pk), pix, pk)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if abs(dx) == r or abs(dy) == r:  # off the image f is -inf: its way's lowest too
                low = _path_min(fp, py + r, px + r, dx, dy)
                edge = np.where(low > edge, low, edge)
    ok = s > 0.0
    s1 = np.where(ok, s, 1.0)
    mx, my = sx / s1, sy / s1
    cols = np.array([px + mx, py + my, flux, pk.astype(np.float64), sxx / s1 - mx * mx, syy / s1 - my * my,
                     sxy / s1 - mx * my, (uxx - 2.0 * mx * ux + n * mx * mx) / (s1 * s1),
                     (uyy - 2.0 * my * uy + n * my * my) / (s1 * s1), n])
    cols[:, ~ok] = 0.0
    prominence = np.where(np.isinf(edge), np.inf, fp[py + r, px + r].astype(np.float64) - edge.astype(np.float64))
    return np.vstack([cols, prominence])


def _way(dx: int, dy: int) -> list[tuple[int, int]]:
    """The steps from a peak to the offset ``(dx, dy)``, the kernel's ``src_step`` for k = 1..K."""
    k_steps = max(abs(dx), abs(dy))
    return [((2 * dx * k + k_steps) // (2 * k_steps), (2 * dy * k + k_steps) // (2 * k_steps))
            for k in range(1, k_steps + 1)]


def _downhill(fp: np.ndarray, py: np.ndarray, px: np.ndarray, dx: int, dy: int, rise: np.float32) -> np.ndarray:
    """Whether f (``fp``, padded) never rises more than ``rise`` above the lowest value passed on the
    way from each peak ``(py, px)`` to the offset ``(dx, dy)``: the kernel's ``src_downhill``."""
    ok = np.ones(py.size, dtype=bool)
    lowest = fp[py, px]
    for ox, oy in _way(dx, dy):
        v = fp[py + oy, px + ox]
        ok &= ~(v > lowest + rise)
        lowest = np.minimum(lowest, v)
    return ok


def _path_min(fp: np.ndarray, py: np.ndarray, px: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """The kernel's ``src_path_min``: the lowest f (``fp``, padded) on the way from each peak to the
    offset ``(dx, dy)``."""
    lowest = fp[py, px]
    for ox, oy in _way(dx, dy):
        lowest = np.minimum(lowest, fp[py + oy, px + ox])
    return lowest


def _catalogue(cols: np.ndarray, var: float) -> np.ndarray:
    """The structured catalogue from the kernel's columns: the errors scaled by the pixel variance,
    the ellipse's axes ``a``, ``b`` from the second moments (sep's formula, ``b`` at least that of
    a uniformly lit pixel, 1/12)."""
    cat = np.zeros(cols.shape[1], dtype=[(k, np.float64) for k in FIELDS])
    for k, c in zip(KERNEL_FIELDS, cols):
        cat[k] = c
    cat["errx2"] *= var
    cat["erry2"] *= var
    half = (cat["x2"] + cat["y2"]) / 2.0
    disc = np.sqrt(np.maximum(((cat["x2"] - cat["y2"]) / 2.0) ** 2 + cat["xy"] ** 2, 0.0))
    cat["a"] = np.sqrt(np.maximum(half + disc, 1.0 / 12.0))
    cat["b"] = np.sqrt(np.maximum(half - disc, 1.0 / 12.0))
    return cat
