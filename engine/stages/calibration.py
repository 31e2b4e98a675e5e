"""Stage ``masters``: the master frames (cached) and the calibration set, on the backend."""

from __future__ import annotations

from skystack.engine import calibrate as cal
from skystack.engine.cosmetic import CosmeticConfig
from skystack.engine.masters import MasterConfig
from skystack.engine.pipeline import SessionContext


class BuildMasters:
    """Build (or load from the cache) the masters for the first usable light, check that they
    suit it, and move the calibration set to the backend."""

    name = "masters"
    timer = "masters"
    consumes = ("metas", "plan")
    produces = ("calibration", "calibration_config", "notes")

    def run(self, ctx: SessionContext) -> None:
        files, config, plan = ctx.files, ctx.config, ctx.plan
        ref_meta = next(m for m, r in zip(ctx.metas, ctx.records) if m is not None and not r.reason)
        cset = cal.build_calibration_set(
            bias=list(files.bias), darks=list(files.darks), flats=list(files.flats),
            dark_flats=list(files.dark_flats), cosmetic=CosmeticConfig() if config.cosmetic else None,
            master_config=MasterConfig(band_bytes=min(plan.tile_bytes, MasterConfig().band_bytes),
                                       workers=1 if plan.limit is not None else MasterConfig().workers),
            cache_dir=config.cache_dir, backend=ctx.backend, light=ref_meta)
        ctx.notes.update(dict.fromkeys(f"skipped {s}" for s in cset.skipped))
        ctx.notes.update(dict.fromkeys(cal.check_compatible(ref_meta, cset)))
        ctx.calibration = cset.to_backend(ctx.backend)
        ctx.calibration_config = cal.CalibrationConfig(dark_optimize=config.dark_optimize, cosmetic=config.cosmetic)
