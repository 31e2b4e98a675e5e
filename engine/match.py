"""Star matching: triangle invariants, RANSAC and least-squares refinement.

:func:`match_stars` finds the transform that maps a frame's stars onto the
reference's stars, with no assumption about rotation (any angle, 180 degrees
included), scale (within :attr:`MatchConfig.scale_range`) or translation
(any size; only the overlap has to hold enough stars):

1. **Triangles** (the astroalign / Groth approach). Each of the ``n`` brightest
   stars forms triangles with its nearest neighbours. A triangle's shape is
   described by two numbers that do not change under rotation, translation,
   scale or mirroring: its side lengths divided by its longest side,
   ``(s_short / s_long, s_mid / s_long)``. Vertices are labelled by the side
   they face, so two triangles with equal invariants also give three point
   correspondences.
2. **Candidate pairs**. A k-d tree over the reference's invariants returns
   every frame triangle's look-alikes within :attr:`MatchConfig.invariant_tol`.
3. **RANSAC**. Each pair gives a similarity transform (3-point least squares);
   pairs whose three points do not fit (mirror images, mislabelled vertices)
   or whose scale is out of range are dropped. The rest are scored by how many
   of the frame's stars land within :attr:`MatchConfig.ransac_threshold_px` of
   a reference star. The best count must beat chance: with the reference's
   star density, a random transform puts ``mu`` stars near a reference star
   by luck and the triangle's own 3 stars always fit, so at least
   ``3 + mu + 5 sqrt(mu) + 3`` (and ``min_inliers``) are needed. If no hypothesis is good enough, more stars are used.
4. **Refinement**. Every star of both lists is re-associated (one-to-one
   nearest neighbour within the threshold) under the current transform, the model
   (similarity, affine or homography) is fitted by weighted least squares on
   *all* those inliers, outliers are clipped at 5 sigma, and this repeats until
   the inlier set is stable. Weights are ``1 / (err_frame^2 + err_ref^2 + 0.02^2)``
   when centroid errors are known (:class:`~skystack.engine.detect.StarList`),
   uniform otherwise.

Transforms are 3x3 float64 matrices mapping a frame's ``(x, y, 1)`` (full-resolution
pixels, (0, 0) = centre of the top-left pixel, x right, y down) to reference pixels.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from skystack.engine.errors import NotEnoughStars, RegistrationError
from skystack.engine.neighbours import PointIndex

MODELS = ("similarity", "affine", "homography")
_MIN_POINTS = {"similarity": 2, "affine": 3, "homography": 4}
#: Floor added (in quadrature) to every centroid error when weighting, px.
ERR_FLOOR_PX = 0.02


@dataclass(frozen=True, kw_only=True)
class MatchConfig:
    """Settings of :func:`match_stars`.

    Attributes
    ----------
    model : str
        ``"similarity"`` (rotation, uniform scale, translation; the default),
        ``"affine"`` or ``"homography"``.
    n_brightest : int
        Stars (brightest first) that form triangles on the first try; the
        matcher doubles it (up to all stars) when that finds no match.
    n_neighbors : int
        Each star forms triangles with this many nearest neighbours.
    invariant_tol : float
        Radius of a triangle look-alike in invariant space.
    min_side_px : float
        Triangles with a side shorter than this are too noisy to use.
    ransac_threshold_px : float
        A frame star is an inlier when it lands this close to a reference star.
    max_hypotheses : int
        Cap on scored triangle pairs per try (best invariant distance first).
    min_inliers : int
        Fewest matched stars for a registration to count.
    scale_range : tuple of float
        Accepted frame-to-reference scale factors.
    refine_iterations : int
        Maximum re-association / least-squares rounds.
    clip_sigma : float
        Outlier clip of the refinement, in units of the residual scatter.
    """

    model: str = "similarity"
    n_brightest: int = 40
    n_neighbors: int = 5
    invariant_tol: float = 0.015
    min_side_px: float = 6.0
    ransac_threshold_px: float = 3.0
    max_hypotheses: int = 3000
    min_inliers: int = 6
    scale_range: tuple[float, float] = (0.5, 2.0)
    refine_iterations: int = 8
    clip_sigma: float = 5.0

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown transform model {self.model!r}; choose one of {', '.join(MODELS)}")


@dataclass(frozen=True, kw_only=True)
class MatchResult:
    """Outcome of :func:`match_stars`.

    Attributes
    ----------
    transform : ndarray, shape (3, 3)
        Frame pixel -> reference pixel (float64).
    src_idx, dst_idx : ndarray of int
        Matched (inlier) pairs: frame star ``src_idx[k]`` is reference star ``dst_idx[k]``.
    residual_rms_px : float
        RMS distance between transformed frame stars and their reference stars
        over the inliers, reference px.
    model : str
        Model of :attr:`transform`.
    n_hypotheses : int
        Triangle pairs scored (diagnostics).
    """

    transform: np.ndarray
    src_idx: np.ndarray
    dst_idx: np.ndarray
    residual_rms_px: float
    model: str
    n_hypotheses: int = 0

    @property
    def n_inliers(self) -> int:
        """Number of matched stars."""
        return int(self.src_idx.shape[0])

    @property
    def rotation_deg(self) -> float:
        """Rotation angle of the linear part, degrees (positive = from +x towards +y)."""
        return rotation_deg(self.transform)

    @property
    def scale(self) -> float:
        """Mean scale factor of the linear part."""
        return float(math.sqrt(abs(np.linalg.det(self.transform[:2, :2]))))


# --------------------------------------------------------------------------- transforms


def transform_points(transform: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Apply a 3x3 transform to ``(N, 2)`` points (homogeneous division included)."""
    t = np.asarray(transform, dtype=np.float64)
    p = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    out = p @ t[:2, :2].T + t[:2, 2]
    if t[2, 0] != 0.0 or t[2, 1] != 0.0 or t[2, 2] != 1.0:
        out /= (p @ t[2, :2] + t[2, 2])[:, None]
    return out


def rotation_deg(transform: np.ndarray) -> float:
    """Rotation of a transform's linear part in degrees (from +x towards +y, i.e. clockwise on screen)."""
    t = np.asarray(transform, dtype=np.float64)
    a = t[:2, :2]
    # polar decomposition angle (exact for a similarity, least-squares otherwise)
    return float(math.degrees(math.atan2(a[1, 0] - a[0, 1], a[0, 0] + a[1, 1])))


def grid_rms(t_a: np.ndarray, t_b: np.ndarray, shape: tuple[int, int], n: int = 32) -> float:
    """RMS of ``|t_a p - t_b p|`` over an ``n x n`` grid of points ``p`` covering a frame.

    Parameters
    ----------
    t_a, t_b : ndarray, shape (3, 3)
        Transforms to compare.
    shape : tuple of int
        ``(H, W)`` of the frame the grid covers (pixel centres ``0..W-1``, ``0..H-1``).
    n : int
        Grid points per axis.
    """
    h, w = shape
    gx, gy = np.meshgrid(np.linspace(0, w - 1, n), np.linspace(0, h - 1, n))
    p = np.column_stack([gx.ravel(), gy.ravel()])
    d = transform_points(t_a, p) - transform_points(t_b, p)
    return float(np.sqrt(np.mean(np.sum(d * d, axis=1))))


def _similarity_lsq(src: np.ndarray, dst: np.ndarray, w: np.ndarray) -> np.ndarray:
    zs = src[:, 0] + 1j * src[:, 1]
    zd = dst[:, 0] + 1j * dst[:, 1]
    sw = w.sum()
    cs = (w * zs).sum() / sw
    cd = (w * zd).sum() / sw
    den = (w * np.abs(zs - cs) ** 2).sum()
    if not den > 0:
        raise RegistrationError("degenerate star set: all matched stars coincide")
    a = (w * (zd - cd) * np.conj(zs - cs)).sum() / den
    b = cd - a * cs
    return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag], [0.0, 0.0, 1.0]])


def _affine_lsq(src: np.ndarray, dst: np.ndarray, w: np.ndarray) -> np.ndarray:
    sw = w.sum()
    cs = (w[:, None] * src).sum(0) / sw
    cd = (w[:, None] * dst).sum(0) / sw
    s = src - cs
    d = dst - cd
    sq = np.sqrt(w)[:, None]
    lin, *_ = np.linalg.lstsq(s * sq, d * sq, rcond=None)  # s @ lin = d
    a = lin.T
    t = np.eye(3)
    t[:2, :2] = a
    t[:2, 2] = cd - a @ cs
    return t


def _normaliser(p: np.ndarray) -> np.ndarray:
    c = p.mean(0)
    s = math.sqrt(2.0) / max(float(np.mean(np.linalg.norm(p - c, axis=1))), 1e-12)
    return np.array([[s, 0, -s * c[0]], [0, s, -s * c[1]], [0, 0, 1.0]])


def _homography_lsq(src: np.ndarray, dst: np.ndarray, w: np.ndarray) -> np.ndarray:
    ns, nd = _normaliser(src), _normaliser(dst)
    s = transform_points(ns, src)
    d = transform_points(nd, dst)
    n = len(s)
    x, y, u, v = s[:, 0], s[:, 1], d[:, 0], d[:, 1]
    xy1 = np.column_stack([x, y, np.ones(n)]) * np.sqrt(w)[:, None]
    a = np.zeros((2 * n, 9))
    a[:n, 0:3] = xy1
    a[:n, 6:9] = -u[:, None] * xy1
    a[n:, 3:6] = xy1
    a[n:, 6:9] = -v[:, None] * xy1
    # the DLT: the null vector of the weighted system, from its 9 x 9 normal matrix (the points are
    # normalised, so its conditioning is the system's squared but tame; Gauss-Newton polishes it)
    h = np.linalg.eigh(a.T @ a)[1][:, 0]
    p = (h / h[8] if abs(h[8]) > 1e-12 else h)[:8].copy()
    # Gauss-Newton on the geometric (reprojection) error, in normalised coordinates
    w2 = np.concatenate([w, w])
    j = np.zeros((2 * n, 8))
    for _ in range(10):
        d1 = 1.0 / (p[6] * x + p[7] * y + 1.0)
        xd, yd = x * d1, y * d1
        pu = (p[0] * x + p[1] * y + p[2]) * d1
        pv = (p[3] * x + p[4] * y + p[5]) * d1
        r = np.concatenate([u - pu, v - pv])
        j[:n, 0], j[:n, 1], j[:n, 2] = xd, yd, d1
        j[:n, 6], j[:n, 7] = -pu * xd, -pu * yd
        j[n:, 3], j[n:, 4], j[n:, 5] = xd, yd, d1
        j[n:, 6], j[n:, 7] = -pv * xd, -pv * yd
        step = _normal_solve(j, w2, r)
        p = p + step
        if np.max(np.abs(step)) < 1e-12:
            break
    h = np.append(p, 1.0).reshape(3, 3)
    t = np.linalg.inv(nd) @ h @ ns
    return t / t[2, 2]


def _normal_solve(j: np.ndarray, w: np.ndarray, r: np.ndarray) -> np.ndarray:
    """The weighted least-squares step ``argmin |sqrt(w) (j s - r)|``, from its normal equations (a
    few parameters, many points); least squares on them where they are singular (a degenerate set)."""
    jw = j * w[:, None]
    m, g = jw.T @ j, jw.T @ r
    try:
        return np.linalg.solve(m, g)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(m, g, rcond=None)[0]


def estimate_transform(src: np.ndarray, dst: np.ndarray, model: str = "similarity",
                       weights: np.ndarray | None = None) -> np.ndarray:
    """Least-squares transform mapping ``src`` points onto ``dst`` points.

    Parameters
    ----------
    src, dst : ndarray, shape (N, 2)
        Corresponding points.
    model : str
        ``"similarity"`` (closed-form weighted least squares, no reflection),
        ``"affine"`` (linear least squares) or ``"homography"`` (normalised DLT
        followed by Gauss-Newton on the reprojection error).
    weights : ndarray, shape (N,), optional
        Per-point weights (inverse variances).

    Returns
    -------
    ndarray, shape (3, 3)
        float64 transform with ``T[2, 2] == 1``.
    """
    if model not in MODELS:
        raise ValueError(f"unknown transform model {model!r}; choose one of {', '.join(MODELS)}")
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape:
        raise ValueError(f"src and dst differ in shape: {src.shape} vs {dst.shape}")
    if len(src) < _MIN_POINTS[model]:
        raise NotEnoughStars(f"a {model} transform needs at least {_MIN_POINTS[model]} matched stars, "
                             f"got {len(src)}")
    w = np.ones(len(src)) if weights is None else np.asarray(weights, dtype=np.float64)
    if model == "similarity":
        return _similarity_lsq(src, dst, w)
    if model == "affine":
        return _affine_lsq(src, dst, w)
    return _homography_lsq(src, dst, w)


# --------------------------------------------------------------------------- triangles


def _triangles(xy: np.ndarray, k: int, min_side: float) -> tuple[np.ndarray, np.ndarray]:
    """Triangles of each star with its ``k`` nearest neighbours.

    Returns vertex indices ``(T, 3)`` ordered by the length of the opposite
    side (shortest first) and invariants ``(T, 2)``: the two shorter sides over
    the longest.
    """
    n = len(xy)
    if n < 3:
        return np.zeros((0, 3), dtype=np.int64), np.zeros((0, 2))
    kk = min(k + 1, n)
    _, nn = PointIndex(xy).query(xy, k=kk)
    combos = np.array(list(itertools.combinations(range(kk), 3)))
    tri = nn[:, combos].reshape(-1, 3)
    tri = np.unique(np.sort(tri, axis=1), axis=0)
    p = xy[tri]
    sides = np.stack([np.linalg.norm(p[:, 1] - p[:, 2], axis=1),  # opposite vertex 0
                      np.linalg.norm(p[:, 0] - p[:, 2], axis=1),  # opposite vertex 1
                      np.linalg.norm(p[:, 0] - p[:, 1], axis=1)], axis=1)  # opposite vertex 2
    order = np.argsort(sides, axis=1, kind="stable")
    s = np.take_along_axis(sides, order, axis=1)
    verts = np.take_along_axis(tri, order, axis=1)
    keep = s[:, 0] >= min_side
    inv = np.column_stack([s[:, 0] / s[:, 2], s[:, 1] / s[:, 2]])
    return verts[keep], inv[keep]


def _hypotheses(src: np.ndarray, dst: np.ndarray, cfg: MatchConfig, n: int) -> tuple[np.ndarray, int]:
    """Candidate similarities ``(H, 2)`` complex ``(a, b)`` with ``z' = a z + b``."""
    vs, inv_s = _triangles(src[:n], cfg.n_neighbors, cfg.min_side_px)
    vd, inv_d = _triangles(dst[:n], cfg.n_neighbors, cfg.min_side_px)
    if len(vs) == 0 or len(vd) == 0:
        return np.zeros((0, 2), dtype=np.complex128), 0
    tree = PointIndex(inv_d)
    dist, j = tree.query(inv_s, k=min(8, len(inv_d)), distance_upper_bound=cfg.invariant_tol)
    dist = dist.reshape(len(inv_s), -1)
    j = j.reshape(len(inv_s), -1)
    ii, kk = np.nonzero(np.isfinite(dist))
    if ii.size == 0:
        return np.zeros((0, 2), dtype=np.complex128), 0
    order = np.argsort(dist[ii, kk], kind="stable")[: cfg.max_hypotheses]
    si = vs[ii[order]]
    di = vd[j[ii[order], kk[order]]]
    zs = src[si, 0] + 1j * src[si, 1]  # (H, 3)
    zd = dst[di, 0] + 1j * dst[di, 1]
    cs = zs.mean(1, keepdims=True)
    cd = zd.mean(1, keepdims=True)
    a = ((zd - cd) * np.conj(zs - cs)).sum(1) / (np.abs(zs - cs) ** 2).sum(1)
    b = cd[:, 0] - a * cs[:, 0]
    fit = np.abs(a[:, None] * zs + b[:, None] - zd).max(1)
    scale = np.abs(a)
    ok = (fit < cfg.ransac_threshold_px) & (scale >= cfg.scale_range[0]) & (scale <= cfg.scale_range[1])
    return np.column_stack([a[ok], b[ok]]), int(len(order))


def _first_good(hyp: np.ndarray, zsrc: np.ndarray, tree: PointIndex, thr: float, good: float) -> tuple[int, int]:
    """``(inliers, index)`` of the best hypothesis, scoring them in batches in their order (best
    triangle agreement first) and stopping after the first batch whose best reaches ``good``.

    On an ordinary frame the first hypotheses are right: scoring all of them (up to
    :attr:`MatchConfig.max_hypotheses` x 100 star look-ups) cost ~40 ms a frame.
    """
    best, k, start, size = -1, 0, 0, 32
    while start < len(hyp):
        counts = _score(hyp[start:start + size], zsrc, tree, thr)
        i = int(np.argmax(counts))
        if counts[i] > best:
            best, k = int(counts[i]), start + i
        if best >= good:
            break
        start, size = start + size, 2 * size
    return best, k


def _score(hyp: np.ndarray, zsrc: np.ndarray, tree: PointIndex, thr: float) -> np.ndarray:
    """Inlier count of each hypothesis (frame stars near a reference star)."""
    counts = np.zeros(len(hyp), dtype=np.int64)
    step = max(1, 200_000 // max(len(zsrc), 1))
    for i in range(0, len(hyp), step):
        h = hyp[i:i + step]
        z = h[:, 0:1] * zsrc[None, :] + h[:, 1:2]
        d, _ = tree.query(np.column_stack([z.real.ravel(), z.imag.ravel()]), distance_upper_bound=thr)
        counts[i:i + step] = np.isfinite(d).reshape(len(h), -1).sum(1)
    return counts


def _associate(tsrc: np.ndarray, dst_tree: PointIndex, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one nearest-neighbour pairs within ``radius``: (src_idx, dst_idx, dist)."""
    d, j = dst_tree.query(tsrc, distance_upper_bound=radius)
    si = np.flatnonzero(np.isfinite(d))
    if si.size == 0:
        return si, si, np.zeros(0)
    dj, dd = j[si], d[si]
    order = np.lexsort((dd, dj))  # by dst index, then distance
    first = np.ones(order.size, dtype=bool)
    first[1:] = dj[order][1:] != dj[order][:-1]
    keep = order[first]
    return si[keep], dj[keep], dd[keep]


def _refine(t0: np.ndarray, src: np.ndarray, dst: np.ndarray, es: np.ndarray | None, ed: np.ndarray | None,
            cfg: MatchConfig, model: str):
    tree = PointIndex(dst)
    t = t0
    prev: tuple[bytes, bytes] | None = None
    si = di = np.zeros(0, dtype=np.int64)
    radius = cfg.ransac_threshold_px
    for it in range(max(1, cfg.refine_iterations)):
        p = transform_points(t, src)
        si, di, dd = _associate(p, tree, radius)
        if si.size < max(cfg.min_inliers, _MIN_POINTS[model]):
            break
        if es is not None and ed is not None:
            scale = math.sqrt(abs(np.linalg.det(t[:2, :2])))
            var = (es[si] * scale) ** 2 + ed[di] ** 2 + ERR_FLOOR_PX ** 2
        else:
            var = np.ones(si.size)
        # clip outliers by their normalised residual (robust Rayleigh scale)
        z2 = dd ** 2 / var
        s2 = np.median(z2) / (2.0 * math.log(2.0))
        keep = z2 <= (cfg.clip_sigma ** 2) * max(s2, 1e-12)
        # never clip below 0.3 px: a handful of perfect stars must not reject good ones
        keep |= dd <= 0.3
        si, di = si[keep], di[keep]
        if si.size < max(cfg.min_inliers, _MIN_POINTS[model]):
            break
        key = (si.tobytes(), di.tobytes())
        if key == prev:  # the pairs of the last fit: it stands (its weights' scale differs by ~1e-6)
            break
        prev = key
        m = model if si.size >= 2 * _MIN_POINTS[model] + 2 else "similarity"
        t = estimate_transform(src[si], dst[di], m, 1.0 / var[keep])
    return t, si, di


def _as_xy_err(stars: Any) -> tuple[np.ndarray, np.ndarray | None]:
    if hasattr(stars, "xy") and hasattr(stars, "pos_err"):
        xy = np.asarray(stars.xy, dtype=np.float64)
        err = np.asarray(stars.pos_err, dtype=np.float64)
        err = np.where(np.isfinite(err), err, 1.0)
        return xy, err
    xy = np.asarray(stars, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"expected (N, 2) star coordinates, got shape {xy.shape}")
    return xy, None


def _best_hypothesis(s_xy: np.ndarray, d_xy: np.ndarray, cfg: MatchConfig
                     ) -> tuple[tuple[int, np.ndarray, int] | None, int]:
    """The similarity hypothesis that puts the most frame stars onto reference stars.

    The ``cfg.n_brightest`` brightest stars are tried first, then twice as many
    until the best count is significant and a third of the stars that can
    overlap. Returns ``(count, hypothesis, inliers needed)`` or None when no
    hypothesis was formed, and how many hypotheses were formed.
    """
    tree = PointIndex(d_xy)
    n_total = max(len(s_xy), len(d_xy))
    tries = []
    n = min(cfg.n_brightest, n_total)
    while True:
        tries.append(n)
        if n >= n_total:
            break
        n = min(2 * n, n_total)
    # chance that a random point lands within the threshold of some reference star
    span = np.maximum(d_xy.max(0) - d_xy.min(0), 1.0)
    p_chance = 1.0 - math.exp(-len(d_xy) * math.pi * cfg.ransac_threshold_px ** 2 / float(span[0] * span[1]))
    n_hyp_total = 0
    best: tuple[int, np.ndarray, int] | None = None  # (count, hypothesis, inliers needed)
    for n in tries:
        hyp, n_hyp = _hypotheses(s_xy, d_xy, cfg, n)
        n_hyp_total += n_hyp
        if len(hyp) == 0:
            continue
        m = max(n, min(len(s_xy), 100))
        zsrc = s_xy[:m, 0] + 1j * s_xy[:m, 1]
        # a match must stand well above what random coincidences give: a hypothesis
        # gets its own 3 stars for free, plus Poisson(mu) chance hits; 5 sigma + 3
        # covers trying thousands of hypotheses
        mu = m * p_chance
        need = max(cfg.min_inliers, math.ceil(3.0 + mu + 5.0 * math.sqrt(mu) + 3.0))
        enough = min(0.3 * len(zsrc), 12)  # a third of the stars that can overlap
        count, k = _first_good(hyp, zsrc, tree, cfg.ransac_threshold_px, max(need, enough))
        if best is None or count - need > best[0] - best[2]:
            best = (count, hyp[k], need)
        if best[0] >= max(best[2], enough):  # good enough: significant, and enough stars
            break
    return best, n_hyp_total


def match_stars(src: Any, dst: Any, *, config: MatchConfig | None = None,
                src_err: np.ndarray | None = None, dst_err: np.ndarray | None = None) -> MatchResult:
    """Find the transform mapping a frame's stars (``src``) onto the reference's (``dst``).

    Parameters
    ----------
    src, dst : ndarray (N, 2) or StarList
        Star centroids, brightest first (the order :func:`~skystack.engine.detect.detect_stars`
        returns). A StarList also supplies the centroid errors used as weights.
    config : MatchConfig, optional
        Matching settings (model, thresholds).
    src_err, dst_err : ndarray, optional
        1-sigma centroid errors (px) when ``src``/``dst`` are plain arrays.

    Returns
    -------
    MatchResult

    Raises
    ------
    NotEnoughStars
        Either list has fewer than :attr:`MatchConfig.min_inliers` stars.
    RegistrationError
        No transform puts enough frame stars onto reference stars (the fields
        do not overlap, or the star lists are mostly noise).
    """
    cfg = config or MatchConfig()
    s_xy, es = _as_xy_err(src)
    d_xy, ed = _as_xy_err(dst)
    if src_err is not None:
        es = np.asarray(src_err, dtype=np.float64)
    if dst_err is not None:
        ed = np.asarray(dst_err, dtype=np.float64)
    fin_s = np.isfinite(s_xy).all(1)
    fin_d = np.isfinite(d_xy).all(1)
    s_idx, d_idx = np.flatnonzero(fin_s), np.flatnonzero(fin_d)
    s_xy, d_xy = s_xy[s_idx], d_xy[d_idx]
    if es is not None:
        es = es[s_idx]
    if ed is not None:
        ed = ed[d_idx]
    need = max(3, cfg.min_inliers)
    if len(s_xy) < need or len(d_xy) < need:
        raise NotEnoughStars(f"too few stars to register: {len(s_xy)} in the frame, {len(d_xy)} in the "
                             f"reference (need {need}); clouds, lens cap or focus?")

    best, n_hyp_total = _best_hypothesis(s_xy, d_xy, cfg)
    if best is None or best[0] < best[2]:
        got, need = (0, cfg.min_inliers) if best is None else (best[0], best[2])
        raise RegistrationError(
            f"no star pattern in common with the reference (best match {got} stars, need "
            f"{need}; {len(s_xy)} frame / {len(d_xy)} reference stars): the fields may not "
            "overlap; try another --reference")
    a, b = best[1]
    t0 = np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag], [0.0, 0.0, 1.0]])
    t, si, di = _refine(t0, s_xy, d_xy, es, ed, cfg, "similarity")
    if cfg.model != "similarity":
        t, si, di = _refine(t, s_xy, d_xy, es, ed, cfg, cfg.model)
    if si.size < cfg.min_inliers:
        raise RegistrationError(f"only {si.size} stars agree with the best transform (need "
                                f"{cfg.min_inliers}); the match is not reliable")
    res = transform_points(t, s_xy[si]) - d_xy[di]
    rms = float(np.sqrt(np.mean(np.sum(res * res, axis=1))))

    model = cfg.model if si.size >= 2 * _MIN_POINTS[cfg.model] + 2 else "similarity"
    return MatchResult(transform=t, src_idx=s_idx[si], dst_idx=d_idx[di], residual_rms_px=rms,
                       model=model, n_hypotheses=n_hyp_total)


def refine_from(guess: np.ndarray, src: Any, dst: Any, *, config: MatchConfig | None = None) -> MatchResult:
    """Refine a known approximate transform (no triangle search): re-associate and fit ``config.model``.

    Used to re-reference a frame (a composed transform as the guess), to chain a
    frame through a neighbour, and to refit in ideal (undistorted) pixels.

    Parameters
    ----------
    guess : ndarray, shape (3, 3)
        Approximate frame -> reference transform (within ``ransac_threshold_px``
        where the stars are).
    src, dst : ndarray (N, 2) or StarList
        Frame and reference stars.
    config : MatchConfig, optional

    Raises
    ------
    RegistrationError
        Fewer than ``min_inliers`` stars agree with the refined transform.
    """
    cfg = config or MatchConfig()
    s_xy, es = _as_xy_err(src)
    d_xy, ed = _as_xy_err(dst)
    s_idx = np.flatnonzero(np.isfinite(s_xy).all(1))
    d_idx = np.flatnonzero(np.isfinite(d_xy).all(1))
    s_xy, d_xy = s_xy[s_idx], d_xy[d_idx]
    es = None if es is None else es[s_idx]
    ed = None if ed is None else ed[d_idx]
    if len(s_xy) < cfg.min_inliers or len(d_xy) < cfg.min_inliers:
        raise NotEnoughStars(f"too few stars to register: {len(s_xy)} in the frame, {len(d_xy)} in the reference")
    t, si, di = _refine(np.asarray(guess, dtype=np.float64), s_xy, d_xy, es, ed, cfg, cfg.model)
    if si.size < cfg.min_inliers:
        raise RegistrationError(f"only {si.size} stars agree with the transform (need {cfg.min_inliers})")
    res = transform_points(t, s_xy[si]) - d_xy[di]
    rms = float(np.sqrt(np.mean(np.sum(res * res, axis=1))))
    model = cfg.model if si.size >= 2 * _MIN_POINTS[cfg.model] + 2 else "similarity"
    return MatchResult(transform=t, src_idx=s_idx[si], dst_idx=d_idx[di], residual_rms_px=rms, model=model)
