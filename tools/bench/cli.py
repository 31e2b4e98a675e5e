"""The ``skystack bench`` options and command, and the stand-alone ``python bench/run.py`` entry point."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from skystack.engine.errors import SkystackError
from skystack.tools.bench.config import PRESETS, BenchConfig


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

    from skystack.tools.bench.harness import run_benchmark
    from skystack.tools.bench.machine import machine_key
    from skystack.tools.bench.report import bench_tables, markdown_tables, print_profile, update_results_md

    results = run_benchmark(config_from_args(args))
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    for t in bench_tables(results):
        console.print(t)
    print_profile(console, results.get("profile"))
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


def split_child_request(argv: Sequence[str] | None, flag: str) -> tuple[list[str], dict[str, Any] | None]:
    """The command line (default ``sys.argv[1:]``) and, when it is ``flag JSON``, the child's spec.

    Measurement scripts run their child processes as ``script flag JSON``
    (``--one`` here, ``--peer`` in ``bench/siril_compare.py``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    return argv, (json.loads(argv[1]) if argv[:1] == [flag] else None)


def main(argv: Sequence[str] | None = None) -> int:
    """``python bench/run.py`` / ``python -m skystack.tools.bench``; ``--one SPEC`` runs a child."""
    argv, spec = split_child_request(argv, "--one")
    if spec is not None:
        from skystack.tools.bench.child import child_main

        return child_main(spec)
    args = build_parser().parse_args(argv)
    if args.debug:
        return bench_command(args)
    try:
        return bench_command(args)
    except SkystackError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
