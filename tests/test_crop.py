"""Autocrop: exact maximal rectangle, and no kept pixel below 90 % coverage."""

from __future__ import annotations

import math

import numpy as np
import pytest

from skystack.engine.crop import apply_box, coverage_box, finite_box, max_rectangle
from skystack.engine.errors import SkystackError


def _brute_force_area(mask: np.ndarray) -> int:
    """Largest all-True rectangle by checking every rectangle (2-D prefix sums)."""
    h, w = mask.shape
    p = np.zeros((h + 1, w + 1), dtype=np.int64)
    p[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    best = 0
    x0, x1 = np.triu_indices(w + 1, k=1)
    for y0 in range(h):
        for y1 in range(y0 + 1, h + 1):
            s = p[y1, x1] - p[y0, x1] - p[y1, x0] + p[y0, x0]
            area = (y1 - y0) * (x1 - x0)
            full = s == area
            if full.any():
                best = max(best, int(area[full].max()))
    return best


def _rotated_coverage(h: int, w: int, n: int, *, seed: int, max_deg: float, max_shift: float) -> np.ndarray:
    """Frames per reference pixel for ``n`` frames rotated about an off-field pole and shifted."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    pole = np.array([0.3 * w, -0.8 * h])
    cov = np.zeros((h, w), dtype=np.int32)
    for i in range(n):
        phi = math.radians(max_deg) * (i / max(n - 1, 1) - 0.5) * 2
        d = rng.uniform(-max_shift, max_shift, 2)
        c, s = math.cos(phi), math.sin(phi)
        # reference pixel -> frame pixel: rotate about the pole, then shift
        fx = pole[0] + c * (xx - pole[0]) - s * (yy - pole[1]) + d[0]
        fy = pole[1] + s * (xx - pole[0]) + c * (yy - pole[1]) + d[1]
        cov += ((fx >= -0.5) & (fx <= w - 0.5) & (fy >= -0.5) & (fy <= h - 0.5)).astype(np.int32)
    return cov


def test_max_rectangle_is_exact_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(150):
        m = rng.random((int(rng.integers(1, 13)), int(rng.integers(1, 13)))) < rng.uniform(0.3, 0.97)
        y0, y1, x0, x1 = max_rectangle(m)
        assert m[y0:y1, x0:x1].all()
        assert (y1 - y0) * (x1 - x0) == _brute_force_area(m)


def test_max_rectangle_edge_cases():
    assert max_rectangle(np.zeros((4, 5), bool)) == (0, 0, 0, 0)
    assert max_rectangle(np.ones((4, 5), bool)) == (0, 4, 0, 5)
    assert max_rectangle(np.ones((1, 1), bool)) == (0, 1, 0, 1)
    m = np.zeros((6, 6), bool)
    m[2:5, 1:4] = True
    assert max_rectangle(m) == (2, 5, 1, 4)
    with pytest.raises(ValueError):
        max_rectangle(np.ones(5, bool))


def test_coverage_crop_on_rotated_frames():
    """Fixed-tripod-like session: 20 frames, +-1.5 deg about an off-field pole, +-12 px shifts."""
    n = 20
    cov = _rotated_coverage(600, 800, n, seed=1, max_deg=1.5, max_shift=12)
    assert cov.min() < 0.9 * n  # ragged edges to crop
    y0, y1, x0, x1 = coverage_box(cov, n_frames=n, fraction=0.9)
    assert cov[y0:y1, x0:x1].min() >= 0.9 * n
    # it is the largest such rectangle: one more row or column on any side has a bad pixel
    need = math.ceil(0.9 * n)
    for sl in ((slice(y0 - 1, y0), slice(x0, x1)), (slice(y1, y1 + 1), slice(x0, x1)),
               (slice(y0, y1), slice(x0 - 1, x0)), (slice(y0, y1), slice(x1, x1 + 1))):
        edge = cov[sl]
        assert edge.size == 0 or edge.min() < need
    assert (y1 - y0) * (x1 - x0) > 0.8 * 600 * 800  # and not a silly small crop


def test_coverage_crop_area_matches_brute_force_small():
    n = 10
    cov = _rotated_coverage(36, 48, n, seed=3, max_deg=4.0, max_shift=3)
    y0, y1, x0, x1 = coverage_box(cov, n_frames=n, fraction=0.9)
    assert cov[y0:y1, x0:x1].min() >= 9
    best = _brute_force_area(cov >= 9)
    area = (y1 - y0) * (x1 - x0)
    assert area >= 0.95 * best
    assert area == best  # the search is exact


def test_holes_from_rejection_are_filled_but_edges_are_not():
    n = 10
    cov = np.full((50, 60), n, dtype=np.int32)
    cov[:, :5] = 3  # a poorly covered edge
    kept = cov.copy()
    kept[20, 30] = 7  # rejection (a hot pixel, a trail) inside the well-covered area
    kept[25:27, 40] = 6
    assert coverage_box(kept, n_frames=n) == (0, 50, 5, 60)
    assert coverage_box(kept, n_frames=n, fill_holes=False) != (0, 50, 5, 60)
    notch = cov.copy()
    notch[0, 30] = 2  # a notch on the border is not a hole: it is excluded
    y0, y1, x0, x1 = coverage_box(notch, n_frames=n)
    assert notch[y0:y1, x0:x1].min() >= 9


def test_coverage_box_defaults_and_errors():
    cov = np.array([[1, 2, 2], [2, 2, 2]])
    assert coverage_box(cov) == (0, 2, 1, 3)  # n_frames defaults to the maximum
    with pytest.raises(SkystackError, match="crop"):
        coverage_box(cov, fraction=0.0)
    with pytest.raises(SkystackError, match="no pixel"):
        coverage_box(np.zeros((4, 4)) + 1, n_frames=10)
    with pytest.raises(SkystackError, match="empty"):
        coverage_box(np.zeros((4, 4)))
    with pytest.raises(SkystackError, match="2-D"):
        coverage_box(np.zeros((2, 4, 4)))


def test_finite_box_and_apply():
    img = np.ones((3, 10, 12), np.float32)
    img[0, :2, :] = np.nan
    img[2, :, 10:] = np.nan
    box = finite_box(img)
    assert box == (2, 10, 0, 10)
    assert apply_box(img, box).shape == (3, 8, 10)
    assert np.isfinite(apply_box(img, box)).all()
