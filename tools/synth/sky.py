"""The sky's extended parts: the light-pollution gradient, clouds and satellite/aircraft trails.

(Stars and the landscape are rendered by :class:`~skystack.tools.synth.truth.SynthTruth`,
through :func:`~skystack.tools.synth.stamps.render_points` like the trails.)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from skystack.tools.synth.config import SynthConfig
from skystack.tools.synth.stamps import moffat_alpha, render_points


def gradient_ramp(c: SynthConfig) -> np.ndarray:
    """(H, W) ramp in [0, 1] of the light-pollution gradient (sensor coords), float32."""
    h, w = c.height, c.width
    a = math.radians(c.gradient_angle_deg)
    ux, uy = math.cos(a), math.sin(a)
    px = (np.arange(w, dtype=np.float64) - (w - 1) / 2.0) * ux
    py = (np.arange(h, dtype=np.float64) - (h - 1) / 2.0) * uy
    proj = py[:, None] + px[None, :]
    lo, hi = proj.min(), proj.max()
    ramp = ((proj - lo) / (hi - lo)) ** c.gradient_power
    return ramp.astype(np.float32)


def cloud_field(cloud: dict[str, Any], x: np.ndarray, y: np.ndarray, grid: bool, shape: tuple[int, int]
                ) -> np.ndarray:
    """Cloud density c in [0, 1] on a grid (x, y 1-D) or at points, in a frame of ``shape``."""
    blobs = np.asarray(cloud["blobs"], dtype=np.float64)
    norm = cloud_norm(cloud, shape)
    if grid:
        out = np.zeros((len(y), len(x)), dtype=np.float32)
        for bx, by, bs, bw in blobs:
            ex = np.exp(-0.5 * ((x - bx) / bs) ** 2).astype(np.float32)
            ey = np.exp(-0.5 * ((y - by) / bs) ** 2).astype(np.float32)
            out += np.float32(bw) * ey[:, None] * ex[None, :]
        return np.minimum(out / np.float32(norm), np.float32(1.0))
    val = np.zeros(len(x))
    for bx, by, bs, bw in blobs:
        val += bw * np.exp(-0.5 * (((x - bx) / bs) ** 2 + ((y - by) / bs) ** 2))
    return np.minimum(val / norm, 1.0)


def cloud_norm(cloud: dict[str, Any], shape: tuple[int, int]) -> float:
    """The blobs' densest sum over the frame (on a 64 x 48 grid): the density that means c = 1."""
    h, w = shape
    blobs = np.asarray(cloud["blobs"], dtype=np.float64)
    xs = np.linspace(0, w - 1, 64)
    ys = np.linspace(0, h - 1, 48)
    tot = np.zeros((48, 64))
    for bx, by, bs, bw in blobs:
        tot += bw * np.exp(-0.5 * ((ys[:, None] - by) / bs) ** 2) * np.exp(-0.5 * ((xs[None, :] - bx) / bs) ** 2)
    return float(tot.max())


def render_trail(c: SynthConfig, trail: dict[str, Any], shape: tuple[int, int], cmap: np.ndarray | None
                 ) -> np.ndarray:
    """A light's satellite or aircraft trail (ADU through a perfect flat), mosaic or (3, H, W)."""
    tr = trail
    h, w = shape
    x0, y0, x1, y1 = tr["x0"], tr["y0"], tr["x1"], tr["y1"]
    length = math.hypot(x1 - x0, y1 - y0)
    step = 0.5
    n = int(length / step) + 1
    s = np.arange(n) * step
    ux, uy = (x1 - x0) / length, (y1 - y0) / length
    px, py = x0 + s * ux, y0 + s * uy
    b = tr["brightness_adu_per_px"] * step
    alpha = moffat_alpha(tr["width_px"], c.moffat_beta)
    if tr["kind"] == "satellite":
        mod = 1.0 + 0.3 * np.sin(2 * math.pi * s / tr["period_px"] + tr["phase"])
        xs, ys = px, py
        fl = (b * mod)[:, None] * np.array([1.0, 1.0, 0.92])[None, :]
    else:  # aircraft: red and green wing lights, white strobe in the middle
        nx, ny = -uy, ux
        strobe = ((s / 60.0 + tr["phase"]) % 1.0) < 0.2
        xs = np.concatenate([px + 3 * nx, px - 3 * nx, px[strobe]])
        ys = np.concatenate([py + 3 * ny, py - 3 * ny, py[strobe]])
        fl = np.concatenate([
            np.tile([[0.6 * b, 0.08 * b, 0.05 * b]], (n, 1)),
            np.tile([[0.1 * b, 0.6 * b, 0.3 * b]], (n, 1)),
            np.tile([[2.0 * b, 2.0 * b, 2.0 * b]], (int(strobe.sum()), 1)),
        ])
    keep = (xs > -20) & (xs < w + 19) & (ys > -20) & (ys < h + 19)
    xs, ys, fl = xs[keep], ys[keep], fl[keep]
    rad = np.full(len(xs), float(math.ceil(max(4.0 * tr["width_px"], 8.0))))
    return render_points((h, w), xs, ys, fl, alpha=alpha, beta=c.moffat_beta, radius=rad, cmap=cmap)
