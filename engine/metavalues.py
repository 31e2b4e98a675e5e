"""Header and EXIF values as :class:`~skystack.engine.frame.FrameMeta` fields.

The frame readers (:mod:`skystack.engine.io` and :mod:`skystack.engine.rawfile`)
share these parsers: numbers from any of the forms EXIF and FITS write them in,
text cleaned of NULs and runs of spaces, EXIF times as ISO-8601, camera names,
the canonical ``IMAGETYP`` and the white level of float data. Each returns
``None`` for a value that is missing or unusable, never a guess.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from skystack.engine.errors import FrameReadError
from skystack.engine.frame import BAYER_PATTERNS

__all__ = [
    "number",
    "iso_speed",
    "clean_text",
    "camera_name",
    "exif_time",
    "white_level_for",
    "bayer_pattern",
    "canonical_imagetyp",
    "jsonable",
    "exc_text",
    "truncated_error",
]


def number(v: Any, *, positive: bool = False) -> float | None:
    """A finite float from a number, string, (num, den) tuple or 1-element list; else None."""
    if v is None or isinstance(v, bool):
        return None
    try:
        if isinstance(v, (tuple, list)):
            if len(v) == 2 and all(isinstance(x, (int, np.integer)) for x in v):
                if v[1] == 0:
                    return None
                x = float(v[0]) / float(v[1])
            elif len(v) >= 1:
                return number(v[0], positive=positive)
            else:
                return None
        elif isinstance(v, (bytes, str)):
            s = v.decode("ascii", "ignore") if isinstance(v, bytes) else v
            x = float(s.strip())
        else:
            x = float(v)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return None
    if not math.isfinite(x) or (positive and x <= 0):
        return None
    return x


def iso_speed(v: Any) -> float | None:
    """EXIF ISO: a number or a list of numbers (first one), 0 meaning unknown."""
    if isinstance(v, (tuple, list)):
        v = v[0] if v else None
    return number(v, positive=True)


def clean_text(v: Any) -> str | None:
    """Text of a header or EXIF value (bytes decoded, NULs and runs of spaces collapsed); empty → None."""
    if v is None:
        return None
    if isinstance(v, bytes):
        v = v.decode("utf-8", "ignore")
    s = " ".join(str(v).replace("\x00", " ").split())
    return s or None


def camera_name(make: Any, model: Any) -> str | None:
    """``"make model"``, or the model alone when it already starts with the make."""
    make, model = clean_text(make), clean_text(model)
    if make and model:
        return model if model.lower().startswith(make.split()[0].lower()) else f"{make} {model}"
    return model or make


_EXIF_DT = re.compile(r"(\d{4})[:\-](\d{2})[:\-](\d{2})[ T](\d{2}):(\d{2}):(\d{2})")


def exif_time(dto: Any, subsec: Any = None, offset: Any = None) -> str | None:
    """``'2024:01:02 03:04:05'`` (+ sub-seconds, + ``'+01:00'``) as ISO-8601."""
    s = clean_text(dto)
    if not s:
        return None
    m = _EXIF_DT.match(s)
    if not m or m.group(1) == "0000":
        return None
    out = "{}-{}-{}T{}:{}:{}".format(*m.groups())
    sub = clean_text(subsec)
    if sub and sub.isdigit():
        out += "." + sub
    off = clean_text(offset)
    if off and re.fullmatch(r"[+-]\d{2}:\d{2}", off):
        out += off
    return out


def white_level_for(values: np.ndarray) -> float:
    """White level of float / 32-bit data: the smallest of 1, 65535 and the maximum that holds it."""
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if finite.size == 0:
        return 1.0
    top = float(finite.max())
    if top <= 1.0 + 1e-6:
        return 1.0
    if top <= 65535.5:
        return 65535.0
    return top


def bayer_pattern(letters: str) -> str | None:
    """``letters`` upper-cased when they name a 2x2 RGB Bayer pattern (``"RGGB"``...), else None."""
    letters = letters.upper()
    return letters if letters in BAYER_PATTERNS else None


def canonical_imagetyp(v: Any) -> str | None:
    """``IMAGETYP`` lower-cased, ``" frame"`` dropped, ``offset`` → ``bias``, dark-flat spellings → ``darkflat``."""
    s = clean_text(v)
    if not s:
        return None
    s = s.lower()
    for tail in (" frame", " field", " frames"):
        if s.endswith(tail):
            s = s[: -len(tail)].strip()
    if s in ("offset", "bias"):
        return "bias"
    if s.replace("-", " ").replace("_", " ") in ("dark flat", "flat dark", "darkflat", "flatdark"):
        return "darkflat"
    return s


def jsonable(v: Any) -> Any:
    """A header value as a JSON scalar (numpy numbers as Python ones, anything else as text)."""
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return str(v)


def exc_text(exc: BaseException) -> str:
    """The message of ``exc`` on one line (rawpy's ``b'...'`` unwrapped), or its type name."""
    text = str(exc).strip()
    m = re.fullmatch(r"b'(.*)'", text)
    if m:
        text = m.group(1)
    text = " ".join(text.split())
    return text or type(exc).__name__


def truncated_error(p: Path, reason: str, what: str = "RAW") -> FrameReadError:
    """The error for a ``what`` file cut short, saying ``reason`` and how to fix it."""
    return FrameReadError(f"{p}: truncated {what} file ({reason}); copy it again from the camera or card")
