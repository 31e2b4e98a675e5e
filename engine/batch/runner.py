"""Running a batch plan, its summary, index and tables, and the ``batch`` command."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as _dt
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence


from skystack.engine.errors import OutputError
from skystack.engine.stack import StackConfig
from skystack.engine.batch.executors import _Dask, _Inline, _Pool, _default_workers
from skystack.engine.batch.journal import _append_journal, _is_done, _locked, _remove_partials, read_journal
from skystack.engine.batch.planning import plan_batch
from skystack.engine.batch.records import BatchPlan, BatchResult, CalibrationGroup, CalibrationMatchConfig, SUMMARY_COLUMNS, SUMMARY_NAME, SessionPlan, _CAL_KINDS, _MASTERS_DIR, _rel
from skystack.engine.batch.tasks import _master_task, _session_task

# ----------------------------------------------------------------------------- running


def _master_specs(sessions: Sequence[SessionPlan], cache_dir: str, backend: str | None
                  ) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]], dict[str, list[str]]]:
    """Unique master builds (wave 1: bias, dark-flat; wave 2: dark, flat) and who needs each."""
    wave1: dict[str, dict] = {}
    wave2: dict[str, dict] = {}
    needs: dict[str, list[str]] = {}

    def frames(files: tuple[Path, ...]) -> list[str] | None:
        return [str(p) for p in files] if files else None

    for s in sessions:
        f = s.files
        b, df = frames(f.bias), frames(f.dark_flats)
        cdir = s.config.cache_dir or cache_dir
        specs = []
        if b and not (len(f.bias) == 1 and s.calibration["bias"] and s.calibration["bias"].master):
            specs.append((wave1, {"kind": "bias", "bias": b, "cache_dir": cdir}))
        if df and not (len(f.dark_flats) == 1 and s.calibration["dark_flats"] and s.calibration["dark_flats"].master):
            specs.append((wave1, {"kind": "dark_flats", "dark_flats": df, "cache_dir": cdir}))
        if f.darks and not (s.calibration["darks"] and s.calibration["darks"].master):
            specs.append((wave2, {"kind": "darks", "files": frames(f.darks), "bias": b, "cache_dir": cdir}))
        if f.flats and not (s.calibration["flats"] and s.calibration["flats"].master):
            specs.append((wave2, {"kind": "flats", "files": frames(f.flats), "bias": None if df else b,
                                  "dark_flats": df, "cache_dir": cdir}))
        for wave, spec in specs:
            spec["backend"] = s.config.backend or backend
            key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
            wave.setdefault(key, spec)
            needs.setdefault(key, []).append(s.name)
    return list(wave1.items()), list(wave2.items()), needs


def _summary_row(plan: SessionPlan, entry: dict[str, Any] | None) -> dict[str, Any]:
    row = {c: None for c in SUMMARY_COLUMNS}
    row.update(session=plan.name, object=plan.object, camera=plan.lights.camera,
               date=None if plan.lights.time is None else plan.lights.time.date().isoformat(),
               frames_in=plan.lights.count)
    if entry is None:
        row.update(status="not run", note="")
        return row
    row.update(entry.get("row") or {})
    row["time_s"] = entry.get("time_s")
    row["status"] = entry.get("status")
    if entry.get("status") != "done":
        row["note"] = entry.get("error", "")
    return row


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return format(v, spec or ".6g")
    return str(v)


def write_summary_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> Path:
    """Write the archive summary (:data:`SUMMARY_COLUMNS`) atomically."""
    from skystack.engine.output import atomic_path

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SUMMARY_COLUMNS)
    fmt = {"total_exposure_s": ".1f", "noise": ".6g", "fwhm_px": ".3f", "time_s": ".2f"}
    for r in rows:
        w.writerow([_fmt(r.get(c), fmt.get(c, "")) for c in SUMMARY_COLUMNS])
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    return Path(path)


def run_batch(plan: BatchPlan, *, workers: int | None = None, scheduler: str | None = None,
              quiet: bool = False, console: Any = None) -> BatchResult:
    """Stack every session of ``plan`` that is not done yet; journal and summarise.

    Parameters
    ----------
    plan : BatchPlan
        From :func:`plan_batch`.
    workers : int, optional
        Local worker processes (default: 1 on the GPU, else half the CPU
        cores, at most the number of sessions); 0 runs in this process.
        Ignored with ``scheduler``.
    scheduler : str, optional
        ``dask.distributed`` scheduler address (``tcp://host:8786``).
    quiet : bool
        No progress lines.
    console : rich.console.Console, optional
        Where progress goes (default stderr).

    Returns
    -------
    BatchResult

    Raises
    ------
    OutputError
        ``OUT`` cannot be written or another batch holds it.
    """
    from skystack.engine.backend import get_backend, gpu_devices

    out = plan.out_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create the output folder ({exc.strerror})") from exc
    say = _printer(console, quiet)
    result = BatchResult(rows=[])
    with _locked(out):
        n_part = _remove_partials(sorted({out, out / _MASTERS_DIR, *(s.out_dir for s in plan.sessions)}))
        if n_part:
            say(f"removed {n_part} temporary file(s) left by an interrupted run")
        last: dict[str, dict[str, Any]] = {}
        for e in read_journal(out):
            last[e["session"]] = e
        todo = [s for s in plan.sessions if not _is_done(last.get(s.name), s)]
        todo_names = {s.name for s in todo}
        result.skipped = [s.name for s in plan.sessions if s.name not in todo_names]
        if result.skipped:
            say(f"{len(result.skipped)} session(s) already done (journal), {len(todo)} to run")
        runnable = []
        for s in todo:
            if s.error is not None:
                _record_result(out, s, {"status": "failed", "error": s.error, "time_s": 0.0}, last, result, say)
            else:
                runnable.append(s)
        backend_name = plan.stack_config.backend
        gpu = False
        devices: list[str] = []
        if runnable and scheduler is None:
            gpu = get_backend(backend_name, quiet=True).is_gpu
            devices = gpu_devices() if gpu and workers != 0 else []
        if runnable:
            if scheduler:
                ex: Any = _Dask(scheduler)
            elif workers == 0:
                ex = _Inline()
            else:
                ex = _Pool(workers if workers is not None else _default_workers(len(runnable), gpu, len(devices)),
                           devices=devices)
            result.executor = ex.label
            try:
                n_workers = getattr(ex, "workers", 1)
                _run_sessions(ex, plan, runnable, last, result, say, gpu=gpu,
                              sharing=-(-n_workers // max(1, len(devices))))
            except KeyboardInterrupt:
                # what completed is journaled; the summary says what did not run
                rows = [_summary_row(s, last.get(s.name)) for s in plan.sessions]
                with contextlib.suppress(Exception):
                    write_summary_csv(out / SUMMARY_NAME, rows)
                    write_index(out / INDEX_NAME, rows)
                raise
            finally:
                ex.close()
        result.rows = [_summary_row(s, last.get(s.name)) for s in plan.sessions]
        result.summary_csv = write_summary_csv(out / SUMMARY_NAME, result.rows)
        write_index(out / INDEX_NAME, result.rows)
    return result


#: The batch's HTML index page, beside ``summary.csv``.
INDEX_NAME = "index.html"


def write_index(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> Path:
    """Write the batch's index page, linking each finished session's ``report.html``."""
    from skystack.engine.htmlreport import render_index
    from skystack.engine.output import write_text

    folder = Path(path).parent
    linked = []
    for r in rows:
        rel = f"{r['session']}/report.html"
        linked.append({**r, "report": rel if (folder / rel).is_file() else None})
    return write_text(path, render_index(linked, title=f"skystack batch: {folder.name}"))


def _printer(console: Any, quiet: bool) -> Callable[[str], None]:
    if quiet:
        return lambda msg: None
    if console is None:
        import sys

        from rich.console import Console

        console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)

    def say(msg: str) -> None:
        from rich.text import Text

        console.print(Text(msg), soft_wrap=True)

    return say


def _record_result(out: Path, s: SessionPlan, res: dict[str, Any], last: dict[str, dict[str, Any]],
            result: BatchResult, say: Callable[[str], None]) -> None:
    entry = {"session": s.name, "fingerprint": s.fingerprint, **res,
             "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    _append_journal(out, entry)
    last[s.name] = entry
    if res.get("status") == "done":
        result.ran.append(s.name)
        r = res.get("row") or {}
        say(f"done    {s.name}: {r.get('frames_used')}/{r.get('frames_in')} frames, "
            f"{res.get('time_s', 0.0):.1f} s" + (f" ({r['note']})" if r.get("note") else ""))
    else:
        result.failed.append(s.name)
        say(f"FAILED  {s.name}: {res.get('error')}")


def _run_sessions(ex: Any, plan: BatchPlan, runnable: list[SessionPlan], last: dict[str, dict[str, Any]],
                  result: BatchResult, say: Callable[[str], None], *, gpu: bool, sharing: int) -> None:
    """Build the masters, then stack the sessions, on ``ex``; on a GPU, ``sharing`` worker processes
    share each device (each session then gets that part of its memory budget)."""
    from skystack.engine.backend import get_backend

    cache_dir = str(plan.out_dir / _MASTERS_DIR)
    wave1, wave2, needs = _master_specs(runnable, cache_dir, plan.stack_config.backend)
    master_errors: dict[str, str] = {}

    def on_master(key: str, res: dict[str, Any]) -> None:
        result.masters_combined += int(res.get("combined", 0))
        if res.get("status") != "done":
            master_errors[key] = res.get("error", "master build failed")

    n_masters = len(wave1) + len(wave2)
    if n_masters:
        say(f"masters: {n_masters} to build or find in {cache_dir} ({ex.label})")
    ex.map(_master_task, wave1, on_master)
    ex.map(_master_task, [(k, s) for k, s in wave2], on_master)
    blocked: dict[str, str] = {}
    for key, err in master_errors.items():
        for name in needs.get(key, []):
            blocked.setdefault(name, f"calibration master failed: {err}")

    tasks = []
    by_name = {s.name: s for s in runnable}
    for s in runnable:
        if s.name in blocked:
            _record_result(plan.out_dir, s, {"status": "failed", "error": blocked[s.name], "time_s": 0.0},
                    last, result, say)
            continue
        cfg = dataclasses.replace(s.config, quiet=True)
        if gpu and sharing > 1 and cfg.memory_limit is None:
            # several sessions share one device: each gets its part of the budget
            cfg = dataclasses.replace(cfg, memory_limit=get_backend("gpu", quiet=True).memory_budget(None) // sharing)
        tasks.append((s.name, {
            "name": s.name, "files": s.files, "config": cfg, "outputs": s.outputs, "out_root": str(plan.out_dir),
            "fingerprint": s.fingerprint, "object": s.object,
            "calibration": {k: (None if g is None else _report_group(g)) for k, g in s.calibration.items()},
            "notes": list(s.notes),
            "settings_files": [_rel(p, plan.archive) for p in s.settings_files],
        }))
    if tasks:
        say(f"stacking {len(tasks)} session(s) ({ex.label})")

    def on_session(key: str, res: dict[str, Any]) -> None:
        result.masters_combined += int(res.get("masters_combined", 0))
        _record_result(plan.out_dir, by_name[key], res, last, result, say)

    ex.map(_session_task, tasks, on_session)


def _report_group(g: CalibrationGroup) -> dict[str, Any]:
    """The group as the report shows it (its file list is in the report's inputs already)."""
    d = g.to_dict()
    d.pop("files")
    return d


# ----------------------------------------------------------------------------- tables and the command


def plan_table(plan: BatchPlan, *, journal: Sequence[dict[str, Any]] = ()):
    """A rich Table of the plan: sessions, frame counts, matched masters, status."""
    from rich.table import Table

    last = {e["session"]: e for e in journal}
    t = Table(title=f"batch plan: {len(plan.sessions)} session(s) in {plan.archive}")
    for c in ("session", "lights", "camera", "exp s", "iso/gain", "temp C", "date", "bias", "darks", "flats",
              "dark-flats", "status"):
        t.add_column(c, overflow="fold")

    def cell(g: CalibrationGroup | None) -> str:
        if g is None:
            return "-"
        where = "own" if g.source == "session" else "lib"
        return f"{where} master" if g.master else f"{where} ({len(g.files)})"

    for s in plan.sessions:
        lt = s.lights
        iso = lt.iso if lt.iso is not None else lt.gain
        status = "error" if s.error else ("done" if _is_done(last.get(s.name), s) else "to run")
        t.add_row(s.name, str(lt.count), lt.camera or "?", _fmt(lt.exposure_s, "g"), _fmt(iso, "g"),
                  _fmt(lt.temperature_c, ".1f"), "" if lt.time is None else lt.time.date().isoformat(),
                  *(cell(s.calibration[k]) for k in _CAL_KINDS), status)
    return t


def plan_lines(plan: BatchPlan) -> list[str]:
    """The plan's details: which masters each session gets (and why not), errors, ignored library files."""
    names = {"bias": "bias", "darks": "darks", "flats": "flats", "dark_flats": "dark-flats"}
    lines = []
    for s in plan.sessions:
        if s.error:
            lines.append(f"{s.name}: ERROR {s.error}")
        for kind, g in s.calibration.items():
            if g is not None:
                lines.append(f"{s.name}: {names[kind]} <- {g.describe()}")
        lines.extend(f"{s.name}: {n}" for n in s.notes)
        if s.settings_files:
            lines.append(f"{s.name}: settings from " + ", ".join(_rel(p, plan.archive) for p in s.settings_files))
    lines.extend(f"library: {p}" for p in plan.problems)
    return lines


def batch_table(rows: Sequence[dict[str, Any]]):
    """A rich Table of the archive summary."""
    from rich.table import Table

    t = Table(title="skystack batch summary")
    heads = {"session": "session", "object": "object", "frames_used": "used", "frames_in": "in",
             "total_exposure_s": "exposure s", "noise": "noise", "fwhm_px": "FWHM px", "time_s": "time s",
             "status": "status", "note": "note"}
    for h in heads.values():
        t.add_column(h, overflow="fold")
    fmt = {"total_exposure_s": ".0f", "noise": ".3g", "fwhm_px": ".2f", "time_s": ".1f"}
    for r in rows:
        t.add_row(*(_fmt(r.get(k), fmt.get(k, "")) for k in heads))
    return t


def batch_command(archive: str | os.PathLike, out_dir: str | os.PathLike, *, workers: int | None = None,
                  scheduler: str | None = None, dry_run: bool = False,
                  calibration_library: str | os.PathLike | None = None,
                  stack_config: StackConfig = StackConfig(),
                  match: CalibrationMatchConfig = CalibrationMatchConfig(), quiet: bool = False) -> int:
    """``skystack batch ARCHIVE -o OUT``: plan, then stack every session not done yet.

    Parameters
    ----------
    archive, out_dir : path
        Archive folder and output folder.
    workers : int, optional
        Local worker processes (see :func:`run_batch`); 0 = in this process.
    scheduler : str, optional
        ``dask.distributed`` scheduler address; sessions run on that cluster.
    dry_run : bool
        Print the plan (sessions, frame counts, masters each gets, done or not)
        and write nothing.
    calibration_library : path, optional
        Folder tree of calibration frames / masters.
    stack_config : StackConfig
        Settings of every session (``skystack.toml`` files override them).
    match : CalibrationMatchConfig
        Calibration matching tolerances.
    quiet : bool
        Print nothing but errors (and the plan with ``dry_run``).

    Returns
    -------
    int
        0 when every session is done, 1 when at least one failed.
    """
    import sys

    from rich.console import Console

    out_console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    plan = plan_batch(archive, out_dir, calibration_library=calibration_library, stack_config=stack_config,
                      match=match)
    if dry_run:
        out_console.print(plan_table(plan, journal=read_journal(plan.out_dir)))
        for line in plan_lines(plan):
            out_console.print(line, markup=False, highlight=False, soft_wrap=True)
        return 0
    res = run_batch(plan, workers=workers, scheduler=scheduler, quiet=quiet)
    if not quiet:  # the table on stderr, the paths on stdout
        Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160).print(
            batch_table(res.rows))
    print(f"summary: {res.summary_csv}\nindex: {plan.out_dir / INDEX_NAME}")
    return 0 if res.ok else 1
