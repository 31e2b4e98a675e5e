"""Issue 14's throughput table: skystack and Siril on the session shapes of "stacking hundreds of frames quickly".

Usage::

    python bench/throughput.py [--shapes 16x3.84,60x6,80x0.96,300x0.96,seestar] [--repeat 2]
                               [--results-md bench/RESULTS.md]

Each shape is one comparison of ``bench/siril_compare.py`` (synthetic Bayer FITS
sessions with bias, darks and flats, cached once; ``seestar`` is the real
Seestar S50 session 1 under ``../shared/realdata``): skystack in a fresh
process with an empty master cache, then Siril on the same files, ``--repeat``
times in turn (A B A B...). The table gives, per shape, the median wall time
and CPU time (user + system) of each tool, their ratios (skystack / Siril:
below 1 is faster), and each tool's peak memory and their ratio.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import siril_compare  # noqa: E402  (the comparison this table repeats per shape)

SEESTAR = REPO.parent / "shared" / "realdata" / "seestar-m94" / "lights_session1"
DEFAULT_SHAPES = "16x3.84,60x6,80x0.96,300x0.96,seestar"


def _shape_args(shape: str) -> list[str]:
    """``siril_compare`` arguments of one shape: ``NxMP`` (lights x megapixels) or ``seestar``."""
    if shape == "seestar":
        if not SEESTAR.is_dir():
            raise SystemExit(f"{SEESTAR}: not found (the real session lives in ../shared/realdata)")
        return ["--session", str(SEESTAR)]
    n, mp = shape.lower().split("x")
    return ["--frames", str(int(n)), "--megapixels", str(float(mp))]


def _tool_figures(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    out = {}
    for t, key in zip(results["tools"][:2], ("skystack", "siril")):
        if t.get("ok"):
            out[key] = {"wall_s": float(t["wall_s"]), "cpu_s": float(t["cpu_s"]),
                        "peak_mib": float(t["peak_rss_bytes"]) / 2**20}
    return out


def run_shape(shape: str, repeat: int, quiet: bool) -> dict[str, Any]:
    """Median figures of ``repeat`` comparisons of one shape."""
    runs = []
    session = None
    for _ in range(repeat):
        args = siril_compare.build_parser().parse_args([*_shape_args(shape), "--no-peer", "--quiet"]
                                                       if quiet else [*_shape_args(shape), "--no-peer"])
        res = siril_compare.compare(args)
        session = res["session"]
        runs.append(_tool_figures(res))
    med = {tool: {k: statistics.median(r[tool][k] for r in runs if tool in r) for k in ("wall_s", "cpu_s", "peak_mib")}
           for tool in ("skystack", "siril") if any(tool in r for r in runs)}
    return {"shape": shape, "session": session, "runs": runs, "median": med}


def _row(r: dict[str, Any]) -> list[str]:
    s, m = r["session"], r["median"]
    name = (f"{s['lights']} x {s['width']}x{s['height']}" + (" + calibration" if s["bias"] else "")
            + ("" if s["truth"] else " (real Seestar)"))
    if "skystack" not in m or "siril" not in m:
        return [name] + ["-"] * 7
    a, b = m["skystack"], m["siril"]
    return [name, f"{a['wall_s']:.1f}", f"{b['wall_s']:.1f}", f"**{a['wall_s'] / b['wall_s']:.2f}x**",
            f"{a['cpu_s'] / b['cpu_s']:.2f}x", f"{a['peak_mib']:.0f} / {b['peak_mib']:.0f}",
            f"{a['peak_mib'] / b['peak_mib']:.2f}x", str(len(r["runs"]))]


def markdown(rows: list[dict[str, Any]], machine: str) -> str:
    cols = ["session", "skystack wall (s)", "Siril wall (s)", "wall ratio", "CPU ratio",
            "peak MiB skystack / Siril", "memory ratio", "runs"]
    lines = [f"Command: `python bench/throughput.py --shapes {','.join(r['shape'] for r in rows)} "
             f"--repeat {len(rows[0]['runs']) if rows else 1}` "
             f"({_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}, {machine}). "
             "Medians over the runs; ratios are skystack / Siril (targets: wall <= 0.8x, memory <= 2x).", "",
             "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_row(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/throughput.py", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma-separated (default {DEFAULT_SHAPES})")
    p.add_argument("--repeat", type=int, default=1, help="comparisons per shape, in turn (medians are shown)")
    p.add_argument("--results-md", help="update this markdown file's throughput section")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    rows = []
    for shape in args.shapes.split(","):
        print(f"{shape} ...", file=sys.stderr, flush=True)
        rows.append(run_shape(shape.strip(), max(1, args.repeat), args.quiet))
        print(markdown(rows, ""), file=sys.stderr, flush=True)
    machine = siril_compare.machine_key(siril_compare.machine_info())
    text = markdown(rows, machine)
    print(text)
    if args.results_md:
        siril_compare.update_results_md(args.results_md, "Throughput against Siril (issue 14): " + machine, text)
        print(f"updated {args.results_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
