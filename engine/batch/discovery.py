"""Finding the sessions of an archive (folder names, FITS headers)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable


from skystack.engine.errors import InputNotFound, SkystackError
from skystack.engine.session import KIND_FOLDERS, SessionFiles
from skystack.engine.batch.records import _IMAGETYP_KIND, _is_fits, _is_frame

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
