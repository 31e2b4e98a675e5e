"""Midtones-transfer-function autostretch (Siril / PixInsight STF style).

For each channel (or all channels together when *linked*):

* shadows clip ``c0 = median - 2.8 * sigma`` with ``sigma = 1.4826 * MAD``;
* the midtones balance ``m`` is chosen so that the background (the median)
  lands on ``target_background`` (0.25) after the stretch;
* ``out = MTF_m((x - c0) / (1 - c0))`` clipped to [0, 1].

*Linked* (the default) shares one midtones balance ``m`` across channels (the
mean of the per-channel ones) so every channel gets the same curve and star
colours keep their ratios, but clips the shadows per channel, which
neutralises a light-pollution colour cast in the background. *Unlinked*
stretches each channel on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skystack.engine.robust import median_sigma


@dataclass(frozen=True, kw_only=True)
class StretchConfig:
    """Autostretch settings."""

    shadows_sigma: float = 2.8
    target_background: float = 0.25
    linked: bool = True
    sample: int = 500_000  # pixels used for the statistics


def mtf(x: np.ndarray | float, m: float) -> np.ndarray | float:
    """Midtones transfer function: 0 -> 0, m -> 0.5, 1 -> 1."""
    x = np.asarray(x, dtype=np.float64) if not np.isscalar(x) else float(x)
    return (m - 1.0) * x / ((2.0 * m - 1.0) * x - m)


def stretch_params(channel: np.ndarray, config: StretchConfig = StretchConfig()) -> tuple[float, float]:
    """Return ``(c0, m)`` for one channel (NaNs ignored)."""
    v = _sample(channel, config.sample)
    if v.size == 0:
        return 0.0, 0.5
    med, sigma = median_sigma(v)
    c0 = min(max(med - config.shadows_sigma * sigma, float(v.min())), med)
    hi = 1.0
    x = (med - c0) / (hi - c0) if hi > c0 else 0.0
    if x <= 0.0:
        return c0, 0.5
    m = float(mtf(min(x, 1.0), config.target_background))  # MTF inverse identity
    return c0, min(max(m, 1e-6), 1.0 - 1e-6)


def autostretch(image: np.ndarray, config: StretchConfig = StretchConfig()) -> np.ndarray:
    """Stretch a linear image ((H,W) or (3,H,W), normalised units) to [0, 1] float32."""
    img = np.asarray(image, dtype=np.float32)
    chans = img[None] if img.ndim == 2 else img
    params = [stretch_params(c, config) for c in chans]
    if config.linked and len(params) > 1:
        m = float(np.mean([p[1] for p in params]))
        params = [(p[0], m) for p in params]
    out = np.empty_like(chans)
    for i, (c, (c0, m)) in enumerate(zip(chans, params)):
        x = np.clip((c - c0) / max(1.0 - c0, 1e-12), 0.0, 1.0)
        x = np.nan_to_num(x, nan=0.0)
        out[i] = np.clip(mtf(x, m), 0.0, 1.0)
    return out[0] if img.ndim == 2 else out


def to_8bit(stretched: np.ndarray) -> np.ndarray:
    """(3,H,W) or (H,W) in [0,1] -> (H,W,3) or (H,W) uint8 for PNG/JPEG (uint8 input: returned as it is)."""
    if stretched.dtype == np.uint8:
        return stretched
    a = np.nan_to_num(stretched)  # one working copy, the arithmetic in place
    a *= 255.0
    a += 0.5
    a = np.clip(a, 0, 255, out=a).astype(np.uint8)
    return np.moveaxis(a, 0, -1) if a.ndim == 3 else a


def _sample(channel: np.ndarray, n: int) -> np.ndarray:
    flat = np.asarray(channel, dtype=np.float32).ravel()
    if flat.size > n:
        step = flat.size // n
        flat = flat[::step]
    return flat[np.isfinite(flat)]
