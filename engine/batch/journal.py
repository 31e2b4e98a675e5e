"""The resumable journal (``journal.jsonl``) and the output folder's lock."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator


from skystack.engine.errors import OutputError
from skystack.engine.batch.records import JOURNAL_NAME, SessionPlan, _LOCK_NAME

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
