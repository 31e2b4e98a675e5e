"""Per-frame normalisation and weights for the combine step.

Each registered frame gets, per channel, a robust location and scale measured
on a sub-sample of its valid pixels: the median, and the MAD-based sigma
(``1.4826 * MAD``) after two rounds of 3-sigma clipping of stars, the same
idea as Siril's IKSS estimator. From these the combine kernel gets a
``scale`` and ``offset`` per frame and channel so that ``v * scale + offset``
puts every frame on the reference frame's level:

* ``none``: scale 1, offset 0;
* ``additive``: offset = loc_ref - loc_i;
* ``multiplicative``: scale = loc_ref / loc_i;
* ``additive+scale``: scale = s_ref / s_i, offset = loc_ref - loc_i * scale.

Weights: ``none`` (1), ``noise`` (``1 / (s_i * scale_i)^2``, inverse variance
after normalisation) or ``stars`` (the frame's quality score).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NORMALIZATIONS = ("none", "additive", "multiplicative", "additive+scale")
WEIGHTINGS = ("none", "noise", "stars")
MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True, kw_only=True)
class FrameStats:
    """Robust location and scale of each channel of one frame."""

    location: np.ndarray  # (C,)
    scale: np.ndarray  # (C,)


def robust_stats(image: np.ndarray, *, sample: int = 200_000) -> FrameStats:
    """Median and clipped MAD-sigma per channel of a ``(C,H,W)`` frame (NaNs ignored)."""
    img = np.asarray(image, dtype=np.float32)
    chans = img.reshape(img.shape[0], -1) if img.ndim == 3 else img.reshape(1, -1)
    locs, scales = [], []
    for c in chans:
        step = max(1, c.size // sample)
        v = c[::step]
        v = v[np.isfinite(v)]
        if v.size == 0:
            locs.append(np.nan)
            scales.append(np.nan)
            continue
        med = float(np.median(v))
        sig = MAD_TO_SIGMA * float(np.median(np.abs(v - med)))
        for _ in range(2):
            if sig <= 0:
                break
            keep = np.abs(v - med) <= 3.0 * sig
            if keep.sum() < 16:
                break
            v = v[keep]
            med = float(np.median(v))
            sig = MAD_TO_SIGMA * float(np.median(np.abs(v - med)))
        locs.append(med)
        scales.append(sig)
    return FrameStats(location=np.asarray(locs, np.float64), scale=np.asarray(scales, np.float64))


def normalization_factors(stats: list[FrameStats], ref: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, offset)`` arrays of shape ``(N, C)`` mapping each frame onto frame ``ref``."""
    if method not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {method!r}")
    loc = np.stack([s.location for s in stats])
    sc = np.stack([s.scale for s in stats])
    n, c = loc.shape
    scale = np.ones((n, c))
    offset = np.zeros((n, c))
    if method == "additive":
        offset = loc[ref] - loc
    elif method == "multiplicative":
        scale = np.where(np.abs(loc) > 1e-12, loc[ref] / np.where(loc == 0, 1, loc), 1.0)
    elif method == "additive+scale":
        scale = np.where(sc > 0, sc[ref] / np.where(sc > 0, sc, 1), 1.0)
        offset = loc[ref] - loc * scale
    scale = np.nan_to_num(scale, nan=1.0)
    offset = np.nan_to_num(offset, nan=0.0)
    return scale.astype(np.float32), offset.astype(np.float32)


def frame_weights(stats: list[FrameStats], scale: np.ndarray, method: str,
                  scores: list[float] | None = None) -> np.ndarray:
    """Weights ``(N, C)`` for the combine (normalised to mean 1)."""
    if method not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {method!r}")
    n, c = scale.shape
    if method == "none":
        w = np.ones((n, c))
    elif method == "noise":
        sig = np.stack([s.scale for s in stats]) * scale
        w = np.where(sig > 0, 1.0 / np.maximum(sig, 1e-30) ** 2, 0.0)
    else:
        sc = np.asarray(scores if scores is not None else np.ones(n), dtype=np.float64)
        w = np.repeat(np.clip(np.nan_to_num(sc), 0, None)[:, None], c, axis=1)
    w = np.nan_to_num(w)
    mean = w.mean(axis=0, keepdims=True)
    return (w / np.where(mean > 0, mean, 1.0)).astype(np.float32)
