"""Radial lens distortion: one model per session, shared by every frame.

A wide lens (a phone, a 14 mm on a tripod) bends straight lines: a star's
recorded position ``d`` is its ideal pinhole position ``u`` pushed along the
radius from the distortion centre ``c``::

    d = c + (u - c) * (1 + k1 rho^2 + k2 rho^4),   rho = |u - c| / r_norm

``r_norm`` is the half-diagonal of the frame, so ``k1 = -0.03`` moves a
corner 3 % of its distance inwards (barrel). The sky seen by a camera that
does not move turns rigidly about the celestial pole, which in *ideal*
(undistorted) pixels is exactly a homography; so the registration model
"homography + radial" is exact for a fixed tripod and any focal length.

Registration works in ideal pixels: stars are undistorted (:meth:`RadialLens.undistort`,
Newton iterations), matched and fitted with a homography. The stack stays in
the reference frame's own (recorded) geometry, so stars keep the size and
shape the lens gives them there and a still landscape needs no resampling:
the warp maps each output pixel ``p`` to the source frame pixel
``distort(inv(T) undistort(p))`` (the kernels and their NumPy twin,
:func:`skystack.engine.warp._source_coords`, use the same float32 steps).
A lens with ``k1 == k2 == 0`` is the identity and changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, kw_only=True)
class RadialLens:
    """Radial distortion about a centre (see the module docstring).

    Attributes
    ----------
    cx, cy : float
        Distortion centre, pixels ((0, 0) = centre of the top-left pixel).
    r_norm : float
        Normalising radius (px), the frame's half-diagonal.
    k1, k2 : float
        Radial coefficients (negative ``k1``: barrel).
    """

    cx: float
    cy: float
    r_norm: float
    k1: float = 0.0
    k2: float = 0.0

    def __post_init__(self) -> None:
        if not (self.r_norm > 0 and all(math.isfinite(v) for v in (self.cx, self.cy, self.k1, self.k2))):
            raise ValueError(f"invalid lens model {self!r}")

    @classmethod
    def for_shape(cls, shape: tuple[int, int], k1: float = 0.0, k2: float = 0.0) -> "RadialLens":
        """Lens centred on a frame of ``(H, W)`` with ``r_norm`` = its half-diagonal."""
        h, w = shape
        return cls(cx=(w - 1) / 2.0, cy=(h - 1) / 2.0, r_norm=0.5 * math.hypot(w, h), k1=k1, k2=k2)

    @property
    def is_identity(self) -> bool:
        """True when the lens does not distort."""
        return self.k1 == 0.0 and self.k2 == 0.0

    def factor(self, rho2: np.ndarray) -> np.ndarray:
        """Radial factor ``1 + k1 rho^2 + k2 rho^4`` at normalised squared radii."""
        return 1.0 + rho2 * (self.k1 + self.k2 * rho2)

    def distort(self, xy: np.ndarray) -> np.ndarray:
        """Ideal pixels ``(N, 2)`` -> recorded (distorted) pixels."""
        p = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        if self.is_identity:
            return p.copy()
        d = p - (self.cx, self.cy)
        rho2 = (d * d).sum(1) / (self.r_norm * self.r_norm)
        return d * self.factor(rho2)[:, None] + (self.cx, self.cy)

    def undistort(self, xy: np.ndarray, iterations: int = 12) -> np.ndarray:
        """Recorded pixels ``(N, 2)`` -> ideal pixels (Newton on the radius; exact to ~1e-10 px).

        Points beyond the radius where the distortion turns over (no inverse)
        come back NaN.
        """
        p = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        if self.is_identity:
            return p.copy()
        d = p - (self.cx, self.cy)
        rd = np.hypot(d[:, 0], d[:, 1]) / self.r_norm
        ru = rd.copy()
        for _ in range(iterations):
            r2 = ru * ru
            f = ru * (1.0 + r2 * (self.k1 + self.k2 * r2)) - rd
            df = 1.0 + r2 * (3.0 * self.k1 + 5.0 * self.k2 * r2)
            ru = ru - f / np.where(np.abs(df) > 1e-6, df, 1e-6)
        r2 = ru * ru
        bad = (1.0 + r2 * (3.0 * self.k1 + 5.0 * self.k2 * r2) <= 0) | (np.abs(
            ru * (1.0 + r2 * (self.k1 + self.k2 * r2)) - rd) > 1e-6)
        with np.errstate(invalid="ignore", divide="ignore"):
            s = np.where(rd > 0, ru / np.where(rd > 0, rd, 1.0), 1.0 / (1.0 + 0.0 * rd))
        out = d * s[:, None] + (self.cx, self.cy)
        out[bad] = np.nan
        return out

    def kernel_params(self, offset: tuple[float, float] = (0.0, 0.0)) -> tuple[np.float32, ...]:
        """``(ocx, ocy, cx, cy, 1 / r_norm^2, k1, k2)``: the float32 scalars the warp kernels take.

        ``(ocx, ocy)`` is the centre in the output grid (``offset`` = where the
        reference frame's origin lies in it), ``(cx, cy)`` in the source frame.
        """
        vals = (self.cx + offset[0], self.cy + offset[1], self.cx, self.cy, 1.0 / (self.r_norm * self.r_norm),
                self.k1, self.k2)
        return tuple(np.float32(v) for v in vals)

    def to_dict(self) -> dict[str, float]:
        """JSON-serialisable dict (for the report and the FITS header)."""
        return {"cx": self.cx, "cy": self.cy, "r_norm": self.r_norm, "k1": self.k1, "k2": self.k2}
