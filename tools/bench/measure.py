"""Measured child processes: wall time and peak memory of one command, and one benchmark
measurement run in a fresh Python process (``python -m skystack.tools.bench --one SPEC``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from skystack.engine.output import _json_default as _engine_json_default

#: Prefix of the line on which a child prints its JSON result.
RESULT_MARK = "SKYSTACK_BENCH_RESULT "


@dataclass(frozen=True, kw_only=True)
class Measured:
    """Exit status, wall time and resource use of one child process."""

    returncode: int
    wall_s: float
    peak_rss_bytes: int
    user_s: float
    sys_s: float
    timed_out: bool = False


#: Runs in a fresh, small interpreter (``python -S``): forks the command and reports its
#: own wait4 rusage. Measuring through it keeps the caller's memory out of the figure:
#: Linux carries the RSS high-water mark of the address space a process execs from
#: into its ``ru_maxrss``, so a command spawned straight from a big process would
#: report at least that process's peak.
_LAUNCHER = r"""
import json, os, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(out, "w") as fh:
    json.dump({"status": status, "wall_s": wall, "maxrss_kb": ru.ru_maxrss, "user_s": ru.ru_utime,
               "sys_s": ru.ru_stime}, fh)
"""


def run_measured(cmd: Sequence[str], *, log_path: str | os.PathLike, cwd: str | os.PathLike | None = None,
                 env: dict[str, str] | None = None, timeout_s: float = 3600.0) -> Measured:
    """Run ``cmd`` with stdout+stderr to ``log_path``; return its wall time and peak RSS.

    ``cmd`` is forked from a small launcher interpreter and reaped with
    :func:`os.wait4`, so ``peak_rss_bytes`` is the ``ru_maxrss`` of that
    command alone (and the children it waited for), never of this process
    or of earlier runs. ``wall_s`` runs from the fork to the exit.
    """
    fd, res_path = tempfile.mkstemp(prefix="measured-", suffix=".json")
    os.close(fd)
    try:
        with open(log_path, "wb") as log:
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, res_path, *map(str, cmd)],
                                    stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, 9)
                proc.wait()
            outer = time.perf_counter() - t0
        try:
            r = json.loads(Path(res_path).read_text())
        except (OSError, ValueError):
            r = None
    finally:
        Path(res_path).unlink(missing_ok=True)
    if r is None:
        return Measured(returncode=proc.returncode if not timed_out else -9, wall_s=outer, peak_rss_bytes=0,
                        user_s=0.0, sys_s=0.0, timed_out=timed_out)
    return Measured(returncode=os.waitstatus_to_exitcode(r["status"]), wall_s=float(r["wall_s"]),
                    peak_rss_bytes=int(r["maxrss_kb"]) * 1024, user_s=float(r["user_s"]),
                    sys_s=float(r["sys_s"]), timed_out=timed_out)


def run_child(spec: dict[str, Any], *, log_dir: str | os.PathLike, timeout_s: float = 3600.0
              ) -> dict[str, Any]:
    """Run one measurement (``spec["mode"]`` = ``decode`` or ``stack``) in a fresh Python process.

    Returns the child's JSON result with ``process`` (wall time and peak RSS
    seen by the parent) added; on failure ``{"ok": False, "error": ...}``
    with the last lines of the child's log.
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    fd, log_path = tempfile.mkstemp(prefix=f"{spec.get('mode', 'child')}-", suffix=".log", dir=log_dir)
    os.close(fd)
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", "0")
    cmd = [sys.executable, "-m", "skystack.tools.bench", "--one", json.dumps(spec)]
    m = run_measured(cmd, log_path=log_path, env=env, timeout_s=timeout_s)
    text = Path(log_path).read_text(errors="replace")
    result: dict[str, Any] | None = None
    for line in text.splitlines():
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK):])
    if result is None:
        tail = " | ".join(text.strip().splitlines()[-6:])
        why = "timed out" if m.timed_out else f"exit status {m.returncode}"
        result = {"ok": False, "error": f"child {why}: {tail}"[:2000]}
    result["process"] = asdict(m)
    result["log"] = str(log_path)
    return result


def json_default(o: Any) -> Any:
    """JSON encoder fallback: NumPy values and paths as the engine writes them, anything else as ``str``."""
    try:
        return _engine_json_default(o)
    except TypeError:
        return str(o)
