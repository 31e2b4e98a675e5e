"""Per-frame normalisation and weights for the combine step.

Each registered frame gets, per channel, a robust location and scale measured
on a sub-sample of its valid pixels: the median, and the MAD-based sigma
(``1.4826 * MAD``) after two rounds of 3-sigma clipping of stars (the idea of
Siril's IKSS estimator), taken after subtracting a coarse block-median
background so that a light-pollution gradient does not pass for scale. From these the combine kernel gets a
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


def _flatten_background(chan: np.ndarray, block: int = 32) -> np.ndarray:
    """``chan`` minus its coarse background (block medians): the dispersion left is noise-like.

    A light-pollution gradient would otherwise dominate the scale estimate and
    frames would be rescaled by their gradient rather than their signal.
    """
    h, w = chan.shape
    hb, wb = h // block, w // block
    if hb < 2 or wb < 2:
        return chan
    core = chan[: hb * block, : wb * block].reshape(hb, block, wb, block)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(core.transpose(0, 2, 1, 3).reshape(hb, wb, -1), axis=2)
    return (core - med[:, None, :, None]).reshape(hb * block, wb * block)


def robust_stats(image: np.ndarray, *, sample: int = 200_000) -> FrameStats:
    """Median, and the clipped MAD-sigma of the background-flattened frame, per channel.

    ``image`` is ``(C,H,W)`` or ``(H,W)``; NaNs are ignored.
    """
    img = np.asarray(image, dtype=np.float32)
    planes = img if img.ndim == 3 else img[None]
    locs, scales = [], []
    for plane in planes:
        step = max(1, plane.size // sample)
        flat = plane.ravel()[::step]
        flat = flat[np.isfinite(flat)]
        locs.append(float(np.median(flat)) if flat.size else np.nan)
        # Sub-sample rows for the scale so that large frames stay cheap.
        rstep = max(1, plane.size // sample)
        v = _flatten_background(plane[::rstep]).ravel()
        v = v[np.isfinite(v)]
        if v.size == 0:
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
