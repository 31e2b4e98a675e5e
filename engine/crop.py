"""Autocrop: the largest axis-aligned rectangle that enough frames covered.

Registration warps every frame into the reference grid, so near the edges
(dithering, drift, field rotation of a fixed tripod) fewer frames contribute
and the stack is noisier, or has no data at all. :func:`coverage_box` keeps
the largest rectangle in which every pixel was covered by at least
``fraction`` of the frames; :func:`max_rectangle` is the exact O(H*W)
maximal-rectangle search in a binary mask (the row-by-row height/left/right
dynamic programme, each row vectorised).
"""

from __future__ import annotations

import math

import numpy as np

from skystack.engine.errors import SkystackError

#: ``(y0, y1, x0, x1)``, half-open: rows ``y0..y1-1``, columns ``x0..x1-1``.
Box = tuple[int, int, int, int]


def max_rectangle(mask: np.ndarray) -> Box:
    """Largest axis-aligned all-True rectangle of a 2-D boolean mask.

    For each row the height of the run of True above every column is kept,
    together with how far left and right a rectangle of that height can
    extend (the classic maximal-rectangle dynamic programme); the running
    "last False to the left/right" is a cumulative max/min, so each row is a
    few NumPy operations. Ties go to the first found (top-most, then
    left-most bottom edge).

    Parameters
    ----------
    mask : ndarray of bool
        ``(H, W)``.

    Returns
    -------
    (y0, y1, x0, x1)
        Half-open bounds; ``(0, 0, 0, 0)`` when the mask has no True pixel.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {m.shape}")
    h, w = m.shape
    if h == 0 or w == 0 or not m.any():
        return (0, 0, 0, 0)
    cols = np.arange(w, dtype=np.int64)
    height = np.zeros(w, dtype=np.int64)
    left = np.zeros(w, dtype=np.int64)
    right = np.full(w, w, dtype=np.int64)
    best, best_box = 0, (0, 0, 0, 0)
    for y in range(h):
        row = m[y]
        height = np.where(row, height + 1, 0)
        # first column of the current run of True ending at or after each column
        cur_left = np.maximum.accumulate(np.where(row, 0, cols + 1))
        # one past the last column of the run of True starting at or before each column
        cur_right = np.minimum.accumulate(np.where(row, w, cols)[::-1])[::-1]
        left = np.where(row, np.maximum(left, cur_left), 0)
        right = np.where(row, np.minimum(right, cur_right), w)
        area = (right - left) * height
        j = int(np.argmax(area))
        if area[j] > best:
            best = int(area[j])
            best_box = (y + 1 - int(height[j]), y + 1, int(left[j]), int(right[j]))
    return best_box


def coverage_box(count: np.ndarray, *, n_frames: int | None = None, fraction: float = 0.9,
                 fill_holes: bool = True) -> Box:
    """Largest rectangle where at least ``fraction`` of the frames contributed.

    Frame footprints are (nearly) convex and all about the same, so the
    well-covered area is one blob attached to nothing but itself; isolated
    holes inside it come from a per-pixel *kept-sample* count (pixels where
    rejection removed frames: hot pixels, trails), not from coverage, and are
    filled when ``fill_holes`` is set.

    Parameters
    ----------
    count : ndarray
        ``(H, W)`` frames with data at each pixel (the stack's coverage map).
    n_frames : int, optional
        Frames in the stack (default: the map's maximum).
    fraction : float
        Keep pixels with ``count >= fraction * n_frames`` (0 < fraction <= 1).
    fill_holes : bool
        Treat holes enclosed by well-covered pixels as covered.

    Returns
    -------
    (y0, y1, x0, x1)
        Half-open bounds of the crop.

    Raises
    ------
    SkystackError
        When no pixel reaches the threshold.
    """
    c = np.asarray(count)
    if c.ndim != 2:
        raise SkystackError(f"coverage map must be 2-D (H, W), got shape {c.shape}")
    if not 0.0 < fraction <= 1.0:
        raise SkystackError(f"crop fraction {fraction}: use a value in (0, 1], e.g. 0.9")
    n = int(np.nanmax(c)) if n_frames is None else int(n_frames)
    if n <= 0:
        raise SkystackError("coverage map is empty (no frame contributed anywhere); nothing to crop")
    need = math.ceil(fraction * n - 1e-9)
    good = np.nan_to_num(c, nan=0) >= need
    if fill_holes:
        from scipy import ndimage

        good = ndimage.binary_fill_holes(good)
    box = max_rectangle(good)
    if box[1] <= box[0]:
        raise SkystackError(f"no pixel was covered by {need} of {n} frames; lower --crop-fraction "
                            "or pass --no-crop")
    return box


def finite_box(image: np.ndarray) -> Box:
    """Largest rectangle in which every channel has data (no NaN)."""
    img = np.asarray(image)
    fin = np.isfinite(img) if img.ndim == 2 else np.isfinite(img).all(axis=0)
    return max_rectangle(fin)


def apply_box(image: np.ndarray, box: Box) -> np.ndarray:
    """Crop the last two axes of ``image`` to ``box``."""
    y0, y1, x0, x1 = box
    return np.asarray(image)[..., y0:y1, x0:x1]
