"""Minimal DNG writer for Bayer CFA mosaics (used by the synthetic night simulator).

The file is a classic little-endian TIFF written by :mod:`tifffile`: one
uncompressed 16-bit CFA image in IFD0 (``NewSubfileType = 0``, one strip,
``PhotometricInterpretation = 32803``) with the DNG tags LibRaw needs
(``DNGVersion``, ``CFARepeatPatternDim``/``CFAPattern``, ``BlackLevelRepeatDim``
+ four ``BlackLevel`` values in the 2x2 order of :mod:`skystack.engine.frame`,
``WhiteLevel``, ``ColorMatrix1``, ``AsShotNeutral``...).

Capture settings are written twice, in the same values:

* in an EXIF sub-IFD (tag 34665, as cameras do; :mod:`tifffile` exposes it as
  ``page.tags["ExifTag"].value``, a dict with ``ExposureTime``,
  ``ISOSpeedRatings``, ``FocalLength``, ``DateTimeOriginal``...), and
* in IFD0 itself (``page.tags["ExposureTime"]``...), which LibRaw also parses.

``Make``/``Model``/``DateTime`` are IFD0 tags as usual. Written atomically
(temporary file in the target folder, then :func:`os.replace`).
"""

from __future__ import annotations

import datetime as _dt
import os
import struct
from fractions import Fraction
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from skystack.engine.errors import OutputError
from skystack.engine.frame import BAYER_PATTERNS

__all__ = ["write_dng", "DEFAULT_COLOR_MATRIX"]

#: XYZ(D65) -> camera matrix used when none is given (Adobe's Canon EOS 550D matrix).
DEFAULT_COLOR_MATRIX = (
    (0.6941, -0.1164, -0.0857),
    (-0.3825, 1.1597, 0.2534),
    (-0.0416, 0.1540, 0.6039),
)

_CFA_CODE = {"R": 0, "G": 1, "B": 2}

# TIFF field types
_BYTE, _ASCII, _SHORT, _LONG, _RATIONAL, _SRATIONAL = 1, 2, 3, 4, 5, 10


def _rational(value: float, max_den: int = 1_000_000) -> tuple[int, int]:
    f = Fraction(float(value)).limit_denominator(max_den)
    if f.numerator < 0:
        raise ValueError(f"EXIF value {value} must be >= 0")
    return f.numerator, f.denominator


def _srational(value: float, den: int = 10000) -> tuple[int, int]:
    return int(round(float(value) * den)), den


def _exif_datetime(ts: Any) -> str:
    """Return ``YYYY:MM:DD HH:MM:SS`` from a datetime or an ISO-8601 string."""
    if isinstance(ts, str):
        text = ts.strip().replace("Z", "+00:00")
        try:
            ts = _dt.datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"timestamp {ts!r} is not ISO-8601 (e.g. 2025-03-01T21:00:00)") from None
    if not isinstance(ts, _dt.datetime):
        raise ValueError(f"timestamp must be a datetime or ISO-8601 string, got {type(ts).__name__}")
    if ts.tzinfo is not None:
        ts = ts.astimezone(_dt.timezone.utc).replace(tzinfo=None)
    return ts.strftime("%Y:%m:%d %H:%M:%S")


def _exif_entries(exif: Mapping[str, Any]) -> list[tuple[int, int, int, Any]]:
    """(code, type, count, value) of the EXIF tags present in ``exif``."""
    out: list[tuple[int, int, int, Any]] = []
    if exif.get("exposure_s") is not None:
        out.append((33434, _RATIONAL, 1, _rational(exif["exposure_s"])))  # ExposureTime
    if exif.get("f_number") is not None:
        out.append((33437, _RATIONAL, 1, _rational(exif["f_number"], 1000)))  # FNumber
    if exif.get("iso") is not None:
        out.append((34855, _SHORT, 1, (int(round(exif["iso"])),)))  # ISOSpeedRatings
    if exif.get("timestamp") is not None:
        text = _exif_datetime(exif["timestamp"])
        out.append((36867, _ASCII, 0, text))  # DateTimeOriginal
        out.append((36868, _ASCII, 0, text))  # DateTimeDigitized
        out.append((36881, _ASCII, 0, "+00:00"))  # OffsetTimeOriginal (times are UTC)
    if exif.get("focal_length_mm") is not None:
        out.append((37386, _RATIONAL, 1, _rational(exif["focal_length_mm"], 1000)))  # FocalLength
    if exif.get("temperature_c") is not None:
        out.append((37888, _SRATIONAL, 1, _srational(exif["temperature_c"], 100)))  # Temperature
    return out


def _pack_ifd(entries: list[tuple[int, int, int, Any]], base: int) -> bytes:
    """Pack a little-endian TIFF IFD placed at file offset ``base`` (even)."""
    entries = sorted(entries, key=lambda e: e[0])
    n = len(entries)
    data_start = base + 2 + 12 * n + 4
    head = [struct.pack("<H", n)]
    extra = bytearray()
    for code, typ, count, value in entries:
        if typ == _ASCII:
            raw = value.encode("ascii") + b"\x00"
            count = len(raw)
        elif typ == _SHORT:
            raw = struct.pack(f"<{len(value)}H", *value)
            count = len(value)
        elif typ == _LONG:
            raw = struct.pack(f"<{len(value)}I", *value)
            count = len(value)
        elif typ == _RATIONAL:
            raw = struct.pack("<2I", *value)
            count = 1
        elif typ == _SRATIONAL:
            raw = struct.pack("<2i", *value)
            count = 1
        else:  # pragma: no cover - only the types above are produced
            raise OutputError(f"unsupported EXIF type {typ}")
        if len(raw) <= 4:
            field = raw.ljust(4, b"\x00")
        else:
            if len(extra) % 2:
                extra += b"\x00"
            field = struct.pack("<I", data_start + len(extra))
            extra += raw
        head.append(struct.pack("<HHI", code, typ, count) + field)
    head.append(struct.pack("<I", 0))  # no next IFD
    return b"".join(head) + bytes(extra)


def _patch_exif_ifd(fh, entries: list[tuple[int, int, int, Any]]) -> None:
    """Append an EXIF IFD at the end of the open TIFF and point tag 34665 at it."""
    fh.seek(0)
    header = fh.read(8)
    if header[:4] != b"II*\x00":
        raise OutputError("internal error: expected a little-endian classic TIFF from tifffile")
    (ifd0,) = struct.unpack("<I", header[4:8])
    fh.seek(ifd0)
    (n,) = struct.unpack("<H", fh.read(2))
    table = fh.read(12 * n)
    value_pos = None
    for k in range(n):
        code = struct.unpack("<H", table[12 * k: 12 * k + 2])[0]
        if code == 34665:
            value_pos = ifd0 + 2 + 12 * k + 8
            break
    if value_pos is None:
        raise OutputError("internal error: ExifTag placeholder missing from IFD0")
    fh.seek(0, os.SEEK_END)
    end = fh.tell()
    if end % 2:
        fh.write(b"\x00")
        end += 1
    fh.write(_pack_ifd(entries, end))
    fh.seek(value_pos)
    fh.write(struct.pack("<I", end))


def write_dng(
    path: str | os.PathLike,
    cfa: np.ndarray,
    *,
    pattern: str,
    black_level: Sequence[float],
    white_level: int,
    wb: Sequence[float] | None = None,
    as_shot_neutral: Sequence[float] | None = None,
    color_matrix: Sequence[Sequence[float]] | None = None,
    exif: Mapping[str, Any] | None = None,
) -> None:
    """Write a Bayer mosaic as an uncompressed DNG that rawpy/LibRaw reads bit-exact.

    Parameters
    ----------
    path : str or PathLike
        Output file (``.dng``). Written atomically; an existing file is replaced.
    cfa : ndarray, shape (H, W), uint16
        Raw mosaic in ADU.
    pattern : str
        Bayer pattern of the 2x2 tile, row-major (``"RGGB"``, ``"BGGR"``,
        ``"GRBG"``, ``"GBRG"``).
    black_level : sequence of 4 numbers
        Black level per 2x2 CFA position (same order as ``pattern``); written
        as ``BlackLevelRepeatDim = (2, 2)`` + 4 ``BlackLevel`` values (LONG,
        so they are rounded to integers).
    white_level : int
        Saturation level in ADU (``WhiteLevel``).
    wb : sequence of 3 float, optional
        Camera white-balance multipliers (R, G, B); written as
        ``AsShotNeutral = 1 / wb`` normalised to G = 1. Ignored when
        ``as_shot_neutral`` is given.
    as_shot_neutral : sequence of 3 float, optional
        ``AsShotNeutral`` (camera response to neutral light, R, G, B).
        Default ``(1, 1, 1)``.
    color_matrix : 3x3 floats, optional
        ``ColorMatrix1`` (XYZ -> camera, illuminant D65). Default
        :data:`DEFAULT_COLOR_MATRIX`.
    exif : mapping, optional
        Capture settings: ``exposure_s``, ``iso``, ``focal_length_mm``,
        ``f_number``, ``temperature_c``, ``timestamp`` (datetime or ISO-8601;
        aware values are converted to UTC; naive ones are taken as UTC),
        ``make``, ``model``. Missing keys are simply not written.

    Raises
    ------
    OutputError
        On invalid data or arguments, or when the file cannot be written.
    """
    import tifffile

    from skystack.engine.output import atomic_path

    path = Path(path)
    cfa = np.asarray(cfa)
    black, white = _checked_levels(path, cfa, pattern, black_level, white_level)
    exif = dict(exif or {})
    neutral = _as_shot_neutral(path, wb, as_shot_neutral)
    cm = np.asarray(DEFAULT_COLOR_MATRIX if color_matrix is None else color_matrix, dtype=float)
    if cm.shape != (3, 3):
        raise OutputError(f"{path}: color_matrix must be 3x3, got shape {cm.shape}")
    tags = _ifd0_tags(pattern, black, white, cm, neutral, exif)
    exif_entries = _exif_tags_into(path, exif, tags)
    tags.sort(key=lambda t: 34665 if isinstance(t[0], str) else t[0])

    with atomic_path(path) as tmp_name:  # errors name the path and the fix
        tifffile.imwrite(
            tmp_name, np.ascontiguousarray(cfa), photometric="cfa", planarconfig=None,
            compression=None, rowsperstrip=cfa.shape[0], metadata=None, software="skystack synth",
            byteorder="<", bigtiff=False, extratags=tags,
        )
        with open(tmp_name, "r+b") as fh:
            _patch_exif_ifd(fh, exif_entries)


def _checked_levels(path: Path, cfa: np.ndarray, pattern: str, black_level: Sequence[float],
                    white_level: int) -> tuple[list[float], int]:
    """Validate the mosaic, its pattern and its levels; return ``(black, white)``."""
    if cfa.ndim != 2 or cfa.dtype != np.uint16:
        raise OutputError(f"{path}: DNG data must be a 2-D uint16 mosaic, got {cfa.dtype} {cfa.shape}")
    if pattern not in BAYER_PATTERNS:
        raise OutputError(f"{path}: Bayer pattern {pattern!r} unknown; use one of {', '.join(BAYER_PATTERNS)}")
    black = [float(b) for b in black_level]
    if len(black) != 4:
        raise OutputError(f"{path}: black_level needs 4 values (2x2 CFA order), got {len(black)}")
    white = int(white_level)
    if not 0 < white <= 65535 or any(b < 0 or b >= white for b in black):
        raise OutputError(f"{path}: need 0 <= black < white <= 65535, got black {black}, white {white}")
    return black, white


def _as_shot_neutral(path: Path, wb: Sequence[float] | None,
                     as_shot_neutral: Sequence[float] | None) -> list[float]:
    """``AsShotNeutral``: given, else ``1 / wb`` normalised to G = 1, else ``(1, 1, 1)``."""
    if as_shot_neutral is None:
        if wb is not None:
            mult = np.asarray(wb, dtype=float)
            neutral = (mult[1] / mult).tolist()
        else:
            neutral = [1.0, 1.0, 1.0]
    else:
        neutral = [float(v) for v in as_shot_neutral]
    if len(neutral) != 3 or min(neutral) <= 0:
        raise OutputError(f"{path}: AsShotNeutral/wb needs 3 positive values, got {neutral}")
    return neutral


def _ifd0_tags(pattern: str, black: list[float], white: int, cm: np.ndarray, neutral: list[float],
               exif: Mapping[str, Any]) -> list[tuple[int | str, int, int, Any, bool]]:
    """The DNG tags of IFD0 (tifffile ``extratags``), capture settings not included."""
    make = str(exif.get("make") or "Skystack")
    model = str(exif.get("model") or "SynthCam")
    unique = model if model.startswith(make) else f"{make} {model}"
    return [
        (254, _LONG, 1, 0, True),  # NewSubfileType: main (full-resolution) image
        (271, _ASCII, 0, make, True),
        (272, _ASCII, 0, model, True),
        (274, _SHORT, 1, 1, True),  # Orientation: top-left
        (33421, _SHORT, 2, (2, 2), True),  # CFARepeatPatternDim
        (33422, _BYTE, 4, bytes(_CFA_CODE[c] for c in pattern), True),  # CFAPattern
        # ExifTag placeholder, patched after writing; given by name because tifffile
        # filters IFD-type tags given by integer code.
        ("ExifTag", _LONG, 1, 0, True),
        (37398, _BYTE, 4, b"\x01\x00\x00\x00", True),  # TIFFEPStandardID
        (50706, _BYTE, 4, b"\x01\x04\x00\x00", True),  # DNGVersion 1.4.0.0
        (50707, _BYTE, 4, b"\x01\x01\x00\x00", True),  # DNGBackwardVersion 1.1.0.0
        (50708, _ASCII, 0, unique, True),  # UniqueCameraModel
        (50710, _BYTE, 3, b"\x00\x01\x02", True),  # CFAPlaneColor R, G, B
        (50711, _SHORT, 1, 1, True),  # CFALayout: rectangular
        (50713, _SHORT, 2, (2, 2), True),  # BlackLevelRepeatDim
        (50714, _LONG, 4, tuple(int(round(b)) for b in black), True),  # BlackLevel
        (50717, _LONG, 1, white, True),  # WhiteLevel
        (50721, _SRATIONAL, 9, tuple(v for x in cm.ravel() for v in _srational(x)), True),
        (50728, _RATIONAL, 3, tuple(v for x in neutral for v in _rational(x, 10000)), True),
        (50778, _SHORT, 1, 21, True),  # CalibrationIlluminant1: D65
    ]


def _exif_tags_into(path: Path, exif: Mapping[str, Any],
                    tags: list[tuple[int | str, int, int, Any, bool]]) -> list[tuple[int, int, int, Any]]:
    """Append the capture settings' IFD0 copies to ``tags``; return the EXIF IFD's entries."""
    try:
        exif_entries = _exif_entries(exif)
        if exif.get("timestamp") is not None:
            tags.append((306, _ASCII, 0, _exif_datetime(exif["timestamp"]), True))  # DateTime
    except (ValueError, TypeError) as exc:
        raise OutputError(f"{path}: bad EXIF value: {exc}") from None
    for code, typ, count, value in exif_entries:  # IFD0 copies (LibRaw parses these too)
        if typ in (_RATIONAL, _SRATIONAL):
            tags.append((code, typ, 1, value, True))
        elif typ == _ASCII:
            tags.append((code, typ, 0, value, True))
        else:
            tags.append((code, typ, len(value), value[0] if len(value) == 1 else value, True))
    return exif_entries
