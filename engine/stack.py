"""The streaming stacking engine: from a session's files to a stacked image.

Pass 1 (streaming): a producer pool decodes lights into a bounded queue; the
consumer converts, calibrates, corrects defects, detects stars and debayers
each frame on the chosen backend and puts it in the frame store.
Then the frames are scored, selected, matched to the reference and warped
into the reference grid (pass 2, in place in the store). Finally the store is
combined tile by tile (rejection, normalisation, weighting) and written out.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from skystack.engine.errors import SkystackError
from skystack.engine.session import SessionFiles
from skystack.engine.workers import run_parallel

#: Landscape seam (in detector blocks): the landscape stack is used fully up to
#: ``margin`` above the horizon (and frames' pixels that close to their own
#: horizon stay out of the sky stack), then blends into the sky over ``feather``.
_FG_MARGIN_BLOCKS, _FG_FEATHER_BLOCKS = 1.5, 2.0

#: Bytes per stored pixel per frame per channel of working space the combine
#: step needs, as a multiple of the tile itself (NumPy twin's temporaries).
_COMBINE_WORKSPACE = 6


#: Types of the spilled frame store (:class:`skystack.engine.framestore.FrameStore`).
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
    store_dtype: str = "float16"  # of the spilled store only: half the page cache, noise unchanged (RESULTS.md)
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
    from skystack.engine import combine, debayer, framing, normalize, register, warp

    return {"rejection": combine.REJECTIONS, "normalization": normalize.NORMALIZATIONS,
            "weighting": normalize.WEIGHTINGS, "debayer": debayer.METHODS, "interpolation": warp.METHODS,
            "transform_model": ("auto", *register.MODELS), "framing": framing.FRAMINGS,
            "store_dtype": STORE_DTYPES, "backend": ("auto", "cpu", "gpu")}


def flag(name: str) -> str:
    """The command-line flag of :class:`StackConfig` field ``name`` (``--`` + the name, dashed)."""
    return "--" + name.replace("_", "-")


def _validate_config(c: StackConfig) -> None:
    """Raise :class:`SkystackError` naming the option and the values it takes (before any work)."""

    def bad(msg: str) -> None:
        raise SkystackError(msg)

    for name, allowed in option_choices().items():
        value = getattr(c, name)
        if value not in allowed and not (name == "backend" and value is None):
            bad(f"{flag(name)} {value!r}: use one of {', '.join(allowed)}")
    if c.foreground not in ("auto", "none") and not Path(c.foreground).is_file():
        bad(f"--foreground {c.foreground}: no such mask file; pass auto, none or a PNG (white = landscape)")
    if c.keep_best is not None and not 0.0 < c.keep_best <= 100.0:
        bad(f"--keep-best {c.keep_best:g}: a percentage of the frames in (0, 100], e.g. 80")
    if c.max_fwhm is not None and not c.max_fwhm > 0.0:
        bad(f"--max-fwhm {c.max_fwhm:g}: a FWHM in pixels above 0, e.g. 5")
    for option, value in (("--kappa (low)", c.kappa_low), ("--kappa (high)", c.kappa_high)):
        if value is not None and not value > 0.0:
            bad(f"{option} {value:g}: a threshold above 0, e.g. 3")
    for option, value, least in (("--min-stars", c.min_stars, 0), ("max_iter", c.max_iter, 1),
                                 ("--workers", c.workers, 1), ("queue_size", c.queue_size, 1),
                                 ("--memory-limit", c.memory_limit, 1)):
        if value is not None and value < least:
            bad(f"{option} {value}: use {least} or more")


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
    store_on_disk: bool = False
    lights_meta: list[Any] = field(default_factory=list)  # FrameMeta of the combined lights, reference first
    notes: list[str] = field(default_factory=list)  # calibration remarks and skipped calibration frames

    @property
    def n_used(self) -> int:
        return sum(1 for f in self.frames if f.used)


class _Scratch(threading.local):
    """Per-thread float32 buffers for the frame-sized results of pass 1 and the warp, reused frame
    after frame: a new frame-sized array each time costs its page faults (and, on a virtual machine
    whose host reclaims freed memory, several milliseconds per megabyte)."""

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """This thread's buffer ``name`` of ``shape`` (its contents are the last user's)."""
        bufs = self.__dict__.setdefault("bufs", {})
        buf = bufs.get(name)
        if buf is None or buf.shape != tuple(shape):
            buf = bufs[name] = np.empty(shape, dtype=np.float32)
        return buf


class _Timer:
    """Seconds per stage, summed over worker threads (so stages can add up to more than the wall time)."""

    def __init__(self) -> None:
        import threading

        self.t: dict[str, float] = {}
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            with self._lock:
                self.t[name] = self.t.get(name, 0.0) + dt


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


class _Progress:
    """rich progress bars on stderr (a terminal or a Jupyter notebook); silent when quiet or piped.

    One per stage group, used as a context manager so a failure stops the display.
    """

    def __init__(self, quiet: bool) -> None:
        from rich.console import Console

        console = Console(stderr=True)
        self.enabled = not quiet and (console.is_terminal or console.is_jupyter)
        self._p = None
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._p = Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), console=console, transient=False)
            self._p.start()

    def task(self, name: str, total: int):
        return self._p.add_task(name, total=total) if self._p else None

    def advance(self, task, n: int = 1) -> None:
        if self._p is not None and task is not None:
            self._p.advance(task, n)

    def stepper(self, name: str, total: int):
        """A new bar ``name`` of ``total`` steps; returns the function that advances it by one."""
        task = self.task(name, total)
        return lambda: self.advance(task)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- pipeline


def _majority(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


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
    from skystack.engine.session import discover_session

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
    timer: _Timer
    t_start: float
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
        from skystack.engine.backend import to_host

        return to_host(self.store.get(i))

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Registered":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def register_session(files: SessionFiles, config: StackConfig = StackConfig()) -> Registered:
    """Decode, calibrate, debayer, detect, select, match and warp every light.

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
    from skystack.engine import calibrate as cal
    from skystack.engine import debayer, detect, foreground, framing, normalize, register, warp
    from skystack.engine.cosmetic import CosmeticConfig
    from skystack.engine.backend import CPU, array_module, get_backend, to_host
    from skystack.engine.framestore import DeviceFrameStore, FrameStore
    from skystack.engine.io import read_meta
    from skystack.engine.masters import MasterConfig, same_camera
    from skystack.engine.memory import plan_memory, return_freed_memory
    from skystack.engine.producer import FrameProducer
    from skystack.engine.rawconv import cfa_to_float

    timer = _Timer()
    t_start = time.perf_counter()
    be = get_backend(config.backend, quiet=config.quiet)
    xp = be.xp
    lights = list(files.lights)
    if not lights:
        raise SkystackError("no light frames given; pass files, folders or a session folder")
    records = [FrameRecord(path=str(p)) for p in lights]

    # --- headers: one camera/size/pattern per stack; odd frames are skipped
    with timer("scan"):
        metas: list[Any] = []
        for rec, p in zip(records, lights):
            try:
                metas.append(read_meta(p))
            except SkystackError as exc:
                metas.append(None)
                rec.reason = str(exc)
        good = [m for m in metas if m is not None]
        if not good:
            raise SkystackError("no readable light frames: " + "; ".join(r.reason for r in records[:3]))
        key = _majority([(m.shape, m.pattern) for m in good])
        camera = _majority([m.camera for m in good if (m.shape, m.pattern) == key and m.camera] or [None])
        for rec, m in zip(records, metas):
            if m is not None and ((m.shape, m.pattern) != key or not same_camera(m.camera, camera)):
                rec.reason = (f"{Path(m.path).name}: camera/size/pattern {m.camera}/{m.shape}/{m.pattern} "
                              f"differs from the session's {camera}/{key[0]}/{key[1]}; stack it separately")
    shape, pattern = key
    if len(shape) != 2:
        raise SkystackError(f"{lights[0]}: colour (already debayered) lights are not supported yet; "
                            "pass the camera's RAW or Bayer FITS files")
    h_full, w_full = shape
    superpixel = config.debayer == "superpixel"
    out_h, out_w = (h_full // 2, w_full // 2) if superpixel else (h_full, w_full)
    n_ch = 3 if pattern else 1
    plan = plan_memory(config.memory_limit, available=CPU.free_memory(), frame_px=h_full * w_full,
                       store_bytes=len(lights) * n_ch * out_h * out_w * 4, out_px=out_h * out_w, channels=n_ch,
                       threads=_compute_threads(be, config), queue_size=config.queue_size, gpu=be.is_gpu)
    if plan.limit is not None:  # frames in flight (decoders and workers) within the limit
        config = replace(config, workers=plan.threads, queue_size=plan.queue_size)
        return_freed_memory()  # and freed buffers not kept resident by the allocator

    with timer("masters"):
        ref_meta = next(m for m, r in zip(metas, records) if m is not None and not r.reason)
        cset = cal.build_calibration_set(
            bias=list(files.bias), darks=list(files.darks), flats=list(files.flats),
            dark_flats=list(files.dark_flats), cosmetic=CosmeticConfig() if config.cosmetic else None,
            master_config=MasterConfig(band_bytes=min(plan.tile_bytes, MasterConfig().band_bytes),
                                       workers=1 if plan.limit is not None else MasterConfig().workers),
            cache_dir=config.cache_dir, backend=be, light=ref_meta)
        notes: dict[str, None] = dict.fromkeys(f"skipped {s}" for s in cset.skipped)
        notes.update(dict.fromkeys(cal.check_compatible(ref_meta, cset)))
        cset = cset.to_backend(be)
    ccfg = cal.CalibrationConfig(dark_optimize=config.dark_optimize, cosmetic=config.cosmetic)

    # --- pass 1: decode -> calibrate -> cosmetic -> detect -> debayer -> store
    # The device store takes half of the device budget; the host store plan.store_ram,
    # beyond which it spills to disk.
    budget = be.memory_budget(config.memory_limit)
    if be.is_gpu and DeviceFrameStore.fits(len(lights), (n_ch, out_h, out_w), budget):
        # frames stay on the device from debayering to the combine (the VRAM frame store)
        store = DeviceFrameStore(len(lights), (n_ch, out_h, out_w), xp=xp)
        budget -= store.nbytes
    else:
        store_budget = plan.store_ram  # the store is host memory
        store = FrameStore(len(lights), (n_ch, out_h, out_w), ram_budget=store_budget,
                           dtype=config.store_dtype, spill_dir=config.spill_dir)
    todo = [i for i, r in enumerate(records) if not r.reason]
    scratch = _Scratch()  # each thread's frame buffers, reused frame after frame (host backends)
    stars: dict[int, Any] = {}
    quality: dict[int, Any] = {}
    prog = _Progress(config.quiet)
    producer = FrameProducer([lights[i] for i in todo], workers=config.workers, queue_size=config.queue_size,
                             manual_release=True)
    task = prog.task("calibrate", len(todo))

    def process(item) -> None:
        try:
            _process(item)
        finally:
            producer.release(item)

    def _process(item) -> None:
        i = todo[item.index]
        rec = records[i]
        if item.frame is None:
            rec.reason = item.error or "cannot decode"
            return
        m = item.frame.meta
        with timer("calibrate"):
            try:
                raw = xp.asarray(item.frame.data)  # uint16 upload: 2 bytes/px
                x = cfa_to_float(raw, pattern=m.pattern, black_level=m.black_level, white_level=m.white_level)
                cl = cal.calibrate_light(x, m, cset, config=ccfg)
            except SkystackError as exc:  # e.g. levels the header gets wrong: skip this light, named
                rec.reason = str(exc)
                return
            rec.reason = cal.overcorrection(x, cl.data, cset, dark_scale=cl.dark_scale) or ""
            notes.update(dict.fromkeys(cl.notes))
            if rec.reason:
                return
            x = cl.data
        with timer("detect"):  # where the frame is: a device sends down its binned image and star stamps
            st = detect.detect_stars(x, pattern=m.pattern)
            q = detect.measure_quality(st)
            noise = normalize.highpass_noise(x, step=2 if m.pattern else 1)
        with timer("debayer"):
            wb = m.wb if (config.apply_wb and m.wb is not None) else None
            buf = None if be.is_gpu or not m.pattern or superpixel else scratch.get("rgb", store.shape)
            rgb = debayer.debayer(x, m.pattern, method=config.debayer, wb=wb, out=buf) if m.pattern else x[None]
            host = rgb if store.on_device else to_host(rgb)
        with timer("store"):
            store.put(i, host)
        stars[i], quality[i] = st, q
        rec.exposure_s = _f(m.exposure_s)
        rec.timestamp = m.timestamp
        rec.stars = int(q.n_stars)
        rec.fwhm_px = _f(q.fwhm_px)
        rec.roundness = _f(q.roundness)
        rec.background = _f(q.background)
        rec.noise = _f(noise)  # before normalisation and warping: the noise weights' input
        rec.score = _f(q.score)

    try:
        run_parallel(process, producer, _compute_threads(be, config), on_done=lambda: prog.advance(task))
    finally:
        prog.close()

    # --- selection and reference
    with timer("register"), _Progress(config.quiet) as prog:
        cand = [i for i in todo if not records[i].reason]
        if not cand:
            store.close()
            raise SkystackError("no light frame could be used: " + "; ".join(
                f"{Path(records[i].path).name}: {records[i].reason}" for i in todo[:3]))
        decisions = detect.select_frames([quality[i] for i in cand], keep_best=config.keep_best,
                                         max_fwhm=config.max_fwhm, min_stars=config.min_stars)
        for i, (used, reason) in zip(cand, decisions):
            if not used:
                records[i].reason = reason
        cand = [i for i in cand if not records[i].reason]
        if not cand:
            store.close()
            raise SkystackError("every light was rejected: " + "; ".join(
                f"{Path(r.path).name}: {r.reason}" for r in records[:5]))
        prov = _reference_index(config.reference, lights, cand, quality, detect)
        sreg = register.register_frames({i: stars[i] for i in cand}, {i: quality[i].score for i in cand},
                                        (h_full, w_full), model=config.transform_model, provisional=prov,
                                        fixed_reference=bool(config.reference),
                                        on_frame=prog.stepper("register", len(cand)))
        ref, transforms, lens = sreg.ref, sreg.transforms, sreg.lens
        for i, why in sreg.failures.items():
            records[i].reason = why if why.startswith("registration failed") else f"registration failed: {why}"
        for i, r in sreg.residuals.items():
            records[i].residual_px = _f(r)
        used = [i for i in cand if i in transforms]

    # --- pass 2: warp into the reference grid (in place in the store)
    s_half = np.array([[2.0, 0, 0.5], [0, 2.0, 0.5], [0, 0, 1]])
    lens_store = lens
    if lens is not None and superpixel:
        lens_store = type(lens)(cx=(lens.cx - 0.5) / 2, cy=(lens.cy - 0.5) / 2, r_norm=lens.r_norm / 2,
                                k1=lens.k1, k2=lens.k2)

    t_store = {i: (np.linalg.inv(s_half) @ t @ s_half if superpixel else t) for i, t in transforms.items()}
    motion = sreg.motion_px / (2.0 if superpixel else 1.0)
    with timer("foreground"):
        sky_xy = np.concatenate([sreg.sky_stars[i] for i in used if i in sreg.sky_stars] or [np.zeros((0, 2))])
        sky_xy = (sky_xy - 0.5) / 2.0 if superpixel else sky_xy
        fg = _foreground(config, store, used, ref, t_store, lens_store, motion, (out_h, out_w), lights, sky_xy)
        land = None
        if fg.found:
            land = _landscape_stack(fg, [lights[i] for i in used], cset, ccfg, config, be, budget,
                                    2 if superpixel else 1, plan=plan)
    canvas = framing.make_canvas(config.framing, {i: t_store[i] for i in used}, (out_h, out_w), lens_store)
    target = store
    if canvas.shape != (out_h, out_w):
        target = FrameStore(len(lights), (n_ch, *canvas.shape), ram_budget=plan.store_ram,
                            dtype=config.store_dtype, spill_dir=config.spill_dir)
    excl = foreground.sky_exclusion(fg.mask, _fg_margins((out_h, out_w))[0]) if fg.found else None

    # normalisation statistics are taken from each warped frame on its way into the store (not
    # by reading the store again), where the frame is: on the device only numbers come down
    frame_stats: dict[int, tuple[Any, np.ndarray]] = {}

    def warp_one(i: int):
        """Warp (or place) frame ``i`` into ``target``; the frame stored, or None if left as it was."""
        records[i].transform = transforms[i].tolist()
        if i == ref and target is store and excl is None:
            return None  # the reference is its own grid
        img = store.get(i, out=None if store.on_device else scratch.get("in", store.shape))
        if excl is not None:  # a copy on the store's backend, the landscape blanked
            bxp = array_module(img)
            img = bxp.array(img, dtype=bxp.float32)
            img[:, bxp.asarray(excl)] = bxp.nan
        if i == ref:  # copied, never resampled
            out = canvas.place(to_host(img))
        else:
            buf = None if be.is_gpu else scratch.get("out", (n_ch, *canvas.shape))
            out = warp.warp(xp.asarray(img), canvas.offset @ t_store[i], canvas.shape, out=buf,
                            method=config.interpolation, lens=lens_store, lens_offset=(canvas.ox, canvas.oy))
        out = xp.asarray(out) if target.on_device else to_host(out)
        target.put(i, out)  # measured before a float16 spill rounds it: the order statistics stay unquantised
        return out

    with timer("warp"), _Progress(config.quiet) as prog:
        step = prog.stepper("warp + normalize", len(used))
        # the reference first: its stars are every frame's photometric apertures
        ref_frame = warp_one(ref)
        ref_frame = target.get(ref) if ref_frame is None else ref_frame
        apertures = normalize.star_apertures(ref_frame)
        frame_stats[ref] = normalize.frame_measures(ref_frame, apertures)
        del ref_frame
        step()

        def warp_measure(i: int) -> None:
            frame_stats[i] = normalize.frame_measures(warp_one(i), apertures)

        run_parallel(warp_measure, [i for i in used if i != ref], _compute_threads(be, config), on_done=step)
        landscape = None
        if land is not None:
            landscape = (canvas.place(land[0]), canvas.place(land[1][None])[0],
                         canvas.place(fg.mask[None].astype(np.float32))[0] > 0.5, canvas.place(land[2][None])[0])
    if target is not store:
        store.close()
        store = target
    regdesc = register.describe(sreg)
    regdesc.update({"framing": f"{canvas.framing} ({canvas.shape[1]}x{canvas.shape[0]})", "canvas": canvas.to_dict(),
                    "foreground": fg.message})
    trailing = _trailing(transforms, lens, lights, metas, used, (h_full, w_full))
    if trailing:
        regdesc["trailing"] = trailing

    return Registered(store=store, used=used, ref=ref, records=records, lights=lights, backend=be,
                      timer=timer, t_start=t_start, budget=budget, plan=plan, registration=regdesc,
                      landscape=landscape,
                      framing=canvas.framing,
                      masters={k: _master_summary(v) for k, v in cset.masters.items()},
                      queue_peak=producer.gauge.peak, queue_bound=producer.bound, metas=metas,
                      notes=_log_notes(notes), frame_stats=frame_stats)


def combine_registered(reg: Registered, config: StackConfig = StackConfig()) -> StackResult:
    """Normalise, weight and combine a :class:`Registered` store tile by tile.

    Only ``rejection``, ``kappa_*``, ``max_iter``, ``normalization`` and
    ``weighting`` of ``config`` matter here, so one store can be combined
    several ways.
    """
    from skystack.engine import normalize

    timer, store, used, ref, be = reg.timer, reg.store, reg.used, reg.ref, reg.backend
    records = [replace(r) for r in reg.records]
    n_ch, out_h, out_w = store.shape
    with timer("normalize"):  # the frames' statistics were measured as they went into the store
        fstats = [reg.frame_stats[i][0] for i in used]
        signal = np.stack([reg.frame_stats[i][1] for i in used])
        r = used.index(ref)
        nscale, noffset = normalize.normalization_factors(fstats, r, config.normalization, signal=signal)
        weights = normalize.frame_weights(fstats, nscale, config.weighting,
                                          scores=[records[i].score or 0.0 for i in used],
                                          noise=[records[i].noise for i in used],
                                          fwhm=[records[i].fwhm_px for i in used])
    with timer("combine"), _Progress(config.quiet) as prog:
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
    timer.t["total"] = time.perf_counter() - reg.t_start
    return StackResult(
        image=image if n_ch == 3 else image[0], count=count, coverage=coverage, frames=records,
        reference=str(reg.lights[ref]), backend=be.name, device=be.device_name, timings=dict(timer.t),
        masters=reg.masters, settings=_settings(config, len(used)), registration=reg.registration,
        landscape=land_mask, peak_rss_bytes=peak_rss_bytes(),
        queue_peak=reg.queue_peak, queue_bound=reg.queue_bound,
        exposure_s=float(sum(records[i].exposure_s or 0.0 for i in used)),
        store_on_disk=store.on_disk,
        lights_meta=[reg.metas[i] for i in [ref, *(j for j in used if j != ref)]] if reg.metas else [],
        notes=list(reg.notes),
    )


def _log_notes(notes: dict[str, None]) -> list[str]:
    """Log each calibration remark once (the CLI shows them as warning lines); return them."""
    import logging

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
    import threading

    from skystack.engine.backend import array_module, cpu_workers
    from skystack.engine.combine import combine

    n = len(used)
    settings = _settings(config, n)
    method, klo, khi = settings["rejection"], settings["kappa_low"], settings["kappa_high"]
    c, h, w = store.shape
    h0 = first_row
    # A tile row costs the block itself (C planes) plus, per channel in flight, a
    # contiguous copy and the combine's bounded temporaries.
    per_row = n * w * 4 * _COMBINE_WORKSPACE
    if budget is None:
        budget = be.memory_budget(config.memory_limit)
    # The block is read into host memory (and, on a GPU, copied up): it must fit
    # both the device's budget and the host's, whichever is smaller.
    from skystack.engine.backend import CPU

    host_budget = plan.tile_bytes if plan is not None else CPU.memory_budget(config.memory_limit)
    rows = int(max(1, min(h, min(budget, host_budget) // max(per_row, 1))))
    image = np.full((c, h - h0, w), np.nan, dtype=np.float32)
    count = np.zeros((h - h0, w), dtype=np.int32)
    coverage = np.zeros((h - h0, w), dtype=np.int16)
    rejected = np.zeros(n, dtype=np.int64)
    lock = threading.Lock()
    xp = be.xp
    # Threads split each tile by rows (each does every channel of its rows): all cores busy
    # whatever the channel count, one core per native launch (backend.run_cpu shares them).
    threads = _compute_threads(be, config)
    step = progress.stepper("combine", -(-(h - h0) // rows)) if progress is not None else (lambda: None)
    for y0 in range(h0, h, rows):
        y1 = min(h, y0 + rows)
        block = store.tile(used, y0, y1)  # (N, C, rows, W)
        bxp = array_module(block)  # the device for the VRAM store, else the host
        coverage[y0 - h0:y1 - h0] = be.to_host(bxp.isfinite(block[:, 0]).sum(axis=0, dtype=bxp.int16))

        cuts = np.linspace(0, y1 - y0, min(threads, y1 - y0) + 1).astype(int)
        bands = list(zip(cuts[:-1], cuts[1:]))

        def one(band: tuple[int, int]) -> None:
            r0, r1 = band  # rows of the block
            for ch in range(c):
                cube = xp.ascontiguousarray(xp.asarray(block[:, ch, r0:r1]))  # a host block goes up here
                with cpu_workers(len(bands)):
                    res = combine(cube, method=method, kappa_low=klo, kappa_high=khi,
                                  max_iter=config.max_iter,
                                  scale=xp.asarray(nscale[:, ch]), offset=xp.asarray(noffset[:, ch]),
                                  weights=xp.asarray(weights[:, ch]))
                image[ch, y0 - h0 + r0:y0 - h0 + r1] = be.to_host(res.mean)
                rej = be.to_host(res.rejected).astype(np.int64)
                with lock:
                    if ch == 0:
                        count[y0 - h0 + r0:y0 - h0 + r1] = be.to_host(res.count)
                    rejected[:] += rej

        run_parallel(one, bands, threads)
        step()
        block = None  # the tile is freed before the next is read (not del: the closure reads it)
    return image, count, coverage, rejected


def _fg_margins(shape: tuple[int, int]) -> tuple[float, float]:
    """(margin, feather) of the landscape seam in pixels of a frame of ``shape``."""
    from skystack.engine.foreground import small_bin

    b = small_bin(shape)
    return _FG_MARGIN_BLOCKS * b, _FG_FEATHER_BLOCKS * b


def _foreground(config: StackConfig, store, used: list[int], ref: int, transforms: dict[int, np.ndarray], lens,
                motion: float, shape: tuple[int, int], lights: list[Path], star_xy: np.ndarray):
    """The landscape of the session (``--foreground auto|none|MASK``), written to ``--save-mask`` if asked."""
    from skystack.engine import foreground as fgm
    from skystack.engine.register import _spread

    if config.foreground == "none":
        fg = fgm.none("none (--foreground none)")
    elif config.foreground != "auto":
        fg = fgm.load_mask(config.foreground, shape)
    elif motion < fgm.MIN_MOTION_PX:
        fg = fgm.detect_foreground({}, transforms, shape, 1, motion_px=motion)
    else:
        b = fgm.small_bin(shape)
        pick = sorted(set(_spread(used, fgm.N_FRAMES - 1)) | {ref})
        small = fgm.small_frames(store.get, pick, b)
        fg = fgm.detect_foreground(small, {i: transforms[i] for i in pick}, shape, b, lens=lens, motion_px=motion,
                                   star_xy=star_xy)
    if config.save_mask:
        fgm.save_mask(config.save_mask, fg, shape, inputs=lights)
    return fg


def _landscape_stack(fg, paths: list[Path], cset, ccfg, config: StackConfig, be, budget: int | None,
                     scale: int, *, plan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The still landscape: unregistered lights stacked on the CFA mosaic, then debayered once.

    Only the rows from just above the horizon down are kept. Stacking the
    mosaic before interpolating (a still scene needs no resampling) and
    debayering the high-SNR result with RCD keeps roof lines and lights as
    sharp as the sensor recorded them. ``scale`` is 2 for super-pixel stores.
    Returns the ``(C, H, W)`` image (NaN above the band), the blend weight and the
    values kept per pixel (NaN above the band).
    """
    from skystack.engine import calibrate as cal
    from skystack.engine import debayer
    from skystack.engine.foreground import blend_weight
    from skystack.engine.framestore import FrameStore
    from skystack.engine.producer import FrameProducer
    from skystack.engine.rawconv import cfa_to_float

    margin, feather = _fg_margins(fg.mask.shape)
    weight = blend_weight(fg.mask, margin, feather)
    rows = np.flatnonzero(weight.max(axis=1) > 0)
    y0 = (max(0, int(rows[0]) - 4) * scale) // 2 * 2  # full-resolution, even: the CFA pattern is kept
    h_full, w_full = fg.mask.shape[0] * scale, fg.mask.shape[1] * scale
    band = FrameStore(len(paths), (1, h_full - y0, w_full), ram_budget=plan.store_ram)
    metas: list[Any] = [None] * len(paths)
    producer = FrameProducer(paths, workers=config.workers, queue_size=config.queue_size, manual_release=True)
    xp = be.xp

    def one(item) -> None:
        try:
            if item.frame is None:
                raise SkystackError(item.error or f"{paths[item.index]}: cannot decode")
            m = item.frame.meta
            x = cfa_to_float(xp.asarray(item.frame.data), pattern=m.pattern, black_level=m.black_level,
                             white_level=m.white_level)
            x = cal.calibrate_light(x, m, cset, config=ccfg).data
            band.put(item.index, be.to_host(x[y0:])[None])
            metas[item.index] = m
        finally:
            producer.release(item)

    try:
        run_parallel(one, producer, _compute_threads(be, config))
        k = list(range(len(paths)))
        ones, zeros = np.ones((len(k), 1), np.float32), np.zeros((len(k), 1), np.float32)
        cfa, kept, _, _ = _combine_store(band, k, ones, zeros, ones, config, be, budget, plan=plan)
    finally:
        band.close()
    m = metas[0]
    wb = m.wb if (config.apply_wb and m.wb is not None) else None
    method = "superpixel" if scale == 2 else "rcd"
    rgb = debayer.debayer(cfa[0], m.pattern, method=method, wb=wb) if m.pattern else cfa
    full = np.full((rgb.shape[0], *fg.mask.shape), np.nan, dtype=np.float32)
    full[:, y0 // scale:] = be.to_host(rgb)
    if scale == 2:  # a super-pixel keeps what all four of its mosaic pixels kept
        kept = kept.reshape(kept.shape[0] // 2, 2, kept.shape[1] // 2, 2).min(axis=(1, 3))
    counts = np.full(fg.mask.shape, np.nan, dtype=np.float32)
    counts[y0 // scale:] = kept
    return full, weight, counts


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
    from skystack.engine.crop import apply_box, max_rectangle

    box = max_rectangle(coverage >= n)
    if box[1] <= box[0] or box[3] <= box[2]:
        raise SkystackError("framing intersection: the frames share no common area; use --framing reference")
    return (apply_box(image, box), apply_box(count, box), apply_box(coverage, box),
            None if mask is None else apply_box(mask, box))


def _trailing(transforms: dict[int, np.ndarray], lens, lights: list[Path], metas: list[Any], used: list[int],
              shape: tuple[int, int]) -> str:
    """Star trailing per exposure at the frame's edge, with the NPF rule's suggestion for this lens."""
    from skystack.engine.framing import border_points
    from skystack.engine.match import transform_points
    from skystack.engine.plan import inputs_from_frame, rule_npf

    rates = []
    p = border_points(shape, 16)
    ideal = lens.undistort(p) if lens is not None else p
    for a, b in zip(used, used[1:]):
        ma, mb = metas[a], metas[b]
        ta, tb = _timestamp(ma), _timestamp(mb)
        if ta is None or tb is None or not tb > ta:
            continue
        q = transform_points(np.linalg.inv(transforms[b]) @ transforms[a], ideal)
        q = lens.distort(q) if lens is not None else q
        rates.append(float(np.nanmax(np.hypot(*(q - p).T))) / (tb - ta))
    exp = next((m.exposure_s for m in (metas[i] for i in used) if m is not None and m.exposure_s), None)
    if not rates or not exp:
        return ""
    px = float(np.median(rates)) * exp
    text = f"{px:.1f} px per {exp:g} s exposure at the frame's edge"
    try:
        lens_in = inputs_from_frame(str(lights[used[0]]))
        if lens_in.focal_length_mm and lens_in.aperture and lens_in.pixel_pitch_um:
            npf = rule_npf(lens_in.focal_length_mm, lens_in.aperture, lens_in.pixel_pitch_um)
            text += f"; the NPF rule suggests at most {npf:.1f} s for this lens (skystack plan)"
        else:
            text += "; the files do not record the lens and pixel size the NPF rule needs (see skystack plan)"
    except SkystackError:
        pass
    return text


def _timestamp(meta) -> float | None:
    import datetime as _dt

    if meta is None or not meta.timestamp:
        return None
    try:
        return _dt.datetime.fromisoformat(str(meta.timestamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _compute_threads(be, config: StackConfig) -> int:
    """Threads for per-frame work: one per core on the CPU (NumPy releases the GIL), one on a GPU."""
    if be.is_gpu:
        return 1
    return max(1, min(config.workers or (os.cpu_count() or 1), os.cpu_count() or 1))


def _reference_index(reference: str | None, lights: list[Path], cand: list[int], quality, detect) -> int:
    if reference:
        target = Path(reference).resolve()
        for i in cand:
            if lights[i].resolve() == target or lights[i].name == Path(reference).name:
                return i
        raise SkystackError(f"--reference {reference}: not among the usable lights")
    k = detect.choose_reference([quality[i] for i in cand])
    return cand[k]


def _f(v) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if np.isfinite(v) else None


def _master_summary(m) -> dict[str, Any]:
    meta = m.meta
    d = meta.to_dict() if hasattr(meta, "to_dict") else dict(getattr(meta, "__dict__", {}))
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, type(None)))}


def _settings(cfg: StackConfig, n_frames: int | None = None) -> dict[str, Any]:
    """The settings of ``cfg`` as the report gives them, kappas filled in.

    With ``n_frames`` (the frames combined), ``rejection`` is the method used
    (what ``"auto"`` chose) and ``rejection_requested`` what was asked for.
    """
    from skystack.engine.combine import DEFAULT_KAPPAS, resolve_rejection

    d = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    if n_frames is not None:
        d["rejection_requested"] = cfg.rejection
        d["rejection"] = resolve_rejection(cfg.rejection, n_frames)
    dk = DEFAULT_KAPPAS.get(d["rejection"], (3.0, 3.0))
    d["kappa_low"] = dk[0] if cfg.kappa_low is None else cfg.kappa_low
    d["kappa_high"] = dk[1] if cfg.kappa_high is None else cfg.kappa_high
    return d
