"""Robust statistics: the median and the MAD-based standard deviation, in one place.

The spread of nearly every measurement in skystack (sky noise, normalisation
scale, defect thresholds, the stretch's shadow clip, rejection) is the median
absolute deviation scaled to a normal distribution's sigma, as in Siril,
PixInsight and astropy's ``mad_std``. :data:`MAD_TO_SIGMA` is that scale and
:func:`mad_sigma` the float64 figure of a sample; the combine's float32
rejection (``kernels/combine.cu`` and its twin) uses the same constant in
float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["MAD_TO_SIGMA", "mad_sigma", "median_sigma"]

#: ``1 / Phi^-1(3/4)``: a normal distribution's MAD times this is its standard deviation.
MAD_TO_SIGMA = 1.4826


def mad_sigma(values: Any, *, med: float | None = None, xp: Any = np) -> float:
    """``MAD_TO_SIGMA * median(|values - med|)`` as a float.

    Parameters
    ----------
    values : ndarray
        The sample (NumPy, or CuPy with ``xp=cupy``); NaN is not skipped.
    med : float, optional
        Its median, when the caller has it (default: computed).
    xp : module
        The array module of ``values``.
    """
    if med is None:
        med = float(xp.median(values))
    return MAD_TO_SIGMA * float(xp.median(xp.abs(values - med)))


def median_sigma(values: Any, *, xp: Any = np) -> tuple[float, float]:
    """``(median, mad_sigma)`` of ``values`` (see :func:`mad_sigma`)."""
    med = float(xp.median(values))
    return med, mad_sigma(values, med=med, xp=xp)
