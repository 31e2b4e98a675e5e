"""The simulator's configuration (:class:`SynthConfig`), its random streams and its time stamps.

Everything a synthetic session holds is a pure function of a
:class:`SynthConfig`: every component draws from its own seeded ``numpy``
stream (:func:`stream_rng`), so adding lights or frames never changes the
others.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from skystack.engine.errors import SkystackError
from skystack.engine.frame import BAYER_PATTERNS

# independent random streams (SeedSequence([seed, stream, ...]))
_STREAM = {"geometry": 11, "stars": 12, "bias": 13, "dark": 14, "flat": 15, "special": 16, "noise": 17}
_SIDEREAL_DEG_PER_H = 15.041


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
            parse_time(self.start_time)
        except ValueError:
            bad(f"start_time {self.start_time!r} is not ISO-8601")



def parse_time(text: str) -> _dt.datetime:
    """An ISO-8601 time as an aware UTC datetime (naive times are taken as UTC)."""
    t = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    return t.astimezone(_dt.timezone.utc)



def iso_utc(t: _dt.datetime) -> str:
    """``t`` as ISO-8601 UTC with milliseconds and a ``Z``."""
    return t.astimezone(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")



def stream_rng(seed: int, stream: str, *extra: int) -> np.random.Generator:
    """The generator of one component (``stream``, then e.g. a frame index) of session ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), _STREAM[stream], *map(int, extra)]))
