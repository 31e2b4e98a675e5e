"""PointIndex (engine/neighbours.py) against an all-pairs float64 reference and SciPy's cKDTree."""

import math

import numpy as np
import pytest

from skystack.engine.neighbours import PointIndex


def _reference(p: np.ndarray, q: np.ndarray, k: int, bound: float):
    """Every pair's float64 distance; per query the k smallest below ``bound`` (lower index first on ties)."""
    d = np.sqrt((q[:, None, 0] - p[None, :, 0]) ** 2 + (q[:, None, 1] - p[None, :, 1]) ** 2)
    dist = np.full((len(q), k), np.inf)
    idx = np.full((len(q), k), len(p), dtype=np.intp)
    for r in range(len(q)):
        order = np.lexsort((np.arange(len(p)), d[r]))
        order = order[d[r, order] < bound][:k]
        dist[r, :order.size], idx[r, :order.size] = d[r, order], order
    return (dist[:, 0], idx[:, 0]) if k == 1 else (dist, idx)


@pytest.mark.parametrize("k", [1, 2, 5, 8])
@pytest.mark.parametrize("bound", [math.inf, 3.0, 40.0])
@pytest.mark.parametrize("grid", [False, True])
def test_query_equals_the_all_pairs_reference(k, bound, grid):
    rng = np.random.default_rng(k * 7 + int(bound if math.isfinite(bound) else 0) + grid)
    p = rng.uniform(-50, 1200, (300, 2))
    q = np.concatenate([rng.uniform(-100, 1300, (150, 2)), p[:50]])  # some queries are points themselves
    if grid:  # whole pixels: many pairs at the same distance, and some exactly at the bound
        p, q = np.round(p / 4) * 4, np.round(q / 4) * 4
    d, i = PointIndex(p).query(q, k=k, distance_upper_bound=bound)
    rd, ri = _reference(p, q, k, bound)
    np.testing.assert_array_equal(d, rd)
    np.testing.assert_array_equal(i, ri)
    assert np.isfinite(d).any() and (not math.isfinite(bound) or not np.isfinite(d).all())


@pytest.mark.parametrize("grid", [False, True])
def test_pairs_within_are_every_pair_closer_than_the_bound(grid):
    """``pairs_within`` gives exactly the (query, point) pairs whose float64 distance is below the bound."""
    rng = np.random.default_rng(11 + grid)
    p = rng.uniform(0, 300, (400, 2))
    q = np.concatenate([rng.uniform(-10, 310, (200, 2)), p[:40]])
    if grid:  # pairs exactly at the bound are left out
        p, q = np.round(p / 3) * 3, np.round(q / 3) * 3
    d = np.sqrt((q[:, None, 0] - p[None, :, 0]) ** 2 + (q[:, None, 1] - p[None, :, 1]) ** 2)
    want = set(zip(*np.nonzero(d < 6.0)))
    qi, pj = PointIndex(p).pairs_within(q, 6.0)
    assert len(qi) == len(want) > 100 and set(zip(qi.tolist(), pj.tolist())) == want
    assert [a.size for a in PointIndex(np.zeros((0, 2))).pairs_within(q, 6.0)] == [0, 0]


def test_bound_is_strict_and_misses_are_inf_and_n():
    p = np.array([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0]])
    d, i = PointIndex(p).query([[0.0, 0.0], [100.0, 100.0]], k=3, distance_upper_bound=5.0)
    np.testing.assert_array_equal(d, [[0.0, np.inf, np.inf], [np.inf, np.inf, np.inf]])  # (3, 4) is at 5.0
    np.testing.assert_array_equal(i, [[0, 3, 3], [3, 3, 3]])
    d, i = PointIndex(np.zeros((0, 2))).query([[1.0, 1.0]], k=1)
    assert d[0] == np.inf and i[0] == 0


@pytest.mark.parametrize("k,bound", [(1, 3.0), (2, math.inf), (8, 0.015)])
def test_query_matches_scipy_ckdtree(k, bound):
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(5)
    scale = 1.0 if bound == 0.015 else 2000.0  # triangle invariants, or star positions
    p, q = rng.random((700, 2)) * scale, rng.random((900, 2)) * scale
    for got, want in zip(PointIndex(p).query(q, k=k, distance_upper_bound=bound),
                         cKDTree(p).query(q, k=k, distance_upper_bound=bound)):
        np.testing.assert_array_equal(got, want)
