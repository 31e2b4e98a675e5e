"""Stage ``foreground``: the session's still landscape, found and stacked unregistered.

The landscape (``--foreground auto|none|MASK``) is stacked on the CFA mosaic
without resampling and debayered once; the warp keeps its pixels, and a margin
around them, out of the sky stack; the combine blends it back along a feathered
seam (:func:`skystack.engine.stack._blend_landscape`).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from skystack.engine import calibrate as cal
from skystack.engine import debayer
from skystack.engine import foreground as fgm
from skystack.engine.errors import SkystackError
from skystack.engine.framestore import FrameStore
from skystack.engine.pipeline import SessionContext, compute_threads
from skystack.engine.producer import FrameProducer
from skystack.engine.rawconv import cfa_to_float
from skystack.engine.register import _spread
from skystack.engine.stack import StackConfig, _combine_store
from skystack.engine.workers import run_parallel

#: Landscape seam (in detector blocks): the landscape stack is used fully up to
#: ``margin`` above the horizon (and frames' pixels that close to their own
#: horizon stay out of the sky stack), then blends into the sky over ``feather``.
_FG_MARGIN_BLOCKS, _FG_FEATHER_BLOCKS = 1.5, 2.0


class PrefetchLandscape:
    """Start binning the frames the landscape search will most likely read (``--foreground auto``,
    a host store) on a thread of their own, while registration keeps one core busy with Python:
    ``small_prefetch`` (None when there is nothing to start)."""

    name = "foreground-prefetch"
    timer = None
    consumes = ("candidates", "provisional", "store")
    produces = ("small_prefetch",)

    def run(self, ctx: SessionContext) -> None:
        ctx.small_prefetch = None
        if ctx.config.foreground == "auto" and not ctx.store.on_device and len(ctx.candidates) >= 3:
            pick = _pick(ctx.candidates, ctx.provisional)  # registration seldom changes either
            ctx.small_prefetch = SmallFrames(ctx.store.get, pick, fgm.small_bin(ctx.out_shape))


class SmallFrames:
    """:func:`~skystack.engine.foreground.small_frames` of ``indices``, made on a daemon thread."""

    def __init__(self, get, indices: list[int], b: int) -> None:
        self.b, self.frames = b, {}
        self._thread = threading.Thread(target=self._bin, args=(get, indices), name="skystack-small", daemon=True)
        self._thread.start()

    def _bin(self, get, indices: list[int]) -> None:
        for i in indices:
            self.frames[i] = fgm.block_mean(get(i), self.b)

    def take(self, get, indices: list[int], b: int) -> dict[int, np.ndarray]:
        """The small frames of ``indices`` in their order: those binned already, the rest now."""
        self._thread.join()
        have = self.frames if b == self.b else {}
        rest = fgm.small_frames(get, [i for i in indices if i not in have], b)
        return {i: have[i] if i in have else rest[i] for i in indices}


def _pick(used: list[int], ref: int) -> list[int]:
    """The frames the landscape search reads: spread over the session, and the reference."""
    return sorted(set(_spread(used, fgm.N_FRAMES - 1)) | {ref})


class SeparateLandscape:
    """Find the landscape (still while the sky turns, without stars, below a silhouette edge), write
    it to ``--save-mask`` if asked, and stack it: ``land`` is None when there is none."""

    name = "foreground"
    timer = None  # the search "foreground" (a session's step: at most N_FRAMES small frames); the
    # landscape's stack "landscape", each light's part timed apart (summed over threads)
    consumes = ("registration", "used", "ref", "store", "store_transforms", "store_lens", "calibration",
                "calibration_config", "budget", "plan", "small_prefetch")
    produces = ("foreground", "land", "sky_exclusion")

    def run(self, ctx: SessionContext) -> None:
        sreg, used, superpixel, out_shape = ctx.registration, ctx.used, ctx.superpixel, ctx.out_shape
        motion = sreg.motion_px / (2.0 if superpixel else 1.0)
        sky_xy = np.concatenate([sreg.sky_stars[i] for i in used if i in sreg.sky_stars] or [np.zeros((0, 2))])
        sky_xy = (sky_xy - 0.5) / 2.0 if superpixel else sky_xy
        with ctx.report.timed("foreground"):
            fg = _foreground(ctx.config, ctx.store, used, ctx.ref, ctx.store_transforms, ctx.store_lens, motion,
                             out_shape, ctx.lights, sky_xy, ctx.small_prefetch)
        ctx.small_prefetch = None
        ctx.foreground, ctx.land, ctx.sky_exclusion = fg, None, None
        if fg.found:
            ctx.land = _landscape_stack(fg, [ctx.lights[i] for i in used], ctx, 2 if superpixel else 1)
            with ctx.report.timed("landscape"):
                ctx.sky_exclusion = fgm.sky_exclusion(fg.mask, _fg_margins(out_shape)[0])


def _fg_margins(shape: tuple[int, int]) -> tuple[float, float]:
    """(margin, feather) of the landscape seam in pixels of a frame of ``shape``."""
    b = fgm.small_bin(shape)
    return _FG_MARGIN_BLOCKS * b, _FG_FEATHER_BLOCKS * b


def _foreground(config: StackConfig, store, used: list[int], ref: int, transforms: dict[int, np.ndarray], lens,
                motion: float, shape: tuple[int, int], lights: list[Path], star_xy: np.ndarray,
                prefetch: SmallFrames | None = None):
    """The landscape of the session (``--foreground auto|none|MASK``), written to ``--save-mask`` if asked."""
    if config.foreground == "none":
        fg = fgm.none("none (--foreground none)")
    elif config.foreground != "auto":
        fg = fgm.load_mask(config.foreground, shape)
    elif motion < fgm.MIN_MOTION_PX:
        fg = fgm.detect_foreground({}, transforms, shape, 1, motion_px=motion)
    else:
        b, pick = fgm.small_bin(shape), _pick(used, ref)
        small = prefetch.take(store.get, pick, b) if prefetch is not None else fgm.small_frames(store.get, pick, b)
        fg = fgm.detect_foreground(small, {i: transforms[i] for i in pick}, shape, b, lens=lens, motion_px=motion,
                                   star_xy=star_xy)
    if config.save_mask:
        fgm.save_mask(config.save_mask, fg, shape, inputs=lights)
    return fg


def _landscape_stack(fg, paths: list[Path], ctx: SessionContext,
                     scale: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The still landscape: unregistered lights stacked on the CFA mosaic, then debayered once.

    Only the rows from just above the horizon down are kept. Stacking the
    mosaic before interpolating (a still scene needs no resampling) and
    debayering the high-SNR result with RCD keeps roof lines and lights as
    sharp as the sensor recorded them. ``scale`` is 2 for super-pixel stores.
    Returns the ``(C, H, W)`` image (NaN above the band), the blend weight and the
    values kept per pixel (NaN above the band).
    """
    config, be = ctx.config, ctx.backend
    margin, feather = _fg_margins(fg.mask.shape)
    weight = fgm.blend_weight(fg.mask, margin, feather)
    rows = np.flatnonzero(weight.max(axis=1) > 0)
    y0 = (max(0, int(rows[0]) - 4) * scale) // 2 * 2  # full-resolution, even: the CFA pattern is kept
    h_full, w_full = fg.mask.shape[0] * scale, fg.mask.shape[1] * scale
    band = FrameStore(len(paths), (1, h_full - y0, w_full), ram_budget=ctx.plan.store_ram,
                      float32_budget=ctx.plan.float32_ram)
    metas: list[Any] = [None] * len(paths)
    producer = FrameProducer(paths, workers=config.workers, queue_size=config.queue_size, manual_release=True)
    try:
        run_parallel(_BandWork(ctx, producer, band, metas, y0, paths), producer, compute_threads(be, config))
        with ctx.report.timed("landscape"):
            k = list(range(len(paths)))
            ones, zeros = np.ones((len(k), 1), np.float32), np.zeros((len(k), 1), np.float32)
            cfa, kept, _, _ = _combine_store(band, k, ones, zeros, ones, config, be, ctx.budget, plan=ctx.plan)
    finally:
        band.close()
    m = metas[0]
    wb = m.wb if (config.apply_wb and m.wb is not None) else None
    method = "superpixel" if scale == 2 else "rcd"
    with ctx.report.timed("landscape"):
        rgb = debayer.debayer(cfa[0], m.pattern, method=method, wb=wb) if m.pattern else cfa
    full = np.full((rgb.shape[0], *fg.mask.shape), np.nan, dtype=np.float32)
    full[:, y0 // scale:] = be.to_host(rgb)
    if scale == 2:  # a super-pixel keeps what all four of its mosaic pixels kept
        kept = kept.reshape(kept.shape[0] // 2, 2, kept.shape[1] // 2, 2).min(axis=(1, 3))
    counts = np.full(fg.mask.shape, np.nan, dtype=np.float32)
    counts[y0 // scale:] = kept
    return full, weight, counts


class _BandWork:
    """One light into the landscape's band store: decoded, calibrated, its rows from ``y0`` down."""

    def __init__(self, ctx: SessionContext, producer: FrameProducer, band: FrameStore, metas: list[Any],
                 y0: int, paths: list[Path]) -> None:
        self.ctx, self.producer, self.band, self.metas, self.y0, self.paths = ctx, producer, band, metas, y0, paths

    def __call__(self, item) -> None:
        ctx = self.ctx
        try:
            if item.frame is None:
                raise SkystackError(item.error or f"{self.paths[item.index]}: cannot decode")
            m = item.frame.meta
            with ctx.report.timed("landscape"):
                x = cfa_to_float(ctx.backend.xp.asarray(item.frame.data), pattern=m.pattern,
                                 black_level=m.black_level, white_level=m.white_level)
                x = cal.calibrate_light(x, m, ctx.calibration, config=ctx.calibration_config).data
                self.band.put(item.index, ctx.backend.to_host(x[self.y0:])[None])
            self.metas[item.index] = m
        finally:
            self.producer.release(item)
