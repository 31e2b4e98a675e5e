"""Stage ``select``: frame selection (``--keep-best``, ``--max-fwhm``, ``--min-stars``) and the
provisional reference."""

from __future__ import annotations

from pathlib import Path

from skystack.engine import detect
from skystack.engine.errors import SkystackError
from skystack.engine.pipeline import SessionContext


class SelectFrames:
    """Keep the lights pass 1 measured that pass the selection; choose the provisional reference
    (``--reference``, else the best frame). The store is closed when no light is left."""

    name = "select"
    timer = "register"
    consumes = ("todo", "quality", "store")
    produces = ("candidates", "provisional", "records")

    def run(self, ctx: SessionContext) -> None:
        records, config = ctx.records, ctx.config
        cand = [i for i in ctx.todo if not records[i].reason]
        if not cand:
            ctx.store.close()
            raise SkystackError("no light frame could be used: " + "; ".join(
                f"{Path(records[i].path).name}: {records[i].reason}" for i in ctx.todo[:3]))
        decisions = detect.select_frames([ctx.quality[i] for i in cand], keep_best=config.keep_best,
                                         max_fwhm=config.max_fwhm, min_stars=config.min_stars)
        for i, (used, reason) in zip(cand, decisions):
            if not used:
                records[i].reason = reason
        cand = [i for i in cand if not records[i].reason]
        if not cand:
            ctx.store.close()
            raise SkystackError("every light was rejected: " + "; ".join(
                f"{Path(r.path).name}: {r.reason}" for r in records[:5]))
        ctx.candidates = cand
        ctx.provisional = _reference_index(config.reference, ctx.lights, cand, ctx.quality)


def _reference_index(reference: str | None, lights: list[Path], cand: list[int], quality) -> int:
    """The light ``--reference`` names, else the best of ``cand`` by quality."""
    if reference:
        target = Path(reference).resolve()
        for i in cand:
            if lights[i].resolve() == target or lights[i].name == Path(reference).name:
                return i
        raise SkystackError(f"--reference {reference}: not among the usable lights")
    k = detect.choose_reference([quality[i] for i in cand])
    return cand[k]
