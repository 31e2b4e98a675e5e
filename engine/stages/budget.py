"""Stage ``plan``: the stack's memory plan (``--memory-limit`` shared between the stages)."""

from __future__ import annotations

from dataclasses import replace

from skystack.engine.backend import CPU
from skystack.engine.memory import keep_freed_memory, plan_memory, return_freed_memory
from skystack.engine.pipeline import SessionContext, compute_threads


class PlanMemory:
    """One :class:`~skystack.engine.memory.MemoryPlan` from the frame sizes; under a limit, the
    worker threads and the decoders' queue shrink to what fits (``config`` is replaced)."""

    name = "plan"
    timer = None
    consumes = ("shape", "pattern")
    produces = ("plan", "config")

    def run(self, ctx: SessionContext) -> None:
        config, be = ctx.config, ctx.backend
        h_full, w_full = ctx.shape
        n_ch, (out_h, out_w) = ctx.channels, ctx.out_shape
        plan = plan_memory(config.memory_limit, available=CPU.free_memory(), frame_px=h_full * w_full,
                           store_bytes=len(ctx.lights) * n_ch * out_h * out_w * 4, out_px=out_h * out_w,
                           channels=n_ch, threads=compute_threads(be, config), queue_size=config.queue_size,
                           gpu=be.is_gpu, store_dtype=config.store_dtype)
        if plan.limit is not None:  # frames in flight (decoders and workers) within the limit
            ctx.config = replace(config, workers=plan.threads, queue_size=plan.queue_size)
            return_freed_memory()  # and freed buffers not kept resident by the allocator
        else:
            keep_freed_memory()  # freed buffers reused, not faulted in afresh
        ctx.plan = plan
