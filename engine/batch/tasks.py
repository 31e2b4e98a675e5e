"""The work done in the workers: one master, one session."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from skystack import __version__
from skystack.engine.errors import SkystackError
from skystack.engine.session import SessionFiles
from skystack.engine.stack import StackConfig
from skystack.engine.batch.records import _VOLATILE_REPORT_KEYS, _json_float

# ----------------------------------------------------------------------------- work done in the workers


def _worker_init(next_device=None, devices: tuple[str, ...] = ()) -> None:
    """Pool initializer: die with the coordinator when it is killed (Linux ``PR_SET_PDEATHSIG``).

    Ctrl-C reaches the whole process group: the workers ignore it and the
    coordinator stops them (:meth:`_Pool.map`), so no queued session starts.
    With ``devices``, this worker sees only the next of them (``CUDA_VISIBLE_DEVICES``,
    set before CuPy is imported; ``next_device`` is the pool's shared counter).
    """
    import logging
    import signal

    if devices and next_device is not None:
        with next_device.get_lock():
            k = next_device.value
            next_device.value += 1
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[k % len(devices)]

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # a session's remarks go to its report (notes); the worker prints nothing itself
    log = logging.getLogger("skystack")
    log.addHandler(logging.NullHandler())
    log.propagate = False
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _master_task(spec: dict[str, Any]) -> dict[str, Any]:
    """Build (or find in the cache) one master exactly as a session's stack would."""
    from skystack.engine import masters
    from skystack.engine.backend import get_backend

    c0 = masters.STATS.combined
    t0 = time.perf_counter()
    try:
        kw = dict(config=masters.MasterConfig(), cache_dir=spec["cache_dir"],
                  backend=get_backend(spec.get("backend"), quiet=True))
        mb = masters.load_or_build_master("bias", spec["bias"], **kw) if spec.get("bias") else None
        mdf = masters.load_or_build_master("dark-flat", spec["dark_flats"], **kw) if spec.get("dark_flats") else None
        kind = spec["kind"]
        if kind == "darks":
            masters.load_or_build_master("dark", spec["files"], bias=mb, **kw)
        elif kind == "flats":
            masters.load_or_build_master("flat", spec["files"], bias=mb, dark_flat=mdf, **kw)
        return {"status": "done", "combined": masters.STATS.combined - c0, "time_s": time.perf_counter() - t0}
    except SkystackError as exc:
        return {"status": "failed", "error": str(exc), "combined": masters.STATS.combined - c0}
    except Exception as exc:  # noqa: BLE001 - a bug must not stop the other sessions
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
                "combined": masters.STATS.combined - c0}


def stack_quality(image: np.ndarray) -> dict[str, Any]:
    """Noise, star count and FWHM of a stacked image (for the report and the summary).

    ``noise`` is the median over channels of the background-flattened,
    clipped MAD sigma (:func:`skystack.engine.normalize.robust_stats`) in the
    image's normalised units; ``fwhm_px``/``stars`` come from
    :func:`skystack.engine.detect.detect_stars` on the stack.
    """
    from skystack.engine import detect, normalize

    img = np.asarray(image, dtype=np.float32)
    st = normalize.robust_stats(img)
    noise = _json_float(np.nanmedian(st.scale)) if np.isfinite(st.scale).any() else None
    try:
        q = detect.measure_quality(detect.detect_stars(img))
        fwhm, n = _json_float(q.fwhm_px), int(q.n_stars)
    except SkystackError:
        fwhm, n = None, 0
    return {"noise": noise, "fwhm_px": fwhm, "stars": n,
            "background": _json_float(np.nanmedian(st.location)) if np.isfinite(st.location).any() else None}


def _clean_report(rep: dict[str, Any], out_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a :func:`build_report` dict into its deterministic part and the run's facts."""
    run = {k: rep.pop(k) for k in _VOLATILE_REPORT_KEYS if k in rep}
    prefix = str(out_dir) + os.sep

    def rel(v: Any) -> Any:
        return v[len(prefix):] if isinstance(v, str) and v.startswith(prefix) else v

    masters = {}
    for kind, m in (rep.get("masters") or {}).items():
        m = {k: rel(v) for k, v in m.items() if k != "created"}
        masters[kind] = m
    rep["masters"] = masters
    rep["settings"] = {k: rel(v) for k, v in rep.get("settings", {}).items() if k != "quiet"}
    return rep, run


def _session_task(task: dict[str, Any]) -> dict[str, Any]:
    """Stack one session and write its outputs; never raises (the outcome says what happened)."""
    from skystack.engine import masters
    from skystack.engine.finish import preview_image
    from skystack.engine.htmlreport import preview_uri, render_report
    from skystack.engine.output import output_set, write_fits, write_json, write_preview, write_text, write_tiff
    from skystack.engine.report import build_report, fits_header, rejection_map
    from skystack.engine.stack import stack_session

    c0 = masters.STATS.combined
    t0 = time.perf_counter()
    name = task["name"]
    try:
        files: SessionFiles = task["files"]
        cfg: StackConfig = task["config"]
        result = stack_session(files, cfg)
        paths: dict[str, Path] = task["outputs"]
        inputs = [*files.lights, *files.darks, *files.flats, *files.bias, *files.dark_flats]
        img = result.image
        header = fits_header(result)
        header.pop("DATE", None)  # file creation time: would differ between runs
        header["OBJECT"] = (str(task["object"])[:60], "target")
        header["SSFPRINT"] = task["fingerprint"]  # 64 hex digits: no room for a comment
        shown = preview_image(img)
        quality = stack_quality(img)
        rep = build_report(result, outputs={k: p.name for k, p in paths.items()})
        rep, run = _clean_report(rep, Path(task["out_root"]))
        skipped = [f for f in result.frames if not f.used]
        rep["batch"] = {
            "session": name, "object": task["object"], "fingerprint": task["fingerprint"],
            "calibration": task["calibration"], "notes": task["notes"], "settings_files": task["settings_files"],
            "quality": quality,
        }
        with output_set():  # written together, renamed together
            write_tiff(paths["tiff"], img, inputs=inputs, description=f"skystack {__version__}")
            write_fits(paths["fits"], img, header, inputs=inputs)
            write_preview(paths["preview"], shown, inputs=inputs)
            write_json(paths["report"], rep, inputs=inputs)
            if "html" in paths:
                write_text(paths["html"], render_report(rep, preview=preview_uri(shown), coverage=result.coverage,
                                                        rejections=rejection_map(result)), inputs=inputs)
        sizes = {k: p.stat().st_size for k, p in paths.items()}
        elapsed = time.perf_counter() - t0
        run["peak_rss_bytes"] = result.peak_rss_bytes
        run["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        note = f"{len(skipped)} frame(s) skipped" if skipped else ""
        return {
            "status": "done", "outputs": sizes, "time_s": round(elapsed, 3), "run": run,
            "masters_combined": masters.STATS.combined - c0, "host": platform.node(), "pid": os.getpid(),
            "row": {"frames_used": result.n_used, "frames_in": len(result.frames),
                    "total_exposure_s": _json_float(result.exposure_s), "noise": quality["noise"],
                    "fwhm_px": quality["fwhm_px"], "note": note},
        }
    except SkystackError as exc:
        err = str(exc)
        tb = None
    except Exception as exc:  # noqa: BLE001 - a bug in one session must not stop the others
        err = f"{type(exc).__name__}: {exc}"
        tb = traceback.format_exc()
    out = {"status": "failed", "error": err, "time_s": round(time.perf_counter() - t0, 3),
           "masters_combined": masters.STATS.combined - c0}
    if tb:
        out["traceback"] = tb
    return out
