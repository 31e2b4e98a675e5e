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
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from skystack.engine.errors import SkystackError
from skystack.engine.session import SessionFiles

#: Bytes per stored pixel per frame per channel of working space the combine
#: step needs, as a multiple of the tile itself (NumPy twin's temporaries).
_COMBINE_WORKSPACE = 6


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
    debayer: str = "bilinear"
    apply_wb: bool = True
    interpolation: str = "lanczos3"
    transform_model: str = "similarity"
    reference: str | None = None
    keep_best: float | None = None
    max_fwhm: float | None = None
    min_stars: int = 15
    memory_limit: int | None = None
    store_dtype: str = "float32"
    spill_dir: str | None = None
    workers: int | None = None
    queue_size: int = 4
    dark_optimize: bool = False
    cosmetic: bool = True
    cache_dir: str | None = None
    quiet: bool = False


@dataclass(kw_only=True)
class FrameRecord:
    """What the report says about one light."""

    path: str
    used: bool = False
    reason: str = ""
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
    peak_rss_bytes: int = 0
    queue_peak: int = 0
    queue_bound: int = 0
    exposure_s: float = 0.0
    store_on_disk: bool = False

    @property
    def n_used(self) -> int:
        return sum(1 for f in self.frames if f.used)


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
    """rich progress on stderr, silent when quiet or not a TTY."""

    def __init__(self, quiet: bool) -> None:
        import sys

        self.enabled = not quiet and sys.stderr.isatty()
        self._p = None
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            from rich.console import Console

            self._p = Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), console=Console(stderr=True), transient=False)
            self._p.start()

    def task(self, name: str, total: int):
        return self._p.add_task(name, total=total) if self._p else None

    def advance(self, task, n: int = 1) -> None:
        if self._p is not None and task is not None:
            self._p.advance(task, n)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()


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
    queue_peak: int
    queue_bound: int

    def frame(self, i: int) -> np.ndarray:
        """Registered frame ``i`` (index into the lights), ``(C, H, W)`` float32."""
        return self.store.get(i)

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
    from skystack.engine import debayer, detect, match, normalize, warp
    from skystack.engine.cosmetic import CosmeticConfig
    from skystack.engine.backend import CPU, get_backend, to_host
    from skystack.engine.framestore import FrameStore
    from skystack.engine.io import read_meta
    from skystack.engine.masters import same_camera
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

    with timer("masters"):
        cset = cal.build_calibration_set(
            bias=list(files.bias), darks=list(files.darks), flats=list(files.flats),
            dark_flats=list(files.dark_flats), cosmetic=CosmeticConfig() if config.cosmetic else None,
            cache_dir=config.cache_dir, backend=be)
        ref_meta = next(m for m, r in zip(metas, records) if m is not None and not r.reason)
        cal.check_compatible(ref_meta, cset)
        cset = cset.to_backend(be)
    ccfg = cal.CalibrationConfig(dark_optimize=config.dark_optimize, cosmetic=config.cosmetic)

    # --- pass 1: decode -> calibrate -> cosmetic -> detect -> debayer -> store
    superpixel = config.debayer == "superpixel"
    out_h, out_w = (h_full // 2, w_full // 2) if superpixel else (h_full, w_full)
    n_ch = 3 if pattern else 1
    # Half of the budget (min(--memory-limit, half the free memory)) may hold the
    # frame store; beyond that it spills to disk.
    budget = be.memory_budget(config.memory_limit)
    store_budget = CPU.memory_budget(config.memory_limit) // 2  # the store is host memory
    store = FrameStore(len(lights), (n_ch, out_h, out_w), ram_budget=store_budget,
                       dtype=config.store_dtype, spill_dir=config.spill_dir)
    todo = [i for i, r in enumerate(records) if not r.reason]
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
            raw = xp.asarray(item.frame.data)  # uint16 upload: 2 bytes/px
            x = cfa_to_float(raw, pattern=m.pattern, black_level=m.black_level, white_level=m.white_level)
            x = cal.calibrate_light(x, m, cset, config=ccfg).data
        with timer("detect"):
            x_host = to_host(x)
            st = detect.detect_stars(x_host, pattern=m.pattern)
            q = detect.measure_quality(st)
            noise = normalize.highpass_noise(x_host, step=2 if m.pattern else 1)
        with timer("debayer"):
            wb = m.wb if (config.apply_wb and m.wb is not None) else None
            rgb = debayer.debayer(x, m.pattern, method=config.debayer, wb=wb) if m.pattern else x[None]
            host = to_host(rgb)
        with timer("store"):
            store.put(i, host)
        stars[i], quality[i] = st, q
        rec.exposure_s = _f(m.exposure_s)
        rec.stars = int(q.n_stars)
        rec.fwhm_px = _f(q.fwhm_px)
        rec.roundness = _f(q.roundness)
        rec.background = _f(q.background)
        rec.noise = _f(noise)  # before normalisation and warping: the noise weights' input
        rec.score = _f(q.score)

    try:
        _run_parallel(process, producer, _compute_threads(be, config), on_done=lambda: prog.advance(task))
    finally:
        prog.close()

    # --- selection and reference
    with timer("register"):
        cand = [i for i in todo if not records[i].reason]
        if not cand:
            store.close()
            raise SkystackError("no light frame could be decoded: " + "; ".join(
                records[i].reason for i in todo[:3]))
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
        ref = _reference_index(config.reference, lights, cand, quality, detect)
        mcfg = match.MatchConfig(model=config.transform_model)
        transforms: dict[int, np.ndarray] = {}
        for i in cand:
            if i == ref:
                transforms[i] = np.eye(3)
                records[i].residual_px = 0.0
                continue
            try:
                # StarLists carry per-star centroid errors: the fit is weighted by them.
                res = match.match_stars(stars[i], stars[ref], config=mcfg)
            except SkystackError as exc:
                records[i].reason = f"registration failed: {exc}"
                continue
            transforms[i] = np.asarray(res.transform, dtype=np.float64)
            records[i].residual_px = _f(res.residual_rms_px)
        used = [i for i in cand if i in transforms]

    # --- pass 2: warp into the reference grid (in place in the store)
    s_half = np.array([[2.0, 0, 0.5], [0, 2.0, 0.5], [0, 0, 1]])
    def warp_one(i: int) -> None:
        t = transforms[i]
        records[i].transform = t.tolist()
        if i == ref:
            return
        t_store = np.linalg.inv(s_half) @ t @ s_half if superpixel else t
        out = warp.warp(xp.asarray(store.get(i)), t_store, (out_h, out_w), method=config.interpolation)
        store.put(i, to_host(out))

    with timer("warp"):
        _run_parallel(warp_one, used, _compute_threads(be, config))

    return Registered(store=store, used=used, ref=ref, records=records, lights=lights, backend=be,
                      timer=timer, t_start=t_start, budget=budget,
                      masters={k: _master_summary(v) for k, v in cset.masters.items()},
                      queue_peak=producer.gauge.peak, queue_bound=producer.bound)


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
    with timer("normalize"):
        fstats_by: dict[int, Any] = {}
        signal_by: dict[int, Any] = {}
        apertures = normalize.star_apertures(store.get(ref))

        def stats_one(i: int) -> None:
            frame = store.get(i)
            fstats_by[i] = normalize.robust_stats(frame)
            signal_by[i] = normalize.signal_ratios(frame, apertures)

        _run_parallel(stats_one, used, _compute_threads(be, config))
        fstats = [fstats_by[i] for i in used]
        r = used.index(ref)
        nscale, noffset = normalize.normalization_factors(fstats, r, config.normalization,
                                                          signal=np.stack([signal_by[i] for i in used]))
        weights = normalize.frame_weights(fstats, nscale, config.weighting,
                                          scores=[records[i].score or 0.0 for i in used],
                                          noise=[records[i].noise for i in used],
                                          fwhm=[records[i].fwhm_px for i in used])
    with timer("combine"):
        image, count, coverage, rejected = _combine_store(store, used, nscale, noffset, weights, config, be,
                                                          reg.budget)
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
        masters=reg.masters, settings=_settings(config, len(used)), peak_rss_bytes=peak_rss_bytes(),
        queue_peak=reg.queue_peak, queue_bound=reg.queue_bound,
        exposure_s=float(sum(records[i].exposure_s or 0.0 for i in used)),
        store_on_disk=store.on_disk,
    )


def _combine_store(store, used: list[int], nscale, noffset, weights, config: StackConfig, be, budget):
    """Combine the store tile by tile.

    Returns image (C,H,W), count (H,W) of kept values, coverage (H,W) of frames
    with data there, and the rejected values per frame.
    """
    import threading

    from skystack.engine.combine import combine

    n = len(used)
    settings = _settings(config, n)
    method, klo, khi = settings["rejection"], settings["kappa_low"], settings["kappa_high"]
    c, h, w = store.shape
    # A tile row costs the block itself (C planes) plus, per channel in flight, a
    # contiguous copy and the combine's bounded temporaries.
    per_row = n * w * 4 * _COMBINE_WORKSPACE
    if budget is None:
        budget = be.memory_budget(None)
    rows = int(max(1, min(h, budget // max(per_row, 1))))
    image = np.full((c, h, w), np.nan, dtype=np.float32)
    count = np.zeros((h, w), dtype=np.int32)
    coverage = np.zeros((h, w), dtype=np.int16)
    rejected = np.zeros(n, dtype=np.int64)
    lock = threading.Lock()
    xp = be.xp
    threads = min(c, _compute_threads(be, config), max(1, _COMBINE_WORKSPACE - c - 1))
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows)
        block = store.tile(used, y0, y1)  # (N, C, rows, W)
        coverage[y0:y1] = np.isfinite(block[:, 0]).sum(axis=0)

        def one(ch: int) -> None:
            cube = xp.asarray(np.ascontiguousarray(block[:, ch]))
            res = combine(cube, method=method, kappa_low=klo, kappa_high=khi,
                          max_iter=config.max_iter,
                          scale=xp.asarray(nscale[:, ch]), offset=xp.asarray(noffset[:, ch]),
                          weights=xp.asarray(weights[:, ch]))
            image[ch, y0:y1] = be.to_host(res.mean)
            rej = be.to_host(res.rejected).astype(np.int64)
            with lock:
                if ch == 0:
                    count[y0:y1] = be.to_host(res.count)
                rejected[:] += rej

        _run_parallel(one, range(c), threads)
        del block
    return image, count, coverage, rejected


def _compute_threads(be, config: StackConfig) -> int:
    """Threads for per-frame work: one per core on the CPU (NumPy releases the GIL), one on a GPU."""
    if be.is_gpu:
        return 1
    return max(1, min(config.workers or (os.cpu_count() or 1), os.cpu_count() or 1))


def _run_parallel(fn, items, threads: int, *, on_done=None) -> None:
    """Apply ``fn`` to every item with at most ``threads`` in flight; re-raise the first error.

    ``items`` may be a lazy iterator (the producer): it is pulled only as
    workers free up, so back-pressure reaches the decoders.
    """
    if threads <= 1:
        for it in items:
            fn(it)
            if on_done:
                on_done()
        return
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="skystack-work") as pool:
        pending: set = set()
        for it in items:
            pending.add(pool.submit(fn, it))
            if len(pending) >= threads:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    f.result()
                    if on_done:
                        on_done()
        for f in pending:
            f.result()
            if on_done:
                on_done()


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
