"""sep's background and source extraction, called through its C library without holding the GIL.

sep's Python functions hold Python's global interpreter lock for the whole
background estimate and extraction (sep issue #172), so the pass-1 worker
threads queue behind each other's detection and nothing else of the process
runs meanwhile. sep's extension module exports its C API (``sep.h``:
``sep_background``, ``sep_extract`` and their helpers); :mod:`ctypes` calls it
with the GIL released. The background runs in any number of threads at once;
the extraction, whose C code keeps its pixel-list layout in process globals
that every call rewrites, runs one at a time (:data:`_EXTRACT_LOCK`), but no
longer stops the other threads.

The C structures are those of sep 1.4 (64-bit sizes). At first use a small
synthetic field is measured both ways; the C path is used only when it gives
sep's Python results bit for bit (:func:`available`), else everything goes
through sep's Python API as before.
"""

from __future__ import annotations

import ctypes as C
import logging
import threading
from functools import lru_cache
from typing import Any

import numpy as np

_I64, _PD, _PF = C.c_int64, C.POINTER(C.c_double), C.POINTER(C.c_float)
_PI = C.POINTER(_I64)
_TFLOAT, _TBYTE = 42, 11  # sep's type codes: float32, uint8
_NOISE_STDDEV, _THRESH_REL, _FILTER_MATCHED = 1, 0, 1
#: sep's default filter kernel (SExtractor's 3 x 3 pyramid), as sep.extract uses it.
_KERNEL = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=np.float32)
#: Catalogue columns, as sep.extract's structured array has them.
_COLUMNS = ("thresh", "npix", "tnpix", "xmin", "xmax", "ymin", "ymax", "x", "y", "x2", "y2", "xy", "errx2",
            "erry2", "errxy", "a", "b", "theta", "cxx", "cyy", "cxy", "cflux", "flux", "cpeak", "peak", "xcpeak",
            "ycpeak", "xpeak", "ypeak", "flag")
_EXTRACT_LOCK = threading.Lock()


class _Image(C.Structure):
    _fields_ = [("data", C.c_void_p), ("noise", C.c_void_p), ("mask", C.c_void_p), ("segmap", C.c_void_p),
                ("dtype", C.c_int), ("ndtype", C.c_int), ("mdtype", C.c_int), ("sdtype", C.c_int),
                ("segids", _PI), ("idcounts", _PI), ("numids", _I64), ("w", _I64), ("h", _I64),
                ("noiseval", C.c_double), ("noise_type", C.c_short), ("gain", C.c_double),
                ("maskthresh", C.c_double)]


class _Bkg(C.Structure):
    _fields_ = [("w", _I64), ("h", _I64), ("bw", _I64), ("bh", _I64), ("nx", _I64), ("ny", _I64), ("n", _I64),
                ("globalback", C.c_float), ("globalrms", C.c_float), ("back", C.c_void_p), ("dback", C.c_void_p),
                ("sigma", C.c_void_p), ("dsigma", C.c_void_p)]


_COLUMN_TYPES = {**{k: _PF for k in ("thresh", "a", "b", "theta", "cxx", "cyy", "cxy", "cflux", "flux", "cpeak",
                                     "peak")},
                 **{k: _PI for k in ("npix", "tnpix", "xmin", "xmax", "ymin", "ymax", "xcpeak", "ycpeak", "xpeak",
                                     "ypeak")},
                 **{k: _PD for k in ("x", "y", "x2", "y2", "xy", "errx2", "erry2", "errxy")},
                 "flag": C.POINTER(C.c_short)}


class _Catalog(C.Structure):
    _fields_ = [("nobj", C.c_int), *((k, _COLUMN_TYPES[k]) for k in _COLUMNS),
                ("pix", C.c_void_p), ("objectspix", C.c_void_p)]


@lru_cache(maxsize=1)
def _library() -> Any:
    """sep's C API with its argument types, or None (not sep 1.4, or a symbol missing)."""
    import sep

    if not str(getattr(sep, "__version__", "")).startswith("1.4."):
        return None
    try:
        lib = C.CDLL(sep.__file__)
        lib.sep_background.argtypes = [C.POINTER(_Image), _I64, _I64, _I64, _I64, C.c_double,
                                       C.POINTER(C.POINTER(_Bkg))]
        lib.sep_bkg_subarray.argtypes = [C.POINTER(_Bkg), C.c_void_p, C.c_int]
        lib.sep_bkg_free.argtypes = [C.POINTER(_Bkg)]
        lib.sep_extract.argtypes = [C.POINTER(_Image), C.c_float, C.c_int, C.c_int, _PF, _I64, _I64, C.c_int,
                                    C.c_int, C.c_double, C.c_int, C.c_double, C.POINTER(C.POINTER(_Catalog))]
        lib.sep_catalog_free.argtypes = [C.POINTER(_Catalog)]
        lib.sep_get_errmsg.argtypes = [C.c_int, C.c_char_p]
        lib.sep_get_errdetail.argtypes = [C.c_char_p]
    except (OSError, AttributeError):
        return None
    return lib


def _c_library(use_c: bool | None) -> Any:
    """The C library to call, or None for sep's Python API: ``use_c`` None means where :func:`available`."""
    return _library() if (available() if use_c is None else use_c) else None


def _image(data: np.ndarray, mask: np.ndarray | None = None, noise: float | None = None) -> _Image:
    im = _Image()
    im.data, im.dtype, im.h, im.w = data.ctypes.data, _TFLOAT, data.shape[0], data.shape[1]
    if mask is not None:
        im.mask, im.mdtype, im.maskthresh = mask.ctypes.data, _TBYTE, 0.0
    if noise is not None:
        im.noiseval, im.noise_type = float(noise), _NOISE_STDDEV
    return im


def _check(lib: Any, status: int) -> None:
    """sep's exception for a nonzero status, worded as its Python API words it."""
    if status:
        msg, detail = C.create_string_buffer(61), C.create_string_buffer(512)
        lib.sep_get_errmsg(status, msg)
        lib.sep_get_errdetail(detail)
        text = msg.value.decode(errors="replace")
        more = detail.value.decode(errors="replace")
        raise Exception(f"{text}: {more}" if more else text)  # noqa: TRY002 - what sep raises


class Background:
    """``sep.Background(data, mask, bw=box, bh=box, fw=filt, fh=filt)``: ``globalback``,
    ``globalrms`` and :meth:`subfrom`, through the C library when :func:`available`."""

    def __init__(self, data: np.ndarray, *, mask: np.ndarray | None, box: int, filt: int,
                 use_c: bool | None = None) -> None:
        self._lib = _c_library(use_c)
        if self._lib is None:
            import sep

            self._bkg = sep.Background(data, mask=mask, bw=box, bh=box, fw=filt, fh=filt)
            self.globalback, self.globalrms = float(self._bkg.globalback), float(self._bkg.globalrms)
            return
        data = _float_c(data)
        m = None if mask is None else np.ascontiguousarray(mask, dtype=np.uint8)
        out = C.POINTER(_Bkg)()
        _check(self._lib, self._lib.sep_background(C.byref(_image(data, m)), box, box, filt, filt, 0.0,
                                                   C.byref(out)))
        self._bkg = out
        self.globalback, self.globalrms = float(out.contents.globalback), float(out.contents.globalrms)

    def subfrom(self, data: np.ndarray) -> None:
        """Subtract the background from the C-contiguous float32 ``data`` in place."""
        if self._lib is None:
            self._bkg.subfrom(data)
            return
        if data.dtype != np.float32 or not data.flags.c_contiguous:
            raise ValueError("subfrom needs a C-contiguous float32 array")
        _check(self._lib, self._lib.sep_bkg_subarray(self._bkg, data.ctypes.data, _TFLOAT))

    def __del__(self) -> None:
        if getattr(self, "_lib", None) is not None and getattr(self, "_bkg", None):
            self._lib.sep_bkg_free(self._bkg)
            self._bkg = None


def extract(data: np.ndarray, thresh: float, *, err: float, minarea: int, deblend_cont: float, clean: bool,
            use_c: bool | None = None) -> np.ndarray:
    """``sep.extract(data, thresh, err=err, minarea=minarea, deblend_cont=deblend_cont, clean=clean)``
    (relative threshold, scalar noise, sep's default matched filter): its structured array of objects."""
    lib = _c_library(use_c)
    if lib is None:
        import sep

        return sep.extract(data, thresh, err=err, minarea=minarea, deblend_cont=deblend_cont, clean=clean)
    data = _float_c(data)
    cat = C.POINTER(_Catalog)()
    with _EXTRACT_LOCK:  # the C code's pixel-list layout lives in process globals
        _check(lib, lib.sep_extract(C.byref(_image(data, noise=err)), float(thresh), _THRESH_REL, int(minarea),
                                    _KERNEL.ctypes.data_as(_PF), 3, 3, _FILTER_MATCHED, 32, float(deblend_cont),
                                    1 if clean else 0, 1.0, C.byref(cat)))
    try:
        return _catalog_array(cat.contents)
    finally:
        lib.sep_catalog_free(cat)


def _catalog_array(c: _Catalog) -> np.ndarray:
    """The catalogue's columns copied into a structured array (sep.extract's fields)."""
    n = int(c.nobj)
    out = np.empty(n, dtype=[(k, _dtype_of(_COLUMN_TYPES[k])) for k in _COLUMNS])
    for k in _COLUMNS if n else ():
        out[k] = np.ctypeslib.as_array(getattr(c, k), shape=(n,))
    return out


def _dtype_of(ptr_type: Any) -> np.dtype:
    """A column's type in sep.extract's array: the C type, float32 widened to float64 as sep does."""
    t = np.dtype(ptr_type._type_)
    return np.dtype(np.float64) if t == np.float32 else t


def _float_c(data: np.ndarray) -> np.ndarray:
    """``data`` as the C path reads it: C-contiguous native float32 (a copy only when it is not)."""
    return np.ascontiguousarray(data, dtype=np.float32)


@lru_cache(maxsize=1)
def available() -> bool:
    """True when the C path is loaded and measures a test field exactly as sep's Python API does
    (background, its subtraction and every catalogue column, with a mask and without)."""
    if _library() is None:
        return False
    try:
        return _same_as_python()
    except Exception:  # noqa: BLE001 - any failure of the C path means the Python API is used
        logging.getLogger(__name__).debug("sep's C path failed its check", exc_info=True)
        return False


def _same_as_python() -> bool:
    rng = np.random.default_rng(7)
    img = rng.normal(100.0, 5.0, (160, 200)).astype(np.float32)
    yy, xx = np.mgrid[0:160, 0:200]
    for y, x, f in ((40.3, 50.7, 900.0), (100.1, 150.4, 400.0), (120.8, 30.2, 2500.0), (41.5, 56.0, 300.0)):
        img += (f * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 4.5)).astype(np.float32)
    mask = np.zeros(img.shape, dtype=bool)
    mask[:20, 180:] = True
    for m in (None, mask):
        a, b = img.copy(), img.copy()
        ref = Background(a, mask=m, box=32, filt=3, use_c=False)
        got = Background(b, mask=m, box=32, filt=3, use_c=True)
        if (ref.globalback, ref.globalrms) != (got.globalback, got.globalrms):
            return False
        ref.subfrom(a)
        got.subfrom(b)
        if not np.array_equal(a, b):
            return False
        o1 = extract(a, 3.0, err=ref.globalrms, minarea=5, deblend_cont=0.005, clean=True, use_c=False)
        o2 = extract(b, 3.0, err=ref.globalrms, minarea=5, deblend_cont=0.005, clean=True, use_c=True)
        if len(o1) < 3 or o1.dtype != o2.dtype or any(not np.array_equal(o1[k], o2[k]) for k in _COLUMNS):
            return False
    return True
