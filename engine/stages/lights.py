"""Stage ``calibrate`` (pass 1): decode -> calibrate -> detect -> debayer -> store, frame by frame.

A producer pool decodes the lights into a bounded queue; worker threads (one on
a GPU) take them through the rest, on the backend, into the frame store. On a
GPU the decoder threads also send each light up (:mod:`skystack.engine.upload`).
"""

from __future__ import annotations

from typing import Any

from skystack.engine import calibrate as cal
from skystack.engine import debayer, detect, normalize
from skystack.engine.backend import to_host
from skystack.engine.errors import SkystackError
from skystack.engine.pipeline import SessionContext, compute_threads, finite
from skystack.engine.producer import FrameProducer
from skystack.engine.rawconv import cfa_to_float
from skystack.engine.stages.scan import odd_layout
from skystack.engine.upload import StagedUploader
from skystack.engine.workers import run_parallel


class CalibrateLights:
    """Pass 1 over every light not yet ruled out: its stars, quality and noise go to the records,
    its calibrated, debayered frame to the store. A light that cannot be decoded or calibrated is
    skipped with its reason."""

    name = "calibrate"
    timer = None  # each frame's steps are timed: calibrate, detect, debayer, store (summed over threads)
    consumes = ("store", "calibration", "calibration_config", "shape", "pattern", "camera")
    produces = ("todo", "stars", "quality", "records", "notes", "queue_peak", "queue_bound", "metas")

    def run(self, ctx: SessionContext) -> None:
        ctx.todo = [i for i, r in enumerate(ctx.records) if not r.reason]
        step = ctx.report.bar("calibrate", len(ctx.todo))
        producer = FrameProducer([ctx.lights[i] for i in ctx.todo], workers=ctx.config.workers,
                                 queue_size=ctx.config.queue_size, manual_release=True)
        if ctx.backend.is_gpu:  # the decoders upload from pinned buffers on copy streams of their own
            producer.reader = StagedUploader(ctx.backend.xp, producer.reader, bound=producer.bound,
                                             free_bytes=ctx.backend.free_memory(), timed=ctx.report.timed)
        run_parallel(_LightWork(ctx, producer), producer, compute_threads(ctx.backend, ctx.config), on_done=step)
        ctx.queue_peak, ctx.queue_bound = producer.gauge.peak, producer.bound


class _LightWork:
    """Pass 1 for one decoded light (called from the worker threads)."""

    def __init__(self, ctx: SessionContext, producer: FrameProducer) -> None:
        self.ctx, self.producer = ctx, producer
        self.time = ctx.report.timed

    def __call__(self, item) -> None:
        try:
            self._process(item)
        finally:
            self.producer.release(item)

    def _process(self, item) -> None:
        ctx = self.ctx
        i = ctx.todo[item.index]
        rec = ctx.records[i]
        if item.frame is None:
            rec.reason = item.error or "cannot decode"
            return
        m = item.frame.meta
        ctx.metas[i] = m  # the header's layout may have come from another light: the decode's stands
        rec.reason = odd_layout(m, ctx)
        if rec.reason:
            return
        x = self._calibrated(item.frame, rec)
        if x is None:
            return
        with self.time("detect"):  # where the frame is: a device sends down its binned image and star stamps
            st = detect.detect_stars(x, pattern=m.pattern)
            q = detect.measure_quality(st)
            noise = normalize.highpass_noise(x, step=2 if m.pattern else 1)
        with self.time("debayer"):
            host = self._debayered(x, m)
        with self.time("store"):
            ctx.store.put(i, host)
        ctx.stars[i], ctx.quality[i] = st, q
        _fill_record(rec, m, q, noise)

    def _calibrated(self, frame, rec) -> Any:
        """The calibrated mosaic on the backend, or None (the light skipped, its reason recorded)."""
        ctx, m = self.ctx, frame.meta
        cset = ctx.calibration
        with self.time("calibrate"):
            try:
                raw = ctx.backend.xp.asarray(frame.data)  # uint16 upload (2 bytes/px), unless a decoder sent it
                x = cfa_to_float(raw, pattern=m.pattern, black_level=m.black_level, white_level=m.white_level)
                cl = cal.calibrate_light(x, m, cset, config=ctx.calibration_config)
            except SkystackError as exc:  # e.g. levels the header gets wrong: skip this light, named
                rec.reason = str(exc)
                return None
            rec.reason = cal.overcorrection(x, cl.data, cset, dark_scale=cl.dark_scale) or ""
            ctx.notes.update(dict.fromkeys(cl.notes))
            if rec.reason:
                return None
            return cl.data

    def _debayered(self, x, m) -> Any:
        """The frame as the store holds it: debayered (or one channel), on the store's side."""
        ctx = self.ctx
        config, store = ctx.config, ctx.store
        wb = m.wb if (config.apply_wb and m.wb is not None) else None
        buf = None if ctx.backend.is_gpu or not m.pattern or ctx.superpixel else ctx.scratch.get("rgb", store.shape)
        rgb = debayer.debayer(x, m.pattern, method=config.debayer, wb=wb, out=buf) if m.pattern else x[None]
        return rgb if store.on_device else to_host(rgb)


def _fill_record(rec, m, q, noise) -> None:
    """What the report says of a light pass 1 kept: its header's time and exposure, its quality."""
    rec.exposure_s = finite(m.exposure_s)
    rec.timestamp = m.timestamp
    rec.stars = int(q.n_stars)
    rec.fwhm_px = finite(q.fwhm_px)
    rec.roundness = finite(q.roundness)
    rec.background = finite(q.background)
    rec.noise = finite(noise)  # before normalisation and warping: the noise weights' input
    rec.score = finite(q.score)
