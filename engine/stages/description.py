"""Stage ``describe``: the report's account of the registration (framing, landscape, trailing)."""

from __future__ import annotations

import datetime as _dt
from typing import Any

import numpy as np

from skystack.engine import register
from skystack.engine.framing import border_points
from skystack.engine.match import transform_points
from skystack.engine.pipeline import SessionContext
from skystack.engine.plan import inputs_from_meta, rule_npf


class DescribeRegistration:
    """``register.describe`` of the registration, with the canvas, the landscape's message and, when
    the lights' times allow, the stars' trailing per exposure."""

    name = "describe"
    timer = None
    consumes = ("registration", "canvas", "foreground", "metas", "used", "shape")
    produces = ("description",)

    def run(self, ctx: SessionContext) -> None:
        sreg, canvas = ctx.registration, ctx.canvas
        regdesc = register.describe(sreg)
        regdesc.update({"framing": f"{canvas.framing} ({canvas.shape[1]}x{canvas.shape[0]})",
                        "canvas": canvas.to_dict(), "foreground": ctx.foreground.message})
        trailing = _trailing(sreg.transforms, sreg.lens, ctx.metas, ctx.used, ctx.shape)
        if trailing:
            regdesc["trailing"] = trailing
        ctx.description = regdesc


def _trailing(transforms: dict[int, np.ndarray], lens, metas: list[Any], used: list[int],
              shape: tuple[int, int]) -> str:
    """Star trailing per exposure at the frame's edge, with the NPF rule's suggestion for this lens."""
    rates = []
    p = border_points(shape, 16)
    ideal = lens.undistort(p) if lens is not None else p
    for a, b in zip(used, used[1:]):
        ma, mb = metas[a], metas[b]
        ta, tb = _timestamp(ma), _timestamp(mb)
        if ta is None or tb is None or not tb > ta:
            continue
        q = transform_points(np.linalg.inv(transforms[b]) @ transforms[a], ideal)
        q = lens.distort(q) if lens is not None else q
        rates.append(float(np.nanmax(np.hypot(*(q - p).T))) / (tb - ta))
    exp = next((m.exposure_s for m in (metas[i] for i in used) if m is not None and m.exposure_s), None)
    if not rates or not exp:
        return ""
    px = float(np.median(rates)) * exp
    text = f"{px:.1f} px per {exp:g} s exposure at the frame's edge"
    lens_in = inputs_from_meta(metas[used[0]])
    if lens_in.focal_length_mm and lens_in.aperture and lens_in.pixel_pitch_um:
        npf = rule_npf(lens_in.focal_length_mm, lens_in.aperture, lens_in.pixel_pitch_um)
        text += f"; the NPF rule suggests at most {npf:.1f} s for this lens (skystack plan)"
    else:
        text += "; the files do not record the lens and pixel size the NPF rule needs (see skystack plan)"
    return text


def _timestamp(meta) -> float | None:
    """A light's start as POSIX seconds, or None."""
    if meta is None or not meta.timestamp:
        return None
    try:
        return _dt.datetime.fromisoformat(str(meta.timestamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
