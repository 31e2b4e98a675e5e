"""Calibration of lights on the raw CFA mosaic (before debayering).

Formula and units
-----------------
Everything is float32 in the normalised units of
:func:`skystack.engine.rawconv.cfa_to_float`, ``u = (adu - black) / (white - black)``,
each frame with its own black and white levels (so the camera black level is
gone before calibration; the master bias holds only what is left: the bias
fixed pattern and any offset the metadata does not know). Per pixel::

    calibrated = (light - B - k * D) / F

* ``B``: master bias (0 when absent).
* ``D``: master dark. With a master bias it is the *thermal* master
  (``dark - bias``, FITS ``BIASSUB = T``, see :mod:`skystack.engine.masters`)
  and ``k`` scales it: ``k = t_light / t_dark`` (:func:`dark_scale_for`) or,
  with ``dark_optimize``, the ``k`` that minimises the noise of the result
  (:func:`optimize_dark_scale`). Without a master bias the dark still holds
  the bias, cannot be scaled (that would scale the offset too), and ``k = 1``
  (a note says so when exposures differ). A dark built without bias but used
  with a master bias is turned into a thermal dark (``D - B``) by
  :func:`make_calibration_set`.
* ``F``: master flat, offset-removed (dark-flat or bias) and normalised to
  median 1 per CFA colour when it was built; pixels where ``F <= 0`` (or NaN)
  become NaN (no data).

A missing master skips its term. Defective pixels (hot/cold, from
:mod:`skystack.engine.cosmetic`) are then replaced by the median of their
calibrated same-colour neighbours; :func:`calibrate` does both in one fused
kernel (``calibrate_cosmetic_kernel``) when given a defect mask.

Masters must match the light: size, CFA pattern and camera
(:func:`check_compatible` raises :class:`CalibrationError` naming the master
file and the fix). ISO/gain, temperature and exposure differences only give
notes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from skystack.engine.backend import Backend, array_module, is_device_array, launch, run_cpu, to_host
from skystack.engine.cosmetic import (CosmeticConfig, DarkOutliers, DefectMap, _correct_defects_numpy, dark_outliers,
                                     find_defects_from_dark)
from skystack.engine.debayer import pattern_code
from skystack.engine.errors import CalibrationError
from skystack.engine.frame import FrameMeta
from skystack.engine.masterfile import Master, describe
from skystack.engine.masters import MasterConfig, load_or_build_master, same_camera
from skystack.engine.robust import median_sigma

__all__ = [
    "CalibrationConfig",
    "CalibrationSet",
    "CalibratedLight",
    "calibrate",
    "calibrate_light",
    "check_compatible",
    "dark_scale_for",
    "optimize_dark_scale",
    "make_calibration_set",
    "build_calibration_set",
]


@dataclass(frozen=True, kw_only=True)
class CalibrationConfig:
    """Settings of light calibration.

    Attributes
    ----------
    scale_dark : bool
        Scale a thermal dark by the exposure ratio ``t_light / t_dark``.
    dark_optimize : bool
        Choose the dark scale that minimises the noise of each calibrated light
        (like DSS's dark optimisation and Siril's ``-opt``); overrides
        ``scale_dark``.
    dark_scale_range : tuple of float
        Limits of the optimised scale.
    cosmetic : bool
        Replace the defect map's pixels (hot/cold) after calibration.
    """

    scale_dark: bool = True
    dark_optimize: bool = False
    dark_scale_range: tuple[float, float] = (0.0, 5.0)
    cosmetic: bool = True


@dataclass(frozen=True, kw_only=True)
class CalibrationSet:
    """The masters of a session and the defect map.

    Attributes
    ----------
    bias, dark, flat, dark_flat : Master or None
        Masters (``dark_flat`` only served to build the flat; kept for the report).
    defects : DefectMap or None
        Hot/cold pixels (from the dark, or from the lights).
    skipped : tuple of str
        ``"name: reason"`` for each calibration frame left out (another camera
        mode than the lights, unreadable, empty).
    """

    bias: Master | None = None
    dark: Master | None = None
    flat: Master | None = None
    dark_flat: Master | None = None
    defects: DefectMap | None = None
    skipped: tuple[str, ...] = ()
    _mask: Any = field(default=None, repr=False, compare=False)  # device copy of defects.mask

    @property
    def masters(self) -> dict[str, Master]:
        """The present masters by kind."""
        return {k: m for k, m in (("bias", self.bias), ("dark", self.dark), ("flat", self.flat),
                                  ("dark-flat", self.dark_flat)) if m is not None}

    @property
    def is_empty(self) -> bool:
        """True when there is nothing to apply."""
        return self.bias is None and self.dark is None and self.flat is None and self.defects is None

    def to_backend(self, backend: Backend) -> "CalibrationSet":
        """A copy whose master arrays (and defect mask) live on ``backend`` (upload once per session)."""
        def mv(m: Master | None) -> Master | None:
            return None if m is None else dataclasses.replace(m, data=backend.asarray(to_host(m.data)))

        mask = None if self.defects is None else backend.asarray(self.defects.mask)
        return dataclasses.replace(self, bias=mv(self.bias), dark=mv(self.dark), flat=mv(self.flat),
                                   dark_flat=self.dark_flat, _mask=mask)

    def defect_mask(self, xp) -> Any:
        """The defect mask as a uint8 array of module ``xp`` (None without a map)."""
        if self.defects is None:
            return None
        if self._mask is not None and array_module(self._mask) is xp:
            return self._mask
        return xp.asarray(self.defects.mask)

    def to_dict(self) -> dict[str, Any]:
        """Provenance for the report."""
        d: dict[str, Any] = {k: m.meta.to_dict() | {"from_cache": m.from_cache} for k, m in self.masters.items()}
        if self.defects is not None:
            d["defects"] = self.defects.to_dict()
        return d


@dataclass(frozen=True, kw_only=True)
class CalibratedLight:
    """Result of :func:`calibrate_light`.

    Attributes
    ----------
    data : ndarray
        Calibrated float32 mosaic (same backend as the input).
    dark_scale : float
        ``k`` applied to the master dark (1.0 without a dark).
    n_defects : int
        Defective pixels replaced.
    notes : tuple of str
        Non-fatal remarks (exposure/ISO/temperature mismatch...).
    """

    data: Any
    dark_scale: float
    n_defects: int
    notes: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- checks


def _close(a: float | None, b: float | None, rel: float) -> bool:
    if a is None or b is None:
        return True
    return abs(float(a) - float(b)) <= rel * max(abs(float(a)), abs(float(b)), 1e-12)


def check_compatible(light_meta: FrameMeta, cset: CalibrationSet) -> tuple[str, ...]:
    """Check that every master fits the light.

    Parameters
    ----------
    light_meta : FrameMeta
        The light's metadata.
    cset : CalibrationSet
        Masters to apply.

    Returns
    -------
    tuple of str
        Notes on soft mismatches (ISO/gain, temperature more than 5 C apart).

    Raises
    ------
    CalibrationError
        A master of another size, CFA pattern or camera than the light; the
        message names the master file and the fix.
    """
    notes: list[str] = []
    lshape = tuple(light_meta.shape)
    ldesc = describe(lshape, light_meta.pattern, light_meta.camera)
    for kind, m in cset.masters.items():
        if kind == "dark-flat":
            continue
        mm = m.meta
        where = mm.path or f"built from {mm.count} frames"
        if (tuple(mm.shape) != lshape or mm.pattern != light_meta.pattern
                or not same_camera(mm.camera, light_meta.camera)):
            raise CalibrationError(
                f"master {kind} {where} is {mm.describe()} but light {light_meta.path} is {ldesc}; "
                f"use {kind} frames from the same camera, mode and crop (or leave the {kind} out)"
            )
        if kind in ("bias", "dark"):
            if not _close(mm.iso, light_meta.iso, 0.01):
                notes.append(f"master {kind} ISO {mm.iso:g} differs from the light's ISO {light_meta.iso:g}")
            if not _close(mm.gain, light_meta.gain, 0.01):
                notes.append(f"master {kind} gain {mm.gain:g} differs from the light's gain {light_meta.gain:g}")
        if kind == "dark" and mm.temperature_c is not None and light_meta.temperature_c is not None:
            if abs(mm.temperature_c - light_meta.temperature_c) > 5.0:
                notes.append(f"master dark at {mm.temperature_c:.1f} C, light at {light_meta.temperature_c:.1f} C")
    if cset.defects is not None and tuple(cset.defects.hot.shape) != lshape[-2:]:
        raise CalibrationError(
            f"defect map is {cset.defects.hot.shape} but light {light_meta.path} is {ldesc}; "
            "rebuild it from darks or lights of this camera mode"
        )
    return tuple(notes)


#: Fraction of a calibrated light's pixels below zero beyond which its masters are too bright for it.
NEGATIVE_LIMIT = 0.75


def overcorrection(light: Any, calibrated: Any, cset: CalibrationSet, *, dark_scale: float = 1.0) -> str | None:
    """Why the masters drive this light negative, or None when they do not.

    A light whose calibrated pixels are mostly (:data:`NEGATIVE_LIMIT`) below
    zero had a bias or dark subtracted that is brighter than the light itself:
    from another gain/ISO, offset, exposure or camera. The reason names the
    master (the bias when it alone is brighter than the light, else the dark).
    """
    xp = array_module(calibrated)
    frac = float((calibrated[..., ::4, ::4] < 0).mean())
    if frac <= NEGATIVE_LIMIT:
        return None

    def med(a: Any) -> float:
        return float(xp.median(xp.asarray(a)[..., ::4, ::4]))

    lmed = med(light)
    bmed = med(cset.bias.data) if cset.bias is not None else 0.0
    if cset.bias is not None and (bmed >= lmed or cset.dark is None):
        m, level = cset.bias, bmed
        fix = "bias frames of this camera at the light's ISO/gain and offset"
    elif cset.dark is not None:
        m, level = cset.dark, med(cset.dark.data) * (dark_scale if cset.dark.meta.bias_subtracted else 1.0)
        fix = "darks of this camera at the light's ISO/gain, offset, exposure and temperature"
    else:
        return None
    where = m.meta.path or f"built from {m.meta.count} frames"
    return (f"calibration leaves {frac:.1%} of it below zero: the master {m.kind} ({where}, level {level:.4g}) "
            f"is brighter than this light (level {lmed:.4g}); use {fix}")


def dark_scale_for(light_exposure_s: float | None, dark_exposure_s: float | None) -> float:
    """Exposure ratio ``t_light / t_dark`` (1.0 when either is unknown or not positive)."""
    if light_exposure_s is None or dark_exposure_s is None:
        return 1.0
    lt, dt = float(light_exposure_s), float(dark_exposure_s)
    if not (math.isfinite(lt) and math.isfinite(dt) and lt > 0 and dt > 0):
        return 1.0
    return lt / dt


# ----------------------------------------------------------------------------- dark optimisation


def _highpass(xp, a):
    """``a`` minus the mean of its 4 same-colour neighbours at distance 2 (interior only)."""
    c = a[2:-2, 2:-2]
    nb = (a[:-4, 2:-2] + a[4:, 2:-2]) + (a[2:-2, :-4] + a[2:-2, 4:])
    return c - xp.float32(0.25) * nb


def optimize_dark_scale(light: Any, dark: Any, *, bias: Any | None = None,
                        k_range: tuple[float, float] = (0.0, 5.0), clip: float = 5.0,
                        iterations: int = 5) -> float:
    """Dark scale ``k`` that minimises the noise of ``light - bias - k * dark``.

    The light and the (thermal) dark are high-pass filtered (each pixel minus
    the mean of its 4 same-colour neighbours at distance 2: removes sky,
    gradients and the colour mosaic), then ``k`` is the least-squares solution
    ``sum(hL hD) / sum(hD^2)``, i.e. the value minimising the variance of
    ``hL - k hD``, iterated with pixels whose residual is beyond ``clip``
    robust sigmas (stars, cosmic rays) left out. Hot pixels and the dark's
    fixed pattern drive the fit, as in DSS's and Siril's dark optimisation.
    With a master dark much noisier than its fixed pattern the noise-minimising
    ``k`` is below the exposure ratio (subtracting less noise); that is the
    intended trade-off of dark optimisation.

    Parameters
    ----------
    light : ndarray (H, W)
        Light in normalised units (NumPy or CuPy).
    dark : ndarray (H, W)
        Thermal master dark (bias-subtracted).
    bias : ndarray (H, W), optional
        Master bias, subtracted from the light first.
    k_range : (float, float)
        Limits of ``k``.
    clip : float
        Residual clip in robust sigmas.
    iterations : int
        Re-weighting rounds.

    Returns
    -------
    float
        ``k`` within ``k_range``.
    """
    xp = array_module(light)
    L = light if bias is None else light - bias
    if L.ndim != 2 or min(L.shape) < 5:
        raise CalibrationError(f"dark optimisation needs an (H, W) frame of at least 5x5, got {tuple(L.shape)}")
    hL = _highpass(xp, L.astype(xp.float32, copy=False)).astype(xp.float64)
    hD = _highpass(xp, xp.asarray(dark, dtype=xp.float32)).astype(xp.float64)
    ok = xp.isfinite(hL) & xp.isfinite(hD)
    hL, hD = hL[ok], hD[ok]
    if hL.size == 0:
        return 1.0
    lo, hi = float(k_range[0]), float(k_range[1])

    def solve(sel) -> float | None:
        den = float((hD[sel] * hD[sel]).sum()) if sel is not None else float((hD * hD).sum())
        if not den > 0:
            return None
        num = float((hL[sel] * hD[sel]).sum()) if sel is not None else float((hL * hD).sum())
        return num / den

    k = solve(None)
    if k is None:
        return 1.0
    for _ in range(int(iterations)):
        r = hL - k * hD
        sample = r[::max(1, int(r.size) // 500_000)]
        med, sigma = median_sigma(sample, xp=xp)
        if not sigma > 0:
            break
        sel = xp.abs(r - med) < clip * sigma
        k_new = solve(sel)
        if k_new is None:
            break
        done = abs(k_new - k) <= 1e-6 * max(1.0, abs(k))
        k = k_new
        if done:
            break
    return float(min(max(k, lo), hi))


# ----------------------------------------------------------------------------- the op


def _check_master_shape(name: str, a: Any, shape: tuple[int, ...]) -> None:
    if a is not None and tuple(a.shape) != shape:
        raise CalibrationError(f"master {name} is {tuple(a.shape)} but the light is {shape}; "
                               "use masters from the same camera mode")


def calibrate(light: Any, *, bias: Any | None = None, dark: Any | None = None, dark_scale: float = 1.0,
              flat: Any | None = None, defects: Any | None = None, pattern: str | None = None) -> Any:
    """Calibrate one light: ``(light - bias - dark_scale * dark) / flat``, then fix defects.

    Parameters
    ----------
    light : ndarray (H, W) or (C, H, W), float32
        Light in normalised units (NumPy, or CuPy to run the CUDA kernel).
    bias, dark, flat : ndarray of the light's shape, optional
        Masters on the light's backend; a missing one skips its term. ``flat``
        <= 0 or NaN gives NaN.
    dark_scale : float
        ``k`` multiplying the dark.
    defects : ndarray (H, W) uint8/bool or DefectMap, optional
        Defect positions, replaced by the median of their calibrated
        same-colour neighbours (fused kernel).
    pattern : str or None
        Bayer pattern (for the defect neighbours); None for mono/colour planes.

    Returns
    -------
    ndarray
        float32, the light's shape and backend.
    """
    xp = array_module(light)
    light = xp.ascontiguousarray(light, dtype=xp.float32)
    shape = tuple(light.shape)
    arrs = []
    for name, a in (("bias", bias), ("dark", dark), ("flat", flat)):
        _check_master_shape(name, a, shape)
        arrs.append(None if a is None else xp.ascontiguousarray(a, dtype=xp.float32))
    b, d, f = arrs
    k = np.float32(dark_scale)
    mask = None
    if defects is not None:
        if isinstance(defects, DefectMap):
            defects = defects.mask
        if tuple(defects.shape) != shape[-2:]:
            raise CalibrationError(f"defect map is {tuple(defects.shape)} but the light is {shape}; "
                                   "build it from frames of this camera mode")
        mask = xp.ascontiguousarray(xp.asarray(defects).astype(xp.uint8, copy=False))
    code = -1 if pattern is None else pattern_code(pattern)
    out = xp.empty_like(light)
    n = int(light.size)
    flags = (np.int32(b is not None), np.int32(d is not None), np.int32(f is not None))
    b_, d_, f_ = (light if a is None else a for a in (b, d, f))
    if mask is None:
        kernel, args = "calibrate_kernel", (out, light, b_, d_, f_, np.int64(n), *flags, k)
    else:
        h, w = shape[-2:]
        kernel, args = "calibrate_cosmetic_kernel", (out, light, b_, d_, f_, mask, np.int64(n), np.int32(h),
                                                     np.int32(w), np.int32(code), *flags, k)
    if not is_device_array(light):  # the twin, or the same fused kernel built for the host (the same bits)
        def native(mod) -> np.ndarray:
            mod.launch(kernel, n, args)
            return out

        return run_cpu("calibrate.cu", kernel, n, lambda: _calibrate_twin(light, b, d, k, f, mask, code), native)
    launch("calibrate.cu", kernel, n, args)
    return out


def _calibrate_twin(light: np.ndarray, bias: np.ndarray | None, dark: np.ndarray | None, k: np.float32,
                    flat: np.ndarray | None, mask: np.ndarray | None, code: int) -> np.ndarray:
    """Twin of ``calibrate_kernel`` (``mask`` None) or ``calibrate_cosmetic_kernel``."""
    out = _calibrate_numpy(light, bias, dark, k, flat)
    if mask is None:
        return out
    planes = out.reshape((-1,) + light.shape[-2:])
    return _correct_defects_numpy(planes, mask, code).reshape(light.shape)


def _calibrate_numpy(light: np.ndarray, bias: np.ndarray | None, dark: np.ndarray | None, k: np.float32,
                     flat: np.ndarray | None) -> np.ndarray:
    """Twin of ``calibrate_kernel`` (same float32 operations in the same order)."""
    v = np.array(light, dtype=np.float32, copy=True)
    if bias is not None:
        v = v - bias
    if dark is not None:
        v = v - k * dark
    if flat is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            v = np.where(flat > 0, v / flat, np.float32(np.nan))
    return v.astype(np.float32, copy=False)


# ----------------------------------------------------------------------------- stage helpers


def make_calibration_set(*, bias: Master | None = None, dark: Master | None = None, flat: Master | None = None,
                         dark_flat: Master | None = None, defects: DefectMap | None = None,
                         cosmetic: CosmeticConfig | None = CosmeticConfig(),
                         dark_outliers: DarkOutliers | None = None) -> CalibrationSet:
    """Assemble a :class:`CalibrationSet` from masters.

    A dark that still holds the bias (built without one) is made thermal
    (``D - B``) when a bias is given. Without ``defects`` and with a dark and
    ``cosmetic`` settings, the defect map is found in the dark (hot and cold:
    ``dark_outliers`` when already found in that thermal dark) and the flat (dead pixels).
    """
    for a, b in ((bias, dark), (bias, flat), (dark, flat)):
        if a is not None and b is not None and (
                tuple(a.meta.shape) != tuple(b.meta.shape) or a.meta.pattern != b.meta.pattern
                or not same_camera(a.meta.camera, b.meta.camera)):
            raise CalibrationError(
                f"master {a.kind} ({a.meta.path or 'built'}) is {a.meta.describe()} but master {b.kind} "
                f"({b.meta.path or 'built'}) is {b.meta.describe()}; use calibration frames of one camera mode"
            )
    dark = _thermal(dark, bias)
    if defects is None and _looks_for_defects(dark, cosmetic):
        defects = find_defects_from_dark(dark.data, pattern=dark.meta.pattern,
                                         flat=None if flat is None else flat.data, config=cosmetic,
                                         outliers=dark_outliers)
    return CalibrationSet(bias=bias, dark=dark, flat=flat, dark_flat=dark_flat, defects=defects)


def _thermal(dark: Master | None, bias: Master | None) -> Master | None:
    """``dark`` without the bias (``D - B``) when it still holds it and a bias is given."""
    if dark is None or bias is None or dark.meta.bias_subtracted:
        return dark
    thermal = np.asarray(dark.data, dtype=np.float32) - np.asarray(bias.data, dtype=np.float32)
    return dataclasses.replace(dark, data=thermal, meta=dataclasses.replace(dark.meta, bias_subtracted=True))


def _looks_for_defects(dark: Master | None, cosmetic: CosmeticConfig | None) -> bool:
    """Whether the defect map is found in this (thermal) dark: a 2-D dark and cosmetic settings."""
    return dark is not None and cosmetic is not None and len(dark.meta.shape) == 2


def _thermal_and_outliers(fd: Any, fb: Any, cosmetic: CosmeticConfig | None
                          ) -> tuple[Master | None, DarkOutliers | None]:
    """The thermal dark of the futures ``fd`` (dark) and ``fb`` (bias), and its
    :func:`~skystack.engine.cosmetic.dark_outliers` (None when no defect map is looked for)."""
    dark = _thermal(fd.result(), fb.result())
    if not _looks_for_defects(dark, cosmetic):
        return dark, None
    return dark, dark_outliers(dark.data, pattern=dark.meta.pattern, config=cosmetic)


def build_calibration_set(*, bias: Any = None, darks: Any = None, flats: Any = None, dark_flats: Any = None,
                          master_config: MasterConfig = MasterConfig(),
                          cosmetic: CosmeticConfig | None = CosmeticConfig(),
                          cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                          backend: Backend | None = None, light: FrameMeta | None = None) -> CalibrationSet:
    """Build (or read from the cache) every master of a session, in dependency order.

    Each of ``bias``, ``darks``, ``flats``, ``dark_flats`` is None, a list of
    calibration frames, or one skystack master FITS. The bias is built first,
    then the dark-flat, the dark (bias-subtracted when a bias exists) and the
    flat (dark-flat, else bias, removed), then the defect map from the dark.

    With ``light`` (a light's metadata), each list of frames is first checked
    against the lights (:func:`screen_frames`): a set of another camera mode is
    refused naming that set, and odd frames within a set are left out.
    """
    kw = dict(config=master_config, cache_dir=cache_dir, use_cache=use_cache, backend=backend)
    skipped: list[str] = []

    def given(v: Any) -> bool:
        return v is not None and not (isinstance(v, (list, tuple)) and len(v) == 0)

    def frames(kind: str, v: Any) -> Any:
        if light is None or not isinstance(v, (list, tuple)):
            return v
        good, odd = screen_frames(kind, v, light)
        skipped.extend(odd)
        return good

    bias, dark_flats, darks, flats = (frames(k, v) for k, v in (("bias", bias), ("dark-flat", dark_flats),
                                                               ("dark", darks), ("flat", flats)))
    from concurrent.futures import ThreadPoolExecutor

    def build(kind: str, v: Any, **deps: Any) -> Any:
        if not given(v):
            return None
        return load_or_build_master(kind, v, **{k: f.result() for k, f in deps.items()}, **kw)

    # in dependency order; with 2 workers the bias and the dark-flat, then the dark and the flat, run side by
    # side, and the dark's hot and cold pixels are found while the flat is still being built
    with ThreadPoolExecutor(max_workers=master_config.workers, thread_name_prefix="skystack-master") as pool:
        fb = pool.submit(build, "bias", bias)
        fdf = pool.submit(build, "dark-flat", dark_flats)
        fd = pool.submit(build, "dark", darks, bias=fb)
        ff = pool.submit(build, "flat", flats, bias=fb, dark_flat=fdf)
        fo = pool.submit(_thermal_and_outliers, fd, fb, cosmetic)  # D - B once, for the set too
        mb, mdf, md, mf = fb.result(), fdf.result(), fd.result(), ff.result()
        thermal, outliers = fo.result()
    for m in (mb, mdf, md, mf):
        if m is not None:
            skipped.extend(f"{m.kind} {s}" for s in m.meta.skipped)
    cset = make_calibration_set(bias=mb, dark=thermal, flat=mf, dark_flat=mdf, cosmetic=cosmetic,
                                dark_outliers=outliers)
    return dataclasses.replace(cset, skipped=tuple(skipped))


def screen_frames(kind: str, paths: Any, light: FrameMeta) -> tuple[list[Any], list[str]]:
    """Split calibration frames into those of the lights' camera mode and the others.

    Returns the usable paths and ``"kind name: reason"`` for each frame left
    out. Unreadable files are kept here (the master build skips them with
    their reason); a master FITS is checked later against the light.

    Raises
    ------
    CalibrationError
        When no readable frame of the set matches the lights: the message
        names the set, what it is and what the lights are.
    """
    from pathlib import Path

    from skystack.engine.errors import SkystackError
    from skystack.engine.io import read_meta
    from skystack.engine.masterfile import is_master_file

    lshape, ldesc = tuple(light.shape), describe(light.shape, light.pattern, light.camera)
    good, odd, odd_desc = [], [], []
    for p in paths:
        if is_master_file(p):
            good.append(p)
            continue
        try:
            m = read_meta(p)
        except SkystackError:
            good.append(p)
            continue
        if tuple(m.shape) != lshape or m.pattern != light.pattern or not same_camera(m.camera, light.camera):
            odd.append(p)
            odd_desc.append(describe(m.shape, m.pattern, m.camera))
        else:
            good.append(p)
    if odd and not good:
        raise CalibrationError(
            f"the {kind} frames ({len(odd)} files, e.g. {odd[0]}) are {odd_desc[0]} but the lights are {ldesc}; "
            f"pass {kind} frames taken with the lights' camera and mode (or leave them out)")
    return good, [f"{kind} {Path(p).name}: {d}, not the lights' {ldesc}" for p, d in zip(odd, odd_desc)]


def calibrate_light(light: Any, meta: FrameMeta, cset: CalibrationSet, *,
                    config: CalibrationConfig = CalibrationConfig()) -> CalibratedLight:
    """Calibrate one normalised light with a :class:`CalibrationSet`.

    Checks compatibility (:func:`check_compatible`), picks the dark scale
    (exposure ratio, optimised, or 1 for a dark that holds the bias), applies
    :func:`calibrate` with the defect mask when ``config.cosmetic``.

    Parameters
    ----------
    light : ndarray
        ``cfa_to_float`` output (NumPy, or CuPy with ``cset.to_backend(gpu)``).
    meta : FrameMeta
        The light's metadata.
    cset : CalibrationSet
        Masters and defects.
    config : CalibrationConfig
        Settings.

    Returns
    -------
    CalibratedLight
    """
    notes = list(check_compatible(meta, cset))
    xp = array_module(light)

    def arr(m: Master | None):
        return None if m is None else xp.asarray(m.data)

    bias, dark, flat = arr(cset.bias), arr(cset.dark), arr(cset.flat)
    k = 1.0
    if dark is not None:
        dm = cset.dark.meta  # type: ignore[union-attr]
        ratio = dark_scale_for(meta.exposure_s, dm.exposure_s)
        if not dm.bias_subtracted:
            if config.dark_optimize or not math.isclose(ratio, 1.0, rel_tol=0.01):
                notes.append("the master dark holds the bias (no master bias), so it is not scaled; "
                             "add bias frames to scale or optimise it")
        elif config.dark_optimize:
            k = optimize_dark_scale(xp.asarray(light, dtype=xp.float32), dark, bias=bias,
                                    k_range=config.dark_scale_range)
        elif config.scale_dark:
            k = ratio
    defects = cset.defect_mask(xp) if config.cosmetic else None
    pattern = meta.pattern if xp.asarray(light).ndim == 2 else None
    out = calibrate(light, bias=bias, dark=dark, dark_scale=k, flat=flat, defects=defects, pattern=pattern)
    n_def = cset.defects.count if (defects is not None and cset.defects is not None) else 0
    return CalibratedLight(data=out, dark_scale=float(k), n_defects=n_def, notes=tuple(notes))
