"""Settings of a ``skystack bench`` run: the size presets, the stage names and :class:`BenchConfig`."""

from __future__ import annotations

from dataclasses import dataclass

from skystack.engine.errors import SkystackError

#: ``name -> (lights, megapixels per frame)``; calibration frames: see
#: :func:`~skystack.tools.bench.sessions.session_synth_config`.
PRESETS: dict[str, tuple[int, float]] = {
    "ci": (8, 0.5),
    "small": (20, 4.0),
    "50x16": (50, 16.0),
    "200x24": (200, 24.0),
}

#: Stage timers of :class:`~skystack.engine.stack.StackResult` in pipeline order.
STAGES = ("scan", "masters", "upload", "calibrate", "detect", "debayer", "store", "register", "model", "foreground",
          "landscape", "warp", "apertures", "normalize", "combine")


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """Settings of one ``skystack bench`` run.

    Attributes
    ----------
    preset : str
        Size preset (:data:`PRESETS`); ``frames``/``megapixels`` override it.
    frames, megapixels : int, float, optional
        Number of lights and megapixels per frame of the synthetic session.
    session : str, optional
        Existing session folder (``lights/``, ``darks/``...) to use instead of
        synthesizing one.
    backend : str or None
        ``None``/``"auto"``: every available backend; ``"cpu"`` or ``"gpu"``: that one.
    workers : int, optional
        Decoder threads of the pipeline and of the decode floor
        (default: the producer's own default).
    file_format : {"dng", "fits"}
        Format of the synthesized frames.
    seed : int
        Simulator seed.
    cache_root : str, optional
        Where synthesized sessions are kept (default ``$SKYSTACK_BENCH_CACHE``
        or ``~/.cache/skystack/bench``).
    output : str, optional
        JSON file to write (default ``bench/results/<machine>-<size>-<time>.json``
        in a source checkout, else ``./skystack-bench-....json``). ``""``: none.
    repeat : int
        Runs per backend (and of the decode floor); the fastest is reported.
    memory_limit : int, optional
        ``StackConfig.memory_limit`` in bytes (the store spills to disk above it).
    profile : bool
        Run the CPU pipeline once more under cProfile and report the top functions.
    timeout_s : float
        Limit for each child process.
    quiet : bool
        No progress lines on stderr.
    """

    preset: str = "small"
    frames: int | None = None
    megapixels: float | None = None
    session: str | None = None
    backend: str | None = None
    workers: int | None = None
    file_format: str = "dng"
    seed: int = 0
    cache_root: str | None = None
    output: str | None = None
    repeat: int = 1
    memory_limit: int | None = None
    profile: bool = False
    timeout_s: float = 3600.0
    quiet: bool = False

    def size(self) -> tuple[int, float]:
        """(lights, megapixels) after applying the overrides to the preset."""
        if self.preset not in PRESETS:
            raise SkystackError(f"--preset {self.preset!r}: choose one of {', '.join(PRESETS)}")
        n, mp = PRESETS[self.preset]
        n = int(self.frames if self.frames is not None else n)
        mp = float(self.megapixels if self.megapixels is not None else mp)
        if n < 2:
            raise SkystackError(f"--frames {n}: a benchmark session needs at least 2 lights")
        if not 0.01 <= mp <= 200:
            raise SkystackError(f"--megapixels {mp:g}: choose a size between 0.01 and 200 MP")
        return n, mp
