"""The truth records of a synthetic session's frames and stars, and the calibration frames' records.

:class:`LightTruth` (geometry, PSF, sky variations and special effects of one
light), :class:`CalibTruth` (one bias, dark, flat or dark flat),
:class:`TrueStars` (the star list in reference pixels), the session's file
layout (:func:`frame_file`) and :func:`calibration_records`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from dataclasses import dataclass
from typing import Any

import numpy as np

from skystack.tools.synth.config import SynthConfig, iso_utc, stream_rng

FRAME_KINDS = ("light", "bias", "dark", "flat", "dark_flat")
FOLDERS = {"light": "lights", "bias": "bias", "dark": "darks", "flat": "flats", "dark_flat": "darkflats"}
STEMS = {"light": "light", "bias": "bias", "dark": "dark", "flat": "flat", "dark_flat": "darkflat"}
KIND_CODE = {k: i for i, k in enumerate(FRAME_KINDS)}


def frame_file(kind: str, index: int, ext: str) -> str:
    """Path of a frame relative to the session folder (``lights/light_0000.dng``)."""
    return f"{FOLDERS[kind]}/{STEMS[kind]}_{index:04d}.{ext}"


@dataclass(frozen=True, kw_only=True, eq=False)
class LightTruth:
    """Truth of one light frame.

    Attributes
    ----------
    index : int
    file : str
        Path relative to the session folder (``lights/light_0000.dng``).
    time_start : str
        ISO-8601 UTC start of the exposure (what the file records).
    t_mid_s : float
        Mid-exposure time in seconds since the first light started.
    exposure_s, temperature_c : float
    transform : ndarray (3, 3) float64
        Frame pixel -> reference pixel (identity for the reference light).
    rotation_deg : float
        Rotation of the sky in this light relative to the reference, in the
        image's ``(x right, y down)`` frame, positive = clockwise as displayed
        (``phi`` of the module docstring; the transform's own angle
        ``atan2(T[1, 0], T[0, 0])`` is ``-rotation_deg``).
    shift_px : (float, float)
        Drift + jitter ``d_i`` (sensor pixels).
    fwhm_px, beta : float
        Moffat PSF of the light (before trailing/shake).
    sky_scale, gradient_scale, transparency : float
        Multipliers of the sky background, the light-pollution gradient and
        the star fluxes for this light.
    flags : tuple of str
        Subset of ``("trail", "cloudy", "shake", "noisy")``.
    trail : dict or None
        ``kind`` (``satellite``: one line whose brightness varies by +-30 %
        with ``period_px``/``phase``; ``aircraft``: red and green lines 3 px
        either side plus a dashed white strobe), ``x0, y0, x1, y1`` (sensor
        pixels, end points, a little outside the frame),
        ``brightness_adu_per_px`` (through a perfect flat, per pixel of
        length, independent of the exposure), ``width_px`` (Moffat FWHM of
        the cross-section).
    cloud : dict or None
        ``blobs`` (x, y, sigma, weight in sensor px), ``transmission``
        (``t_clear, t_thick``), ``glow`` (background multiplier ``a + b c``).
    shake_offsets : ndarray (K, 2) or None
        Image offsets during the exposure (sensor px, sum zero).
    """

    index: int
    file: str
    time_start: str
    t_mid_s: float
    exposure_s: float
    temperature_c: float
    transform: np.ndarray
    rotation_deg: float
    shift_px: tuple[float, float]
    fwhm_px: float
    beta: float
    sky_scale: float
    gradient_scale: float
    transparency: float
    flags: tuple[str, ...] = ()
    trail: dict[str, Any] | None = None
    cloud: dict[str, Any] | None = None
    shake_offsets: np.ndarray | None = None

    @property
    def trailed(self) -> bool:
        return "trail" in self.flags

    @property
    def cloudy(self) -> bool:
        return "cloudy" in self.flags

    @property
    def shaken(self) -> bool:
        return "shake" in self.flags

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable dict (arrays as nested lists)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["transform"] = self.transform.tolist()
        d["shift_px"] = list(self.shift_px)
        d["flags"] = list(self.flags)
        d["shake_offsets"] = None if self.shake_offsets is None else self.shake_offsets.tolist()
        return d


@dataclass(frozen=True, kw_only=True)
class CalibTruth:
    """Truth of one calibration frame (bias, dark, flat or dark flat).

    ``level_scale`` multiplies the flat illumination (1 for the other kinds).
    """

    kind: str
    index: int
    file: str
    time_start: str
    exposure_s: float
    temperature_c: float
    level_scale: float = 1.0

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable dict."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True, kw_only=True, eq=False)
class TrueStars:
    """Stars in reference pixel coordinates.

    Attributes
    ----------
    xy : ndarray (N, 2) float64
        Position (x, y) in reference pixels (mid-exposure of each light maps
        through the inverse of its transform).
    flux : ndarray (N, 3) float64
        Total R, G, B flux in ADU for one light exposure through a perfect
        flat (before the light's ``transparency`` and clouds); the rendered
        stamp sums to exactly this.
    color_index : ndarray (N,) float64
        B-V-like colour index the R/G and B/G ratios derive from.
    """

    xy: np.ndarray
    flux: np.ndarray
    color_index: np.ndarray

    def __len__(self) -> int:
        return int(self.xy.shape[0])



def calibration_records(c: SynthConfig, t0: _dt.datetime, ext: str) -> tuple[list[CalibTruth], ...]:
    """``(bias, darks, flats, dark_flats)`` records: taken after the lights, darks first.

    Darks start 5 minutes after the last light, then bias, flats and dark
    flats, 2 minutes apart; each flat's illumination scatters by
    ``flat_level_sigma``.
    """
    rng = stream_rng(c.seed, "flat", 99)
    flat_scale = 1.0 + c.flat_level_sigma * rng.standard_normal(max(c.n_flats, 1))
    t = c.n_lights * c.interval + 300.0  # darks 5 minutes after the last light
    out: dict[str, list[CalibTruth]] = {}
    plan = (
        ("dark", c.n_darks, c.exposure_s, c.exposure_s + 2.0, c.dark_temp),
        ("bias", c.n_bias, 1.0 / 4000.0, 1.0, c.dark_temp),
        ("flat", c.n_flats, c.flat_exposure_s, c.flat_exposure_s + 2.0, c.temperature_c),
        ("dark_flat", c.n_dark_flats, c.flat_exposure_s, c.flat_exposure_s + 2.0, c.temperature_c),
    )
    for kind, n, exp, step, temp in plan:
        recs = []
        for i in range(n):
            recs.append(CalibTruth(
                kind=kind, index=i,
                file=frame_file(kind, i, ext),
                time_start=iso_utc(t0 + _dt.timedelta(seconds=float(t))),
                exposure_s=float(exp), temperature_c=float(temp),
                level_scale=float(flat_scale[i]) if kind == "flat" else 1.0,
            ))
            t += step
        t += 120.0
        out[kind] = recs
    return out["bias"], out["dark"], out["flat"], out["dark_flat"]
