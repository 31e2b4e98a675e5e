"""The fixed-tripod scene of the simulator: a turning sky seen through a wide lens over a landscape.

Used by :class:`skystack.tools.synth.SynthTruth` when ``SynthConfig.scene ==
"tripod"`` (see :func:`tripod_config` for a phone on a tripod).

Sky. Stars are directions on the celestial sphere. At time ``t`` the sky has
turned by ``omega t`` (sidereal rate) about the celestial pole, which stands
at altitude = latitude due north. In local east-north-up coordinates a star
of declination ``dec`` and hour angle ``H`` points along
``cos(dec) (cos H Q + sin H W) + sin(dec) P`` (``P`` the pole, ``Q`` the
equator on the meridian, ``W`` west): stars rise in the east and set in the
west.

Camera. Aimed at azimuth ``A`` (from north through east) and altitude ``h``,
horizon level: image x runs along ``c x up`` (to the right), y runs down.
Ideal (pinhole) pixels are ``(cx + f X/Z, cy + f Y/Z)`` with ``f`` from the
horizontal field of view; recorded pixels add the radial distortion of
:class:`skystack.engine.lens.RadialLens` (centre = frame centre, ``r_norm`` =
half-diagonal). So the exact mapping of light ``i`` to the reference light is
``distort(H_i undistort(p))`` with ``H_i = K C R(t_ref - t_i) C^T K^-1`` (a
homography in ideal pixels): :attr:`LightTruth.transform` holds ``H_i`` and
``truth.json`` the lens.

Landscape. Everything below an irregular horizon ``y_land(x)`` (sensor
pixels: a hill, a tree line, a house with a flat-ridged roof) is the ground:
its coverage of each pixel is anti-aliased (4 sub-columns, exact vertical
fraction), stars behind it are hidden, it has its own faint textured
brightness and fixed point lights (windows, a lamp) rendered with the
light's PSF but no trailing (they do not move).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from skystack.engine.lens import RadialLens

SIDEREAL_RAD_S = 2.0 * math.pi / 86164.0905
#: Sub-columns per pixel of the anti-aliased horizon.
_SUBCOLS = 4


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _axis_rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rotation matrix by ``angle`` (rad, right-handed) about the unit ``axis``."""
    x, y, z = axis
    c, s = math.cos(angle), math.sin(angle)
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + s * k + (1 - c) * (k @ k)


class TripodScene:
    """Geometry and landscape of a fixed-tripod session (see the module docstring).

    Parameters
    ----------
    config : SynthConfig
        ``scene == "tripod"``; uses ``latitude_deg``, ``pointing_az_deg``,
        ``pointing_alt_deg``, ``fov_deg``, ``lens_k1``, ``lens_k2``,
        ``landscape``, ``n_static_lights`` and the frame size.
    t_mid : ndarray
        Mid-exposure time of each light (s from the first start).
    ref : int
        Reference light.
    """

    def __init__(self, config: Any, t_mid: np.ndarray, ref: int) -> None:
        c = config
        self.config = c
        h, w = c.height, c.width
        self.shape = (h, w)
        self.t_mid = np.asarray(t_mid, dtype=np.float64)
        self.ref = ref
        self.f_px = (w / 2.0) / math.tan(math.radians(c.fov_deg) / 2.0)
        self.lens = RadialLens.for_shape((h, w), k1=c.lens_k1, k2=c.lens_k2)
        lat = math.radians(c.latitude_deg)
        self.pole = np.array([0.0, math.cos(lat), math.sin(lat)])  # east, north, up
        az, alt = math.radians(c.pointing_az_deg), math.radians(c.pointing_alt_deg)
        axis = np.array([math.cos(alt) * math.sin(az), math.cos(alt) * math.cos(az), math.sin(alt)])
        right = _unit(np.cross(axis, [0.0, 0.0, 1.0]))
        down = np.cross(axis, right)
        self.cam = np.vstack([right, down, axis])  # rows: image x, image y, optical axis
        self.k = np.array([[self.f_px, 0, self.lens.cx], [0, self.f_px, self.lens.cy], [0, 0, 1.0]])
        self._horizon: np.ndarray | None = None

    # ------------------------------------------------------------------ sky geometry

    def sky_rotation(self, t: float) -> np.ndarray:
        """Rotation of the sky at time ``t`` relative to the reference light's mid-exposure."""
        ang = -SIDEREAL_RAD_S * (t - self.t_mid[self.ref])  # westward: clockwise about the pole axis
        return _axis_rotation(self.pole, ang)

    def homography(self, i: int) -> np.ndarray:
        """Ideal pixels of light ``i`` -> ideal pixels of the reference light (``T[2, 2] = 1``)."""
        r = self.sky_rotation(self.t_mid[i])  # reference directions -> directions at t_i
        m = self.k @ self.cam @ r.T @ self.cam.T @ np.linalg.inv(self.k)
        return m / m[2, 2]

    def rotation_deg(self, i: int) -> float:
        """Angle the sky turned (about the pole) from the reference to light ``i``, degrees."""
        return math.degrees(-SIDEREAL_RAD_S * (self.t_mid[i] - self.t_mid[self.ref]))

    def project(self, vec: np.ndarray, t: float) -> np.ndarray:
        """Recorded pixel positions ``(N, 2)`` of reference directions ``vec`` at time ``t`` (NaN behind)."""
        v = vec @ self.sky_rotation(t).T @ self.cam.T
        with np.errstate(invalid="ignore", divide="ignore"):
            z = np.where(v[:, 2] > 0.05, v[:, 2], np.nan)
            ideal = np.column_stack([self.lens.cx + self.f_px * v[:, 0] / z, self.lens.cy + self.f_px * v[:, 1] / z])
        out = self.lens.distort(ideal)
        # beyond the radius where the distortion turns over a direction has no pixel
        r2 = ((ideal - (self.lens.cx, self.lens.cy)) ** 2).sum(1) / self.lens.r_norm ** 2
        fold = 1.0 + r2 * (3.0 * self.lens.k1 + 5.0 * self.lens.k2 * r2) <= 0.05
        out[fold] = np.nan
        return out

    def make_star_vectors(self, rng: np.random.Generator, density_per_mp: float) -> np.ndarray:
        """Directions (N, 3) of the stars any light can see, uniform on the sphere.

        ``density_per_mp`` is per megapixel of the frame centre's pixel solid angle.
        """
        h, w = self.shape
        half_diag = math.atan(0.5 * math.hypot(w, h) / self.f_px)
        turn = SIDEREAL_RAD_S * float(np.ptp(self.t_mid)) if len(self.t_mid) else 0.0
        cap = min(math.pi / 2, half_diag + turn + math.radians(3.0))
        solid = 2.0 * math.pi * (1.0 - math.cos(cap))
        n = int(rng.poisson(density_per_mp * solid * self.f_px ** 2 / 1e6))
        z = rng.uniform(math.cos(cap), 1.0, n)
        phi = rng.uniform(0.0, 2.0 * math.pi, n)
        s = np.sqrt(1.0 - z * z)
        local = np.column_stack([s * np.cos(phi), s * np.sin(phi), z])  # about the optical axis
        # the cap is centred on where the optical axis points at the middle of the session
        tm = 0.5 * (self.t_mid.min() + self.t_mid.max()) if len(self.t_mid) else 0.0
        axis_ref = self.cam[2] @ self.sky_rotation(tm)  # direction (reference sky) on the axis at tm
        e1 = _unit(np.cross(axis_ref, [0.0, 0.0, 1.0]))
        e2 = np.cross(axis_ref, e1)
        return local @ np.vstack([e1, e2, axis_ref])

    # ------------------------------------------------------------------ landscape

    def horizon(self) -> np.ndarray:
        """``y_land`` at ``_SUBCOLS`` sub-columns per pixel, shape ``(W * _SUBCOLS,)`` (sensor px)."""
        if self._horizon is None:
            self._horizon = self._make_horizon()
        return self._horizon

    def _make_horizon(self) -> np.ndarray:
        c = self.config
        h, w = self.shape
        rng = np.random.default_rng(np.random.SeedSequence([c.seed, 21]))
        xs = (np.arange(w * _SUBCOLS) + 0.5) / _SUBCOLS - 0.5
        top = h * (1.0 - c.landscape_height)
        # a hill: smooth, low-frequency
        hill = top + 0.35 * h * c.landscape_height * (
            0.5 + 0.3 * np.sin(2 * math.pi * xs / w * 0.8 + rng.uniform(0, 6))
            + 0.2 * np.sin(2 * math.pi * xs / w * 2.3 + rng.uniform(0, 6)))
        y = hill.copy()
        # a tree line over part of the width: spiky crowns
        x0, x1 = 0.05 * w, 0.42 * w
        n_tree = max(3, int((x1 - x0) / 9))
        cx = np.sort(rng.uniform(x0, x1, n_tree))
        for tx in cx:
            th = rng.uniform(0.04, 0.1) * h
            tw = rng.uniform(5.0, 11.0)
            base = np.interp(tx, xs, hill)
            near = np.abs(xs - tx) < tw
            crown = base - th * (1.0 - np.abs(xs[near] - tx) / tw) ** 0.8
            y[near] = np.minimum(y[near], crown)
        # a house: walls and a roof with a flat ridge (straight, sharp edges)
        hx0, hx1 = 0.58 * w, 0.74 * w
        base = float(np.interp(0.5 * (hx0 + hx1), xs, hill))
        eave = base - 0.05 * h
        ridge = eave - 0.045 * h
        rx0, rx1 = hx0 + 0.25 * (hx1 - hx0), hx1 - 0.25 * (hx1 - hx0)
        roof = np.where(xs < rx0, eave + (ridge - eave) * (xs - hx0) / (rx0 - hx0),
                        np.where(xs > rx1, ridge + (eave - ridge) * (xs - rx1) / (hx1 - rx1), ridge))
        inside = (xs >= hx0) & (xs <= hx1)
        y = np.where(inside, np.minimum(y, roof), y)
        self.house = {"x0": hx0, "x1": hx1, "eave_y": eave, "ridge_y": ridge, "ridge_x0": rx0, "ridge_x1": rx1}
        return y

    def coverage(self) -> np.ndarray:
        """(H, W) float32 fraction of each pixel covered by the landscape (0 = sky, 1 = ground)."""
        h, w = self.shape
        yl = self.horizon().reshape(w, _SUBCOLS)
        rows = np.arange(h, dtype=np.float64)[:, None, None]
        frac = np.clip(rows + 0.5 - yl[None], 0.0, 1.0)  # vertical fraction of the pixel below y_land
        return frac.mean(axis=2).astype(np.float32)

    def mask(self) -> np.ndarray:
        """(H, W) bool: pixels at least half covered by the landscape."""
        return self.coverage() >= 0.5

    def ground_brightness(self, sky_g: float) -> np.ndarray:
        """(3, H, W) float32 ADU of the ground per exposure: faint, textured, a lit roof."""
        c = self.config
        h, w = self.shape
        self.horizon()
        rng = np.random.default_rng(np.random.SeedSequence([c.seed, 22]))
        # smooth texture: a few random low-frequency waves
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        tex = np.ones((h, w), dtype=np.float32)
        for _ in range(6):
            kx, ky = rng.uniform(-0.08, 0.08, 2)
            tex += np.float32(0.08) * np.sin(kx * xx + ky * yy + rng.uniform(0, 6)).astype(np.float32)
        col = np.array([1.1, 1.0, 0.8], dtype=np.float32)
        level = np.float32(c.ground_level * sky_g)
        out = col[:, None, None] * (level * tex)[None]
        hs = self.house  # the roof and walls catch a little light from the street
        lit = (xx >= hs["x0"]) & (xx <= hs["x1"]) & (yy >= hs["ridge_y"] - 1) & (yy <= hs["eave_y"] + 0.05 * h)
        out[:, lit] *= np.float32(1.8)
        return out

    def static_lights(self) -> dict[str, np.ndarray]:
        """Fixed point lights: ``xy`` (N, 2) sensor px and ``flux`` (N, 3) ADU per exposure."""
        c = self.config
        h, w = self.shape
        self.horizon()
        rng = np.random.default_rng(np.random.SeedSequence([c.seed, 23]))
        hs = self.house
        n = int(c.n_static_lights)
        pts = []
        # windows on the house wall, then lamps on the hill
        for k in range(n):
            if k < max(0, n - 2):
                fx = (k + 1) / (n - 1)
                x = hs["x0"] + fx * (hs["x1"] - hs["x0"])
                y = hs["eave_y"] + 0.02 * h + (k % 2) * 0.012 * h
            else:
                x = rng.uniform(0.45, 0.55) * w if k == n - 2 else rng.uniform(0.8, 0.95) * w
                yl = float(np.interp(x, (np.arange(w * _SUBCOLS) + 0.5) / _SUBCOLS - 0.5, self.horizon()))
                y = min(h - 6.0, yl + rng.uniform(0.3, 0.6) * (h - yl))
            pts.append((x, y))
        xy = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        g = c.static_light_adu * rng.uniform(0.5, 1.5, len(xy))
        flux = np.column_stack([1.3 * g, g, 0.55 * g])  # warm
        return {"xy": xy, "flux": flux}


def tripod_config(**overrides: Any):
    """A phone on a tripod for an hour: ~66 deg across, barrel lens, landscape, 12-bit noisy sensor.

    Defaults: 40 lights of 10 s over 60 minutes, aimed south at 35 degrees,
    latitude 45 N, 960x720 px, k1 = -0.045 (barrel), 8 bias, darks, flats and
    dark flats. Any :class:`~skystack.tools.synth.SynthConfig` field can be
    overridden.
    """
    from skystack.tools.synth import SynthConfig

    n = int(overrides.get("n_lights", 40))
    minutes = float(overrides.pop("duration_min", 60.0))
    exposure = float(overrides.get("exposure_s", 10.0))
    base = dict(
        scene="tripod", width=960, height=720, n_lights=n, exposure_s=exposure,
        interval_s=max(exposure + 0.5, minutes * 60.0 / max(n, 1)),
        make="Skystack", model="SynthPhone 12", iso=3200, focal_length_mm=4.7, f_number=1.7,
        pixel_pitch_um=1.4, gain_e_per_adu=0.6, read_noise_e=4.5, black_level=(64.0, 64.0, 64.0, 64.0),
        white_level=4095, bias_column_sigma_adu=0.8, bias_row_sigma_adu=0.3, bias_row_noise_adu=0.4,
        dark_current_e_s=0.4, hot_pixel_fraction=3e-4, vignetting=0.55, amp_glow_e_s=0.0,
        flat_level_adu=2000.0, sky_adu_s=(9.0, 11.0, 8.0), gradient=1.2, gradient_angle_deg=90.0,
        gradient_power=2.0, gradient_color=(1.4, 1.0, 0.6), star_density=3000.0, star_flux_min_adu_s=10.0,
        star_flux_max_adu_s=1.5e4, fwhm_range=(2.4, 3.0), lens_k1=-0.045, lens_k2=0.0, landscape=True,
        trail_frames=None, cloudy_frame=None, shake_frame=None, jitter_px=0.0,
        drift_px_per_frame=(0.0, 0.0), n_bias=8, n_darks=8, n_flats=8, n_dark_flats=8,
    )
    base.update(overrides)
    return SynthConfig(**base)
