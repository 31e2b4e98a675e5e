"""The session run as an ordered list of stages, and the one reporter of a stack.

A stage (:class:`Stage`) is a small object: a ``name``, the
:class:`SessionContext` fields it ``consumes`` and ``produces``, the stage
``timer`` its run counts under, and ``run(context)``. :func:`run_stages` runs a
list of them in order under the context's :class:`Reporter` (stage timers and
progress bars). The session's stages are listed, in order, in
:data:`skystack.engine.stages.SESSION_STAGES`;
:func:`skystack.engine.stack.register_session` runs them. ``docs/architecture.md``
("The stages", "Adding a stage") describes each.

The stages work wherever the frames are: on a GPU the frame store may be a
:class:`~skystack.engine.framestore.DeviceFrameStore`, and a stage asks
``store.on_device`` (or ``backend.is_gpu``) rather than assuming host arrays.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence

import numpy as np

if TYPE_CHECKING:
    from skystack.engine.backend import Backend
    from skystack.engine.session import SessionFiles
    from skystack.engine.stack import FrameRecord, StackConfig


class Stage(Protocol):
    """One step of the session run (see :data:`skystack.engine.stages.SESSION_STAGES`)."""

    #: short name of the stage (docs, tests)
    name: str
    #: the stage timer (``timings_s`` of report.json) its run counts under; None when the stage times
    #: its own steps or is too small to show
    timer: str | None
    #: :class:`SessionContext` fields it reads that earlier stages produce (any stage may read :data:`INPUTS`)
    consumes: tuple[str, ...]
    #: :class:`SessionContext` fields it sets (or fills in)
    produces: tuple[str, ...]

    def run(self, ctx: SessionContext) -> None:
        """Read the ``consumes`` fields of ``ctx`` and set its ``produces`` fields."""


class _Timer:
    """Seconds per stage, summed over worker threads (so stages can add up to more than the wall time)."""

    def __init__(self) -> None:
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


class _Progress:
    """rich progress bars on stderr (a terminal or a Jupyter notebook); silent when quiet or piped.

    One per stage group, used as a context manager so a failure stops the display.
    """

    def __init__(self, quiet: bool) -> None:
        # rich is imported when a stack shows its progress, not by every user of StackConfig
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

    def stepper(self, name: str, total: int) -> Callable[[], None]:
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


class Reporter:
    """Progress and timing of one stack: its stage timers and its stages' progress bars.

    ``timer`` sums seconds per timer name (report.json's ``timings_s``, in the order first
    timed); a stage's bars share one display, opened with its first bar and closed when the
    stage ends, failed or not.
    """

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.timer = _Timer()
        self.t_start = time.perf_counter()
        self._bars: _Progress | None = None

    def timed(self, name: str):
        """Context manager adding the seconds it spans to timer ``name``."""
        return self.timer(name)

    def bar(self, name: str, total: int) -> Callable[[], None]:
        """A progress bar ``name`` of ``total`` steps in the running stage's display; its step function."""
        if self._bars is None:
            self._bars = _Progress(self.quiet)
        return self._bars.stepper(name, total)

    @contextmanager
    def stage(self, stage: Stage) -> Iterator[None]:
        """Time ``stage`` under its timer and close its progress display when it ends."""
        try:
            with self.timer(stage.timer) if stage.timer else nullcontext():
                yield
        finally:
            if self._bars is not None:
                self._bars.close()
                self._bars = None

    def elapsed(self) -> float:
        """Seconds since the stack started."""
        return time.perf_counter() - self.t_start


class Scratch(threading.local):
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


#: The :class:`SessionContext` fields set before the first stage, which any stage may read.
INPUTS = ("files", "config", "backend", "report", "lights", "records", "scratch")


def compute_threads(be, config: StackConfig) -> int:
    """Threads for per-frame work: one per core on the CPU (NumPy releases the GIL), one on a GPU."""
    if be.is_gpu:
        return 1
    return max(1, min(config.workers or (os.cpu_count() or 1), os.cpu_count() or 1))


def finite(v) -> float | None:
    """``v`` as a float for the report, None when it is missing or not finite."""
    if v is None:
        return None
    v = float(v)
    return v if np.isfinite(v) else None


@dataclass(kw_only=True, eq=False)
class SessionContext:
    """What the stages of one session hand on to each other: the fields they consume and produce.

    The first group (:data:`INPUTS`) is set before the first stage runs; every later
    field is set by the stage named in its comment
    (:data:`skystack.engine.stages.SESSION_STAGES`).
    Frame indices are indices into ``lights``.
    """

    files: SessionFiles
    config: StackConfig  # the plan stage lowers workers and queue_size to fit --memory-limit
    backend: Backend
    report: Reporter
    lights: list[Path]
    records: list[FrameRecord]  # one per light; every stage may fill in its fields or its reason
    scratch: Scratch = field(default_factory=Scratch)  # each thread's frame buffers (host backends)

    # scan
    metas: list[Any] = field(default_factory=list)  # FrameMeta per light (None: unreadable); pass 1: its decode's
    shape: tuple[int, int] = (0, 0)  # the lights' mosaic, (H, W)
    pattern: str | None = None  # their CFA pattern (None: monochrome)
    camera: str | None = None  # their camera (None: unnamed)
    # plan
    plan: Any = None  # memory.MemoryPlan: threads, queue, store and tile bytes within --memory-limit
    # masters
    calibration: Any = None  # calibrate.CalibrationSet, on the backend
    calibration_config: Any = None  # calibrate.CalibrationConfig
    notes: dict[str, None] = field(default_factory=dict)  # calibration remarks, once each, in order
    # store
    store: Any = None  # FrameStore or DeviceFrameStore of store_shape frames; after warp: the registered frames
    budget: int | None = None  # device bytes left for the combine's tiles
    # calibrate
    todo: list[int] = field(default_factory=list)  # the lights pass 1 decoded
    stars: dict[int, Any] = field(default_factory=dict)  # light -> detect.StarList
    quality: dict[int, Any] = field(default_factory=dict)  # light -> detect.FrameQuality
    queue_peak: int = 0  # decoded frames alive at once, at most
    queue_bound: int = 0
    # select
    candidates: list[int] = field(default_factory=list)  # lights selection kept
    provisional: int = -1  # the provisional reference
    # foreground-prefetch
    small_prefetch: Any = None  # landscape.SmallFrames being binned on a thread, or None
    # register
    registration: Any = None  # register.SessionRegistration (mosaic pixels)
    ref: int = -1
    used: list[int] = field(default_factory=list)  # the registered lights, in input order
    store_transforms: dict[int, np.ndarray] = field(default_factory=dict)  # in the store's pixels
    store_lens: Any = None  # lens.RadialLens in the store's pixels, or None
    # foreground
    foreground: Any = None  # foreground.Foreground
    land: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # landscape stack, weight, kept values
    sky_exclusion: np.ndarray | None = None  # store pixels kept out of the sky stack (the landscape)
    # canvas
    canvas: Any = None  # framing.Canvas
    target: Any = None  # the store the warp writes: ``store``, or a new one of the canvas's size
    # warp
    frame_stats: dict[int, tuple[Any, np.ndarray]] = field(default_factory=dict)  # light -> normalisation stats
    landscape: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None  # in the canvas
    # describe
    description: dict[str, Any] = field(default_factory=dict)  # the report's "registration"

    @property
    def superpixel(self) -> bool:
        """The super-pixel debayer: the store holds half-size frames."""
        return self.config.debayer == "superpixel"

    @property
    def out_shape(self) -> tuple[int, int]:
        """(H, W) of a frame in the store, before the canvas."""
        h, w = self.shape
        return (h // 2, w // 2) if self.superpixel else (h, w)

    @property
    def channels(self) -> int:
        return 3 if self.pattern else 1

    @property
    def store_shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.out_shape)


def run_stages(stages: Sequence[Stage], ctx: SessionContext) -> SessionContext:
    """Run ``stages`` in order on ``ctx``, each timed and its progress shown by ``ctx.report``."""
    for stage in stages:
        with ctx.report.stage(stage):
            stage.run(ctx)
    return ctx
