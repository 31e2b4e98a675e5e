"""Frame I/O: open any light or calibration frame without debayering.

:func:`read_frame` returns the raw sensor data and its :class:`~skystack.engine.frame.FrameMeta`;
:func:`read_meta` returns the metadata alone, as cheaply as the format allows.

Formats
-------
* **Camera RAW** (CR2, CR3, NEF, ARW, RAF, ORF, RW2, DNG, PEF, SRW, ... see
  :data:`RAW_EXTENSIONS`) through rawpy/LibRaw. ``data`` is the *visible* CFA
  mosaic (``raw_image_visible``) as ``uint16``; ``pattern`` is relative to the
  visible area's top-left pixel (rawpy's ``raw_pattern`` is relative to the full
  raw frame, so the colours are taken with ``raw_color(top_margin + y,
  left_margin + x)``); both greens are ``'G'``. ``black_level`` is LibRaw's
  per-colour black mapped to the four 2x2 positions, ``white_level`` is LibRaw's
  ``white_level``, ``wb`` is ``camera_whitebalance`` divided by its green. EXIF
  (exposure, ISO, focal length, capture time, make/model) comes from the TIFF
  structure with tifffile for TIFF-based raws, else from LibRaw. X-Trans and
  other non-Bayer sensors return ``pattern=None`` with ``extra["cfa"]`` saying
  why. Colour raws (linear DNG, sRAW, Foveon) return ``(3, H, W)``.
* **FITS** through astropy: ``uint16`` (BITPIX 16 + BZERO 32768) and ``uint8``
  stay integer; ``int16`` becomes ``uint16`` when it holds no negative value,
  else ``float32``; 32-bit integer and float data become ``float32``. A 3-plane
  cube ``(3, H, W)`` is colour (``pattern=None``).
* **TIFF** through tifffile (mono, RGB, 16-bit, float; a TIFF/EP CFA page gives
  its pattern, any other 2-D page is mono) and **JPEG/PNG** through Pillow
  (8-bit, white level 255; 16-bit PNG stays ``uint16``).

Rules
-----
* Data is never flipped or rotated: row 0 is the first row stored in the file.
* **FITS Bayer pattern** (Siril's convention): ``BAYERPAT`` (or ``COLORTYP`` /
  ``CFA-TYPE``) names the pattern of the image read *top-down*. With
  ``ROWORDER='BOTTOM-UP'`` the first stored row is the bottom one, so the
  pattern is flipped vertically relative to the stored data, taking the height's
  parity into account (row ``r`` of the data is top-down row ``H - 1 - r``).
  With ``ROWORDER='TOP-DOWN'`` or no ``ROWORDER`` (Seestar, most capture
  programs; Siril's default) the pattern applies to the data as stored.
  ``XBAYROFF``/``YBAYROFF`` shift the pattern by that many columns/rows.
* **White level**: ``uint8`` 255, ``uint16`` 65535, ``int16`` 32767; float and
  32-bit integer data take the smallest of 1.0, 65535.0 and the data maximum
  that holds the data (so the reader scans float data even for
  :func:`read_meta`).
* **FITS black level**: ``BLKLEVEL``, else ``|PEDESTAL|`` (MaxIm writes the
  negated pedestal), else ``OFFSET`` (a camera offset setting, at most the true
  black in ADU), else 0.
  Float data in 0..1 (white level 1) with a black level of 1 ADU or more (a
  16-bit value the header kept) gets ``black / 65535``, the data's own scale.
* ``imagetyp`` is lower case, with a trailing ``" frame"``/``" field"`` removed,
  ``offset`` mapped to ``bias`` and dark-flat spellings mapped to ``darkflat``.
* For colour ``(3, H, W)`` data ``black_level`` holds R, G, B, G.

Errors: a missing path raises :class:`~skystack.engine.errors.InputNotFound`;
anything else that cannot be read (empty, truncated, renamed, unknown
extension) raises :class:`~skystack.engine.errors.FrameReadError` naming the
file, the reason and the fix. Truncated RAW files are detected from their
structure (TIFF strip/tile extents, ISO-BMFF box sizes, RAF directory) before
LibRaw sees them (depending on version and decoder LibRaw fills missing bytes
with zeros, or fails with an I/O error after printing to stderr); the LibRaw
decode itself runs under a time limit (:data:`RAW_DECODE_TIMEOUT_S`).
"""

from __future__ import annotations

import logging
import math
import os
import re
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np

from skystack.engine.errors import FrameReadError, InputNotFound
from skystack.engine.frame import BAYER_PATTERNS, Frame, FrameMeta

#: Camera RAW suffixes read through rawpy/LibRaw.
RAW_EXTENSIONS = frozenset({
    ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".raf", ".orf", ".rw2",
    ".rwl", ".dng", ".pef", ".srw", ".3fr", ".fff", ".iiq", ".x3f", ".erf", ".kdc", ".dcr",
    ".mrw", ".mos", ".mef",
})
#: FITS suffixes (gzip and tile-compressed included).
FITS_EXTENSIONS = frozenset({
    ".fit", ".fits", ".fts", ".fit.gz", ".fits.gz", ".fts.gz", ".fit.fz", ".fits.fz", ".fz",
})
#: TIFF suffixes read through tifffile.
TIFF_EXTENSIONS = frozenset({".tif", ".tiff"})
#: 8-bit image suffixes read through Pillow.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png"})
#: Every lower-case suffix :func:`read_frame` accepts.
FRAME_EXTENSIONS = RAW_EXTENSIONS | FITS_EXTENSIONS | TIFF_EXTENSIONS | IMAGE_EXTENSIONS

#: Seconds LibRaw may spend decoding one file before the read is abandoned.
RAW_DECODE_TIMEOUT_S = 60.0

_COMPOUND_SUFFIXES = tuple(s for s in FRAME_EXTENSIONS if s.count(".") > 1)
_KINDS = {**{s: "raw" for s in RAW_EXTENSIONS}, **{s: "fits" for s in FITS_EXTENSIONS},
          **{s: "tiff" for s in TIFF_EXTENSIONS}, **{s: "image" for s in IMAGE_EXTENSIONS}}


# ----------------------------------------------------------------------------- public API


def frame_suffix(path: str | os.PathLike) -> str:
    """Return the lower-case frame suffix of ``path`` (``".fits.gz"`` counts as one)."""
    name = Path(os.fspath(path)).name.lower()
    for s in _COMPOUND_SUFFIXES:
        if name.endswith(s):
            return s
    return Path(name).suffix


def is_frame_file(path: str | os.PathLike) -> bool:
    """True when ``path`` has a frame suffix (see :data:`FRAME_EXTENSIONS`).

    Decided from the name alone (no file is opened); macOS ``._*`` resource
    files and folders are not frame files.
    """
    p = Path(os.fspath(path))
    if p.name.startswith("._") or frame_suffix(p) not in FRAME_EXTENSIONS:
        return False
    return not p.is_dir()


def read_frame(path: str | os.PathLike, *, header_only: bool = False) -> Frame:
    """Read a frame's raw sensor data and metadata, without debayering.

    Parameters
    ----------
    path : str or os.PathLike
        A camera RAW, FITS, TIFF, JPEG or PNG file.
    header_only : bool
        Compatibility switch: return ``Frame(data=<empty array>, meta=read_meta(path))``.
        Prefer :func:`read_meta`.

    Returns
    -------
    Frame
        ``data`` is ``(H, W)`` (CFA mosaic or mono) or ``(3, H, W)`` (colour);
        ``uint16``/``uint8`` for integer files, ``float32`` for float files.

    Raises
    ------
    InputNotFound
        ``path`` does not exist.
    FrameReadError
        The file is empty, truncated, of an unknown type or cannot be decoded.
    """
    if header_only:
        return Frame(data=np.empty((0, 0), dtype=np.uint16), meta=read_meta(path))
    data, meta = _read(path, want_data=True)
    assert data is not None
    return Frame(data=data, meta=meta)


def read_meta(path: str | os.PathLike) -> FrameMeta:
    """Read a frame's metadata only.

    FITS, TIFF and JPEG/PNG headers are read without the pixels (except float
    data, scanned for its white level). rawpy offers no header-only mode, so a
    RAW file is decoded by LibRaw but its pixels are not copied.

    Raises
    ------
    InputNotFound, FrameReadError
        As :func:`read_frame`.
    """
    return _read(path, want_data=False)[1]


# ----------------------------------------------------------------------------- dispatch


def _read(path: str | os.PathLike, *, want_data: bool) -> tuple[np.ndarray | None, FrameMeta]:
    p = Path(os.fspath(path))
    if not p.exists():
        raise InputNotFound(f"{p}: no such file; check the path (quote names that contain spaces)")
    if p.is_dir():
        raise FrameReadError(f"{p}: is a folder, not a frame file; pass the files in it (or a glob)")
    suffix = frame_suffix(p)
    kind = _KINDS.get(suffix)
    if kind is None:
        raise FrameReadError(
            f"{p}: unknown frame type ({suffix or 'no extension'}); skystack reads camera RAW "
            "(CR2, CR3, NEF, ARW, RAF, ORF, RW2, DNG...), FITS (.fit/.fits), TIFF, JPEG and PNG")
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise FrameReadError(f"{p}: cannot be opened ({exc.strerror or exc}); check its permissions") from exc
    if size == 0:
        raise FrameReadError(f"{p}: file is empty (0 bytes); the copy was interrupted, copy it again")
    reader = {"raw": _read_raw, "fits": _read_fits, "tiff": _read_tiff, "image": _read_image}[kind]
    try:
        return reader(p, size, want_data)
    except (FrameReadError, InputNotFound):
        raise
    except MemoryError as exc:
        raise FrameReadError(f"{p}: not enough memory to decode it; close other programs") from exc
    except Exception as exc:  # any decoder failure becomes one clear line
        what = {"raw": "RAW", "fits": "FITS", "tiff": "TIFF", "image": "image"}[kind]
        raise FrameReadError(
            f"{p}: not a readable {what} file ({_reason(exc)}); is it truncated or renamed?") from exc


def _exc_text(exc: BaseException) -> str:
    """The message of ``exc`` on one line (rawpy's ``b'...'`` unwrapped), or its type name."""
    text = str(exc).strip()
    m = re.fullmatch(r"b'(.*)'", text)
    if m:
        text = m.group(1)
    text = " ".join(text.split())
    return text or type(exc).__name__


def _reason(exc: BaseException) -> str:
    text = _exc_text(exc)
    name = type(exc).__name__
    return text if text == name else f"{name}: {text}"


def _truncated(p: Path, reason: str, what: str = "RAW") -> FrameReadError:
    return FrameReadError(f"{p}: truncated {what} file ({reason}); copy it again from the camera or card")


# ----------------------------------------------------------------------------- small helpers


def _num(v: Any, *, positive: bool = False) -> float | None:
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
                return _num(v[0], positive=positive)
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


def _iso(v: Any) -> float | None:
    """EXIF ISO: a number or a list of numbers (first one), 0 meaning unknown."""
    if isinstance(v, (tuple, list)):
        v = v[0] if v else None
    return _num(v, positive=True)


def _text(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bytes):
        v = v.decode("utf-8", "ignore")
    s = " ".join(str(v).replace("\x00", " ").split())
    return s or None


def _camera(make: Any, model: Any) -> str | None:
    make, model = _text(make), _text(model)
    if make and model:
        return model if model.lower().startswith(make.split()[0].lower()) else f"{make} {model}"
    return model or make


_EXIF_DT = re.compile(r"(\d{4})[:\-](\d{2})[:\-](\d{2})[ T](\d{2}):(\d{2}):(\d{2})")


def _exif_time(dto: Any, subsec: Any = None, offset: Any = None) -> str | None:
    """``'2024:01:02 03:04:05'`` (+ sub-seconds, + ``'+01:00'``) as ISO-8601."""
    s = _text(dto)
    if not s:
        return None
    m = _EXIF_DT.match(s)
    if not m or m.group(1) == "0000":
        return None
    out = "{}-{}-{}T{}:{}:{}".format(*m.groups())
    sub = _text(subsec)
    if sub and sub.isdigit():
        out += "." + sub
    off = _text(offset)
    if off and re.fullmatch(r"[+-]\d{2}:\d{2}", off):
        out += off
    return out


def _white_for(values: np.ndarray) -> float:
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


def _pattern_from_letters(letters: str) -> str | None:
    letters = letters.upper()
    return letters if letters in BAYER_PATTERNS else None


def _canonical_imagetyp(v: Any) -> str | None:
    s = _text(v)
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


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return str(v)


# ----------------------------------------------------------------------------- camera RAW


class _QuietThreads(logging.Filter):
    """Drops tifffile log records emitted while this thread probes a RAW file."""

    def __init__(self) -> None:
        super().__init__()
        self.idents: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        return threading.get_ident() not in self.idents


_QUIET = _QuietThreads()
_QUIET_LOCK = threading.Lock()
_QUIET_INSTALLED = False


class _quiet_tifffile:
    def __enter__(self) -> None:
        global _QUIET_INSTALLED
        with _QUIET_LOCK:
            if not _QUIET_INSTALLED:
                logging.getLogger("tifffile").addFilter(_QUIET)
                _QUIET_INSTALLED = True
            _QUIET.idents.add(threading.get_ident())

    def __exit__(self, *exc: Any) -> None:
        with _QUIET_LOCK:
            _QUIET.idents.discard(threading.get_ident())


class _Probe:
    """What the container structure of a RAW file says (before LibRaw)."""

    def __init__(self) -> None:
        self.truncated: str | None = None
        self.tiff = False  # EXIF below comes from the TIFF structure
        self.make: Any = None
        self.model: Any = None
        self.exif: dict[str, Any] = {}


_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"IIRO", b"IIRS", b"IIU\x00", b"MMOR")


def _probe_raw(p: Path, size: int) -> _Probe:
    with open(p, "rb") as fh:
        head = fh.read(128)
    probe = _Probe()
    if head[:4] in _TIFF_MAGICS:
        _probe_tiff(p, size, head, probe)
    elif head[4:8] == b"ftyp":
        _probe_isobmff(p, size, probe)
    elif head.startswith(b"FUJIFILMCCD-RAW"):
        _probe_raf(size, head, probe)
    return probe


def _probe_tiff(p: Path, size: int, head: bytes, probe: _Probe) -> None:
    """Check every IFD's strip/tile extents against the file size; collect EXIF."""
    bo = "<" if head[:2] == b"II" else ">"
    first_ifd = struct.unpack(bo + "I", head[4:8])[0]
    if first_ifd >= size:
        probe.truncated = f"first IFD at byte {first_ifd} but the file has {size} bytes"
        return
    import tifffile

    with _quiet_tifffile():
        try:
            with tifffile.TiffFile(p) as tf:
                pages = list(tf.pages)
                todo = [(pg, 0) for pg in pages]
                while todo:
                    pg, depth = todo.pop()
                    offsets = getattr(pg, "dataoffsets", ()) or ()
                    counts = getattr(pg, "databytecounts", ()) or ()
                    for off, cnt in zip(offsets, counts):
                        if cnt and off + cnt > size:
                            probe.truncated = (f"image data runs to byte {off + cnt} but the file "
                                               f"has {size} bytes")
                            return
                    if not counts and offsets and max(offsets) >= size:
                        probe.truncated = f"image data starts at byte {max(offsets)} past the end ({size})"
                        return
                    if depth < 2 and getattr(pg, "subifds", None):
                        for sub in tifffile.TiffPages(pg):
                            todo.append((sub, depth + 1))
                if pages:
                    tags = pages[0].tags
                    probe.tiff = True
                    probe.make = tags.valueof(271)
                    probe.model = tags.valueof(272) or tags.valueof(50708)
                    exif = tags.valueof(34665)
                    probe.exif = exif if isinstance(exif, dict) else {}
        except Exception:  # structure unreadable here: leave the verdict to LibRaw
            return


def _probe_isobmff(p: Path, size: int, probe: _Probe) -> None:
    """CR3 (ISO base media): every top-level box must end inside the file."""
    pos = 0
    moov: bytes | None = None
    with open(p, "rb") as fh:
        while pos < size:
            fh.seek(pos)
            hdr = fh.read(16)
            if len(hdr) < 8:
                probe.truncated = f"box header cut at byte {pos}"
                return
            box_size, box_type = struct.unpack(">I4s", hdr[:8])
            if box_size == 1:
                if len(hdr) < 16:
                    probe.truncated = f"box header cut at byte {pos}"
                    return
                box_size = struct.unpack(">Q", hdr[8:16])[0]
            elif box_size == 0:
                box_size = size - pos
            if box_size < 8:
                return  # not a box structure we understand: leave it to LibRaw
            if pos + box_size > size:
                probe.truncated = (f"'{box_type.decode('latin-1')}' box runs to byte {pos + box_size} "
                                   f"but the file has {size} bytes")
                return
            if box_type == b"moov" and box_size <= 8 << 20:
                fh.seek(pos)
                moov = fh.read(box_size)
            pos += box_size
    if moov is not None:
        i = moov.find(b"CMT1")
        if i >= 4:
            n = struct.unpack(">I", moov[i - 4:i])[0]
            tags = _tiff_ascii_tags(moov[i + 4:i - 4 + n], (271, 272))
            probe.make, probe.model = tags.get(271), tags.get(272)


def _probe_raf(size: int, head: bytes, probe: _Probe) -> None:
    """Fujifilm RAF: the JPEG and CFA sections named in the header must fit in the file."""
    if len(head) < 108:
        probe.truncated = "header cut"
        return
    jpg_off, jpg_len = struct.unpack(">II", head[84:92])
    cfa_off, cfa_len = struct.unpack(">II", head[100:108])
    for name, off, n in (("preview", jpg_off, jpg_len), ("CFA", cfa_off, cfa_len)):
        if n and off + n > size:
            probe.truncated = f"{name} section runs to byte {off + n} but the file has {size} bytes"
            return
    probe.make = "FUJIFILM"
    probe.model = _text(head[28:60])


def _tiff_ascii_tags(buf: bytes, codes: tuple[int, ...]) -> dict[int, str]:
    """ASCII tags of the first IFD of a TIFF held in ``buf`` (missing or bad → left out)."""
    out: dict[int, str] = {}
    try:
        bo = {b"II": "<", b"MM": ">"}[buf[:2]]
        ifd = struct.unpack(bo + "I", buf[4:8])[0]
        (n,) = struct.unpack(bo + "H", buf[ifd:ifd + 2])
        for k in range(n):
            e = ifd + 2 + 12 * k
            code, typ, count = struct.unpack(bo + "HHI", buf[e:e + 8])
            if code in codes and typ == 2:
                off = e + 8 if count <= 4 else struct.unpack(bo + "I", buf[e + 8:e + 12])[0]
                text = _text(buf[off:off + count])
                if text:
                    out[code] = text
    except (KeyError, struct.error, IndexError):
        pass
    return out


def _unpack_guarded(raw: Any, p: Path) -> None:
    """``raw.unpack()`` with a time limit (LibRaw releases the GIL while decoding)."""
    box: dict[str, BaseException] = {}

    def work() -> None:
        try:
            raw.unpack()
        except BaseException as exc:  # re-raised in the caller's thread
            box["exc"] = exc

    t = threading.Thread(target=work, name=f"libraw-unpack:{p.name}", daemon=True)
    t.start()
    t.join(RAW_DECODE_TIMEOUT_S)
    if t.is_alive():
        # The thread keeps ``raw`` alive until LibRaw returns; nothing else touches it.
        raise FrameReadError(f"{p}: LibRaw did not finish decoding in {RAW_DECODE_TIMEOUT_S:g} s; "
                             "the file is probably truncated or damaged, copy it again")
    if "exc" in box:
        raise box["exc"]


def _read_raw(p: Path, size: int, want_data: bool) -> tuple[np.ndarray | None, FrameMeta]:
    import rawpy

    probe = _probe_raw(p, size)
    if probe.truncated:
        raise _truncated(p, probe.truncated)
    raw = rawpy.RawPy()
    abandoned = False
    try:
        try:
            raw.open_file(str(p))
        except rawpy.LibRawError as exc:
            raise FrameReadError(
                f"{p}: not a readable RAW file (LibRaw: {_exc_text(exc)}); "
                "is it truncated, renamed, or from a camera newer than LibRaw "
                f"{'.'.join(map(str, rawpy.libraw_version))}?") from exc
        s = raw.sizes
        if s.raw_width * s.raw_height > 8 * size:
            raise _truncated(p, f"{s.raw_width}x{s.raw_height} sensor in only {size} bytes")
        try:
            _unpack_guarded(raw, p)
        except FrameReadError:
            abandoned = True
            raise
        except rawpy.LibRawError as exc:
            raise FrameReadError(f"{p}: LibRaw could not decode it ({_exc_text(exc)}); "
                                 "is it truncated or damaged? copy it again") from exc
        return _raw_contents(raw, p, probe, want_data)
    finally:
        if not abandoned:
            raw.close()


def _raw_contents(raw: Any, p: Path, probe: _Probe, want_data: bool) -> tuple[np.ndarray | None, FrameMeta]:
    s = raw.sizes
    vis = raw.raw_image_visible
    extra: dict[str, Any] = {
        "raw_shape": list(raw.raw_image.shape[:2]),
        "visible_origin": [int(s.top_margin), int(s.left_margin)],
        "flip": int(s.flip),
        "color_desc": raw.color_desc.decode("ascii", "replace"),
    }
    bl = [float(b) for b in raw.black_level_per_channel]
    desc = raw.color_desc.decode("ascii", "replace")
    pattern: str | None = None
    if vis.ndim == 3:  # colour raw (linear DNG, sRAW, Foveon): channel-first RGB
        shape: tuple[int, ...] = (3, vis.shape[0], vis.shape[1])
        black = (bl[0], bl[1], bl[2], bl[1])
        data = np.ascontiguousarray(np.moveaxis(vis[..., :3], -1, 0), dtype=np.uint16) if want_data else None
    else:
        shape = tuple(vis.shape)
        rp = raw.raw_pattern
        n = 0 if rp is None else int(rp.shape[0])
        black = (bl[0],) * 4
        if n == 2:
            idx = [[raw.raw_color(s.top_margin + y, s.left_margin + x) for x in range(2)] for y in range(2)]
            flat = [idx[0][0], idx[0][1], idx[1][0], idx[1][1]]
            letters = "".join(desc[c] if c < len(desc) else "?" for c in flat)
            pattern = _pattern_from_letters(letters)
            black = tuple(bl[c] if c < 4 else bl[0] for c in flat)  # type: ignore[assignment]
            if pattern is None:
                extra["cfa"] = f"non-RGB Bayer filter {letters!r}; not debayered by skystack"
        elif n == 6:
            letters = "".join(desc[raw.raw_color(s.top_margin + y, s.left_margin + x)]
                              for y in range(6) for x in range(6))
            extra["cfa"] = "X-Trans 6x6 (not a 2x2 Bayer pattern); not debayered by skystack"
            extra["cfa_pattern_6x6"] = letters
            if len(set(bl[:3])) > 1:
                extra["black_level_per_color"] = bl[:3]
        elif n > 1:
            extra["cfa"] = f"{n}x{n} colour filter; not debayered by skystack"
        data = np.array(vis, dtype=np.uint16, copy=True, order="C") if want_data else None
    cam = [float(c) for c in raw.camera_whitebalance]
    wb = (cam[0] / cam[1], 1.0, cam[2] / cam[1]) if cam[1] > 0 and cam[0] > 0 and cam[2] > 0 else None
    day = [float(c) for c in raw.daylight_whitebalance]
    if day[1] > 0:
        extra["daylight_wb"] = [day[0] / day[1], 1.0, day[2] / day[1]]

    if probe.tiff and probe.exif:
        ex = probe.exif
        exposure = _num(ex.get("ExposureTime"), positive=True)
        iso = _iso(ex.get("ISOSpeedRatings") or ex.get("PhotographicSensitivity"))
        focal = _num(ex.get("FocalLength"), positive=True)
        fnum = _num(ex.get("FNumber"), positive=True)
        timestamp = _exif_time(ex.get("DateTimeOriginal"), ex.get("SubsecTimeOriginal"),
                               ex.get("OffsetTimeOriginal"))
    else:
        o = raw.other
        exposure = _num(o.shutter_speed, positive=True)
        iso = _num(o.iso_speed, positive=True)
        focal = _num(o.focal_length, positive=True)
        fnum = _num(o.aperture, positive=True)
        ts = o.timestamp
        timestamp = ts.isoformat() if ts is not None and ts.timestamp() > 0 else None
    if fnum is not None:
        extra["f_number"] = fnum
    meta = FrameMeta(
        path=str(p), format="raw", shape=tuple(int(v) for v in shape), pattern=pattern,
        black_level=tuple(float(b) for b in black),  # type: ignore[arg-type]
        white_level=float(raw.white_level), wb=wb, exposure_s=exposure, iso=iso,
        focal_length_mm=focal, timestamp=timestamp, camera=_camera(probe.make, probe.model),
        extra=extra,
    )
    return data, meta


# ----------------------------------------------------------------------------- FITS

_FITS_EXTRA = ("OBJECT", "XPIXSZ", "YPIXSZ", "APERTURE", "APTDIA", "FILTER", "TELESCOP", "RA", "DEC",
               "OBJCTRA", "OBJCTDEC", "XBINNING", "YBINNING", "ROWORDER", "BAYERPAT", "XBAYROFF",
               "YBAYROFF", "SITELAT", "SITELONG", "SATURATE", "OFFSET", "EGAIN", "CREATOR", "SWCREATE")


def _hget(h: Any, *keys: str) -> Any:
    for k in keys:
        if k in h:
            v = h[k]
            if v is not None and not (isinstance(v, str) and not v.strip()):
                return v
    return None


def _fits_pattern(h: Any, height: int) -> tuple[str | None, str | None]:
    """Bayer pattern of the stored data (see module docstring), and a note when ignored."""
    raw = _text(_hget(h, "BAYERPAT", "COLORTYP", "CFA-TYPE", "CFATYPE"))
    if raw is None:
        return None, None
    letters = raw.upper().replace(" ", "")
    if letters not in BAYER_PATTERNS:
        return None, f"colour filter {raw!r} is not a 2x2 RGB Bayer pattern"
    rows = [letters[:2], letters[2:]]
    xoff = int(_num(_hget(h, "XBAYROFF")) or 0) % 2
    yoff = int(_num(_hget(h, "YBAYROFF")) or 0) % 2
    rows = [rows[(r + yoff) % 2][xoff:] + rows[(r + yoff) % 2][:xoff] for r in range(2)]
    order = (_text(_hget(h, "ROWORDER")) or "TOP-DOWN").upper()
    if order == "BOTTOM-UP":
        # data row r is top-down row (height - 1 - r)
        rows = [rows[(height - 1 - r) % 2] for r in range(2)]
    return rows[0] + rows[1], None


def _fits_black(h: Any) -> float:
    for k, f in (("BLKLEVEL", float), ("PEDESTAL", abs), ("OFFSET", float)):
        v = _num(_hget(h, k))
        if v is not None:
            return float(f(v))
    return 0.0


def _fits_shape(h: Any, p: Path) -> tuple[int, ...]:
    naxis = int(h.get("NAXIS", 0))
    dims = [int(h.get(f"NAXIS{i}", 0)) for i in range(1, naxis + 1)]
    while len(dims) > 2 and dims[-1] == 1:
        dims.pop()
    if len(dims) == 2:
        return (dims[1], dims[0])
    if len(dims) == 3 and dims[2] in (3, 4):
        return (3, dims[1], dims[0])
    raise FrameReadError(f"{p}: FITS image has axes {dims}; expected a 2-D frame or a 3-plane colour cube")


def _read_fits(p: Path, size: int, want_data: bool) -> tuple[np.ndarray | None, FrameMeta]:
    import warnings

    from astropy.io import fits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(p, memmap=False, lazy_load_hdus=True) as hdul:
            hdu = None
            for h in hdul:
                if getattr(h, "is_image", False) and int(h.header.get("NAXIS", 0)) >= 2:
                    hdu = h
                    break
            if hdu is None:
                raise FrameReadError(f"{p}: FITS file holds no image; is it a table or a spectrum?")
            hdr = hdu.header
            shape = _fits_shape(hdr, p)
            bitpix = int(hdr.get("BITPIX", 0))
            bzero = _num(hdr.get("BZERO")) or 0.0
            bscale = _num(hdr.get("BSCALE")) or 1.0
            compressed = isinstance(hdu, fits.CompImageHDU)
            if not compressed and not p.name.lower().endswith(".gz"):
                info = hdul.fileinfo(hdul.index(hdu))
                need = int(info["datLoc"]) + abs(bitpix) // 8 * int(np.prod(shape))
                if need > size:
                    raise _truncated(p, f"image needs {need} bytes but the file has {size}", "FITS")
            integer = bitpix > 0 and bscale == 1.0
            is_u16 = integer and bitpix == 16 and bzero == 32768.0
            is_u8 = integer and bitpix == 8 and bzero == 0.0
            is_i16 = integer and bitpix == 16 and bzero == 0.0
            need_pixels = want_data or not (is_u16 or is_u8 or is_i16)
            arr = np.asarray(hdu.data) if need_pixels else None
    if arr is not None:
        arr = arr.reshape(shape) if arr.size == int(np.prod(shape)) else arr[:3].reshape(shape)
    if is_u16:
        white = 65535.0
        data = None if arr is None else np.ascontiguousarray(arr, dtype=np.uint16)
    elif is_u8:
        white = 255.0
        data = None if arr is None else np.ascontiguousarray(arr, dtype=np.uint8)
    elif is_i16:
        white = 32767.0
        if arr is None:
            data = None
        elif arr.min() >= 0:
            data = np.ascontiguousarray(arr, dtype=np.uint16)
        else:
            data = np.ascontiguousarray(arr, dtype=np.float32)
    else:
        assert arr is not None
        data = np.ascontiguousarray(arr, dtype=np.float32)
        white = _white_for(data)

    colour = len(shape) == 3
    pattern, note = (None, None) if colour else _fits_pattern(hdr, shape[0])
    extra: dict[str, Any] = {k.lower(): _jsonable(hdr[k]) for k in _FITS_EXTRA if k in hdr}
    if note:
        extra["cfa"] = note
    if colour and int(hdr.get("NAXIS3", 3)) == 4:
        extra["dropped_plane"] = "4th plane (alpha) ignored"
    raw_type = _text(_hget(hdr, "IMAGETYP", "FRAME", "FRAMETYP"))
    if raw_type:
        extra["imagetyp_header"] = raw_type
    ts = _text(_hget(hdr, "DATE-OBS", "DATE-BEG", "DATE"))
    if ts and "T" not in ts and _text(_hget(hdr, "TIME-OBS")):
        ts = f"{ts}T{_text(hdr['TIME-OBS'])}"
    gain = _num(_hget(hdr, "GAIN"))
    b = _fits_black(hdr)
    if white == 1.0 and 1.0 <= b <= 65535.0:
        # float data in 0..1 whose header kept the 16-bit black level (ADU): same scale as the data
        extra["black_level_adu"] = b
        b = b / 65535.0
    meta = FrameMeta(
        path=str(p), format="fits", shape=shape, pattern=pattern, black_level=(b, b, b, b),
        white_level=white, wb=None,
        exposure_s=_num(_hget(hdr, "EXPTIME", "EXPOSURE", "EXP_TIME"), positive=True),
        iso=_num(_hget(hdr, "ISOSPEED", "ISO"), positive=True), gain=gain,
        temperature_c=_num(_hget(hdr, "CCD-TEMP", "CCD_TEMP", "SENSOR-TEMP", "SET-TEMP")),
        focal_length_mm=_num(_hget(hdr, "FOCALLEN", "FOCAL"), positive=True),
        timestamp=ts, camera=_text(_hget(hdr, "INSTRUME", "CAMERA")),
        imagetyp=_canonical_imagetyp(raw_type), extra=extra,
    )
    return data, meta


# ----------------------------------------------------------------------------- TIFF


def _read_tiff(p: Path, size: int, want_data: bool) -> tuple[np.ndarray | None, FrameMeta]:
    import tifffile

    with _quiet_tifffile(), tifffile.TiffFile(p) as tf:
        if not len(tf.pages):
            raise FrameReadError(f"{p}: TIFF file holds no image; is it damaged?")
        page = tf.pages[0]
        for off, cnt in zip(page.dataoffsets or (), page.databytecounts or ()):
            if cnt and off + cnt > size:
                raise _truncated(p, f"image data runs to byte {off + cnt} but the file has {size}", "TIFF")
        axes, dtype = page.axes, np.dtype(page.dtype)
        tags = page.tags
        photometric = int(page.photometric)
        cfa_dim = tags.valueof(33421)
        cfa_pat = tags.valueof(33422)
        exif = tags.valueof(34665)
        make, model = tags.valueof(271), tags.valueof(272)
        need_pixels = want_data or dtype.kind == "f" or dtype.itemsize > 2
        arr = page.asarray() if need_pixels else None
        pshape = tuple(page.shape)
    # To channel-first colour or 2-D mono.
    if "S" in axes and len(pshape) == 3:
        s_axis = axes.index("S")
        n = pshape[s_axis]
        if n >= 3:
            shape: tuple[int, ...] = (3,) + tuple(d for i, d in enumerate(pshape) if i != s_axis)
            if arr is not None:
                arr = np.moveaxis(arr, s_axis, 0)[:3]
        else:  # grey + alpha
            shape = tuple(d for i, d in enumerate(pshape) if i != s_axis)
            if arr is not None:
                arr = np.take(arr, 0, axis=s_axis)
    elif len(pshape) == 2:
        shape = pshape
    else:
        raise FrameReadError(f"{p}: TIFF page has shape {pshape} ({axes}); expected mono, RGB or a CFA mosaic")
    extra: dict[str, Any] = {}
    pattern = None
    if len(shape) == 2 and photometric == 32803 and cfa_pat is not None:
        dims = tuple(cfa_dim) if cfa_dim is not None else (2, 2)
        codes = list(bytes(cfa_pat)) if isinstance(cfa_pat, (bytes, bytearray)) else list(cfa_pat)
        if dims == (2, 2) and len(codes) == 4 and all(c in (0, 1, 2) for c in codes):
            pattern = _pattern_from_letters("".join("RGB"[c] for c in codes))
        if pattern is None:
            extra["cfa"] = f"CFA pattern {codes} ({dims}) is not a 2x2 RGB Bayer pattern"
    if dtype == np.uint8:
        white = 255.0
        data = arr
    elif dtype == np.uint16:
        white = 65535.0
        data = arr
    elif dtype == np.int16:
        white = 32767.0
        data = None if arr is None else arr.astype(np.uint16 if arr.min() >= 0 else np.float32)
    else:
        assert arr is not None
        data = arr.astype(np.float32)
        white = _white_for(data)
    if data is not None:
        data = np.ascontiguousarray(data)
    ex = exif if isinstance(exif, dict) else {}
    fnum = _num(ex.get("FNumber"), positive=True)
    if fnum is not None:
        extra["f_number"] = fnum
    meta = FrameMeta(
        path=str(p), format="tiff", shape=tuple(int(v) for v in shape), pattern=pattern,
        white_level=white, black_level=(0.0, 0.0, 0.0, 0.0),
        exposure_s=_num(ex.get("ExposureTime"), positive=True),
        iso=_iso(ex.get("ISOSpeedRatings") or ex.get("PhotographicSensitivity")),
        focal_length_mm=_num(ex.get("FocalLength"), positive=True),
        timestamp=_exif_time(ex.get("DateTimeOriginal"), ex.get("SubsecTimeOriginal"),
                             ex.get("OffsetTimeOriginal")),
        camera=_camera(make, model), extra=extra,
    )
    return data, meta


# ----------------------------------------------------------------------------- JPEG / PNG

_MONO_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N"}


def _read_image(p: Path, size: int, want_data: bool) -> tuple[np.ndarray | None, FrameMeta]:
    from PIL import Image

    with Image.open(p) as im:
        w, h = im.size
        mode = im.mode
        deep = mode.startswith("I")  # 16-bit PNG
        shape: tuple[int, ...] = (h, w) if mode in _MONO_MODES else (3, h, w)
        exif = im.getexif()
        sub = exif.get_ifd(0x8769) if exif else {}
        data = None
        if want_data:
            im.load()
            if deep:
                data = np.clip(np.asarray(im), 0, 65535).astype(np.uint16)
            elif mode in _MONO_MODES:
                data = np.asarray(im.convert("L"), dtype=np.uint8)
            else:
                data = np.moveaxis(np.asarray(im.convert("RGB"), dtype=np.uint8), -1, 0)
            data = np.ascontiguousarray(data)
    extra: dict[str, Any] = {}
    orientation = exif.get(0x0112) if exif else None
    if orientation not in (None, 1):
        extra["orientation"] = int(orientation)
    fnum = _num(sub.get(0x829D), positive=True)
    if fnum is not None:
        extra["f_number"] = fnum
    meta = FrameMeta(
        path=str(p), format="image", shape=shape, white_level=65535.0 if deep else 255.0,
        exposure_s=_num(sub.get(0x829A), positive=True),
        iso=_iso(sub.get(0x8827)),
        focal_length_mm=_num(sub.get(0x920A), positive=True),
        timestamp=_exif_time(sub.get(0x9003), sub.get(0x9291), sub.get(0x9011)),
        camera=_camera(exif.get(0x010F), exif.get(0x0110)) if exif else None, extra=extra,
    )
    return data, meta
