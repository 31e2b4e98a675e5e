"""Exposure planner behind ``skystack plan``: the longest untracked exposure.

Two rules from the field (both in the seed's write-up):

* the **500 rule**: ``t = 500 / (focal length x crop factor)`` seconds;
* the **NPF rule** (F. Michaud, Société Astronomique de France), which also
  accounts for aperture, pixel pitch and declination:
  ``t = (16.856 N + 0.0997 f + 13.713 p) / (f cos(dec))`` with ``N`` the
  f-number, ``f`` the real focal length in mm and ``p`` the pixel pitch in µm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from skystack.engine.errors import SkystackError

if TYPE_CHECKING:
    from skystack.engine.frame import FrameMeta

#: Diagonal of a 36 x 24 mm full-frame sensor, for crop factors.
FULL_FRAME_DIAGONAL_MM = math.hypot(36.0, 24.0)


@dataclass(frozen=True, kw_only=True)
class PlanInputs:
    """Optics and target for the planner; ``None`` means unknown."""

    focal_length_mm: float | None = None
    crop_factor: float | None = None
    aperture: float | None = None
    pixel_pitch_um: float | None = None
    declination_deg: float | None = None

    def with_overrides(self, **values: Any) -> "PlanInputs":
        """Copy with every non-None keyword replacing the stored value."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})


@dataclass(frozen=True, kw_only=True)
class PlanRow:
    """One rule's answer."""

    rule: str
    seconds: float | None
    formula: str

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def rule_500(focal_length_mm: float, crop_factor: float = 1.0) -> float:
    """Maximum exposure in seconds by the 500 rule."""
    _positive("focal length", focal_length_mm)
    _positive("crop factor", crop_factor)
    return 500.0 / (focal_length_mm * crop_factor)


def rule_npf(focal_length_mm: float, aperture: float, pixel_pitch_um: float,
             declination_deg: float = 0.0) -> float:
    """Maximum exposure in seconds by the NPF rule (Michaud's full formula)."""
    _positive("focal length", focal_length_mm)
    _positive("f-number", aperture)
    _positive("pixel pitch", pixel_pitch_um)
    cos_dec = math.cos(math.radians(declination_deg))
    if cos_dec < 1e-3:
        return math.inf  # at the pole the field only rotates
    return (16.856 * aperture + 0.0997 * focal_length_mm + 13.713 * pixel_pitch_um) / (
        focal_length_mm * cos_dec)


def exposure_plan(inputs: PlanInputs) -> list[PlanRow]:
    """Answer every rule whose inputs are known.

    Raises
    ------
    SkystackError
        When not even the focal length is known.
    """
    f = inputs.focal_length_mm
    if f is None:
        raise SkystackError("plan needs a focal length: pass --focal-length MM or --from FRAME")
    crop = inputs.crop_factor if inputs.crop_factor is not None else 1.0
    rows = [PlanRow(rule="500 rule", seconds=rule_500(f, crop),
                    formula=f"500 / ({f:g} mm x {crop:g})")]
    if inputs.aperture is not None and inputs.pixel_pitch_um is not None:
        dec = inputs.declination_deg or 0.0
        rows.append(PlanRow(
            rule="NPF rule", seconds=rule_npf(f, inputs.aperture, inputs.pixel_pitch_um, dec),
            formula=(f"(16.856 x f/{inputs.aperture:g} + 0.0997 x {f:g} + 13.713 x "
                     f"{inputs.pixel_pitch_um:g} um) / ({f:g} x cos {dec:g} deg)")))
    else:
        rows.append(PlanRow(rule="NPF rule", seconds=None,
                            formula="needs --aperture and --pixel-pitch"))
    return rows


def inputs_from_frame(path: str) -> PlanInputs:
    """Read focal length, f-number, pixel pitch, crop factor and declination from a frame."""
    from skystack.engine.io import read_meta

    return inputs_from_meta(read_meta(path))


def inputs_from_meta(meta: FrameMeta) -> PlanInputs:
    """:func:`inputs_from_frame` of a frame's metadata, read already."""
    extra = {str(k).lower(): v for k, v in meta.extra.items()}
    f = meta.focal_length_mm or _num(extra.get("focallen")) or _num(extra.get("focal_length_mm"))
    pitch = _num(extra.get("xpixsz")) or _num(extra.get("pixel_pitch_um"))
    aperture = _num(extra.get("f_number")) or _num(extra.get("fnumber"))
    if aperture is None and f:
        diam = _num(extra.get("aptdia")) or _num(extra.get("aperture"))
        if diam:
            # FITS APTDIA is in mm; some writers (Seestar) give APERTURE in cm.
            diam_mm = diam * 10.0 if diam < 20.0 and f / diam > 30.0 else diam
            aperture = f / diam_mm
    crop = None
    if pitch and meta.shape:
        h, w = meta.shape[-2:]
        diag_mm = math.hypot(w * pitch, h * pitch) / 1000.0
        crop = FULL_FRAME_DIAGONAL_MM / diag_mm if diag_mm > 0 else None
    dec = _num(extra.get("dec")) or _num(extra.get("objctdec"))
    return PlanInputs(focal_length_mm=f, crop_factor=crop, aperture=aperture,
                      pixel_pitch_um=pitch, declination_deg=dec)


def _num(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) and x != 0 else None


def _positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise SkystackError(f"{name} must be a positive number, got {value!r}")
