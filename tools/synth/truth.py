"""The ground truth of a synthetic session, and the exact re-rendering of every component.

:class:`SynthTruth` holds the session's geometry (each light's transform,
PSF, sky variations and special effects), its star list and its sensor
defects, and renders every noise-free part (bias, dark, flat, sky) as the
writer used it; :meth:`SynthTruth.render_frame` is the very frame a file
holds. The physics lives in :mod:`.camera`, :mod:`.optics`, :mod:`.sky`,
:mod:`.specials` and :mod:`.stamps`; this class composes and caches it.
"""

from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from skystack.engine.errors import SkystackError
from skystack.tools.synth import camera, optics, sky, specials
from skystack.tools.synth.config import SynthConfig, iso_utc, parse_time, stream_rng
from skystack.tools.synth.records import (
    FRAME_KINDS,
    LightTruth,
    TrueStars,
    calibration_records,
    frame_file,
)
from skystack.tools.synth.stamps import RADIUS_BUCKETS, cfa_map, moffat_alpha, render_points, stamp_radius

TRUTH_VERSION = 1


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
        self._cmap = cfa_map(config.pattern)
        self._t0 = parse_time(config.start_time)
        sign = -1.0 if config.hemisphere == "north" else 1.0
        self.omega_rad_s = sign * math.radians(config.rotation_deg_per_hour) / 3600.0
        if config.pole_xy is not None:
            self.pole_xy = (float(config.pole_xy[0]), float(config.pole_xy[1]))
        else:
            self.pole_xy = (config.pole_frac[0] * config.width, config.pole_frac[1] * config.height)
        self.lights = self._make_lights()
        self.bias, self.darks, self.flats, self.dark_flats = calibration_records(config, self._t0, self._ext)
        self.stars = self._make_stars()
        self._defects = camera.draw_defects(config)
        self.hot_pixels, self.hot_rate_e_s, self.cold_pixels, self.cold_response = self._defects
        self._cache: dict[str, Any] = {}

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
        return camera.dark_factor(self.config, temperature_c)

    def flat_field(self) -> np.ndarray:
        """Flat field (dimensionless): vignetting x CFA response x PRNU x dust x cold pixels.

        G response is 1 and vignetting is 1 at the optical centre, so the
        maximum is about 1. A flat frame's mean is ``bias + dark(flat exp.) +
        flat_field * flat_level_adu * flat_color[c] * level_scale``.
        """
        return self._flat32().astype(np.float64)

    def vignetting(self) -> np.ndarray:
        """Vignetting alone (1 at the optical centre, ``1 - vignetting`` at the far corner)."""
        return optics.vignetting(self.config, np.arange(self._h), np.arange(self._w)).astype(np.float64)

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
        lam_e, bias = self._mean_parts(kind, index)
        return camera.expose(self.config, lam_e, bias, kind, index)

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
            rng = stream_rng(c.seed, "geometry", i)
            u[i] = rng.random(8)
            g[i] = rng.standard_normal(8)
        t_start = np.arange(n) * c.interval
        t_mid = t_start + 0.5 * c.exposure_s
        phi = self.omega_rad_s * (t_mid - (t_mid[r] if n else 0.0))
        drift = np.asarray(c.drift_px_per_frame, dtype=np.float64)
        chosen = specials.special_indices(c, r)
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
            m, t = self._light_matrices(i, phi[i], d)
            self._ref_to_sensor.append(m)
            lo, hi = c.fwhm_range
            fwhm = lo + (hi - lo) * u[i, 0]
            temp = c.temperature_c + (c.temperature_drift_c * (i / (n - 1) - 0.5) if n > 1 else 0.0)
            lights.append(LightTruth(
                index=i,
                file=frame_file("light", i, self._ext),
                time_start=iso_utc(self._t0 + _dt.timedelta(seconds=float(t_start[i]))),
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
                **self._light_specials(i, chosen, fwhm),
            ))
        return lights

    def _light_matrices(self, i: int, phi: float, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(reference -> sensor, sensor -> reference)`` of light ``i``: a turn by ``phi`` about the
        pole plus the shift ``d`` (the identity for the reference; the scene's for a tripod night)."""
        P = np.array(self.pole_xy)
        cs, sn = math.cos(phi), math.sin(phi)
        R = np.array([[cs, -sn], [sn, cs]])
        m = np.eye(3)
        m[:2, :2] = R
        m[:2, 2] = P + d - R @ P
        t = np.eye(3)
        t[:2, :2] = R.T
        t[:2, 2] = P - R.T @ (P + d)
        if i == self.reference_index:
            m, t = np.eye(3), np.eye(3)
        elif self.scene is not None:  # ideal (undistorted) pixels; the lens is in truth.lens
            t = self.scene.homography(i)
            m = np.linalg.inv(t)
        return m, t

    def _light_specials(self, i: int, chosen: dict[str, Any], fwhm: float) -> dict[str, Any]:
        """Light ``i``'s ``flags``, ``trail``, ``cloud`` and ``shake_offsets`` (:class:`LightTruth` fields)."""
        c = self.config
        flags: list[str] = []
        trail = cloud = shake = None
        kind = chosen["trail"].get(i)
        if kind is not None:
            flags.append("trail")
            trail = specials.make_trail(c, i, kind, fwhm)
        if i == chosen["cloudy"]:
            flags.append("cloudy")
            cloud = specials.make_cloud(c, i)
        if i == chosen["shake"]:
            flags.append("shake")
            shake = specials.make_shake(c, i)
        if i in tuple(int(k) for k in c.noisy_frames):
            flags.append("noisy")
        return {"flags": tuple(flags), "trail": trail, "cloud": cloud, "shake_offsets": shake}

    @property
    def _ext(self) -> str:
        return "dng" if self.config.file_format == "dng" else "fits"

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
        rng = stream_rng(c.seed, "stars")
        if self.scene is not None:
            self._star_vec = self.scene.make_star_vectors(rng, c.star_density)
            n = len(self._star_vec)
            xy = self.scene.project(self._star_vec, self._t_mid[self.reference_index]) if self.lights \
                else np.full((n, 2), np.nan)
            return self._star_fluxes(rng, xy)
        margin = float(RADIUS_BUCKETS[-1]) + c.shake_px + 8.0
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

    # ------------------------------------------------------------------ fixed patterns (cached)

    def _cached(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def _cidx(self) -> np.ndarray:
        h, w = self._h, self._w
        return self._cached("cidx", lambda: np.tile(self._cmap.astype(np.uint8), (h // 2, w // 2)))

    def _bias32(self) -> np.ndarray:
        return self._cached("bias", lambda: camera.bias_pattern(self.config))

    def _dark32(self, exposure_s: float, temperature_c: float) -> np.ndarray:
        """Dark signal in ADU (float32)."""
        c = self.config
        f = np.float32(exposure_s * self.dark_factor(temperature_c) / c.gain_e_per_adu)
        return self._cached("dark_rate", lambda: camera.dark_rate(c, self._defects)) * f

    def _flat32(self) -> np.ndarray:
        return self._cached("flat", lambda: optics.flat_field(self.config, self._cidx(), self._defects))

    def _gradient_unit(self) -> np.ndarray:
        """(H, W) ramp in [0, 1] of the light-pollution gradient (sensor coords), float32."""
        return self._cached("grad", lambda: sky.gradient_ramp(self.config))

    # ------------------------------------------------------------------ sky

    def _sky(self, index: int | None, *, stars: bool, background: bool, gradient: bool, trail: bool,
             cmap: np.ndarray | None, fwhm: float | None) -> np.ndarray:
        c = self.config
        h, w = self._h, self._w
        lt = self.lights[index] if index is not None else None
        out_shape = (h, w) if cmap is not None else (3, h, w)
        out = np.zeros(out_shape, dtype=np.float64)
        cloud_c = None
        if lt is not None and lt.cloud is not None:
            cloud_c = sky.cloud_field(lt.cloud, np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64), True,
                                      self.shape)
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
            out += sky.render_trail(c, lt.trail, self.shape, cmap)
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
            rad = stamp_radius(pts_all["flux"].max(axis=1), alpha, c.moffat_beta, 0.0)
            out += render_points(self.shape, pts_all["xy"][:, 0], pts_all["xy"][:, 1], pts_all["flux"],
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
        radius = stamp_radius(flux.max(axis=1) / kk, alpha, beta, extra)  # one (sub-)stamp
        cull = radius + reach
        xy = np.nan_to_num(xy, nan=-1e9)
        inside = ((xy[:, 0] + cull >= 0) & (xy[:, 0] - cull <= w - 1)
                  & (xy[:, 1] + cull >= 0) & (xy[:, 1] - cull <= h - 1))
        sel = np.flatnonzero(inside)
        xs, ys, fl, rad = xy[sel, 0], xy[sel, 1], flux[sel], radius[sel]
        if cloudy:
            tc, tt = lt.cloud["transmission"]
            cc = sky.cloud_field(lt.cloud, xs, ys, False, self.shape)
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
            return render_points((h, w), xs, ys, fl, alpha=alpha, beta=beta, radius=rad,
                                  ux=ux, uy=uy, k=k, cmap=cmap)
        # wind shake: the star sits at each offset for 1/K of the exposure (one pass, K stamps per star)
        rep = lambda a: None if a is None else np.tile(a, kk)  # noqa: E731
        return render_points((h, w), np.concatenate([xs + ox for ox, _ in shake]),
                              np.concatenate([ys + oy for _, oy in shake]), np.tile(fl / kk, (kk, 1)),
                              alpha=alpha, beta=beta, radius=rep(rad), ux=rep(ux), uy=rep(uy), k=rep(k), cmap=cmap)

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



def build_truth(config: SynthConfig) -> SynthTruth:
    """Return the :class:`SynthTruth` of a config without writing anything."""
    return SynthTruth(config)
