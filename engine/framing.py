"""Framing: which part of the sky the stack shows (DeepSkyStacker's standard, intersection and mosaic modes).

* ``reference`` (default): the reference frame's field, the same size as a
  light. Every pixel of it is covered by the reference and, where the sky
  moved, by fewer others; it is the frame a plate solver or an editor expects.
* ``intersection``: the reference canvas cropped, after combining, to the
  largest rectangle that every used frame covers: uniform depth everywhere.
* ``union``: the canvas grows to the bounding box of every frame's field
  (in the reference frame's pixels, its lens included), so the whole sky seen during the night
  is in the stack; each pixel combines only the frames that cover it (the
  COVERAGE map says how many). Capped at :data:`MAX_AREA_FACTOR` times a frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from skystack.engine.errors import SkystackError
from skystack.engine.lens import RadialLens
from skystack.engine.match import transform_points

FRAMINGS = ("reference", "intersection", "union")
#: Largest union canvas, in frame areas (a wild transform must not allocate gigabytes).
MAX_AREA_FACTOR = 4.0


@dataclass(frozen=True, kw_only=True)
class Canvas:
    """Output grid: ``shape`` (H, W) and the shift applied to reference pixels.

    A reference pixel ``(x, y)`` is canvas pixel ``(x + ox, y + oy)`` (integers).
    """

    framing: str
    shape: tuple[int, int]
    ox: float = 0.0
    oy: float = 0.0

    @property
    def shift(self) -> tuple[int, int]:
        """``(ox, oy)`` as integers."""
        return int(round(self.ox)), int(round(self.oy))

    def place(self, img: np.ndarray) -> np.ndarray:
        """A reference-geometry ``(C, H, W)`` image copied onto the canvas (NaN elsewhere)."""
        out = np.full((img.shape[0], *self.shape), np.nan, dtype=np.float32)
        ox, oy = self.shift
        out[:, oy:oy + img.shape[1], ox:ox + img.shape[2]] = img
        return out

    @property
    def offset(self) -> np.ndarray:
        """3x3 translation from reference pixels to canvas pixels."""
        return np.array([[1.0, 0.0, self.ox], [0.0, 1.0, self.oy], [0.0, 0.0, 1.0]])

    def to_dict(self) -> dict:
        """For the report: framing, canvas size and where the reference's (0, 0) lies."""
        return {"framing": self.framing, "shape": list(self.shape), "reference_origin_px": [self.ox, self.oy]}


def border_points(shape: tuple[int, int], n: int = 64) -> np.ndarray:
    """``(4n, 2)`` points along a frame's outer edge (pixel footprint)."""
    h, w = shape
    t = np.linspace(0.0, 1.0, n, endpoint=False)
    x0, x1, y0, y1 = -0.5, w - 0.5, -0.5, h - 0.5
    return np.concatenate([
        np.column_stack([x0 + t * (x1 - x0), np.full(n, y0)]),
        np.column_stack([np.full(n, x1), y0 + t * (y1 - y0)]),
        np.column_stack([x1 - t * (x1 - x0), np.full(n, y1)]),
        np.column_stack([np.full(n, x0), y1 - t * (y1 - y0)]),
    ])


def make_canvas(framing: str, transforms: dict[int, np.ndarray], shape: tuple[int, int],
                lens: RadialLens | None = None) -> Canvas:
    """The output grid for ``framing`` (see the module docstring).

    Parameters
    ----------
    framing : str
        One of :data:`FRAMINGS`.
    transforms : dict
        Frame -> reference transforms (ideal pixels when ``lens`` is given).
    shape : tuple of int
        ``(H, W)`` of a frame.
    lens : RadialLens, optional
        The session's lens: frame borders are undistorted before mapping.
    """
    if framing not in FRAMINGS:
        raise SkystackError(f"framing {framing!r}: use one of {', '.join(FRAMINGS)}")
    h, w = shape
    if framing != "union":
        return Canvas(framing=framing, shape=(h, w))
    edge = border_points(shape)
    if lens is not None:
        edge = lens.undistort(edge)
    pts = np.concatenate([transform_points(t, edge) for t in transforms.values()])
    if lens is not None:
        pts = lens.distort(pts)
    pts = pts[np.isfinite(pts).all(axis=1)]
    lo = np.floor(pts.min(axis=0) + 0.5)
    hi = np.ceil(pts.max(axis=0) - 0.5)
    lo = np.minimum(lo, 0.0)
    hi = np.maximum(hi, [w - 1, h - 1])
    ww, hh = int(hi[0] - lo[0] + 1), int(hi[1] - lo[1] + 1)
    if ww * hh > MAX_AREA_FACTOR * w * h:  # keep the reference centred, clip the rest
        s = (MAX_AREA_FACTOR * w * h / (ww * hh)) ** 0.5
        cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
        lo = np.maximum(lo, np.floor([cx - s * (cx - lo[0]), cy - s * (cy - lo[1])]))
        hi = np.minimum(hi, np.ceil([cx + s * (hi[0] - cx), cy + s * (hi[1] - cy)]))
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, [w - 1, h - 1])  # the reference stays whole
        ww, hh = int(hi[0] - lo[0] + 1), int(hi[1] - lo[1] + 1)
    return Canvas(framing="union", shape=(hh, ww), ox=float(-lo[0]), oy=float(-lo[1]))
