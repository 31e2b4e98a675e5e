"""Synthetic night simulator: a fixed-tripod session with exact ground truth.

:func:`simulate` writes a whole session (lights, bias, darks, flats, dark
flats as DNG or FITS) plus ``truth.json``/``truth.npz``; :func:`load_truth`
(or :func:`build_truth` for a config, without any file) returns a
:class:`SynthTruth` that re-renders every noise-free component exactly as the
writer used it. Everything is a pure function of :class:`SynthConfig` (seeded
``numpy`` generators, one independent stream per component and per frame).

Sensor model (per pixel ``(y, x)`` of CFA colour ``c``; ADU = raw 14-bit DN)::

    raw = clip(rint(bias(y, x) + band_f(y)
                    + [N_e + read_e * z] / gain), 0, white)
    N_e ~ Poisson(gain * (flat(y, x) * S(y, x) + dark(y, x; t, T)))

* ``bias`` -- :meth:`SynthTruth.bias_pattern`: black level of the 2x2 CFA
  position + fixed column and row patterns (ADU). ``band_f`` is a per-frame,
  zero-mean row banding (``bias_row_noise_adu``); ``z ~ N(0, 1)``.
* ``dark`` -- :meth:`SynthTruth.dark_signal` (ADU above bias): dark current
  ``t * 2**((T - T_ref)/doubling) * (rate * DSNU + hot + amp glow) / gain``.
* ``flat`` -- :meth:`SynthTruth.flat_field` (dimensionless, 1 = perfect):
  vignetting (cos^4 law, 1 at the optical centre) x per-channel CFA response
  (G = 1) x PRNU x dust shadows x cold/dead-pixel response.
* ``S`` -- :meth:`SynthTruth.sky`: the noise-free sky in ADU *as the pixel would
  record it through a perfect flat* (flat = 1: no vignetting, no PRNU, CFA
  response 1), for the frame's exposure: uniform sky background x cloud glow +
  light-pollution gradient + stars (point-sampled Moffat stamps) + trails.
  Flats use ``S = flat_level * flat_color[c] * level_scale``; bias and darks
  ``S = 0``.
* Shot noise is exact Poisson for ``lambda < poisson_threshold_e`` electrons
  and the normal approximation above it, drawn together with the read noise
  as ``lambda + sqrt(lambda + read_e^2) z`` (``poisson_threshold_e = 0``:
  normal approximation everywhere, the fastest setting for big sessions).
* Everything is computed in float32 like the writer does; the float64 arrays
  the truth methods return are those float32 values.

Geometry (fixed tripod): every light is the reference sky rotated about the
celestial pole ``P`` (a point in reference pixels, outside the frame by
default) by ``phi_i = omega * (t_mid_i - t_mid_ref)`` (sidereal rate; the
northern sky turns counter-clockwise on the displayed image), plus a small
drift/jitter ``d_i``::

    sensor_i = P + R(phi_i) (ref - P) + d_i,   R(phi) = [[cos, -sin], [sin, cos]]

The truth transform of light ``i`` is the inverse (frame pixel -> reference
pixel, the convention of :mod:`skystack.engine.frame`: (0, 0) is the centre
of the top-left pixel). The light at ``reference_index`` has the identity.
Stars trail during an exposure; each star is rendered as a Moffat elongated
along its own trail (second moments of the trail matched), centred on its
mid-exposure position, so star centroids follow the transforms exactly.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import json
import math
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from skystack.engine.errors import OutputError, SkystackError
from skystack.engine.frame import BAYER_PATTERNS

__all__ = [
    "SynthConfig",
    "SynthTruth",
    "LightTruth",
    "CalibTruth",
    "TrueStars",
    "simulate",
    "build_truth",
    "load_truth",
    "moffat_alpha",
]

TRUTH_VERSION = 1
FRAME_KINDS = ("light", "bias", "dark", "flat", "dark_flat")
_FOLDERS = {"light": "lights", "bias": "bias", "dark": "darks", "flat": "flats", "dark_flat": "darkflats"}
_STEMS = {"light": "light", "bias": "bias", "dark": "dark", "flat": "flat", "dark_flat": "darkflat"}
_IMAGETYP = {"light": "LIGHT", "bias": "BIAS", "dark": "DARK", "flat": "FLAT", "dark_flat": "DARKFLAT"}
_KIND_CODE = {k: i for i, k in enumerate(FRAME_KINDS)}
# independent random streams (SeedSequence([seed, stream, ...]))
_STREAM = {"geometry": 11, "stars": 12, "bias": 13, "dark": 14, "flat": 15, "special": 16, "noise": 17}
_SIDEREAL_DEG_PER_H = 15.041
_EPS_ADU = 0.05  # stamps extend until the Moffat wing falls below this (ADU)
_RADIUS_BUCKETS = (5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96)
_CHUNK = 1 << 20  # stamp pixels per vectorised chunk
_FLUSH = 1 << 25  # stamp pixels accumulated per bincount


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True, kw_only=True)
class SynthConfig:
    """Everything that defines a synthetic session (all outputs derive from it).

    Session and camera
    ------------------
    seed : int (>= 0); width, height : even ints (>= 64); n_lights, n_bias,
    n_darks, n_flats, n_dark_flats : frame counts; pattern : Bayer pattern;
    file_format : ``"dng"`` or ``"fits"``; exposure_s : light exposure;
    interval_s : light cadence, start to start (default ``exposure_s + 2``);
    start_time : ISO-8601 UTC start of the first light; reference_index :
    light used as the reference (default ``n_lights // 2``); make, model, iso,
    focal_length_mm, f_number, pixel_pitch_um : recorded in the files.

    Sensor
    ------
    gain_e_per_adu, read_noise_e; black_level : 4 values in 2x2 CFA order;
    white_level (14-bit: 16383); bias_column_sigma_adu / bias_row_sigma_adu :
    fixed column/row pattern; bias_row_noise_adu : per-frame row banding;
    temperature_c (lights; they drift linearly by temperature_drift_c over the
    session), dark_temperature_c (darks and bias, default temperature_c);
    dark_current_e_s at dark_reference_temp_c, doubling every dark_doubling_c;
    dark_nonuniformity : log-normal sigma of the dark current per pixel;
    hot_pixel_fraction with rates log-uniform in hot_pixel_rate_e_s (at the
    reference temperature); cold_pixel_fraction with response uniform in
    cold_pixel_response; amp_glow_e_s at the amp_glow_corner pixel, falling as
    exp(-distance / (amp_glow_scale * diagonal)); poisson_threshold_e.

    Optics and flats
    ----------------
    channel_response (R, G, B) : CFA quantum-efficiency ratios (G = 1);
    prnu : pixel response non-uniformity (sigma); vignetting : fractional
    fall-off at the frame corners relative to the optical centre (cos^4
    law); optical_center_offset : optical centre offset (fractions of
    width/height); n_dust, dust_depth : dust shadows in the flat;
    flat_level_adu : flat illumination of G through a perfect flat (ADU),
    flat_color (R, G, B); flat_exposure_s; flat_level_sigma : frame-to-frame
    flat brightness scatter.

    Sky
    ---
    sky_adu_s (R, G, B) : sky background rate through a perfect flat;
    gradient : light-pollution excess at the bright edge relative to the G
    sky; gradient_angle_deg : direction towards the light pollution (0 = +x,
    90 = +y, i.e. down); gradient_color (R, G, B); gradient_power : shape of
    the ramp; sky_scale_sigma, gradient_scale_sigma, transparency_sigma :
    frame-to-frame variation; star_density : stars per megapixel with G flux
    >= star_flux_min_adu_s; star_flux_max_adu_s; star_flux_index : power law
    N(>F) ~ F**-index; fwhm_range : per-light Moffat FWHM (px), drawn
    uniformly; moffat_beta (> 2).

    Geometry
    --------
    rotation_deg_per_hour (sidereal 15.041); hemisphere : ``"north"``
    (counter-clockwise on the image) or ``"south"``; pole_xy : celestial pole
    in reference pixels (default from pole_frac, fractions of width/height);
    drift_px_per_frame (dx, dy); jitter_px (sigma per axis);
    rotation_smear : stars trail along their arcs during the exposure.

    Special lights (``"auto"`` picks indices away from the reference;
    ``None``/``()`` disables): trail_frames (first a satellite, then an
    aircraft), cloudy_frame, shake_frame, shake_px (amplitude of the wind
    shake, px); noisy_frames (indices, default none) are rendered with
    noise_factor times the natural noise (extra Gaussian noise of variance
    ``(noise_factor**2 - 1) * (lambda + read_noise**2)`` electrons, same signal).

    Fixed-tripod scene (``scene="tripod"``, :mod:`skystack.tools.synth_scene`)
    ---------------------------------------------------------------------------
    Stars on the celestial sphere turning at the sidereal rate for
    latitude_deg, seen by a camera aimed at pointing_az_deg / pointing_alt_deg
    with a horizontal field of view fov_deg (pinhole) and radial distortion
    lens_k1, lens_k2 (the geometry fields above are ignored); landscape :
    ground below an irregular horizon covering the bottom landscape_height
    of the frame (hill, tree line, house), of brightness ground_level times
    the G sky, with n_static_lights fixed lights of about static_light_adu.
    """

    # session
    seed: int = 0
    width: int = 1600
    height: int = 1200
    n_lights: int = 12
    n_bias: int = 8
    n_darks: int = 8
    n_flats: int = 8
    n_dark_flats: int = 8
    pattern: str = "RGGB"
    file_format: str = "dng"
    exposure_s: float = 20.0
    interval_s: float | None = None
    start_time: str = "2025-03-01T21:00:00+00:00"
    reference_index: int | None = None
    make: str = "Skystack"
    model: str = "SynthCam 14"
    iso: int = 1600
    focal_length_mm: float = 24.0
    f_number: float = 2.8
    pixel_pitch_um: float = 4.3
    # sensor
    gain_e_per_adu: float = 0.8
    read_noise_e: float = 3.0
    black_level: tuple[float, float, float, float] = (2046.0, 2048.0, 2049.0, 2051.0)
    white_level: int = 16383
    bias_column_sigma_adu: float = 1.2
    bias_row_sigma_adu: float = 0.4
    bias_row_noise_adu: float = 0.5
    temperature_c: float = 15.0
    temperature_drift_c: float = 0.0
    dark_temperature_c: float | None = None
    dark_current_e_s: float = 0.15
    dark_reference_temp_c: float = 20.0
    dark_doubling_c: float = 6.0
    dark_nonuniformity: float = 0.3
    hot_pixel_fraction: float = 2e-4
    hot_pixel_rate_e_s: tuple[float, float] = (2.0, 200.0)
    cold_pixel_fraction: float = 3e-5
    cold_pixel_response: tuple[float, float] = (0.0, 0.15)
    amp_glow_e_s: float = 4.0
    amp_glow_corner: str = "top-right"
    amp_glow_scale: float = 0.08
    poisson_threshold_e: float = 100.0
    # optics, flats
    channel_response: tuple[float, float, float] = (0.52, 1.0, 0.68)
    prnu: float = 0.006
    vignetting: float = 0.23
    optical_center_offset: tuple[float, float] = (0.02, -0.015)
    n_dust: int = 2
    dust_depth: tuple[float, float] = (0.03, 0.08)
    flat_level_adu: float = 6000.0
    flat_color: tuple[float, float, float] = (0.95, 1.0, 1.1)
    flat_exposure_s: float = 0.5
    flat_level_sigma: float = 0.01
    # sky
    sky_adu_s: tuple[float, float, float] = (52.0, 60.0, 45.0)
    gradient: float = 0.27
    gradient_angle_deg: float = 100.0
    gradient_color: tuple[float, float, float] = (1.35, 1.0, 0.7)
    gradient_power: float = 1.5
    sky_scale_sigma: float = 0.02
    gradient_scale_sigma: float = 0.05
    transparency_sigma: float = 0.03
    star_density: float = 1500.0
    star_flux_min_adu_s: float = 15.0
    star_flux_max_adu_s: float = 1.5e5
    star_flux_index: float = 0.9
    fwhm_range: tuple[float, float] = (2.5, 4.0)
    moffat_beta: float = 3.0
    # geometry
    rotation_deg_per_hour: float = _SIDEREAL_DEG_PER_H
    hemisphere: str = "north"
    pole_xy: tuple[float, float] | None = None
    pole_frac: tuple[float, float] = (0.3, -0.8)
    drift_px_per_frame: tuple[float, float] = (0.04, -0.03)
    jitter_px: float = 0.25
    rotation_smear: bool = True
    # special lights
    trail_frames: Any = "auto"
    cloudy_frame: Any = "auto"
    shake_frame: Any = "auto"
    shake_px: float = 4.0
    # fixed-tripod scene (tools/synth_scene.py; synth_scene.tripod_config() is a phone night)
    scene: str = "telescope"
    latitude_deg: float = 45.0
    pointing_az_deg: float = 180.0
    pointing_alt_deg: float = 35.0
    fov_deg: float = 66.0
    lens_k1: float = 0.0
    lens_k2: float = 0.0
    landscape: bool = False
    landscape_height: float = 0.25
    ground_level: float = 0.25
    n_static_lights: int = 6
    static_light_adu: float = 3000.0
    noisy_frames: tuple[int, ...] = ()
    noise_factor: float = 2.0

    # -- derived -------------------------------------------------------------

    @property
    def interval(self) -> float:
        """Light cadence in seconds (start to start)."""
        return float(self.exposure_s + 2.0 if self.interval_s is None else self.interval_s)

    @property
    def ref_index(self) -> int:
        """Index of the reference light."""
        return self.n_lights // 2 if self.reference_index is None else int(self.reference_index)

    @property
    def dark_temp(self) -> float:
        """Sensor temperature of darks and bias frames."""
        return float(self.temperature_c if self.dark_temperature_c is None else self.dark_temperature_c)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of the fields."""
        d = dataclasses.asdict(self)
        return json.loads(json.dumps(d))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SynthConfig":
        """Inverse of :meth:`to_dict` (lists become tuples)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {}
        for k, v in d.items():
            if k in names:
                kw[k] = tuple(v) if isinstance(v, list) else v
        return cls(**kw)

    def validate(self) -> None:
        """Raise :class:`SkystackError` naming the offending field."""

        def bad(msg: str) -> None:
            raise SkystackError(f"synth config: {msg}")

        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            bad(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.width < 64 or self.height < 64 or self.width % 2 or self.height % 2:
            bad(f"size {self.width}x{self.height}: width and height must be even and >= 64")
        for name in ("n_lights", "n_bias", "n_darks", "n_flats", "n_dark_flats"):
            if getattr(self, name) < 0:
                bad(f"{name} must be >= 0")
        if self.pattern not in BAYER_PATTERNS:
            bad(f"pattern {self.pattern!r} unknown; use one of {', '.join(BAYER_PATTERNS)}")
        if self.file_format not in ("dng", "fits"):
            bad(f"file_format {self.file_format!r}: use 'dng' or 'fits'")
        if not self.exposure_s > 0 or not self.interval > 0:
            bad("exposure_s and interval_s must be > 0")
        if self.interval < self.exposure_s:
            bad(f"interval_s {self.interval} is shorter than exposure_s {self.exposure_s}")
        if self.n_lights and not 0 <= self.ref_index < self.n_lights:
            bad(f"reference_index {self.reference_index} outside 0..{self.n_lights - 1}")
        if len(self.black_level) != 4 or not all(0 <= b < self.white_level for b in self.black_level):
            bad("black_level needs 4 values in 0..white_level")
        if not 0 < self.white_level <= 65535:
            bad("white_level must be in 1..65535")
        if not self.moffat_beta > 2.0:
            bad(f"moffat_beta must be > 2, got {self.moffat_beta}")
        lo, hi = self.fwhm_range
        if not 0.8 <= lo <= hi <= 30:
            bad(f"fwhm_range {self.fwhm_range} must satisfy 0.8 <= lo <= hi <= 30")
        if self.scene not in ("telescope", "tripod"):
            bad(f"scene {self.scene!r}: use 'telescope' or 'tripod'")
        if self.scene == "tripod" and not (5.0 <= self.fov_deg <= 120.0 and -89 <= self.latitude_deg <= 89
                                           and -10 <= self.pointing_alt_deg <= 89):
            bad("tripod scene: fov_deg in 5..120, latitude_deg in -89..89, pointing_alt_deg in -10..89")
        if self.landscape and self.scene != "tripod":
            bad("landscape needs scene='tripod'")
        if self.hemisphere not in ("north", "south"):
            bad(f"hemisphere {self.hemisphere!r}: use 'north' or 'south'")
        if self.amp_glow_corner not in ("top-left", "top-right", "bottom-left", "bottom-right"):
            bad(f"amp_glow_corner {self.amp_glow_corner!r}: top-left/top-right/bottom-left/bottom-right")
        if not self.gain_e_per_adu > 0:
            bad("gain_e_per_adu must be > 0")
        if any(not 0 <= int(i) < self.n_lights for i in self.noisy_frames) or not self.noise_factor >= 1:
            bad(f"noisy_frames must be light indices and noise_factor >= 1, got {self.noisy_frames} "
                f"{self.noise_factor}")
        if not 0 < self.star_flux_min_adu_s < self.star_flux_max_adu_s:
            bad("need 0 < star_flux_min_adu_s < star_flux_max_adu_s")
        try:
            _parse_time(self.start_time)
        except ValueError:
            bad(f"start_time {self.start_time!r} is not ISO-8601")


def _parse_time(text: str) -> _dt.datetime:
    t = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    return t.astimezone(_dt.timezone.utc)


def _iso(t: _dt.datetime) -> str:
    return t.astimezone(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _rng(seed: int, stream: str, *extra: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), _STREAM[stream], *map(int, extra)]))


def moffat_alpha(fwhm: float, beta: float) -> float:
    """Moffat core width ``alpha`` for a FWHM: ``fwhm / (2 sqrt(2**(1/beta) - 1))``."""
    return float(fwhm) / (2.0 * math.sqrt(2.0 ** (1.0 / float(beta)) - 1.0))


# ----------------------------------------------------------------------------- truth records


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


# ----------------------------------------------------------------------------- rendering core


def _cfa_map(pattern: str) -> np.ndarray:
    """2x2 array of channel indices (0=R, 1=G, 2=B) of a Bayer pattern."""
    idx = {"R": 0, "G": 1, "B": 2}
    return np.array([[idx[pattern[0]], idx[pattern[1]]], [idx[pattern[2]], idx[pattern[3]]]], dtype=np.intp)


def _stamp_radius(flux_max: np.ndarray, alpha: float, beta: float, extra: np.ndarray | float) -> np.ndarray:
    """Radius where the Moffat wing of the brightest channel falls below _EPS_ADU."""
    peak = np.maximum(flux_max, 1e-9) * (beta - 1.0) / (math.pi * alpha * alpha)
    r = alpha * np.sqrt(np.maximum((peak / _EPS_ADU) ** (1.0 / beta) - 1.0, 0.0))
    r = np.maximum(r, 2.5 * alpha) + extra
    return np.minimum(np.ceil(r), _RADIUS_BUCKETS[-1])


def _render_points(
    shape: tuple[int, int],
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    *,
    alpha: float,
    beta: float,
    radius: np.ndarray,
    ux: np.ndarray | None = None,
    uy: np.ndarray | None = None,
    k: np.ndarray | None = None,
    cmap: np.ndarray | None = None,
) -> np.ndarray:
    """Sum of point-sampled Moffat stamps, each normalised to its flux.

    Each point gets a square stamp of half-size ``radius`` centred on the
    nearest pixel; the profile ``(1 + r^T M^-1 r / alpha^2)^-beta`` is sampled
    at pixel centres and scaled so the whole stamp (including any part off
    the image) sums to the flux. ``flux`` is (n, 3) R, G, B. Elongation along
    the unit vector (ux, uy) uses ``M = I + e^2/alpha^2 u u^T`` given as
    ``k = e^2 / (alpha^2 + e^2)``. Returns the (H, W) mosaic when ``cmap``
    (2x2 channel indices) is given, else (3, H, W); float64.
    """
    h, w = shape
    nch = 1 if cmap is not None else 3
    acc = np.zeros((nch, h * w), dtype=np.float64)
    n = x.shape[0]
    if n == 0:
        return acc.reshape((h, w) if cmap is not None else (3, h, w))
    ix = np.rint(x).astype(np.int64)
    iy = np.rint(y).astype(np.int64)
    fx = (x - ix).astype(np.float32)
    fy = (y - iy).astype(np.float32)
    inv_a2 = np.float32(1.0 / (alpha * alpha))
    ibeta = int(round(beta))
    integer_beta = abs(beta - ibeta) < 1e-12
    buckets = np.asarray(_RADIUS_BUCKETS)
    bidx = np.minimum(np.searchsorted(buckets, radius), len(buckets) - 1)
    rb_all = buckets[bidx]
    interior = (ix - rb_all >= 0) & (ix + rb_all < w) & (iy - rb_all >= 0) & (iy + rb_all < h)
    # group stars that share stamp size, pixel parity (so the same CFA layout) and interior-ness
    key = (bidx * 2 + (iy & 1)) * 2 + (ix & 1)
    key = key * 2 + interior
    flux32 = flux.astype(np.float32)
    pend_idx: list[np.ndarray] = []
    pend_val: list[list[np.ndarray]] = [[] for _ in range(nch)]
    pending = 0

    def flush() -> None:
        nonlocal pending
        if not pend_idx:
            return
        allidx = np.concatenate(pend_idx)
        for c in range(nch):
            acc[c] += np.bincount(allidx, weights=np.concatenate(pend_val[c]), minlength=h * w)
            pend_val[c].clear()
        pend_idx.clear()
        pending = 0

    for kv in np.unique(key):
        sel_all = np.flatnonzero(key == kv)
        b = int(kv // 8)
        py, px, inner = int(kv // 4 % 2), int(kv // 2 % 2), bool(kv % 2)
        rb = int(buckets[b])
        s = 2 * rb + 1
        d = np.arange(-rb, rb + 1, dtype=np.int64)
        df = d.astype(np.float32)
        offs = d[:, None] * w + d[None, :]  # (s, s) flat offsets
        if cmap is not None:
            lay = cmap[(py + d)[:, None] & 1, (px + d)[None, :] & 1]  # (s, s) channel per stamp pixel
            masks = [(lay == c).astype(np.float32) for c in range(3)]
        per = max(1, _CHUNK // (s * s))
        for c0 in range(0, sel_all.size, per):
            sel = sel_all[c0:c0 + per]
            rx = df[None, None, :] - fx[sel][:, None, None]  # (m,1,s)
            ry = df[None, :, None] - fy[sel][:, None, None]  # (m,s,1)
            q = rx * rx + ry * ry
            if k is not None:
                t = ux[sel].astype(np.float32)[:, None, None] * rx + uy[sel].astype(np.float32)[:, None, None] * ry
                q -= k[sel].astype(np.float32)[:, None, None] * (t * t)
            q *= inv_a2
            q += np.float32(1.0)
            if integer_beta:
                v = np.reciprocal(q, out=q)
                if ibeta > 1:
                    t1 = v.copy()
                    for _ in range(ibeta - 1):
                        v *= t1
            else:
                v = np.power(q, np.float32(-beta), out=q)
            norm = (1.0 / v.sum(axis=(1, 2), dtype=np.float64)).astype(np.float32)
            base = iy[sel] * w + ix[sel]
            idx = base[:, None, None] + offs[None]
            if not inner:
                X = ix[sel][:, None, None] + d[None, None, :]
                Y = iy[sel][:, None, None] + d[None, :, None]
                valid = (X >= 0) & (X < w) & (Y >= 0) & (Y < h)
                idx = idx[valid]
            else:
                valid = None
                idx = idx.ravel()
            f = flux32[sel] * norm[:, None]  # (m, 3) flux per unit profile
            pend_idx.append(idx)
            pending += idx.size
            if cmap is not None:
                wgt = (f[:, 0, None, None] * masks[0] + f[:, 1, None, None] * masks[1]
                       + f[:, 2, None, None] * masks[2])
                vals = v * wgt
                pend_val[0].append(vals[valid] if valid is not None else vals.ravel())
            else:
                for c in range(3):
                    vals = v * f[:, c, None, None]
                    pend_val[c].append(vals[valid] if valid is not None else vals.ravel())
            if pending >= _FLUSH:
                flush()
    flush()
    return acc.reshape((h, w) if cmap is not None else (3, h, w))


def _poisson(rng: np.random.Generator, lam: np.ndarray) -> np.ndarray:
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


# ----------------------------------------------------------------------------- truth / model


class SynthTruth:
    """Ground truth of a synthetic session and exact re-rendering of its parts.

    Build with :func:`build_truth` (from a config, no files) or
    :func:`load_truth` (from ``truth.json``). All images are float64 numpy
    arrays of shape (H, W) (CFA mosaic, full resolution, sensor pixels) unless
    stated; colour images are (3, H, W) R, G, B. Units are raw ADU (14-bit DN).

    Attributes
    ----------
    config : SynthConfig
    root : Path or None
        Session folder (``file`` names of frames are relative to it).
    reference_index : int
    lights : list of LightTruth
    bias, darks, flats, dark_flats : list of CalibTruth
    stars : TrueStars
        Every star any light can see (reference pixel coordinates).
    pole_xy : (float, float)
        Celestial pole in reference pixels.
    omega_rad_s : float
        Signed rotation rate (rad/s) of the sky in the image frame.
    hot_pixels, cold_pixels : ndarray (n, 2) int
        (y, x) of hot pixels / cold (low-response or dead) pixels.
    hot_rate_e_s : ndarray (n,)
        Extra dark current of each hot pixel at ``dark_reference_temp_c`` (e-/s).
    cold_response : ndarray (n,)
        Response multiplier of each cold pixel (included in :meth:`flat_field`).
    """

    def __init__(self, config: SynthConfig, *, root: Path | None = None) -> None:
        config.validate()
        self.config = config
        self.root = root
        self._h, self._w = config.height, config.width
        self.reference_index = config.ref_index if config.n_lights else 0
        self._cmap = _cfa_map(config.pattern)
        self._t0 = _parse_time(config.start_time)
        sign = -1.0 if config.hemisphere == "north" else 1.0
        self.omega_rad_s = sign * math.radians(config.rotation_deg_per_hour) / 3600.0
        if config.pole_xy is not None:
            self.pole_xy = (float(config.pole_xy[0]), float(config.pole_xy[1]))
        else:
            self.pole_xy = (config.pole_frac[0] * config.width, config.pole_frac[1] * config.height)
        self.lights = self._make_lights()
        self.bias, self.darks, self.flats, self.dark_flats = self._make_calib()
        self.stars = self._make_stars()
        self._make_defects()
        self._cache: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ public helpers

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of every frame."""
        return (self._h, self._w)

    def frames(self, kind: str) -> list:
        """Truth records of one kind: ``light``, ``bias``, ``dark``, ``flat``, ``dark_flat``."""
        table = {"light": self.lights, "bias": self.bias, "dark": self.darks,
                 "flat": self.flats, "dark_flat": self.dark_flats}
        if kind not in table:
            raise SkystackError(f"unknown frame kind {kind!r}; use one of {', '.join(FRAME_KINDS)}")
        return table[kind]

    def transforms(self) -> np.ndarray:
        """(n_lights, 3, 3) frame -> reference transforms."""
        return np.stack([lt.transform for lt in self.lights]) if self.lights else np.zeros((0, 3, 3))

    def sensor_from_reference(self, index: int) -> np.ndarray:
        """3x3 reference -> sensor matrix of light ``index`` (inverse of its transform)."""
        return self._ref_to_sensor[index].copy()

    def project_stars(self, index: int) -> np.ndarray:
        """(N, 2) positions of all stars in light ``index`` sensor pixels (mid-exposure; NaN: not in view)."""
        if self.scene is not None:
            return self.scene.project(self._star_vec, self._t_mid[index])
        m = self._ref_to_sensor[index]
        xy = self.stars.xy
        return xy @ m[:2, :2].T + m[:2, 2]

    def channel_index(self) -> np.ndarray:
        """(H, W) int8 colour of each pixel: 0 = R, 1 = G, 2 = B."""
        return self._cidx().astype(np.int8)

    def defect_map(self) -> np.ndarray:
        """(H, W) uint8: 0 normal, 1 hot pixel, 2 cold/dead pixel."""
        m = np.zeros(self.shape, dtype=np.uint8)
        m[self.hot_pixels[:, 0], self.hot_pixels[:, 1]] = 1
        m[self.cold_pixels[:, 0], self.cold_pixels[:, 1]] = 2
        return m

    def bias_pattern(self) -> np.ndarray:
        """Noise-free bias (ADU): CFA black level + fixed column and row patterns.

        The per-frame row banding and read noise average to zero, so a master
        bias converges to this.
        """
        return self._bias32().astype(np.float64)

    def dark_signal(self, exposure_s: float, temperature_c: float | None = None) -> np.ndarray:
        """Mean dark signal (ADU above bias) for an exposure at a sensor temperature.

        ``exposure_s * 2**((T - T_ref) / doubling) * (rate * DSNU + hot + glow) / gain``;
        exactly linear in exposure, includes hot pixels and amp glow.
        ``temperature_c`` defaults to the dark-frame temperature.
        """
        t = self.config.dark_temp if temperature_c is None else float(temperature_c)
        return self._dark32(float(exposure_s), t).astype(np.float64)

    def dark_factor(self, temperature_c: float) -> float:
        """Dark-current multiplier ``2**((T - T_ref)/doubling)``."""
        c = self.config
        return float(2.0 ** ((temperature_c - c.dark_reference_temp_c) / c.dark_doubling_c))

    def flat_field(self) -> np.ndarray:
        """Flat field (dimensionless): vignetting x CFA response x PRNU x dust x cold pixels.

        G response is 1 and vignetting is 1 at the optical centre, so the
        maximum is about 1. A flat frame's mean is ``bias + dark(flat exp.) +
        flat_field * flat_level_adu * flat_color[c] * level_scale``.
        """
        return self._flat32().astype(np.float64)

    def vignetting(self) -> np.ndarray:
        """Vignetting alone (1 at the optical centre, ``1 - vignetting`` at the far corner)."""
        return self._vignetting(np.arange(self._h), np.arange(self._w)).astype(np.float64)

    def flat_illumination(self, index: int | None = None) -> np.ndarray:
        """(H, W) flat-panel illumination in ADU through a perfect flat (flat frame ``index``)."""
        c = self.config
        scale = 1.0 if index is None else self.flats[index].level_scale
        col = np.asarray(c.flat_color, dtype=np.float64) * c.flat_level_adu * scale
        return col[self._cidx()]

    def sky(
        self,
        index: int | None = None,
        *,
        stars: bool = True,
        background: bool = True,
        gradient: bool = True,
        trail: bool = True,
        cfa: bool = False,
        fwhm: float | None = None,
    ) -> np.ndarray:
        """Noise-free sky in ADU through a perfect flat (no bias, dark, vignetting, PRNU, CFA response).

        Parameters
        ----------
        index : int or None
            A light: render in its sensor coordinates with everything the
            file had (its PSF and trailing, transparency, sky/gradient scale,
            clouds, shake, trail). ``None``: the reference pixel grid with
            the star list as is (transparency 1, no trailing, no clouds,
            trail or shake), sky and gradient scales 1. The gradient is
            fixed to the sensor (the ground), so this is where it lies in the
            reference light; in the other lights it is not rotated with the
            sky.
        stars, background, gradient, trail : bool
            Components to include (``background`` is the uniform sky).
        cfa : bool
            Return the (H, W) mosaic (each pixel its own colour, what
            multiplies :meth:`flat_field`) instead of (3, H, W) R, G, B.
        fwhm : float, optional
            PSF FWHM for ``index=None`` (default: the reference light's).
        """
        cmap = self._cmap if cfa else None
        out = self._sky(index, stars=stars, background=background, gradient=gradient,
                        trail=trail, cmap=cmap, fwhm=fwhm)
        return out

    def expected_raw(self, kind: str, index: int) -> np.ndarray:
        """Noise-free mean of a frame in ADU (before noise, rounding and clipping).

        ``bias_pattern() + dark_signal(exposure, temperature) + flat_field() * S``
        with ``S = sky(index, cfa=True)`` for lights, ``flat_illumination(index)``
        for flats and 0 for bias and darks (float32 arithmetic, as rendered).
        """
        lam_e, bias = self._mean_parts(kind, index)
        return bias.astype(np.float64) + lam_e.astype(np.float64) / self.config.gain_e_per_adu

    def render_frame(self, kind: str, index: int) -> np.ndarray:
        """The exact uint16 array :func:`simulate` writes for this frame (deterministic)."""
        c = self.config
        lam_e, bias = self._mean_parts(kind, index)
        rng = _rng(c.seed, "noise", _KIND_CODE[kind], index)
        z = rng.standard_normal(lam_e.shape, dtype=np.float32)
        band = rng.standard_normal(self._h, dtype=np.float32) * np.float32(c.bias_row_noise_adu)
        lam_e = np.maximum(lam_e, np.float32(0.0))
        small = np.flatnonzero(lam_e < np.float32(c.poisson_threshold_e))
        read2 = np.float32(c.read_noise_e ** 2)
        e = lam_e + np.sqrt(lam_e + read2) * z
        if small.size:
            lam_small = lam_e.ravel()[small].astype(np.float64)
            e.ravel()[small] = _poisson(rng, lam_small) + np.float32(c.read_noise_e) * z.ravel()[small]
        if kind == "light" and index in tuple(int(i) for i in c.noisy_frames):
            extra = _rng(c.seed, "special", 3, index).standard_normal(lam_e.shape, dtype=np.float32)
            e += np.sqrt(np.float32(c.noise_factor ** 2 - 1.0) * (lam_e + read2)) * extra
        adu = bias + e * np.float32(1.0 / c.gain_e_per_adu)
        adu += band[:, None]
        np.rint(adu, out=adu)
        np.clip(adu, 0, c.white_level, out=adu)
        return adu.astype(np.uint16)

    def file_path(self, kind: str, index: int) -> Path:
        """Absolute path of a frame file (needs :attr:`root`)."""
        if self.root is None:
            raise SkystackError("this truth has no session folder (built from a config); use simulate()")
        return self.root / self.frames(kind)[index].file

    # ------------------------------------------------------------------ geometry

    def _make_lights(self) -> list[LightTruth]:
        c = self.config
        n = c.n_lights
        r = self.reference_index
        # one stream per light: its draws do not depend on the number of lights
        u = np.zeros((n, 8))
        g = np.zeros((n, 8))
        for i in range(n):
            rng = _rng(c.seed, "geometry", i)
            u[i] = rng.random(8)
            g[i] = rng.standard_normal(8)
        t_start = np.arange(n) * c.interval
        t_mid = t_start + 0.5 * c.exposure_s
        phi = self.omega_rad_s * (t_mid - (t_mid[r] if n else 0.0))
        drift = np.asarray(c.drift_px_per_frame, dtype=np.float64)
        px, py = self.pole_xy
        specials = self._special_indices()
        lights = []
        self._ref_to_sensor = []
        self._t_mid = t_mid
        self.scene = None
        if c.scene == "tripod":
            from skystack.tools.synth_scene import TripodScene

            self.scene = TripodScene(c, t_mid, r)
            phi = np.array([math.radians(self.scene.rotation_deg(i)) for i in range(n)])
        for i in range(n):
            d = drift * (i - r) + c.jitter_px * g[i, :2]
            if i == r or self.scene is not None:
                d = np.zeros(2)
            cs, sn = math.cos(phi[i]), math.sin(phi[i])
            R = np.array([[cs, -sn], [sn, cs]])
            P = np.array([px, py])
            m = np.eye(3)
            m[:2, :2] = R
            m[:2, 2] = P + d - R @ P
            t = np.eye(3)
            t[:2, :2] = R.T
            t[:2, 2] = P - R.T @ (P + d)
            if i == r:
                m, t = np.eye(3), np.eye(3)
            elif self.scene is not None:  # ideal (undistorted) pixels; the lens is in truth.lens
                t = self.scene.homography(i)
                m = np.linalg.inv(t)
            self._ref_to_sensor.append(m)
            lo, hi = c.fwhm_range
            fwhm = lo + (hi - lo) * u[i, 0]
            temp = c.temperature_c + (c.temperature_drift_c * (i / (n - 1) - 0.5) if n > 1 else 0.0)
            flags: list[str] = []
            trail = cloud = shake = None
            kind = specials["trail"].get(i)
            if kind is not None:
                flags.append("trail")
                trail = self._make_trail(i, kind, fwhm)
            if i == specials["cloudy"]:
                flags.append("cloudy")
                cloud = self._make_cloud(i)
            if i == specials["shake"]:
                flags.append("shake")
                shake = self._make_shake(i)
            if i in tuple(int(k) for k in c.noisy_frames):
                flags.append("noisy")
            lights.append(LightTruth(
                index=i,
                file=f"{_FOLDERS['light']}/{_STEMS['light']}_{i:04d}.{self._ext}",
                time_start=_iso(self._t0 + _dt.timedelta(seconds=float(t_start[i]))),
                t_mid_s=float(t_mid[i]),
                exposure_s=float(c.exposure_s),
                temperature_c=float(temp),
                transform=t,
                rotation_deg=float(math.degrees(phi[i])),
                shift_px=(float(d[0]), float(d[1])),
                fwhm_px=float(fwhm),
                beta=float(c.moffat_beta),
                sky_scale=float(1.0 + c.sky_scale_sigma * g[i, 2]),
                gradient_scale=float(max(0.0, 1.0 + c.gradient_scale_sigma * g[i, 3])),
                transparency=float(1.0 - abs(c.transparency_sigma * g[i, 4])),
                flags=tuple(flags),
                trail=trail,
                cloud=cloud,
                shake_offsets=shake,
            ))
        return lights

    @property
    def _ext(self) -> str:
        return "dng" if self.config.file_format == "dng" else "fits"

    def _special_indices(self) -> dict[str, Any]:
        c = self.config
        n, r = c.n_lights, self.reference_index
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

    def _make_trail(self, i: int, kind: str, fwhm: float) -> dict[str, Any]:
        c = self.config
        rng = _rng(c.seed, "special", 1, i)
        h, w = self._h, self._w
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

    def _make_cloud(self, i: int) -> dict[str, Any]:
        c = self.config
        rng = _rng(c.seed, "special", 2, i)
        h, w = self._h, self._w
        nb = 14
        blobs = np.column_stack([
            rng.uniform(-0.2 * w, 1.2 * w, nb), rng.uniform(-0.2 * h, 1.2 * h, nb),
            rng.uniform(0.15, 0.4, nb) * math.hypot(w, h), rng.uniform(0.3, 1.0, nb),
        ])
        return {"blobs": blobs.tolist(), "transmission": [0.15, 0.02], "glow": [1.4, 1.2]}

    def _make_shake(self, i: int) -> np.ndarray:
        c = self.config
        rng = _rng(c.seed, "special", 3, i)
        k = 11
        tau = np.linspace(-0.5, 0.5, k)
        ang = rng.uniform(0, math.pi)
        u = np.array([math.cos(ang), math.sin(ang)])
        v = np.array([-u[1], u[0]])
        a = c.shake_px
        off = (a * np.sin(2 * math.pi * tau))[:, None] * u + (0.3 * a * np.sin(6 * math.pi * tau))[:, None] * v
        off -= off.mean(axis=0)  # exactly centred (already zero by symmetry)
        return off

    def _make_calib(self) -> tuple[list[CalibTruth], ...]:
        c = self.config
        rng = _rng(c.seed, "flat", 99)
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
                    file=f"{_FOLDERS[kind]}/{_STEMS[kind]}_{i:04d}.{self._ext}",
                    time_start=_iso(self._t0 + _dt.timedelta(seconds=float(t))),
                    exposure_s=float(exp), temperature_c=float(temp),
                    level_scale=float(flat_scale[i]) if kind == "flat" else 1.0,
                ))
                t += step
            t += 120.0
            out[kind] = recs
        return out["bias"], out["dark"], out["flat"], out["dark_flat"]

    # ------------------------------------------------------------------ stars

    def _coverage(self, margin: float) -> tuple[float, float, float, float, bool]:
        """(r_min, r_max, theta_lo, theta_hi, full) around the pole covering every light."""
        h, w = self._h, self._w
        P = np.array(self.pole_xy)
        x0, x1, y0, y1 = -0.5 - margin, w - 0.5 + margin, -0.5 - margin, h - 0.5 + margin
        corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
        rmin, rmax = np.inf, 0.0
        angles = []
        full = False

        def near(a: float, ref: float) -> float:  # the branch of angle a closest to ref
            return ref + (a - ref + math.pi) % (2 * math.pi) - math.pi

        cen0 = None
        for i, lt in enumerate(self.lights):
            m = self._ref_to_sensor[i]
            pole_s = m[:2, :2] @ P + m[:2, 2]  # pole in sensor coords
            qx = min(max(pole_s[0], x0), x1)
            qy = min(max(pole_s[1], y0), y1)
            rmin = min(rmin, math.hypot(pole_s[0] - qx, pole_s[1] - qy))
            rmax = max(rmax, float(np.max(np.hypot(*(corners - pole_s).T))))
            if x0 <= pole_s[0] <= x1 and y0 <= pole_s[1] <= y1:
                full = True
            ref_c = corners @ lt.transform[:2, :2].T + lt.transform[:2, 2]
            cen = float(np.arctan2(np.mean(ref_c[:, 1]) - P[1], np.mean(ref_c[:, 0]) - P[0]))
            if cen0 is None:
                cen0 = cen
            # unwrap continuously with the sky rotation (sessions may turn by more than 180 deg)
            cen = near(cen, cen0 - math.radians(lt.rotation_deg - self.lights[0].rotation_deg))
            a = np.arctan2(ref_c[:, 1] - P[1], ref_c[:, 0] - P[0])
            angles.extend(near(float(v), cen) for v in a)
        if not self.lights:
            full = True
            rmin, rmax = 0.0, 1.0
        lo, hi = min(angles, default=0.0), max(angles, default=0.0)
        if full or hi - lo >= 2 * math.pi:
            return 0.0, rmax, 0.0, 2 * math.pi, True
        return rmin, rmax, lo, hi, False

    def _make_stars(self) -> TrueStars:
        c = self.config
        rng = _rng(c.seed, "stars")
        if self.scene is not None:
            self._star_vec = self.scene.make_star_vectors(rng, c.star_density)
            n = len(self._star_vec)
            xy = self.scene.project(self._star_vec, self._t_mid[self.reference_index]) if self.lights \
                else np.full((n, 2), np.nan)
            return self._star_fluxes(rng, xy)
        margin = float(_RADIUS_BUCKETS[-1]) + c.shake_px + 8.0
        rmin, rmax, lo, hi, _ = self._coverage(margin)
        area = 0.5 * (hi - lo) * (rmax * rmax - rmin * rmin)
        n = int(rng.poisson(c.star_density * area / 1e6)) if self.lights else 0
        rad = np.sqrt(rng.uniform(rmin * rmin, rmax * rmax, n))
        th = rng.uniform(lo, hi, n)
        xy = np.column_stack([self.pole_xy[0] + rad * np.cos(th), self.pole_xy[1] + rad * np.sin(th)])
        return self._star_fluxes(rng, xy)

    def _star_fluxes(self, rng: np.random.Generator, xy: np.ndarray) -> TrueStars:
        c = self.config
        n = len(xy)
        # truncated power law N(>F) ~ F^-g between F_min and F_max (G channel, per light exposure)
        g = c.star_flux_index
        fmin = c.star_flux_min_adu_s * c.exposure_s
        fmax = c.star_flux_max_adu_s * c.exposure_s
        uu = rng.random(n)
        fg = fmin * (1.0 - uu * (1.0 - (fmax / fmin) ** (-g))) ** (-1.0 / g)
        bv = np.clip(rng.normal(0.65, 0.35, n), -0.3, 2.0)
        fr = fg * 10.0 ** (0.25 * (bv - 0.65))
        fb = fg * 10.0 ** (-0.35 * (bv - 0.65))
        return TrueStars(xy=xy, flux=np.column_stack([fr, fg, fb]), color_index=bv)

    # ------------------------------------------------------------------ fixed patterns

    def _make_defects(self) -> None:
        c = self.config
        rng = _rng(c.seed, "dark", 1)
        npx = self._h * self._w
        nh = int(round(c.hot_pixel_fraction * npx))
        nc = int(round(c.cold_pixel_fraction * npx))
        idx = rng.choice(npx, size=nh + nc, replace=False) if nh + nc else np.zeros(0, dtype=np.int64)
        hot, cold = np.sort(idx[:nh]), np.sort(idx[nh:])
        lo, hi = c.hot_pixel_rate_e_s
        self.hot_pixels = np.column_stack(np.divmod(hot, self._w)).astype(np.int64).reshape(-1, 2)
        self.hot_rate_e_s = np.exp(rng.uniform(math.log(lo), math.log(hi), nh))
        self.cold_pixels = np.column_stack(np.divmod(cold, self._w)).astype(np.int64).reshape(-1, 2)
        self.cold_response = rng.uniform(*c.cold_pixel_response, nc)

    def _cidx(self) -> np.ndarray:
        if "cidx" not in self._cache:
            h, w = self._h, self._w
            self._cache["cidx"] = np.tile(self._cmap.astype(np.uint8), (h // 2, w // 2))
        return self._cache["cidx"]

    def _bias32(self) -> np.ndarray:
        if "bias" not in self._cache:
            c = self.config
            rng = _rng(c.seed, "bias")
            col = rng.standard_normal(self._w) * c.bias_column_sigma_adu
            row = rng.standard_normal(self._h) * c.bias_row_sigma_adu
            black = np.asarray(c.black_level, dtype=np.float64).reshape(2, 2)
            b = np.tile(black, (self._h // 2, self._w // 2)) + col[None, :] + row[:, None]
            self._cache["bias"] = b.astype(np.float32)
        return self._cache["bias"]

    def _dark_rate32(self) -> np.ndarray:
        """Dark current (e-/s) at the reference temperature, incl. hot pixels and amp glow."""
        if "dark_rate" not in self._cache:
            c = self.config
            rng = _rng(c.seed, "dark", 2)
            h, w = self._h, self._w
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
            if len(self.hot_rate_e_s):
                rate[self.hot_pixels[:, 0], self.hot_pixels[:, 1]] += self.hot_rate_e_s.astype(np.float32)
            self._cache["dark_rate"] = rate
        return self._cache["dark_rate"]

    def _dark32(self, exposure_s: float, temperature_c: float) -> np.ndarray:
        """Dark signal in ADU (float32)."""
        c = self.config
        f = np.float32(exposure_s * self.dark_factor(temperature_c) / c.gain_e_per_adu)
        return self._dark_rate32() * f

    def _vignetting(self, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        c = self.config
        h, w = self._h, self._w
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

    def _flat32(self) -> np.ndarray:
        if "flat" not in self._cache:
            c = self.config
            rng = _rng(c.seed, "flat", 1)
            h, w = self._h, self._w
            f = self._vignetting(np.arange(h), np.arange(w))
            resp = np.asarray(c.channel_response, dtype=np.float32)
            f *= resp[self._cidx()]
            f *= (1.0 + c.prnu * rng.standard_normal((h, w), dtype=np.float32))
            for _ in range(c.n_dust):
                r0 = rng.uniform(0.01, 0.025) * w
                x0, y0 = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.1 * h, 0.9 * h)
                depth = rng.uniform(*c.dust_depth)
                rb = int(math.ceil(2.0 * r0)) + 2
                ys = slice(max(0, int(y0) - rb), min(h, int(y0) + rb + 1))
                xs = slice(max(0, int(x0) - rb), min(w, int(x0) + rb + 1))
                yy, xx = np.mgrid[ys, xs]
                rr = np.hypot(xx - x0, yy - y0) / r0
                # out-of-focus dust donut: a soft ring with a shallower centre
                ring = 0.6 + 0.4 * np.exp(-(((rr - 0.8) / 0.2) ** 2))
                shadow = depth * ring * (0.5 - 0.5 * np.tanh((rr - 1.0) / 0.08))
                f[ys, xs] *= (1.0 - shadow).astype(np.float32)
            if len(self.cold_response):
                f[self.cold_pixels[:, 0], self.cold_pixels[:, 1]] *= self.cold_response.astype(np.float32)
            self._cache["flat"] = f
        return self._cache["flat"]

    def _gradient_unit(self) -> np.ndarray:
        """(H, W) ramp in [0, 1] of the light-pollution gradient (sensor coords), float32."""
        if "grad" not in self._cache:
            c = self.config
            h, w = self._h, self._w
            a = math.radians(c.gradient_angle_deg)
            ux, uy = math.cos(a), math.sin(a)
            px = (np.arange(w, dtype=np.float64) - (w - 1) / 2.0) * ux
            py = (np.arange(h, dtype=np.float64) - (h - 1) / 2.0) * uy
            proj = py[:, None] + px[None, :]
            lo, hi = proj.min(), proj.max()
            ramp = ((proj - lo) / (hi - lo)) ** c.gradient_power
            self._cache["grad"] = ramp.astype(np.float32)
        return self._cache["grad"]

    # ------------------------------------------------------------------ sky

    def _cloud_field(self, cloud: dict[str, Any], x: np.ndarray, y: np.ndarray, grid: bool) -> np.ndarray:
        """Cloud density c in [0, 1] on a grid (x, y 1-D) or at points."""
        blobs = np.asarray(cloud["blobs"], dtype=np.float64)
        norm = self._cloud_norm(cloud)
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

    def _cloud_norm(self, cloud: dict[str, Any]) -> float:
        blobs = np.asarray(cloud["blobs"], dtype=np.float64)
        xs = np.linspace(0, self._w - 1, 64)
        ys = np.linspace(0, self._h - 1, 48)
        tot = np.zeros((48, 64))
        for bx, by, bs, bw in blobs:
            tot += bw * np.exp(-0.5 * ((ys[:, None] - by) / bs) ** 2) * np.exp(-0.5 * ((xs[None, :] - bx) / bs) ** 2)
        return float(tot.max())

    def _sky(self, index: int | None, *, stars: bool, background: bool, gradient: bool, trail: bool,
             cmap: np.ndarray | None, fwhm: float | None) -> np.ndarray:
        c = self.config
        h, w = self._h, self._w
        lt = self.lights[index] if index is not None else None
        out_shape = (h, w) if cmap is not None else (3, h, w)
        out = np.zeros(out_shape, dtype=np.float64)
        cloud_c = None
        if lt is not None and lt.cloud is not None:
            cloud_c = self._cloud_field(lt.cloud, np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64), True)
        if background or gradient:
            sky_scale = lt.sky_scale if lt is not None else 1.0
            g_scale = lt.gradient_scale if lt is not None else 1.0
            sky_lvl = np.asarray(c.sky_adu_s, dtype=np.float64) * c.exposure_s
            bg = np.zeros(out_shape, dtype=np.float32)
            if background:
                lvl = (sky_lvl * sky_scale).astype(np.float32)
                if cmap is not None:
                    bg += lvl[self._cidx()]
                else:
                    bg += lvl[:, None, None]
            if gradient and c.gradient > 0:
                gcol = (np.asarray(c.gradient_color) * c.gradient * sky_lvl[1] * g_scale).astype(np.float32)
                ramp = self._gradient_unit()
                if cmap is not None:
                    bg += gcol[self._cidx()] * ramp
                else:
                    bg += gcol[:, None, None] * ramp[None]
            if cloud_c is not None:
                a, b = lt.cloud["glow"]
                bg *= np.float32(a) + np.float32(b) * cloud_c
            out += bg
        if stars and len(self.stars):
            out += self._render_stars(lt, cmap, fwhm, cloud_c is not None)
        if trail and lt is not None and lt.trail is not None:
            out += self._render_trail(lt, cmap)
        if self.scene is not None and c.landscape:
            out = self._with_landscape(out, lt, cmap, fwhm, ground=background, lights=stars)
        return out

    def _with_landscape(self, sky: np.ndarray, lt: LightTruth | None, cmap: np.ndarray | None,
                        fwhm: float | None, *, ground: bool = True, lights: bool = True) -> np.ndarray:
        """The sky hidden below the horizon, the ground (a background) and its fixed lights (sources)."""
        c = self.config
        if "land" not in self._cache:
            cov = self.scene.coverage().astype(np.float64)
            self._cache["land"] = (cov, self.scene.ground_brightness(c.sky_adu_s[1] * c.exposure_s).astype(
                np.float64), self.scene.static_lights())
        cov, ground_img, pts_all = self._cache["land"]
        out = sky * (1.0 - cov)
        if ground:
            g = ground_img
            if cmap is not None:
                ci = self._cidx()
                g = np.where(ci == 0, g[0], np.where(ci == 1, g[1], g[2]))
            out += g * cov
        if lights and len(pts_all["xy"]):
            f = lt.fwhm_px if lt is not None else (fwhm or self.lights[self.reference_index].fwhm_px)
            alpha = moffat_alpha(f, c.moffat_beta)
            rad = _stamp_radius(pts_all["flux"].max(axis=1), alpha, c.moffat_beta, 0.0)
            out += _render_points(self.shape, pts_all["xy"][:, 0], pts_all["xy"][:, 1], pts_all["flux"],
                                  alpha=alpha, beta=c.moffat_beta, radius=rad, cmap=cmap)
        return out

    def horizon_mask(self) -> np.ndarray:
        """(H, W) bool: landscape pixels (sensor geometry); all False without a landscape."""
        if self.scene is None or not self.config.landscape:
            return np.zeros(self.shape, dtype=bool)
        return self.scene.mask()

    def static_lights(self) -> dict[str, np.ndarray]:
        """Fixed landscape lights: ``xy`` (N, 2) sensor px, ``flux`` (N, 3) ADU; empty without a landscape."""
        if self.scene is None or not self.config.landscape:
            return {"xy": np.zeros((0, 2)), "flux": np.zeros((0, 3))}
        return self.scene.static_lights()

    @property
    def lens(self):
        """The :class:`~skystack.engine.lens.RadialLens` of the session (identity for the telescope scene)."""
        from skystack.engine.lens import RadialLens

        return self.scene.lens if self.scene is not None else RadialLens.for_shape(self.shape)

    def mapping(self, index: int, xy: np.ndarray) -> np.ndarray:
        """Exact map of light ``index``'s sensor pixels ``(N, 2)`` to the reference light's sensor pixels."""
        lens = self.lens
        from skystack.engine.match import transform_points

        return lens.distort(transform_points(self.lights[index].transform, lens.undistort(xy)))

    def _render_stars(self, lt: LightTruth | None, cmap: np.ndarray | None, fwhm: float | None,
                      cloudy: bool) -> np.ndarray:
        c = self.config
        h, w = self._h, self._w
        beta = c.moffat_beta
        if lt is None:
            f = fwhm if fwhm is not None else (self.lights[self.reference_index].fwhm_px if self.lights else 3.0)
            xy = self.stars.xy
            flux = self.stars.flux
            L = None
            shake = None
        else:
            f = lt.fwhm_px
            xy = self.project_stars(lt.index)
            flux = self.stars.flux * lt.transparency
            shake = lt.shake_offsets
            L = None
            if self.scene is not None:
                half = 0.5 * lt.exposure_s
                p0 = self.scene.project(self._star_vec, lt.t_mid_s - half)
                p1 = self.scene.project(self._star_vec, lt.t_mid_s + half)
                vx = np.nan_to_num(p1[:, 0] - p0[:, 0])
                vy = np.nan_to_num(p1[:, 1] - p0[:, 1])
                L = np.hypot(vx, vy)
            elif c.rotation_smear:
                pole_s = self._ref_to_sensor[lt.index] @ np.array([*self.pole_xy, 1.0])
                vx = -(xy[:, 1] - pole_s[1]) * self.omega_rad_s * lt.exposure_s
                vy = (xy[:, 0] - pole_s[0]) * self.omega_rad_s * lt.exposure_s
                L = np.hypot(vx, vy)
        alpha = moffat_alpha(f, beta)
        extra = np.zeros(len(xy))
        if L is not None:
            extra += 0.5 * L
        kk = 1 if shake is None else len(shake)
        reach = 0.0 if shake is None else float(np.max(np.hypot(shake[:, 0], shake[:, 1])))
        radius = _stamp_radius(flux.max(axis=1) / kk, alpha, beta, extra)  # one (sub-)stamp
        cull = radius + reach
        xy = np.nan_to_num(xy, nan=-1e9)
        inside = ((xy[:, 0] + cull >= 0) & (xy[:, 0] - cull <= w - 1)
                  & (xy[:, 1] + cull >= 0) & (xy[:, 1] - cull <= h - 1))
        sel = np.flatnonzero(inside)
        xs, ys, fl, rad = xy[sel, 0], xy[sel, 1], flux[sel], radius[sel]
        if cloudy:
            tc, tt = lt.cloud["transmission"]
            cc = self._cloud_field(lt.cloud, xs, ys, False)
            fl = fl * (tc + (tt - tc) * cc)[:, None]
        ux = uy = k = None
        if L is not None:
            Ls = L[sel]
            e2 = (beta - 2.0) / 6.0 * Ls * Ls
            k = e2 / (alpha * alpha + e2)
            with np.errstate(invalid="ignore", divide="ignore"):
                ux = np.where(Ls > 0, vx[sel] / np.where(Ls > 0, Ls, 1.0), 1.0)
                uy = np.where(Ls > 0, vy[sel] / np.where(Ls > 0, Ls, 1.0), 0.0)
        if shake is None:
            return _render_points((h, w), xs, ys, fl, alpha=alpha, beta=beta, radius=rad,
                                  ux=ux, uy=uy, k=k, cmap=cmap)
        # wind shake: the star sits at each offset for 1/K of the exposure (one pass, K stamps per star)
        rep = lambda a: None if a is None else np.tile(a, kk)  # noqa: E731
        return _render_points((h, w), np.concatenate([xs + ox for ox, _ in shake]),
                              np.concatenate([ys + oy for _, oy in shake]), np.tile(fl / kk, (kk, 1)),
                              alpha=alpha, beta=beta, radius=rep(rad), ux=rep(ux), uy=rep(uy), k=rep(k), cmap=cmap)

    def _render_trail(self, lt: LightTruth, cmap: np.ndarray | None) -> np.ndarray:
        c = self.config
        tr = lt.trail
        h, w = self._h, self._w
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
        return _render_points((h, w), xs, ys, fl, alpha=alpha, beta=c.moffat_beta, radius=rad, cmap=cmap)

    # ------------------------------------------------------------------ frame means

    def _mean_parts(self, kind: str, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(lambda in electrons, bias in ADU), float32, for one frame."""
        c = self.config
        if kind not in FRAME_KINDS:
            raise SkystackError(f"unknown frame kind {kind!r}; use one of {', '.join(FRAME_KINDS)}")
        recs = self.frames(kind)
        if not 0 <= index < len(recs):
            raise SkystackError(f"{kind} index {index} outside 0..{len(recs) - 1}")
        rec = recs[index]
        gain = np.float32(c.gain_e_per_adu)
        lam = self._dark32(rec.exposure_s, rec.temperature_c) * gain
        if kind == "light":
            sky = self._sky(index, stars=True, background=True, gradient=True, trail=True,
                            cmap=self._cmap, fwhm=None)
            lam = lam + (self._flat32() * sky.astype(np.float32)) * gain
        elif kind == "flat":
            illum = (np.asarray(c.flat_color, dtype=np.float32) * np.float32(c.flat_level_adu * rec.level_scale))
            lam = lam + (self._flat32() * illum[self._cidx()]) * gain
        return lam.astype(np.float32, copy=False), self._bias32()

    # ------------------------------------------------------------------ serialisation

    def to_json(self) -> dict[str, Any]:
        """The content of ``truth.json`` (large arrays go to ``truth.npz``, see :meth:`_arrays`)."""
        c = self.config
        return {
            "skystack_synth_truth": TRUTH_VERSION,
            "config": c.to_dict(),
            "arrays": "truth.npz",
            "shape": [self._h, self._w],
            "pattern": c.pattern,
            "black_level": list(c.black_level),
            "white_level": c.white_level,
            "gain_e_per_adu": c.gain_e_per_adu,
            "reference_index": self.reference_index,
            "pole_xy": list(self.pole_xy),
            "scene": c.scene,
            "lens": self.lens.to_dict(),
            "omega_rad_s": self.omega_rad_s,
            "n_stars": len(self.stars),
            "n_hot_pixels": int(len(self.hot_pixels)),
            "n_cold_pixels": int(len(self.cold_pixels)),
            "units": {
                "adu": "raw 14-bit DN as written to the files",
                "transform": "3x3 frame pixel -> reference pixel; (0,0) = centre of the top-left pixel",
                "star_flux": "total ADU per light exposure through a perfect flat (R, G, B)",
                "sky": "ADU through a perfect flat: flat_field() multiplies it in the raw frames",
                "raw_mean": "bias_pattern + dark_signal(t, T) + flat_field * sky (lights) "
                            "or * flat_level_adu * flat_color[c] * level_scale (flats)",
                "pixels": "(y, x) integer indices for hot/cold pixel lists",
            },
            "lights": [lt.to_json() for lt in self.lights],
            "bias": [r.to_json() for r in self.bias],
            "darks": [r.to_json() for r in self.darks],
            "flats": [r.to_json() for r in self.flats],
            "dark_flats": [r.to_json() for r in self.dark_flats],
        }

    def _arrays(self) -> dict[str, np.ndarray]:
        return {
            "stars_xy": self.stars.xy, "stars_flux": self.stars.flux, "stars_color_index": self.stars.color_index,
            "hot_pixels_yx": self.hot_pixels, "hot_rate_e_s": self.hot_rate_e_s,
            "cold_pixels_yx": self.cold_pixels, "cold_response": self.cold_response,
            "transforms": self.transforms(),
        }


# ----------------------------------------------------------------------------- public API


def build_truth(config: SynthConfig) -> SynthTruth:
    """Return the :class:`SynthTruth` of a config without writing anything."""
    return SynthTruth(config)


def load_truth(path: str | os.PathLike) -> SynthTruth:
    """Load the truth of a session written by :func:`simulate`.

    Parameters
    ----------
    path : str or PathLike
        ``truth.json`` or the session folder holding it.

    Raises
    ------
    SkystackError
        When the file is missing, not a skystack truth file, or was written by
        a simulator whose output this version cannot reproduce.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "truth.json"
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise SkystackError(f"{p}: no truth.json; point at a folder written by 'skystack synth'") from None
    except (OSError, ValueError) as exc:
        raise SkystackError(f"{p}: cannot read truth ({exc}); regenerate it with 'skystack synth'") from None
    if d.get("skystack_synth_truth") != TRUTH_VERSION:
        raise SkystackError(f"{p}: not a skystack synth truth file (version {TRUTH_VERSION}); regenerate it")
    truth = SynthTruth(SynthConfig.from_dict(d["config"]), root=p.parent)
    npz = p.parent / d.get("arrays", "truth.npz")
    try:
        with np.load(npz) as z:
            same = (np.array_equal(z["stars_xy"], truth.stars.xy) and np.array_equal(z["stars_flux"], truth.stars.flux)
                    and np.array_equal(z["hot_pixels_yx"], truth.hot_pixels)
                    and np.allclose(z["transforms"], truth.transforms(), rtol=0, atol=1e-12))
    except (OSError, KeyError, ValueError) as exc:
        raise SkystackError(f"{npz}: cannot read truth arrays ({exc}); regenerate the session") from None
    if not same:
        raise SkystackError(f"{p}: written by a different simulator version (truth does not reproduce); "
                            "regenerate the session with 'skystack synth'")
    return truth


def _atomic_bytes(path: Path, data: bytes) -> None:
    from skystack.engine.output import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Deterministic .npz (fixed zip timestamps)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            b = io.BytesIO()
            np.lib.format.write_array(b, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            zf.writestr(info, b.getvalue())
    return buf.getvalue()


def _write_fits(path: Path, data: np.ndarray, truth: SynthTruth, kind: str, rec: Any) -> None:
    from astropy.io import fits

    c = truth.config
    hdu = fits.PrimaryHDU(data)
    hd = hdu.header
    hd["BAYERPAT"] = (c.pattern, "Bayer pattern, top-left 2x2 tile")
    hd["ROWORDER"] = ("TOP-DOWN", "first row is the top")
    hd["XBAYROFF"] = (0, "Bayer X offset")
    hd["YBAYROFF"] = (0, "Bayer Y offset")
    hd["EXPTIME"] = (float(rec.exposure_s), "[s] exposure time")
    hd["EXPOSURE"] = (float(rec.exposure_s), "[s] exposure time")
    hd["ISOSPEED"] = (int(c.iso), "ISO speed")
    hd["GAIN"] = (int(c.iso), "camera gain setting (= ISO here)")
    hd["EGAIN"] = (float(c.gain_e_per_adu), "[e-/ADU] electrons per ADU")
    hd["CCD-TEMP"] = (round(float(rec.temperature_c), 3), "[C] sensor temperature")
    hd["DATE-OBS"] = (rec.time_start.replace("Z", ""), "UTC start of exposure")
    hd["IMAGETYP"] = (_IMAGETYP[kind], "frame type")
    hd["INSTRUME"] = (f"{c.make} {c.model}", "camera")
    hd["FOCALLEN"] = (float(c.focal_length_mm), "[mm] focal length")
    hd["FOCRATIO"] = (float(c.f_number), "f-number")
    hd["XPIXSZ"] = (float(c.pixel_pitch_um), "[um] pixel size")
    hd["YPIXSZ"] = (float(c.pixel_pitch_um), "[um] pixel size")
    hd["BLKLEVEL"] = (float(np.mean(c.black_level)), "[ADU] mean black level")
    hd["DATAMAX"] = (int(c.white_level), "[ADU] white level")
    hd["OBJECT"] = ("synthetic", "skystack synth")
    from skystack.engine.output import atomic_path

    with atomic_path(path) as tmp:
        hdu.writeto(tmp, overwrite=True, output_verify="exception")


def _write_frame(truth: SynthTruth, kind: str, index: int, root: Path) -> np.ndarray:
    from skystack.tools.dng import write_dng

    c = truth.config
    rec = truth.frames(kind)[index]
    data = truth.render_frame(kind, index)
    path = root / rec.file
    if c.file_format == "dng":
        resp = np.asarray(c.channel_response, dtype=np.float64)
        write_dng(
            path, data, pattern=c.pattern, black_level=c.black_level, white_level=c.white_level,
            as_shot_neutral=tuple(resp / resp[1]),
            exif={"exposure_s": rec.exposure_s, "iso": c.iso, "focal_length_mm": c.focal_length_mm,
                  "f_number": c.f_number, "timestamp": rec.time_start, "make": c.make, "model": c.model,
                  "temperature_c": rec.temperature_c},
        )
    else:
        _write_fits(path, data, truth, kind, rec)
    return data


def _frame_list(truth: SynthTruth) -> list[tuple[str, int]]:
    return [(k, i) for k in FRAME_KINDS for i in range(len(truth.frames(k)))]


def simulate(config: SynthConfig, outdir: str | os.PathLike, *, progress: bool = False) -> Path:
    """Write a synthetic session and its truth; return the path of ``truth.json``.

    Layout: ``outdir/lights/``, ``bias/``, ``darks/``, ``flats/``,
    ``darkflats/`` (``<kind>_NNNN.dng`` or ``.fits``), ``truth.json`` and
    ``truth.npz`` (star list, defect lists, transforms). Byte-identical
    output for the same config. An existing folder is only reused when it is
    empty or holds a previous synthetic session (its frames are replaced).

    Parameters
    ----------
    config : SynthConfig
    outdir : str or PathLike
    progress : bool
        Show a rich progress bar (only when stderr is a terminal).
    """
    truth = SynthTruth(config)
    root = Path(outdir)
    if root.exists() and not root.is_dir():
        raise OutputError(f"{root}: exists and is not a folder; choose another output folder")
    if root.is_dir() and any(root.iterdir()) and not (root / "truth.json").is_file():
        raise OutputError(f"{root}: folder is not empty and is not a synthetic session; choose an empty folder")
    try:
        for kind in FRAME_KINDS:
            (root / _FOLDERS[kind]).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{root}: cannot create the session folders ({exc.strerror or exc})") from exc
    truth.root = root
    # remove stale frames of a previous session that this one does not write
    keep = {(root / r.file).resolve() for k in FRAME_KINDS for r in truth.frames(k)}
    for kind in FRAME_KINDS:
        for p in (root / _FOLDERS[kind]).glob(f"{_STEMS[kind]}_*.*"):
            if p.suffix in (".dng", ".fits") and p.resolve() not in keep:
                p.unlink()
    frames = _frame_list(truth)
    use_bar = progress and sys.stderr.isatty()
    if use_bar:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task("synthesising", total=len(frames))
            for kind, i in frames:
                _write_frame(truth, kind, i, root)
                bar.advance(task)
    else:
        for kind, i in frames:
            _write_frame(truth, kind, i, root)
    try:
        _atomic_bytes(root / "truth.npz", _npz_bytes(truth._arrays()))
        _atomic_bytes(root / "truth.json", (json.dumps(truth.to_json(), indent=1) + "\n").encode())
    except OSError as exc:
        raise OutputError(f"{root}: cannot write truth files ({exc.strerror or exc})") from exc
    return root / "truth.json"
