"""Debayering: CFA mosaic (H, W) -> colour (3, H, W) float32, channel-first R, G, B.

Methods
-------
``"bilinear"``
    Each missing colour is the mean of the same-colour pixels among the 8
    neighbours (G at R/B: 4 cardinal; R at B and B at R: 4 diagonal; R/B at G:
    the 2 along the row or column that holds that colour). NaN-safe: only
    finite neighbours count, NaN when there are none. At the image border the
    neighbours outside the frame are simply missing.
``"rcd"``
    Ratio Corrected Demosaicing (Luis Sanz Rodríguez, v2.3 structure, as in
    Siril, RawTherapee and darktable): green by ratio-corrected directional
    estimates weighted by a vertical/horizontal discrimination, then R/B from
    colour differences along diagonal (at B/R) and cardinal (at G) directions.
    Two changes for calibrated astro data, documented in the kernels too: no
    clipping to [0, 1] (values may be negative after dark subtraction or above
    1 after flat division), and the low-pass ratio ``2 l0 / (l0 + lk)`` is 1
    where ``l0 + lk <= 0`` and is clamped to ``[0, 2]``, the range it has for
    non-negative data, so that negative sky values cannot blow it up (the
    reference's ``eps = 1e-5`` in that denominator, which would bias faint
    signals in normalised units, is not needed). Neighbours beyond the edge are read
    by mirror reflection about the edge pixel (which keeps the CFA phase), so
    the border needs no special case. An estimate that is not finite (NaN in
    the neighbourhood) falls back to the bilinear value. Needs ``H, W >= 5``
    (smaller mosaics use bilinear).
``"superpixel"``
    Each 2x2 CFA tile becomes one pixel (R, mean of the two greens, B): half
    resolution, no interpolation. Output pixel ``(u, v)`` covers full-resolution
    columns ``2u..2u+1`` and rows ``2v..2v+1``, so its centre is at
    full-resolution ``(2u + 0.5, 2v + 0.5)`` (:data:`SUPERPIXEL_TO_FULL`). An odd
    last row or column is dropped.

White balance: ``wb=(r, g, b)`` multiplies the CFA samples of each colour
*before* interpolation (as dcraw/LibRaw do; RCD's ratios assume a balanced
mosaic). ``wb=None`` leaves the camera's raw colour. The stage decides with its
``apply_wb`` flag and passes ``meta.wb`` or ``None``.

Mono data (``pattern=None``) passes through unchanged as ``(H, W)`` float32.
X-Trans and other non-Bayer mosaics are not demosaiced here: :func:`debayer`
raises, and such files are read already demosaiced by LibRaw.

Every method is a CUDA kernel in ``kernels/debayer.cu`` with its NumPy twin
below; the public :func:`debayer` dispatches on the array type. The twins do
the kernels' float32 operations in the kernels' order (bit-identical results;
the RCD ratio clamp may give ``+0`` for the kernel's ``-0``), organised for
speed on one core: per CFA phase plane, in cache-sized row bands, with only the
sites that need each quantity computed. Everything runs in NumPy's compiled
loops (which release the GIL, so two frames debayer in parallel threads); the
twins start no thread.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from skystack.engine.backend import array_module, is_device_array, launch, run_cpu
from skystack.engine.errors import SkystackError
from skystack.engine.frame import BAYER_PATTERNS

__all__ = [
    "METHODS",
    "SUPERPIXEL_TO_FULL",
    "cfa_colours",
    "cfa_colour_map",
    "pattern_code",
    "debayer",
]

#: Debayer methods :func:`debayer` accepts.
METHODS = ("bilinear", "rcd", "superpixel")

#: Maps super-pixel ``(u, v, 1)`` to full-resolution sensor pixels ``(x, y, 1)``.
SUPERPIXEL_TO_FULL = np.array([[2.0, 0.0, 0.5], [0.0, 2.0, 0.5], [0.0, 0.0, 1.0]])

_SRC = "debayer.cu"
_COLOUR = {"R": 0, "G": 1, "B": 2}
_EPS = np.float32(1e-5)
_EPSSQ = np.float32(1e-10)


# ----------------------------------------------------------------------------- pattern helpers


def _check_pattern(pattern: str) -> str:
    p = str(pattern).upper()
    if p not in BAYER_PATTERNS:
        raise SkystackError(
            f"CFA pattern {pattern!r} is not a Bayer pattern ({', '.join(BAYER_PATTERNS)}); "
            "X-Trans and other mosaics must be read demosaiced by LibRaw"
        )
    return p


def cfa_colours(pattern: str) -> tuple[int, int, int, int]:
    """Colour index (0 = R, 1 = G, 2 = B) of each 2x2 CFA position, row-major.

    Parameters
    ----------
    pattern : str
        One of :data:`skystack.engine.frame.BAYER_PATTERNS`.
    """
    p = _check_pattern(pattern)
    return tuple(_COLOUR[ch] for ch in p)  # type: ignore[return-value]


def pattern_code(pattern: str) -> int:
    """Pack ``pattern`` for the kernels: colour of position k is ``(code >> 2k) & 3``."""
    return int(sum(c << (2 * k) for k, c in enumerate(cfa_colours(pattern))))


def cfa_colour_map(pattern: str, shape: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` int8 array of the colour index (0 R, 1 G, 2 B) of every pixel."""
    h, w = int(shape[0]), int(shape[1])
    tile = np.array(cfa_colours(pattern), dtype=np.int8).reshape(2, 2)
    return np.tile(tile, ((h + 1) // 2, (w + 1) // 2))[:h, :w]


# ----------------------------------------------------------------------------- public op


def debayer(cfa, pattern: str | None, *, method: str = "bilinear",
            wb: tuple[float, float, float] | None = None, out=None):
    """Demosaic a CFA mosaic.

    Parameters
    ----------
    cfa : ndarray (H, W) float32
        Mosaic in normalised units (NumPy, or CuPy to run the CUDA kernels).
    pattern : str or None
        Bayer pattern (``"RGGB"``, ``"BGGR"``, ``"GRBG"``, ``"GBRG"``); None for
        mono data, which is returned unchanged (as float32).
    method : {"bilinear", "rcd", "superpixel"}
        See the module docstring. ``"vng"`` is not provided; ``"rcd"`` is the
        high-quality method.
    wb : tuple of 3 float or None
        White-balance multipliers (R, G, B) applied to the mosaic first.
    out : ndarray, optional
        float32 array of the result's shape on the mosaic's backend to write into
        (a caller's reused buffer: the host's RCD writes straight into it).

    Returns
    -------
    ndarray
        ``(3, H, W)`` float32 (``(3, H // 2, W // 2)`` for super-pixel), or the
        ``(H, W)`` input for mono.
    """
    xp = array_module(cfa)
    if cfa.ndim != 2:
        raise SkystackError(f"debayer needs a 2-D CFA mosaic, got shape {tuple(cfa.shape)}")
    cfa = xp.ascontiguousarray(cfa, dtype=xp.float32)
    if pattern is None:
        return cfa
    code = pattern_code(pattern)
    method = str(method).lower()
    if method not in METHODS:
        raise SkystackError(f"unknown debayer method {method!r}; choose one of {', '.join(METHODS)}")
    h, w = cfa.shape
    if h * w >= 2**31:  # the kernels index pixels with 32-bit integers
        raise SkystackError(f"debayer: a {h}x{w} mosaic has 2^31 pixels or more; split it into tiles")
    if wb is not None:
        cfa = _apply_wb(cfa, code, wb)
    if method == "superpixel":
        res = _superpixel(cfa, code)
    elif method == "rcd" and min(h, w) >= 5:
        res = _rcd(cfa, code, out)
    else:
        res = _bilinear(cfa, code)
    if out is None or res is out:
        return res
    out[...] = res
    return out


# ----------------------------------------------------------------------------- dispatch


def _apply_wb(cfa, code: int, wb) -> object:
    wr, wg, wbb = (np.float32(v) for v in wb)
    if not is_device_array(cfa):
        return _apply_wb_numpy(cfa, code, (wr, wg, wbb))
    xp = array_module(cfa)
    h, w = cfa.shape
    out = xp.empty_like(cfa)
    n = h * w
    launch(_SRC, "debayer_wb_kernel", n, (out, cfa, np.int64(n), np.int32(w), np.int32(code), wr, wg, wbb))
    return out


def _bilinear(cfa, code: int):
    if not is_device_array(cfa):
        c = np.ascontiguousarray(cfa, dtype=np.float32)
        return run_cpu(_SRC, "debayer_bilinear_kernel", c.size, lambda: _bilinear_numpy(c, code),
                       lambda mod: _bilinear_launch(mod.launch, np, c, code))
    return _bilinear_launch(lambda k, n, a: launch(_SRC, k, n, a), array_module(cfa), cfa, code)


def _bilinear_launch(run, xp, cfa, code: int):
    h, w = cfa.shape
    out = xp.empty((3, h, w), dtype=xp.float32)
    run("debayer_bilinear_kernel", h * w, (out, cfa, np.int32(h), np.int32(w), np.int32(code)))
    return out


def _superpixel(cfa, code: int):
    if not is_device_array(cfa):
        return _superpixel_numpy(cfa, code)
    xp = array_module(cfa)
    h, w = cfa.shape
    out = xp.empty((3, h // 2, w // 2), dtype=xp.float32)
    launch(_SRC, "debayer_superpixel_kernel", (h // 2) * (w // 2),
           (out, cfa, np.int32(h), np.int32(w), np.int32(code)))
    return out


def _rcd(cfa, code: int, out=None):
    if not is_device_array(cfa):  # the NumPy twin, or the same kernels built for the host
        c = np.ascontiguousarray(cfa, dtype=np.float32)
        return run_cpu(_SRC, "rcd", c.size, lambda: _rcd_numpy(c, code),
                       lambda mod: _rcd_bands(mod.launch, c, code, out=out))
    return _rcd_launch(lambda k, n, a: launch(_SRC, k, n, a), array_module(cfa), cfa, code)


#: Rows of mosaic around a band that the host's RCD reads (even, so a band starts on the mosaic's
#: phase; its steps reach 10 rows: 3 + 1 for the directions, 1 for their refinement, 2 for green,
#: 3 for red and blue at green sites).
_RCD_HALO = 12

#: Pixels per band of the host's RCD: its seven work planes stay small (and in cache), not seven
#: frames of fresh memory per light.
_RCD_BAND_PX = 1 << 20


def _rcd_bands(run, cfa: np.ndarray, code: int, band_rows: int | None = None, out=None) -> np.ndarray:
    """The RCD kernel sequence on the host, band by band (the whole frame's bits), into ``out`` if given.

    Each band of ``band_rows`` rows runs with :data:`_RCD_HALO` rows of mosaic either side,
    farther than any step reads, so the rows kept do not see the band's own edges.
    """
    h, w = cfa.shape
    rows = band_rows or max(2, (_RCD_BAND_PX // w) & ~1)
    if rows + 2 * _RCD_HALO >= h:
        return _rcd_launch(run, np, cfa, code)
    out = np.empty((3, h, w), dtype=np.float32) if out is None else out
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows)
        a, b = max(0, y0 - _RCD_HALO), min(h, y1 + _RCD_HALO)
        out[:, y0:y1] = _rcd_launch(run, np, cfa[a:b], code)[:, y0 - a:y1 - a]
    return out


def _rcd_launch(run, xp, cfa, code: int):
    """The RCD kernel sequence; ``run(kernel, n_items, args)`` launches one kernel."""
    h, w = cfa.shape
    n = h * w
    H, W, P = np.int32(h), np.int32(w), np.int32(code)
    hv, hh, hp, hq = (xp.empty((h, w), dtype=xp.float32) for _ in range(4))
    run("rcd_hpf_kernel", n, (hv, hh, hp, hq, cfa, H, W))
    vhdir, pqdir, lpf = (xp.empty((h, w), dtype=xp.float32) for _ in range(3))
    run("rcd_dir_kernel", n, (vhdir, pqdir, lpf, hv, hh, hp, hq, cfa, H, W))
    del hv, hh, hp, hq
    out = xp.empty((3, h, w), dtype=xp.float32)
    run("rcd_green_kernel", n, (out, cfa, vhdir, lpf, H, W, P))
    run("rcd_rb_kernel", n, (out, cfa, pqdir, H, W, P))
    run("rcd_rbg_kernel", n, (out, cfa, vhdir, H, W, P))
    return out


# ----------------------------------------------------------------------------- NumPy twins
#
# The twins compute exactly the kernels' float32 operations in the kernels' order
# (the emulated kernels and the twins are compared bit for bit), but organised for
# NumPy: the mosaic is split into its four 2x2 CFA *phase planes* (contiguous
# quarter-size arrays), each site computes only what its phase needs, every
# quantity that the kernels read through mirror reflection is stored padded with
# that reflection, and the work runs over row bands of about _BAND_ELEMS elements
# so that temporaries stay in the CPU cache. Non-finite estimates fall back to the
# bilinear value computed only at those pixels (:func:`_bilinear_points`).

#: Elements per row band of the banded twins (small enough for the L2 cache).
_BAND_ELEMS = 1 << 16

#: The 8 neighbours in the kernels' row-major order.
_NEIGH8 = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


def _phase_colours(code: int) -> list[int]:
    """Colour of CFA phase ``k = (y & 1) << 1 | (x & 1)``."""
    return [(code >> (2 * k)) & 3 for k in range(4)]


def _apply_wb_numpy(cfa: np.ndarray, code: int, wb: tuple) -> np.ndarray:
    """Twin of ``debayer_wb_kernel``: each sample times its colour's multiplier."""
    mult = [np.float32(v) for v in wb]
    cols = _phase_colours(code)
    out = np.empty(cfa.shape, dtype=np.float32)
    for k in range(4):
        py, px = k >> 1, k & 1
        np.multiply(cfa[py::2, px::2], mult[cols[k]], out=out[py::2, px::2])
    return out


def _bilinear_points(cfa: np.ndarray, code: int, ys: np.ndarray, xs: np.ndarray, c: int) -> np.ndarray:
    """``db_bilinear_at`` for channel ``c`` at the pixels ``(ys, xs)`` (any number, any order)."""
    h, w = cfa.shape
    cols = np.array(_phase_colours(code), dtype=np.int8)
    ys = np.asarray(ys, dtype=np.intp)
    xs = np.asarray(xs, dtype=np.intp)
    s = np.zeros(ys.shape, dtype=np.float32)
    n = np.zeros(ys.shape, dtype=np.int32)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        for dy, dx in _NEIGH8:
            yy, xx = ys + dy, xs + dx
            v = cfa[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)]
            ok = ((yy >= 0) & (yy < h) & (xx >= 0) & (xx < w) & (cols[((yy & 1) << 1) | (xx & 1)] == c)
                  & np.isfinite(v))
            s = np.where(ok, s + v, s)
            n += ok
        est = np.where(n > 0, s / n.astype(np.float32), np.float32(np.nan))
    own = cols[((ys & 1) << 1) | (xs & 1)] == c
    return np.where(own, cfa[ys, xs], est).astype(np.float32, copy=False)


def _bilinear_numpy(cfa: np.ndarray, code: int) -> np.ndarray:
    """Twin of ``debayer_bilinear_kernel`` (and of ``db_bilinear_at``).

    Per CFA phase and missing colour the estimate is the sum of the 2 or 4
    same-colour neighbours in row-major order times 1/2 or 1/4 (exactly the
    kernel's ``s / n`` for a power of two), read from NaN-padded phase planes.
    Where that is not finite (a non-finite or out-of-frame neighbour) the
    pixel is recomputed with the kernel's per-neighbour rule.
    """
    h, w = cfa.shape
    out = np.empty((3, h, w), dtype=np.float32)
    if h == 0 or w == 0:
        return out
    f = _Field(h, w)
    for k in range(4):
        f.planes[k][...] = np.nan
        f.inner(k)[...] = cfa[k >> 1::2, k & 1::2]
    cols = _phase_colours(code)
    p = _Field.P
    with np.errstate(invalid="ignore", over="ignore"):
        for k in range(4):
            py, px = k >> 1, k & 1
            hp, wp = _plane_shape(h, w, k)
            if hp == 0 or wp == 0:
                continue
            own = cols[k]
            out[own, py::2, px::2] = cfa[py::2, px::2]
            for c in range(3):
                if c == own:
                    continue
                nb = [(dy, dx) for dy, dx in _NEIGH8 if cols[(((py + dy) & 1) << 1) | ((px + dx) & 1)] == c]
                scale = np.float32(1.0 / len(nb))
                dst = out[c, py::2, px::2]
                for y0, y1 in _bands(hp, f.S):
                    s = f.at(k, *nb[0], y0, y1) + f.at(k, *nb[1], y0, y1)
                    for dy, dx in nb[2:]:
                        s += f.at(k, dy, dx, y0, y1)
                    s *= scale
                    dst[y0:y1] = s.reshape(-1, f.S)[:, p:p + wp]
    ys, xs = _redo_pixels(cfa)
    for c in range(3):
        out[c, ys, xs] = _bilinear_points(cfa, code, ys, xs, c)
    return out


def _redo_pixels(cfa: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pixels with a neighbour outside the frame or not finite (row-major order)."""
    h, w = cfa.shape
    ys, xs = np.nonzero(~np.isfinite(cfa))
    if ys.size > cfa.size // 64:
        m = np.zeros((h, w), dtype=bool)
        m[0, :] = m[-1, :] = True
        m[:, 0] = m[:, -1] = True
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                m[np.clip(ys + dy, 0, h - 1), np.clip(xs + dx, 0, w - 1)] = True
        return np.nonzero(m)
    parts = [np.arange(w), (h - 1) * w + np.arange(w), np.arange(h) * w, np.arange(h) * w + (w - 1)]
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            parts.append(np.clip(ys + dy, 0, h - 1) * w + np.clip(xs + dx, 0, w - 1))
    flat = np.unique(np.concatenate(parts))
    return flat // w, flat % w


def _superpixel_numpy(cfa: np.ndarray, code: int) -> np.ndarray:
    """Twin of ``debayer_superpixel_kernel``."""
    h2, w2 = cfa.shape[0] // 2, cfa.shape[1] // 2
    q = cfa[: 2 * h2, : 2 * w2]
    planes = [q[k >> 1::2, k & 1::2] for k in range(4)]
    cols = [(code >> (2 * k)) & 3 for k in range(4)]
    r = planes[cols.index(0)]
    b = planes[cols.index(2)]
    gi = [k for k in range(4) if cols[k] == 1]
    g1, g2 = planes[gi[0]], planes[gi[1]]
    f1, f2 = np.isfinite(g1), np.isfinite(g2)
    with np.errstate(invalid="ignore", over="ignore"):
        g = np.where(f1 & f2, (g1 + g2) * np.float32(0.5), np.where(f1, g1, g2))
    return np.stack([r, g, b]).astype(np.float32, copy=False)


# ----------------------------------------------------------------------------- RCD twin


def _reflect_index(i: np.ndarray, n: int) -> np.ndarray:
    """``db_reflect`` (one mirror about each edge pixel), clipped for cells never read."""
    i = np.where(i < 0, -i, i)
    i = np.where(i >= n, 2 * (n - 1) - i, i)
    return np.clip(i, 0, n - 1)


class _Field:
    """A full-resolution ``(H, W)`` quantity stored as its CFA phase planes.

    Phase ``k = py << 1 | px`` holds the sites ``(py::2, px::2)``. Every plane
    has the same padded shape ``(rows, S)`` (the larger phase's size plus
    :attr:`P` cells on each side) and is stored flat, so that the value at
    ``(y + dy, x + dx)`` for a run of sites is a *contiguous* slice of some
    plane at a fixed offset (NumPy is several times faster on contiguous
    operands than on 2-D views). Work on whole padded rows computes junk in the
    padding columns; :meth:`fill` then writes the padding with the values the
    kernels read through ``db_reflect``.
    """

    P = 3

    def __init__(self, h: int, w: int, phases=range(4), *, empty: bool = False):
        self.h, self.w = h, w
        self.rows = (h + 1) // 2 + 2 * self.P
        self.S = (w + 1) // 2 + 2 * self.P
        self.planes: dict[int, np.ndarray] = {}
        if not empty:  # one buffer (large enough for NumPy's huge-page advice)
            phases = list(phases)
            buf = np.empty((len(phases), self.rows * self.S), dtype=np.float32)
            for i, k in enumerate(phases):
                self.planes[k] = buf[i]

    def at(self, k: int, dy: int, dx: int, y0: int, y1: int) -> np.ndarray:
        """Flat values at ``(y + dy, x + dx)`` for the sites of phase ``k`` in plane rows ``[y0, y1)``."""
        py, px = k >> 1, k & 1
        qy, qx = (py + dy) & 1, (px + dx) & 1
        off = ((py + dy - qy) >> 1) * self.S + ((px + dx - qx) >> 1)
        b = (self.P + y0) * self.S + off
        return self.planes[(qy << 1) | qx][b:b + (y1 - y0) * self.S]

    def band(self, k: int, y0: int, y1: int) -> np.ndarray:
        """Writable flat rows ``[y0, y1)`` of phase ``k`` (padding columns included)."""
        return self.planes[k][(self.P + y0) * self.S:(self.P + y1) * self.S]

    def inner(self, k: int) -> np.ndarray:
        """2-D view of the sites of phase ``k``."""
        hp, wp = _plane_shape(self.h, self.w, k)
        return self.planes[k].reshape(self.rows, self.S)[self.P:self.P + hp, self.P:self.P + wp]

    def fill(self) -> None:
        p = self.P
        for k, flat in self.planes.items():
            a = flat.reshape(self.rows, self.S)
            py, px = k >> 1, k & 1
            hp, wp = _plane_shape(self.h, self.w, k)
            for axis, n_full, par, n_plane, size in ((0, self.h, py, hp, self.rows), (1, self.w, px, wp, self.S)):
                dst = np.r_[0:p, p + n_plane:size]
                src = p + (_reflect_index(2 * (dst - p) + par, n_full) - par) // 2
                if axis == 0:
                    a[dst] = a[src]
                else:
                    a[:, dst] = a[:, src]


def _plane_shape(h: int, w: int, k: int) -> tuple[int, int]:
    return (h - (k >> 1) + 1) >> 1, (w - (k & 1) + 1) >> 1


def _bands(n_rows: int, width: int):
    step = max(1, _BAND_ELEMS // max(width, 1))
    for y0 in range(0, n_rows, step):
        yield y0, min(n_rows, y0 + step)


def _fallback(est: np.ndarray, f: _Field, cfa: np.ndarray, code: int, k: int, y0: int, c: int) -> None:
    """Replace the non-finite estimates of a flat band (sites only) by the bilinear value, in place."""
    wp = _plane_shape(f.h, f.w, k)[1]
    sites = est.reshape(-1, f.S)[:, f.P:f.P + wp]
    fin = np.isfinite(sites)
    if not fin.all():
        ys, xs = np.nonzero(~fin)
        sites[ys, xs] = _bilinear_points(cfa, code, 2 * (ys + y0) + (k >> 1), 2 * xs + (k & 1), c)


def _select(cond: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``np.where(cond, a, b)`` for float32 by bit masks (NumPy's ``where`` branches: slow on noise)."""
    m = cond.view(np.int8).astype(np.int32)
    np.negative(m, out=m)
    bi = b.view(np.int32)
    r = np.bitwise_xor(a.view(np.int32), bi)
    r &= m
    r ^= bi
    return r.view(np.float32)


def _disc(f: _Field, k: int, y0: int, y1: int) -> np.ndarray:
    """Twin of ``rcd_disc`` at the sites of phase ``k`` (rows ``[y0, y1)``)."""
    central = f.at(k, 0, 0, y0, y1)
    neigh = (((f.at(k, -1, -1, y0, y1) + f.at(k, -1, 1, y0, y1)) + f.at(k, 1, -1, y0, y1))
             + f.at(k, 1, 1, y0, y1))
    neigh *= np.float32(0.25)
    half = np.float32(0.5)
    a = np.subtract(half, central)
    np.abs(a, out=a)
    b = np.subtract(half, neigh)
    np.abs(b, out=b)
    return _select(a < b, neigh, central)


def _rcd_ratio(l0: np.ndarray, l02: np.ndarray, lk: np.ndarray) -> np.ndarray:
    """Twin of ``rcd_ratio`` (``l02 = l0 + l0``).

    The clamp to ``[0, 2]`` may give ``+0`` where the kernel keeps ``-0``: a
    ratio of zero only ever multiplies, so no other value can differ.
    """
    den = l0 + lk
    r = np.divide(l02, den)
    pos = den > 0
    if not pos.all():
        r = _select(pos, r, np.full_like(r, 1.0))
    return np.clip(r, np.float32(0.0), np.float32(2.0), out=r)


def _absdiff(f: _Field, dy: int, dx: int, phases) -> _Field:
    """``|f(y, x) - f(y + dy, x + dx)|`` on the whole padded planes of ``phases``.

    It equals every kernel term ``fabsf(a - b)`` whose two reads are that pair
    (in either order: ``|a - b|`` and ``|b - a|`` are the same float), reflection
    included, since the padding already holds the reflected values. The last
    cells, whose partner lies beyond the plane, are NaN (never read).
    """
    d = _Field(f.h, f.w, empty=True)
    phases = list(phases)
    buf = np.empty((len(phases), f.rows * f.S), dtype=np.float32)
    for i, k in enumerate(phases):
        py, px = k >> 1, k & 1
        qy, qx = (py + dy) & 1, (px + dx) & 1
        off = ((py + dy - qy) >> 1) * f.S + ((px + dx - qx) >> 1)
        a, b = f.planes[k], f.planes[(qy << 1) | qx]
        dk = buf[i]
        lo, hi = max(0, -off), a.size - max(0, off)
        dk[:lo] = np.nan
        dk[hi:] = np.nan
        np.abs(np.subtract(a[lo:hi], b[lo + off:hi + off], out=dk[lo:hi]), out=dk[lo:hi])
        d.planes[k] = dk
    return d


def _hpf2(c, sy: int, sx: int) -> np.ndarray:
    """Twin of ``rcd_hpf2``; ``c(dy, dx)`` gives the shifted CFA."""
    t = c(-3 * sy, -3 * sx) - c(-sy, -sx)
    t -= c(sy, sx)
    t += c(3 * sy, 3 * sx)
    u = c(-2 * sy, -2 * sx) + c(2 * sy, 2 * sx)
    u *= np.float32(3.0)
    t -= u
    np.multiply(c(0, 0), np.float32(6.0), out=u)
    t += u
    t *= t
    return t


def _rcd_numpy(cfa: np.ndarray, code: int) -> np.ndarray:
    """Twin of the RCD kernel sequence (hpf, dir, green, rb, rbg); needs ``H, W >= 5``."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return _rcd_numpy_body(np.ascontiguousarray(cfa, dtype=np.float32), code)


def _blend(a: np.ndarray, wa: np.ndarray, b: np.ndarray, wb: np.ndarray) -> np.ndarray:
    """``(a * wa + b * wb) / (wa + wb)``, in place: RCD's blend of two directional estimates,
    each weighted by the other direction's gradient (``a``, ``b`` and ``wa`` are overwritten)."""
    a *= wa
    b *= wb
    a += b
    wa += wb
    return np.divide(a, wa, out=a)


def _mix_directions(disc: np.ndarray, first: tuple[np.ndarray, ...], second: tuple[np.ndarray, ...]
                    ) -> np.ndarray:
    """``f + disc * (s - f)``, in place in ``disc``, where ``f`` and ``s`` are the :func:`_blend`
    of the ``(a, wa, b, wb)`` in ``first`` and in ``second`` (one per direction pair, e.g. vertical
    and horizontal) and ``disc`` the local discrimination between them."""
    f = _blend(*first)
    s = _blend(*second)
    s -= f
    disc *= s
    disc += f
    return disc


def _grad_sum(eps: np.float32, k: int, y0: int, y1: int, *terms: tuple[Any, int, int]) -> np.ndarray:
    """``eps`` plus the gradient fields ``d`` read at ``(dy, dx)`` for each ``(d, dy, dx)`` of ``terms``,
    summed in order, on rows ``y0:y1`` of phase ``k`` (the kernels' sums, term for term)."""
    (d, dy, dx), *rest = terms
    g = eps + d.at(k, dy, dx, y0, y1)
    for d, dy, dx in rest:
        g += d.at(k, dy, dx, y0, y1)
    return g


def _rcd_numpy_body(cfa: np.ndarray, code: int) -> np.ndarray:
    f32 = np.float32
    eps, epssq = _EPS, _EPSSQ
    h, w = cfa.shape
    cols = _phase_colours(code)
    gph = [k for k in range(4) if cols[k] == 1]   # green phases
    nph = [k for k in range(4) if cols[k] != 1]   # red and blue phases
    S = _Field(h, w, empty=True).S

    def bands(k):
        return _bands(_plane_shape(h, w, k)[0], S)

    C = _Field(h, w)
    for k in range(4):
        C.inner(k)[...] = cfa[k >> 1::2, k & 1::2]
    C.fill()

    # Step 1.1: squared high-passes (rcd_hpf_kernel); P/Q only where they are read (R/B sites)
    HV, HH = _Field(h, w), _Field(h, w)
    HP, HQ = _Field(h, w, nph), _Field(h, w, nph)
    for k in range(4):
        for y0, y1 in bands(k):
            def c(dy, dx):
                return C.at(k, dy, dx, y0, y1)
            HV.band(k, y0, y1)[...] = _hpf2(c, 1, 0)
            HH.band(k, y0, y1)[...] = _hpf2(c, 0, 1)
            if k in nph:
                HP.band(k, y0, y1)[...] = _hpf2(c, 1, 1)
                HQ.band(k, y0, y1)[...] = _hpf2(c, 1, -1)
    for f in (HV, HH, HP, HQ):
        f.fill()

    # Step 1.2 + 2: directions and low-pass (rcd_dir_kernel); PQ and LPF only at R/B sites
    VH = _Field(h, w)
    PQ, LP = _Field(h, w, nph), _Field(h, w, nph)
    for k in range(4):
        for y0, y1 in bands(k):
            vs = HV.at(k, -1, 0, y0, y1) + HV.at(k, 0, 0, y0, y1)
            vs += HV.at(k, 1, 0, y0, y1)
            np.fmax(epssq, vs, out=vs)
            hs = HH.at(k, 0, -1, y0, y1) + HH.at(k, 0, 0, y0, y1)
            hs += HH.at(k, 0, 1, y0, y1)
            np.fmax(epssq, hs, out=hs)
            hs += vs
            np.divide(vs, hs, out=VH.band(k, y0, y1))
            if k in nph:
                ps = HP.at(k, -1, -1, y0, y1) + HP.at(k, 0, 0, y0, y1)
                ps += HP.at(k, 1, 1, y0, y1)
                np.fmax(epssq, ps, out=ps)
                qs = HQ.at(k, -1, 1, y0, y1) + HQ.at(k, 0, 0, y0, y1)
                qs += HQ.at(k, 1, -1, y0, y1)
                np.fmax(epssq, qs, out=qs)
                qs += ps
                np.divide(ps, qs, out=PQ.band(k, y0, y1))

                def c(dy, dx):
                    return C.at(k, dy, dx, y0, y1)
                card = c(-1, 0) + c(1, 0)
                card += c(0, -1)
                card += c(0, 1)
                card *= f32(0.5)
                card += c(0, 0)
                diag = c(-1, -1) + c(-1, 1)
                diag += c(1, -1)
                diag += c(1, 1)
                diag *= f32(0.25)
                np.add(card, diag, out=LP.band(k, y0, y1))
    del HV, HH, HP, HQ
    for f in (VH, PQ, LP):
        f.fill()

    # Step 3: green at R/B sites (rcd_green_kernel). The gradient terms are
    # |c(y) - c(y + 2)| (vertical) and |c(x) - c(x + 2)| (horizontal) at shifts.
    DV, DH = _absdiff(C, 2, 0, range(4)), _absdiff(C, 0, 2, range(4))
    G = _Field(h, w)
    for k in gph:
        G.planes[k][...] = C.planes[k]
    for k in nph:
        for y0, y1 in bands(k):
            def c(dy, dx):
                return C.at(k, dy, dx, y0, y1)

            def lp(dy, dx):
                return LP.at(k, dy, dx, y0, y1)

            def grad(d, dy, dx, a, b, cc):
                g = eps + d.at(k, dy, dx, y0, y1)
                g += d.at(k, dy * a, dx * a, y0, y1)
                g += d.at(k, dy * b, dx * b, y0, y1)
                g += d.at(k, dy * cc, dx * cc, y0, y1)
                return g
            ng = grad(DV, -1, 0, 2, 3, 4)    # DV(-1) + DV(-2) + DV(-3) + DV(-4)
            sg = grad(DV, -1, 0, 0, -1, -2)  # DV(-1) + DV(0) + DV(1) + DV(2)
            wg = grad(DH, 0, -1, 2, 3, 4)
            eg = grad(DH, 0, -1, 0, -1, -2)
            l0 = lp(0, 0)
            l02 = l0 + l0
            ne = c(-1, 0) * _rcd_ratio(l0, l02, lp(-2, 0))
            se = c(1, 0) * _rcd_ratio(l0, l02, lp(2, 0))
            we = c(0, -1) * _rcd_ratio(l0, l02, lp(0, -2))
            ee = c(0, 1) * _rcd_ratio(l0, l02, lp(0, 2))
            g = _mix_directions(_disc(VH, k, y0, y1), (ne, sg, se, ng), (we, eg, ee, wg))
            _fallback(g, G, cfa, code, k, y0, 1)
            G.band(k, y0, y1)[...] = g
    G.fill()
    LP = DV = DH = None  # freed (not del: the band closures read LP)

    # Step 4.2: red at blue sites and blue at red sites (rcd_rb_kernel); diagonal
    # gradient terms |f(y, x) - f(y + 2, x +- 2)| of the CFA and of green.
    DP, DQ = _absdiff(C, 2, 2, nph), _absdiff(C, 2, -2, nph)
    DGP, DGQ = _absdiff(G, 2, 2, nph), _absdiff(G, 2, -2, nph)
    X = {0: _Field(h, w, nph), 2: _Field(h, w, nph)}
    for k in nph:
        own, oth = cols[k], 2 - cols[k]
        X[own].planes[k][...] = C.planes[k]
        for y0, y1 in bands(k):
            def c(dy, dx):
                return C.at(k, dy, dx, y0, y1)

            def gs(dy, dx):
                return G.at(k, dy, dx, y0, y1)
            nw_g = _grad_sum(eps, k, y0, y1, (DP, -1, -1), (DP, -3, -3), (DGP, -2, -2))
            ne_g = _grad_sum(eps, k, y0, y1, (DQ, -1, 1), (DQ, -3, 3), (DGQ, -2, 2))
            sw_g = _grad_sum(eps, k, y0, y1, (DQ, -1, 1), (DQ, 1, -1), (DGQ, 0, 0))
            se_g = _grad_sum(eps, k, y0, y1, (DP, -1, -1), (DP, 1, 1), (DGP, 0, 0))
            nw_e = c(-1, -1) - gs(-1, -1)
            ne_e = c(-1, 1) - gs(-1, 1)
            sw_e = c(1, -1) - gs(1, -1)
            se_e = c(1, 1) - gs(1, 1)
            v = _mix_directions(_disc(PQ, k, y0, y1), (se_e, nw_g, nw_e, se_g), (sw_e, ne_g, ne_e, sw_g))
            v += gs(0, 0)  # g0 + (...): addition commutes exactly
            _fallback(v, G, cfa, code, k, y0, oth)
            X[oth].band(k, y0, y1)[...] = v
    X[0].fill()
    X[2].fill()
    del PQ, DP, DQ, DGP, DGQ

    # Step 4.3: red and blue at green sites (rcd_rbg_kernel)
    out = np.empty((3, h, w), dtype=np.float32)
    DGV, DGH = _absdiff(G, 2, 0, gph), _absdiff(G, 0, 2, gph)
    for ch in (0, 2):
        DXV, DXH = _absdiff(X[ch], 2, 0, nph), _absdiff(X[ch], 0, 2, nph)
        for k in gph:
            py, px = k >> 1, k & 1
            hp, wp = _plane_shape(h, w, k)
            for y0, y1 in bands(k):
                def gs(dy, dx):
                    return G.at(k, dy, dx, y0, y1)

                def xs(dy, dx):
                    return X[ch].at(k, dy, dx, y0, y1)
                ng = _grad_sum(eps, k, y0, y1, (DGV, -2, 0), (DXV, -1, 0), (DXV, -3, 0))
                sg = _grad_sum(eps, k, y0, y1, (DGV, 0, 0), (DXV, -1, 0), (DXV, 1, 0))
                wg = _grad_sum(eps, k, y0, y1, (DGH, 0, -2), (DXH, 0, -1), (DXH, 0, -3))
                eg = _grad_sum(eps, k, y0, y1, (DGH, 0, 0), (DXH, 0, -1), (DXH, 0, 1))
                ne = xs(-1, 0) - gs(-1, 0)
                se = xs(1, 0) - gs(1, 0)
                we = xs(0, -1) - gs(0, -1)
                ee = xs(0, 1) - gs(0, 1)
                v = _mix_directions(_disc(VH, k, y0, y1), (se, ng, ne, sg), (we, eg, ee, wg))
                v += gs(0, 0)
                _fallback(v, G, cfa, code, k, y0, ch)
                out[ch, py::2, px::2][y0:y1] = v.reshape(-1, S)[:, _Field.P:_Field.P + wp]

    # assemble: green everywhere, R/B at their own and the opposite sites
    for k in range(4):
        py, px = k >> 1, k & 1
        out[1, py::2, px::2] = G.inner(k)
        if k in nph:
            out[0, py::2, px::2] = X[0].inner(k)
            out[2, py::2, px::2] = X[2].inner(k)
    return out
