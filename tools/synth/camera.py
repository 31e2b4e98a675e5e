"""The simulated camera: bias pattern, dark current (with hot pixels and amp glow), pixel defects,
and the exposure that turns a frame's mean into the raw 14-bit values a file holds.

Every function is a pure function of the :class:`~skystack.tools.synth.config.SynthConfig`
(its own random streams); :class:`~skystack.tools.synth.truth.SynthTruth` caches the results.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from skystack.tools.synth.config import SynthConfig, stream_rng
from skystack.tools.synth.records import KIND_CODE


class Defects(NamedTuple):
    """Hot and cold pixels of the sensor.

    Attributes
    ----------
    hot_pixels, cold_pixels : ndarray (n, 2) int64
        (y, x) of hot pixels / cold (low-response or dead) pixels.
    hot_rate_e_s : ndarray (n,)
        Extra dark current of each hot pixel at ``dark_reference_temp_c`` (e-/s).
    cold_response : ndarray (n,)
        Response multiplier of each cold pixel.
    """

    hot_pixels: np.ndarray
    hot_rate_e_s: np.ndarray
    cold_pixels: np.ndarray
    cold_response: np.ndarray


def draw_defects(c: SynthConfig) -> Defects:
    """Hot pixels (log-uniform rates) and cold pixels (uniform response), at distinct places."""
    rng = stream_rng(c.seed, "dark", 1)
    npx = c.height * c.width
    nh = int(round(c.hot_pixel_fraction * npx))
    nc = int(round(c.cold_pixel_fraction * npx))
    idx = rng.choice(npx, size=nh + nc, replace=False) if nh + nc else np.zeros(0, dtype=np.int64)
    hot, cold = np.sort(idx[:nh]), np.sort(idx[nh:])
    lo, hi = c.hot_pixel_rate_e_s
    hot_pixels = np.column_stack(np.divmod(hot, c.width)).astype(np.int64).reshape(-1, 2)
    hot_rate = np.exp(rng.uniform(math.log(lo), math.log(hi), nh))
    cold_pixels = np.column_stack(np.divmod(cold, c.width)).astype(np.int64).reshape(-1, 2)
    cold_response = rng.uniform(*c.cold_pixel_response, nc)
    return Defects(hot_pixels, hot_rate, cold_pixels, cold_response)


def bias_pattern(c: SynthConfig) -> np.ndarray:
    """(H, W) float32 noise-free bias (ADU): CFA black level + fixed column and row patterns."""
    rng = stream_rng(c.seed, "bias")
    col = rng.standard_normal(c.width) * c.bias_column_sigma_adu
    row = rng.standard_normal(c.height) * c.bias_row_sigma_adu
    black = np.asarray(c.black_level, dtype=np.float64).reshape(2, 2)
    b = np.tile(black, (c.height // 2, c.width // 2)) + col[None, :] + row[:, None]
    return b.astype(np.float32)


def dark_rate(c: SynthConfig, defects: Defects) -> np.ndarray:
    """(H, W) float32 dark current (e-/s) at the reference temperature, incl. hot pixels and amp glow."""
    rng = stream_rng(c.seed, "dark", 2)
    h, w = c.height, c.width
    s = c.dark_nonuniformity
    rate = c.dark_current_e_s * np.exp(s * rng.standard_normal((h, w), dtype=np.float32) - 0.5 * s * s)
    rate = rate.astype(np.float32)
    if c.amp_glow_e_s > 0:
        cy = -0.5 if c.amp_glow_corner.startswith("top") else h - 0.5
        cx = -0.5 if c.amp_glow_corner.endswith("left") else w - 0.5
        L = c.amp_glow_scale * math.hypot(w, h)
        dy = (np.arange(h, dtype=np.float32) - np.float32(cy)) ** 2
        dx = (np.arange(w, dtype=np.float32) - np.float32(cx)) ** 2
        rate += np.float32(c.amp_glow_e_s) * np.exp(-np.sqrt(dy[:, None] + dx[None, :]) / np.float32(L))
    if len(defects.hot_rate_e_s):
        rate[defects.hot_pixels[:, 0], defects.hot_pixels[:, 1]] += defects.hot_rate_e_s.astype(np.float32)
    return rate


def dark_factor(c: SynthConfig, temperature_c: float) -> float:
    """Dark-current multiplier ``2**((T - T_ref)/doubling)``."""
    return float(2.0 ** ((temperature_c - c.dark_reference_temp_c) / c.dark_doubling_c))


def poisson(rng: np.random.Generator, lam: np.ndarray) -> np.ndarray:
    """Exact Poisson draws (float32) for a 1-D array of means.

    When the total is small compared with the number of pixels (bias
    frames), the counts are drawn as ``K ~ Poisson(sum)`` events placed
    multinomially with probabilities ``lam / sum`` -- the same joint
    distribution, at a fraction of the cost.
    """
    total = float(lam.sum())
    if lam.size and total < 0.05 * lam.size:
        nev = int(rng.poisson(total))
        cdf = np.cumsum(lam)
        pos = np.searchsorted(cdf, rng.random(nev) * cdf[-1], side="right")
        pos = np.minimum(pos, lam.size - 1)
        return np.bincount(pos, minlength=lam.size).astype(np.float32)
    return rng.poisson(lam).astype(np.float32)


def expose(c: SynthConfig, lam_e: np.ndarray, bias: np.ndarray, kind: str, index: int) -> np.ndarray:
    """The raw uint16 frame of a mean: shot and read noise, row banding, rounding and clipping.

    ``lam_e`` is the frame's mean signal in electrons and ``bias`` its bias in
    ADU (float32, see the package docstring's sensor model); the noise comes
    from the frame's own stream, so the same frame always gets the same noise.
    """
    rng = stream_rng(c.seed, "noise", KIND_CODE[kind], index)
    z = rng.standard_normal(lam_e.shape, dtype=np.float32)
    band = rng.standard_normal(lam_e.shape[0], dtype=np.float32) * np.float32(c.bias_row_noise_adu)
    lam_e = np.maximum(lam_e, np.float32(0.0))
    small = np.flatnonzero(lam_e < np.float32(c.poisson_threshold_e))
    read2 = np.float32(c.read_noise_e ** 2)
    e = lam_e + np.sqrt(lam_e + read2) * z
    if small.size:
        lam_small = lam_e.ravel()[small].astype(np.float64)
        e.ravel()[small] = poisson(rng, lam_small) + np.float32(c.read_noise_e) * z.ravel()[small]
    if kind == "light" and index in tuple(int(i) for i in c.noisy_frames):
        extra = stream_rng(c.seed, "special", 3, index).standard_normal(lam_e.shape, dtype=np.float32)
        e += np.sqrt(np.float32(c.noise_factor ** 2 - 1.0) * (lam_e + read2)) * extra
    adu = bias + e * np.float32(1.0 / c.gain_e_per_adu)
    adu += band[:, None]
    np.rint(adu, out=adu)
    np.clip(adu, 0, c.white_level, out=adu)
    return adu.astype(np.uint16)
