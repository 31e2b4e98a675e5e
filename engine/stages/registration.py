"""Stage ``register``: the session's transforms to the reference (and its lens), also in the
store's pixels."""

from __future__ import annotations

import numpy as np

from skystack.engine import register
from skystack.engine.pipeline import SessionContext, finite

#: Mosaic pixel -> super-pixel store pixel: a store pixel spans 2x2 mosaic pixels.
_S_HALF = np.array([[2.0, 0, 0.5], [0, 2.0, 0.5], [0, 0, 1]])


class RegisterFrames:
    """Match the candidates' stars and register them (reference near the medoid pose, model
    choice, lens, chaining); lights that fail are recorded with their reason."""

    name = "register"
    timer = None  # the frames' matches "register", the model's choice (a step per session) "model"
    consumes = ("candidates", "provisional", "stars", "quality", "shape")
    produces = ("registration", "ref", "used", "store_transforms", "store_lens", "records")

    def run(self, ctx: SessionContext) -> None:
        cand, config, records = ctx.candidates, ctx.config, ctx.records
        sreg = register.register_frames({i: ctx.stars[i] for i in cand}, {i: ctx.quality[i].score for i in cand},
                                        ctx.shape, model=config.transform_model, provisional=ctx.provisional,
                                        fixed_reference=bool(config.reference),
                                        on_frame=ctx.report.bar("register", len(cand)), timed=ctx.report.timed)
        for i, why in sreg.failures.items():
            records[i].reason = why if why.startswith("registration failed") else f"registration failed: {why}"
        for i, r in sreg.residuals.items():
            records[i].residual_px = finite(r)
        ctx.registration, ctx.ref = sreg, sreg.ref
        ctx.used = [i for i in cand if i in sreg.transforms]
        ctx.store_transforms, ctx.store_lens = _in_store_pixels(sreg.transforms, sreg.lens, ctx.superpixel)


def _in_store_pixels(transforms: dict[int, np.ndarray], lens, superpixel: bool):
    """``transforms`` and ``lens`` for the store's pixels (half size with the super-pixel debayer)."""
    if not superpixel:
        return dict(transforms), lens
    if lens is not None:
        lens = type(lens)(cx=(lens.cx - 0.5) / 2, cy=(lens.cy - 0.5) / 2, r_norm=lens.r_norm / 2,
                          k1=lens.k1, k2=lens.k2)
    inv = np.linalg.inv(_S_HALF)
    return {i: inv @ t @ _S_HALF for i, t in transforms.items()}, lens
