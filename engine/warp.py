"""Warping: resample a calibrated frame into the reference grid.

:func:`warp` is an *operation*: NumPy arrays run the vectorised twin
:func:`_warp_numpy`, CuPy arrays the CUDA kernels of ``kernels/warp.cu``
(``warp_lanczos3``, ``warp_bilinear``), with the same rules:

* For each reference pixel ``p = (x, y)`` the source position is
  ``q = inv(T) (x, y, 1)`` (homogeneous division included), ``T`` being the
  frame->reference transform of :mod:`skystack.engine.match`.
* **No data is NaN, never zero.** The output is NaN where the nearest source
  pixel ``(floor(u + 0.5), floor(v + 0.5))`` is outside the frame, i.e. where
  ``q`` is outside ``[-0.5, W - 0.5) x [-0.5, H - 0.5)`` (the frame's pixel
  footprint), or where that nearest pixel is NaN.
* Otherwise the value is ``sum(w s) / sum(w)`` over the kernel taps that are
  inside the frame and not NaN (Lanczos-3: 6x6 taps, separable
  ``w(t) = sinc(t) sinc(t / 3)``; bilinear: 2x2). Dropping the taps beyond the
  edge (or on NaN pixels) and renormalising keeps flat fields flat to the very
  edge and keeps isolated NaN (dead/cosmic-masked) pixels from spreading.
* Values are surface brightness (interpolated, not multiplied by the
  Jacobian): a frame at scale 1 keeps its total flux (Lanczos-3 to well
  within 0.5 % for band-limited data); a rescaled frame keeps its sky level.

All arithmetic is float32 in the same order in both implementations, and no
transcendental function is involved, so the twin and the kernel agree bit for
bit (the GPU up to its flushing of subnormals): coordinates
``((m0*x + m1*y) + m2) / ((m6*x + m7*y) + m8)``; Lanczos-3 weights in closed
form per axis (:func:`_lanczos3_weights`: six weights from two polynomial
sines, times a factor common to the six that cancels in the normalised sum);
Lanczos-3 sums separable (per tap row ``j``: ``h = sum_k wx[k] s`` and
``hw = sum_k wx[k]`` over its valid taps, then ``acc += wy[j] h``,
``wsum += wy[j] hw``), bilinear sums ``w = wy[j] wx[k]`` j-major, k-minor.

The twin puts almost all of a frame through compiled loops that release the
GIL (NumPy ufuncs and SciPy's sparse matrix-vector product, see
:func:`_fast_taps`), so two frames warp in parallel threads; it starts no
thread itself.
"""

from __future__ import annotations

import functools
import sys

import numpy as np

from skystack.engine.backend import array_module, is_device_array, launch, run_cpu

METHODS = ("lanczos3", "bilinear")
_KERNELS = {"lanczos3": "warp_lanczos3", "bilinear": "warp_bilinear"}


def inverse_coeffs(transform: np.ndarray) -> np.ndarray:
    """The 9 float32 coefficients of ``inv(transform)`` that the warp uses (row-major).

    The inverse is computed in float64 and scaled so that its ``[2, 2]`` entry is 1.
    """
    t = np.asarray(transform, dtype=np.float64)
    if t.shape != (3, 3) or not np.all(np.isfinite(t)):
        raise ValueError(f"transform must be a finite 3x3 matrix, got {t!r}")
    inv = np.linalg.inv(t)
    if abs(inv[2, 2]) > 1e-12:
        inv = inv / inv[2, 2]
    return inv.ravel().astype(np.float32)


#: Coefficients of ``warp_sin_over_x`` (the same float32 literals as the kernel).
_SINC_C = tuple(np.float32(c) for c in ("2.7013241e-06", "-0.00019837552", "0.008333325", "-0.16666667"))


def _sinc_poly(x: np.ndarray) -> np.ndarray:
    """Twin of ``warp_sin_over_x``: ``sin(x) / x`` on ``[0, pi/3]`` (float32 polynomial, 1 at 0)."""
    z = np.multiply(x, x)
    p = np.multiply(z, _SINC_C[0])
    for c in _SINC_C[1:]:
        p += c
        p *= z
    p += np.float32(1.0)
    return p


def _lanczos3_weights(f: np.ndarray, g: np.ndarray, out) -> None:
    """Twin of ``warp_lanczos3_weights``: the six scaled Lanczos-3 weights of one axis.

    ``f = u - floor(u)`` and ``g = (floor(u) + 1) - u`` (float32, ``f + g = 1``);
    ``out`` is six float32 arrays (or views) of ``f``'s shape that receive the
    weights of the taps at offsets ``f + 2 - k`` (k = 0..5). They are exact
    Lanczos-3 weights times ``pi f g / sin(pi f)``, a factor common to the six
    that cancels in ``sum(w s) / sum(w)``, from two sines of arguments in
    ``[0, pi/3]``; the same float32 operations in the same order as the kernel.
    """
    f32 = np.float32
    a = np.multiply(f, f32(1.04719755))
    b = np.multiply(g, f32(1.04719755))
    pa = _sinc_poly(a)
    pb = _sinc_poly(b)
    sa = a
    sa *= pa
    sb = b
    sb *= pb
    cb = np.multiply(sb, sb)
    np.subtract(f32(1.0), cb, out=cb)
    np.sqrt(cb, out=cb)                   # cos b
    cb *= f32(-0.866025404)
    kn = np.multiply(sb, f32(-0.5))
    kn += cb                              # -sin(b + pi/3)
    kk = np.multiply(f, f32(0.954929659))
    kk *= g                               # (3/pi) f g
    kn *= kk
    d = np.add(f, f32(2.0))
    d *= d
    np.multiply(kk, sb, out=cb)
    np.divide(cb, d, out=out[0])
    np.add(f, f32(1.0), out=d)
    d *= d
    np.divide(kn, d, out=out[1])
    np.multiply(g, pa, out=out[2])
    np.multiply(f, pb, out=out[3])
    np.add(g, f32(1.0), out=d)
    d *= d
    np.divide(kn, d, out=out[4])
    np.add(g, f32(2.0), out=d)
    d *= d
    kk *= sa
    np.divide(kk, d, out=out[5])


def _source_coords(m, x: np.ndarray, y: np.ndarray, lens=None):
    """``u, v`` (float32) of the output pixels ``(x, y)``: the kernel's expression and order.

    For an affine ``m`` (``m6 = m7 = 0``, ``m8 = 1``) the denominator is exactly 1
    and the division is skipped (dividing by 1 changes nothing). ``lens`` is
    ``(ocx, ocy, scx, scy, 1 / r_norm^2, k1, k2)`` float32 or None: the output
    pixel is undistorted about ``oc`` before ``m`` and the result distorted about
    ``sc`` (``warp_source``, the same operations in the same order).
    """
    m0, m1, m2, m3, m4, m5, m6, m7, m8 = m
    if lens is not None and (lens[5] != 0 or lens[6] != 0):
        x, y = _undistort_grid(lens, x, y)
    u = (m0 * x + m1 * y) + m2
    v = (m3 * x + m4 * y) + m5
    if not (m6 == 0 and m7 == 0 and m8 == 1):
        den = (m6 * x + m7 * y) + m8
        u /= den
        v /= den
    if lens is not None and (lens[5] != 0 or lens[6] != 0):
        _, _, cx, cy, inv_r2, k1, k2 = lens
        dx = u - cx
        dy = v - cy
        r2 = dx * dx + dy * dy
        r2 *= inv_r2
        fac = k2 * r2
        fac += k1
        fac *= r2
        fac += np.float32(1.0)
        dx *= fac
        dy *= fac
        u = dx + cx
        v = dy + cy
    return u, v


def _undistort_grid(lens, x: np.ndarray, y: np.ndarray):
    """Twin of ``warp_source``'s undistortion of the output pixels (6 float32 Newton steps)."""
    ocx, ocy, _, _, inv_r2, k1, k2 = lens
    f32 = np.float32
    x, y = np.broadcast_arrays(np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.float32))
    ex = x - ocx
    ey = y - ocy
    q = ex * ex + ey * ey
    q *= inv_r2
    kq = k1 * q
    k2q = q * q
    k2q *= k2
    s = np.ones_like(q)
    for _ in range(6):
        s2 = s * s
        g = k2q * s2
        g += kq
        g *= s2
        g += f32(1.0)
        g *= s
        g -= f32(1.0)
        gp = f32(5.0) * k2q
        gp *= s2
        gp += f32(3.0) * kq
        gp *= s2
        gp += f32(1.0)
        g /= gp
        s = s - g
    ex *= s
    ey *= s
    return ex + ocx, ey + ocy


def _axis_weights(method: str, u: np.ndarray, fu0: np.ndarray) -> list[np.ndarray]:
    """The tap weights of one axis (a list of ``taps`` arrays) at positions ``u`` (``fu0 = floor(u)``)."""
    f = u - fu0
    if method == "bilinear":
        return [np.float32(1.0) - f, f]
    w = [np.empty_like(f) for _ in range(6)]
    _lanczos3_weights(f, (fu0 + np.float32(1.0)) - u, w)
    return w


def _warp_exact(flat: np.ndarray, hs: int, ws: int, m, method: str, x: np.ndarray, y: np.ndarray,
                channels, lens=None) -> np.ndarray:
    """The kernel's per-tap rules at the pixels ``(x, y)``, for ``channels`` (a list of plane indices).

    Vectorised over the pixels, with every tap outside the frame or on a NaN
    sample dropped as in the kernel; used near the frame's edges and around NaN.
    Returns ``(len(channels), len(x))`` float32 (NaN where the nearest source
    pixel is outside the frame or NaN).
    """
    f32 = np.float32
    taps, first = (6, -2) if method == "lanczos3" else (2, 0)
    res = np.full((len(channels), x.size), np.nan, dtype=np.float32)
    u, v = _source_coords(m, x, y, lens)
    nu, nv = np.floor(u + f32(0.5)), np.floor(v + f32(0.5))
    inside = (nu >= 0) & (nu < f32(ws)) & (nv >= 0) & (nv < f32(hs))
    sel = np.flatnonzero(inside)
    if sel.size == 0:
        return res
    u, v, nu, nv = u[sel], v[sel], nu[sel], nv[sel]
    fu0, fv0 = np.floor(u), np.floor(v)
    iu, iv = fu0.astype(np.int64), fv0.astype(np.int64)
    cidx = nv.astype(np.int64) * ws + nu.astype(np.int64)
    wx = _axis_weights(method, u, fu0)
    wy = _axis_weights(method, v, fv0)
    xx = [iu + (first + k) for k in range(taps)]
    yy = [iv + (first + k) for k in range(taps)]
    okx = [(a >= 0) & (a < ws) for a in xx]
    oky = [(a >= 0) & (a < hs) for a in yy]
    xc = [np.clip(a, 0, ws - 1) for a in xx]
    yc = [np.clip(a, 0, hs - 1) * ws for a in yy]
    zero = f32(0.0)
    for n, ch in enumerate(channels):
        plane = flat[ch]
        # a NaN nearest sample makes the output NaN: only the others need their taps
        live = np.flatnonzero(~np.isnan(plane.take(cidx)))
        if live.size == 0:
            continue
        pick = (lambda a: a[live]) if live.size < sel.size else (lambda a: a)  # noqa: E731
        lwx, lwy = [pick(a) for a in wx], [pick(a) for a in wy]
        lxc, lyc = [pick(a) for a in xc], [pick(a) for a in yc]
        lokx, loky = [pick(a) for a in okx], [pick(a) for a in oky]
        acc = np.zeros(live.size, dtype=np.float32)
        wsum = np.zeros(live.size, dtype=np.float32)
        if method == "lanczos3":
            for j in range(taps):
                h = np.zeros(live.size, dtype=np.float32)
                hw = np.zeros(live.size, dtype=np.float32)
                for k in range(taps):
                    val = plane.take(lyc[j] + lxc[k])
                    ok = loky[j] & lokx[k] & ~np.isnan(val)
                    h += np.where(ok, lwx[k] * val, zero)  # an inf sample times 0 is NaN, as in the kernel
                    hw += np.where(ok, lwx[k], zero)
                acc += lwy[j] * h
                wsum += lwy[j] * hw
        else:
            for j in range(taps):
                for k in range(taps):
                    val = plane.take(lyc[j] + lxc[k])
                    ok = loky[j] & lokx[k] & ~np.isnan(val)
                    wt = lwy[j] * lwx[k]
                    acc += np.where(ok, wt * val, zero)
                    wsum += np.where(ok, wt, zero)
        res[n, sel[live]] = acc / wsum
    return res


def _row_taps(plane_tail: np.ndarray, indptr: np.ndarray, idx: np.ndarray, data: np.ndarray,
              out: np.ndarray) -> None:
    """``out[i] = sum_k data[i, k] * plane_tail[idx[i, k]]``, k ascending, float32 (a CSR product).

    SciPy's compiled ``csr_matvec`` runs this loop (releasing the GIL) and adds
    in exactly that order, starting from 0; ``idx`` must lie inside ``plane_tail``.
    """
    n = out.size
    matvec = _csr_matvec() if _csr_matvec is not None else None
    if matvec is not None:
        out.fill(0.0)
        matvec(n, plane_tail.size, indptr, idx, data, plane_tail, out)
    else:  # SciPy without the private module: the same loop through the public API
        from scipy.sparse import csr_matrix

        out[...] = csr_matrix((data, idx, indptr), shape=(n, plane_tail.size)) @ plane_tail


_LITTLE_ENDIAN = sys.byteorder == "little"


@functools.lru_cache(maxsize=None)
def _csr_matvec():
    """The loop behind ``csr_matrix @ vector``, without a matrix object per call (None when this
    SciPy lacks the private module). Imported at first use: ``scipy.sparse`` takes ~0.15 s to import,
    and only the NumPy twin needs it."""
    try:
        from scipy.sparse._sparsetools import csr_matvec
    except ImportError:  # pragma: no cover
        return None
    return csr_matvec


def _warp_numpy(src: np.ndarray, m: np.ndarray, out: np.ndarray, method: str,
                chunk_pixels: int = 1 << 16, lens=None) -> None:
    """NumPy twin of ``warp_lanczos3`` / ``warp_bilinear``.

    ``src``: ``(C, Hs, Ws)`` float32; ``m``: 9 float32 inverse coefficients;
    ``out``: ``(C, Ho, Wo)`` float32, written in place. Works over bands of
    about ``chunk_pixels`` output pixels. Pixels whose taps all lie inside the
    frame take the fast path (:func:`_fast_taps`: compiled sparse-matrix
    products and vectorised float32 operations, the kernel's additions in the
    kernel's order). The others (near or beyond the frame's edges), and, when
    the frame holds NaN, those whose fast result is NaN, are redone afterwards
    in one batch by :func:`_warp_exact` with the kernel's per-tap rules.
    """
    c_n, hs, ws = src.shape
    _, ho, wo = out.shape
    mf = tuple(np.float32(v) for v in m)
    flat = src.reshape(c_n, -1)
    has_nan = bool(np.isnan(src).any())
    lanczos = method == "lanczos3"
    taps, first = (6, -2) if lanczos else (2, 0)
    last = taps + first - 1
    f32 = np.float32
    # whole output rows when an output row maps to a nearly horizontal source row
    # (small rotations, 180 degrees), else tiles about _TILE_W wide, so that the
    # source pixels a band reads stay compact (in cache) whatever the rotation
    tw = wo if (wo <= 3 * _TILE_W // 2 or abs(float(mf[3])) * wo <= _TILE_W / 4) else _TILE_W
    th = max(1, chunk_pixels // tw)
    xs = np.arange(wo, dtype=np.float32)
    itype = np.int32 if hs * ws < 2**31 - 8 * (ws + 1) else np.int64  # CSR index type
    out2 = out.reshape(c_n, -1)
    slow_all: list[np.ndarray] = []
    redo: list[list[np.ndarray]] = [[] for _ in range(c_n)]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for y0 in range(0, ho, th):
            y1 = min(ho, y0 + th)
            ys = np.arange(y0, y1, dtype=np.float32)[:, None]
            for x0 in range(0, wo, tw):
                x1 = min(wo, x0 + tw)
                u, v = _source_coords(mf, xs[None, x0:x1], ys, lens)
                u, v = u.ravel(), v.ravel()
                fu0, fv0 = np.floor(u), np.floor(v)
                iu, iv = fu0.astype(itype), fv0.astype(itype)
                ok = iu >= -first
                ok &= iu < ws - last
                ok &= iv >= -first
                ok &= iv < hs - last
                gu = gv = None
                if lanczos:  # g = (floor(u) + 1) - u, before u becomes f = u - floor(u)
                    gu = fu0 + f32(1.0)
                    gu -= u
                    gv = fv0 + f32(1.0)
                    gv -= v
                u -= fu0
                v -= fv0
                tile = out[:, y0:y1, x0:x1]

                def flat_index(i):  # tile-local flat index -> index in out2
                    return (i // (x1 - x0) + y0) * wo + (i % (x1 - x0) + x0)
                n_ok = int(np.count_nonzero(ok))
                fast = None
                if n_ok < ok.size:
                    slow_all.append(flat_index(np.flatnonzero(~ok)))
                    if n_ok == 0:
                        continue
                    if n_ok < ok.size // 2:  # mostly off the frame: compress
                        fast = np.flatnonzero(ok)
                        u, v, iu, iv = u[fast], v[fast], iu[fast], iv[fast]
                        if lanczos:
                            gu, gv = gu[fast], gv[fast]
                res = _fast_taps(flat, hs, ws, method, u, gu, v, gv, iu, iv)
                if fast is None:  # the few pixels that are not ok are overwritten afterwards
                    tile[...] = res.reshape(tile.shape)
                else:
                    out2[:, flat_index(fast)] = res
                if has_nan:  # centre NaN -> NaN; a NaN among the taps -> the per-tap rules
                    for ch in range(c_n):
                        isn = np.isnan(res[ch])
                        if fast is None:
                            isn &= ok
                        bad = np.flatnonzero(isn)
                        if bad.size:
                            redo[ch].append(flat_index(bad if fast is None else fast[bad]))
        if slow_all:
            _exact_into(out2, flat, hs, ws, mf, method, wo, np.concatenate(slow_all), range(c_n), lens=lens)
        for ch in range(c_n):
            if redo[ch]:
                _exact_into(out2, flat, hs, ws, mf, method, wo, np.concatenate(redo[ch]), [ch], lens=lens)


#: Width of the output tiles of the NumPy twin (narrow outputs use whole rows).
_TILE_W = 256


def _exact_into(out2: np.ndarray, flat: np.ndarray, hs: int, ws: int, mf, method: str, wo: int,
                pix: np.ndarray, channels, batch: int = 1 << 16, lens=None) -> None:
    """Write :func:`_warp_exact` at the flat output pixels ``pix`` into ``out2`` (in batches)."""
    channels = list(channels)
    for b in range(0, pix.size, batch):
        p = pix[b:b + batch]
        res = _warp_exact(flat, hs, ws, mf, method, (p % wo).astype(np.float32),
                          (p // wo).astype(np.float32), channels, lens)
        for n, ch in enumerate(channels):
            out2[ch, p] = res[n]


def _fast_taps(flat: np.ndarray, hs: int, ws: int, method: str, fu: np.ndarray, gu, fv: np.ndarray, gv,
               iu: np.ndarray, iv: np.ndarray) -> np.ndarray:
    """The kernel's result for pixels whose taps all lie inside the frame: ``(C, n)`` float32.

    ``fu = u - floor(u)``, ``gu = (floor(u) + 1) - u`` (Lanczos only) and
    ``iu = floor(u)`` (integer), same for ``v``. The gathers and multiply-adds
    over the taps (36 per pixel and channel for Lanczos-3: most of the work)
    run as sparse-matrix-times-vector products in SciPy's compiled CSR loop,
    one CSR row of weights and source indices per pixel; everything else is
    NumPy ufuncs on contiguous arrays. Pixels with taps outside the frame get
    junk (their indices are clamped into the frame, for memory safety only).
    """
    c_n = flat.shape[0]
    n = fu.size
    f32 = np.float32
    itype = iu.dtype.type
    res = np.empty((c_n, n), dtype=np.float32)
    if method == "bilinear":  # one CSR row of 4 taps per pixel, w = wy[j] * wx[k], j-major
        wx = [f32(1.0) - fu, fu]
        wy = [f32(1.0) - fv, fv]
        data = np.empty((n, 4), dtype=np.float32)
        idx = np.empty((n, 4), dtype=itype)
        base = iv * itype(ws)
        base += iu
        np.clip(base, 0, max(0, hs * ws - ws - 2), out=base)
        for j in range(2):
            for k in range(2):
                np.multiply(wy[j], wx[k], out=data[:, 2 * j + k])
                np.add(base, itype(j * ws + k), out=idx[:, 2 * j + k])
        wsum = data[:, 0] + data[:, 1]
        wsum += data[:, 2]
        wsum += data[:, 3]
        indptr = np.arange(0, 4 * n + 1, 4, dtype=itype)
        data, idx = data.ravel(), idx.ravel()
        for ch in range(c_n):
            _row_taps(flat[ch], indptr, idx, data, res[ch])
            res[ch] /= wsum
        return res
    # Lanczos-3: per tap row j one CSR product h_j = sum_k wx[k] s (6 taps per pixel),
    # reading plane[(iv - 2 + j) * ws:] with the column indices of the first row
    taps = 6
    wxt = np.empty((n, taps), dtype=np.float32)     # CSR data: row i = the x weights of pixel i
    _lanczos3_weights(fu, gu, [wxt[:, k] for k in range(taps)])
    wy = np.empty((taps, n), dtype=np.float32)
    _lanczos3_weights(fv, gv, list(wy))
    base = iv - itype(2)
    base *= itype(ws)
    base += iu
    base -= itype(2)
    np.clip(base, 0, max(0, hs * ws - 5 * ws - 6), out=base)
    idx = np.empty((n, taps), dtype=itype)
    if _LITTLE_ENDIAN and itype is np.int32:  # idx[i, k] = base[i] + k, as 3 int64 pairs (k, k + 1)
        pairs = idx.view(np.int64)
        b64 = base.astype(np.int64)
        b64 *= np.int64(0x100000001)
        for q in range(3):
            np.add(b64, np.int64(2 * q + ((2 * q + 1) << 32)), out=pairs[:, q])
    else:  # pragma: no cover
        for k in range(taps):
            np.add(base, itype(k), out=idx[:, k])
    idx = idx.ravel()
    data = wxt.ravel()
    indptr = np.arange(0, taps * n + 1, taps, dtype=itype)
    # the kernel's hw of a full tap row (k ascending), then wsum = sum_j wy[j] hw
    sx = wxt[:, 0].copy()
    for k in range(1, taps):
        sx += wxt[:, k]
    wsum = wy[0] * sx
    t = np.empty(n, dtype=np.float32)
    for j in range(1, taps):
        np.multiply(wy[j], sx, out=t)
        wsum += t
    h = sx  # reuse
    for ch in range(c_n):
        plane = flat[ch]
        acc = res[ch]
        for j in range(taps):
            _row_taps(plane[j * ws:], indptr, idx, data, h)
            if j == 0:
                np.multiply(wy[0], h, out=acc)
            else:
                h *= wy[j]
                acc += h
        acc /= wsum
    return res


def warp(image, transform: np.ndarray, out_shape: tuple[int, int], *, method: str = "lanczos3",
         out=None, lens=None, lens_offset: tuple[float, float] = (0.0, 0.0)):
    """Resample ``image`` into the reference grid.

    Parameters
    ----------
    image : ndarray (NumPy or CuPy)
        ``(H, W)`` or ``(C, H, W)`` frame (converted to float32). NaN = no data.
    transform : ndarray, shape (3, 3)
        Frame pixel -> reference pixel (see :mod:`skystack.engine.match`).
    out_shape : tuple of int
        ``(H_ref, W_ref)`` of the reference grid.
    method : str
        ``"lanczos3"`` (default) or ``"bilinear"``.
    out : ndarray, optional
        float32 C-contiguous array of the output shape (``(H_ref, W_ref)`` or
        ``(C, H_ref, W_ref)``, same backend as ``image``) to write into.
    lens : RadialLens, optional
        The session's lens (:mod:`skystack.engine.lens`): ``transform`` then
        maps ideal frame pixels to ideal output pixels, the output grid is in
        recorded (distorted) pixels like the frame, and each output pixel
        ``p`` samples the frame at ``distort(inv(transform) undistort(p))``.
        None or an identity lens: no distortion.
    lens_offset : (float, float)
        Where the lens centre's frame lies in the output grid: the output is
        undistorted about ``(cx + ox, cy + oy)`` (a canvas shifted by the
        framing; ``transform`` then includes the same shift).

    Returns
    -------
    ndarray of float32
        The warped frame (``out`` when given), NaN where the frame has no data.
    """
    if method not in METHODS:
        raise ValueError(f"unknown interpolation {method!r}; choose one of {', '.join(METHODS)}")
    xp = array_module(image)
    img = xp.asarray(image)
    if img.ndim not in (2, 3):
        raise ValueError(f"expected a (H, W) or (C, H, W) image, got shape {img.shape}")
    src = xp.ascontiguousarray(img.reshape((1,) + img.shape) if img.ndim == 2 else img, dtype=xp.float32)
    ho, wo = int(out_shape[0]), int(out_shape[1])
    full_shape = (ho, wo) if img.ndim == 2 else (src.shape[0], ho, wo)
    if out is None:
        out = xp.empty(full_shape, dtype=xp.float32)
    elif (tuple(out.shape) != full_shape or out.dtype != np.float32 or not out.flags.c_contiguous
          or is_device_array(out) != is_device_array(img)):
        raise ValueError(f"out must be a C-contiguous float32 array of shape {full_shape} "
                         "on the same backend as the image")
    m = inverse_coeffs(transform)
    lp = lens.kernel_params(lens_offset) if lens is not None and not lens.is_identity else None
    dst = out.reshape((src.shape[0], ho, wo))
    if ho == 0 or wo == 0:
        return out
    n = ho * wo
    args = (src, dst, np.int64(n), np.int32(src.shape[0]), np.int32(src.shape[1]), np.int32(src.shape[2]),
            np.int32(wo), *[np.float32(v) for v in m], *(lp or (np.float32(0.0),) * 7))
    if not is_device_array(src):
        run_cpu("warp.cu", _KERNELS[method], n, lambda: _warp_numpy(src, m, dst, method, lens=lp),
                lambda mod: mod.launch(_KERNELS[method], n, args))
        return out
    launch("warp.cu", _KERNELS[method], n, args)
    return out
