"""Command-line interface: ``skystack <command> ...``.

Parsing lives here; each command's work lives in the stage modules of
:mod:`skystack.engine`. A user error prints one red line on stderr and exits 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from skystack import __version__
from skystack.engine.errors import SkystackError

EXIT_USER_ERROR = 2


def _console(stderr: bool = True):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Tables piped to a file or a pager keep their columns readable.
    width = None if stream.isatty() else 160
    return Console(stderr=stderr, highlight=False, width=width)


def _error_line(message: str) -> None:
    """Print ``error: message`` as one red line on stderr (no markup parsing)."""
    from rich.text import Text

    line = " ".join(message.split())
    _console().print(Text.assemble(("error: ", "bold red"), line), soft_wrap=True)


def _warning_line(message: str) -> None:
    """Print ``warning: message`` as one yellow line on stderr."""
    from rich.text import Text

    _console().print(Text.assemble(("warning: ", "yellow"), " ".join(str(message).split())), soft_wrap=True)


class _LineHandler:
    """Turns the library's log records (level WARNING and up) and warnings into stderr lines."""

    def __enter__(self):
        import logging
        import warnings

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                _warning_line(record.getMessage())

        self.log = logging.getLogger("skystack")
        self.saved = (self.log.handlers[:], self.log.propagate, self.log.level, warnings.showwarning)
        self.log.handlers[:] = [Handler(level=logging.WARNING)]
        self.log.propagate = False
        self.log.setLevel(logging.INFO)
        warnings.showwarning = lambda message, *_a, **_k: _warning_line(str(message))
        return self

    def __exit__(self, *exc) -> None:
        import warnings

        self.log.handlers[:], self.log.propagate, level, warnings.showwarning = self.saved
        self.log.setLevel(level)


# ----------------------------------------------------------------------------- commands


def _cmd_info(args: argparse.Namespace) -> int:
    from skystack.engine.backend import get_backend
    from skystack.engine.io import read_meta

    import os

    if args.backend or os.environ.get("SKYSTACK_BACKEND"):
        # info needs no device, but an explicit request (flag or variable) is honoured
        get_backend(args.backend, quiet=args.quiet)
    from skystack.engine.session import split_inputs

    files = []
    for spec in args.files:  # files, folders, globs, or a session folder (all its kinds), as 'stack' takes
        s = split_inputs([spec])
        files.extend([*s.lights, *s.darks, *s.flats, *s.bias, *s.dark_flats])
    metas = [read_meta(p) for p in files]
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
    from skystack.tools.synth import SynthConfig, simulate
    from skystack.tools.synth_scene import tripod_config

    given = {"seed": args.seed, "n_lights": args.lights, "n_bias": args.bias, "n_darks": args.darks,
             "n_flats": args.flats, "n_dark_flats": args.dark_flats, "pattern": args.pattern,
             "file_format": args.format, "exposure_s": args.exposure, "interval_s": args.interval,
             "fov_deg": args.fov, "lens_k1": args.k1, "lens_k2": args.k2, "duration_min": args.duration}
    if args.size is not None:
        given["width"], given["height"] = _parse_size(args.size)
    if args.no_landscape:
        given["landscape"] = False
    kw = {k: v for k, v in given.items() if v is not None}
    if args.scene == "tripod":
        cfg = tripod_config(**kw)
    else:
        if "duration_min" in kw or "fov_deg" in kw or "lens_k1" in kw or "lens_k2" in kw:
            raise SkystackError("--duration, --fov, --k1 and --k2 need --scene tripod")
        defaults = {"width": 1600, "height": 1200, "exposure_s": 20.0}
        cfg = SynthConfig(**{**defaults, **kw})
    truth = simulate(cfg, Path(args.outdir), progress=not args.quiet)
    print(f"session: {args.outdir}\ntruth: {truth}")
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


def _stack_config(args: argparse.Namespace):
    from skystack.engine.stack import StackConfig, parse_size

    klo, khi = args.kappa if args.kappa else (None, None)
    return StackConfig(
        backend=args.backend, rejection=args.rejection, kappa_low=klo, kappa_high=khi,
        normalization=args.normalization, weighting=args.weighting, debayer=args.debayer,
        apply_wb=args.apply_wb, interpolation=args.interpolation, transform_model=args.model,
        framing=args.framing, foreground=args.foreground, save_mask=getattr(args, "save_mask", None),
        reference=args.reference, keep_best=args.keep_best, max_fwhm=args.max_fwhm,
        min_stars=args.min_stars, memory_limit=parse_size(args.memory_limit),
        store_dtype=args.store_dtype, workers=args.workers, dark_optimize=args.dark_optimize,
        cosmetic=args.cosmetic, cache_dir=args.cache_dir, quiet=args.quiet,
    )


_OUTPUT_SUFFIXES = {"preview": (".png", ".jpg", ".jpeg"), "fits": (".fits", ".fit", ".fts"),
                    "report": (".json",), "html": (".html", ".htm")}


def _outputs_for(out: str, args: argparse.Namespace) -> dict[str, str | None]:
    """OUT.tif, OUT.png, OUT.fits, OUT.json and OUT.html (``-o`` without a suffix gets ``.tif``)."""
    from skystack.engine.output import NON_TIFF_SUFFIXES

    base = Path(out)
    if base.suffix.lower() in NON_TIFF_SUFFIXES:
        raise SkystackError(f"-o {out}: -o names the 32-bit TIFF; use -o {base.with_suffix('.tif')} "
                            "(the preview, FITS, JSON and HTML report are written beside it)")
    if base.suffix.lower() not in (".tif", ".tiff"):
        base = base.with_name(base.name + ".tif")
    stem = str(base.with_suffix(""))
    paths = {"tiff": str(base)}
    for kind, default in (("preview", ".png"), ("fits", ".fits"), ("report", ".json"), ("html", ".html")):
        given = getattr(args, kind, None)
        if given and Path(given).suffix.lower() not in _OUTPUT_SUFFIXES[kind]:
            raise SkystackError(f"--{kind} {given}: expected a name ending in "
                                f"{' or '.join(_OUTPUT_SUFFIXES[kind])}")
        paths[kind] = given or stem + default
    return paths


def _check_outputs(paths: dict[str, str | None], files, args: argparse.Namespace, inputs) -> None:
    """Distinct, writable outputs with room for them, checked before any work."""
    from skystack.engine.io import read_meta
    from skystack.engine.output import check_outputs

    extra = [getattr(args, k, None) for k in ("picture", "linear_out", "tiff16")]
    try:
        h, w = read_meta(files.lights[0]).shape[-2:] if files.lights else (0, 0)
    except SkystackError:
        h, w = 0, 0
    # TIFF and FITS 12 B/px each (RGB float32), coverage 2, preview, HTML, picture: ~32 B/px in all
    check_outputs([p for p in [*paths.values(), *extra] if p], inputs=inputs, nbytes=32 * h * w)


def _run_stack(files, args: argparse.Namespace, out: str) -> int:
    from skystack.engine.report import summary_table, write_outputs
    from skystack.engine.stack import stack_session

    cfg = _stack_config(args)
    paths = _outputs_for(out, args)
    inputs = [*files.lights, *files.darks, *files.flats, *files.bias, *files.dark_flats]
    _check_outputs(paths, files, args, inputs)
    result = stack_session(files, cfg)
    written = write_outputs(result, inputs=inputs, linked=not args.unlinked, **paths)
    if getattr(args, "picture", None):
        from skystack.engine.finish import finish_image, write_finished

        fin = finish_image(result.image, count=result.coverage, n_frames=result.n_used, landscape=result.landscape,
                           config=_finish_config(args))
        pic = write_finished(fin, args.picture, linear=args.linear_out, tiff16=args.tiff16,
                             inputs=inputs, quality=args.quality)
        written.update({f"picture {k}" if k != "picture" else k: v for k, v in pic.items()})
        _print_finish(fin, {}, quiet=True)
    if not args.quiet:
        _console().print(summary_table(result, written))
    for kind, path in written.items():  # paths on stdout, everything else on stderr
        print(f"{kind}: {path}")
    return 0


def _cmd_stack(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from skystack.engine.backend import get_backend
    from skystack.engine.session import resolve_inputs, split_inputs

    get_backend(args.backend, quiet=args.quiet)  # a missing GPU fails before any work
    files = split_inputs(args.lights)
    extra = {}
    for name, kind in (("darks", "darks"), ("flats", "flats"), ("bias", "bias"), ("dark_flats", "dark-flats")):
        specs = getattr(args, name)
        if specs:
            extra[name] = tuple(resolve_inputs(specs, what=kind))
    files = replace(files, **extra)
    return _run_stack(files, args, args.output)


def _cmd_demo(args: argparse.Namespace) -> int:
    import tempfile

    from skystack.engine.session import discover_session
    from skystack.tools.synth import SynthConfig, simulate

    from skystack.engine.backend import get_backend

    get_backend(args.backend, quiet=args.quiet)  # a missing GPU fails before any work
    outdir = Path(args.outdir) if args.outdir else Path(tempfile.mkdtemp(prefix="skystack-demo-"))
    w, h = _parse_size(args.size)
    cfg = SynthConfig(seed=args.seed, width=w, height=h, n_lights=args.lights, n_bias=6, n_darks=6,
                      n_flats=6, n_dark_flats=0)
    console = _console()
    console.print(f"synthesizing a {args.lights}-light night ({w}x{h}) in {outdir}")
    simulate(cfg, outdir / "session", progress=not args.quiet)
    files = discover_session(outdir / "session")
    out = str(outdir / "stack.tif")
    if not args.picture:
        args.picture = str(outdir / "picture.jpg")
    return _run_stack(files, args, out)


def _cmd_master(args: argparse.Namespace) -> int:
    from skystack.engine.backend import get_backend
    from skystack.engine.masters import MasterConfig, master_command
    from skystack.engine.session import resolve_inputs

    backend = get_backend(args.backend, quiet=args.quiet)  # a missing GPU fails before any work
    files = resolve_inputs(args.files, what=f"{args.kind} frames")
    klo, khi = args.kappa
    cfg = MasterConfig(method=args.method, kappa_low=klo, kappa_high=khi, flat_shrink=not args.no_shrink)
    m = master_command(args.kind, files, args.output, config=cfg, cache_dir=args.cache_dir, backend=backend)
    if not args.quiet:
        _console().print(f"combined {len(files)} {args.kind} frames")
        if m.meta.flat_noise is not None:
            noise, prnu, resid = (100.0 * v for v in m.meta.flat_noise)
            _console().print(f"flat pixel noise {noise:.2f} % -> {resid:.2f} % (pixel response {prnu:.2f} %)")
    print(f"master {args.kind}: {args.output}")
    return 0


def _finish_options(p: argparse.ArgumentParser, *, for_stack: bool = False) -> None:
    from skystack.engine.background import MODELS
    from skystack.engine.finish import BACKGROUND_MODES, FinishConfig

    c = FinishConfig()  # the defaults live there, not here
    g = p.add_argument_group("finishing" + (" (with --picture)" if for_stack else ""))
    if for_stack:
        g.add_argument("--picture", metavar="PATH",
                       help="also write a finished picture: .jpg/.png (8-bit) or .tif (16-bit)")
    g.add_argument("--no-crop", action="store_true", help="keep the edges that not every frame covered")
    g.add_argument("--crop-fraction", type=float, default=c.crop_fraction,
                   help="keep pixels covered by at least this fraction of the frames (default %(default)s)")
    g.add_argument("--background", default=c.background, choices=BACKGROUND_MODES,
                   help="gradient removal: subtract (light pollution), divide (vignetting), none")
    g.add_argument("--bg-model", default=c.bg_model, choices=MODELS, help="background model")
    g.add_argument("--bg-degree", type=int, default=c.bg_degree, choices=(1, 2, 3, 4), help="polynomial degree")
    g.add_argument("--bg-grid", type=int, default=c.bg_grid, help="background sample boxes along the longer side")
    g.add_argument("--bg-reject", "--bg-tolerance", dest="bg_reject", type=float, default=c.bg_reject,
                   help="reject sample boxes this many sigmas off (galaxies, nebulae)")
    g.add_argument("--bg-smoothing", type=float, default=c.bg_smoothing, help="RBF smoothing (0 = interpolate)")
    g.add_argument("--no-neutralize", action="store_true", help="keep the sky background's colour")
    g.add_argument("--no-star-wb", action="store_true", help="no white balance with the stars as reference")
    g.add_argument("--target-background", type=float, default=c.target_background,
                   help="sky level after the stretch (0..1)")
    g.add_argument("--black-point", type=float, default=c.black_point, help="black point on the stretched image (0..1)")
    g.add_argument("--contrast", type=float, default=c.contrast, help="S-curve strength 0..1 (0 = none)")
    g.add_argument("--saturation", type=float, default=c.saturation, help="colour saturation (1 = unchanged)")
    g.add_argument("--linear-out", metavar="PATH",
                   help="also write the cropped, background-extracted, colour-calibrated linear 32-bit TIFF")
    g.add_argument("--tiff16", metavar="PATH", help="also write a 16-bit TIFF of the picture")
    g.add_argument("--quality", type=int, default=92, help="JPEG quality (default 92)")


def _finish_config(args: argparse.Namespace):
    from skystack.engine.finish import FinishConfig

    return FinishConfig(
        crop=not args.no_crop, crop_fraction=args.crop_fraction, background=args.background,
        bg_model=args.bg_model, bg_degree=args.bg_degree, bg_grid=args.bg_grid, bg_reject=args.bg_reject,
        bg_smoothing=args.bg_smoothing, neutralize=not args.no_neutralize, white_balance=not args.no_star_wb,
        target_background=args.target_background, black_point=args.black_point, contrast=args.contrast,
        saturation=args.saturation,
    )


def _cmd_finish(args: argparse.Namespace) -> int:
    from skystack.engine.finish import finish_command

    out = args.output or str(Path(args.stack).with_suffix("")) + "_finished.jpg"
    res, written = finish_command(args.stack, out, config=_finish_config(args), coverage=args.coverage,
                                  linear=args.linear_out, tiff16=args.tiff16, report=args.report,
                                  quality=args.quality)
    _print_finish(res, written, quiet=args.quiet)
    return 0


def _print_finish(res, written: dict, *, quiet: bool) -> None:
    from rich.text import Text

    con = _console()
    for w in res.warnings:
        con.print(Text.assemble(("warning: ", "yellow"), w))
    for k, v in written.items():  # paths on stdout
        print(f"{k}: {v}")


def _cmd_bench(args: argparse.Namespace) -> int:
    from skystack.tools.bench import bench_command

    return bench_command(args)


def _cmd_batch(args: argparse.Namespace) -> int:
    from skystack.engine.batch import CalibrationMatchConfig, batch_command

    ns = argparse.Namespace(**vars(args))
    ns.workers = args.decode_threads  # StackConfig.workers = decoder threads; --workers = sessions at once
    match = CalibrationMatchConfig(temperature_tolerance_c=args.temperature_tolerance,
                                   exposure_tolerance=args.exposure_tolerance,
                                   scale_darks=not args.no_dark_scaling)
    return batch_command(args.archive, args.output, workers=args.workers, scheduler=args.scheduler,
                         dry_run=args.dry_run, calibration_library=args.calibration,
                         stack_config=_stack_config(ns), match=match, quiet=args.quiet)


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


def _stack_options(p: argparse.ArgumentParser, *, batch: bool = False) -> None:
    from skystack.engine.combine import kappa_help
    from skystack.engine.memory import DEFAULT_STORE_RAM
    from skystack.engine.stack import StackConfig, option_choices

    c, choices = StackConfig(), option_choices()  # defaults and choices live there, not here
    g = p.add_argument_group("stacking")
    if not batch:  # a batch names each session's files itself
        g.add_argument("--preview", help="stretched 8-bit PNG/JPEG (default OUT.png)")
        g.add_argument("--fits", help="FITS output (default OUT.fits)")
        g.add_argument("--report", help="JSON report (default OUT.json)")
        g.add_argument("--html", help="HTML report with plots (default OUT.html)")
    g.add_argument("--rejection", default=c.rejection, choices=choices["rejection"],
                   help="how outliers (satellites, planes, hot pixels) are rejected before averaging; auto "
                        "picks by the number of frames: median up to 4, winsorized from 5, gesd from 10 "
                        "(default: %(default)s)")
    g.add_argument("--kappa", nargs=2, type=float, default=None, metavar=("LOW", "HIGH"),
                   help=f"rejection thresholds (default per method: {kappa_help()})")
    g.add_argument("--normalization", default=c.normalization, choices=choices["normalization"],
                   help="how frames are brought to the reference's sky level and contrast before combining "
                        "(default: %(default)s)")
    g.add_argument("--weighting", default=c.weighting, choices=choices["weighting"],
                   help="frame weights: noise (inverse noise variance, measured before normalisation), psf "
                        "(star peak over noise), stars (quality score) or none (default: %(default)s)")
    g.add_argument("--memory-limit", help="memory the whole run may take above the interpreter's own, e.g. 4GB: "
                   "the frame store spills to disk beyond half of it, fewer frames are processed at once and "
                   f"tiles shrink to fit; without it the store spills above {DEFAULT_STORE_RAM >> 20} MiB "
                   "(default: half the free memory)")
    g.add_argument("--store-dtype", default=c.store_dtype, choices=choices["store_dtype"],
                   help="type of the frame store when its float32 frames do not fit its RAM share, or on a GPU "
                        "its share of device memory (then there if they fit so, else in RAM or spilled to disk): "
                        "float16 halves it and rounds at 1/2048 of a value, far below a light's noise "
                        "(default: %(default)s)")
    g.add_argument("--reference", help="reference light (default: best score)")
    g.add_argument("--keep-best", type=float, metavar="PERCENT",
                   help="keep the best PERCENT (0-100] of frames by star quality (default: all usable frames)")
    g.add_argument("--max-fwhm", type=float, help="reject frames with a larger median FWHM in pixels (default: none)")
    g.add_argument("--min-stars", type=int, default=c.min_stars, help="reject frames with fewer stars (default: %(default)s)")
    g.add_argument("--debayer", default=c.debayer, choices=choices["debayer"],
                   help="colour reconstruction: RCD (sharp, ~0.7x bilinear's colour noise; sharp stars gain "
                        "0.5-2 %% of flux), bilinear (linear in the flux: for photometry) or super-pixel (half "
                        "size) (default: %(default)s)")
    g.add_argument("--apply-wb", action=argparse.BooleanOptionalAction, default=c.apply_wb,
                   help="apply the camera white balance (default: %(default)s)")
    g.add_argument("--no-wb", dest="apply_wb", action="store_false", help="the same as --no-apply-wb")
    g.add_argument("--interpolation", default=c.interpolation, choices=choices["interpolation"],
                   help="resampling when frames are aligned (default: %(default)s)")
    g.add_argument("--transform-model", "--model", dest="model", default=c.transform_model,
                   choices=choices["transform_model"],
                   help="alignment transform; auto picks the simplest that fits held-out stars, "
                        "homography+radial follows a wide, distorted lens (default: %(default)s)")
    g.add_argument("--framing", default=c.framing, choices=choices["framing"],
                   help="output field: the reference frame's, only what every frame covers, "
                        "or all the sky any frame saw (default: %(default)s)")
    g.add_argument("--foreground", default=c.foreground, metavar="auto|none|MASK.png",
                   help="landscape under a moving sky: auto-detect it, none, or a mask (white = landscape); "
                        "it is stacked unregistered and blended along the horizon (default: %(default)s)")
    if not batch:
        g.add_argument("--save-mask", metavar="PATH", help="write the landscape mask used (PNG) to correct it")
    g.add_argument("--dark-optimize", action="store_true", help="scale the dark to minimise noise")
    g.add_argument("--cosmetic", action=argparse.BooleanOptionalAction, default=c.cosmetic,
                   help="hot/cold pixel correction (default: %(default)s)")
    if batch:
        g.add_argument("--decode-threads", type=int, help="decoder threads per session")
        g.add_argument("--cache-dir", help="master cache folder (default OUT/masters)")
    else:
        g.add_argument("--unlinked", action="store_true", help="stretch the preview's channels separately")
        g.add_argument("--workers", type=int, help="decoder threads")
        g.add_argument("--cache-dir", help="master cache folder")


def _subcommand(sub, name: str, help: str, func) -> argparse.ArgumentParser:
    """Add the ``name`` subcommand, with the common options, run by ``func``."""
    p = sub.add_parser(name, help=help)
    _common(p)
    p.set_defaults(func=func)
    return p


def _add_info(sub) -> None:
    p = _subcommand(sub, "info", "print frame metadata", _cmd_info)
    p.add_argument("files", nargs="+", help="frame files, folders, globs or a session folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_synth(sub) -> None:
    p = _subcommand(sub, "synth", "write a synthetic night session with truth.json", _cmd_synth)
    p.add_argument("outdir")
    p.add_argument("--scene", default="telescope", choices=("telescope", "tripod"),
                   help="telescope: a small field turning about an off-frame pole (default); tripod: a phone "
                        "on a tripod for an hour, wide barrel-distorted lens, landscape with lights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT (default 1600x1200; tripod 960x720)")
    p.add_argument("--lights", type=int, default=None, help="light frames (default 12; tripod 40)")
    for flag in ("--bias", "--darks", "--flats", "--dark-flats"):
        p.add_argument(flag, type=int, default=None)
    p.add_argument("--pattern", default=None, choices=("RGGB", "BGGR", "GRBG", "GBRG"))
    p.add_argument("--format", default=None, choices=("dng", "fits"))
    p.add_argument("--exposure", type=float, default=None, help="light exposure in s (default 20; tripod 10)")
    p.add_argument("--interval", type=float, default=None, help="cadence in s (default exposure + 2)")
    p.add_argument("--duration", type=float, default=None, help="tripod: session length in minutes (60)")
    p.add_argument("--fov", type=float, default=None, help="tripod: field of view across, degrees (66)")
    p.add_argument("--k1", type=float, default=None, help="tripod: radial distortion k1 (-0.045, barrel)")
    p.add_argument("--k2", type=float, default=None, help="tripod: radial distortion k2 (0)")
    p.add_argument("--no-landscape", action="store_true", help="tripod: sky only")


def _add_plan(sub) -> None:
    p = _subcommand(sub, "plan", "exposure calculator (500 and NPF rules)", _cmd_plan)
    p.add_argument("--focal-length", type=float, help="focal length in mm")
    p.add_argument("--crop-factor", type=float, help="sensor crop factor (1 = full frame)")
    p.add_argument("--aperture", type=float, help="f-number, e.g. 1.8")
    p.add_argument("--pixel-pitch", type=float, help="pixel pitch in micrometres")
    p.add_argument("--declination", type=float, help="target declination in degrees")
    p.add_argument("--from", dest="from_file", help="read settings from a frame's EXIF/FITS header")
    p.add_argument("--json", action="store_true")


def _add_stack(sub) -> None:
    p = _subcommand(sub, "stack", "calibrate, register and stack a session", _cmd_stack)
    p.add_argument("lights", nargs="+", help="light files, folders or globs, or one session folder")
    for flag in ("--darks", "--flats", "--bias", "--dark-flats"):
        p.add_argument(flag, nargs="+", metavar="PATH")
    p.add_argument("-o", "--output", default="stack.tif",
                   help="32-bit float TIFF, .tif (default stack.tif); OUT.png, OUT.fits, OUT.json and "
                        "OUT.html are written beside it")
    _stack_options(p)
    _finish_options(p, for_stack=True)


def _add_demo(sub) -> None:
    p = _subcommand(sub, "demo", "synthesize a small night and stack it", _cmd_demo)
    p.add_argument("--outdir", help="where to write (default: a new temporary folder)")
    p.add_argument("--size", default="1200x800", help="WIDTHxHEIGHT of the synthetic sensor")
    p.add_argument("--lights", type=int, default=16)
    p.add_argument("--seed", type=int, default=1)
    _stack_options(p)
    _finish_options(p, for_stack=True)


def _add_finish(sub) -> None:
    p = _subcommand(sub, "finish", "crop, remove the gradient, calibrate colour and stretch a stack", _cmd_finish)
    p.add_argument("stack", help="stack TIFF or FITS written by 'skystack stack'")
    p.add_argument("-o", "--output", help="picture: .jpg/.png (8-bit) or .tif (16-bit) (default STACK_finished.jpg)")
    p.add_argument("--coverage", metavar="FITS",
                   help="FITS with the stack's COVERAGE extension (default: the stack's own FITS beside it)")
    p.add_argument("--report", metavar="JSON", help="also write a JSON summary of what was done")
    _finish_options(p)


def _add_master(sub) -> None:
    p = _subcommand(sub, "master", "build a master bias/dark/flat/dark-flat", _cmd_master)
    p.add_argument("kind", choices=("bias", "dark", "flat", "dark-flat"))
    p.add_argument("files", nargs="+")
    p.add_argument("-o", "--output", required=True, help="master FITS to write")
    p.add_argument("--method", choices=("sigma", "median", "mean"), default="sigma")
    p.add_argument("--kappa", nargs=2, type=float, default=(3.0, 3.0), metavar=("LOW", "HIGH"))
    p.add_argument("--no-shrink", action="store_true",
                   help="flat: keep the plain combine (by default the flats' own pixel noise is shrunk by its "
                        "Wiener factor, measured from the flats; the sensor's pixel response stays)")
    p.add_argument("--cache-dir", help="master cache folder (default ~/.cache/skystack)")


def _add_bench(sub) -> None:
    from skystack.tools.bench import add_bench_arguments

    add_bench_arguments(_subcommand(sub, "bench", "benchmark the CPU and GPU paths", _cmd_bench))


def _add_batch(sub) -> None:
    p = _subcommand(sub, "batch", "reprocess a whole archive (resumable, parallel)", _cmd_batch)
    p.add_argument("archive", help="folder holding the sessions")
    p.add_argument("-o", "--output", required=True,
                   help="output folder: one sub-folder per session, journal.jsonl, summary.csv, masters/")
    p.add_argument("--workers", type=int,
                   help="sessions at once in local processes (default: half the CPU cores, or one per GPU, each "
                        "process on its own device; 0 = in this process)")
    p.add_argument("--scheduler", metavar="ADDRESS", help="run on a dask.distributed cluster, e.g. tcp://host:8786")
    p.add_argument("--dry-run", action="store_true",
                   help="show the sessions, their frame counts and the masters each gets; write nothing")
    p.add_argument("--calibration", metavar="DIR",
                   help="calibration library: bias/darks/flats/darkflats frames or masters of any cameras")
    p.add_argument("--temperature-tolerance", type=float, default=3.0, metavar="C",
                   help="largest dark temperature difference in C (default 3)")
    p.add_argument("--exposure-tolerance", type=float, default=0.05, metavar="FRACTION",
                   help="largest relative difference of a dark's exposure (default 0.05)")
    p.add_argument("--no-dark-scaling", action="store_true",
                   help="never scale a dark of another exposure (with a bias it is scaled by default)")
    _stack_options(p, batch=True)


#: The subcommands, in the order ``skystack --help`` lists them.
_SUBCOMMANDS = (_add_info, _add_synth, _add_plan, _add_stack, _add_demo, _add_finish, _add_master, _add_bench,
                _add_batch)


def build_parser() -> argparse.ArgumentParser:
    """Return the ``skystack`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="skystack",
        description="Calibrate, register and stack astrophotography frames on the CPU or an NVIDIA GPU.")
    parser.add_argument("--version", action="version", version=f"skystack {__version__}")
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def prepare_process() -> None:
    """What a skystack process sets before NumPy loads: OpenBLAS on one thread, no huge pages asked for.

    * skystack runs its own threads, per frame and per tile; OpenBLAS's pool (a
      thread per core, for registration's few small matrix products) only
      spins beside them: 2-3 % of a 2-core stack's CPU, 0.35 s of a real
      Seestar stack's 8.4 s.
    * NumPy asks the kernel for transparent huge pages on every large array;
      where the kernel then compacts memory on the fault (``defrag=madvise``,
      Debian's and Ubuntu's default), a frame store's first fill costs twice as
      long (21 against 10 ms a 2 MP frame here) and the system time of a stack
      doubles. The frames' buffers are reused (``memory.keep_freed_memory``), so
      few pages are faulted in at all.

    Variables already set are kept; once NumPy is loaded this changes nothing
    but child processes.
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status (0 ok, 2 user error)."""
    prepare_process()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USER_ERROR
    with _LineHandler():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
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
        where = f"{exc.filename}: " if exc.filename else ""
        _error_line(f"{where}{exc.strerror or exc}; check the path, its permissions and the free space")
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
