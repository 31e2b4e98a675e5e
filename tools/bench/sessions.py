"""The benchmark's sessions: synthetic ones built once and cached by configuration hash, their
frame lists, and warming the page cache and the host's memory before a measured run."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from skystack.engine.errors import SkystackError

if TYPE_CHECKING:
    from skystack.engine.session import SessionFiles
    from skystack.tools.synth import SynthConfig


def sensor_size(megapixels: float, aspect: float = 1.5) -> tuple[int, int]:
    """``(width, height)``, both even, of a ``megapixels`` sensor with a 3:2 aspect."""
    w = math.sqrt(float(megapixels) * 1e6 * aspect)
    w2 = max(64, 2 * int(round(w / 2)))
    h2 = max(64, 2 * int(round(w2 / aspect / 2)))
    return w2, h2


def _n_calib(n_lights: int) -> int:
    return int(min(15, max(4, n_lights // 4)))


def session_synth_config(frames: int, megapixels: float, *, file_format: str = "dng", seed: int = 0,
                         n_calib: int | None = None, dark_flats: bool = False) -> SynthConfig:
    """The :class:`~skystack.tools.synth.SynthConfig` of a benchmark session.

    ``frames`` lights of ``megapixels`` each, with ``n_calib`` (default
    ``clip(frames // 4, 4, 15)``) bias, darks and flats (and dark flats when
    asked). Light 0 is the truth reference (Siril registers on the first
    frame); no cloudy or shaken light, so every pipeline can use every frame;
    the simulator's satellite/aircraft trails stay (rejection has work to do).
    """
    from skystack.tools.synth import SynthConfig

    w, h = sensor_size(megapixels)
    k = _n_calib(frames) if n_calib is None else int(n_calib)
    return SynthConfig(seed=int(seed), width=w, height=h, n_lights=int(frames), n_bias=k, n_darks=k,
                       n_flats=k, n_dark_flats=k if dark_flats else 0, file_format=file_format,
                       reference_index=0, cloudy_frame=None, shake_frame=None)


def default_cache_root() -> Path:
    """``$SKYSTACK_BENCH_CACHE`` or ``~/.cache/skystack/bench``."""
    env = os.environ.get("SKYSTACK_BENCH_CACHE")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "skystack" / "bench"


def config_hash(synth_config) -> str:
    """Short stable hash of a SynthConfig (the cache key of its session)."""
    blob = json.dumps(synth_config.to_dict(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def ensure_session(synth_config, cache_root: str | os.PathLike | None = None, *,
                   quiet: bool = True) -> Path:
    """Folder of the session ``synth_config`` describes, synthesized on first use.

    Sessions live in ``cache_root/<kind>-<hash>``; one is reused when its
    ``truth.json`` (written last by the simulator) exists. A half-written
    session (interrupted run) is rebuilt.
    """
    from skystack.tools.synth import simulate

    root = Path(cache_root) if cache_root is not None else default_cache_root()
    c = synth_config
    name = f"{c.n_lights}x{c.width}x{c.height}-{c.file_format}-{config_hash(c)}"
    final = root / name
    if (final / "truth.json").is_file():
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SkystackError(f"{root}: cannot create the benchmark cache ({exc.strerror}); "
                            "pass --cache-dir") from exc
    partial = root / (name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    if not quiet:
        print(f"synthesizing {c.n_lights} lights of {c.width}x{c.height} ({c.file_format}) in {final}",
              file=sys.stderr)
    t0 = time.perf_counter()
    simulate(c, partial, progress=not quiet)
    if final.exists():  # a stale folder without truth.json
        shutil.rmtree(final)
    os.replace(partial, final)
    if not quiet:
        print(f"synthesized in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return final


def session_files(session: str | os.PathLike) -> SessionFiles:
    """The session's frames: kind folders, or else a folder holding only lights (real sample sets)."""
    from skystack.engine.errors import InputNotFound
    from skystack.engine.session import SessionFiles, discover_session, resolve_inputs

    try:
        return discover_session(session)
    except InputNotFound:
        return SessionFiles(lights=tuple(resolve_inputs([session])), root=Path(session))


def all_frames(files: SessionFiles) -> list[Path]:
    """Lights, then bias, darks, flats and dark flats of a session."""
    return [*files.lights, *files.bias, *files.darks, *files.flats, *files.dark_flats]


def warm_page_cache(paths: Iterable[Path]) -> int:
    """Read every file once so that every measured run starts with the same (warm) page cache."""
    total = 0
    for p in paths:
        with open(p, "rb") as fh:
            while True:
                b = fh.read(1 << 24)
                if not b:
                    break
                total += len(b)
    return total


def warm_memory(nbytes: int) -> float:
    """Touch and free ``nbytes`` of memory (capped at 40 % of the machine's), so that the next
    process starts on memory the host has backed; returns the seconds it took.

    On a virtual machine whose host reclaims idle guest memory (this project's
    firecracker VMs, with DAMON), the first touch of reclaimed memory costs ~6 ms per
    MB, page cache included: a run after an idle minute paid ~5 s more of system time
    than the same run right after another. Comparisons warm the same amount before
    each tool, so they measure the tools and not the order they ran in.
    """
    import time

    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    n = int(min(max(nbytes, 0), 0.4 * total))
    t0 = time.perf_counter()
    if n:
        bytearray(n)  # zero-filled (every page touched), then freed at once
    return time.perf_counter() - t0
