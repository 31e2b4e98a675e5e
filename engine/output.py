"""Output writers: 32-bit float TIFF, FITS with provenance, 8-bit preview, JSON.

Every writer is atomic (a temporary file in the target folder, then
``os.replace``) and refuses to overwrite an input frame.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from skystack.engine.errors import OutputError


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it over ``final`` on success.

    Raises
    ------
    OutputError
        When ``final`` is one of ``inputs``, its folder cannot be created, or
        the disk is full.
    """
    final = Path(final)
    resolved = final.resolve()
    for p in inputs:
        if Path(p).resolve() == resolved:
            raise OutputError(f"{final}: refusing to overwrite an input frame; choose another -o path")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{final.parent}: cannot create the output folder ({exc.strerror})") from exc
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise OutputError(f"{final}: disk full while writing; free some space or write elsewhere with -o") from exc
        raise OutputError(f"{final}: cannot write ({exc.strerror or exc})") from exc
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_tiff(path: str | os.PathLike, image: np.ndarray, *, inputs: Iterable = (),
               description: str | None = None) -> Path:
    """Write a linear 32-bit float TIFF ((3,H,W) -> RGB, (H,W) -> mono)."""
    import tifffile

    a = np.asarray(image, dtype=np.float32)
    photometric = "minisblack"
    if a.ndim == 3:
        a = np.ascontiguousarray(np.moveaxis(a, 0, -1))
        photometric = "rgb"
    with atomic_path(path, inputs=inputs) as tmp:
        tifffile.imwrite(tmp, a, photometric=photometric, description=description,
                         metadata=None, compression=None)
    return Path(path)


def write_fits(path: str | os.PathLike, image: np.ndarray, header: dict[str, Any] | None = None, *,
               inputs: Iterable = (),
               extensions: Iterable[tuple[str, np.ndarray, dict[str, Any]]] = ()) -> Path:
    """Write a float32 FITS (channel-first cube for colour) with header cards.

    ``extensions`` are ``(name, array, header)`` image HDUs appended after the
    primary one (e.g. the stack's ``COVERAGE`` map).
    """
    from astropy.io import fits

    def cards(hdu, values: dict[str, Any] | None) -> None:
        for key, value in (values or {}).items():
            if value is not None:
                hdu.header[key] = value

    hdu = fits.PrimaryHDU(np.asarray(image, dtype=np.float32))
    cards(hdu, header)
    hdus = [hdu]
    for name, data, hdr in extensions:
        ext = fits.ImageHDU(np.asarray(data), name=name)
        cards(ext, hdr)
        hdus.append(ext)
    with atomic_path(path, inputs=inputs) as tmp:
        fits.HDUList(hdus).writeto(tmp, overwrite=True)
    return Path(path)


def write_preview(path: str | os.PathLike, stretched: np.ndarray, *, inputs: Iterable = (),
                  quality: int = 92) -> Path:
    """Write an 8-bit PNG or JPEG of an already stretched [0,1] image."""
    from PIL import Image

    from skystack.engine.stretch import to_8bit

    fmt = "JPEG" if Path(path).suffix.lower() in (".jpg", ".jpeg") else "PNG"
    img = Image.fromarray(to_8bit(stretched))
    with atomic_path(path, inputs=inputs) as tmp:
        img.save(tmp, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return Path(path)


def write_json(path: str | os.PathLike, data: Any, *, inputs: Iterable = ()) -> Path:
    """Write JSON (NumPy values converted) atomically."""
    with atomic_path(path, inputs=inputs) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    return Path(path)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
