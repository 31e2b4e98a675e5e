"""Camera RAW files: their container checked before LibRaw, then decoded by it.

:func:`read_raw` is the RAW reader behind :func:`skystack.engine.io.read_frame`
(see that module for what the frame holds). A truncated file is found from its
structure first (TIFF strip/tile extents, ISO-BMFF box sizes, the RAF
directory), because LibRaw, depending on version and decoder, fills missing
bytes with zeros or fails after printing to stderr; the decode itself runs
under a time limit (:data:`RAW_DECODE_TIMEOUT_S`). EXIF comes from the TIFF
structure for TIFF-based raws, else from LibRaw.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np

from skystack.engine.errors import FrameReadError
from skystack.engine.frame import FrameMeta
from skystack.engine.metavalues import (
    bayer_pattern,
    camera_name,
    clean_text,
    exc_text,
    exif_time,
    iso_speed,
    number,
    truncated_error,
)

__all__ = ["RAW_DECODE_TIMEOUT_S", "read_raw", "quiet_tifffile"]

#: Seconds LibRaw may take to decode one RAW file before it counts as damaged.
RAW_DECODE_TIMEOUT_S = 60.0


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


class quiet_tifffile:  # noqa: N801 - used as a context manager, like a function
    """Context: tifffile's log records from this thread are dropped (other threads keep theirs)."""

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

    with quiet_tifffile():
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
    probe.model = clean_text(head[28:60])


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
                text = clean_text(buf[off:off + count])
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


def read_raw(p: Path, size: int, want_data: bool,
             layouts: dict[tuple, FrameMeta] | None = None) -> tuple[np.ndarray | None, FrameMeta]:
    """Read a camera RAW file of ``size`` bytes: its CFA data (when ``want_data``) and metadata.

    ``layouts`` (metadata only) is shared by the reads of one session's files: a TIFF-based raw whose
    layout key (camera, LibRaw's sensor sizes and colours: :func:`_layout_key`) matches a file read
    with it before is not decoded. LibRaw offers no header-only mode (rawpy decodes the pixels
    before it tells the pattern or the levels), so such a file takes that file's pattern, levels
    and white balance, and its own EXIF's exposure, ISO, focal length, f-number and time.

    Raises
    ------
    FrameReadError
        The file is truncated, not a RAW file LibRaw knows, or its decode fails or runs too long.
    """
    import rawpy

    probe = _probe_raw(p, size)
    if probe.truncated:
        raise truncated_error(p, probe.truncated)
    raw = rawpy.RawPy()
    abandoned = False
    try:
        try:
            raw.open_file(str(p))
        except rawpy.LibRawError as exc:
            raise FrameReadError(
                f"{p}: not a readable RAW file (LibRaw: {exc_text(exc)}); "
                "is it truncated, renamed, or from a camera newer than LibRaw "
                f"{'.'.join(map(str, rawpy.libraw_version))}?") from exc
        s = raw.sizes
        if s.raw_width * s.raw_height > 8 * size:
            raise truncated_error(p, f"{s.raw_width}x{s.raw_height} sensor in only {size} bytes")
        key = _layout_key(raw, probe) if layouts is not None and not want_data else None
        if key is not None and key in layouts:
            return None, _same_layout(layouts[key], p, probe)
        try:
            _unpack_guarded(raw, p)
        except FrameReadError:
            abandoned = True
            raise
        except rawpy.LibRawError as exc:
            raise FrameReadError(f"{p}: LibRaw could not decode it ({exc_text(exc)}); "
                                 "is it truncated or damaged? copy it again") from exc
        data, meta = _raw_contents(raw, p, probe, want_data)
        if key is not None:
            layouts[key] = meta
        return data, meta
    finally:
        if not abandoned:
            raw.close()


def _layout_key(raw: Any, probe: _Probe) -> tuple | None:
    """What fixes a raw file's layout before its decode: camera, LibRaw's sizes (margins, flip) and
    colours; None when the file's EXIF is not in its TIFF structure (LibRaw's needs the decode)."""
    if not (probe.tiff and probe.exif):
        return None
    return camera_name(probe.make, probe.model), tuple(raw.sizes), int(raw.num_colors), bytes(raw.color_desc)


def _same_layout(like: FrameMeta, p: Path, probe: _Probe) -> FrameMeta:
    """``like`` (a decoded file of the same layout) for the file ``p``: its own EXIF values."""
    ex = _exif_values(probe.exif)
    extra = {k: v for k, v in like.extra.items() if k != "f_number"}
    if ex["f_number"] is not None:
        extra["f_number"] = ex["f_number"]
    return dataclasses.replace(like, path=str(p), exposure_s=ex["exposure_s"], iso=ex["iso"],
                               focal_length_mm=ex["focal_length_mm"], timestamp=ex["timestamp"], extra=extra)


def _exif_values(ex: dict[str, Any]) -> dict[str, Any]:
    """Exposure, ISO, focal length, f-number and capture time of a TIFF-based raw's EXIF."""
    return {"exposure_s": number(ex.get("ExposureTime"), positive=True),
            "iso": iso_speed(ex.get("ISOSpeedRatings") or ex.get("PhotographicSensitivity")),
            "focal_length_mm": number(ex.get("FocalLength"), positive=True),
            "f_number": number(ex.get("FNumber"), positive=True),
            "timestamp": exif_time(ex.get("DateTimeOriginal"), ex.get("SubsecTimeOriginal"),
                                   ex.get("OffsetTimeOriginal"))}


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
            pattern = bayer_pattern(letters)
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
        ex = _exif_values(probe.exif)
        exposure, iso, focal = ex["exposure_s"], ex["iso"], ex["focal_length_mm"]
        fnum, timestamp = ex["f_number"], ex["timestamp"]
    else:
        o = raw.other
        exposure = number(o.shutter_speed, positive=True)
        iso = number(o.iso_speed, positive=True)
        focal = number(o.focal_length, positive=True)
        fnum = number(o.aperture, positive=True)
        ts = o.timestamp
        timestamp = ts.isoformat() if ts is not None and ts.timestamp() > 0 else None
    if fnum is not None:
        extra["f_number"] = fnum
    meta = FrameMeta(
        path=str(p), format="raw", shape=tuple(int(v) for v in shape), pattern=pattern,
        black_level=tuple(float(b) for b in black),  # type: ignore[arg-type]
        white_level=float(raw.white_level), wb=wb, exposure_s=exposure, iso=iso,
        focal_length_mm=focal, timestamp=timestamp, camera=camera_name(probe.make, probe.model),
        extra=extra,
    )
    return data, meta
