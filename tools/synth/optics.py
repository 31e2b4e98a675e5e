"""The simulated optics: vignetting and the flat field (CFA response, PRNU, dust shadows, cold pixels)."""

from __future__ import annotations

import math

import numpy as np

from skystack.tools.synth.camera import Defects
from skystack.tools.synth.config import SynthConfig, stream_rng


def vignetting(c: SynthConfig, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Vignetting (cos^4 law, float32) on rows ``yy`` x columns ``xx``: 1 at the optical centre,
    ``1 - vignetting`` at the farthest corner."""
    h, w = c.height, c.width
    ox = (w - 1) / 2.0 + c.optical_center_offset[0] * w
    oy = (h - 1) / 2.0 + c.optical_center_offset[1] * h
    # normalise so the farthest corner is at rho = 1
    far = max(math.hypot(x - ox, y - oy) for x in (-0.5, w - 0.5) for y in (-0.5, h - 0.5))
    if c.vignetting <= 0:
        return np.ones((len(yy), len(xx)), dtype=np.float32)
    inv_r02 = (1.0 - c.vignetting) ** -0.5 - 1.0  # cos^4: (1 + rho^2/rho0^2)^-2
    dy = ((np.asarray(yy, dtype=np.float64) - oy) / far) ** 2
    dx = ((np.asarray(xx, dtype=np.float64) - ox) / far) ** 2
    rho2 = dy[:, None] + dx[None, :]
    return ((1.0 + rho2 * inv_r02) ** -2).astype(np.float32)


def flat_field(c: SynthConfig, cidx: np.ndarray, defects: Defects) -> np.ndarray:
    """(H, W) float32 flat field: vignetting x CFA response x PRNU x dust x cold pixels.

    ``cidx`` is each pixel's colour (0 = R, 1 = G, 2 = B).
    """
    rng = stream_rng(c.seed, "flat", 1)
    h, w = c.height, c.width
    f = vignetting(c, np.arange(h), np.arange(w))
    resp = np.asarray(c.channel_response, dtype=np.float32)
    f *= resp[cidx]
    f *= (1.0 + c.prnu * rng.standard_normal((h, w), dtype=np.float32))
    for _ in range(c.n_dust):
        _dust_shadow(f, rng, c.dust_depth)
    if len(defects.cold_response):
        f[defects.cold_pixels[:, 0], defects.cold_pixels[:, 1]] *= defects.cold_response.astype(np.float32)
    return f


def _dust_shadow(f: np.ndarray, rng: np.random.Generator, dust_depth: tuple[float, float]) -> None:
    """Multiply ``f`` in place by one out-of-focus dust donut at a random place (draws 4 numbers)."""
    h, w = f.shape
    r0 = rng.uniform(0.01, 0.025) * w
    x0, y0 = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.1 * h, 0.9 * h)
    depth = rng.uniform(*dust_depth)
    rb = int(math.ceil(2.0 * r0)) + 2
    ys = slice(max(0, int(y0) - rb), min(h, int(y0) + rb + 1))
    xs = slice(max(0, int(x0) - rb), min(w, int(x0) + rb + 1))
    yy, xx = np.mgrid[ys, xs]
    rr = np.hypot(xx - x0, yy - y0) / r0
    # out-of-focus dust donut: a soft ring with a shallower centre
    ring = 0.6 + 0.4 * np.exp(-(((rr - 0.8) / 0.2) ** 2))
    shadow = depth * ring * (0.5 - 0.5 * np.tanh((rr - 1.0) / 0.08))
    f[ys, xs] *= (1.0 - shadow).astype(np.float32)
