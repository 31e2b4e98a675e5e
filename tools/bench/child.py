"""The child side of a benchmark measurement: the decode floor or one pipeline run, measured
inside the fresh process that :func:`~skystack.tools.bench.measure.run_child` starts."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
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
