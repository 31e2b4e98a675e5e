"""The streaming stacking engine: from a session's files to a stacked image.

:func:`register_session` runs the session's stages
(:data:`skystack.engine.stages.SESSION_STAGES`, with
:func:`skystack.engine.pipeline.run_stages`). Pass 1 (streaming): a producer
pool decodes lights into a bounded queue; the consumer converts, calibrates,
corrects defects, detects stars and debayers each frame on the chosen backend
and puts it in the frame store. Then the frames are selected, registered to
the reference and warped into the output grid (pass 2, in place in the store).
:func:`combine_registered` then combines the store tile by tile (rejection,
normalisation, weighting).
"""

from __future__ import annotations

import logging
import os
import resource
import threading
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from skystack.engine import combine, debayer, framing, normalize, register, warp
from skystack.engine.backend import CPU, array_module, cpu_workers, get_backend, to_host
from skystack.engine.crop import apply_box, max_rectangle
from skystack.engine.errors import SkystackError
from skystack.engine.pipeline import Reporter, SessionContext, _Progress, compute_threads, run_stages
from skystack.engine.session import SessionFiles, discover_session
from skystack.engine.workers import read_ahead, run_parallel

#: Bytes per stored pixel per frame per channel of working space the combine
#: step needs, as a multiple of the tile itself (NumPy twin's temporaries).
_COMBINE_WORKSPACE = 6


#: Types of a frame store whose float32 frames do not fit its RAM share (:class:`skystack.engine.framestore.FrameStore`).
STORE_DTYPES = ("float32", "float16")


@dataclass(frozen=True, kw_only=True)
class StackConfig:
    """Settings of one stack (``skystack stack`` options)."""

    backend: str | None = None
    rejection: str = "auto"  # "auto": chosen from the frame count (combine.auto_rejection)
    kappa_low: float | None = None  # None: the method's default (combine.DEFAULT_KAPPAS)
    kappa_high: float | None = None
    max_iter: int = 10
    normalization: str = "additive+scale"
    weighting: str = "noise"  # inverse noise variance after normalisation (normalize.frame_weights)
    debayer: str = "rcd"  # sharpest, least colour noise at equal resolution (bench/RESULTS.md, issue 13)
    apply_wb: bool = True
    interpolation: str = "lanczos3"
    transform_model: str = "auto"
    framing: str = "reference"
    foreground: str = "auto"
    save_mask: str | None = None
    reference: str | None = None
    keep_best: float | None = None
    max_fwhm: float | None = None
    min_stars: int = 15
    memory_limit: int | None = None
    store_dtype: str = "float16"  # where float32 frames do not fit the store's RAM share: noise unchanged (RESULTS.md)
    spill_dir: str | None = None
    workers: int | None = None
    queue_size: int = 4
    dark_optimize: bool = False
    cosmetic: bool = True
    cache_dir: str | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        _validate_config(self)


def option_choices() -> dict[str, tuple[str, ...]]:
    """The values each enumerated :class:`StackConfig` field takes, from its family's registry.

    One table for the checks at construction, the CLI's ``choices`` and batch's
    ``skystack.toml`` settings (``backend`` may also be None: the environment's).
    """
    return {"rejection": combine.REJECTIONS, "normalization": normalize.NORMALIZATIONS,
            "weighting": normalize.WEIGHTINGS, "debayer": debayer.METHODS, "interpolation": warp.METHODS,
            "transform_model": ("auto", *register.MODELS), "framing": framing.FRAMINGS,
            "store_dtype": STORE_DTYPES, "backend": ("auto", "cpu", "gpu")}


def flag(name: str) -> str:
    """The command-line flag of :class:`StackConfig` field ``name`` (``--`` + the name, dashed)."""
    return "--" + name.replace("_", "-")


def _validate_config(c: StackConfig) -> None:
    """Raise :class:`SkystackError` naming the option and the values it takes (before any work)."""
    for name, allowed in option_choices().items():
        value = getattr(c, name)
        if value not in allowed and not (name == "backend" and value is None):
            raise SkystackError(f"{flag(name)} {value!r}: use one of {', '.join(allowed)}")
    if c.foreground not in ("auto", "none") and not Path(c.foreground).is_file():
        raise SkystackError(f"--foreground {c.foreground}: no such mask file; pass auto, none or a PNG "
                            "(white = landscape)")
    if c.keep_best is not None and not 0.0 < c.keep_best <= 100.0:
        raise SkystackError(f"--keep-best {c.keep_best:g}: a percentage of the frames in (0, 100], e.g. 80")
    if c.max_fwhm is not None and not c.max_fwhm > 0.0:
        raise SkystackError(f"--max-fwhm {c.max_fwhm:g}: a FWHM in pixels above 0, e.g. 5")
    for option, value in (("--kappa (low)", c.kappa_low), ("--kappa (high)", c.kappa_high)):
        if value is not None and not value > 0.0:
            raise SkystackError(f"{option} {value:g}: a threshold above 0, e.g. 3")
    for option, value, least in (("--min-stars", c.min_stars, 0), ("max_iter", c.max_iter, 1),
                                 ("--workers", c.workers, 1), ("queue_size", c.queue_size, 1),
                                 ("--memory-limit", c.memory_limit, 1)):
        if value is not None and value < least:
            raise SkystackError(f"{option} {value}: use {least} or more")


@dataclass(kw_only=True)
class FrameRecord:
    """What the report says about one light."""

    path: str
    used: bool = False
    reason: str = ""
    timestamp: str | None = None
    exposure_s: float | None = None
    stars: int = 0
    fwhm_px: float | None = None
    roundness: float | None = None
    background: float | None = None
    noise: float | None = None
    score: float | None = None
    weight: float | None = None
    transform: list[list[float]] | None = None
    residual_px: float | None = None
    rejected_fraction: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(kw_only=True)
class StackResult:
    """The stacked image and everything the report needs."""

    image: np.ndarray  # (3,H,W) or (H,W) float32, linear, normalised units
    count: np.ndarray  # (H,W) values kept after rejection per pixel (first channel)
    coverage: np.ndarray | None = None  # (H,W) frames whose data covered the pixel (before rejection)
    frames: list[FrameRecord]
    reference: str | None
    backend: str
    device: str
    timings: dict[str, float] = field(default_factory=dict)
    masters: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    registration: dict[str, Any] = field(default_factory=dict)
    landscape: np.ndarray | None = None  # (H,W) bool: the still landscape stacked unregistered
    peak_rss_bytes: int = 0
    queue_peak: int = 0
    queue_bound: int = 0
    exposure_s: float = 0.0
    store_where: str = "RAM"  # the frame store: "device" memory, "RAM" or "disk" (spilled)
    store_bytes: int = 0
    lights_meta: list[Any] = field(default_factory=list)  # FrameMeta of the combined lights, reference first
    notes: list[str] = field(default_factory=list)  # calibration remarks and skipped calibration frames

    @property
    def n_used(self) -> int:
        return sum(1 for f in self.frames if f.used)

    @property
    def store_on_disk(self) -> bool:
        """True when the frame store spilled to disk."""
        return self.store_where == "disk"


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    Linux's ``VmHWM`` belongs to the process image and starts afresh at exec;
    ``ru_maxrss`` (the fallback elsewhere) can carry the parent's peak over.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def parse_size(text: str | int | None) -> int | None:
    """``"4GB"``, ``"512M"``, ``"1e9"`` -> bytes."""
    if text is None or isinstance(text, int):
        return text
    s = str(text).strip().upper().replace("IB", "B")
    mult = 1
    for suffix, m in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10),
                      ("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10), ("B", 1)):
        if s.endswith(suffix):
            s, mult = s[: -len(suffix)], m
            break
    try:
        return int(float(s) * mult)
    except ValueError:
        raise SkystackError(f"--memory-limit {text!r}: expected a size like 4GB or 512MB") from None


# ----------------------------------------------------------------------------- pipeline


def stack_session(files: SessionFiles, config: StackConfig = StackConfig()) -> StackResult:
    """Calibrate, register and stack the lights of ``files``.

    Runs :func:`register_session` then :func:`combine_registered` and frees the
    frame store.

    Parameters
    ----------
    files : SessionFiles
        Lights and calibration frames.
    config : StackConfig
        Settings.

    Returns
    -------
    StackResult
        The stacked image (reference grid, linear, normalised units) and the
        per-frame records, timings and memory figures for the report.
    """
    with register_session(files, config) as reg:
        return combine_registered(reg, config)


def stack(folder: str | os.PathLike, config: StackConfig | None = None, **options: Any) -> StackResult:
    """Stack the session in ``folder``: the library's one-call entry point.

    Parameters
    ----------
    folder : path
        A session folder (lights and calibration frames in DSS/Siril-style
        subfolders, see :func:`skystack.engine.session.discover_session`).
    config : StackConfig, optional
        Settings; the defaults when omitted.
    **options
        :class:`StackConfig` fields to set instead of ``config`` (``rejection="gesd"``).

    Returns
    -------
    StackResult
        As :func:`stack_session`; :func:`skystack.engine.report.write_outputs` writes it.
    """
    if config is not None and options:
        raise SkystackError("stack(): pass either a StackConfig or its fields as keywords, not both")
    return stack_session(discover_session(folder), config if config is not None else StackConfig(**options))


@dataclass(kw_only=True)
class Registered:
    """Calibrated frames warped into the reference grid, in a frame store.

    Close it (or use it as a context manager) to free the store.
    """

    store: Any
    used: list[int]
    ref: int
    records: list[FrameRecord]
    lights: list[Path]
    backend: Any
    report: Reporter  # the stack's stage timers and progress; the combine adds to them
    budget: int | None
    masters: dict[str, Any]
    plan: Any = None  # memory.MemoryPlan: threads and tile sizes within --memory-limit
    queue_peak: int
    queue_bound: int
    registration: dict[str, Any] = field(default_factory=dict)
    #: (image, weight, mask, kept values) of the landscape stack, in the canvas
    landscape: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
    framing: str = "reference"
    metas: list[Any] = field(default_factory=list)  # FrameMeta per light (None: unreadable)
    notes: list[str] = field(default_factory=list)  # calibration remarks and skipped calibration frames
    #: frame index -> (FrameStats, star-flux ratio) of every used frame, measured as it was warped
    frame_stats: dict[int, tuple[Any, np.ndarray]] = field(default_factory=dict)

    def frame(self, i: int) -> np.ndarray:
        """Registered frame ``i`` (index into the lights), ``(C, H, W)`` float32."""
        return to_host(self.store.get(i))

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Registered":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def register_session(files: SessionFiles, config: StackConfig = StackConfig()) -> Registered:
    """Decode, calibrate, debayer, detect, select, match and warp every light.

    Runs the session's stages (:data:`skystack.engine.stages.SESSION_STAGES`) in order.

    Parameters
    ----------
    files : SessionFiles
        Lights and calibration frames.
    config : StackConfig
        Settings.

    Returns
    -------
    Registered
        The frame store with every usable light in the reference grid (NaN
        where a frame has no data), the per-frame records and the timings.

    Raises
    ------
    SkystackError
        When no light can be used (the message says why for each).
    """
    # Deliberately lazy: the stage modules import this one (its records' types and tile combine).
    from skystack.engine.stages import SESSION_STAGES

    ctx = run_stages(SESSION_STAGES, session_context(files, config))
    return Registered(store=ctx.store, used=ctx.used, ref=ctx.ref, records=ctx.records, lights=ctx.lights,
                      backend=ctx.backend, report=ctx.report, budget=ctx.budget, plan=ctx.plan,
                      registration=ctx.description, landscape=ctx.landscape, framing=ctx.canvas.framing,
                      masters={k: _master_summary(v) for k, v in ctx.calibration.masters.items()},
                      queue_peak=ctx.queue_peak, queue_bound=ctx.queue_bound, metas=ctx.metas,
                      notes=_log_notes(ctx.notes), frame_stats=ctx.frame_stats)


def session_context(files: SessionFiles, config: StackConfig = StackConfig()) -> SessionContext:
    """The context the session's stages start from: the lights, a record each, the backend, the reporter."""
    report = Reporter(config.quiet)
    be = get_backend(config.backend, quiet=config.quiet)
    lights = list(files.lights)
    if not lights:
        raise SkystackError("no light frames given; pass files, folders or a session folder")
    return SessionContext(files=files, config=config, backend=be, report=report, lights=lights,
                          records=[FrameRecord(path=str(p)) for p in lights])


def combine_registered(reg: Registered, config: StackConfig = StackConfig()) -> StackResult:
    """Normalise, weight and combine a :class:`Registered` store tile by tile.

    Only ``rejection``, ``kappa_*``, ``max_iter``, ``normalization`` and
    ``weighting`` of ``config`` matter here, so one store can be combined
    several ways.
    """
    report, store, used, ref, be = reg.report, reg.store, reg.used, reg.ref, reg.backend
    records = [replace(r) for r in reg.records]
    n_ch, out_h, out_w = store.shape
    with report.timed("normalize"):  # the frames' statistics were measured as they went into the store
        fstats = [reg.frame_stats[i][0] for i in used]
        signal = np.stack([reg.frame_stats[i][1] for i in used])
        r = used.index(ref)
        nscale, noffset = normalize.normalization_factors(fstats, r, config.normalization, signal=signal)
        weights = normalize.frame_weights(fstats, nscale, config.weighting,
                                          scores=[records[i].score or 0.0 for i in used],
                                          noise=[records[i].noise for i in used],
                                          fwhm=[records[i].fwhm_px for i in used])
    with report.timed("combine"), _Progress(config.quiet) as prog:
        image, count, coverage, rejected = _combine_store(store, used, nscale, noffset, weights, config, be,
                                                          reg.budget, progress=prog, plan=reg.plan)
    land_mask = None
    if reg.landscape is not None:
        image, count, coverage = _blend_landscape(image, count, coverage, reg.landscape, len(used))
        land_mask = reg.landscape[2]
    if reg.framing == "intersection":
        image, count, coverage, land_mask = _crop_full_coverage(image, count, coverage, len(used), land_mask)
        out_h, out_w = image.shape[-2:]
    n_pix = out_h * out_w
    for k, i in enumerate(used):
        rec = records[i]
        rec.used = True
        rec.weight = float(weights[k].mean())
        rec.rejected_fraction = float(rejected[k]) / float(n_pix * n_ch)
    report.timer.t["total"] = report.elapsed()
    return StackResult(
        image=image if n_ch == 3 else image[0], count=count, coverage=coverage, frames=records,
        reference=str(reg.lights[ref]), backend=be.name, device=be.device_name, timings=dict(report.timer.t),
        masters=reg.masters, settings=_settings(config, len(used)), registration=reg.registration,
        landscape=land_mask, peak_rss_bytes=peak_rss_bytes(),
        queue_peak=reg.queue_peak, queue_bound=reg.queue_bound,
        exposure_s=float(sum(records[i].exposure_s or 0.0 for i in used)),
        store_where=store.where, store_bytes=int(store.nbytes),
        lights_meta=[reg.metas[i] for i in [ref, *(j for j in used if j != ref)]] if reg.metas else [],
        notes=list(reg.notes),
    )



def _log_notes(notes: dict[str, None]) -> list[str]:
    """Log each calibration remark once (the CLI shows them as warning lines); return them."""
    log = logging.getLogger("skystack")
    for n in notes:
        log.warning(n)
    return list(notes)


def _combine_store(store, used: list[int], nscale, noffset, weights, config: StackConfig, be, budget,
                   progress: _Progress | None = None, first_row: int = 0, plan=None):
    """Combine the store tile by tile (rows ``first_row`` and below).

    A tile and its working copies take at most the device ``budget`` and the
    host's: ``plan.tile_bytes`` (:class:`~skystack.engine.memory.MemoryPlan`), or
    without a plan the host's budget for ``config.memory_limit``.

    Returns image (C,H,W), count (H,W) of kept values, coverage (H,W) of frames
    with data there, and the rejected values per frame.
    """
    c, h, w = store.shape
    h0 = first_row
    ahead = not store.on_device  # a host store's next block is read during the combine
    per_row = _tile_row_bytes(store, len(used))
    if budget is None:
        budget = be.memory_budget(config.memory_limit)
    # The block is read into host memory (and, on a GPU, copied up): it must fit
    # both the device's budget and the host's, whichever is smaller.
    host_budget = plan.tile_bytes if plan is not None else CPU.memory_budget(config.memory_limit)
    rows = int(max(1, min(h, min(budget, host_budget) // max(per_row, 1))))
    tiles = _TileCombiner(store.shape, h0, used, nscale, noffset, weights, config, be)
    step = progress.stepper("combine", -(-(h - h0) // rows)) if progress is not None else (lambda: None)
    spans = [(y0, min(h, y0 + rows)) for y0 in range(h0, h, rows)]
    read = lambda span: store.tile(used, *span)  # noqa: E731 - (N, C, rows, W)
    blocks = read_ahead(read, spans) if ahead else ((s, read(s)) for s in spans)
    for (y0, _), block in blocks:
        tiles.add(block, y0 - h0)
        step()
        del block  # freed before the one after the next is read
    return tiles.image, tiles.count, tiles.coverage, tiles.rejected


def _tile_row_bytes(store, n: int) -> int:
    """Bytes a tile row of ``n`` frames of ``store`` costs the combine: the block itself (C planes)
    plus, per channel in flight, a contiguous copy and the combine's bounded temporaries; with a host
    store one block more, the next one, read meanwhile (:func:`~skystack.engine.workers.read_ahead`)."""
    return n * store.shape[2] * 4 * (_COMBINE_WORKSPACE + (0 if store.on_device else 1))


class _TileCombiner:
    """The combine's outputs, filled tile by tile: image (C,H,W), count (H,W) of kept values,
    coverage (H,W) of frames with data, rejected values per frame.

    Threads split each tile by rows (each does every channel of its rows): all cores busy
    whatever the channel count, one core per native launch (backend.run_cpu shares them).
    """

    def __init__(self, shape: tuple[int, int, int], first_row: int, used: list[int], nscale, noffset, weights,
                 config: StackConfig, be) -> None:
        c, h, w = shape
        n = len(used)
        settings = _settings(config, n)
        self.method, self.klo, self.khi = settings["rejection"], settings["kappa_low"], settings["kappa_high"]
        self.nscale, self.noffset, self.weights, self.config, self.be = nscale, noffset, weights, config, be
        self.image = np.full((c, h - first_row, w), np.nan, dtype=np.float32)
        self.count = np.zeros((h - first_row, w), dtype=np.int32)
        self.coverage = np.zeros((h - first_row, w), dtype=np.int16)
        self.rejected = np.zeros(n, dtype=np.int64)
        self.lock = threading.Lock()
        self.threads = compute_threads(be, config)

    def add(self, block, row: int) -> None:
        """Combine ``block`` ``(N, C, rows, W)``, whose first row is output row ``row``."""
        n_rows = block.shape[2]
        cuts = np.linspace(0, n_rows, min(self.threads, n_rows) + 1).astype(int)
        bands = list(zip(cuts[:-1], cuts[1:]))
        run_parallel(partial(self._band, block, row, len(bands)), bands, self.threads)

    def _band(self, block, row: int, n_bands: int, band: tuple[int, int]) -> None:
        """Every channel of rows ``band`` of ``block``, and their coverage."""
        xp, be, config = self.be.xp, self.be, self.config
        r0, r1 = band  # rows of the block
        bxp = array_module(block)  # the device for the VRAM store, else the host
        self.coverage[row + r0:row + r1] = be.to_host(bxp.isfinite(block[:, 0, r0:r1]).sum(axis=0, dtype=bxp.int16))
        for ch in range(block.shape[1]):
            cube = xp.ascontiguousarray(xp.asarray(block[:, ch, r0:r1]))  # a host block goes up here
            with cpu_workers(n_bands):
                res = combine.combine(cube, method=self.method, kappa_low=self.klo, kappa_high=self.khi,
                                      max_iter=config.max_iter, scale=xp.asarray(self.nscale[:, ch]),
                                      offset=xp.asarray(self.noffset[:, ch]),
                                      weights=xp.asarray(self.weights[:, ch]))
            self.image[ch, row + r0:row + r1] = be.to_host(res.mean)
            rej = be.to_host(res.rejected).astype(np.int64)
            with self.lock:
                if ch == 0:
                    self.count[row + r0:row + r1] = be.to_host(res.count)
                self.rejected[:] += rej


def _blend_landscape(image: np.ndarray, count: np.ndarray, coverage: np.ndarray, landscape, n: int):
    """Landscape over the sky along the feathered seam; the sky's holes below the horizon filled.

    ``image`` is blended in place (and returned).

    Where the landscape dominates, the count and coverage maps are the landscape stack's (its kept
    values out of the ``n`` lights), so the rejection map shows what its rejection removed.
    """
    land, w, _, land_kept = landscape
    w = np.nan_to_num(w, nan=0.0)
    sky_ok = np.isfinite(image)
    land_ok = np.isfinite(land)
    # the sky stack is normalised to the reference frame, the unregistered landscape is not: match their
    # sky background on the seam (where both have sky) so no step or halo shows along the horizon
    seam = (w > 0.0) & (w < 1.0) & sky_ok.all(axis=0) & land_ok.all(axis=0)
    shift = np.zeros(land.shape[0], dtype=np.float32)
    if seam.sum() >= 50:
        shift = np.array([np.median(image[c][seam] - land[c][seam]) for c in range(land.shape[0])], dtype=np.float32)
    out = image  # blended in place, a channel at a time: the temporaries are (H, W), not (C, H, W)
    for c in range(image.shape[0]):
        wc = np.where(sky_ok[c], w, 1.0) * land_ok[c]
        blend = wc * np.nan_to_num(land[c] + shift[c])
        blend += (1.0 - wc) * np.nan_to_num(image[c])
        np.copyto(out[c], blend, where=land_ok[c])  # elsewhere the sky, NaN where neither has data
        if c == 0:
            w0 = wc  # the first channel's weight decides whose counts a pixel reports
    mine = (w0 > 0.5) & np.isfinite(land_kept)
    cov = np.where(mine, n, coverage).astype(coverage.dtype)
    kept = np.where(mine, np.nan_to_num(land_kept), count).astype(count.dtype)
    return out, kept, cov


def _crop_full_coverage(image: np.ndarray, count: np.ndarray, coverage: np.ndarray, n: int,
                        mask: np.ndarray | None = None):
    """Intersection framing: the largest rectangle every used frame covers (``mask`` cropped alike)."""
    box = max_rectangle(coverage >= n)
    if box[1] <= box[0] or box[3] <= box[2]:
        raise SkystackError("framing intersection: the frames share no common area; use --framing reference")
    return (apply_box(image, box), apply_box(count, box), apply_box(coverage, box),
            None if mask is None else apply_box(mask, box))


def _master_summary(m) -> dict[str, Any]:
    meta = m.meta
    d = meta.to_dict() if hasattr(meta, "to_dict") else dict(getattr(meta, "__dict__", {}))
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, type(None)))}


def _settings(cfg: StackConfig, n_frames: int | None = None) -> dict[str, Any]:
    """The settings of ``cfg`` as the report gives them, kappas filled in.

    With ``n_frames`` (the frames combined), ``rejection`` is the method used
    (what ``"auto"`` chose) and ``rejection_requested`` what was asked for.
    """
    d = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    if n_frames is not None:
        d["rejection_requested"] = cfg.rejection
        d["rejection"] = combine.resolve_rejection(cfg.rejection, n_frames)
    dk = combine.DEFAULT_KAPPAS.get(d["rejection"], (3.0, 3.0))
    d["kappa_low"] = dk[0] if cfg.kappa_low is None else cfg.kappa_low
    d["kappa_high"] = dk[1] if cfg.kappa_high is None else cfg.kappa_high
    return d
