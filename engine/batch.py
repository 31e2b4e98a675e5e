"""Batch reprocessing of an archive: ``skystack batch ARCHIVE -o OUT``.

Sessions
--------
:func:`discover_sessions` walks the archive (sorted, hidden folders skipped).
A *session* is a folder with a ``lights/`` sub-folder (any spelling of
:data:`~skystack.engine.session.KIND_FOLDERS`, any case), read with
:func:`~skystack.engine.session.discover_session`, or a folder of FITS files
whose headers say ``IMAGETYP = LIGHT`` (Seestar, ASIAIR, NINA); FITS files of
that folder whose headers say bias/dark/flat/dark-flat become its own
calibration frames, and unreadable FITS files there count as lights (they are
reported as skipped). Folders named like a calibration kind (``darks/``...) are
never sessions, and the calibration library and ``OUT`` are skipped when they
lie inside the archive. RAW files carry no frame type, so a folder of RAW
lights needs a ``lights/`` sub-folder.

Calibration matching
--------------------
Calibration frames come from the session's own sub-folders (or its FITS files
typed bias/dark/flat/dark-flat) and from a calibration library folder
(:func:`scan_calibration`). A library frame's kind comes from its header
(``IMAGETYP``, or ``SSKIND`` for a skystack master FITS) or else from the name
of a folder above it (``bias/``, ``darks/``, ``flats/``, ``darkflats/``...).
Library frames are grouped by kind, folder, camera, shape, CFA pattern,
ISO/gain, filter and (darks, dark-flats) exposure; a group is split where
its sorted temperatures jump by more than the temperature tolerance (darks and
dark-flats) and where its capture times jump by more than
:attr:`CalibrationMatchConfig.night_gap_h`. A skystack master FITS is a group
of its own. :func:`match_calibration` then picks, for each session:

* **bias**: same camera, shape, pattern and ISO/gain.
* **darks**: as the bias, temperature within ``temperature_tolerance_c`` of the
  lights', and exposure within ``exposure_tolerance`` (relative); when none
  has the lights' exposure and a bias was matched, a dark of another exposure
  (it is bias-subtracted and scaled by the exposure ratio).
* **flats**: same camera, shape, pattern and filter (when both are known).
* **dark-flats**: same camera, shape, pattern and ISO/gain as the chosen flats
  and their exposure.

Among the candidates the session's own frames win (they are used when their
camera, shape and pattern fit); then the nearest capture date, then the
nearest temperature, then the most frames, then the folder name. An unknown
value (no temperature, ISO or date in the headers) never excludes a group.

Settings
--------
Every session is stacked with the same :class:`~skystack.engine.stack.StackConfig`,
overridden by ``skystack.toml`` files found from the archive root down to the
session's folder (deeper files win). A file holds :class:`StackConfig` field
names (dashes allowed) at the top level or in a ``[stack]`` table, e.g.::

    [stack]
    rejection = "winsorized"
    kappa = [2.5, 3.0]
    min-stars = 10

Outputs, journal and resuming
-----------------------------
Each session writes ``OUT/<session path>/<name>.tif``, ``.fits``, ``.png`` and
``report.json`` (atomically, through :func:`~skystack.engine.output.atomic_path`);
masters are built once per batch into ``OUT/masters/`` (the master cache,
unless ``StackConfig.cache_dir`` names another) before the sessions start, so
sessions sharing a calibration group share its master. When a session ends
its outcome is appended to ``OUT/journal.jsonl`` (one JSON line, flushed and
``fsync``-ed) with the session's *fingerprint*: SHA-256 of the skystack
version, the session name, the path, size and modification time (ns) of
every light and matched calibration file, the result-changing settings and
the master combine settings. A rerun skips the sessions whose last journal
line is ``done`` with the same fingerprint and whose output files still exist
with the recorded sizes; everything else (new, changed, failed, or killed
mid-way) runs again. Stale temporary files a killed run left in ``OUT``,
``OUT/masters`` and the session folders (``.NAME.XXXXXXXX.part``/``.tmp``) are
removed first, and a lock file keeps two batches out of one ``OUT``.

Determinism: the TIFF, FITS, PNG and ``report.json`` of a session are a pure
function of its inputs and settings (byte-identical between runs, output
folders and executors with the same software and backend): the FITS has no ``DATE`` card (it carries
``SSFPRINT``, the fingerprint), and the facts of one run (creation time,
stage timings, throughput, memory, machine) go to the journal line instead of
the report; the report's paths below ``OUT`` are relative to ``OUT``.
``summary.csv`` has one row per session (session, object, camera, date,
frames used, frames in, total exposure, stack noise, stack FWHM, processing
time, status, note); its ``time_s`` column is the one thing that differs
between runs.

Parallelism
-----------
Locally, sessions run in a process pool (``spawn``; ``workers`` processes,
default half the CPU cores; ``workers=0`` runs them in this process). On the
GPU backend the pool has one process unless ``workers`` says more, and then
each session gets ``1/workers`` of the GPU's memory budget (unless
``StackConfig.memory_limit`` is set), so sessions never fight for one device.
A worker process that dies (crash, out of memory) fails only its session: the
sessions it left are run again one at a time. With ``scheduler`` (a
``dask.distributed`` address such as ``tcp://host:8786``) masters and sessions
run as tasks on the cluster; the workers must see the archive, the library
and ``OUT`` at the same paths and have skystack installed (one worker per GPU).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as _dt
import hashlib
import io
import json
import math
import os
import platform
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from skystack import __version__
from skystack.engine.errors import InputNotFound, OutputError, SkystackError
from skystack.engine.session import KIND_FOLDERS, SessionFiles
from skystack.engine.stack import StackConfig, option_choices

__all__ = [
    "CalibrationMatchConfig",
    "CalibrationGroup",
    "LightSummary",
    "SessionPlan",
    "BatchPlan",
    "BatchResult",
    "JOURNAL_NAME",
    "SUMMARY_NAME",
    "SUMMARY_COLUMNS",
    "discover_sessions",
    "scan_calibration",
    "summarize_lights",
    "match_calibration",
    "session_settings",
    "plan_batch",
    "run_batch",
    "read_journal",
    "batch_command",
]

#: Journal file in the output folder.
JOURNAL_NAME = "journal.jsonl"
#: Archive summary in the output folder.
SUMMARY_NAME = "summary.csv"
#: Columns of :data:`SUMMARY_NAME`.
SUMMARY_COLUMNS = ("session", "object", "camera", "date", "frames_used", "frames_in", "total_exposure_s",
                   "noise", "fwhm_px", "time_s", "status", "note")
#: Settings file looked up from the archive root down to each session.
SETTINGS_NAME = "skystack.toml"
#: Bump when the batch's outputs change for the same inputs (invalidates journals).
BATCH_FORMAT = "1"

_LOCK_NAME = ".skystack-batch.lock"
_MASTERS_DIR = "masters"
#: SessionFiles field -> master kind of :mod:`skystack.engine.masters`.
_MASTER_KIND = {"bias": "bias", "darks": "dark", "flats": "flat", "dark_flats": "dark-flat"}
#: FITS IMAGETYP (canonical, see :mod:`skystack.engine.io`) -> SessionFiles field.
_IMAGETYP_KIND = {"bias": "bias", "dark": "darks", "flat": "flats", "darkflat": "dark_flats"}
_CAL_KINDS = ("bias", "darks", "flats", "dark_flats")
#: StackConfig fields that do not change the stacked result (left out of the fingerprint).
_NOT_IN_FINGERPRINT = ("quiet", "workers", "queue_size", "cache_dir", "spill_dir", "memory_limit")
#: StackConfig fields a skystack.toml may not set (the batch owns them).
_NOT_IN_TOML = ("cache_dir", "spill_dir", "quiet")
#: Report keys that change from run to run; they go to the journal instead.
_VOLATILE_REPORT_KEYS = ("created", "timings_s", "throughput", "memory", "machine")
_LIGHT_SAMPLE = 9  # lights whose headers describe a session (evenly spaced)
_OWN_SAMPLE = 5  # own calibration frames read per kind


# ----------------------------------------------------------------------------- configs and records


@dataclass(frozen=True, kw_only=True)
class CalibrationMatchConfig:
    """How library calibration frames are matched to a session's lights.

    Attributes
    ----------
    temperature_tolerance_c : float
        Largest sensor temperature difference of a dark (and the temperature
        jump that splits a group of darks or dark-flats).
    exposure_tolerance : float
        Largest relative exposure difference of a dark (to the lights) or
        dark-flat (to the flats) counted as the same exposure.
    scale_darks : bool
        Without a dark of the lights' exposure, use a dark of another exposure
        when a bias was matched (the dark is then scaled by the exposure ratio).
    night_gap_h : float
        Capture-time gap (hours) that splits a library folder's frames into
        separate groups (nights).
    """

    temperature_tolerance_c: float = 3.0
    exposure_tolerance: float = 0.05
    scale_darks: bool = True
    night_gap_h: float = 12.0


@dataclass(frozen=True, kw_only=True)
class CalibrationGroup:
    """Calibration frames that make one master (or one master FITS).

    Attributes
    ----------
    kind : {"bias", "darks", "flats", "dark_flats"}
        Field of :class:`~skystack.engine.session.SessionFiles` it fills.
    files : tuple of Path
        The frames (sorted), or one skystack master FITS.
    source : {"session", "library"}
        The session's own frames or the calibration library.
    folder : str
        Folder (relative to the library or the session) for messages.
    master : bool
        ``files`` is one skystack master FITS.
    camera, shape, pattern, iso, gain, exposure_s, temperature_c, time, filter :
        What the headers say (median exposure and temperature, median capture
        time as naive UTC); None when unknown.
    """

    kind: str
    files: tuple[Path, ...]
    source: str
    folder: str
    master: bool = False
    camera: str | None = None
    shape: tuple[int, ...] = ()
    pattern: str | None = None
    iso: float | None = None
    gain: float | None = None
    exposure_s: float | None = None
    temperature_c: float | None = None
    time: _dt.datetime | None = None
    filter: str | None = None

    def describe(self) -> str:
        """``"library darks/2025-03 (5 frames, 20 s, ISO 1600, 15.0 C, 2025-03-01)"``."""
        parts = [f"{len(self.files)} frame{'s' if len(self.files) != 1 else ''}" if not self.master else "master"]
        if self.exposure_s is not None:
            parts.append(f"{self.exposure_s:g} s")
        if self.iso is not None:
            parts.append(f"ISO {self.iso:g}")
        elif self.gain is not None:
            parts.append(f"gain {self.gain:g}")
        if self.temperature_c is not None:
            parts.append(f"{self.temperature_c:.1f} C")
        if self.time is not None:
            parts.append(self.time.date().isoformat())
        return f"{self.source} {self.folder} ({', '.join(parts)})"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (for the plan and the report)."""
        return {
            "source": self.source, "folder": self.folder, "master": self.master,
            "frames": len(self.files), "files": [str(p) for p in self.files],
            "camera": self.camera, "shape": list(self.shape), "pattern": self.pattern, "iso": self.iso,
            "gain": self.gain, "exposure_s": self.exposure_s, "temperature_c": self.temperature_c,
            "date": None if self.time is None else self.time.isoformat(timespec="seconds"),
            "filter": self.filter,
        }


@dataclass(frozen=True, kw_only=True)
class LightSummary:
    """What a session's light headers say (majority or median of a sample).

    Attributes
    ----------
    count : int
        Light files.
    readable : int
        Sampled lights whose header could be read.
    camera, shape, pattern : majority among the readable sample.
    iso, gain, exposure_s, temperature_c : float or None
        Medians.
    time : datetime or None
        Median capture time (naive UTC).
    object : str or None
        Majority ``OBJECT`` header.
    filter : str or None
        Majority ``FILTER`` header.
    """

    count: int
    readable: int
    camera: str | None = None
    shape: tuple[int, ...] = ()
    pattern: str | None = None
    iso: float | None = None
    gain: float | None = None
    exposure_s: float | None = None
    temperature_c: float | None = None
    time: _dt.datetime | None = None
    object: str | None = None
    filter: str | None = None


@dataclass(frozen=True, kw_only=True)
class SessionPlan:
    """One session of a batch: its files, matched calibration, settings and outputs.

    Attributes
    ----------
    name : str
        Path of the session folder relative to the archive (POSIX), or the
        archive's name when the archive itself is the session.
    files : SessionFiles
        Lights plus the matched calibration frames (what gets stacked).
    lights : LightSummary
        Header summary of the lights.
    calibration : dict
        Kind -> matched :class:`CalibrationGroup` or None.
    notes : tuple of str
        Why a kind has no match, soft mismatches, ignored frames.
    config : StackConfig
        Effective settings (batch settings plus ``skystack.toml`` overrides).
    settings_files : tuple of Path
        ``skystack.toml`` files applied, outermost first.
    out_dir : Path
        Folder of the session's outputs.
    outputs : dict
        ``tiff``, ``fits``, ``preview``, ``report`` -> absolute path.
    fingerprint : str
        SHA-256 identity of inputs and settings (see the module docstring).
    error : str or None
        Why the session cannot run at all (no lights, bad skystack.toml).
    """

    name: str
    files: SessionFiles
    lights: LightSummary
    calibration: dict[str, CalibrationGroup | None]
    notes: tuple[str, ...]
    config: StackConfig
    settings_files: tuple[Path, ...]
    out_dir: Path
    outputs: dict[str, Path]
    fingerprint: str
    error: str | None = None

    @property
    def object(self) -> str:
        """Target name: the lights' ``OBJECT`` header, else the folder name."""
        return self.lights.object or Path(self.name).name


@dataclass(frozen=True, kw_only=True)
class BatchPlan:
    """Everything :func:`run_batch` needs; :func:`batch_command` prints it with ``dry_run``.

    Attributes
    ----------
    archive, out_dir : Path
        Absolute folders.
    library : Path or None
        Calibration library folder.
    sessions : tuple of SessionPlan
        In archive order.
    library_groups : tuple of CalibrationGroup
        Every group found in the library.
    problems : tuple of str
        Library files that were ignored, and why.
    stack_config : StackConfig
        The batch's settings before per-session overrides.
    match : CalibrationMatchConfig
        Matching tolerances.
    """

    archive: Path
    out_dir: Path
    library: Path | None
    sessions: tuple[SessionPlan, ...]
    library_groups: tuple[CalibrationGroup, ...]
    problems: tuple[str, ...]
    stack_config: StackConfig
    match: CalibrationMatchConfig


@dataclass(kw_only=True)
class BatchResult:
    """Outcome of :func:`run_batch`.

    Attributes
    ----------
    rows : list of dict
        One summary row per session (:data:`SUMMARY_COLUMNS`).
    ran : list of str
        Sessions stacked by this run.
    skipped : list of str
        Sessions already done (journal fingerprint matched).
    failed : list of str
        Sessions that failed (this run).
    masters_combined : int
        Masters combined by this run, all processes together.
    summary_csv : Path
        The written summary.
    executor : str
        ``"inline"``, ``"local:N"`` or ``"dask:ADDRESS"``.
    """

    rows: list[dict[str, Any]]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    masters_combined: int = 0
    summary_csv: Path | None = None
    executor: str = ""

    @property
    def ok(self) -> bool:
        """True when no session failed."""
        return all(r.get("status") == "done" for r in self.rows)


# ----------------------------------------------------------------------------- small helpers


def _is_frame(p: Path) -> bool:
    from skystack.engine.io import is_frame_file

    return p.is_file() and not p.name.startswith(".") and is_frame_file(p)


def _is_fits(p: Path) -> bool:
    from skystack.engine.io import FITS_EXTENSIONS, frame_suffix

    return frame_suffix(p) in FITS_EXTENSIONS


def _parse_time(text: Any) -> _dt.datetime | None:
    """ISO-8601 (or EXIF ``YYYY:MM:DD HH:MM:SS``) -> naive UTC datetime; None when unparsable."""
    if not text:
        return None
    s = str(text).strip().replace("Z", "+00:00")
    if len(s) >= 10 and s[4] == ":" and s[7] == ":":
        s = s[:4] + "-" + s[5:7] + "-" + s[8:]
    try:
        t = _dt.datetime.fromisoformat(s)
    except ValueError:
        return None
    if t.tzinfo is not None:
        t = t.astimezone(_dt.timezone.utc).replace(tzinfo=None)
    return t


def _median(values: Iterable[float | None]) -> float | None:
    v = sorted(float(x) for x in values if x is not None and math.isfinite(float(x)))
    if not v:
        return None
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def _median_time(values: Iterable[_dt.datetime | None]) -> _dt.datetime | None:
    v = sorted(t for t in values if t is not None)
    return v[len(v) // 2] if v else None


def _majority(values: Sequence[Any]) -> Any:
    """Most common value (first seen wins ties); None for an empty sequence."""
    counts: dict[Any, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=lambda k: counts[k]) if counts else None


def _sample(items: Sequence[Any], n: int) -> list[Any]:
    """Up to ``n`` evenly spaced items (first and last included)."""
    if len(items) <= n:
        return list(items)
    idx = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})
    return [items[i] for i in idx]


def _filter_of(meta: Any) -> str | None:
    v = (meta.extra or {}).get("filter")
    v = str(v).strip() if v is not None else ""
    return v or None


def _same_number(a: float | None, b: float | None) -> bool:
    return a is None or b is None or abs(float(a) - float(b)) < 0.5


def _rel(path: Path, root: Path) -> str:
    try:
        rel = path.relative_to(root)
    except ValueError:
        return str(path)
    s = rel.as_posix()
    return s if s != "." else root.name


def _file_identity(path: Path) -> list[Any]:
    try:
        st = path.stat()
        return [str(path), int(st.st_size), int(st.st_mtime_ns)]
    except OSError:
        return [str(path), None, None]


def _json_float(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


# ----------------------------------------------------------------------------- discovery


def _kind_subfolders(root: Path) -> dict[str, list[Path]]:
    """Frame files of the kind sub-folders (``lights/``, ``darks/``...) of ``root``, any case."""
    subdirs = {d.name.lower(): d for d in sorted(root.iterdir()) if d.is_dir()}
    found: dict[str, list[Path]] = {}
    for kind, names in KIND_FOLDERS.items():
        files: list[Path] = []
        for n in names:
            if n in subdirs:
                files.extend(sorted(q for q in subdirs[n].iterdir() if _is_frame(q)))
        found[kind] = files
    return found


def _session_from_headers(folder: Path, files: list[Path]) -> SessionFiles | None:
    """A session from a folder of FITS files typed by IMAGETYP (None without a light)."""
    from skystack.engine.io import read_meta

    fits_files = [f for f in files if _is_fits(f)]
    if not fits_files:
        return None
    by_kind: dict[str, list[Path]] = {}
    unreadable: list[Path] = []
    for f in fits_files:
        try:
            typ = read_meta(f).imagetyp
        except SkystackError:
            unreadable.append(f)
            continue
        by_kind.setdefault(typ or "", []).append(f)
    if not by_kind.get("light"):
        return None
    own = _kind_subfolders(folder)
    kw = {k: tuple(sorted(own[k] + by_kind.get(t, []))) for t, k in _IMAGETYP_KIND.items()}
    return SessionFiles(root=folder, lights=tuple(sorted(by_kind["light"] + unreadable)), **kw)


def discover_sessions(archive: str | os.PathLike, *, exclude: Iterable[str | os.PathLike] = ()) -> list[SessionFiles]:
    """Every session under ``archive`` (see the module docstring), in sorted folder order.

    Parameters
    ----------
    archive : path
        Folder holding the sessions (it may be a session itself).
    exclude : paths
        Folders not to enter (the calibration library, the output folder).

    Returns
    -------
    list of SessionFiles
        ``root`` set; a ``lights/`` folder without frames gives a session
        with no lights (reported as failed, never silently dropped).

    Raises
    ------
    InputNotFound
        ``archive`` is not a folder.
    """
    root = Path(archive).expanduser().resolve()
    if not root.is_dir():
        raise InputNotFound(f"{root}: no such archive folder; pass the folder that holds the sessions")
    skip = {Path(e).expanduser().resolve() for e in exclude}
    light_names = set(KIND_FOLDERS["lights"])
    cal_names = {n for k, names in KIND_FOLDERS.items() if k != "lights" for n in names}
    sessions: list[SessionFiles] = []

    def walk(folder: Path) -> None:
        if folder in skip:
            return
        try:
            entries = sorted(folder.iterdir(), key=lambda p: p.name)
        except OSError:
            return
        subdirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
        if any(d.name.lower() in light_names for d in subdirs):
            own = _kind_subfolders(folder)
            sessions.append(SessionFiles(root=folder, **{k: tuple(v) for k, v in own.items()}))
            return
        s = _session_from_headers(folder, [e for e in entries if _is_frame(e)])
        if s is not None:
            sessions.append(s)
        for d in subdirs:
            if d.name.lower() not in cal_names:
                walk(d)

    walk(root)
    return sessions


# ----------------------------------------------------------------------------- calibration library


def _master_header(path: Path) -> dict[str, Any] | None:
    """Header facts of a skystack master FITS (without reading its pixels), or None."""
    import warnings

    from astropy.io import fits

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            h = fits.getheader(path, 0)
    except Exception:
        return None
    kind = h.get("SSKIND")
    if kind not in _MASTER_KIND.values():
        return None
    naxis = int(h.get("NAXIS", 0))
    shape = tuple(int(h.get(f"NAXIS{i}", 0)) for i in range(naxis, 0, -1))

    def num(key: str) -> float | None:
        v = h.get(key)
        return None if v is None or isinstance(v, str) else float(v)

    return {
        "kind": {v: k for k, v in _MASTER_KIND.items()}[kind], "shape": shape,
        "pattern": h.get("BAYERPAT") or None, "camera": h.get("INSTRUME") or None,
        "exposure_s": num("EXPTIME"), "iso": num("ISOSPEED"), "gain": num("GAIN"),
        "temperature_c": num("CCD-TEMP"), "time": _parse_time(h.get("DATE-OBS") or h.get("DATE")),
        "filter": (str(h.get("FILTER")).strip() or None) if h.get("FILTER") is not None else None,
    }


def _kind_from_folders(path: Path, root: Path) -> str | None:
    """Kind named by the nearest folder above ``path`` (up to the library root), or None."""
    names = {n: k for k, ns in KIND_FOLDERS.items() if k != "lights" for n in ns}
    for parent in path.parents:
        k = names.get(parent.name.lower())
        if k is not None:
            return k
        if parent == root:
            break
    return None


def _split(items: list[dict[str, Any]], key: str, gap: float) -> list[list[dict[str, Any]]]:
    """Split ``items`` where their sorted ``key`` values jump by more than ``gap`` (None: own cluster)."""
    unknown = [it for it in items if it[key] is None]
    known = sorted((it for it in items if it[key] is not None), key=lambda it: (it[key], str(it["path"])))
    out: list[list[dict[str, Any]]] = []
    for it in known:
        if out and it[key] - out[-1][-1][key] <= gap:
            out[-1].append(it)
        else:
            out.append([it])
    if unknown:
        out.append(unknown)
    return out


def _group_from(kind: str, items: list[dict[str, Any]], *, source: str, folder: str,
                master: bool = False) -> CalibrationGroup:
    first = items[0]
    return CalibrationGroup(
        kind=kind, files=tuple(sorted(Path(it["path"]) for it in items)), source=source, folder=folder,
        master=master, camera=first["camera"], shape=tuple(first["shape"]), pattern=first["pattern"],
        iso=_median(it["iso"] for it in items), gain=_median(it["gain"] for it in items),
        exposure_s=_median(it["exposure_s"] for it in items),
        temperature_c=_median(it["temperature_c"] for it in items),
        time=_median_time(it["time"] for it in items), filter=first["filter"],
    )


def _record(meta: Any, path: Path) -> dict[str, Any]:
    return {"path": path, "camera": meta.camera, "shape": tuple(meta.shape), "pattern": meta.pattern,
            "iso": meta.iso, "gain": meta.gain, "exposure_s": meta.exposure_s,
            "temperature_c": meta.temperature_c, "time": _parse_time(meta.timestamp), "filter": _filter_of(meta)}


def scan_calibration(root: str | os.PathLike, *,
                     config: CalibrationMatchConfig = CalibrationMatchConfig()
                     ) -> tuple[list[CalibrationGroup], list[str]]:
    """Group the calibration frames and masters of a library folder tree.

    Parameters
    ----------
    root : path
        Library folder (sub-folders of any depth; hidden ones skipped).
    config : CalibrationMatchConfig
        Temperature tolerance and night gap used to split groups.

    Returns
    -------
    (list of CalibrationGroup, list of str)
        The groups (sorted by kind and folder) and one line per ignored file
        (unreadable, a light, or of unknown kind).

    Raises
    ------
    InputNotFound
        ``root`` is not a folder.
    """
    from skystack.engine.io import read_meta

    lib = Path(root).expanduser().resolve()
    if not lib.is_dir():
        raise InputNotFound(f"{lib}: no such calibration library folder; pass the folder with bias/darks/flats")
    problems: list[str] = []
    masters: list[CalibrationGroup] = []
    buckets: dict[tuple, list[dict[str, Any]]] = {}
    for dirpath, dirnames, filenames in os.walk(lib):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if not _is_frame(p):
                continue
            folder = _rel(p.parent, lib) if p.parent != lib else "."
            if _is_fits(p):
                mh = _master_header(p)
                if mh is not None:
                    kind = mh.pop("kind")
                    masters.append(_group_from(kind, [dict(mh, path=p)], source="library",
                                               folder=_rel(p, lib), master=True))
                    continue
            try:
                meta = read_meta(p)
            except SkystackError as exc:
                problems.append(f"{_rel(p, lib)}: ignored, unreadable ({exc})")
                continue
            if meta.imagetyp == "light":
                problems.append(f"{_rel(p, lib)}: ignored, its header says it is a light")
                continue
            kind = _IMAGETYP_KIND.get(meta.imagetyp or "") or _kind_from_folders(p, lib)
            if kind is None:
                problems.append(f"{_rel(p, lib)}: ignored, kind unknown (no IMAGETYP header and not in a "
                                "bias/darks/flats/darkflats folder)")
                continue
            rec = _record(meta, p)
            exp = round(float(meta.exposure_s), 3) if kind in ("darks", "dark_flats") and meta.exposure_s else None
            key = (kind, folder, rec["camera"] or "", rec["shape"], rec["pattern"] or "",
                   -1.0 if meta.iso is None else float(meta.iso), -1.0 if meta.gain is None else float(meta.gain),
                   exp, rec["filter"] or "")
            buckets.setdefault(key, []).append(rec)
    groups: list[CalibrationGroup] = list(masters)
    gap_s = float(config.night_gap_h) * 3600.0
    for key in sorted(buckets, key=lambda k: tuple(str(x) for x in k)):
        kind, folder = key[0], key[1]
        items = buckets[key]
        parts = [items]
        if kind in ("darks", "dark_flats"):
            parts = _split(items, "temperature_c", float(config.temperature_tolerance_c))
        for part in parts:
            for it in part:
                it["t_s"] = None if it["time"] is None else it["time"].timestamp()
            for night in _split(part, "t_s", gap_s):
                groups.append(_group_from(kind, night, source="library", folder=folder))
    groups.sort(key=lambda g: (_CAL_KINDS.index(g.kind), g.folder, str(g.files[0])))
    return groups, problems


def _own_groups(files: SessionFiles) -> tuple[list[CalibrationGroup], list[str]]:
    """The session's own calibration frames, one group per kind."""
    from skystack.engine.io import read_meta

    root = files.root or Path(".")
    groups: list[CalibrationGroup] = []
    notes: list[str] = []
    for kind in _CAL_KINDS:
        paths = tuple(sorted(getattr(files, kind)))
        if not paths:
            continue
        recs = []
        for p in _sample(paths, _OWN_SAMPLE):
            try:
                recs.append(_record(read_meta(p), p))
            except SkystackError:
                continue
        folder = _rel(paths[0].parent, root) if paths[0].parent != root else "."
        if not recs:
            notes.append(f"own {kind} in {folder}: no readable header; ignored")
            continue
        ident = _majority([(r["camera"], r["shape"], r["pattern"]) for r in recs])
        recs = [r for r in recs if (r["camera"], r["shape"], r["pattern"]) == ident]
        g = _group_from(kind, recs, source="session", folder=folder)
        groups.append(dataclasses.replace(g, files=paths))
    return groups, notes


# ----------------------------------------------------------------------------- matching


def summarize_lights(lights: Sequence[Path], *, sample: int = _LIGHT_SAMPLE) -> LightSummary:
    """Summarise a session's lights from the headers of up to ``sample`` evenly spaced ones.

    Unreadable lights are skipped (the stack reports them); the summary of a
    session without a readable light has ``readable == 0``.
    """
    from skystack.engine.io import read_meta

    lights = list(lights)
    metas = []
    for p in _sample(lights, sample):
        try:
            metas.append(read_meta(p))
        except SkystackError:
            continue
    if len(metas) < min(sample, len(lights)):  # corrupt ones in the sample: try others
        seen = {m.path for m in metas}
        for p in lights:
            if len(metas) >= min(sample, len(lights)) or str(p) in seen:
                continue
            try:
                metas.append(read_meta(p))
            except SkystackError:
                continue
    if not metas:
        return LightSummary(count=len(lights), readable=0)
    camera, shape, pattern = _majority([(m.camera, tuple(m.shape), m.pattern) for m in metas])
    objects = [str(m.extra.get("object")).strip() for m in metas if m.extra.get("object")]
    filters = [f for f in (_filter_of(m) for m in metas) if f]
    return LightSummary(
        count=len(lights), readable=len(metas), camera=camera, shape=shape, pattern=pattern,
        iso=_median(m.iso for m in metas), gain=_median(m.gain for m in metas),
        exposure_s=_median(m.exposure_s for m in metas), temperature_c=_median(m.temperature_c for m in metas),
        time=_median_time(_parse_time(m.timestamp) for m in metas),
        object=_majority(objects) or None, filter=_majority(filters) or None,
    )


def _hard_mismatch(g: CalibrationGroup, camera: str | None, shape: tuple[int, ...], pattern: str | None) -> str | None:
    from skystack.engine.masters import describe, same_camera

    if tuple(g.shape) != tuple(shape) or g.pattern != pattern or not same_camera(g.camera, camera):
        return f"is {describe(g.shape, g.pattern, g.camera)}, lights are {describe(shape, pattern, camera)}"
    return None


def _iso_mismatch(g: CalibrationGroup, iso: float | None, gain: float | None) -> str | None:
    if not _same_number(g.iso, iso):
        return f"ISO {g.iso:g} (need {iso:g})"
    if not _same_number(g.gain, gain):
        return f"gain {g.gain:g} (need {gain:g})"
    return None


def _exposure_close(a: float | None, b: float | None, tol: float) -> bool:
    if a is None or b is None:
        return True
    return abs(float(a) - float(b)) <= tol * max(abs(float(a)), abs(float(b)))


def _date_distance(a: _dt.datetime | None, b: _dt.datetime | None) -> float:
    if a is None or b is None:
        return math.inf
    return abs((a - b).total_seconds())


def _temp_distance(a: float | None, b: float | None) -> float:
    return math.inf if a is None or b is None else abs(float(a) - float(b))


def match_calibration(light: LightSummary, candidates: Sequence[CalibrationGroup], *,
                      config: CalibrationMatchConfig = CalibrationMatchConfig()
                      ) -> tuple[dict[str, CalibrationGroup | None], list[str]]:
    """Pick a bias, dark, flat and dark-flat group for a session (rules in the module docstring).

    Parameters
    ----------
    light : LightSummary
        The session's lights.
    candidates : sequence of CalibrationGroup
        The session's own groups (``source == "session"``) and the library's.
    config : CalibrationMatchConfig
        Tolerances.

    Returns
    -------
    (dict, list of str)
        Kind -> chosen group (or None), and notes saying why a kind found no
        match or what was ignored.
    """
    notes: list[str] = []
    chosen: dict[str, CalibrationGroup | None] = {k: None for k in _CAL_KINDS}
    if light.readable == 0:
        return chosen, ["no readable light header: calibration cannot be matched"]
    tol_t = float(config.temperature_tolerance_c)

    def pick(kind: str, check: Callable[[CalibrationGroup], tuple[str | None, int]],
             ref_time: _dt.datetime | None, ref_temp: float | None) -> CalibrationGroup | None:
        ranked, rejected = [], []
        for g in candidates:
            if g.kind != kind:
                continue
            why, klass = check(g)
            if why is not None:
                rejected.append(f"{g.source} {g.folder}: {why}")
                continue
            src = 0 if g.source == "session" else 1
            ranked.append(((src, klass, _date_distance(g.time, ref_time), _temp_distance(g.temperature_c, ref_temp),
                            -len(g.files), g.folder, str(g.files[0])), g))
        own_rejected = [r for r in rejected if r.startswith("session ")]
        for r in own_rejected:
            notes.append(f"own {kind} not used: {r.removeprefix('session ')}")
        if not ranked:
            lib = [r for r in rejected if not r.startswith("session ")]
            if lib:
                more = f" (+{len(lib) - 3} more)" if len(lib) > 3 else ""
                notes.append(f"no {kind} match: " + "; ".join(lib[:3]) + more)
            return None
        ranked.sort(key=lambda t: t[0])
        return ranked[0][1]

    ident = (light.camera, light.shape, light.pattern)

    def bias_check(g: CalibrationGroup) -> tuple[str | None, int]:
        why = _hard_mismatch(g, *ident)
        if why is None and g.source != "session":
            why = _iso_mismatch(g, light.iso, light.gain)
        return why, 0

    chosen["bias"] = pick("bias", bias_check, light.time, None)

    def dark_check(g: CalibrationGroup) -> tuple[str | None, int]:
        why = _hard_mismatch(g, *ident)
        if why is not None or g.source == "session":
            return why, 0
        why = _iso_mismatch(g, light.iso, light.gain)
        if why is not None:
            return why, 0
        dt = _temp_distance(g.temperature_c, light.temperature_c)
        if math.isfinite(dt) and dt > tol_t:
            return (f"{g.temperature_c:.1f} C, lights {light.temperature_c:.1f} C "
                    f"(tolerance {tol_t:g} C)"), 0
        if _exposure_close(g.exposure_s, light.exposure_s, config.exposure_tolerance):
            return None, 0
        if config.scale_darks and chosen["bias"] is not None:
            return None, 1  # scaled by the exposure ratio: ranked after the exact ones
        return (f"exposure {g.exposure_s:g} s, lights {light.exposure_s:g} s "
                "(a bias is needed to scale it)"), 0

    chosen["darks"] = pick("darks", dark_check, light.time, light.temperature_c)
    d = chosen["darks"]
    if d is not None and d.source == "library" and not _exposure_close(d.exposure_s, light.exposure_s,
                                                                       config.exposure_tolerance):
        notes.append(f"dark of {d.exposure_s:g} s scaled to the lights' {light.exposure_s:g} s")

    def flat_check(g: CalibrationGroup) -> tuple[str | None, int]:
        why = _hard_mismatch(g, *ident)
        if why is None and g.filter and light.filter and g.filter != light.filter and g.source != "session":
            why = f"filter {g.filter} (lights {light.filter})"
        return why, 0

    chosen["flats"] = pick("flats", flat_check, light.time, None)
    flat = chosen["flats"]
    if flat is not None:
        def dark_flat_check(g: CalibrationGroup) -> tuple[str | None, int]:
            why = _hard_mismatch(g, *ident)
            if why is not None or g.source == "session":
                return why, 0
            why = _iso_mismatch(g, flat.iso, flat.gain)
            if why is None and not _exposure_close(g.exposure_s, flat.exposure_s, config.exposure_tolerance):
                why = f"exposure {g.exposure_s:g} s, flats {flat.exposure_s:g} s"
            return why, 0

        chosen["dark_flats"] = pick("dark_flats", dark_flat_check, flat.time, None)
    return chosen, notes


# ----------------------------------------------------------------------------- settings files


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SkystackError(f"{path}: cannot read settings ({exc}); fix the TOML syntax or remove the file") from None


def _apply_toml(cfg: StackConfig, path: Path) -> StackConfig:
    from skystack.engine.stack import parse_size

    data = _load_toml(path)
    if "stack" in data:
        extra = sorted(k for k in data if k != "stack")
        if extra or not isinstance(data["stack"], dict):
            raise SkystackError(f"{path}: put every setting in the [stack] table (found {', '.join(extra) or 'stack'})")
        data = data["stack"]
    fields = {f.name: f for f in dataclasses.fields(StackConfig)}
    choices = option_choices()
    changes: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key == "kappa":
            if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)):
                raise SkystackError(f"{path}: kappa must be [LOW, HIGH], e.g. kappa = [3.0, 3.0]")
            changes["kappa_low"], changes["kappa_high"] = float(value[0]), float(value[1])
            continue
        if key == "no_wb":
            key, value = "apply_wb", not value
        if key not in fields or key in _NOT_IN_TOML:
            allowed = ", ".join(sorted(k for k in fields if k not in _NOT_IN_TOML))
            raise SkystackError(f"{path}: unknown or batch-owned setting {raw_key!r}; use one of {allowed}")
        default = fields[key].default
        if key == "memory_limit":
            value = parse_size(value)
        elif key == "reference" and isinstance(value, str) and ("/" in value or os.sep in value):
            value = str((path.parent / value).resolve())
        ok = True
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int) and key not in ("memory_limit",):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float) or key in ("kappa_low", "kappa_high", "keep_best", "max_fwhm"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif isinstance(default, str) or key in ("reference", "backend"):
            ok = isinstance(value, str)
        if not ok:
            raise SkystackError(f"{path}: setting {raw_key!r} has the wrong type ({type(value).__name__})")
        if key in choices and value not in choices[key]:
            raise SkystackError(f"{path}: {raw_key} = {value!r}; choose one of {', '.join(choices[key])}")
        changes[key] = value
    return dataclasses.replace(cfg, **changes)


def session_settings(archive: str | os.PathLike, session_root: str | os.PathLike,
                     base: StackConfig = StackConfig()) -> tuple[StackConfig, tuple[Path, ...]]:
    """Apply the ``skystack.toml`` files from the archive root down to the session folder.

    Returns
    -------
    (StackConfig, tuple of Path)
        The effective settings and the files applied (outermost first).

    Raises
    ------
    SkystackError
        A file is not valid TOML, names an unknown setting or has a wrong value
        (the message names the file).
    """
    archive = Path(archive).resolve()
    root = Path(session_root).resolve()
    chain = [root, *root.parents]
    if archive in chain:
        chain = chain[: chain.index(archive) + 1]
    else:
        chain = [root]
    cfg, used = base, []
    for folder in reversed(chain):
        f = folder / SETTINGS_NAME
        if f.is_file():
            cfg = _apply_toml(cfg, f)
            used.append(f)
    return cfg, tuple(used)


# ----------------------------------------------------------------------------- planning


def _settings_fingerprint(cfg: StackConfig) -> dict[str, Any]:
    from skystack.engine.stack import _settings

    d = _settings(cfg)
    return {k: v for k, v in d.items() if k not in _NOT_IN_FINGERPRINT}


def _fingerprint(name: str, files: SessionFiles, cfg: StackConfig, outputs: dict[str, Path]) -> str:
    from skystack.engine.masters import CACHE_VERSION, MasterConfig

    doc = {
        "skystack": __version__, "batch_format": BATCH_FORMAT, "master_cache": CACHE_VERSION,
        "session": name,
        "lights": [_file_identity(p) for p in files.lights],
        "calibration": {k: [_file_identity(p) for p in getattr(files, k)] for k in _CAL_KINDS},
        "settings": _settings_fingerprint(cfg),
        "masters": MasterConfig().key_dict(),
        "outputs": {k: v.name for k, v in sorted(outputs.items())},
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _output_paths(out_dir: Path, name: str) -> tuple[Path, dict[str, Path]]:
    folder = out_dir / name
    stem = Path(name).name or "stack"
    return folder, {"tiff": folder / f"{stem}.tif", "fits": folder / f"{stem}.fits",
                    "preview": folder / f"{stem}.png", "report": folder / "report.json",
                    "html": folder / "report.html"}


def plan_batch(archive: str | os.PathLike, out_dir: str | os.PathLike, *,
               calibration_library: str | os.PathLike | None = None,
               stack_config: StackConfig = StackConfig(),
               match: CalibrationMatchConfig = CalibrationMatchConfig()) -> BatchPlan:
    """Find the sessions, match their calibration and settings, and fingerprint them.

    Reads headers only (no pixels); writes nothing.

    Parameters
    ----------
    archive : path
        Folder of sessions.
    out_dir : path
        Output folder (need not exist).
    calibration_library : path, optional
        Folder tree of calibration frames and masters.
    stack_config : StackConfig
        Settings of every session (``skystack.toml`` files override them);
        ``cache_dir`` None puts the masters in ``OUT/masters``.
    match : CalibrationMatchConfig
        Matching tolerances.

    Raises
    ------
    InputNotFound
        The archive or the library is not a folder, or holds no session.
    """
    arch = Path(archive).expanduser().resolve()
    out = Path(out_dir).expanduser().resolve()
    lib = Path(calibration_library).expanduser().resolve() if calibration_library else None
    if out == arch or out in arch.parents:
        raise OutputError(f"-o {out}: the output folder must not be the archive or contain it; choose another")
    groups, problems = scan_calibration(lib, config=match) if lib else ([], [])
    found = discover_sessions(arch, exclude=[p for p in (lib, out) if p is not None])
    if not found:
        raise InputNotFound(f"{arch}: no session found; a session is a folder with a 'lights' sub-folder, "
                            "or FITS lights with IMAGETYP = LIGHT")
    base = stack_config
    if base.cache_dir is None:
        base = dataclasses.replace(base, cache_dir=str(out / _MASTERS_DIR))
    sessions = []
    for sf in found:
        assert sf.root is not None
        name = _rel(sf.root, arch) if sf.root != arch else arch.name
        folder, outputs = _output_paths(out, name)
        error = None
        try:
            cfg, used = session_settings(arch, sf.root, base)
        except SkystackError as exc:
            cfg, used, error = base, (), str(exc)
        lights = summarize_lights(sf.lights)
        own, notes = _own_groups(sf)
        chosen, match_notes = match_calibration(lights, [*own, *groups], config=match)
        notes += match_notes
        files = SessionFiles(root=sf.root, lights=sf.lights,
                             **{k: (g.files if g is not None else ()) for k, g in chosen.items()})
        if not sf.lights:
            error = f"{sf.root}: the lights folder holds no frame files"
        sessions.append(SessionPlan(
            name=name, files=files, lights=lights, calibration=chosen, notes=tuple(notes), config=cfg,
            settings_files=used, out_dir=folder, outputs=outputs,
            fingerprint=_fingerprint(name, files, cfg, outputs), error=error))
    return BatchPlan(archive=arch, out_dir=out, library=lib, sessions=tuple(sessions), library_groups=tuple(groups),
                     problems=tuple(problems), stack_config=stack_config, match=match)


# ----------------------------------------------------------------------------- journal


def read_journal(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Entries of ``OUT/journal.jsonl`` in order (a torn last line from a killed run is skipped)."""
    path = Path(out_dir) / JOURNAL_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict) and "session" in e:
            out.append(e)
    return out


def _append_journal(out_dir: Path, entry: dict[str, Any]) -> None:
    path = out_dir / JOURNAL_NAME
    line = json.dumps(entry, sort_keys=True, default=str)
    with open(path, "ab") as fh:
        if fh.tell() > 0:
            with open(path, "rb") as rd:  # a torn line from a killed run: start on a new line
                rd.seek(-1, os.SEEK_END)
                if rd.read(1) != b"\n":
                    fh.write(b"\n")
        fh.write(line.encode("utf-8") + b"\n")
        fh.flush()
        os.fsync(fh.fileno())


def _is_done(entry: dict[str, Any] | None, plan: SessionPlan) -> bool:
    if not entry or entry.get("status") != "done" or entry.get("fingerprint") != plan.fingerprint:
        return False
    for key, size in (entry.get("outputs") or {}).items():
        p = plan.outputs.get(key)
        try:
            if p is None or p.stat().st_size != size:
                return False
        except OSError:
            return False
    return set(entry.get("outputs") or {}) == set(plan.outputs)


@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``OUT`` (released by the OS if the process is killed)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fh = open(out_dir / _LOCK_NAME, "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputError(f"{out_dir}: another 'skystack batch' is writing here; wait for it to end "
                              "or choose another -o folder") from None
        yield
    finally:
        fh.close()


def _remove_partials(folders: Iterable[Path]) -> int:
    """Delete the temporary files a killed run left in ``folders``; return how many.

    Only the names :func:`~skystack.engine.output.atomic_path` (``.NAME.XXXXXXXX.part``)
    and older writers (``.NAME.XXXXXXXX.tmp``) give, that no live run holds, are
    touched (:func:`~skystack.engine.output.remove_stale_partials`), and only in
    the batch's own folders.
    """
    from skystack.engine.output import remove_stale_partials

    return sum(remove_stale_partials(folder) for folder in folders)


# ----------------------------------------------------------------------------- work done in the workers


def _worker_init() -> None:
    """Pool initializer: die with the coordinator when it is killed (Linux ``PR_SET_PDEATHSIG``).

    Ctrl-C reaches the whole process group: the workers ignore it and the
    coordinator stops them (:meth:`_Pool.map`), so no queued session starts.
    """
    import logging
    import signal

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


# ----------------------------------------------------------------------------- executors


_DIED = "the worker process died while running it (crash or out of memory)"


class _Inline:
    """Runs tasks in this process, one after the other (``workers=0``)."""

    label = "inline"

    def map(self, fn: Callable[[Any], dict], items: list[tuple[str, Any]],
            on_result: Callable[[str, dict], None]) -> None:
        for key, payload in items:
            on_result(key, fn(payload))

    def close(self) -> None:
        pass


class _Pool:
    """A ``spawn`` process pool; a dead worker fails only the task it ran."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, int(workers))
        self.label = f"local:{self.workers}"
        self._pool = None

    def _new(self, n: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init)

    def map(self, fn: Callable[[Any], dict], items: list[tuple[str, Any]],
            on_result: Callable[[str, dict], None]) -> None:
        from concurrent.futures import as_completed
        from concurrent.futures.process import BrokenProcessPool

        if not items:
            return
        if self._pool is None:
            self._pool = self._new(self.workers)
        futures = {self._pool.submit(fn, payload): (key, payload) for key, payload in items}
        broken: list[tuple[str, Any]] = []
        seen: set = set()
        try:
            for fut in as_completed(futures):
                seen.add(fut)
                key, payload = futures[fut]
                try:
                    res = fut.result()
                except BrokenProcessPool:
                    broken.append((key, payload))
                    continue
                except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable result
                    res = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
                on_result(key, res)
        except KeyboardInterrupt:
            self._stop()
            _journal_finished(futures, seen, on_result)
            raise
        if not broken:
            return
        # A worker died and took the pool down: rerun what it left one at a time,
        # each in a fresh single-worker pool after a death, so only the culprit fails.
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None
        order = {k: i for i, (k, _p) in enumerate(items)}
        for key, payload in sorted(broken, key=lambda kp: order[kp[0]]):
            solo = self._new(1)
            try:
                res = solo.submit(fn, payload).result()
            except BrokenProcessPool:
                res = {"status": "failed", "error": _DIED}
            finally:
                solo.shutdown(wait=True, cancel_futures=True)
            on_result(key, res)

    def _stop(self) -> None:
        """Cancel what is queued and end the workers now (Ctrl-C): no new session starts."""
        if self._pool is None:
            return
        procs = list((getattr(self._pool, "_processes", None) or {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.terminate()
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.join(timeout=5)
        self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _journal_finished(futures: dict, seen: set, on_result: Callable[[str, dict], None]) -> None:
    """After Ctrl-C: hand on the results that completed but were not handed on yet."""
    for fut, key in futures.items():
        if fut in seen or not fut.done() or fut.cancelled():
            continue
        with contextlib.suppress(BaseException):
            res = fut.result(timeout=0)
            on_result(key[0] if isinstance(key, tuple) else key, res)


class _Dask:
    """Tasks on a ``dask.distributed`` cluster."""

    def __init__(self, address: str) -> None:
        try:
            from distributed import Client
        except ImportError:
            raise SkystackError("--scheduler needs dask.distributed; install it with "
                                "pip install 'dask[distributed]'") from None
        try:
            self._client = Client(address, timeout="20s", set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise SkystackError(f"--scheduler {address}: cannot connect ({exc}); check the address and that "
                                "the dask scheduler is running") from None
        self.label = f"dask:{address}"

    def map(self, fn: Callable[[Any], dict], items: list[tuple[str, Any]],
            on_result: Callable[[str, dict], None]) -> None:
        from distributed import as_completed

        if not items:
            return
        futures = {}
        for key, payload in items:
            tok = hashlib.sha1(key.encode()).hexdigest()[:10]
            f = self._client.submit(fn, payload, pure=False, key=f"skystack-{fn.__name__.strip('_')}-{tok}-"
                                                                  f"{time.time_ns()}")
            futures[f] = key
        seen: set = set()
        try:
            for fut in as_completed(list(futures), loop=self._client.loop):
                seen.add(fut)
                key = futures[fut]
                try:
                    res = fut.result()
                except Exception as exc:  # noqa: BLE001 - KilledWorker, cancelled...
                    res = {"status": "failed", "error": f"{_DIED}: {type(exc).__name__}: {exc}"}
                on_result(key, res)
        except KeyboardInterrupt:
            with contextlib.suppress(Exception):
                self._client.cancel([f for f in futures if f not in seen and not f.done()])
            _journal_finished({f: k for f, k in futures.items() if f.status == "finished"}, seen, on_result)
            raise

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()


def _default_workers(n_tasks: int, gpu: bool) -> int:
    if gpu:
        return 1
    return max(1, min(n_tasks, (os.cpu_count() or 2) // 2))


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
    from skystack.engine.backend import get_backend

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
        if runnable and scheduler is None:
            gpu = get_backend(backend_name, quiet=True).is_gpu
        if runnable:
            if scheduler:
                ex: Any = _Dask(scheduler)
            elif workers == 0:
                ex = _Inline()
            else:
                ex = _Pool(workers if workers is not None else _default_workers(len(runnable), gpu))
            result.executor = ex.label
            try:
                _run_sessions(ex, plan, runnable, last, result, say, gpu=gpu,
                              n_workers=getattr(ex, "workers", 1))
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
                  result: BatchResult, say: Callable[[str], None], *, gpu: bool, n_workers: int) -> None:
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
        if gpu and n_workers > 1 and cfg.memory_limit is None:
            # several sessions share one device: each gets its part of the budget
            cfg = dataclasses.replace(cfg, memory_limit=get_backend("gpu", quiet=True).memory_budget(None) // n_workers)
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
