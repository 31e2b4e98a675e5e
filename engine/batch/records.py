"""The batch's configs, records, constants and small helpers."""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence


from skystack.engine.session import SessionFiles
from skystack.engine.stack import StackConfig

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
class HeaderSummary:
    """What the headers of a set of frames say (None or ``()`` when unknown).

    Attributes
    ----------
    camera, shape, pattern : str or None, tuple of int, str or None
        Camera mode.
    iso, gain, exposure_s, temperature_c : float or None
        Sensor settings (medians).
    time : datetime or None
        Median capture time (naive UTC).
    filter : str or None
        ``FILTER`` header.
    """

    camera: str | None = None
    shape: tuple[int, ...] = ()
    pattern: str | None = None
    iso: float | None = None
    gain: float | None = None
    exposure_s: float | None = None
    temperature_c: float | None = None
    time: _dt.datetime | None = None
    filter: str | None = None


@dataclass(frozen=True, kw_only=True)
class CalibrationGroup(HeaderSummary):
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
class LightSummary(HeaderSummary):
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
    object: str | None = None


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
