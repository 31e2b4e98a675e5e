"""Measurements of a stacked image against the simulator's truth (tests and benchmarks).

Independent of the pipeline's own code: float64 NumPy/SciPy only. Positions
come from :class:`~skystack.tools.synth.SynthTruth` in the reference light's
sensor pixels, which is the stack's grid for ``--framing reference``.

* :func:`fit_star`: elliptical Gaussian least-squares fit of one source
  (FWHM = 2.3548 sqrt(sx sy), elongation = major / minor axis);
* :func:`star_regions`: those fits for isolated, unsaturated truth stars,
  grouped by ninths of the frame (centre, corners);
* :func:`sky_noise`: robust sigma of the high-passed luminance in star-free sky;
* :func:`edge_width`: 10-90 % width of the house's roof ridge (tripod scene);
* :func:`union_sky_coverage`: share of the sky seen by any frame that has data in a canvas.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from skystack.engine.robust import mad_sigma

_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))


def fit_star(lum: np.ndarray, x: float, y: float, r: int = 6) -> dict[str, float] | None:
    """Elliptical Gaussian + constant fitted to the ``(2r+1)^2`` stamp at ``(x, y)``; None if it fails."""
    from scipy.optimize import least_squares

    h, w = lum.shape
    ix, iy = int(round(x)), int(round(y))
    if ix - r < 0 or iy - r < 0 or ix + r >= w or iy + r >= h:
        return None
    st = lum[iy - r:iy + r + 1, ix - r:ix + r + 1]
    if not np.all(np.isfinite(st)):
        return None
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1].astype(np.float64)
    bg0 = float(np.median(np.concatenate([st[0], st[-1], st[:, 0], st[:, -1]])))
    a0 = float(st.max() - bg0)
    if not a0 > 0:
        return None

    def model(p):
        a, x0, y0, sx, sy, th, bg = p
        c, s = math.cos(th), math.sin(th)
        u = (xx - x0) * c + (yy - y0) * s
        v = -(xx - x0) * s + (yy - y0) * c
        return a * np.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2)) + bg

    p0 = [a0, x - ix, y - iy, 1.2, 1.2, 0.0, bg0]
    lo = [0.0, -3.0, -3.0, 0.3, 0.3, -math.pi, -np.inf]
    hi = [np.inf, 3.0, 3.0, 8.0, 8.0, math.pi, np.inf]
    try:
        sol = least_squares(lambda p: (model(p) - st).ravel(), p0, bounds=(lo, hi))
    except ValueError:
        return None
    a, x0, y0, sx, sy, th, bg = sol.x
    if not sol.success:
        return None
    return {"x": ix + x0, "y": iy + y0, "fwhm": _FWHM * math.sqrt(sx * sy),
            "elongation": max(sx, sy) / min(sx, sy), "amp": a, "bg": bg}


def isolated_stars(truth, ref_index: int, shape: tuple[int, int], *, flux_range: tuple[float, float],
                   margin: int = 12, min_sep: float = 10.0, avoid: np.ndarray | None = None,
                   avoid_px: float = 20.0) -> np.ndarray:
    """``(N, 2)`` reference positions of truth stars in a G-flux range with no comparable neighbour.

    ``avoid`` is a bool mask (e.g. the landscape): stars within ``avoid_px`` of it are left out.
    """
    from scipy.ndimage import distance_transform_edt
    from scipy.spatial import cKDTree

    xy = truth.project_stars(ref_index)
    g = truth.stars.flux[:, 1]
    fin = np.isfinite(xy).all(axis=1)
    h, w = shape
    inside = fin & (xy[:, 0] >= margin) & (xy[:, 0] < w - margin) & (xy[:, 1] >= margin) & (xy[:, 1] < h - margin)
    vis = np.flatnonzero(fin)
    tree = cKDTree(xy[vis])
    sel = []
    for k in np.flatnonzero(inside & (g >= flux_range[0]) & (g <= flux_range[1])):
        nb = tree.query_ball_point(xy[k], min_sep)
        if all(vis[j] == k or g[vis[j]] < 0.05 * g[k] for j in nb):
            sel.append(k)
    pts = xy[sel]
    if avoid is not None and avoid.any() and len(pts):
        d = distance_transform_edt(~avoid)
        ii = np.clip(np.rint(pts).astype(int), 0, [w - 1, h - 1])
        pts = pts[d[ii[:, 1], ii[:, 0]] > avoid_px]
    return pts


def star_regions(lum: np.ndarray, pts: np.ndarray) -> dict[str, Any]:
    """Gaussian fits of the stars at ``pts``: median FWHM and elongation of the centre and corner ninths."""
    h, w = lum.shape
    fits = [f for f in (fit_star(lum, x, y) for x, y in pts) if f is not None]
    cx = np.array([min(2, int(3 * f["x"] / w)) for f in fits])
    cy = np.array([min(2, int(3 * f["y"] / h)) for f in fits])
    fw = np.array([f["fwhm"] for f in fits])
    el = np.array([f["elongation"] for f in fits])
    centre = (cx == 1) & (cy == 1)
    corner = (cx != 1) & (cy != 1)
    return {"n_centre": int(centre.sum()), "n_corner": int(corner.sum()),
            "fwhm_centre": float(np.median(fw[centre])) if centre.any() else float("nan"),
            "fwhm_corner": float(np.median(fw[corner])) if corner.any() else float("nan"),
            "elong_centre": float(np.median(el[centre])) if centre.any() else float("nan"),
            "elong_corner": float(np.median(el[corner])) if corner.any() else float("nan"),
            "fwhm_all": float(np.median(fw)) if len(fw) else float("nan")}


def sky_noise(lum: np.ndarray, sky: np.ndarray) -> float:
    """Robust sigma (1.4826 MAD) of the luminance minus its 9x9 median, over the ``sky`` mask."""
    from scipy.ndimage import median_filter

    fill = np.where(np.isfinite(lum), lum, np.nanmedian(lum))
    r = (lum - median_filter(fill, size=9, mode="nearest"))[sky & np.isfinite(lum)]
    return mad_sigma(r)


def star_free_sky(truth, ref_index: int, shape: tuple[int, int], landscape: np.ndarray | None = None,
                  *, flux_floor: float = 30.0) -> np.ndarray:
    """Bool mask of reference pixels away from every truth star brighter than ``flux_floor`` (G, ADU)
    and more than 10 px from the landscape and the borders."""
    from scipy.ndimage import distance_transform_edt

    h, w = shape
    m = np.ones(shape, dtype=bool)
    xy = truth.project_stars(ref_index)
    g = truth.stars.flux[:, 1]
    ok = np.isfinite(xy).all(axis=1) & (g > flux_floor)
    yy, xx = np.mgrid[0:h, 0:w]
    for (x, y), f in zip(xy[ok], g[ok]):
        r = 3.0 + 2.0 * math.log10(max(f, 10.0))
        if -r <= x < w + r and -r <= y < h + r:
            y0, y1 = max(0, int(y - r)), min(h, int(y + r) + 2)
            x0, x1 = max(0, int(x - r)), min(w, int(x + r) + 2)
            m[y0:y1, x0:x1] &= (xx[y0:y1, x0:x1] - x) ** 2 + (yy[y0:y1, x0:x1] - y) ** 2 > r * r
    if landscape is not None and landscape.any():
        m &= distance_transform_edt(~landscape) > 10
    m[:10], m[-10:], m[:, :10], m[:, -10:] = False, False, False, False
    return m


def edge_width(lum: np.ndarray, house: dict[str, float], *, half: int = 8) -> float:
    """Median over the ridge's columns of the 10-90 % width (px) of the sky-to-roof step."""
    widths = []
    y0 = int(round(house["ridge_y"]))
    for x in range(int(house["ridge_x0"]) + 3, int(house["ridge_x1"]) - 2):
        prof = lum[y0 - half:y0 + half + 1, x]
        if prof.size != 2 * half + 1 or not np.all(np.isfinite(prof)):
            continue
        top, bot = prof[:3].mean(), prof[-3:].mean()
        if abs(top - bot) <= 0:
            continue
        f = (prof - bot) / (top - bot)  # 1 = sky, 0 = roof
        ys = np.arange(prof.size, dtype=np.float64)
        y10, y90 = _crossing(f, ys, 0.1), _crossing(f, ys, 0.9)
        if y10 is not None and y90 is not None:
            widths.append(abs(y10 - y90))
    return float(np.median(widths)) if widths else float("nan")


def _crossing(f: np.ndarray, ys: np.ndarray, level: float) -> float | None:
    """Position where the falling profile ``f`` crosses ``level`` (the crossing nearest the middle)."""
    idx = np.flatnonzero((f[:-1] >= level) & (f[1:] < level))
    if idx.size == 0:
        return None
    mid = len(f) / 2.0
    i = int(idx[np.argmin(np.abs(idx - mid))])
    return float(ys[i] + (f[i] - level) / (f[i] - f[i + 1]))


def union_sky_coverage(truth, ref_index: int, coverage: np.ndarray, origin: tuple[float, float],
                       step: int = 8) -> float:
    """Share of the sky seen by any light that has data in a canvas.

    Every light's sky (grid points ``step`` px apart, off the landscape) is
    mapped exactly into the reference frame and shifted by ``origin`` (where
    the reference's (0, 0) lies in the canvas); the union of those points, on
    ``step``-px cells, is the sky seen. A cell counts as covered when one of
    its points lands on a pixel with coverage > 0.
    """
    from skystack.engine.match import transform_points

    h, w = truth.shape
    land = truth.horizon_mask()
    yy, xx = np.mgrid[step // 2:h:step, step // 2:w:step]
    keep = ~land[yy, xx]
    pts = np.column_stack([xx[keep], yy[keep]]).astype(np.float64)
    lens = truth.lens
    inv_ref = np.linalg.inv(truth.lights[ref_index].transform)
    seen: dict[tuple[int, int], bool] = {}
    for lt in truth.lights:
        q = lens.distort(transform_points(inv_ref @ lt.transform, lens.undistort(pts))) + np.asarray(origin)
        q = q[np.isfinite(q).all(axis=1)]
        ix, iy = np.rint(q[:, 0]).astype(int), np.rint(q[:, 1]).astype(int)
        ok = (ix >= 0) & (ix < coverage.shape[1]) & (iy >= 0) & (iy < coverage.shape[0])
        cov = np.zeros(len(q), dtype=bool)
        cov[ok] = coverage[iy[ok], ix[ok]] > 0
        for cell, c in zip(zip((q[:, 0] // step).astype(int), (q[:, 1] // step).astype(int)), cov):
            seen[cell] = seen.get(cell, False) or bool(c)
    return sum(seen.values()) / len(seen) if seen else float("nan")
