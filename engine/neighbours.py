"""Nearest neighbours among 2-D points: star positions and triangle invariants.

:class:`PointIndex` answers the queries detection and registration ask of a
few hundred to a few thousand points, with the conventions of SciPy's
``cKDTree.query``: distances ascending, a missing neighbour reported as
distance ``inf`` and index ``n`` (the number of points), and
``distance_upper_bound`` strict (a neighbour at exactly that distance is left
out). Distances are ``sqrt(dx * dx + dy * dy)`` in float64; among neighbours
at the same distance the lower index comes first.

A bounded query looks only at the points whose x is within the bound of the
query point's (a strip of the points sorted by x); an unbounded one compares
every pair, in blocks. Importing ``scipy.spatial`` for this cost ~0.27 s of
one core at the start of every stack (it loads ``scipy.sparse`` and
``scipy.linalg`` as well).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["PointIndex"]

#: Point pairs compared at once by an unbounded query (float64 temporaries of this many values).
_BLOCK_PAIRS = 1 << 18


class PointIndex:
    """2-D points indexed for nearest-neighbour queries.

    Parameters
    ----------
    points : array_like, shape (N, 2)
        The points (float64 copies are kept).
    """

    def __init__(self, points) -> None:
        self.points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        self.n = len(self.points)
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None

    def query(self, q, k: int = 1, distance_upper_bound: float = math.inf) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest points to each of ``q`` closer than ``distance_upper_bound``.

        Parameters
        ----------
        q : array_like, shape (Q, 2)
            Query points.
        k : int
            Neighbours per query point.
        distance_upper_bound : float
            Only neighbours strictly closer than this are returned.

        Returns
        -------
        d : ndarray, float64, shape (Q,) for ``k == 1``, else (Q, k)
            Distances, ascending; ``inf`` where fewer than ``k`` were found.
        i : ndarray, intp, same shape
            Their indices into ``points``; ``N`` where none.
        """
        q = np.asarray(q, dtype=np.float64).reshape(-1, 2)
        bound = float(distance_upper_bound)
        if 0.0 < bound < math.inf and self.n:
            qi, pj, d = self._pairs_near(q, bound)
        else:
            qi, pj, d = self._pairs_all(q, k, bound)
        return self._nearest(len(q), k, qi, pj, d)

    def pairs_within(self, q, distance_upper_bound: float) -> tuple[np.ndarray, np.ndarray]:
        """Every (query, point) pair strictly closer than ``distance_upper_bound`` (finite, > 0).

        Returns
        -------
        qi, pj : ndarray of intp
            Indices into ``q`` and into ``points`` of each pair (in no particular order).
        """
        q = np.asarray(q, dtype=np.float64).reshape(-1, 2)
        if not self.n or not len(q):
            return np.zeros(0, np.intp), np.zeros(0, np.intp)
        qi, pj, _ = self._pairs_near(q, float(distance_upper_bound))
        return qi, pj

    def _nearest(self, nq: int, k: int, qi: np.ndarray, pj: np.ndarray, d: np.ndarray):
        """Keep the ``k`` nearest of each query's candidate pairs, in cKDTree's output layout."""
        dist = np.full((nq, k), np.inf)
        idx = np.full((nq, k), self.n, dtype=np.intp)
        if d.size:
            order = np.lexsort((pj, d, qi))  # by query, then distance, then index
            qi, pj, d = qi[order], pj[order], d[order]
            first = np.flatnonzero(np.r_[True, qi[1:] != qi[:-1]])
            rank = np.arange(qi.size) - np.repeat(first, np.diff(np.r_[first, qi.size]))
            keep = rank < k
            dist[qi[keep], rank[keep]] = d[keep]
            idx[qi[keep], rank[keep]] = pj[keep]
        return (dist[:, 0], idx[:, 0]) if k == 1 else (dist, idx)

    def _pairs_all(self, q: np.ndarray, k: int, bound: float):
        """Each query's ``k`` nearest points (closer than ``bound``), comparing every pair in blocks."""
        p = self.points
        qs, ps, ds = [], [], []
        if self.n and len(q):
            kk = min(k, self.n)
            rows = max(1, _BLOCK_PAIRS // self.n)
            for a in range(0, len(q), rows):
                dx = q[a:a + rows, 0:1] - p[:, 0]
                dy = q[a:a + rows, 1:2] - p[:, 1]
                d = np.sqrt(dx * dx + dy * dy)
                if kk < self.n:  # the k smallest, then every point tied with the k-th (the lower index wins)
                    kth = np.partition(d, kk - 1, axis=1)[:, kk - 1:kk]
                    r, j = np.nonzero(d <= kth)
                else:
                    r, j = np.nonzero(np.ones(d.shape, dtype=bool))
                dd = d[r, j]
                ok = dd < bound
                qs.append(r[ok] + a)
                ps.append(j[ok])
                ds.append(dd[ok])
        return _cat(qs, np.intp), _cat(ps, np.intp), _cat(ds, np.float64)

    def _pairs_near(self, q: np.ndarray, bound: float):
        """Every (query, point) pair closer than ``bound``: the points whose x lies within ``bound`` of
        the query's (a strip of the points sorted by x), then the distance test."""
        xs, order = self._by_x()
        lo = np.searchsorted(xs, q[:, 0] - bound, side="left")
        hi = np.searchsorted(xs, q[:, 0] + bound, side="right")
        cnt = hi - lo
        tot = int(cnt.sum())
        qi = np.repeat(np.arange(len(q)), cnt)
        pj = order[np.repeat(lo - np.cumsum(cnt) + cnt, cnt) + np.arange(tot)]  # each strip, in turn
        diff = q[qi] - self.points[pj]
        d = np.sqrt(diff[:, 0] * diff[:, 0] + diff[:, 1] * diff[:, 1])
        ok = d < bound
        return qi[ok], pj[ok], d[ok]

    def _by_x(self) -> tuple[np.ndarray, np.ndarray]:
        """The points' x, sorted, and the order that sorts them (NaN last)."""
        if self._sorted is None:
            order = np.argsort(self.points[:, 0], kind="stable")
            self._sorted = (self.points[order, 0], order)
        return self._sorted


def _cat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)
