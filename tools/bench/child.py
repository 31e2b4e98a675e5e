"""The child side of a benchmark measurement: the decode floor or one pipeline run, measured
inside the fresh process that :func:`~skystack.tools.bench.measure.run_child` starts."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from skystack.engine.errors import SkystackError
from skystack.engine.output import atomic_path
from skystack.tools.bench.measure import RESULT_MARK, json_default
from skystack.tools.bench.sessions import session_files


def _peak_rss_self() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _child_decode(spec: dict[str, Any]) -> dict[str, Any]:
    from skystack.engine.producer import FrameProducer

    files = session_files(spec["session"])
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
#: thread: CuPy's per-call overhead, ~10-25 us as its users measure it (cupy/cupy#1294, numba/numba#3003).
#: It replaces the stand-in's own per-call bookkeeping (~7-40 us: arguments checked, bytes and memory
#: counted), which :func:`host_seconds` leaves out.
LAUNCH_HOST_S = 20e-6

#: Host seconds of a view of a device array (a slice, reshape or transpose: a new array header on the
#: same memory, which CuPy builds without a launch; ~1-3 us), counted apart from the launches.
VIEW_HOST_S = 5e-6


def host_seconds(wall: float, stand_in: float, launches: int, views: int = 0) -> float:
    """Host seconds of a block that ran ``wall`` seconds under the simulated device: less the
    seconds its thread spent inside the stand-in (``cupy.sim.thread_stand_in``: the device's work,
    emulated, and the stand-in's bookkeeping around each call), plus :data:`LAUNCH_HOST_S` for each
    of its ``launches`` (``cupy.sim.thread_device``) and :data:`VIEW_HOST_S` for each of its
    ``views`` (``cupy.sim.thread_views``): CuPy's own cost on the host."""
    return wall - stand_in + launches * LAUNCH_HOST_S + views * VIEW_HOST_S


#: What :func:`_stage_device_seconds` sums for each stage timer, over the threads that ran it: the
#: device's seconds (``cupy.sim.thread_device``), launches, seconds inside the stand-in, the thread's
#: CPU seconds and those of them inside the stand-in, and views (``cupy.sim.thread_views``).
STAGE_COUNTERS = ("device_s", "launches", "stand_in_s", "cpu_s", "stand_in_cpu_s", "views")

#: Stage timers that are the session's, not its lights': scanning headers, building masters, choosing
#: the transform model and the lens (at most ``register.N_VALIDATE`` frames), the reference's star
#: apertures and the landscape search (at most ``foreground.N_FRAMES`` small frames).
SESSION_STAGES = ("scan", "masters", "model", "apertures", "foreground")


def _sim_device():
    """The simulated device's counters (``cupy.sim`` of ``tests/fakecupy``), or None."""
    try:
        import cupy
    except Exception:  # no CuPy, or a broken CUDA install
        return None
    return getattr(cupy, "sim", None)


@contextmanager
def _stage_device_seconds(sim):
    """Under the simulated device: every stage timer also sums what its own thread ran inside the
    stand-in, and its thread's CPU seconds (``{timer: {counter: total}}``, the counters of
    :data:`STAGE_COUNTERS`, filled while the block runs).

    A stage's host seconds are then :func:`host_seconds` of its wall time: the device's work runs
    asynchronously to the host thread on a real device; work of other threads (the decoders) is
    not subtracted, so contention for the interpreter still counts as host time. Its host CPU
    seconds are :func:`host_seconds` of its thread's CPU seconds: the host's work alone, without
    the waits for the interpreter that the decoder threads hold.
    """
    from skystack.engine import pipeline

    if sim is None:
        yield None
        return
    device: dict[str, dict[str, float]] = {}
    lock = threading.Lock()
    original = pipeline._Timer.__call__

    def now() -> tuple[float, ...]:  # in the order of STAGE_COUNTERS
        seconds, launches = sim.thread_device()
        return (seconds, launches, sim.thread_stand_in(), time.thread_time(), sim.thread_stand_in_cpu(),
                sim.thread_views())

    @contextmanager
    def timed(self, name: str):
        start = now()
        try:
            with original(self, name):
                yield
        finally:
            end = now()
            with lock:
                acc = device.setdefault(name, dict.fromkeys(STAGE_COUNTERS, 0))
                for key, a, b in zip(STAGE_COUNTERS, start, end):
                    acc[key] += b - a

    pipeline._Timer.__call__ = timed
    try:
        yield device
    finally:
        pipeline._Timer.__call__ = original


def _device_traffic(res, stage_device: dict[str, dict[str, float]] | None) -> dict[str, Any] | None:
    """Host<->device bytes per light pixel and host seconds per light of a GPU run.

    Only the simulated device of the tests (``tests/fakecupy``, which counts every
    transfer, the seconds each thread spends on the device's work -- emulating
    kernels and running CuPy's array operations with NumPy -- and inside the stand-in)
    gives them; CuPy on a real device has no such counters, so this is ``None`` there and
    on the CPU. ``host_s_by_stage`` is :func:`host_seconds` of each stage timer's seconds;
    ``host_s_per_light`` sums the stages of the lights (all but :data:`SESSION_STAGES`) over the
    lights. ``stage_device`` keeps each stage's counters (:data:`STAGE_COUNTERS`).
    """
    sim = _sim_device()
    if res.backend != "gpu" or sim is None or stage_device is None:
        return None
    n = max(1, len(res.frames))
    px = n * int(np.prod(res.image.shape[-2:]))
    zero = dict.fromkeys(STAGE_COUNTERS, 0)
    acc = {name: stage_device.get(name, zero) for name in res.timings if name != "total"}
    host = {name: host_seconds(float(res.timings[name]), a["stand_in_s"], a["launches"], a["views"])
            for name, a in acc.items()}
    cpu = {name: host_seconds(a["cpu_s"], a["stand_in_cpu_s"], a["launches"], a["views"]) for name, a in acc.items()}
    lights_s = sum(v for k, v in host.items() if k not in SESSION_STAGES)
    lights_cpu = sum(v for k, v in cpu.items() if k not in SESSION_STAGES)
    return {"h2d_bytes_per_light_px": sim.h2d_bytes / px, "d2h_bytes_per_light_px": sim.d2h_bytes / px,
            "host_s_by_stage": host, "host_s_lights": lights_s, "host_s_per_light": lights_s / n,
            "host_cpu_s_by_stage": cpu, "host_cpu_s_lights": lights_cpu, "host_cpu_s_per_light": lights_cpu / n,
            "stage_device": stage_device,
            "launch_host_s": LAUNCH_HOST_S, "view_host_s": VIEW_HOST_S, "syncs": int(sim.syncs),
            "peak_device_bytes": int(sim.peak),
            "note": "simulated device: all traffic of the run (masters and results included); host seconds "
                    "of the lights' stages (not " + ", ".join(SESSION_STAGES) + "): wall less the stand-in's "
                    "seconds, plus launch_host_s a launch and view_host_s a view"}


def _child_stack(spec: dict[str, Any]) -> dict[str, Any]:
    from dataclasses import replace as _replace

    from skystack.engine.stack import StackConfig, stack_session

    files = session_files(spec["session"])
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
        with _stage_device_seconds(_sim_device()) as stage_device:
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
        "store_on_disk": bool(res.store_on_disk), "store_where": res.store_where,
        "store_bytes": int(res.store_bytes), "reference": res.reference,
        "device_traffic": _device_traffic(res, stage_device),
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


def child_main(spec: dict[str, Any]) -> int:
    """Run one measurement ``spec`` in this process and print its JSON result line; return the exit status."""
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
    print(RESULT_MARK + json.dumps(out, default=json_default), flush=True)
    return 0 if out.get("ok") else 1
