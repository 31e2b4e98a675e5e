"""End-to-end benchmark (``skystack bench``) and the quality metrics of the Siril comparison.

:func:`run_benchmark` synthesizes a session of a given size (lights, bias,
darks and flats; cached by configuration hash), measures the *decode floor*
(the time to only decode every frame with the same
:class:`~skystack.engine.producer.FrameProducer` thread pool) and runs
:func:`~skystack.engine.stack.stack_session` once per available backend, each
in a fresh Python process so that peak memory figures do not mix. It returns
(and saves as JSON) per-stage seconds, frames/s and MP/s, peak memory, the
decode floor and the ratio of pipeline time to decode floor, with the
machine's CPU, cores, GPU and library versions.

The second half holds the image-quality measures ``bench/siril_compare.py``
prints side by side for skystack, Siril and a Python peer: background noise
in star-free regions chosen from the simulator's truth (in light-frame ADU,
through a photometric scale measured on the same stars), median star FWHM,
registration error against the truth transforms, and background residual
against the noise-free truth sky.

Run a child measurement by hand with
``python -m skystack.tools.bench --one '{"mode": "decode", ...}'``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from skystack import __version__
from skystack.engine.backend import cpu_model
from skystack.engine.errors import SkystackError
from skystack.engine.output import atomic_path
from skystack.engine.robust import MAD_TO_SIGMA, mad_sigma

__all__ = [
    "PRESETS",
    "BenchConfig",
    "Measured",
    "QualityMetrics",
    "add_bench_arguments",
    "bench_command",
    "bench_tables",
    "ensure_session",
    "machine_info",
    "machine_key",
    "main",
    "markdown_tables",
    "truth_quality",
    "measured_registration_error",
    "registration_error",
    "run_benchmark",
    "run_child",
    "run_measured",
    "sensor_size",
    "session_synth_config",
    "star_free_mask",
    "update_results_md",
]

#: ``name -> (lights, megapixels per frame)``; calibration frames come from :func:`_n_calib`.
PRESETS: dict[str, tuple[int, float]] = {
    "ci": (8, 0.5),
    "small": (20, 4.0),
    "50x16": (50, 16.0),
    "200x24": (200, 24.0),
}

#: Stage timers of :class:`~skystack.engine.stack.StackResult` in pipeline order.
STAGES = ("scan", "masters", "calibrate", "detect", "debayer", "store", "register", "warp",
          "normalize", "combine")

_RESULT_MARK = "SKYSTACK_BENCH_RESULT "
_REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- config


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


# ----------------------------------------------------------------------------- sessions


def sensor_size(megapixels: float, aspect: float = 1.5) -> tuple[int, int]:
    """``(width, height)``, both even, of a ``megapixels`` sensor with a 3:2 aspect."""
    w = math.sqrt(float(megapixels) * 1e6 * aspect)
    w2 = max(64, 2 * int(round(w / 2)))
    h2 = max(64, 2 * int(round(w2 / aspect / 2)))
    return w2, h2


def _n_calib(n_lights: int) -> int:
    return int(min(15, max(4, n_lights // 4)))


def session_synth_config(frames: int, megapixels: float, *, file_format: str = "dng", seed: int = 0,
                         n_calib: int | None = None, dark_flats: bool = False):
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


def _session_files(session: str | os.PathLike):
    """The session's frames: kind folders, or else a folder holding only lights (real sample sets)."""
    from skystack.engine.errors import InputNotFound
    from skystack.engine.session import SessionFiles, discover_session, resolve_inputs

    try:
        return discover_session(session)
    except InputNotFound:
        return SessionFiles(lights=tuple(resolve_inputs([session])), root=Path(session))


def _all_frames(files) -> list[Path]:
    return [*files.lights, *files.bias, *files.darks, *files.flats, *files.dark_flats]


def _warm_page_cache(paths: Iterable[Path]) -> int:
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


# ----------------------------------------------------------------------------- machine


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"skystack": __version__, "python": platform.python_version()}
    for name in ("numpy", "scipy", "rawpy", "astropy", "sep", "tifffile", "psutil", "cupy-cuda12x",
                 "cupy-cuda13x", "cupy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if not name.startswith("cupy"):
                out[name] = None
    try:
        import rawpy

        out["libraw"] = ".".join(map(str, rawpy.libraw_version))
    except Exception:  # pragma: no cover - rawpy is a dependency
        out["libraw"] = None
    return out


def _gpu_info() -> dict[str, Any] | None:
    from skystack.engine.backend import _gpu_cached

    gpu, reason = _gpu_cached()
    if gpu is None:
        return {"available": False, "reason": reason}
    info: dict[str, Any] = {"available": True, "name": gpu.device_name}
    try:
        import cupy

        rt = cupy.cuda.runtime
        props = rt.getDeviceProperties(0)
        info["memory_bytes"] = int(props.get("totalGlobalMem", 0))
        info["compute_capability"] = f"{props.get('major')}.{props.get('minor')}"
        info["cuda_runtime"] = int(rt.runtimeGetVersion())
        info["driver"] = int(rt.driverGetVersion())
    except Exception as exc:  # pragma: no cover - needs a GPU
        info["error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return info


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, GPU and library versions of this machine."""
    import psutil

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_usable": usable,
        "memory_bytes": int(psutil.virtual_memory().total),
        "gpu": _gpu_info(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "versions": _versions(),
    }


def machine_key(info: dict[str, Any]) -> str:
    """Short hardware description used as the RESULTS.md section title."""
    gpu = info.get("gpu") or {}
    g = gpu.get("name") if gpu.get("available") else "no GPU"
    return f"{info.get('cpu')}, {info.get('cores_usable')} cores, {info.get('memory_bytes', 0) / 2**30:.0f} GiB, {g}"


# ----------------------------------------------------------------------------- measured processes


@dataclass(frozen=True, kw_only=True)
class Measured:
    """Exit status, wall time and resource use of one child process."""

    returncode: int
    wall_s: float
    peak_rss_bytes: int
    user_s: float
    sys_s: float
    timed_out: bool = False


#: Runs in a fresh, small interpreter (``python -S``): forks the command and reports its
#: own wait4 rusage. Measuring through it keeps the caller's memory out of the figure:
#: Linux carries the RSS high-water mark of the address space a process execs from
#: into its ``ru_maxrss``, so a command spawned straight from a big process would
#: report at least that process's peak.
_LAUNCHER = r"""
import json, os, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(out, "w") as fh:
    json.dump({"status": status, "wall_s": wall, "maxrss_kb": ru.ru_maxrss, "user_s": ru.ru_utime,
               "sys_s": ru.ru_stime}, fh)
"""


def run_measured(cmd: Sequence[str], *, log_path: str | os.PathLike, cwd: str | os.PathLike | None = None,
                 env: dict[str, str] | None = None, timeout_s: float = 3600.0) -> Measured:
    """Run ``cmd`` with stdout+stderr to ``log_path``; return its wall time and peak RSS.

    ``cmd`` is forked from a small launcher interpreter and reaped with
    :func:`os.wait4`, so ``peak_rss_bytes`` is the ``ru_maxrss`` of that
    command alone (and the children it waited for), never of this process
    or of earlier runs. ``wall_s`` runs from the fork to the exit.
    """
    fd, res_path = tempfile.mkstemp(prefix="measured-", suffix=".json")
    os.close(fd)
    try:
        with open(log_path, "wb") as log:
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, res_path, *map(str, cmd)],
                                    stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, 9)
                proc.wait()
            outer = time.perf_counter() - t0
        try:
            r = json.loads(Path(res_path).read_text())
        except (OSError, ValueError):
            r = None
    finally:
        Path(res_path).unlink(missing_ok=True)
    if r is None:
        return Measured(returncode=proc.returncode if not timed_out else -9, wall_s=outer, peak_rss_bytes=0,
                        user_s=0.0, sys_s=0.0, timed_out=timed_out)
    return Measured(returncode=os.waitstatus_to_exitcode(r["status"]), wall_s=float(r["wall_s"]),
                    peak_rss_bytes=int(r["maxrss_kb"]) * 1024, user_s=float(r["user_s"]),
                    sys_s=float(r["sys_s"]), timed_out=timed_out)


def run_child(spec: dict[str, Any], *, log_dir: str | os.PathLike, timeout_s: float = 3600.0
              ) -> dict[str, Any]:
    """Run one measurement (``spec["mode"]`` = ``decode`` or ``stack``) in a fresh Python process.

    Returns the child's JSON result with ``process`` (wall time and peak RSS
    seen by the parent) added; on failure ``{"ok": False, "error": ...}``
    with the last lines of the child's log.
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    fd, log_path = tempfile.mkstemp(prefix=f"{spec.get('mode', 'child')}-", suffix=".log", dir=log_dir)
    os.close(fd)
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", "0")
    cmd = [sys.executable, "-m", "skystack.tools.bench", "--one", json.dumps(spec)]
    m = run_measured(cmd, log_path=log_path, env=env, timeout_s=timeout_s)
    text = Path(log_path).read_text(errors="replace")
    result: dict[str, Any] | None = None
    for line in text.splitlines():
        if line.startswith(_RESULT_MARK):
            result = json.loads(line[len(_RESULT_MARK):])
    if result is None:
        tail = " | ".join(text.strip().splitlines()[-6:])
        why = "timed out" if m.timed_out else f"exit status {m.returncode}"
        result = {"ok": False, "error": f"child {why}: {tail}"[:2000]}
    result["process"] = asdict(m)
    result["log"] = str(log_path)
    return result


# ----------------------------------------------------------------------------- the child side


def _peak_rss_self() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _child_decode(spec: dict[str, Any]) -> dict[str, Any]:
    from skystack.engine.producer import FrameProducer

    files = _session_files(spec["session"])
    groups = {"lights": list(files.lights),
              "calibration": [*files.bias, *files.darks, *files.flats, *files.dark_flats]}
    out: dict[str, Any] = {"ok": True, "mode": "decode", "workers": None}
    for name, paths in groups.items():
        t0 = time.perf_counter()
        n = 0
        nbytes = 0
        prod = FrameProducer(paths, workers=spec.get("workers"), queue_size=int(spec.get("queue_size", 4)))
        out["workers"] = prod.workers
        for item in prod:
            if item.frame is None:
                raise SkystackError(f"decode floor: {item.error}")
            n += 1
            nbytes += int(item.frame.data.nbytes)
            del item
        out[f"{name}_s"] = time.perf_counter() - t0
        out[f"{name}_frames"] = n
        out[f"{name}_bytes"] = nbytes
    out["total_s"] = out["lights_s"] + out["calibration_s"]
    return out


def _gpu_sync_and_pool() -> int | None:
    try:
        import cupy
    except Exception:
        return None
    try:
        cupy.cuda.runtime.deviceSynchronize()
        return int(cupy.get_default_memory_pool().total_bytes())
    except Exception:  # pragma: no cover - needs a GPU
        return None


#: Host seconds a device launch (a kernel or one of CuPy's array operations) costs the calling
#: thread: CuPy's launch overhead, order of magnitude.
LAUNCH_HOST_S = 10e-6


def _device_traffic(res) -> dict[str, Any] | None:
    """Host<->device bytes per light pixel and host seconds per light of a GPU run.

    Only the simulated device of the tests (``tests/fakecupy``, which counts every
    transfer, and the seconds it spends on the device's work: emulating kernels and
    running CuPy's array operations with NumPy) gives them; CuPy on a real device has
    no such counters, so this is ``None`` there and on the CPU. Host seconds are the
    run's total less that device work, plus :data:`LAUNCH_HOST_S` per launch.
    """
    sim = getattr(sys.modules.get("cupy"), "sim", None)
    if res.backend != "gpu" or sim is None:
        return None
    n = max(1, len(res.frames))
    px = n * int(np.prod(res.image.shape[-2:]))
    ops = sum(sim.launches.values()) + int(getattr(sim, "array_ops", 0))
    host_s = (float(res.timings.get("total", 0.0)) - float(sim.kernel_seconds)
              - float(getattr(sim, "array_seconds", 0.0)) + ops * LAUNCH_HOST_S)
    return {"h2d_bytes_per_light_px": sim.h2d_bytes / px, "d2h_bytes_per_light_px": sim.d2h_bytes / px,
            "host_s_per_light": host_s / n, "syncs": int(sim.syncs), "peak_device_bytes": int(sim.peak),
            "note": "simulated device: all traffic of the run (masters and results included)"}


def _child_stack(spec: dict[str, Any]) -> dict[str, Any]:
    from dataclasses import replace as _replace

    from skystack.engine.stack import StackConfig, stack_session

    files = _session_files(spec["session"])
    if spec.get("lights_limit"):
        files = _replace(files, lights=files.lights[: int(spec["lights_limit"])])
    cache = tempfile.mkdtemp(prefix="skystack-bench-masters-")  # masters are built in every run
    try:
        opts = dict(spec.get("options") or {})
        cfg = StackConfig(backend=spec.get("backend"), quiet=True, workers=spec.get("workers"),
                          cache_dir=cache, memory_limit=spec.get("memory_limit"),
                          reference=spec.get("reference"), **opts)
        prof = None
        if spec.get("profile"):
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        t0 = time.perf_counter()
        res = stack_session(files, cfg)
        pool = _gpu_sync_and_pool()
        wall = time.perf_counter() - t0
        if prof is not None:
            prof.disable()
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    h, w = res.image.shape[-2:]
    out: dict[str, Any] = {
        "ok": True, "mode": "stack", "backend": res.backend, "device": res.device,
        "timings": {k: float(v) for k, v in res.timings.items()}, "wall_in_process_s": wall,
        "frames_in": len(res.frames), "frames_used": res.n_used, "output_shape": [int(s) for s in res.image.shape],
        "peak_rss_bytes_reported": int(res.peak_rss_bytes), "gpu_pool_bytes": pool,
        "queue_peak": int(res.queue_peak), "queue_bound": int(res.queue_bound),
        "store_on_disk": bool(res.store_on_disk), "reference": res.reference,
        "device_traffic": _device_traffic(res),
        "skipped": {Path(f.path).name: f.reason for f in res.frames if not f.used},
        "transforms": {str(i): f.transform for i, f in enumerate(res.frames) if f.transform is not None},
    }
    if spec.get("save_image"):
        dst = Path(spec["save_image"])
        with atomic_path(dst) as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.asarray(res.image, dtype=np.float32))
        out["image"] = str(dst)
    if prof is not None:
        out["profile"] = _profile_summary(prof, spec.get("profile_path"))
    return out


def _profile_summary(prof, path: str | None, top: int = 25) -> dict[str, Any]:
    import pstats

    if path:
        prof.dump_stats(path)
    st = pstats.Stats(prof)
    rows = []
    for (fname, line, func), (cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(fname).name}:{line}({func})", "ncalls": int(nc),
                     "tottime_s": float(tt), "cumtime_s": float(ct)})
    by_tot = sorted(rows, key=lambda r: -r["tottime_s"])[:top]
    by_cum = sorted(rows, key=lambda r: -r["cumtime_s"])[:top]
    return {"path": path, "by_tottime": by_tot, "by_cumtime": by_cum}


def _child_main(spec: dict[str, Any]) -> int:
    try:
        if spec.get("mode") == "decode":
            out = _child_decode(spec)
        elif spec.get("mode") == "stack":
            out = _child_stack(spec)
        else:
            raise SkystackError(f"unknown bench mode {spec.get('mode')!r}")
    except SkystackError as exc:
        out = {"ok": False, "error": str(exc)}
    except Exception as exc:  # report any failure of the pipeline under test, with its type
        import traceback

        traceback.print_exc()
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    out["pid"] = os.getpid()
    out["peak_rss_bytes"] = _peak_rss_self()
    sys.stdout.flush()
    print(_RESULT_MARK + json.dumps(out, default=_json_default), flush=True)
    return 0 if out.get("ok") else 1


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


# ----------------------------------------------------------------------------- the benchmark


def _backends(requested: str | None) -> list[str]:
    from skystack.engine.backend import _gpu_cached
    from skystack.engine.errors import BackendUnavailable

    name = (requested or os.environ.get("SKYSTACK_BACKEND") or "auto").lower()
    gpu_ok, reason = _gpu_cached()
    if name == "cpu":
        return ["cpu"]
    if name == "gpu":
        if gpu_ok is None:
            raise BackendUnavailable(f"GPU unavailable ({reason}); use --backend cpu or auto")
        return ["gpu"]
    if name != "auto":
        raise SkystackError(f"--backend {name!r}: choose auto, cpu or gpu")
    return ["cpu", "gpu"] if gpu_ok is not None else ["cpu"]


def _say(cfg: BenchConfig, text: str) -> None:
    if not cfg.quiet:
        print(text, file=sys.stderr, flush=True)


def _best(results: list[dict[str, Any]], key) -> dict[str, Any]:
    ok = [r for r in results if r.get("ok")]
    if not ok:
        return results[-1]
    best = dict(min(ok, key=key))
    best["repeats"] = [key(r) for r in ok]
    return best


def _summarise_run(run: dict[str, Any], decode: dict[str, Any], n_lights: int, mp: float) -> dict[str, Any]:
    """Add throughput, 'other' time and the decode-floor ratios to a stack run (same-run numbers)."""
    if not run.get("ok"):
        return run
    t = run["timings"]
    total = float(t.get("total", run.get("wall_in_process_s", float("nan"))))
    staged = sum(v for k, v in t.items() if k != "total")
    run["total_s"] = total
    run["other_s"] = max(0.0, total - staged)
    run["frames_per_s"] = n_lights / total if total > 0 else None
    run["megapixels_per_s"] = n_lights * mp / total if total > 0 else None
    if decode.get("ok"):
        run["decode_floor_s"] = decode["total_s"]
        run["ratio_to_decode_floor"] = total / decode["total_s"] if decode["total_s"] > 0 else None
        lights_part = total - float(t.get("masters", 0.0))
        run["ratio_lights_to_decode_lights"] = (lights_part / decode["lights_s"]
                                                if decode["lights_s"] > 0 else None)
    return run


def default_output(info: dict[str, Any], label: str) -> Path:
    """``bench/results/<machine>-<label>-<utc>.json`` in a source checkout, else in the current folder."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", machine_key(info)).strip("-").lower()[:60]
    name = f"{slug}-{label}-{stamp}.json"
    bench_dir = _REPO / "bench"
    if bench_dir.is_dir():
        return bench_dir / "results" / name
    return Path.cwd() / f"skystack-bench-{name}"


def run_benchmark(config: BenchConfig = BenchConfig()) -> dict[str, Any]:
    """Run the end-to-end benchmark; return (and save unless ``output == ""``) the results.

    Returns
    -------
    dict
        ``command``, ``created``, ``config``, ``machine``, ``session``
        (path, lights, size, calibration frames), ``decode_floor`` (seconds
        for lights and calibration frames, workers) and ``runs``: one dict
        per backend with ``timings`` (per stage), ``total_s``, ``other_s``,
        ``frames_per_s``, ``megapixels_per_s``, ``peak_rss_bytes`` (the
        child process's ``ru_maxrss``), ``gpu_pool_bytes``,
        ``decode_floor_s`` and ``ratio_to_decode_floor`` (pipeline total /
        decode floor of all frames, both from this invocation) and
        ``ratio_lights_to_decode_lights`` (pipeline minus masters / decoding
        the lights). ``output`` is the JSON path written.
    """
    from skystack.engine.io import read_meta

    backends = _backends(config.backend)
    info = machine_info()
    if config.session:
        session = Path(config.session).expanduser()
        files = _session_files(session)
        label = "session-" + re.sub(r"[^A-Za-z0-9]+", "-", session.name)[:40]
    else:
        n, mp = config.size()
        scfg = session_synth_config(n, mp, file_format=config.file_format, seed=config.seed)
        session = ensure_session(scfg, config.cache_root, quiet=config.quiet)
        files = _session_files(session)
        label = config.preset if (config.frames is None and config.megapixels is None) else f"{n}x{mp:g}mp"
    meta = read_meta(files.lights[0])
    h, w = meta.shape[-2:]
    mp_frame = h * w / 1e6
    n_lights = len(files.lights)
    all_frames = _all_frames(files)
    sess = {"path": str(session), "lights": n_lights, "width": int(w), "height": int(h),
            "megapixels": mp_frame, "format": files.lights[0].suffix.lstrip(".").lower() or meta.format, "bias": len(files.bias), "darks": len(files.darks),
            "flats": len(files.flats), "dark_flats": len(files.dark_flats),
            "bytes": int(sum(p.stat().st_size for p in all_frames))}
    _say(config, f"session: {n_lights} lights of {w}x{h} ({mp_frame:.1f} MP, {meta.format}), "
                 f"{len(all_frames) - n_lights} calibration frames; backends: {', '.join(backends)}")
    _warm_page_cache(all_frames)
    log_dir = Path(tempfile.mkdtemp(prefix="skystack-bench-logs-"))
    base = {"session": str(session), "workers": config.workers}
    reps = max(1, int(config.repeat))

    decodes = []
    for _ in range(reps):
        _say(config, "decode floor ...")
        decodes.append(run_child({**base, "mode": "decode"}, log_dir=log_dir, timeout_s=config.timeout_s))
    decode = _best(decodes, key=lambda r: r["total_s"])
    if decode.get("ok"):
        _say(config, f"decode floor: {decode['total_s']:.2f} s (lights {decode['lights_s']:.2f} s, "
                     f"{decode['workers']} workers)")
    else:
        _say(config, f"decode floor failed: {decode.get('error')}")

    runs = []
    for be in backends:
        if be == "gpu":  # compile/load the kernels once, outside the measurement
            _say(config, "gpu warm-up (3 lights) ...")
            run_child({**base, "mode": "stack", "backend": "gpu", "lights_limit": 3,
                       "memory_limit": config.memory_limit}, log_dir=log_dir, timeout_s=config.timeout_s)
        attempts = []
        for _ in range(reps):
            _say(config, f"pipeline on {be} ...")
            attempts.append(run_child({**base, "mode": "stack", "backend": be, "memory_limit": config.memory_limit},
                                      log_dir=log_dir, timeout_s=config.timeout_s))
        run = _best(attempts, key=lambda r: r["timings"]["total"])
        run["requested_backend"] = be
        if not run.get("ok"):
            run.setdefault("backend", be)
        _summarise_run(run, decode, n_lights, mp_frame)
        if run.get("ok"):
            _say(config, f"{be}: {run['total_s']:.2f} s, ratio to decode floor "
                         f"{_fmt(run.get('ratio_to_decode_floor'), '{:.2f}')}")
        else:
            _say(config, f"{be}: failed: {run.get('error')}")
        runs.append(run)

    profile = None
    if config.profile and "cpu" in backends:
        _say(config, "profiling the CPU pipeline ...")
        prof_path = str(log_dir / "cpu.prof")
        prun = run_child({**base, "mode": "stack", "backend": "cpu", "profile": True, "profile_path": prof_path,
                          "memory_limit": config.memory_limit}, log_dir=log_dir, timeout_s=config.timeout_s)
        profile = prun.get("profile") if prun.get("ok") else {"error": prun.get("error")}

    out: dict[str, Any] = {
        "command": _command_line(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {k: v for k, v in asdict(config).items()},
        "label": label,
        "machine": info,
        "session": sess,
        "decode_floor": decode,
        "runs": runs,
        "profile": profile,
        "logs": str(log_dir),
    }
    if config.output != "":
        path = Path(config.output) if config.output else default_output(info, label)
        _write_json(path, out)
        out["output"] = str(path)
    return out


def _command_line() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(("skystack", "__main__.py")):
        argv[0] = "skystack"
    elif argv and argv[0].endswith(".py"):
        argv = ["python", os.path.relpath(argv[0]) if os.path.isabs(argv[0]) else argv[0], *argv[1:]]
    return " ".join(argv)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from skystack.engine.output import write_text

    write_text(path, json.dumps(data, indent=1, default=_json_default) + "\n")


# ----------------------------------------------------------------------------- tables


def _fmt(v: Any, fmt: str = "{:.2f}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return fmt.format(v)


def _mib(v: Any) -> str:
    return "-" if not v else f"{v / 2**20:.0f}"


def _traffic_cells(t: dict[str, Any] | None) -> list[str]:
    if not t:
        return ["-", "-", "-"]
    return [_fmt(t.get("h2d_bytes_per_light_px"), "{:.1f}"), _fmt(t.get("d2h_bytes_per_light_px"), "{:.1f}"),
            _fmt(t.get("host_s_per_light"), "{:.3f}")]


def _table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    runs = results["runs"]
    present = [s for s in STAGES if any(s in (r.get("timings") or {}) for r in runs)]
    extra = sorted({k for r in runs for k in (r.get("timings") or {}) if k not in STAGES and k != "total"})
    stage_cols = ["backend", *present, *extra, "other", "total"]
    stage_rows = []
    for r in runs:
        t = r.get("timings") or {}
        if not r.get("ok"):
            stage_rows.append([r.get("requested_backend", "?"), *(["-"] * (len(stage_cols) - 2)), "failed"])
            continue
        stage_rows.append([r["backend"], *[_fmt(t.get(s)) for s in (*present, *extra)], _fmt(r.get("other_s")),
                           _fmt(r.get("total_s"))])
    sess = results["session"]
    sum_cols = ["backend", "device", "frames", "MP/frame", "total s", "frames/s", "MP/s", "peak RSS MiB",
                "GPU pool MiB", "decode floor s", "pipeline / decode floor", "lights-only ratio",
                "B/light px up", "B/light px down", "host s/light"]
    sum_rows = []
    for r in runs:
        if not r.get("ok"):
            sum_rows.append([r.get("requested_backend", "?"), "failed: " + str(r.get("error", ""))[:80],
                             *(["-"] * (len(sum_cols) - 2))])
            continue
        sum_rows.append([
            r["backend"], str(r.get("device", "")), f"{r.get('frames_used', '?')}/{sess['lights']}",
            f"{sess['megapixels']:.1f}", _fmt(r.get("total_s")), _fmt(r.get("frames_per_s")),
            _fmt(r.get("megapixels_per_s"), "{:.1f}"), _mib(r.get("peak_rss_bytes")), _mib(r.get("gpu_pool_bytes")),
            _fmt(r.get("decode_floor_s")), _fmt(r.get("ratio_to_decode_floor")),
            _fmt(r.get("ratio_lights_to_decode_lights")),
            *_traffic_cells(r.get("device_traffic")),
        ])
    return stage_cols, stage_rows, sum_cols, sum_rows


def bench_tables(results: dict[str, Any]) -> list:
    """Two rich Tables (per-stage seconds; throughput, memory and decode floor), one row per backend."""
    from rich.table import Table

    sess = results["session"]
    title = (f"skystack bench: {sess['lights']} lights x {sess['width']}x{sess['height']} "
             f"({sess['megapixels']:.1f} MP, {sess['format']})")
    stage_cols, stage_rows, sum_cols, sum_rows = _table_rows(results)
    t1 = Table(title=title + ": seconds per stage")
    for c in stage_cols:
        t1.add_column(c, justify="left" if c == "backend" else "right")
    for row in stage_rows:
        t1.add_row(*row)
    t2 = Table(title="throughput, memory and decode floor")
    for c in sum_cols:
        t2.add_column(c, justify="left" if c in ("backend", "device") else "right", overflow="fold")
    for row in sum_rows:
        t2.add_row(*row)
    return [t1, t2]


def markdown_tables(results: dict[str, Any]) -> str:
    """The same two tables as GitHub markdown, with the command that produced them."""
    stage_cols, stage_rows, sum_cols, sum_rows = _table_rows(results)

    def md(cols, rows):
        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)

    sess = results["session"]
    dec = results.get("decode_floor") or {}
    head = (f"Command: `{results['command']}` ({results['created']})\n\n"
            f"Session: {sess['lights']} lights of {sess['width']}x{sess['height']} "
            f"({sess['megapixels']:.1f} MP, {sess['format']}), {sess['bias']} bias, {sess['darks']} darks, "
            f"{sess['flats']} flats. Decode floor: {_fmt(dec.get('total_s'))} s "
            f"(lights {_fmt(dec.get('lights_s'))} s, calibration {_fmt(dec.get('calibration_s'))} s, "
            f"{dec.get('workers', '?')} decoder threads).\n")
    text = head + "\n" + md(stage_cols, stage_rows) + "\n\n" + md(sum_cols, sum_rows) + "\n"
    prof = results.get("profile") or {}
    if prof.get("by_tottime"):
        rows = [[r["function"].replace("|", "/"), str(r["ncalls"]), f"{r['tottime_s']:.2f}", f"{r['cumtime_s']:.2f}"]
                for r in prof["by_tottime"][:10]]
        text += ("\nCPU profile of a second CPU run (cProfile, main thread; decoder threads not included), "
                 "top 10 by own time:\n\n" + md(["function", "calls", "own s", "cumulative s"], rows) + "\n")
    return text


def update_results_md(path: str | os.PathLike, key: str, section: str) -> Path:
    """Replace (or append) the section titled ``key`` in a RESULTS.md file.

    Sections are delimited by ``<!-- results: KEY -->`` / ``<!-- /results: KEY -->``
    so each machine keeps its latest table.
    """
    p = Path(path)
    text = p.read_text() if p.is_file() else "# Benchmark results\n"
    start, end = f"<!-- results: {key} -->", f"<!-- /results: {key} -->"
    block = f"{start}\n### {key}\n\n{section.rstrip()}\n{end}"
    if start in text and end in text:
        a = text.index(start)
        b = text.index(end) + len(end)
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    from skystack.engine.output import write_text

    return write_text(p, text if text.endswith("\n") else text + "\n")


def _print_profile(console, profile: dict[str, Any] | None, top: int = 15) -> None:
    if not profile:
        return
    if "error" in profile:
        console.print(f"profile failed: {profile['error']}")
        return
    from rich.table import Table

    t = Table(title=f"CPU profile (main thread), top {top} by own time" +
              (f" ({profile['path']})" if profile.get("path") else ""))
    for c in ("function", "calls", "own s", "cumulative s"):
        t.add_column(c, justify="left" if c == "function" else "right", overflow="fold")
    for r in profile["by_tottime"][:top]:
        t.add_row(r["function"], str(r["ncalls"]), f"{r['tottime_s']:.3f}", f"{r['cumtime_s']:.3f}")
    console.print(t)


# ----------------------------------------------------------------------------- command line


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``skystack bench`` options (not ``--backend``/``--quiet``, which are common)."""
    p.add_argument("--preset", default="small", choices=tuple(PRESETS),
                   help="session size: ci (8 x 0.5 MP), small (20 x 4 MP), 50x16, 200x24 (default small)")
    p.add_argument("--frames", type=int, help="number of lights (overrides the preset)")
    p.add_argument("--megapixels", type=float, help="megapixels per frame (overrides the preset)")
    p.add_argument("--session", help="benchmark an existing session folder instead of a synthetic one")
    p.add_argument("--format", dest="file_format", default="dng", choices=("dng", "fits"),
                   help="format of the synthetic frames (default dng)")
    p.add_argument("--seed", type=int, default=0, help="simulator seed")
    p.add_argument("--workers", type=int, help="decoder threads (pipeline and decode floor)")
    p.add_argument("--repeat", type=int, default=1, help="runs per backend; the fastest is reported")
    p.add_argument("--memory-limit", help="RAM budget of the pipeline, e.g. 8GB (the store spills above it)")
    p.add_argument("--profile", action="store_true", help="also profile the CPU pipeline (cProfile)")
    p.add_argument("--cache-dir", dest="bench_cache", help="where synthetic sessions are kept "
                   "(default $SKYSTACK_BENCH_CACHE or ~/.cache/skystack/bench)")
    p.add_argument("--json", dest="json_out", help="results file (default bench/results/...json)")
    p.add_argument("--results-md", help="also update this RESULTS.md with the table for this machine")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per run (default 3600)")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """BenchConfig from parsed ``skystack bench`` options."""
    from skystack.engine.stack import parse_size

    return BenchConfig(
        preset=args.preset, frames=args.frames, megapixels=args.megapixels, session=args.session,
        backend=getattr(args, "backend", None), workers=args.workers, file_format=args.file_format,
        seed=args.seed, cache_root=args.bench_cache, output=args.json_out, repeat=args.repeat,
        memory_limit=parse_size(args.memory_limit), profile=args.profile, timeout_s=args.timeout,
        quiet=bool(getattr(args, "quiet", False)),
    )


def bench_command(args: argparse.Namespace) -> int:
    """Run ``skystack bench`` from parsed options; print the tables; return the exit status.

    Exit status 1 when a backend's pipeline run failed (the table says why).
    """
    from rich.console import Console

    results = run_benchmark(config_from_args(args))
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    for t in bench_tables(results):
        console.print(t)
    _print_profile(console, results.get("profile"))
    if results.get("output"):
        console.print(f"results: {results['output']}")
    if getattr(args, "results_md", None):
        p = update_results_md(args.results_md, machine_key(results["machine"]), markdown_tables(results))
        console.print(f"updated {p}")
    return 0 if all(r.get("ok") for r in results["runs"]) and results["decode_floor"].get("ok") else 1


def build_parser() -> argparse.ArgumentParser:
    """Stand-alone parser of ``python bench/run.py`` (same options as ``skystack bench``)."""
    p = argparse.ArgumentParser(prog="bench/run.py", description="skystack end-to-end benchmark")
    p.add_argument("--backend", choices=("auto", "cpu", "gpu"), default=None,
                   help="backend to benchmark (default: every available one)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    add_bench_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python bench/run.py`` / ``python -m skystack.tools.bench``; ``--one SPEC`` runs a child."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--one"]:
        return _child_main(json.loads(argv[1]))
    args = build_parser().parse_args(argv)
    if args.debug:
        return bench_command(args)
    try:
        return bench_command(args)
    except SkystackError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


# ============================================================================= quality metrics


@dataclass(frozen=True, kw_only=True)
class QualityMetrics:
    """Image-quality measures of one stacked image against the simulator's truth.

    Attributes
    ----------
    noise_adu : tuple of float
        Background noise per channel (R, G, B) in light-frame ADU: robust
        sigma after a plane fit, in star-free boxes, divided by ``scale``.
    noise_binned_adu : tuple of float
        The same for 4x4 block means, times 4: equal to ``noise_adu`` for
        white noise, lower when a pipeline's interpolation smooths pixel
        noise into correlated noise (which binning does not average away),
        so it compares pipelines at equal (coarse) resolution.
    scale : tuple of float
        Image units per ADU of the reference light per channel: median ratio
        of aperture fluxes of bright truth stars in the image and in the
        noise-free truth rendering of that light.
    fwhm_px : float
        Median FWHM of the stars :func:`~skystack.engine.detect.detect_stars` finds.
    n_stars : int
        Stars detected.
    bg_residual_adu : float
        RMS (over channels and star-free boxes) of ``image / scale`` minus the
        noise-free truth background (one offset per channel removed): noise
        plus calibration/gradient errors.
    bg_large_scale_adu : float
        RMS of the per-box median residuals: the large-scale (flat, gradient)
        error without the pixel noise.
    n_boxes : int
        Star-free boxes used.
    n_phot_stars : int
        Stars used for the photometric scale.
    colour_noise_adu : tuple of float
        Chroma noise: the same robust sigma of ``R/scale_R - G/scale_G`` and
        ``B/scale_B - G/scale_G`` (empty for mono images).
    completeness : float
        Fraction of the truth stars in a faint band (G flux between the 15th
        and 35th percentiles of the stars every light covers) that a
        PSF-matched filter finds at 5 sigma within 1.5 px
        (:func:`matched_filter_peaks`, :func:`_completeness`).
    limit_flux_adu : float
        G flux (ADU of one light) at which half the truth stars are found.
    """

    noise_adu: tuple[float, ...]
    noise_binned_adu: tuple[float, ...]
    scale: tuple[float, ...]
    fwhm_px: float
    n_stars: int
    bg_residual_adu: float
    bg_large_scale_adu: float
    n_boxes: int
    n_phot_stars: int
    colour_noise_adu: tuple[float, ...] = ()
    completeness: float = float("nan")
    limit_flux_adu: float = float("nan")

    @property
    def colour_noise_mean_adu(self) -> float:
        """Mean of the R-G and B-G chroma noise."""
        v = [x for x in self.colour_noise_adu if math.isfinite(x)]
        return float(np.mean(v)) if v else float("nan")

    @property
    def noise_mean_adu(self) -> float:
        """Mean of the per-channel noise."""
        v = [x for x in self.noise_adu if math.isfinite(x)]
        return float(np.mean(v)) if v else float("nan")

    @property
    def noise_binned_mean_adu(self) -> float:
        """Mean of the per-channel binned noise."""
        v = [x for x in self.noise_binned_adu if math.isfinite(x)]
        return float(np.mean(v)) if v else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["noise_mean_adu"] = self.noise_mean_adu
        d["noise_binned_mean_adu"] = self.noise_binned_mean_adu
        d["colour_noise_mean_adu"] = self.colour_noise_mean_adu
        return d


def _truth_star_xy(truth, ref_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Star positions in light ``ref_index``'s pixels and their per-channel flux (ADU per light)."""
    return truth.project_stars(ref_index), np.asarray(truth.stars.flux, dtype=np.float64)


def _star_radius(flux_g: np.ndarray, truth) -> np.ndarray:
    c = truth.config
    fmin = float(c.star_flux_min_adu_s) * float(c.exposure_s)
    f = np.maximum(np.asarray(flux_g, dtype=np.float64) / max(fmin, 1e-9), 1.0)
    return 3.0 * float(c.fwhm_range[1]) * (1.0 + 0.5 * np.log10(f))


def star_free_mask(truth, ref_index: int, shape: tuple[int, int] | None = None) -> np.ndarray:
    """``(H, W)`` bool: True where no truth star lies within its exclusion radius.

    The radius grows with the star's flux: ``3 FWHM_max (1 + log10(F / F_min) / 2)``.
    """
    h, w = truth.shape if shape is None else shape
    xy, flux = _truth_star_xy(truth, ref_index)
    rad = _star_radius(flux[:, 1], truth)
    mask = np.ones((h, w), dtype=bool)
    inside = (xy[:, 0] > -rad) & (xy[:, 0] < w - 1 + rad) & (xy[:, 1] > -rad) & (xy[:, 1] < h - 1 + rad)
    for (x, y), r in zip(xy[inside], rad[inside]):
        x0, x1 = max(0, int(math.floor(x - r))), min(w, int(math.ceil(x + r)) + 1)
        y0, y1 = max(0, int(math.floor(y - r))), min(h, int(math.ceil(y + r)) + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.ogrid[y0:y1, x0:x1]
        mask[y0:y1, x0:x1] &= (xx - x) ** 2 + (yy - y) ** 2 > r * r
    return mask


def _common_footprint(truth, ref_index: int, pts: np.ndarray, margin: float) -> np.ndarray:
    """True for points of the ``ref_index`` grid that every light covers (``margin`` px inside)."""
    h, w = truth.shape
    tr = truth.transforms()
    to_truth = tr[ref_index]
    ok = np.ones(len(pts), dtype=bool)
    hom = np.column_stack([pts, np.ones(len(pts))])
    for t in tr:
        m = np.linalg.inv(t) @ to_truth  # ref-grid pixel -> this light's pixel
        q = hom @ m.T
        q = q[:, :2] / q[:, 2:3]
        ok &= (q[:, 0] >= margin) & (q[:, 0] <= w - 1 - margin) & (q[:, 1] >= margin) & (q[:, 1] <= h - 1 - margin)
    return ok


def _photometric_scale(image: np.ndarray, truth, ref_index: int, star_image: np.ndarray | None = None, *,
                       max_stars: int = 300) -> tuple[np.ndarray, int]:
    """Image units per ADU of light ``ref_index``, per channel, by aperture photometry.

    The same apertures (radius ``4 FWHM_max``, background: a plane fitted to
    an annulus) are measured on ``image`` and on the noise-free truth stars of light
    ``ref_index`` (``star_image``, rendered when not given), so faint
    neighbours, PSF wings and the light's transparency cancel out; the scale
    is the median ratio over bright, unsaturated, fairly isolated stars
    that every light covers.
    """
    from scipy.spatial import cKDTree

    c = truth.config
    img = image if image.ndim == 3 else image[None]
    nch, h, w = img.shape
    if star_image is None:
        star_image = truth.sky(ref_index, background=False, gradient=False, trail=False)
    tru = star_image if nch == 3 else star_image[1][None]
    xy, flux = _truth_star_xy(truth, ref_index)
    fwhm_hi = float(c.fwhm_range[1])
    r_ap = 4.0 * fwhm_hi
    r_in, r_out = r_ap + 3.0, r_ap + 9.0
    # unsaturated: Moffat peak (of a narrow PSF) of the brightest channel well below the white level
    alpha = float(c.fwhm_range[0]) / (2.0 * math.sqrt(2.0 ** (1.0 / c.moffat_beta) - 1.0))
    peak_per_flux = (c.moffat_beta - 1.0) / (math.pi * alpha * alpha)
    headroom = float(c.white_level) - max(c.black_level) - 2.0 * max(c.sky_adu_s) * c.exposure_s
    fmax = flux.max(axis=1)
    if not len(flux):
        return np.full(nch, np.nan), 0
    cand = (fmax * peak_per_flux < 0.5 * headroom) & (flux[:, 1] >= np.quantile(flux[:, 1], 0.5))
    cand &= (xy[:, 0] > r_out + 2) & (xy[:, 0] < w - r_out - 3) & (xy[:, 1] > r_out + 2) & (xy[:, 1] < h - r_out - 3)
    if cand.any():
        cand[cand] &= _common_footprint(truth, ref_index, xy[cand], r_out + 2)
    # fairly isolated: no neighbour brighter than 20 % of the star inside its aperture + 2 FWHM
    tree = cKDTree(xy)
    keep = []
    for i in np.flatnonzero(cand):
        nb = tree.query_ball_point(xy[i], r_ap + 2.0 * fwhm_hi)
        if all(j == i or flux[j, 1] < 0.2 * flux[i, 1] for j in nb):
            keep.append(i)
    if len(keep) > max_stars:
        keep = list(np.sort(np.random.default_rng(0).choice(keep, max_stars, replace=False)))
    if len(keep) < 5:
        return np.full(nch, np.nan), len(keep)
    R = int(math.ceil(r_out)) + 1
    oy, ox = np.mgrid[-R:R + 1, -R:R + 1]
    ratios: list[list[float]] = [[] for _ in range(nch)]
    for i in keep:
        x, y = xy[i]
        ix, iy = int(round(x)), int(round(y))
        dx, dy = ox + ix - x, oy + iy - y
        d = np.hypot(dx, dy)
        ap, ann = d <= r_ap, (d >= r_in) & (d <= r_out)
        sl = (slice(None), slice(iy - R, iy + R + 1), slice(ix - R, ix + R + 1))
        stamp, tstamp = img[sl], tru[sl]
        # a plane fitted to the annulus (least squares: linear in the data, so the same
        # neighbours and wings in both images cancel exactly; a sky gradient is removed)
        plane_ap = np.array([ap.sum(), dx[ap].sum(), dy[ap].sum()])
        for ch in range(nch):
            s, t = stamp[ch], tstamp[ch]
            if not np.isfinite(s[ap]).all():
                continue
            use = ann & np.isfinite(s)
            if use.sum() < 20:
                continue
            design = np.column_stack([np.ones(use.sum()), dx[use], dy[use]])
            pinv = np.linalg.pinv(design)
            f_img = float(np.sum(s[ap], dtype=np.float64) - plane_ap @ (pinv @ s[use].astype(np.float64)))
            f_true = float(np.sum(t[ap]) - plane_ap @ (pinv @ t[use]))
            if f_true > 0:
                ratios[ch].append(f_img / f_true)
    scale = np.array([np.median(r) if len(r) >= 5 else np.nan for r in ratios])
    return scale, len(keep)


def _box_stats(image: np.ndarray, mask: np.ndarray, boxes: np.ndarray, box: int, *, binning: int = 4
               ) -> tuple[np.ndarray, np.ndarray]:
    """Per box and channel: robust sigma of the pixels and of ``binning``-square block means.

    Both after a least-squares plane fit over the star-free pixels (blocks:
    the fully star-free ones). Block sigmas are multiplied by ``binning`` so
    that white noise reads the same at both scales.
    """
    img = image if image.ndim == 3 else image[None]
    nch = img.shape[0]
    b = int(binning)
    nb = box // b
    yy, xx = np.mgrid[0:box, 0:box]
    by, bx = np.mgrid[0:nb, 0:nb]
    sig = np.full((len(boxes), nch), np.nan)
    sigb = np.full((len(boxes), nch), np.nan)
    for k, (y0, x0) in enumerate(boxes):
        m = mask[y0:y0 + box, x0:x0 + box]
        a = np.column_stack([np.ones(m.sum()), xx[m] - box / 2, yy[m] - box / 2])
        mb = m[:nb * b, :nb * b].reshape(nb, b, nb, b).all(axis=(1, 3))
        ab = np.column_stack([np.ones(mb.sum()), bx[mb] - nb / 2, by[mb] - nb / 2])
        for ch in range(nch):
            tile = img[ch, y0:y0 + box, x0:x0 + box].astype(np.float64)
            v = tile[m]
            if not np.isfinite(v).all():
                continue
            coef, *_ = np.linalg.lstsq(a, v, rcond=None)
            sig[k, ch] = mad_sigma(v - a @ coef)
            if mb.sum() >= 6:
                vb = tile[:nb * b, :nb * b].reshape(nb, b, nb, b).mean(axis=(1, 3))[mb]
                cb, *_ = np.linalg.lstsq(ab, vb, rcond=None)
                sigb[k, ch] = b * mad_sigma(vb - ab @ cb)
    return sig, sigb


def _colour_noise(img: np.ndarray, scale: np.ndarray, mask: np.ndarray, boxes: np.ndarray, box: int
                  ) -> tuple[float, ...]:
    """Robust sigma (median over star-free boxes, plane removed) of R - G and B - G in ADU."""
    if img.ndim != 3 or img.shape[0] != 3 or not len(boxes) or not np.isfinite(scale).all():
        return ()
    g = img[1] / scale[1]
    diffs = (img[0] / scale[0] - g, img[2] / scale[2] - g)
    sig, _ = _box_stats(np.stack(diffs), mask, boxes, box)
    return tuple(float(np.nanmedian(sig[:, k])) for k in range(2))


def matched_filter_peaks(image: np.ndarray, scale: np.ndarray, mask: np.ndarray, fwhm_px: float, *,
                         nsigma: float = 5.0) -> np.ndarray:
    """``(N, 2)`` x, y of the peaks of a PSF-matched filter above ``nsigma`` of its own noise.

    The photometrically scaled luminance, less a coarse median background, is
    convolved with a Gaussian of the image's own FWHM (the optimal detector of
    point sources in white noise); peaks (5x5 maxima) count above ``nsigma``
    robust sigmas of the filtered star-free pixels. Because the threshold is
    the *filtered* noise, smoothing an image beforehand neither helps nor
    hurts: this compares depth at the source scale, whatever the resampling.
    """
    from scipy import ndimage

    img = image if image.ndim == 3 else image[None]
    lum = np.nan_to_num(np.mean([img[c] / scale[c] for c in range(img.shape[0])], axis=0))
    h, w = lum.shape
    bg = ndimage.median_filter(lum[::4, ::4], size=16, mode="nearest")
    lum = lum - np.kron(bg, np.ones((4, 4), dtype=lum.dtype))[:h, :w]
    f = ndimage.gaussian_filter(lum, max(float(fwhm_px), 1.0) / 2.3548)
    r = f[mask]
    sig = mad_sigma(r)
    peak = (f == ndimage.maximum_filter(f, 5)) & (f > nsigma * sig)
    yy, xx = np.nonzero(peak)
    return np.column_stack([xx, yy]).astype(np.float64)


def _completeness(detected_xy: np.ndarray, truth, ref_index: int, shape: tuple[int, int], *,
                  margin: float = 12.0, radius: float = 1.5) -> tuple[float, float]:
    """Faint-star completeness and the 50 % limiting flux of a detection list.

    Truth stars every light covers (``margin`` px inside, off the landscape)
    count as found with a detection within ``radius`` px. Completeness is the
    fraction found among those whose G flux lies between the 15th and 35th
    percentiles of them (a band fixed by the truth alone, where detection
    fades on the simulator's sessions); the limiting flux is the G flux (ADU
    of one light) where the fraction found, in bins of 5 % of the stars,
    first reaches one half (interpolated in log flux).
    """
    from scipy.spatial import cKDTree

    h, w = shape
    xy, flux = _truth_star_xy(truth, ref_index)
    ok = np.isfinite(xy).all(axis=1)
    ok &= (xy[:, 0] >= margin) & (xy[:, 0] < w - margin) & (xy[:, 1] >= margin) & (xy[:, 1] < h - margin)
    if ok.any():
        ok[ok] &= _common_footprint(truth, ref_index, xy[ok], margin)
    land = truth.horizon_mask()
    if land.any() and ok.any():
        ii = np.rint(xy[ok]).astype(int)
        ok[np.flatnonzero(ok)[land[ii[:, 1], ii[:, 0]]]] = False
    if ok.sum() < 100:
        return float("nan"), float("nan")
    f = flux[ok, 1]
    found = np.zeros(len(f), dtype=bool)
    if len(detected_xy):
        d, _ = cKDTree(detected_xy).query(xy[ok], k=1)
        found = d <= radius
    lo, hi = np.quantile(f, [0.15, 0.35])
    band = (f >= lo) & (f <= hi)
    edges = np.quantile(f, np.linspace(0.0, 1.0, 21))
    centre = np.sqrt(edges[:-1] * edges[1:])
    frac = np.array([found[(f >= a) & (f <= b)].mean() for a, b in zip(edges[:-1], edges[1:])])
    limit = float("nan")
    k = np.flatnonzero(frac >= 0.5)
    if len(k) and k[0] > 0:
        j = k[0]
        t = (0.5 - frac[j - 1]) / max(frac[j] - frac[j - 1], 1e-9)
        limit = float(np.exp(np.log(centre[j - 1]) + t * (np.log(centre[j]) - np.log(centre[j - 1]))))
    return float(found[band].mean()), limit


def _boxes(truth, ref_index: int, mask: np.ndarray, box: int, *, min_free: float = 0.6,
           max_boxes: int = 1500, seed: int = 0) -> np.ndarray:
    h, w = mask.shape
    ys = np.arange(0, h - box + 1, box)
    xs = np.arange(0, w - box + 1, box)
    cand = np.array([(y, x) for y in ys for x in xs], dtype=np.intp).reshape(-1, 2)
    if not len(cand):
        return cand
    free = np.array([mask[y:y + box, x:x + box].mean() for y, x in cand])
    cand = cand[free >= min_free]
    corners = []
    for dy, dx in ((0, 0), (0, box - 1), (box - 1, 0), (box - 1, box - 1)):
        corners.append(_common_footprint(truth, ref_index,
                                         np.column_stack([cand[:, 1] + dx, cand[:, 0] + dy]).astype(float), 6.0))
    cand = cand[np.logical_and.reduce(corners)] if len(cand) else cand
    if len(cand) > max_boxes:
        cand = cand[np.sort(np.random.default_rng(seed).choice(len(cand), max_boxes, replace=False))]
    return cand


def truth_quality(image: np.ndarray, truth, ref_index: int, *, box: int = 24,
                    mask: np.ndarray | None = None, star_image: np.ndarray | None = None,
                    background: np.ndarray | None = None, detect: bool = True) -> QualityMetrics:
    """Quality of a stacked image in the grid of light ``ref_index`` (see :class:`QualityMetrics`).

    Parameters
    ----------
    image : ndarray (3, H, W) or (H, W)
        Stacked image (any linear units; NaN = no data).
    truth : SynthTruth
        The session's truth (:func:`skystack.tools.synth.load_truth`).
    ref_index : int
        Light whose pixel grid ``image`` is in.
    box : int
        Side of the star-free boxes (px).
    mask : ndarray, optional
        Precomputed :func:`star_free_mask` (it is the same for every image
        of a comparison).
    star_image, background : ndarray (3, H, W), optional
        Precomputed ``truth.sky(ref_index, background=False, gradient=False, trail=False)``
        and ``truth.sky(ref_index, stars=False, trail=False)`` (noise-free
        stars and background of light ``ref_index``, ADU).
    detect : bool
        Also detect stars for the median FWHM.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.shape[-2:] != tuple(truth.shape):
        raise SkystackError(f"image shape {img.shape} does not match the session's {truth.shape}")
    mask = star_free_mask(truth, ref_index) if mask is None else mask
    boxes = _boxes(truth, ref_index, mask, box)
    scale, n_phot = _photometric_scale(img, truth, ref_index, star_image)
    sig, sigb = _box_stats(img, mask, boxes, box)
    noise = tuple(float(np.nanmedian(sig[:, ch]) / scale[ch]) if len(boxes) else float("nan")
                  for ch in range(sig.shape[1]))
    noise_b = tuple(float(np.nanmedian(sigb[:, ch]) / scale[ch]) if np.isfinite(sigb[:, ch]).any()
                    else float("nan") for ch in range(sigb.shape[1]))
    # residual against the noise-free truth background (reference light's sky, no stars or trails)
    bg_res = bg_ls = float("nan")
    if len(boxes) and np.isfinite(scale).all():
        sky = truth.sky(ref_index, stars=False, trail=False) if background is None else background
        sky = sky if img.ndim == 3 else sky[1][None]
        resid_all, box_meds = [], []
        for ch in range(sky.shape[0]):
            vals, meds = [], []
            for (y0, x0) in boxes:
                m = mask[y0:y0 + box, x0:x0 + box]
                r = img[ch if img.ndim == 3 else 0, y0:y0 + box, x0:x0 + box][m] / scale[ch] - \
                    sky[ch, y0:y0 + box, x0:x0 + box][m]
                vals.append(r)
                meds.append(np.median(r))
            v = np.concatenate(vals)
            off = np.median(v)
            resid_all.append(v - off)
            box_meds.append(np.asarray(meds) - off)
        bg_res = float(np.sqrt(np.mean(np.concatenate(resid_all) ** 2)))
        bg_ls = float(np.sqrt(np.mean(np.concatenate(box_meds) ** 2)))
    fwhm, n_stars, complete, limit = float("nan"), 0, float("nan"), float("nan")
    if detect:
        from skystack.engine.detect import detect_stars, measure_quality as _mq

        st = detect_stars(np.nan_to_num(img, nan=0.0))
        q = _mq(st)
        fwhm, n_stars = float(q.fwhm_px), int(q.n_stars)
        if np.isfinite(scale).all() and math.isfinite(fwhm):
            peaks = matched_filter_peaks(img, np.asarray(scale), mask, fwhm)
            complete, limit = _completeness(peaks, truth, ref_index, img.shape[-2:])
    return QualityMetrics(noise_adu=noise, noise_binned_adu=noise_b, scale=tuple(float(s) for s in scale),
                          fwhm_px=fwhm,
                          n_stars=n_stars, bg_residual_adu=bg_res, bg_large_scale_adu=bg_ls,
                          n_boxes=int(len(boxes)), n_phot_stars=n_phot,
                          colour_noise_adu=_colour_noise(img, np.asarray(scale), mask, boxes, box),
                          completeness=complete, limit_flux_adu=limit)


def registration_error(transforms: dict[int, Any], truth, ref_index: int) -> dict[str, Any]:
    """Grid RMS (px) of estimated frame -> ``ref_index`` transforms against the truth.

    ``transforms`` maps light index to a 3x3 frame -> reference-grid matrix
    (skystack's report convention). Returns ``rms_px`` (RMS over frames),
    ``max_px``, ``per_frame`` and ``n``; the reference itself is left out.
    """
    from skystack.engine.match import grid_rms

    tr = truth.transforms()
    inv_ref = np.linalg.inv(tr[ref_index])
    errs = {}
    for i, t in transforms.items():
        i = int(i)
        if i == ref_index or t is None:
            continue
        expected = inv_ref @ tr[i]
        errs[i] = grid_rms(np.asarray(t, dtype=np.float64), expected, truth.shape)
    v = np.array(list(errs.values()))
    return {"rms_px": float(np.sqrt(np.mean(v ** 2))) if v.size else float("nan"),
            "max_px": float(v.max()) if v.size else float("nan"), "n": int(v.size),
            "per_frame": {str(k): float(e) for k, e in sorted(errs.items())}, "method": "transforms"}


def measured_registration_error(images: Iterable[tuple[int, np.ndarray]], truth, ref_index: int,
                                *, match_radius: float = 1.5) -> dict[str, Any]:
    """Registration error of frames already resampled into the ``ref_index`` grid.

    For each ``(light index, image)`` the detected stars are paired with the
    truth star positions of the reference grid (nearest within
    ``match_radius`` px), a similarity is fitted from detected to truth
    positions, and its grid RMS displacement from the identity is the
    frame's error (for pipelines that keep registered frames but not their
    transforms, e.g. Siril 1.0's ``r_`` sequence). ``floor_px`` is the
    value measured on the reference frame itself (which needs no
    registration): the method's own noise floor.
    """
    from scipy.spatial import cKDTree

    from skystack.engine.detect import detect_stars
    from skystack.engine.match import estimate_transform, grid_rms

    ref_xy = truth.project_stars(ref_index)
    tree = cKDTree(ref_xy)
    errs: dict[int, float] = {}
    pairs: dict[int, int] = {}
    for i, img in images:
        st = detect_stars(np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0))
        xy = st.xy
        if len(xy) < 3:
            continue
        d, j = tree.query(xy)
        ok = d <= match_radius
        if ok.sum() < 6:
            continue
        src, dst = xy[ok], ref_xy[j[ok]]
        t = estimate_transform(src, dst, "similarity")
        # one pass of outlier removal (blends, hot pixels)
        res = np.hypot(*(src @ t[:2, :2].T + t[:2, 2] - dst).T)
        good = res <= max(3.0 * MAD_TO_SIGMA * np.median(res), 0.2)
        if good.sum() >= 6:
            t = estimate_transform(src[good], dst[good], "similarity")
        errs[int(i)] = grid_rms(t, np.eye(3), truth.shape)
        pairs[int(i)] = int(good.sum())
    v = np.array([e for k, e in errs.items() if k != ref_index])
    return {"rms_px": float(np.sqrt(np.mean(v ** 2))) if v.size else float("nan"),
            "max_px": float(v.max()) if v.size else float("nan"), "n": int(v.size),
            "floor_px": float(errs[ref_index]) if ref_index in errs else None,
            "per_frame": {str(k): float(e) for k, e in sorted(errs.items())},
            "stars_matched": {str(k): n for k, n in sorted(pairs.items())}, "method": "registered frames"}


if __name__ == "__main__":
    sys.exit(main())
