"""The stack's report (report.json), its output files and the closing summary table."""

from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from skystack import __version__


def build_report(result, *, outputs: dict[str, str] | None = None) -> dict[str, Any]:
    """JSON-ready dict: backend, reference, per-frame records, timings, throughput, memory."""
    frames = [f.to_dict() for f in result.frames]
    n_in = len(frames)
    n_proc = sum(1 for f in result.frames if f.stars or f.used)
    total = result.timings.get("total", 0.0) or float("nan")
    h, w = result.image.shape[-2:]
    mp = h * w / 1e6
    return {
        "software": f"skystack {__version__}",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "backend": result.backend,
        "device": result.device,
        "reference": result.reference,
        "frames_in": n_in,
        "frames_used": result.n_used,
        "total_exposure_s": result.exposure_s,
        "output_shape": list(result.image.shape),
        "settings": result.settings,
        "masters": result.masters,
        "frames": frames,
        "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
        "throughput": {
            "frames_per_s": n_proc / total if total else None,
            "megapixels_per_s": n_proc * mp / total if total else None,
        },
        "memory": {
            "peak_rss_bytes": result.peak_rss_bytes,
            "store_on_disk": result.store_on_disk,
            "decoded_frames_peak": result.queue_peak,
            "decoded_frames_bound": result.queue_bound,
        },
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "outputs": outputs or {},
    }


def fits_header(result) -> dict[str, Any]:
    """Provenance cards for the stacked FITS."""
    s = result.settings
    return {
        "NCOMBINE": (result.n_used, "frames combined"),
        "EXPTIME": (float(result.exposure_s), "[s] total exposure of combined frames"),
        "STACKREJ": (str(s.get("rejection")), "rejection method"),
        "STACKKLO": (float(s.get("kappa_low", 0.0)), "rejection kappa low"),
        "STACKKHI": (float(s.get("kappa_high", 0.0)), "rejection kappa high"),
        "STACKNRM": (str(s.get("normalization")), "normalisation"),
        "STACKWGT": (str(s.get("weighting")), "weighting"),
        "DEBAYER": (str(s.get("debayer")), "debayer method"),
        "REFFRAME": (Path(result.reference).name[:60] if result.reference else "", "reference frame"),
        "BACKEND": (result.backend, "compute backend"),
        "SWCREATE": (f"skystack {__version__}", "software"),
        "DATE": (_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"), "file creation (UTC)"),
    }


def summary_table(result, outputs: dict[str, str]):
    """A rich Table: frames used/skipped with reasons, timings, outputs."""
    from rich.table import Table

    t = Table(title="skystack summary", show_header=True)
    t.add_column("item")
    t.add_column("value", overflow="fold")
    t.add_row("backend", f"{result.backend} ({result.device})")
    t.add_row("frames used", f"{result.n_used} / {len(result.frames)}")
    t.add_row("total exposure", f"{result.exposure_s:.0f} s")
    t.add_row("reference", Path(result.reference).name if result.reference else "-")
    rej = result.settings.get("rejection")
    if rej is not None:
        asked = result.settings.get("rejection_requested")
        t.add_row("rejection", f"{rej} (auto for {result.n_used} frames)" if asked == "auto" else str(rej))
    skipped = [f for f in result.frames if not f.used]
    for f in skipped[:10]:
        t.add_row(f"skipped {Path(f.path).name}", f.reason)
    if len(skipped) > 10:
        t.add_row("skipped (more)", f"{len(skipped) - 10} more, see the report")
    total = result.timings.get("total", 0.0)
    t.add_row("time", f"{total:.1f} s wall; stage seconds summed over worker threads: " + ", ".join(
        f"{k} {v:.1f}" for k, v in result.timings.items() if k != "total"))
    t.add_row("peak memory", f"{result.peak_rss_bytes / 2**20:.0f} MiB")
    for k, v in outputs.items():
        t.add_row(k, v)
    return t


def write_outputs(result, *, tiff: str | None, preview: str | None = None, fits: str | None = None,
                  report: str | None = None, inputs=(), linked: bool = True) -> dict[str, str]:
    """Write the TIFF, preview, FITS and report that were asked for; return their paths."""
    from skystack.engine.finish import preview_image
    from skystack.engine.output import write_fits, write_json, write_preview, write_tiff

    inputs = list(inputs)
    out: dict[str, str] = {}
    img = result.image
    if tiff:
        out["tiff"] = str(write_tiff(tiff, img, inputs=inputs, description=f"skystack {__version__}"))
    if fits:
        ext = []
        if getattr(result, "coverage", None) is not None:
            ext.append(("COVERAGE", result.coverage.astype(np.int16),
                        {"NFRAMES": (result.n_used, "frames combined"),
                         "COMMENT": "frames whose data covered each pixel, before rejection"}))
        out["fits"] = str(write_fits(fits, img, fits_header(result), inputs=inputs, extensions=ext))
    if preview:
        out["preview"] = str(write_preview(preview, preview_image(img, linked=linked), inputs=inputs))
    if report:
        out["report"] = str(report)
        write_json(report, build_report(result, outputs=out), inputs=inputs)
    return out
