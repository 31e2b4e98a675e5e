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
GPU backend the pool has one process per GPU, each shown only its own device
(``CUDA_VISIBLE_DEVICES``, given out in turn as the processes start); with
more ``workers`` than GPUs the processes of one device share it, each session
getting that share of the device's memory budget (unless
``StackConfig.memory_limit`` is set), so sessions never fight for one device.
A worker process that dies (crash, out of memory) fails only its session: the
sessions it left are run again one at a time. With ``scheduler`` (a
``dask.distributed`` address such as ``tcp://host:8786``) masters and sessions
run as tasks on the cluster; the workers must see the archive, the library
and ``OUT`` at the same paths and have skystack installed (one worker per GPU).

The package's modules, in the order a batch uses them: :mod:`.records`
(configs, records, constants), :mod:`.discovery`, :mod:`.library` (the
calibration library and matching), :mod:`.settings` (``skystack.toml``),
:mod:`.planning`, :mod:`.journal`, :mod:`.tasks` (what a worker runs),
:mod:`.executors` and :mod:`.runner` (running, tables and the command).
"""

from __future__ import annotations

from skystack.engine.batch.discovery import discover_sessions
from skystack.engine.batch.journal import read_journal
from skystack.engine.batch.library import match_calibration, scan_calibration, summarize_lights
from skystack.engine.batch.planning import plan_batch
from skystack.engine.batch.records import (
    JOURNAL_NAME,
    SUMMARY_COLUMNS,
    SUMMARY_NAME,
    BatchPlan,
    BatchResult,
    CalibrationGroup,
    CalibrationMatchConfig,
    LightSummary,
    SessionPlan,
)
from skystack.engine.batch.runner import INDEX_NAME, batch_command, batch_table, run_batch
from skystack.engine.batch.settings import session_settings

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
    "INDEX_NAME",
    "discover_sessions",
    "scan_calibration",
    "summarize_lights",
    "match_calibration",
    "session_settings",
    "plan_batch",
    "run_batch",
    "read_journal",
    "batch_command",
    "batch_table",
]
