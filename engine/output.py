"""Output writers: 32-bit float TIFF, FITS with provenance, 8-bit preview, JSON, HTML.

Every writer goes through :func:`atomic_path`: a hidden temporary file in the
target folder (``.NAME.XXXXXXXX.part``), given the mode the umask allows, then
``os.replace``. Inside :func:`output_set` the renames wait until every file of
the set is written, so a kill leaves either the old set or the new one. A
writer refuses to overwrite an input frame, and errors name the final path
and the fix.

Orientation: the TIFF, PNG and JPEG store the top row first. The FITS stores
the bottom row first (the FITS convention every viewer follows) and says so
with ``ROWORDER = 'BOTTOM-UP'``; :func:`fits_rows` turns such data back.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import json
import os
import re
import shutil
import struct
import tempfile
import time
import unicodedata
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from skystack.engine.errors import OutputError

#: Suffixes ``-o`` may not carry: each names another output (or another format).
NON_TIFF_SUFFIXES = (".png", ".jpg", ".jpeg", ".fits", ".fit", ".fts", ".json", ".html", ".htm",
                     ".gif", ".bmp", ".webp", ".xisf", ".exr", ".heic")

_SET: contextvars.ContextVar[list | None] = contextvars.ContextVar("skystack_output_set", default=None)


def _umask() -> int:
    """The process umask, read without changing it where Linux allows."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)  # elsewhere: read it by setting it (and set it back at once)
    os.umask(old)
    return old


def _os_error(final: Path, exc: OSError) -> OutputError:
    """One line naming ``final`` (never the temporary file) and the fix."""
    if exc.errno == errno.ENOSPC:
        return OutputError(f"{final}: disk full while writing; free some space or write elsewhere with -o")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"{final.parent}: folder is not writable ({exc.strerror}); choose another -o folder "
                           "or fix its permissions")
    return OutputError(f"{final}: cannot write ({exc.strerror or exc}); check the folder and free space")


def _commit(tmp: Path, final: Path, fd: int) -> None:
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, final)
    finally:
        os.close(fd)


def _locked_temp(final: Path) -> tuple[int, Path]:
    """``mkstemp`` beside ``final``, its descriptor kept open with an exclusive ``flock``.

    The lock marks the file as a live run's: :func:`remove_stale_partials`
    only deletes temporaries nobody holds.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd, Path(tmp)


#: Temporary names left by :func:`atomic_path` (``.NAME.XXXXXXXX.part``) and older writers (``.tmp``).
PARTIAL_NAME = re.compile(r"^\.(?P<final>.+)\.[A-Za-z0-9_]{8}\.(part|tmp)$")


def _unheld(path: Path) -> bool:
    """True when no process holds ``path``'s ``flock`` (it is taken, then released at once)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_stale_partials(folder: str | os.PathLike) -> int:
    """Delete the temporary files a killed run left in ``folder``; return how many.

    Only names :data:`PARTIAL_NAME` matches, and only those whose ``flock`` no
    live run holds, are removed.
    """
    n = 0
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    for name in names:
        path = Path(folder) / name
        if PARTIAL_NAME.match(name) and path.is_file() and _unheld(path):
            with contextlib.suppress(OSError):
                path.unlink()
                n += 1
    return n


def live_dir(prefix: str, parent: str | os.PathLike | None = None) -> tuple[Path, int]:
    """A new scratch folder ``PREFIX…`` holding a ``.lock`` this process keeps locked.

    Stale folders of the same prefix (a killed run's: nobody holds their lock)
    are removed first (:func:`remove_stale_dirs`). Close the returned
    descriptor after deleting the folder.
    """
    remove_stale_dirs(prefix, parent)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return folder, fd


def remove_stale_dirs(prefix: str, parent: str | os.PathLike | None = None, *, legacy_age_s: float = 86400.0) -> int:
    """Remove ``PREFIX…`` scratch folders of killed runs in ``parent``; return how many.

    A folder is stale when no process holds its ``.lock``; one without a lock
    (written before locks existed) when untouched for ``legacy_age_s``.
    """
    parent = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    n = 0
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith(prefix) and e.is_dir(follow_symlinks=False)]
    except OSError:
        return 0
    for e in entries:
        lock = Path(e.path) / ".lock"
        if lock.exists():
            stale = _unheld(lock)
        else:
            try:
                stale = time.time() - e.stat(follow_symlinks=False).st_mtime > legacy_age_s
            except OSError:
                stale = False
        if stale:
            shutil.rmtree(e.path, ignore_errors=True)
            n += 1
    return n


@contextlib.contextmanager
def output_set() -> Iterator[None]:
    """Write every output of the block to temporary files, then rename them together.

    A failure (or a kill) before the end leaves the previous set untouched;
    the renames themselves take microseconds.
    """
    staged: list[tuple[Path, Path, int]] = []
    token = _SET.set(staged)
    try:
        yield
    except BaseException:
        for tmp, _, fd in staged:
            tmp.unlink(missing_ok=True)
            os.close(fd)
        raise
    finally:
        _SET.reset(token)
    for i, (tmp, final, fd) in enumerate(staged):
        try:
            _commit(tmp, final, fd)
        except OSError as exc:
            for tmp2, _, fd2 in staged[i + 1:]:
                tmp2.unlink(missing_ok=True)
                os.close(fd2)
            tmp.unlink(missing_ok=True)
            raise _os_error(final, exc) from exc


def _check_not_input(final: Path, inputs: Iterable[str | os.PathLike]) -> None:
    resolved = final.resolve()
    for p in inputs:
        if Path(p).resolve() == resolved:
            raise OutputError(f"{final}: refusing to overwrite an input frame; choose another -o path")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it over ``final`` on success.

    The file gets the mode ``0666 & ~umask``, as ``open`` would give it.
    Inside :func:`output_set` the rename waits for the end of the set.

    Raises
    ------
    OutputError
        When ``final`` is one of ``inputs``, its folder cannot be created or
        written, or the disk is full (the message names ``final`` and the fix).
    """
    final = Path(final)
    _check_not_input(final, inputs)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{final.parent}: cannot create the output folder ({exc.strerror}); "
                          "choose another -o path") from exc
    try:
        fd, tmp_path = _locked_temp(final)
    except OSError as exc:
        raise _os_error(final, exc) from exc
    staged = _SET.get()
    try:
        yield tmp_path
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        os.close(fd)
        if isinstance(exc, OSError):
            raise _os_error(final, exc) from exc
        raise
    if staged is not None:
        staged.append((tmp_path, final, fd))
        return
    try:
        _commit(tmp_path, final, fd)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise _os_error(final, exc) from exc


def check_outputs(paths: Iterable[str | os.PathLike], *, inputs: Iterable[str | os.PathLike] = (),
                  nbytes: int = 0) -> None:
    """Check, before any work, that the outputs can be written.

    Parameters
    ----------
    paths : iterable of path
        Every file the run will write.
    inputs : iterable of path
        Input frames, which no output may replace.
    nbytes : int
        Estimated size of all outputs together.

    Raises
    ------
    OutputError
        Two outputs with one name, an output that is an input, a folder that
        cannot be created or written, or less free space than ``nbytes``.
    """
    paths = [Path(p) for p in paths]
    inputs = list(inputs)
    seen: dict[Path, Path] = {}
    for p in paths:
        r = p.resolve()
        if r in seen:
            raise OutputError(f"{p}: two outputs would be written to one file ({seen[r]} and {p}); "
                              "give them different names")
        seen[r] = p
        _check_not_input(p, inputs)
    by_folder: dict[Path, list[Path]] = {}
    for p in paths:
        by_folder.setdefault(p.parent.resolve(), []).append(p)
    for folder, files in by_folder.items():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            remove_stale_partials(folder)
            fd, probe = tempfile.mkstemp(prefix=f".{files[0].name}.", suffix=".part", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise _os_error(files[0], exc) from exc
    if nbytes:
        folder = next(iter(by_folder))
        free = shutil.disk_usage(folder).free
        if free < nbytes:
            raise OutputError(f"{folder}: {free / 2**20:.0f} MiB free, the outputs need about "
                              f"{nbytes / 2**20:.0f} MiB; free some space or write elsewhere with -o")


def fits_text(value: str) -> str:
    """``value`` as printable ASCII for a FITS card (accents dropped, other letters as ``?``)."""
    decomposed = unicodedata.normalize("NFKD", str(value))
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    return "".join(c if " " <= c <= "~" else "?" for c in plain)


def fits_rows(data: np.ndarray, header: Any) -> np.ndarray:
    """FITS data with the top row first: flipped when the header says ``ROWORDER = 'BOTTOM-UP'``."""
    order = str(header.get("ROWORDER", "TOP-DOWN") or "TOP-DOWN").strip().upper()
    return np.ascontiguousarray(data[..., ::-1, :]) if order == "BOTTOM-UP" else data


def linear_icc_profile(channels: int = 3) -> bytes:
    """A minimal ICC v2 display profile with a linear tone curve (gamma 1.0).

    RGB: sRGB primaries (D50-adapted) and white; mono: a gray profile. It tells
    GIMP and Photoshop that the TIFF's values are linear light.
    """
    def s15(v: float) -> bytes:
        return struct.pack(">i", int(round(v * 65536)))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ " + bytes(4) + s15(x) + s15(y) + s15(z)

    name = b"skystack linear " + (b"sRGB" if channels == 3 else b"gray")
    desc = (b"desc" + bytes(4) + struct.pack(">I", len(name) + 1) + name + b"\0"
            + bytes(8) + bytes(3) + bytes(67))
    curve = b"curv" + bytes(4) + struct.pack(">I", 1) + struct.pack(">H", 0x0100) + bytes(2)
    tags = [(b"desc", desc), (b"cprt", b"text" + bytes(4) + b"No copyright, use freely\0"),
            (b"wtpt", xyz(0.9642, 1.0, 0.8249))]
    if channels == 3:
        tags += [(b"rXYZ", xyz(0.4360747, 0.2225045, 0.0139322)),
                 (b"gXYZ", xyz(0.3850649, 0.7168786, 0.0971045)),
                 (b"bXYZ", xyz(0.1430804, 0.0606169, 0.7141733)),
                 (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    else:
        tags += [(b"kTRC", curve)]
    offset = 128 + 4 + 12 * len(tags)
    table, body = struct.pack(">I", len(tags)), b""
    for sig, data in tags:
        data += bytes(-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (struct.pack(">I", size) + bytes(4) + bytes([2, 0x10, 0, 0]) + b"mntr"
              + (b"RGB " if channels == 3 else b"GRAY") + b"XYZ " + bytes(12) + b"acsp" + bytes(24)
              + struct.pack(">I", 0) + s15(0.9642) + s15(1.0) + s15(0.8249) + bytes(4) + bytes(16) + bytes(28))
    assert len(header) == 128
    return header + table + body


def write_tiff(path: str | os.PathLike, image: np.ndarray, *, inputs: Iterable = (),
               description: str | None = None) -> Path:
    """Write a linear 32-bit float TIFF ((3,H,W) -> RGB, (H,W) -> mono), top row first.

    It carries a linear-light ICC profile (:func:`linear_icc_profile`), so
    GIMP and Photoshop do not take the values as gamma-encoded.
    """
    import tifffile

    a = np.asarray(image, dtype=np.float32)
    photometric = "minisblack"
    if a.ndim == 3:
        a = np.ascontiguousarray(np.moveaxis(a, 0, -1))
        photometric = "rgb"
    icc = linear_icc_profile(3 if photometric == "rgb" else 1)
    with atomic_path(path, inputs=inputs) as tmp:
        tifffile.imwrite(tmp, a, photometric=photometric, description=description,
                         metadata=None, compression=None, iccprofile=icc)
    return Path(path)


def _fits_card(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(fits_text(v) if isinstance(v, str) else v for v in value)
    return fits_text(value) if isinstance(value, str) else value


def write_fits(path: str | os.PathLike, image: np.ndarray, header: dict[str, Any] | None = None, *,
               inputs: Iterable = (),
               extensions: Iterable[tuple[str, np.ndarray, dict[str, Any]]] = ()) -> Path:
    """Write a float32 FITS (channel-first cube for colour) with header cards.

    ``image`` is top row first, as everywhere in skystack; the file stores the
    bottom row first (FITS convention) with ``ROWORDER = 'BOTTOM-UP'``, so
    every viewer shows it the same way up as the TIFF. String values are made
    ASCII (:func:`fits_text`). ``extensions`` are ``(name, array, header)``
    image HDUs appended after the primary one (e.g. the stack's ``COVERAGE``
    map), stored the same way.
    """
    from skystack.engine.fitsfile import card, write_images

    def cards(values: dict[str, Any] | None) -> list[str]:
        out: list[str] = []
        for key, value in (values or {}).items():
            if value is None or key == "ROWORDER":
                continue
            value = _fits_card(value)
            out += card(key, *value) if isinstance(value, tuple) else card(key, value)
        return out + card("ROWORDER", "BOTTOM-UP", "first stored row is the bottom of the picture")

    def bottom_up(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(a)[..., ::-1, :])

    hdus = [(bottom_up(np.asarray(image, dtype=np.float32)), cards(header), None)]
    hdus += [(bottom_up(data), cards(hdr), name) for name, data, hdr in extensions]
    with atomic_path(path, inputs=inputs) as tmp:
        write_images(tmp, hdus)
    return Path(path)


#: The previews' PNGs: rows unfiltered, deflated with zlib's run-length strategy in bands of rows on the
#: cores. To deflate's match search a stretched sky is noise, so it finds runs and little else, and
#: PNG's row filters (Pillow tries five on every row) find little more: the real Seestar stack's 2 MP
#: preview is 4708 KiB (Pillow, its adaptive filters and the same strategy: 4686 KiB), written in 85
#: instead of 200 ms on two cores. Each band is a raw deflate stream ending on a byte boundary (a sync
#: flush), so the bands join into one zlib stream, as pigz joins its blocks.
PNG_BAND_BYTES = 1 << 20


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_text(key: str, value: str) -> bytes:
    """A tEXt chunk, or an iTXt one when the text is not Latin-1 (as Pillow's ``PngInfo.add_text``)."""
    try:
        return _png_chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:
        return _png_chunk(b"iTXt", key.encode("latin-1", "replace") + b"\0\0\0\0\0" + value.encode("utf-8"))


def _deflate_band(rows: np.ndarray, last: bool) -> tuple[np.ndarray, bytes]:
    """``rows`` ``(n, W * C)`` uint8, each led by PNG's filter byte 0 (none), and their raw deflate."""
    raw = np.zeros((rows.shape[0], rows.shape[1] + 1), dtype=np.uint8)
    raw[:, 1:] = rows
    z = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15, 9, zlib.Z_RLE)
    return raw, z.compress(raw) + z.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def png_bytes(pixels: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """An 8-bit PNG of ``pixels`` (``(H, W)`` grey or ``(H, W, 3)`` RGB uint8) with text chunks.

    The rows are deflated in bands of about :data:`PNG_BAND_BYTES` on the cores
    (zlib lets other threads run while it compresses).
    """
    from skystack.engine.workers import map_threads

    h, w = pixels.shape[:2]
    rows = np.ascontiguousarray(pixels, dtype=np.uint8).reshape(h, -1)
    step = max(1, PNG_BAND_BYTES // max(rows.shape[1], 1))
    starts = list(range(0, h, step)) or [0]
    bands = map_threads(lambda r0: _deflate_band(rows[r0:r0 + step], r0 + step >= h), starts)
    adler = 1
    for raw, _ in bands:  # the checksum of the filtered rows, band after band
        adler = zlib.adler32(raw, adler)
    colour = 2 if pixels.ndim == 3 else 0
    head = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0))
    texts = b"".join(_png_text(k, v) for k, v in (text or {}).items())
    stream = b"\x78\x9c" + b"".join(z for _, z in bands) + struct.pack(">I", adler)
    return b"\x89PNG\r\n\x1a\n" + head + texts + _png_chunk(b"IDAT", stream) + _png_chunk(b"IEND", b"")


def write_preview(path: str | os.PathLike, stretched: np.ndarray, *, inputs: Iterable = (),
                  quality: int = 92, text: dict[str, str] | None = None) -> Path:
    """Write an 8-bit PNG (:func:`png_bytes`) or JPEG of an already stretched [0,1] image (or its
    ``to_8bit`` copy).

    ``text``: PNG text chunks.
    """
    from skystack.engine.stretch import to_8bit

    pixels = to_8bit(stretched)
    with atomic_path(path, inputs=inputs) as tmp:
        if Path(path).suffix.lower() in (".jpg", ".jpeg"):
            from PIL import Image

            Image.fromarray(pixels).save(tmp, format="JPEG", quality=quality)
        else:
            tmp.write_bytes(png_bytes(pixels, text))
    return Path(path)


def write_json(path: str | os.PathLike, data: Any, *, inputs: Iterable = ()) -> Path:
    """Write JSON (NumPy values converted) atomically."""
    with atomic_path(path, inputs=inputs) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    return Path(path)


def write_text(path: str | os.PathLike, text: str, *, inputs: Iterable = ()) -> Path:
    """Write a UTF-8 text file (e.g. the HTML report) atomically."""
    with atomic_path(path, inputs=inputs) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
