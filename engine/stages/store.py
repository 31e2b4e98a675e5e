"""Stage ``store``: the frame store pass 1 fills (on a GPU, in device memory when it fits)."""

from __future__ import annotations

from skystack.engine.framestore import DeviceFrameStore, FrameStore
from skystack.engine.pipeline import SessionContext


class OpenStore:
    """The device store takes at most half of the device budget, as float32 or, when only that fits,
    as float16 (frames then stay on the device from debayering through warping to the combine);
    otherwise the host store takes ``plan.store_ram``, beyond which it spills to disk. ``budget``
    is the device budget the store leaves."""

    name = "store"
    timer = None
    consumes = ("shape", "pattern", "plan")
    produces = ("store", "budget")

    def run(self, ctx: SessionContext) -> None:
        be, config, n, shape = ctx.backend, ctx.config, len(ctx.lights), ctx.store_shape
        ctx.budget = be.memory_budget(config.memory_limit)
        held = DeviceFrameStore.layout(n, shape, ctx.budget, config.store_dtype) if be.is_gpu else None
        if held is not None:
            ctx.store = DeviceFrameStore(n, shape, xp=be.xp, dtype=held)
            ctx.budget -= ctx.store.nbytes
        else:
            ctx.store = FrameStore(n, shape, ram_budget=ctx.plan.store_ram, dtype=config.store_dtype,
                                   spill_dir=config.spill_dir, float32_budget=ctx.plan.float32_ram)
