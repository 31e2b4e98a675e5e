"""Plain FITS images without astropy: a primary image's header and pixels read, image HDUs written.

astropy is the field's FITS library and skystack keeps it for everything else:
compressed and gzipped files, images in extensions, uncommon pixel types and
header forms, and the tests' reading of what is written here. But importing
``astropy.io.fits`` pulls in ``astropy.units`` (0.2-0.3 s before a run's first
frame, on the critical path), and a header parsed through it costs ~1.5 ms a
frame. The lights, calibration frames and masters of a session are plain
images in a primary HDU, and skystack's outputs are plain images with image
extensions, so this module reads and writes exactly those (FITS 4.0, sections
3, 4 and 7.1). :func:`read_header` hands back ``None`` for anything it does not
fully understand, and the caller then asks astropy.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

__all__ = ["Header", "read_header", "read_pixels", "write_images", "card"]

BLOCK = 2880
CARD = 80
_MAX_HEADER_BLOCKS = 200  # 7200 cards: beyond that, astropy
_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([EeDd][+-]?\d+)?")
_KEY = re.compile(r"[A-Z0-9_-]{1,8}")
_COMMENTARY = ("COMMENT", "HISTORY", "")
#: The pixel types read here: BITPIX -> big-endian dtype.
_DTYPES = {8: ">u1", 16: ">i2", -32: ">f4"}


class Header(Mapping):
    """The valued cards of a primary header (the first of a repeated keyword, as astropy's
    ``header[key]``; ``COMMENT`` and ``HISTORY`` the list of their texts), looked up
    case-insensitively; ``data_offset`` is where the pixels start."""

    def __init__(self, values: dict[str, Any], data_offset: int) -> None:
        self._values = values
        self.data_offset = data_offset

    def __getitem__(self, key: str) -> Any:
        return self._values[key.upper()]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.upper() in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


class _Unsupported(Exception):
    """A header form this module leaves to astropy."""


def _value(text: str) -> Any:
    """The value of a card's value field (from column 11)."""
    t = text.lstrip()
    if t.startswith("'"):
        out, i = [], 1
        while i < len(t):
            if t[i] == "'":
                if t[i + 1:i + 2] != "'":
                    return "".join(out).rstrip()
                i += 1
            out.append(t[i])
            i += 1
        raise _Unsupported("unterminated string")
    v = t.split("/", 1)[0].strip()
    if v in ("T", "F"):
        return v == "T"
    if _INT.fullmatch(v):
        return int(v)
    if _FLOAT.fullmatch(v):
        return float(v.replace("D", "E").replace("d", "e"))
    raise _Unsupported(f"value {v!r}")  # undefined, complex, malformed


def _parse(block: bytes, values: dict[str, Any]) -> bool:
    """Add the valued cards of one header block to ``values``; True at the END card."""
    try:
        text = block.decode("ascii")
    except UnicodeDecodeError:
        raise _Unsupported("non-ASCII header") from None
    for k in range(0, BLOCK, CARD):
        c = text[k:k + CARD]
        key = c[:8].rstrip()
        if key == "END":
            return True
        if key in _COMMENTARY and c[8:10] != "= ":
            if key:  # COMMENT and HISTORY: their texts, in order (astropy's header["HISTORY"])
                values.setdefault(key, []).append(c[8:].rstrip())
            continue
        if key in ("CONTINUE", "HIERARCH") or c[8:10] != "= " or not _KEY.fullmatch(key):
            raise _Unsupported(f"card {key!r}")
        values.setdefault(key, _value(c[10:]))
    return False


def read_header(path: str | os.PathLike) -> Header | None:
    """The header of the plain image in a FITS file's primary HDU, or None (ask astropy).

    None when the file does not start a FITS primary header, the primary HDU
    holds no image of two or more axes, or a card is of a form read only by
    astropy: a long string (``CONTINUE``), ``HIERARCH``, an undefined or complex
    value, non-ASCII text.
    """
    values: dict[str, Any] = {}
    try:
        with open(path, "rb") as f:
            for n in range(1, _MAX_HEADER_BLOCKS + 1):
                block = f.read(BLOCK)
                if len(block) < BLOCK or (n == 1 and not block.startswith(b"SIMPLE  = ")):
                    return None
                if _parse(block, values):
                    break
            else:
                return None
    except _Unsupported:
        return None
    naxis = values.get("NAXIS")
    if values.get("SIMPLE") is not True or not isinstance(naxis, int) or naxis < 2 or "ZIMAGE" in values:
        return None
    return Header(values, n * BLOCK)


def read_pixels(path: str | os.PathLike, header: Header, shape: tuple[int, ...] | None = None) -> np.ndarray | None:
    """The primary image's pixels (``shape``, default the header's axes slowest first, native byte
    order) for BITPIX 8, 16 and -32 without scaling (BZERO 0, BSCALE 1), else None (ask astropy).
    Unsigned 16-bit data (BZERO 32768) is read by :func:`skystack.engine.io._read_fits_u16`."""
    if shape is None:
        shape = tuple(int(header.get(f"NAXIS{i}", 0)) for i in range(header["NAXIS"], 0, -1))
    dtype = _DTYPES.get(header.get("BITPIX"))
    if dtype is None or header.get("BZERO", 0) != 0 or header.get("BSCALE", 1) != 1:
        return None
    count = int(np.prod(shape))
    data = np.fromfile(path, dtype=dtype, count=count, offset=header.data_offset)
    if data.size != count:
        return None
    return data.astype(np.dtype(dtype).newbyteorder("="), copy=False).reshape(shape)


# ----------------------------------------------------------------------------------------------- writing


def _float_text(v: float) -> str:
    if not np.isfinite(v):
        raise ValueError(f"a FITS header cannot hold {v}")
    s = repr(float(v)).upper()
    if "E" in s:
        mant, exp = s.split("E")
        s = f"{mant if '.' in mant else mant + '.0'}E{int(exp):+03d}"
    elif "." not in s:
        s += ".0"
    return s if len(s) <= 20 else f"{v:.15E}"


def card(key: str, value: Any = None, comment: str = "") -> list[str]:
    """The 80-column card(s) of ``key = value / comment`` (``COMMENT``/``HISTORY``: ``value`` is
    the text, one card per 72 characters; a string longer than a card continues on ``CONTINUE``
    cards, the long-string convention astropy reads)."""
    if not _KEY.fullmatch(key):
        raise ValueError(f"{key!r} is not a FITS keyword (1-8 of A-Z 0-9 _ -)")
    if key in ("COMMENT", "HISTORY"):
        text = str(value)
        return [f"{key:<8}{text[i:i + 72]:<72}" for i in range(0, max(len(text), 1), 72)]
    if isinstance(value, (bool, np.bool_)):
        field = f"{'T' if value else 'F':>20}"
    elif isinstance(value, (int, np.integer)):
        field = f"{int(value):>20}"
    elif isinstance(value, (float, np.floating)):
        field = f"{_float_text(float(value)):>20}"
    elif isinstance(value, str):
        q = value.replace("'", "''")
        if len(q) > 68:
            parts = _string_parts(value, 67)
            head = [f"{key:<8}= '{parts[0]}&'", *(f"CONTINUE  '{p}&'" for p in parts[1:-1]),
                    f"CONTINUE  '{parts[-1]}'"]
            return [c.ljust(80) for c in head]
        field = f"{chr(39) + q.ljust(8) + chr(39):<20}"
    else:
        raise ValueError(f"{key}: a FITS header cannot hold {type(value).__name__}")
    text = f"{key:<8}= {field}" + (f" / {comment}" if comment else "")
    return [text[:80].ljust(80)]


def _string_parts(value: str, width: int) -> list[str]:
    """``value`` quoted (``'`` doubled) in pieces of at most ``width`` characters, no quote pair cut."""
    parts, cur = [], ""
    for ch in value:
        q = "''" if ch == "'" else ch
        if len(cur) + len(q) > width:
            parts.append(cur)
            cur = ""
        cur += q
    return [*parts, cur]


_BITPIX = {np.dtype(np.float32): -32, np.dtype(np.int16): 16, np.dtype(np.uint8): 8}


def _hdu_bytes(data: np.ndarray, cards: Iterable[str], first: bool, name: str | None) -> bytes:
    bitpix = _BITPIX.get(data.dtype)
    if bitpix is None:
        raise ValueError(f"image HDUs are written as float32, int16 or uint8, not {data.dtype}")
    head = card("SIMPLE", True, "conforms to FITS standard") if first else \
        card("XTENSION", "IMAGE", "Image extension")
    head += card("BITPIX", bitpix, "array data type") + card("NAXIS", data.ndim, "number of array dimensions")
    for i, n in enumerate(data.shape[::-1], 1):
        head += card(f"NAXIS{i}", int(n))
    head += card("EXTEND", True) if first else card("PCOUNT", 0, "number of parameters") + \
        card("GCOUNT", 1, "number of groups")
    if name is not None:
        head += card("EXTNAME", name, "extension name")
    text = "".join(head) + "".join(cards) + "END".ljust(CARD)
    text += " " * (-len(text) % BLOCK)
    raw = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder(">")).tobytes()
    return text.encode("ascii") + raw + b"\0" * (-len(raw) % BLOCK)


def write_images(path: str | os.PathLike, hdus: Iterable[tuple[np.ndarray, list[str], str | None]]) -> None:
    """Write ``(data, cards, extname)`` image HDUs, the first the primary one (its ``extname`` None).

    ``cards`` are :func:`card` lines; the structural cards (``SIMPLE``/``XTENSION``, ``BITPIX``,
    ``NAXISn``, ``EXTEND``/``PCOUNT``/``GCOUNT``, ``EXTNAME``) are written here.
    """
    with open(path, "wb") as f:
        for k, (data, cards, name) in enumerate(hdus):
            f.write(_hdu_bytes(np.asarray(data), cards, k == 0, name))
