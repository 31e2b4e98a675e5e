"""The benchmark's tables: rich tables for the terminal, GitHub markdown, and the per-machine
sections of ``bench/RESULTS.md``."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from skystack.tools.bench.config import STAGES


def fmt_value(v: Any, fmt: str = "{:.2f}") -> str:
    """A table cell: ``fmt`` of ``v``, or ``-`` for a missing or non-finite value."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return fmt.format(v)


def _mib(v: Any) -> str:
    return "-" if not v else f"{v / 2**20:.0f}"


def _store_cell(r: dict[str, Any]) -> str:
    """Where the frame store was and its size: ``device 1707``, ``RAM 512``, ``disk 2048`` (MiB)."""
    where = r.get("store_where")
    return "-" if not where else f"{where} {_mib(r.get('store_bytes'))}"


def _traffic_cells(t: dict[str, Any] | None) -> list[str]:
    if not t:
        return ["-", "-", "-", "-", "-"]
    return [fmt_value(t.get("h2d_bytes_per_light_px"), "{:.1f}"), fmt_value(t.get("d2h_bytes_per_light_px"), "{:.1f}"),
            fmt_value(t.get("host_s_per_light"), "{:.3f}"), fmt_value(t.get("host_s_per_added_light"), "{:.3f}"),
            fmt_value(t.get("host_cpu_s_per_added_light"), "{:.3f}")]


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
        stage_rows.append([r["backend"], *[fmt_value(t.get(s)) for s in (*present, *extra)],
                           fmt_value(r.get("other_s")),
                           fmt_value(r.get("total_s"))])
    sess = results["session"]
    sum_cols = ["backend", "device", "frames", "MP/frame", "total s", "frames/s", "MP/s", "peak RSS MiB",
                "GPU pool MiB", "decode floor s", "pipeline / decode floor", "lights-only ratio",
                "frame store MiB", "B/light px up", "B/light px down", "host s/light", "host s/added light",
                "host CPU s/added light", "decode s/light"]
    sum_rows = []
    for r in runs:
        if not r.get("ok"):
            sum_rows.append([r.get("requested_backend", "?"), "failed: " + str(r.get("error", ""))[:80],
                             *(["-"] * (len(sum_cols) - 2))])
            continue
        sum_rows.append([
            r["backend"], str(r.get("device", "")), f"{r.get('frames_used', '?')}/{sess['lights']}",
            f"{sess['megapixels']:.1f}", fmt_value(r.get("total_s")), fmt_value(r.get("frames_per_s")),
            fmt_value(r.get("megapixels_per_s"), "{:.1f}"), _mib(r.get("peak_rss_bytes")),
            _mib(r.get("gpu_pool_bytes")),
            fmt_value(r.get("decode_floor_s")), fmt_value(r.get("ratio_to_decode_floor")),
            fmt_value(r.get("ratio_lights_to_decode_lights")),
            _store_cell(r), *_traffic_cells(r.get("device_traffic")),
            fmt_value(r.get("decode_s_per_light"), "{:.3f}"),
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
            f"{sess['flats']} flats. Decode floor: {fmt_value(dec.get('total_s'))} s "
            f"(lights {fmt_value(dec.get('lights_s'))} s, calibration {fmt_value(dec.get('calibration_s'))} s, "
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


def print_profile(console, profile: dict[str, Any] | None, top: int = 15) -> None:
    """Print a run's CPU profile (top functions by own time) as a rich table."""
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
