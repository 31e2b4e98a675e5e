"""Frame store: registered frames kept in RAM, or spilled to an on-disk cache.

The stacker reads it back tile by tile, so only one ``(N, C, h, w)`` block
has to be in memory at once, whatever the number and size of the frames.
The spill cache is a plain file read and written with ``pread``/``pwrite``,
not a memory map: mapped pages would count as the process's resident memory
and defeat ``--memory-limit``.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np

from skystack.engine.backend import is_device_array, launch, run_cpu
from skystack.engine.errors import OutputError
from skystack.engine.memory import store_layout


def _spill_error(where: Path | str, exc: OSError) -> OutputError:
    """The frame cache's OSError as one line naming the folder and the fixes."""
    what = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
    return OutputError(f"{where}: {what} while spilling frames to disk; free space there, raise --memory-limit "
                       "so more frames stay in RAM, or point TMPDIR at a larger disk")


#: Float16 spill values are the frames' divided by this (2^4: float16's largest finite value,
#: 65504, becomes 1.05e6).
HALF_SCALE = 16.0
#: Kernel source of the float16 conversions.
_HALF_SRC = "half.cu"


def to_half(img: np.ndarray, scale: float, out: np.ndarray | None = None) -> np.ndarray:
    """``img * scale`` (float32 product) rounded to float16, C-contiguous (into ``out``, a C-contiguous
    float16 array of ``img``'s shape, when given).

    On a device array, the kernel on the device (``out`` a device array too). On the host,
    the ``to_half`` kernel of ``kernels/half.cu`` built for the host where it is
    faster (NumPy's float16 cast, without hardware conversion, ~2.8 ns a value
    here against the kernel's ~1 ns), else the twin :func:`_to_half_numpy`; the
    bits are the same.
    """
    if is_device_array(img):
        return _half_on_device("to_half", img, "float32", "float16", scale, out)
    src = np.ascontiguousarray(img, dtype=np.float32)
    out = np.empty(src.shape, dtype=np.float16) if out is None else out
    n = src.size

    def native(mod):
        mod.launch("to_half", n, (src, out.view(np.uint16), np.int64(n), np.float32(scale)))
        return out

    return run_cpu(_HALF_SRC, "to_half", n, lambda: _to_half_numpy(src, scale, out), native)


def _to_half_numpy(src: np.ndarray, scale: float, out: np.ndarray) -> np.ndarray:
    """Twin of ``to_half``: one pass, the products in float32, rounded to float16 as written into ``out``."""
    return np.multiply(src, np.float32(scale), out=out, dtype=np.float32, casting="unsafe")


def from_half(stored: np.ndarray, scale: float, out: np.ndarray | None = None) -> np.ndarray:
    """Float32 ``stored * scale`` of a float16 array (exact conversion, float32 product), into ``out``
    (C-contiguous, of ``stored``'s shape) when given: the ``from_half`` kernel or its twin, same bits;
    on a device array, the kernel on the device."""
    if is_device_array(stored):
        return _half_on_device("from_half", stored, "float16", "float32", scale, out)
    src = np.ascontiguousarray(stored, dtype=np.float16)
    out = np.empty(src.shape, dtype=np.float32) if out is None else out
    n = src.size

    def twin():
        return np.multiply(src, np.float32(scale), out=out, dtype=np.float32)

    def native(mod):
        mod.launch("from_half", n, (src.view(np.uint16), out, np.int64(n), np.float32(scale)))
        return out

    if not out.flags.c_contiguous:
        return twin()
    return run_cpu(_HALF_SRC, "from_half", n, twin, native)


def _half_on_device(kernel: str, src, src_dtype: str, out_dtype: str, scale: float, out=None):
    """``kernel`` (``to_half`` or ``from_half``) of the device array ``src`` into ``out`` (a
    C-contiguous device array of its shape; new when None)."""
    from skystack.engine.backend import array_module

    xp = array_module(src)
    src = xp.ascontiguousarray(src, dtype=src_dtype)
    out = xp.empty(src.shape, dtype=out_dtype) if out is None else out
    if not out.flags.c_contiguous or out.shape != src.shape or out.dtype != np.dtype(out_dtype):
        raise ValueError(f"{kernel}: out must be a C-contiguous {out_dtype} array of shape {src.shape}")

    def bits(a):  # float16 goes to the kernel as its bits
        return a.view(xp.uint16) if a.dtype == np.float16 else a

    launch(_HALF_SRC, kernel, src.size, (bits(src), bits(out), np.int64(src.size), np.float32(scale)))
    return out


class FrameStore:
    """``n`` frames of shape ``(C, H, W)`` in RAM or in a spill file on disk.

    Parameters
    ----------
    n : int
        Number of frames.
    shape : tuple of int
        ``(C, H, W)`` of each frame.
    ram_budget : int or None
        Bytes the store may take in RAM; above it the store spills to disk.
        ``None`` keeps everything in RAM.
    dtype : {"float32", "float16"}
        Storage type of the spill cache, and of the RAM store when float32 does
        not fit in ``ram_budget`` but this does
        (:func:`~skystack.engine.memory.store_layout`). Float16 values are kept
        divided by :data:`HALF_SCALE` (a power of two: no rounding of its own),
        so they reach ~1e6 ADU, beyond a flat-fielded saturated star, with
        float16's 11 significant bits.
    float32_budget : int or None
        Bytes of float32 frames the store may hold in RAM (None: ``ram_budget``).
    spill_dir : path or None
        Folder for the cache file (default: the system temp folder). The cache
        lives in a ``skystack-store-*`` folder locked by this process; such
        folders left by a killed run are removed when the next store spills.
    """

    #: Host memory (see :class:`DeviceFrameStore`).
    on_device = False

    def __init__(self, n: int, shape: tuple[int, int, int], *, ram_budget: int | None = None,
                 dtype: str = "float32", spill_dir: str | os.PathLike | None = None,
                 float32_budget: int | None = None) -> None:
        self.n = int(n)
        self.shape = tuple(int(s) for s in shape)
        held, self.on_disk = store_layout(self.n * int(np.prod(self.shape)) * 4, ram_budget, dtype, float32_budget)
        self.dtype = np.dtype(held)
        self._dir: Path | None = None
        self._fd: int | None = None
        self._lock: int | None = None
        if self.on_disk:
            from skystack.engine.output import live_dir

            try:
                self._dir, self._lock = live_dir("skystack-store-", spill_dir)
                self._fd = os.open(self._dir / "frames.bin", os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                where = self._dir or spill_dir or "the temporary folder"
                self.close()
                raise _spill_error(where, exc) from exc
            self._data = None
        else:
            self._data = np.empty((self.n, *self.shape), dtype=self.dtype)
        c, h, w = self.shape
        self._row = w * self.dtype.itemsize
        self._plane = h * self._row
        self._frame = c * self._plane

    @property
    def nbytes(self) -> int:
        """Bytes held (in RAM or on disk)."""
        return self.n * self._frame

    @property
    def where(self) -> str:
        """``"disk"`` (spilled) or ``"RAM"``."""
        return "disk" if self.on_disk else "RAM"

    def put(self, i: int, image: np.ndarray) -> None:
        """Store frame ``i`` (``(C,H,W)`` or ``(H,W)`` for C = 1)."""
        img = np.asarray(image, dtype=np.float32).reshape(self.shape)
        if self._fd is None:
            if self.dtype == np.float32:
                self._data[i] = img
            else:
                to_half(img, 1.0 / HALF_SCALE, out=self._data[i])
            return
        buf = memoryview(self._encode(img)).cast("B")  # no copy when float32 already so
        done = 0
        while done < len(buf):
            try:
                written = os.pwrite(self._fd, buf[done:], i * self._frame + done)
            except OSError as exc:
                raise _spill_error(self._dir, exc) from exc
            if written <= 0:
                raise _spill_error(self._dir, OSError(errno.ENOSPC, "short write"))
            done += written

    def _read_into(self, dst: np.ndarray, offset: int) -> None:
        """Fill the C-contiguous ``dst`` (of the store's dtype) from the spill file at ``offset``, no copy."""
        view = memoryview(dst).cast("B")
        done = 0
        while done < len(view):
            try:
                got = os.preadv(self._fd, [view[done:]], offset + done)
            except OSError as exc:
                raise _spill_error(self._dir, exc) from exc
            if got <= 0:
                raise _spill_error(self._dir, OSError(errno.EIO, "short read"))
            done += got

    def get(self, i: int, out: np.ndarray | None = None) -> np.ndarray:
        """Frame ``i`` as float32 ``(C, H, W)``: a view of the RAM store, or read from the spill
        (into ``out``, a caller's reused float32 buffer of that shape, when given)."""
        if self._fd is None and self.dtype == np.float32:
            return self._data[i]
        out = np.empty(self.shape, dtype=np.float32) if out is None else out
        if self._fd is None:
            return self._decode(self._data[i], out=out)
        if self.dtype == np.float32:  # straight into the result: one frame, not two
            self._read_into(out, i * self._frame)
            return out
        stored = np.empty(self.shape, dtype=self.dtype)
        self._read_into(stored, i * self._frame)
        return self._decode(stored, out=out)

    def _encode(self, img: np.ndarray) -> np.ndarray:
        """``img`` (float32) as the spill file holds it, C-contiguous."""
        if self.dtype == np.float32:
            return np.ascontiguousarray(img)
        return to_half(img, 1.0 / HALF_SCALE)

    def _decode(self, stored: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Float32 values of ``stored`` (the spill's dtype), into ``out`` when given."""
        if self.dtype != np.float32:
            return from_half(stored, HALF_SCALE, out=out)
        if out is None:
            return stored
        out[...] = stored
        return out

    def tile(self, indices, y0: int, y1: int, x0: int = 0, x1: int | None = None) -> np.ndarray:
        """Block ``(len(indices), C, y1-y0, x1-x0)`` as float32."""
        idx = [int(i) for i in indices]
        c, h, w = self.shape
        x1 = w if x1 is None else x1
        if self._fd is None:
            every = len(idx) == self.n and idx == list(range(self.n))
            block = self._data[:, :, y0:y1, x0:x1] if every else self._data[idx, :, y0:y1, x0:x1]
            return np.asarray(block, dtype=np.float32) if self.dtype == np.float32 else self._decode(block)
        out = np.empty((len(idx), c, y1 - y0, x1 - x0), dtype=np.float32)
        direct = self.dtype == np.float32 and x0 == 0 and x1 == w  # whole rows: read into the block
        rows = out if direct else np.empty((len(idx), c, y1 - y0, w), dtype=self.dtype)
        for k, i in enumerate(idx):
            for ch in range(c):
                self._read_into(rows[k, ch], i * self._frame + ch * self._plane + y0 * self._row)
        if direct:
            return out
        return self._decode(rows if x0 == 0 and x1 == w else rows[..., x0:x1], out=out)  # one pass for the block

    def close(self) -> None:
        """Drop the data and delete any spill file."""
        self._data = None  # type: ignore[assignment]
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __enter__(self) -> "FrameStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


class DeviceFrameStore:
    """``n`` frames of shape ``(C, H, W)`` in GPU memory (the VRAM frame store).

    The same interface as :class:`FrameStore`, on device arrays: ``put`` takes a
    device array (a host one is copied up), ``get`` and ``tile`` return float32
    device arrays, so frames stay on the device from debayering through warping
    to the combine. Frames are held as float32 when they fit, else as the host
    store's float16 (the same kernels: the same bits as a float16 host store);
    :meth:`layout` says which, if either, fits the budget.

    Parameters
    ----------
    n, shape :
        As :class:`FrameStore`.
    xp : module
        ``cupy`` (the backend's array module).
    dtype : {"float32", "float16"}
        How the frames are held (float16 values divided by :data:`HALF_SCALE`).
    """

    on_disk = False
    on_device = True

    def __init__(self, n: int, shape: tuple[int, int, int], *, xp, dtype: str = "float32") -> None:
        self.n = int(n)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float16):
            raise ValueError(f"a device store holds float32 or float16 frames, not {dtype}")
        self._xp = xp
        self._data = xp.empty((self.n, *self.shape), dtype=self.dtype)

    @staticmethod
    def layout(n: int, shape: tuple[int, int, int], budget: int, store_dtype: str = "float16") -> str | None:
        """``"float32"`` when ``n`` frames of ``shape`` take at most half of the device ``budget`` as
        float32, else ``store_dtype`` when it is float16 and they fit as that, else None (the host
        store): :func:`~skystack.engine.memory.store_layout` with half the budget, where spilling
        means leaving the device."""
        held, spills = store_layout(n * int(np.prod(shape)) * 4, budget // 2, store_dtype)
        return None if spills else held

    @property
    def nbytes(self) -> int:
        """Bytes held on the device."""
        return self.n * int(np.prod(self.shape)) * self.dtype.itemsize

    where = "device"

    def put(self, i: int, image) -> None:
        """Store frame ``i`` (``(C,H,W)`` or ``(H,W)`` for C = 1)."""
        img = self._xp.asarray(image, dtype=self._xp.float32).reshape(self.shape)
        if self.dtype == np.float32:
            self._data[i] = img
        else:
            to_half(img, 1.0 / HALF_SCALE, out=self._data[i])

    def get(self, i: int, out=None):
        """Frame ``i``, a float32 ``(C, H, W)`` device array: a view of a float32 store (copy it before
        changing it), or copied into ``out`` (a device array of that shape) when given, as
        :meth:`FrameStore.get`."""
        if self.dtype == np.float16:
            return from_half(self._data[i], HALF_SCALE, out=out)
        if out is None:
            return self._data[i]
        out[...] = self._data[i]
        return out

    def tile(self, indices, y0: int, y1: int, x0: int = 0, x1: int | None = None):
        """Block ``(len(indices), C, y1-y0, x1-x0)``, a float32 device array."""
        idx = [int(i) for i in indices]
        x1 = self.shape[2] if x1 is None else x1
        if idx == list(range(self.n)):
            block = self._data[:, :, y0:y1, x0:x1]
        else:
            block = self._data[self._xp.asarray(np.asarray(idx, dtype=np.int64))][:, :, y0:y1, x0:x1]
        return block if self.dtype == np.float32 else from_half(block, HALF_SCALE)

    def close(self) -> None:
        """Free the device memory."""
        self._data = None

    def __enter__(self) -> "DeviceFrameStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
