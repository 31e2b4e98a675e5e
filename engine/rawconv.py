"""Raw conversion: sensor ADU (uint16 CFA mosaic or mono) to normalised float32.

``out = (raw - black[pos]) / (white - black[pos])`` where ``pos`` is the
pixel's place in the 2x2 CFA tile (``pattern``/``black_level`` order of
:mod:`skystack.engine.frame`). Negative results are kept: read noise puts
about half of a bias frame's pixels below the black level, and clipping them
at 0 would bias every mean built from them (masters, the noise floor of the
stack). Values above 1 (over the white level) are kept too.

The GPU path (:func:`cfa_to_float` on a CuPy array) runs ``kernels/rawconv.cu``
on the uint16 data directly, so only 2 bytes per pixel cross the bus.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from skystack.engine.backend import is_device_array, launch, run_cpu
from skystack.engine.errors import SkystackError
from skystack.engine.frame import BAYER_PATTERNS

__all__ = ["cfa_to_float"]


def _levels(pattern: str | None, black_level: Sequence[float], white_level: float
            ) -> tuple[np.ndarray, np.ndarray]:
    """float32 black levels and ranges (white - black) per 2x2 position."""
    if pattern is not None and pattern not in BAYER_PATTERNS:
        raise SkystackError(f"unknown CFA pattern {pattern!r}; expected one of {', '.join(BAYER_PATTERNS)}")
    black = np.asarray(black_level, dtype=np.float64).ravel()
    if black.size == 1:
        black = np.repeat(black, 4)
    if black.size != 4 or not np.all(np.isfinite(black)):
        raise SkystackError(f"black_level must be 4 finite values (2x2 CFA order), got {list(black_level)}")
    white = float(white_level)
    if not np.isfinite(white) or np.any(white <= black):
        raise SkystackError(
            f"white level {white:g} must exceed every black level ({', '.join(f'{b:g}' for b in black)}); "
            "check the file's metadata"
        )
    black32 = black.astype(np.float32)
    range32 = (np.float32(white) - black32).astype(np.float32)
    return black32, range32


def _cfa_to_float_numpy(raw: np.ndarray, black: np.ndarray, rng: np.ndarray,
                        out: np.ndarray) -> np.ndarray:
    """NumPy twin of ``cfa_to_float_u16``/``cfa_to_float_f32`` (same float32 operations)."""
    for pos in range(4):
        y, x = divmod(pos, 2)
        src = raw[..., y::2, x::2].astype(np.float32, copy=False)
        np.divide(np.subtract(src, black[pos], dtype=np.float32), rng[pos],
                  out=out[..., y::2, x::2], dtype=np.float32)
    return out


def cfa_to_float(raw: Any, *, pattern: str | None, black_level: Sequence[float],
                 white_level: float, out: Any | None = None) -> Any:
    """Convert raw ADU to normalised float32 ``(raw - black) / (white - black)``.

    Parameters
    ----------
    raw : ndarray (NumPy or CuPy)
        ``(H, W)`` CFA mosaic or mono image, or ``(..., H, W)`` planes; uint16
        (the fast path), float32, or another integer type (converted to float32).
    pattern : str or None
        Bayer pattern (``"RGGB"``...); None for mono data. Only validated: the
        black levels are applied by 2x2 position either way.
    black_level : sequence of 4 float
        Black level per 2x2 position in row-major order (or one value).
    white_level : float
        Saturation level in ADU.
    out : ndarray, optional
        float32 C-contiguous array of ``raw``'s shape (same backend) to write into.

    Returns
    -------
    ndarray
        float32 array on the same backend as ``raw``; negative values are kept.

    Raises
    ------
    SkystackError
        For an unknown pattern, a black level at or above the white level, or a bad ``out``.
    """
    black, rng = _levels(pattern, black_level, white_level)
    if raw.ndim < 2:
        raise SkystackError(f"raw data must be (H, W) or (..., H, W), got shape {tuple(raw.shape)}")
    dev = is_device_array(raw)
    xp = _xp(raw)
    if out is None:
        out = xp.empty(raw.shape, dtype=xp.float32)
    elif (tuple(out.shape) != tuple(raw.shape) or out.dtype != np.float32
          or not out.flags.c_contiguous or is_device_array(out) != dev):
        raise SkystackError(
            f"out must be a C-contiguous float32 array of shape {tuple(raw.shape)} on the same backend as raw"
        )
    if raw.dtype == np.uint16:
        kernel = "cfa_to_float_u16"
    else:
        kernel = "cfa_to_float_f32"
        if raw.dtype != np.float32:
            raw = raw.astype(xp.float32)
    raw = xp.ascontiguousarray(raw)
    h, w = raw.shape[-2:]
    n = int(raw.size)
    args = (raw, out, np.int64(n), np.int32(w), np.int32(h), *(np.float32(b) for b in black),
            *(np.float32(r) for r in rng))
    if not dev:  # the twin, or the same kernel built for the host (the same bits)
        def native(mod) -> np.ndarray:
            mod.launch(kernel, n, args)
            return out

        return run_cpu("rawconv.cu", kernel, n, lambda: _cfa_to_float_numpy(raw, black, rng, out), native)
    launch("rawconv.cu", kernel, n, args)
    return out


def _xp(a: Any):
    from skystack.engine.backend import array_module

    return array_module(a)
