"""The calibration library: scanning it and matching its groups to a session's lights."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence


from skystack.engine.errors import InputNotFound, SkystackError
from skystack.engine.session import KIND_FOLDERS, SessionFiles
from skystack.engine.batch.records import CalibrationGroup, CalibrationMatchConfig, HeaderSummary, LightSummary, _CAL_KINDS, _IMAGETYP_KIND, _LIGHT_SAMPLE, _MASTER_KIND, _OWN_SAMPLE, _filter_of, _is_fits, _is_frame, _majority, _median, _median_time, _parse_time, _rel, _same_number, _sample

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
    layouts: dict[tuple, Any] = {}  # one RAW file of a camera and layout is decoded (read_meta)
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
                meta = read_meta(p, layouts=layouts)
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


def _hard_mismatch(g: CalibrationGroup, light: HeaderSummary) -> str | None:
    from skystack.engine.masterfile import describe
    from skystack.engine.masters import same_camera

    if tuple(g.shape) != tuple(light.shape) or g.pattern != light.pattern or not same_camera(g.camera, light.camera):
        return (f"is {describe(g.shape, g.pattern, g.camera)}, "
                f"lights are {describe(light.shape, light.pattern, light.camera)}")
    return None


def _iso_mismatch(g: CalibrationGroup, ref: HeaderSummary) -> str | None:
    if not _same_number(g.iso, ref.iso):
        return f"ISO {g.iso:g} (need {ref.iso:g})"
    if not _same_number(g.gain, ref.gain):
        return f"gain {g.gain:g} (need {ref.gain:g})"
    return None


def _settings_mismatch(g: CalibrationGroup, light: LightSummary, ref: HeaderSummary) -> str | None:
    """Why ``g`` does not fit: a camera mode other than the lights'; for a library group also an
    ISO or gain other than ``ref``'s (the lights', or the flats' for a dark-flat)."""
    why = _hard_mismatch(g, light)
    if why is not None or g.source == "session":
        return why
    return _iso_mismatch(g, ref)


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

    chosen["bias"] = _pick("bias", candidates, lambda g: (_settings_mismatch(g, light, light), 0), light.time, None,
                           notes)
    have_bias = chosen["bias"] is not None
    chosen["darks"] = _pick("darks", candidates, lambda g: _dark_check(g, light, config, have_bias), light.time,
                            light.temperature_c, notes)
    d = chosen["darks"]
    if d is not None and d.source == "library" and not _exposure_close(d.exposure_s, light.exposure_s,
                                                                       config.exposure_tolerance):
        notes.append(f"dark of {d.exposure_s:g} s scaled to the lights' {light.exposure_s:g} s")
    chosen["flats"] = _pick("flats", candidates, lambda g: _flat_check(g, light), light.time, None, notes)
    flat = chosen["flats"]
    if flat is not None:
        chosen["dark_flats"] = _pick("dark_flats", candidates, lambda g: _dark_flat_check(g, light, flat, config),
                                     flat.time, None, notes)
    return chosen, notes


#: What a check says of a candidate group: why it does not fit (None: it fits), and its rank class
#: (0 exact; 1 usable but ranked after the exact ones, e.g. a dark to be scaled).
_Verdict = tuple[str | None, int]


def _pick(kind: str, candidates: Sequence[CalibrationGroup], check: Callable[[CalibrationGroup], _Verdict],
          ref_time: _dt.datetime | None, ref_temp: float | None, notes: list[str]) -> CalibrationGroup | None:
    """The best ``kind`` group that passes ``check``, or None; why groups were left out goes to ``notes``.

    Ranked by: the session's own first, rank class, date distance to ``ref_time``,
    temperature distance to ``ref_temp``, most files, then folder and first file.
    """
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


def _dark_check(g: CalibrationGroup, light: LightSummary, config: CalibrationMatchConfig,
                have_bias: bool) -> _Verdict:
    """A dark: same camera mode; a library dark also ISO/gain, temperature and exposure (or scalable)."""
    why = _settings_mismatch(g, light, light)
    if why is not None or g.source == "session":
        return why, 0
    tol_t = float(config.temperature_tolerance_c)
    dt = _temp_distance(g.temperature_c, light.temperature_c)
    if math.isfinite(dt) and dt > tol_t:
        return (f"{g.temperature_c:.1f} C, lights {light.temperature_c:.1f} C "
                f"(tolerance {tol_t:g} C)"), 0
    if _exposure_close(g.exposure_s, light.exposure_s, config.exposure_tolerance):
        return None, 0
    if config.scale_darks and have_bias:
        return None, 1  # scaled by the exposure ratio: ranked after the exact ones
    return (f"exposure {g.exposure_s:g} s, lights {light.exposure_s:g} s "
            "(a bias is needed to scale it)"), 0


def _flat_check(g: CalibrationGroup, light: LightSummary) -> _Verdict:
    """A flat: same camera mode; a library flat also the lights' filter, when both say one."""
    why = _hard_mismatch(g, light)
    if why is None and g.filter and light.filter and g.filter != light.filter and g.source != "session":
        why = f"filter {g.filter} (lights {light.filter})"
    return why, 0


def _dark_flat_check(g: CalibrationGroup, light: LightSummary, flat: CalibrationGroup,
                     config: CalibrationMatchConfig) -> _Verdict:
    """A dark-flat: the lights' camera mode; a library one also the chosen flats' ISO/gain and exposure."""
    why = _settings_mismatch(g, light, flat)
    if why is None and g.source != "session" and not _exposure_close(g.exposure_s, flat.exposure_s, config.exposure_tolerance):
        why = f"exposure {g.exposure_s:g} s, flats {flat.exposure_s:g} s"
    return why, 0
