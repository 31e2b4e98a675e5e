"""Finding the frames of a session: files, folders, globs, and DSS/Siril folder names."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from skystack.engine.errors import InputNotFound

#: Sub-folder names (lower case) for each frame kind, DSS and Siril style.
KIND_FOLDERS: dict[str, tuple[str, ...]] = {
    "lights": ("lights", "light", "lights_raw"),
    "darks": ("darks", "dark"),
    "flats": ("flats", "flat"),
    "bias": ("bias", "biases", "offset", "offsets"),
    "dark_flats": ("darkflats", "darkflat", "dark_flats", "dark-flats", "flatdarks", "flat_darks",
                   "flat-darks", "darkflat_frames"),
}


@dataclass(frozen=True, kw_only=True)
class SessionFiles:
    """Frame files of one session, by kind (each sorted by name)."""

    lights: tuple[Path, ...] = ()
    darks: tuple[Path, ...] = ()
    flats: tuple[Path, ...] = ()
    bias: tuple[Path, ...] = ()
    dark_flats: tuple[Path, ...] = ()
    root: Path | None = field(default=None)

    def counts(self) -> dict[str, int]:
        """Number of files per kind."""
        return {k: len(getattr(self, k)) for k in KIND_FOLDERS}


def _is_frame(p: Path) -> bool:
    from skystack.engine.io import is_frame_file

    return p.is_file() and not p.name.startswith(".") and is_frame_file(p)


def resolve_inputs(specs: Iterable[str | os.PathLike], *, what: str = "lights") -> list[Path]:
    """Expand files, folders and globs into a sorted, de-duplicated list of frame files.

    Raises
    ------
    InputNotFound
        When a spec matches nothing, or nothing at all is found.
    """
    out: list[Path] = []
    for spec in specs:
        s = os.fspath(spec)
        p = Path(s).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if _is_frame(q))
            if not found:
                raise InputNotFound(_session_hint(p) or
                                    f"{p}: folder holds no frame files (RAW, FITS, TIFF, JPEG/PNG) for {what}")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        elif glob.has_magic(s):
            found = sorted(Path(q) for q in glob.glob(os.path.expanduser(s)) if _is_frame(Path(q)))
            if not found:
                raise InputNotFound(f"{s}: pattern matches no frame files for {what}")
            out.extend(found)
        else:
            raise InputNotFound(f"{s}: no such file or folder (check the path for {what})")
    seen: set[Path] = set()
    unique = []
    for p in out:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(p)
    return unique


def _looks_like_session(d: Path) -> bool:
    """A folder with a lights sub-folder, or with frame files of its own."""
    try:
        entries = list(d.iterdir())
    except OSError:
        return False
    return any(e.is_dir() and e.name.lower() in KIND_FOLDERS["lights"] for e in entries) or any(
        _is_frame(e) for e in entries[:200])


def _session_hint(folder: Path) -> str | None:
    """The message for a folder that holds session folders instead of frames (None otherwise)."""
    try:
        sessions = sorted(d for d in folder.iterdir() if d.is_dir() and _looks_like_session(d))
    except OSError:
        return None
    if not sessions:
        return None
    names = ", ".join(d.name for d in sessions[:3]) + (f" and {len(sessions) - 3} more" if len(sessions) > 3 else "")
    return (f"{folder}: holds session folders ({names}), not frames; pass one of them, e.g. "
            f"'skystack stack {sessions[0]}', or stack them all with 'skystack batch {folder} -o OUT'")


def discover_session(root: str | os.PathLike) -> SessionFiles:
    """Find lights/, darks/, flats/, bias/ and darkflats/ sub-folders (any case) under ``root``.

    Raises
    ------
    InputNotFound
        When ``root`` is missing or has no lights.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise InputNotFound(f"{root}: no such session folder")
    subdirs = {d.name.lower(): d for d in root.iterdir() if d.is_dir()}
    found: dict[str, tuple[Path, ...]] = {}
    for kind, names in KIND_FOLDERS.items():
        files: list[Path] = []
        for n in names:
            if n in subdirs:
                files.extend(sorted(q for q in subdirs[n].iterdir() if _is_frame(q)))
        found[kind] = tuple(files)
    if not found["lights"]:
        raise InputNotFound(
            f"{root}: no light frames found; put them in a 'lights' sub-folder or pass them as arguments")
    return SessionFiles(root=root, **found)


def split_inputs(lights: Sequence[str]) -> SessionFiles:
    """Interpret the ``stack`` positional arguments: one session folder, or light specs."""
    if len(lights) == 1:
        p = Path(lights[0]).expanduser()
        if p.is_dir():
            subs = {d.name.lower() for d in p.iterdir() if d.is_dir()}
            if subs & set(KIND_FOLDERS["lights"]):
                return discover_session(p)
    return SessionFiles(lights=tuple(resolve_inputs(lights)))
