"""The special lights of a session: which lights get a satellite or aircraft trail, a cloud or a
wind shake, and the geometry of each (drawn from the light's own stream)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from skystack.engine.errors import SkystackError
from skystack.tools.synth.config import SynthConfig, stream_rng


def special_indices(c: SynthConfig, ref_index: int) -> dict[str, Any]:
    """``{"trail": {index: kind}, "cloudy": index, "shake": index}`` (``None``: no such light).

    Explicit choices come first, so that the ``"auto"`` ones (spread over the
    session, away from the reference light) avoid them.
    """
    n, r = c.n_lights, ref_index
    used = {r}

    def pick(frac: float) -> int | None:
        if n < 2:
            return None
        base = int(round(frac * (n - 1)))
        for off in range(n):
            for cand in (base + off, base - off):
                if 0 <= cand < n and cand not in used:
                    used.add(cand)
                    return cand
        return None

    def explicit(v: Any, name: str) -> int | None:
        if v is None:
            return None
        v = int(v)
        if not 0 <= v < n:
            raise SkystackError(f"synth config: {name} {v} outside 0..{n - 1}")
        used.add(v)
        return v

    # explicit choices first so "auto" ones avoid them
    trail_cfg, cloud_cfg, shake_cfg = c.trail_frames, c.cloudy_frame, c.shake_frame
    trails: dict[int, str] = {}
    if trail_cfg != "auto":
        for j, v in enumerate(() if trail_cfg is None else tuple(trail_cfg)):
            trails[explicit(v, "trail_frames")] = "satellite" if j == 0 else "aircraft"
    cloudy = explicit(cloud_cfg, "cloudy_frame") if cloud_cfg != "auto" else None
    shake = explicit(shake_cfg, "shake_frame") if shake_cfg != "auto" else None
    if trail_cfg == "auto" and n >= 3:
        i = pick(0.2)
        if i is not None:
            trails[i] = "satellite"
        if n >= 8:
            i = pick(0.65)
            if i is not None:
                trails[i] = "aircraft"
    if cloud_cfg == "auto" and n >= 4:
        cloudy = pick(0.35)
    if shake_cfg == "auto" and n >= 5:
        shake = pick(0.85)
    return {"trail": trails, "cloudy": cloudy, "shake": shake}


def make_trail(c: SynthConfig, i: int, kind: str, fwhm: float) -> dict[str, Any]:
    """Light ``i``'s trail (:class:`~skystack.tools.synth.records.LightTruth` ``trail``): a line
    through the central half of the frame at a random angle, running a little past the border."""
    rng = stream_rng(c.seed, "special", 1, i)
    h, w = c.height, c.width
    # a line through a point in the central half, at a random angle
    cx = w * (0.25 + 0.5 * rng.random())
    cy = h * (0.25 + 0.5 * rng.random())
    ang = rng.uniform(0.0, math.pi)
    ux, uy = math.cos(ang), math.sin(ang)
    ts = []
    m = 8.0  # run a little past the border
    for lim, p0, u0 in ((-m, cx, ux), (w - 1 + m, cx, ux), (-m, cy, uy), (h - 1 + m, cy, uy)):
        if abs(u0) > 1e-9:
            ts.append((lim - p0) / u0)
    tpos = min(t for t in ts if t > 0)
    tneg = max(t for t in ts if t < 0)
    x0, y0 = cx + tneg * ux, cy + tneg * uy
    x1, y1 = cx + tpos * ux, cy + tpos * uy
    bright = (1500.0 if kind == "satellite" else 900.0) * (0.8 + 0.4 * rng.random())
    return {
        "kind": kind, "x0": float(x0), "y0": float(y0), "x1": float(x1), "y1": float(y1),
        "brightness_adu_per_px": float(bright), "width_px": float(fwhm),
        "phase": float(rng.uniform(0, 2 * math.pi)),
        "period_px": float(rng.uniform(150.0, 400.0)),
    }


def make_cloud(c: SynthConfig, i: int) -> dict[str, Any]:
    """Light ``i``'s cloud: Gaussian blobs, its transmission and its glow."""
    rng = stream_rng(c.seed, "special", 2, i)
    h, w = c.height, c.width
    nb = 14
    blobs = np.column_stack([
        rng.uniform(-0.2 * w, 1.2 * w, nb), rng.uniform(-0.2 * h, 1.2 * h, nb),
        rng.uniform(0.15, 0.4, nb) * math.hypot(w, h), rng.uniform(0.3, 1.0, nb),
    ])
    return {"blobs": blobs.tolist(), "transmission": [0.15, 0.02], "glow": [1.4, 1.2]}


def make_shake(c: SynthConfig, i: int) -> np.ndarray:
    """Light ``i``'s wind shake: (11, 2) image offsets during the exposure (sensor px, sum zero)."""
    rng = stream_rng(c.seed, "special", 3, i)
    k = 11
    tau = np.linspace(-0.5, 0.5, k)
    ang = rng.uniform(0, math.pi)
    u = np.array([math.cos(ang), math.sin(ang)])
    v = np.array([-u[1], u[0]])
    a = c.shake_px
    off = (a * np.sin(2 * math.pi * tau))[:, None] * u + (0.3 * a * np.sin(6 * math.pi * tau))[:, None] * v
    off -= off.mean(axis=0)  # exactly centred (already zero by symmetry)
    return off
