"""Point-sampled Moffat stamps: the one renderer of stars, trails and landscape lights.

:func:`render_points` sums a stamp per point, each normalised to its flux,
into a colour image or straight into the CFA mosaic; :func:`stamp_radius`
sizes the stamps; :func:`moffat_alpha` converts a FWHM.
"""

from __future__ import annotations

import math

import numpy as np

EPS_ADU = 0.05  # stamps extend until the Moffat wing falls below this (ADU)
RADIUS_BUCKETS = (5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96)
_CHUNK = 1 << 20  # stamp pixels per vectorised chunk
_FLUSH = 1 << 25  # stamp pixels accumulated per bincount


def moffat_alpha(fwhm: float, beta: float) -> float:
    """Moffat core width ``alpha`` for a FWHM: ``fwhm / (2 sqrt(2**(1/beta) - 1))``."""
    return float(fwhm) / (2.0 * math.sqrt(2.0 ** (1.0 / float(beta)) - 1.0))


def cfa_map(pattern: str) -> np.ndarray:
    """2x2 array of channel indices (0=R, 1=G, 2=B) of a Bayer pattern."""
    idx = {"R": 0, "G": 1, "B": 2}
    return np.array([[idx[pattern[0]], idx[pattern[1]]], [idx[pattern[2]], idx[pattern[3]]]], dtype=np.intp)


def stamp_radius(flux_max: np.ndarray, alpha: float, beta: float, extra: np.ndarray | float) -> np.ndarray:
    """Radius where the Moffat wing of the brightest channel falls below :data:`EPS_ADU`."""
    peak = np.maximum(flux_max, 1e-9) * (beta - 1.0) / (math.pi * alpha * alpha)
    r = alpha * np.sqrt(np.maximum((peak / EPS_ADU) ** (1.0 / beta) - 1.0, 0.0))
    r = np.maximum(r, 2.5 * alpha) + extra
    return np.minimum(np.ceil(r), RADIUS_BUCKETS[-1])


class _Bincounter:
    """Sums stamp pixels (flat image index, value per channel) into flat images, one bincount per batch."""

    def __init__(self, nch: int, size: int) -> None:
        self.acc = np.zeros((nch, size), dtype=np.float64)
        self._idx: list[np.ndarray] = []
        self._val: list[list[np.ndarray]] = [[] for _ in range(nch)]
        self._pending = 0

    def add(self, idx: np.ndarray, values: list[np.ndarray]) -> None:
        """Queue pixels ``idx`` with one value array per channel; sum when :data:`_FLUSH` are queued."""
        self._idx.append(idx)
        self._pending += idx.size
        for c, v in enumerate(values):
            self._val[c].append(v)
        if self._pending >= _FLUSH:
            self.flush()

    def flush(self) -> None:
        """Add the queued pixels to the images."""
        if not self._idx:
            return
        allidx = np.concatenate(self._idx)
        size = self.acc.shape[1]
        for c in range(self.acc.shape[0]):
            self.acc[c] += np.bincount(allidx, weights=np.concatenate(self._val[c]), minlength=size)
            self._val[c].clear()
        self._idx.clear()
        self._pending = 0


def _stamp_groups(ix: np.ndarray, iy: np.ndarray, radius: np.ndarray, shape: tuple[int, int]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(bucket index, group key)`` per point: stars that share stamp size, pixel parity (so the same
    CFA layout) and whether the stamp lies wholly inside the image share a key."""
    h, w = shape
    buckets = np.asarray(RADIUS_BUCKETS)
    bidx = np.minimum(np.searchsorted(buckets, radius), len(buckets) - 1)
    rb_all = buckets[bidx]
    interior = (ix - rb_all >= 0) & (ix + rb_all < w) & (iy - rb_all >= 0) & (iy + rb_all < h)
    key = (bidx * 2 + (iy & 1)) * 2 + (ix & 1)
    return bidx, key * 2 + interior


def _moffat_values(rx: np.ndarray, ry: np.ndarray, inv_a2: np.float32, beta: float,
                   elong: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> np.ndarray:
    """``(1 + r^T M^-1 r / alpha^2)^-beta`` at offsets ``(rx, ry)`` from the centres (float32).

    ``elong``: ``(ux, uy, k)`` per stamp for trailed stars (see :func:`render_points`).
    """
    q = rx * rx + ry * ry
    if elong is not None:
        ux, uy, k = elong
        t = ux.astype(np.float32)[:, None, None] * rx + uy.astype(np.float32)[:, None, None] * ry
        q -= k.astype(np.float32)[:, None, None] * (t * t)
    q *= inv_a2
    q += np.float32(1.0)
    ibeta = int(round(beta))
    if abs(beta - ibeta) < 1e-12:  # integer beta: repeated products, much faster than power
        v = np.reciprocal(q, out=q)
        if ibeta > 1:
            t1 = v.copy()
            for _ in range(ibeta - 1):
                v *= t1
        return v
    return np.power(q, np.float32(-beta), out=q)


def render_points(
    shape: tuple[int, int],
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    *,
    alpha: float,
    beta: float,
    radius: np.ndarray,
    ux: np.ndarray | None = None,
    uy: np.ndarray | None = None,
    k: np.ndarray | None = None,
    cmap: np.ndarray | None = None,
) -> np.ndarray:
    """Sum of point-sampled Moffat stamps, each normalised to its flux.

    Each point gets a square stamp of half-size ``radius`` centred on the
    nearest pixel; the profile ``(1 + r^T M^-1 r / alpha^2)^-beta`` is sampled
    at pixel centres and scaled so the whole stamp (including any part off
    the image) sums to the flux. ``flux`` is (n, 3) R, G, B. Elongation along
    the unit vector (ux, uy) uses ``M = I + e^2/alpha^2 u u^T`` given as
    ``k = e^2 / (alpha^2 + e^2)``. Returns the (H, W) mosaic when ``cmap``
    (2x2 channel indices) is given, else (3, H, W); float64.
    """
    h, w = shape
    out_shape = (h, w) if cmap is not None else (3, h, w)
    sums = _Bincounter(1 if cmap is not None else 3, h * w)
    if x.shape[0] == 0:
        return sums.acc.reshape(out_shape)
    ix = np.rint(x).astype(np.int64)
    iy = np.rint(y).astype(np.int64)
    fx = (x - ix).astype(np.float32)
    fy = (y - iy).astype(np.float32)
    inv_a2 = np.float32(1.0 / (alpha * alpha))
    _, key = _stamp_groups(ix, iy, radius, shape)
    flux32 = flux.astype(np.float32)
    for kv in np.unique(key):
        sel_all = np.flatnonzero(key == kv)
        py, px, inner = int(kv // 4 % 2), int(kv // 2 % 2), bool(kv % 2)
        rb = int(RADIUS_BUCKETS[int(kv // 8)])
        s = 2 * rb + 1
        d = np.arange(-rb, rb + 1, dtype=np.int64)
        df = d.astype(np.float32)
        offs = d[:, None] * w + d[None, :]  # (s, s) flat offsets
        masks = None
        if cmap is not None:
            lay = cmap[(py + d)[:, None] & 1, (px + d)[None, :] & 1]  # (s, s) channel per stamp pixel
            masks = [(lay == c).astype(np.float32) for c in range(3)]
        per = max(1, _CHUNK // (s * s))
        for c0 in range(0, sel_all.size, per):
            sel = sel_all[c0:c0 + per]
            rx = df[None, None, :] - fx[sel][:, None, None]  # (m,1,s)
            ry = df[None, :, None] - fy[sel][:, None, None]  # (m,s,1)
            v = _moffat_values(rx, ry, inv_a2, beta, None if k is None else (ux[sel], uy[sel], k[sel]))
            norm = (1.0 / v.sum(axis=(1, 2), dtype=np.float64)).astype(np.float32)
            idx, valid = _stamp_pixels(ix[sel], iy[sel], d, offs, shape, inner)
            f = flux32[sel] * norm[:, None]  # (m, 3) flux per unit profile
            sums.add(idx, _stamp_values(v, f, masks, valid))
    sums.flush()
    return sums.acc.reshape(out_shape)


def _stamp_pixels(ix: np.ndarray, iy: np.ndarray, d: np.ndarray, offs: np.ndarray, shape: tuple[int, int],
                  inner: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Flat image index of every stamp pixel inside the image, and the (m, s, s) inside mask
    (``None`` when every stamp lies wholly inside)."""
    h, w = shape
    idx = (iy * w + ix)[:, None, None] + offs[None]
    if inner:
        return idx.ravel(), None
    X = ix[:, None, None] + d[None, None, :]
    Y = iy[:, None, None] + d[None, :, None]
    valid = (X >= 0) & (X < w) & (Y >= 0) & (Y < h)
    return idx[valid], valid


def _stamp_values(v: np.ndarray, f: np.ndarray, masks: list[np.ndarray] | None, valid: np.ndarray | None
                  ) -> list[np.ndarray]:
    """Per output channel, the stamp pixels' values: profile ``v`` times each stamp's flux ``f``
    (the mosaic: each pixel's own colour through the CFA ``masks``)."""
    if masks is not None:
        wgt = (f[:, 0, None, None] * masks[0] + f[:, 1, None, None] * masks[1]
               + f[:, 2, None, None] * masks[2])
        planes = [v * wgt]
    else:
        planes = [v * f[:, c, None, None] for c in range(3)]
    return [p[valid] if valid is not None else p.ravel() for p in planes]
