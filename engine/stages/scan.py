"""Stage ``scan``: every light's header; one camera, size and pattern per stack."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from skystack.engine.errors import SkystackError
from skystack.engine.io import read_meta
from skystack.engine.masters import same_camera
from skystack.engine.pipeline import SessionContext


class ScanHeaders:
    """Read each light's header; lights of another camera, size or pattern than the majority's
    are skipped, named (stack them separately).

    A RAW light of the camera and sensor layout of one read before is not decoded here
    (:func:`~skystack.engine.io.read_meta`'s ``layouts``): its pattern is checked when pass 1
    decodes it (:func:`odd_layout`), and its metadata is then the decode's.
    """

    name = "scan"
    timer = "scan"
    consumes = ()
    produces = ("metas", "shape", "pattern", "camera", "records")

    def run(self, ctx: SessionContext) -> None:
        records = ctx.records
        metas: list[Any] = []
        layouts: dict[tuple, Any] = {}
        for rec, p in zip(records, ctx.lights):
            try:
                metas.append(read_meta(p, layouts=layouts))
            except SkystackError as exc:
                metas.append(None)
                rec.reason = str(exc)
        good = [m for m in metas if m is not None]
        if not good:
            raise SkystackError("no readable light frames: " + "; ".join(r.reason for r in records[:3]))
        key = _majority([(m.shape, m.pattern) for m in good])
        camera = _majority([m.camera for m in good if (m.shape, m.pattern) == key and m.camera] or [None])
        for rec, m in zip(records, metas):
            if m is not None and ((m.shape, m.pattern) != key or not same_camera(m.camera, camera)):
                rec.reason = _differs(m, camera, *key)
        shape, ctx.pattern = key
        ctx.camera = camera
        if len(shape) != 2:
            raise SkystackError(f"{ctx.lights[0]}: colour (already debayered) lights are not supported yet; "
                                "pass the camera's RAW or Bayer FITS files")
        h, w = shape
        ctx.metas, ctx.shape = metas, (h, w)


def odd_layout(m: Any, ctx: SessionContext) -> str:
    """Why a decoded light's size or pattern is not the session's ("" when it is)."""
    if (tuple(m.shape), m.pattern) == (tuple(ctx.shape), ctx.pattern):
        return ""
    return _differs(m, ctx.camera, ctx.shape, ctx.pattern)


def _differs(m: Any, camera: Any, shape: Any, pattern: Any) -> str:
    return (f"{Path(m.path).name}: camera/size/pattern {m.camera}/{m.shape}/{m.pattern} "
            f"differs from the session's {camera}/{shape}/{pattern}; stack it separately")


def _majority(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]
