"""The stack's report (report.json), its output files and the closing summary table."""

from __future__ import annotations

import contextvars
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
        "registration": getattr(result, "registration", {}),
        "masters": result.masters,
        "notes": list(getattr(result, "notes", [])),
        "frames": frames,
        "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
        "throughput": {
            "frames_per_s": n_proc / total if total else None,
            "megapixels_per_s": n_proc * mp / total if total else None,
        },
        "memory": {
            "peak_rss_bytes": result.peak_rss_bytes,
            "store_on_disk": result.store_on_disk,
            "frame_store": result.store_where,
            "frame_store_bytes": int(result.store_bytes),
            "decoded_frames_peak": result.queue_peak,
            "decoded_frames_bound": result.queue_bound,
        },
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "outputs": outputs or {},
    }


def _utc(text: str | None) -> _dt.datetime | None:
    """A frame's ISO timestamp as naive UTC (naive input is taken as UTC, as FITS DATE-OBS is)."""
    if not text:
        return None
    try:
        t = _dt.datetime.fromisoformat(str(text).strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if t.tzinfo is not None:
        t = t.astimezone(_dt.timezone.utc).replace(tzinfo=None)
    return t


def acquisition_cards(metas, *, superpixel: bool = False) -> dict[str, Any]:
    """FITS cards the lights agree on, as Siril writes them on a stack.

    ``DATE-OBS`` is the first light's start and ``DATE-END`` the last light's
    end; ``OBJECT``, ``INSTRUME``, ``TELESCOP``, ``FILTER``, ``RA``/``DEC``
    (or ``OBJCTRA``/``OBJCTDEC``), ``FOCALLEN``, ``XPIXSZ``/``YPIXSZ`` (doubled
    by the super-pixel debayer), ``GAIN`` and ``ISOSPEED`` come from the first
    of ``metas`` (the reference), ``CCD-TEMP`` is the mean. Unknown values are
    left out, never invented.
    """
    metas = [m for m in metas if m is not None]
    if not metas:
        return {}
    ref = metas[0]
    ex = {k.lower(): v for k, v in (ref.extra or {}).items()}
    cards: dict[str, Any] = {}
    spans = []
    for m in metas:
        t0 = _utc(m.timestamp)
        if t0 is not None:
            spans.append((t0, t0 + _dt.timedelta(seconds=float(m.exposure_s or 0.0))))
    if spans:
        cards["DATE-OBS"] = (min(a for a, _ in spans).isoformat(timespec="milliseconds"),
                             "UTC start of the first light")
        cards["DATE-END"] = (max(b for _, b in spans).isoformat(timespec="milliseconds"),
                             "UTC end of the last light")
    for key, value, comment in (
            ("OBJECT", ex.get("object"), "target"),
            ("INSTRUME", ref.camera, "camera"),
            ("TELESCOP", ex.get("telescop"), "telescope"),
            ("FILTER", ex.get("filter"), "filter"),
            ("RA", ex.get("ra"), "[deg] right ascension of the centre"),
            ("DEC", ex.get("dec"), "[deg] declination of the centre"),
            ("OBJCTRA", ex.get("objctra"), "right ascension (hms)"),
            ("OBJCTDEC", ex.get("objctdec"), "declination (dms)"),
            ("FOCALLEN", ref.focal_length_mm, "[mm] focal length"),
            ("XPIXSZ", _scaled(ex.get("xpixsz"), superpixel), "[um] pixel width"),
            ("YPIXSZ", _scaled(ex.get("ypixsz"), superpixel), "[um] pixel height"),
            ("GAIN", ref.gain, "sensor gain setting"),
            ("ISOSPEED", ref.iso, "ISO speed")):
        if value is not None and value != "":
            cards[key] = (value if isinstance(value, str) else float(value), comment)
    temps = [m.temperature_c for m in metas if m.temperature_c is not None]
    if temps:
        cards["CCD-TEMP"] = (round(float(np.mean(temps)), 2), "[C] mean sensor temperature")
    return cards


def _scaled(v: Any, superpixel: bool) -> float | None:
    return None if v is None else float(v) * (2.0 if superpixel else 1.0)


def fits_header(result) -> dict[str, Any]:
    """Provenance and acquisition cards for the stacked FITS."""
    s = result.settings
    cards = acquisition_cards(getattr(result, "lights_meta", []), superpixel=s.get("debayer") == "superpixel")
    cards.update({
        "NCOMBINE": (result.n_used, "frames combined"),
        "EXPTIME": (float(result.exposure_s), "[s] total exposure of combined frames"),
        "LIVETIME": (float(result.exposure_s), "[s] total exposure (Siril)"),
        "STACKCNT": (result.n_used, "frames combined (Siril)"),
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
    })
    return cards


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
    for line in _registration_lines(getattr(result, "registration", {}) or {}):
        t.add_row(*line)
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


def _registration_lines(reg: dict[str, Any]) -> list[tuple[str, str]]:
    """Summary rows for the registration: model (and lens), framing, foreground, trailing."""
    rows = []
    if reg.get("model"):
        lens = reg.get("lens")
        extra = f" (lens k1 {lens['k1']:+.4f}, k2 {lens['k2']:+.4f})" if lens else ""
        if reg.get("heldout_rms_px"):
            extra += "; held-out RMS " + ", ".join(f"{k} {v:.3f}" for k, v in reg["heldout_rms_px"].items()) + " px"
        rows.append(("model", reg["model"] + extra))
    if reg.get("chained_frames"):
        rows.append(("chained", f"{reg['chained_frames']} frames registered through a neighbour"))
    if reg.get("static_sources"):
        rows.append(("static sources", f"{reg['static_sources']} fixed lights/landscape detections left out"))
    for key in ("framing", "foreground", "trailing"):
        if reg.get(key):
            rows.append((key, str(reg[key])))
    return rows


def rejection_map(result) -> np.ndarray | None:
    """Values rejected per pixel (first channel): frames covering it minus values kept."""
    cov, count = getattr(result, "coverage", None), getattr(result, "count", None)
    if cov is None or count is None or np.shape(cov) != np.shape(count):
        return None
    return np.clip(cov.astype(np.int32) - count.astype(np.int32), 0, None)


def _write_image_files(result, run_id: str, *, tiff: str | None, fits: str | None, inputs: list) -> dict[str, str]:
    """The stack's TIFF and FITS (with its coverage and landscape maps), those asked for; their paths."""
    from skystack.engine.output import write_fits, write_tiff

    out: dict[str, str] = {}
    img = result.image
    if tiff:
        out["tiff"] = str(write_tiff(tiff, img, inputs=inputs, description=f"skystack {__version__} run {run_id}"))
    if fits:
        ext = []
        if getattr(result, "coverage", None) is not None:
            ext.append(("COVERAGE", result.coverage.astype(np.int16),
                        {"NFRAMES": (result.n_used, "frames combined"),
                         "COMMENT": "frames whose data covered each pixel, before rejection"}))
        if getattr(result, "landscape", None) is not None:
            ext.append(("LANDSCAPE", result.landscape.astype(np.uint8),
                        {"COMMENT": "1 = still landscape, stacked unregistered (--foreground)"}))
        header = {**fits_header(result), "RUNID": (run_id, "skystack run that wrote this output set")}
        out["fits"] = str(write_fits(fits, img, header, inputs=inputs, extensions=ext))
    return out


def write_outputs(result, *, tiff: str | None, preview: str | None = None, fits: str | None = None,
                  report: str | None = None, html: str | None = None, inputs=(),
                  linked: bool = True) -> dict[str, str]:
    """Write the TIFF, preview, FITS, JSON and HTML reports that were asked for; return their paths.

    The files form one set (:func:`~skystack.engine.output.output_set`): all
    are written to temporary files first and renamed together, so a kill never
    leaves files of two runs side by side. Each also carries the same run id
    (TIFF description, FITS ``RUNID``, PNG text, ``run_id`` in the JSON and HTML).
    The TIFF and the FITS are written in a thread while the preview is made
    (8-bit, once); its PNG is encoded in another thread (zlib runs without the
    GIL) while the HTML report (its reduced copy of the preview, the plots and
    maps) and the JSON are made.
    """
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    from skystack.engine.htmlreport import preview_uri, render_report
    from skystack.engine.output import output_set, write_json, write_preview, write_text
    from skystack.engine.finish import preview_image
    from skystack.engine.stretch import to_8bit

    inputs = list(inputs)
    run_id = uuid.uuid4().hex[:16]
    out: dict[str, str] = {}
    img = result.image
    with output_set(), ThreadPoolExecutor(max_workers=2, thread_name_prefix="skystack-out") as pool:
        try:
            def job(fn, *args, **kwargs):  # runs in this output set (a copy of the context)
                return pool.submit(contextvars.copy_context().run, fn, *args, **kwargs)

            files = job(_write_image_files, result, run_id, tiff=tiff, fits=fits, inputs=inputs)
            shown = to_8bit(preview_image(img, linked=linked)) if preview or html else None
            png = None
            if preview:
                png = job(write_preview, preview, shown, inputs=inputs,
                          text={"Software": f"skystack {__version__}", "skystack-run": run_id})
            out.update(files.result())
            if preview:
                out["preview"] = str(Path(preview))
            if report:
                out["report"] = str(report)
            if html:
                out["html"] = str(html)
            rep = build_report(result, outputs=out)
            rep["run_id"] = run_id
            if report:
                write_json(report, rep, inputs=inputs)
            if html:
                write_text(html, render_report(rep, preview=preview_uri(shown), coverage=result.coverage,
                                               rejections=rejection_map(result)), inputs=inputs)
            if png is not None:
                png.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # no job left writing when the set is rolled back
            raise
    return out

