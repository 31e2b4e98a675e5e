"""Stage ``warp`` (pass 2): every used frame into the canvas, measured for normalisation on its way.

Each frame's normalisation statistics (median, dispersion, star-flux ratio in
the reference's apertures) are taken as it goes into the store, where it is:
on the device only numbers come down, and the store is not read again.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from skystack.engine import normalize, warp
from skystack.engine.backend import array_module, to_host
from skystack.engine.pipeline import SessionContext, compute_threads
from skystack.engine.workers import run_parallel


class WarpFrames:
    """Warp (or place) each used frame into the canvas (the landscape blanked out of it), the
    reference first: its stars are every frame's photometric apertures. Afterwards ``store`` is the
    registered store (the old one closed if the canvas needed a new one) and the landscape stack is
    placed in the canvas."""

    name = "warp"
    timer = None  # each frame's warp and statistics are timed "warp" (summed over threads); the
    # reference's apertures, a per-session step, "apertures"
    consumes = ("used", "ref", "store", "target", "canvas", "store_transforms", "store_lens", "registration",
                "sky_exclusion", "land", "foreground")
    produces = ("frame_stats", "landscape", "store", "records")

    def run(self, ctx: SessionContext) -> None:
        frames = _Warper(ctx)
        step = ctx.report.bar("warp + normalize", len(ctx.used))
        run_parallel(frames.warp_measure, [ctx.ref, *(i for i in ctx.used if i != ctx.ref)],
                     compute_threads(ctx.backend, ctx.config), on_done=step)
        with ctx.report.timed("warp"):
            ctx.landscape = _placed_landscape(ctx) if ctx.land is not None else None
            if ctx.target is not ctx.store:
                ctx.store.close()
                ctx.store = ctx.target


class _Warper:
    """Warps frames of the store into the canvas's store (``target``), on the store's backend.

    The reference goes first: its stars are the apertures of every frame's star-flux ratio. The
    other workers warp their frames and take their statistics meanwhile, and wait for the
    apertures only for the ratio (their numbers are those of :func:`normalize.frame_measures`).
    """

    def __init__(self, ctx: SessionContext) -> None:
        self.ctx = ctx
        self.apertures: Any = None  # the reference's stars (normalize.star_apertures), once it is warped
        self._ready = threading.Event()
        self.time = ctx.report.timed

    def warp_measure(self, i: int) -> None:
        """Warp frame ``i`` and keep its normalisation statistics (the reference: and its apertures)."""
        ctx = self.ctx
        if i == ctx.ref:
            try:
                with self.time("warp"):
                    img = self.warp(i)
                    img = ctx.target.get(i) if img is None else img
                with self.time("apertures"):
                    self.apertures = normalize.star_apertures(img)
            finally:
                self._ready.set()
        else:
            with self.time("warp"):
                img = self.warp(i)
        with self.time("warp"):
            stats = normalize.frame_stats(img)
        self._ready.wait()
        if self.apertures is None:  # the reference failed: its error is the one raised
            return
        with self.time("warp"):
            ctx.frame_stats[i] = (stats, normalize.signal_ratios(img, self.apertures))

    def warp(self, i: int) -> Any:
        """Warp (or place) frame ``i`` into ``target``; the frame stored, or None if left as it was."""
        ctx = self.ctx
        store, target, canvas, excl = ctx.store, ctx.target, ctx.canvas, ctx.sky_exclusion
        ctx.records[i].transform = ctx.registration.transforms[i].tolist()
        if i == ctx.ref and target is store and excl is None:
            return None  # the reference is its own grid
        img = store.get(i, out=None if store.on_device else ctx.scratch.get("in", store.shape))
        if excl is not None:  # a copy on the store's backend, the landscape blanked
            bxp = array_module(img)
            img = bxp.array(img, dtype=bxp.float32)
            img[:, bxp.asarray(excl)] = bxp.nan
        if i == ctx.ref:  # copied, never resampled
            out = canvas.place(to_host(img))
        else:
            buf = None if ctx.backend.is_gpu else ctx.scratch.get("out", (ctx.channels, *canvas.shape))
            out = warp.warp(ctx.backend.xp.asarray(img), canvas.offset @ ctx.store_transforms[i], canvas.shape,
                            out=buf, method=ctx.config.interpolation, lens=ctx.store_lens,
                            lens_offset=(canvas.ox, canvas.oy))
        out = ctx.backend.xp.asarray(out) if target.on_device else to_host(out)
        target.put(i, out)  # measured before a float16 spill rounds it: the order statistics stay unquantised
        return out


def _placed_landscape(ctx: SessionContext) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(image, blend weight, mask, kept values) of the landscape stack, in the canvas."""
    land, canvas, mask = ctx.land, ctx.canvas, ctx.foreground.mask
    return (canvas.place(land[0]), canvas.place(land[1][None])[0],
            canvas.place(mask[None].astype(np.float32))[0] > 0.5, canvas.place(land[2][None])[0])
