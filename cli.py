"""Command-line interface: ``skystack <command> ...``.

Parsing lives here; each command's work lives in the stage modules of
:mod:`skystack.engine`. A user error prints one red line on stderr and exits 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from skystack import __version__
from skystack.engine.errors import NotBuiltYet, SkystackError

EXIT_USER_ERROR = 2


def _console(stderr: bool = True):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _error_line(message: str) -> None:
    """Print ``error: message`` as one red line on stderr (no markup parsing)."""
    from rich.text import Text

    line = " ".join(message.split())
    _console().print(Text.assemble(("error: ", "bold red"), line), soft_wrap=True)


# ----------------------------------------------------------------------------- commands


def _cmd_info(args: argparse.Namespace) -> int:
    from skystack.engine.backend import get_backend
    from skystack.engine.io import read_frame

    get_backend(args.backend, quiet=args.quiet)
    metas = [read_frame(p, header_only=True).meta for p in args.files]
    if args.json:
        print(json.dumps([m.to_dict() for m in metas], indent=2, default=str))
        return 0
    from rich.table import Table

    table = Table(title="frames", show_lines=False)
    cols = ["file", "format", "shape", "pattern", "black", "white", "wb", "exp s", "iso/gain",
            "temp C", "focal mm", "time", "camera"]
    for c in cols:
        table.add_column(c, overflow="fold")

    def f(v, fmt="{:g}"):
        return "" if v is None else fmt.format(v)

    for m in metas:
        black = sorted(set(m.black_level))
        table.add_row(
            Path(m.path).name, m.format, "x".join(map(str, m.shape)), m.pattern or "-",
            "/".join(f"{b:g}" for b in black), f(m.white_level),
            "" if m.wb is None else ",".join(f"{w:.3f}" for w in m.wb),
            f(m.exposure_s), f(m.iso if m.iso is not None else m.gain), f(m.temperature_c),
            f(m.focal_length_mm), m.timestamp or "", m.camera or "",
        )
    _console(stderr=False).print(table)
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from skystack.engine.synth import SynthConfig, simulate

    w, h = _parse_size(args.size)
    cfg = SynthConfig(
        seed=args.seed, width=w, height=h, n_lights=args.lights, n_bias=args.bias,
        n_darks=args.darks, n_flats=args.flats, n_dark_flats=args.dark_flats,
        pattern=args.pattern, file_format=args.format, exposure_s=args.exposure,
        interval_s=args.interval,
    )
    truth = simulate(cfg, Path(args.outdir), progress=not args.quiet)
    _console().print(f"wrote synthetic session to {args.outdir} (truth: {truth})")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from skystack.engine.plan import PlanInputs, exposure_plan, inputs_from_frame

    base = inputs_from_frame(args.from_file) if args.from_file else PlanInputs()
    inputs = base.with_overrides(
        focal_length_mm=args.focal_length, crop_factor=args.crop_factor,
        aperture=args.aperture, pixel_pitch_um=args.pixel_pitch, declination_deg=args.declination,
    )
    rows = exposure_plan(inputs)
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return 0
    from rich.table import Table

    table = Table(title="maximum exposure before stars trail")
    for c in ("rule", "max exposure", "formula"):
        table.add_column(c)
    for r in rows:
        table.add_row(r.rule, "-" if r.seconds is None else f"{r.seconds:.1f} s", r.formula)
    _console(stderr=False).print(table)
    return 0


def _not_built(issue: int) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        raise NotBuiltYet(f"'skystack {args.command}' is not built yet (issue {issue})")

    return run


# ----------------------------------------------------------------------------- parser


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SkystackError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 1600x1200") from None
    return w, h


def _common(p: argparse.ArgumentParser, *, top: bool = False) -> None:
    # Options accepted before or after the command; on sub-parsers they are
    # SUPPRESSed so they do not overwrite a value given before the command.
    dflt = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    p.add_argument("--backend", choices=("auto", "cpu", "gpu"), default=dflt(None),
                   help="compute backend (default: $SKYSTACK_BACKEND or auto)")
    p.add_argument("--quiet", "-q", action="store_true", default=dflt(False),
                   help="no progress output")
    p.add_argument("--debug", action="store_true", default=dflt(False), help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    """Return the ``skystack`` argument parser."""
    parser = argparse.ArgumentParser(prog="skystack", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"skystack {__version__}")
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="print frame metadata")
    _common(p)
    p.add_argument("files", nargs="+")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("synth", help="write a synthetic night session with truth.json")
    _common(p)
    p.add_argument("outdir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="1600x1200", help="WIDTHxHEIGHT (default 1600x1200)")
    p.add_argument("--lights", type=int, default=12)
    p.add_argument("--bias", type=int, default=8)
    p.add_argument("--darks", type=int, default=8)
    p.add_argument("--flats", type=int, default=8)
    p.add_argument("--dark-flats", type=int, default=8)
    p.add_argument("--pattern", default="RGGB", choices=("RGGB", "BGGR", "GRBG", "GBRG"))
    p.add_argument("--format", default="dng", choices=("dng", "fits"))
    p.add_argument("--exposure", type=float, default=20.0, help="light exposure in s")
    p.add_argument("--interval", type=float, default=None, help="cadence in s (default exposure + 2)")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("plan", help="exposure calculator (500 and NPF rules)")
    _common(p)
    p.add_argument("--focal-length", type=float, help="focal length in mm")
    p.add_argument("--crop-factor", type=float, help="sensor crop factor (1 = full frame)")
    p.add_argument("--aperture", type=float, help="f-number, e.g. 1.8")
    p.add_argument("--pixel-pitch", type=float, help="pixel pitch in micrometres")
    p.add_argument("--declination", type=float, help="target declination in degrees")
    p.add_argument("--from", dest="from_file", help="read settings from a frame's EXIF/FITS header")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_plan)

    for name, issue, helptext in (
        ("stack", 6, "calibrate, register and stack a session"),
        ("demo", 6, "stack a built-in synthetic night"),
        ("master", 4, "build a master bias/dark/flat/dark-flat"),
        ("bench", 7, "benchmark the CPU and GPU paths"),
        ("batch", 8, "reprocess a whole archive"),
    ):
        p = sub.add_parser(name, help=helptext)
        _common(p)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_not_built(issue))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status (0 ok, 2 user error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USER_ERROR
    if args.debug:
        return int(args.func(args) or 0)
    try:
        return int(args.func(args) or 0)
    except SkystackError as exc:
        _error_line(str(exc))
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        _console().print("[red]interrupted[/red]")
        return 130
    except OSError as exc:
        _error_line(str(exc))
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
