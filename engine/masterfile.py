"""A master calibration frame and its FITS file: data, provenance, headers.

:class:`Master` holds a master's data with its :class:`MasterMeta`; a master
is stored as a float32 FITS whose headers carry that provenance
(:func:`write_master`, :func:`read_master`), which is also the form of the
cache of :mod:`skystack.engine.masters` (where masters are built). The data is
in normalised units, ``(adu - black) / (white - black)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from skystack import __version__
from skystack.engine.backend import to_host
from skystack.engine.errors import CalibrationError, InputNotFound, OutputError
from skystack.engine.output import atomic_path, fits_text

__all__ = [
    "KINDS",
    "CACHE_VERSION",
    "MasterMeta",
    "Master",
    "describe",
    "file_identity",
    "write_master",
    "read_master",
    "is_master_file",
]

#: Master kinds.
KINDS = ("bias", "dark", "flat", "dark-flat")
#: Bump when the way masters are computed changes (invalidates the cache).
CACHE_VERSION = "2"

_IMAGETYP = {"bias": "Master Bias", "dark": "Master Dark", "flat": "Master Flat",
             "dark-flat": "Master Dark Flat"}


@dataclass(frozen=True, kw_only=True)
class MasterMeta:
    """Provenance of a master.

    Attributes
    ----------
    kind : str
        One of :data:`KINDS`.
    count : int
        Frames combined.
    shape : tuple of int
        Shape of the data.
    pattern : str or None
        Bayer pattern of the frames.
    camera : str or None
        Camera of the frames.
    exposure_s, iso, gain, temperature_c : float or None
        Median exposure, ISO and gain, mean temperature of the frames.
    method, kappa_low, kappa_high, max_iter :
        Combine settings.
    black_level, white_level :
        Levels of the first frame (provenance; the data is already normalised).
    bias_subtracted : bool
        Dark: the master bias was subtracted (thermal signal only).
    flat_offset : str
        Flat: what was subtracted before normalising (``"dark-flat"``, ``"bias"``, ``"none"``).
    flat_medians : tuple of float or None
        Flat: median per colour (R, G, B; or one value for mono) before normalising.
    flat_noise : tuple of float or None
        Flat: pixel noise, PRNU and the expected noise after shrinking
        (relative, RMS over the planes), when the noise was shrunk.
    sources : tuple of str
        Absolute paths of the input frames.
    key : str
        Cache key (identity of inputs + settings).
    path : str or None
        FITS file the master was read from or last written to.
    created : str
        ISO-8601 UTC time of the combine.
    skipped : tuple of str
        ``"name: reason"`` for each input frame left out (unreadable, empty).
    """

    kind: str
    count: int
    shape: tuple[int, ...]
    pattern: str | None = None
    camera: str | None = None
    exposure_s: float | None = None
    iso: float | None = None
    gain: float | None = None
    temperature_c: float | None = None
    method: str = "sigma"
    kappa_low: float = 3.0
    kappa_high: float = 3.0
    max_iter: int = 5
    black_level: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    white_level: float = 65535.0
    bias_subtracted: bool = False
    flat_offset: str = "none"
    flat_medians: tuple[float, ...] | None = None
    flat_noise: tuple[float, float, float] | None = None
    sources: tuple[str, ...] = ()
    key: str = ""
    path: str | None = None
    created: str = ""
    skipped: tuple[str, ...] = ()

    def describe(self) -> str:
        """``"1920x1080 GRBG (ZWO Seestar S50)"``-style summary for messages."""
        return describe(self.shape, self.pattern, self.camera)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable provenance (for the report)."""
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["sources"] = [Path(s).name for s in self.sources]
        return d


@dataclass(frozen=True, kw_only=True)
class Master:
    """A master calibration frame.

    Attributes
    ----------
    data : ndarray
        float32 in normalised units, the frames' shape (host array, or device
        array after :meth:`skystack.engine.calibrate.CalibrationSet.to_backend`).
    meta : MasterMeta
        Provenance.
    from_cache : bool
        True when read back from the cache instead of combined.
    """

    data: Any
    meta: MasterMeta
    from_cache: bool = False

    @property
    def kind(self) -> str:
        return self.meta.kind


def describe(shape: Sequence[int], pattern: str | None, camera: str | None) -> str:
    """``"1920x1080 GRBG (ZWO Seestar S50)"``: width x height, pattern, camera (for messages)."""
    shape = tuple(shape)
    dims = "x".join(str(s) for s in shape[::-1]) if len(shape) == 2 else "x".join(map(str, shape))
    return f"{dims} {pattern or 'mono/colour'}" + (f" ({camera})" if camera else "")


def file_identity(path: Path) -> list[Any]:
    """``[path, size, mtime in ns]``: what identifies an input file in a cache key."""
    st = path.stat()
    return [str(path), int(st.st_size), int(st.st_mtime_ns)]


# ----------------------------------------------------------------------------- FITS


def write_master(master: Master, path: str | os.PathLike) -> Master:
    """Write ``master`` as a float32 FITS with provenance headers, atomically.

    Headers: ``IMAGETYP`` (``Master Dark``...), ``SSKIND``, ``NCOMBINE``,
    ``EXPTIME``, ``ISOSPEED``, ``GAIN``, ``CCD-TEMP``, ``METHOD``, ``CLIPLOW``,
    ``CLIPHIGH``, ``CLIPITER``, ``BAYERPAT`` (with ``ROWORDER = 'TOP-DOWN'``),
    ``INSTRUME``, ``BLACK0``..``BLACK3``, ``WHITELVL``, ``BUNIT``, ``BIASSUB``
    (dark), ``FLATOFFS``/``FLATNORM``/``FLATMEDx`` (flat), ``SSKEY``, ``SSVER``,
    ``DATE``, and one ``HISTORY`` line per source file.

    Returns
    -------
    Master
        The same master with ``meta.path`` set to ``path``.

    Raises
    ------
    OutputError
        When ``path`` is one of the master's source frames or cannot be written.
    """
    from skystack.engine.fitsfile import card, write_images

    dest = Path(os.fspath(path)).expanduser()
    m = master.meta
    for s in m.sources:
        try:
            if dest.exists() and os.path.samefile(dest, s):
                raise OutputError(f"refusing to write master {m.kind} to {dest}: it is one of its input frames; "
                                  "choose another -o path")
        except FileNotFoundError:
            continue
    data = np.ascontiguousarray(to_host(master.data), dtype=np.float32)
    hdr: list[str] = []
    hdr += card("IMAGETYP", _IMAGETYP[m.kind], "skystack master frame")
    hdr += card("SSKIND", m.kind, "skystack master kind")
    hdr += card("NCOMBINE", int(m.count), "number of frames combined")
    for key, v, comment in (("EXPTIME", m.exposure_s, "[s] median exposure of the frames"),
                            ("ISOSPEED", m.iso, "median ISO of the frames"),
                            ("GAIN", m.gain, "median gain of the frames"),
                            ("CCD-TEMP", m.temperature_c, "[C] mean sensor temperature")):
        if v is not None:  # unknown values are left out, not invented
            hdr += card(key, float(v), comment)
    hdr += card("METHOD", m.method, "combine: sigma (clipped mean), median or mean")
    hdr += card("CLIPLOW", float(m.kappa_low), "kappa below the median")
    hdr += card("CLIPHIGH", float(m.kappa_high), "kappa above the median")
    hdr += card("CLIPITER", int(m.max_iter), "most clipping rounds")
    if m.pattern is not None:
        hdr += card("BAYERPAT", m.pattern, "CFA pattern of the data as stored")
    hdr += card("ROWORDER", "TOP-DOWN", "row 0 is the top row")
    if m.camera is not None:
        hdr += card("INSTRUME", fits_text(m.camera), "camera of the frames")
    for i, b in enumerate(m.black_level):
        hdr += card(f"BLACK{i}", float(b), f"black level (ADU), 2x2 position {i}")
    hdr += card("WHITELVL", float(m.white_level), "white level (ADU)")
    hdr += card("BUNIT", "", "dimensionless: (adu - black) / (white - black)")
    hdr += card("BIASSUB", bool(m.bias_subtracted), "dark: master bias subtracted (thermal only)")
    hdr += card("FLATOFFS", m.flat_offset, "flat: offset removed before normalising")
    if m.flat_medians is not None:
        hdr += card("FLATNORM", "per-colour median", "flat divided by each CFA colour's median")
        for lbl, v in zip("RGB" if len(m.flat_medians) == 3 else "L", m.flat_medians):
            hdr += card(f"FLATMED{lbl}", float(v), f"flat median of {lbl} before normalising")
    if m.flat_noise is not None:
        for k, v, what in zip(("FLATNOIS", "FLATPRNU", "FLATRESN"), m.flat_noise,
                              ("flat pixel noise, relative", "flat PRNU, relative",
                               "flat pixel noise after shrinking")):
            hdr += card(k, float(v), what)
    hdr += card("SSKEY", m.key)  # 64 hex digits: no room for a comment
    hdr += card("SSVER", __version__, "skystack version")
    hdr += card("SSCACHEV", CACHE_VERSION, "skystack master format version")
    hdr += card("DATE", m.created, "UTC time of the combine")
    for s in m.sources:
        hdr += card("HISTORY", fits_text(f"source: {Path(s).name}"))
    for s in m.skipped:
        hdr += card("HISTORY", fits_text(f"skipped: {s}")[:72])
    with atomic_path(dest) as tmp:
        write_images(tmp, [(data, hdr, None)])
    return dataclasses.replace(master, meta=dataclasses.replace(m, path=str(dest)))


def _opt(h: Any, key: str) -> Any:
    v = h.get(key)
    if v is None or (isinstance(v, str) and v == ""):
        return None
    return v


def is_master_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a FITS file written by :func:`write_master` (has ``SSKIND``)."""
    p = Path(os.fspath(path))
    if p.suffix.lower() not in (".fits", ".fit", ".fts") or not p.is_file():
        return False
    from skystack.engine.fitsfile import read_header

    fast = read_header(p)
    if fast is not None:
        return "SSKIND" in fast
    from astropy.io import fits

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return "SSKIND" in fits.getheader(p, 0)
    except Exception:
        return False


def read_master(path: str | os.PathLike) -> Master:
    """Read a master written by :func:`write_master`.

    Raises
    ------
    InputNotFound
        ``path`` does not exist.
    CalibrationError
        The file is not a skystack master (no ``SSKIND`` header) or is damaged.
    """
    p = Path(os.fspath(path)).expanduser()
    if not p.is_file():
        raise InputNotFound(f"master {p} does not exist; check the path")
    try:
        h, data = _read_master_file(p)
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"master {p} cannot be read ({exc}); rebuild it with 'skystack master'") from exc
    kind = h.get("SSKIND")
    if kind not in KINDS or data is None:
        raise CalibrationError(
            f"{p} is not a skystack master (no SSKIND header); pass it as a calibration frame instead, "
            "or build a master with 'skystack master'"
        )
    meds = None
    if "FLATNORM" in h:
        meds = tuple(float(h[k]) for k in ("FLATMEDR", "FLATMEDG", "FLATMEDB", "FLATMEDL") if k in h)
    meta = MasterMeta(
        kind=kind, count=int(h.get("NCOMBINE", 0)), shape=tuple(int(s) for s in data.shape),
        pattern=_opt(h, "BAYERPAT"), camera=_opt(h, "INSTRUME"),
        exposure_s=_opt(h, "EXPTIME"), iso=_opt(h, "ISOSPEED"), gain=_opt(h, "GAIN"),
        temperature_c=_opt(h, "CCD-TEMP"), method=str(h.get("METHOD", "sigma")),
        kappa_low=float(h.get("CLIPLOW", 3.0)), kappa_high=float(h.get("CLIPHIGH", 3.0)),
        max_iter=int(h.get("CLIPITER", 0)),
        black_level=tuple(float(h.get(f"BLACK{i}", 0.0)) for i in range(4)),  # type: ignore[arg-type]
        white_level=float(h.get("WHITELVL", 65535.0)), bias_subtracted=bool(h.get("BIASSUB", False)),
        flat_offset=str(h.get("FLATOFFS", "none")), flat_medians=meds,
        flat_noise=tuple(float(h[k]) for k in ("FLATNOIS", "FLATPRNU", "FLATRESN")) if "FLATNOIS" in h else None,
        sources=tuple(str(v).removeprefix("source: ") for v in h.get("HISTORY", []) if str(v).startswith("source: ")),
        key=str(h.get("SSKEY", "")) or _file_key(p), path=str(p), created=str(h.get("DATE", "")),
        skipped=tuple(str(v).removeprefix("skipped: ") for v in h.get("HISTORY", [])
                      if str(v).startswith("skipped: ")),
    )
    return Master(data=data, meta=meta, from_cache=False)


def _read_master_file(p: Path) -> tuple[Any, np.ndarray | None]:
    """The primary header and float32 image of a master file: written by :func:`write_master`, a
    plain image that :mod:`~skystack.engine.fitsfile` reads; through astropy otherwise."""
    from skystack.engine.fitsfile import read_header, read_pixels

    h = read_header(p)
    if h is not None:
        data = read_pixels(p, h)
        if data is not None:
            return h, data.astype(np.float32, copy=False)
    from astropy.io import fits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(p, memmap=False) as hdul:
            h = hdul[0].header
            return h, None if hdul[0].data is None else np.array(hdul[0].data, dtype=np.float32)


def _file_key(p: Path) -> str:
    return hashlib.sha256(json.dumps(file_identity(p.resolve())).encode()).hexdigest()
