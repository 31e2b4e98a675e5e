"""Stage ``canvas``: the output grid (``--framing reference|intersection|union``)."""

from __future__ import annotations

from skystack.engine import framing
from skystack.engine.framestore import FrameStore
from skystack.engine.pipeline import SessionContext


class MakeCanvas:
    """The canvas the frames are warped into; when it is not the store's own size, a new host
    store of the canvas's size receives the warped frames (``target``; else the store itself)."""

    name = "canvas"
    timer = None
    consumes = ("used", "store_transforms", "store_lens", "store", "plan")
    produces = ("canvas", "target")

    def run(self, ctx: SessionContext) -> None:
        config, out_shape = ctx.config, ctx.out_shape
        canvas = framing.make_canvas(config.framing, {i: ctx.store_transforms[i] for i in ctx.used}, out_shape,
                                     ctx.store_lens)
        ctx.canvas, ctx.target = canvas, ctx.store
        if canvas.shape != out_shape:
            ctx.target = FrameStore(len(ctx.lights), (ctx.channels, *canvas.shape), ram_budget=ctx.plan.store_ram,
                                    dtype=config.store_dtype, spill_dir=config.spill_dir,
                                    float32_budget=ctx.plan.float32_ram)
