"""``skystack.toml`` settings from the archive root down to each session."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any


from skystack.engine.errors import SkystackError
from skystack.engine.stack import StackConfig, option_choices
from skystack.engine.batch.records import SETTINGS_NAME, _NOT_IN_TOML

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
        if key == "no_wb":  # the older name of apply_wb, inverted
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
