"""The batch plan: sessions, their settings, masters, outputs and fingerprints."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any


from skystack import __version__
from skystack.engine.errors import InputNotFound, OutputError, SkystackError
from skystack.engine.session import SessionFiles
from skystack.engine.stack import StackConfig
from skystack.engine.batch.discovery import discover_sessions
from skystack.engine.batch.library import _own_groups, match_calibration, scan_calibration, summarize_lights
from skystack.engine.batch.records import BATCH_FORMAT, BatchPlan, CalibrationMatchConfig, SessionPlan, _CAL_KINDS, _MASTERS_DIR, _NOT_IN_FINGERPRINT, _file_identity, _rel
from skystack.engine.batch.settings import session_settings

# ----------------------------------------------------------------------------- planning


def _settings_fingerprint(cfg: StackConfig) -> dict[str, Any]:
    from skystack.engine.stack import _settings

    d = _settings(cfg)
    return {k: v for k, v in d.items() if k not in _NOT_IN_FINGERPRINT}


def _fingerprint(name: str, files: SessionFiles, cfg: StackConfig, outputs: dict[str, Path]) -> str:
    from skystack.engine.masterfile import CACHE_VERSION
    from skystack.engine.masters import MasterConfig

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
