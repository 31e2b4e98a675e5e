"""Frame store: registered frames kept in RAM, or spilled to an on-disk cache.

The stacker reads it back tile by tile, so only one ``(N, C, h, w)`` block
has to be in memory at once, whatever the number and size of the frames.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np


class FrameStore:
    """``n`` frames of shape ``(C, H, W)`` in RAM or in a disk-backed memmap.

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
        Storage type of the spill cache (RAM storage is always float32).
    spill_dir : path or None
        Folder for the cache file (default: the system temp folder).
    """

    def __init__(self, n: int, shape: tuple[int, int, int], *, ram_budget: int | None = None,
                 dtype: str = "float32", spill_dir: str | os.PathLike | None = None) -> None:
        self.n = int(n)
        self.shape = tuple(int(s) for s in shape)
        need = self.n * int(np.prod(self.shape)) * 4
        self.on_disk = ram_budget is not None and need > ram_budget
        self._dir: Path | None = None
        if self.on_disk:
            self.dtype = np.dtype(dtype)
            self._dir = Path(tempfile.mkdtemp(prefix="skystack-store-", dir=spill_dir))
            self._data = np.lib.format.open_memmap(self._dir / "frames.npy", mode="w+", dtype=self.dtype,
                                                   shape=(self.n, *self.shape))
        else:
            self.dtype = np.dtype(np.float32)
            self._data = np.empty((self.n, *self.shape), dtype=np.float32)

    @property
    def nbytes(self) -> int:
        """Bytes held (in RAM or on disk)."""
        return int(self._data.nbytes)

    def put(self, i: int, image: np.ndarray) -> None:
        """Store frame ``i`` (``(C,H,W)`` or ``(H,W)`` for C = 1)."""
        img = np.asarray(image, dtype=np.float32).reshape(self.shape)
        self._data[i] = img
        if self.on_disk:
            if i % 8 == 7:
                self._data.flush()

    def get(self, i: int) -> np.ndarray:
        """Frame ``i`` as float32 ``(C, H, W)``."""
        return np.asarray(self._data[i], dtype=np.float32)

    def tile(self, indices, y0: int, y1: int, x0: int = 0, x1: int | None = None) -> np.ndarray:
        """Block ``(len(indices), C, y1-y0, x1-x0)`` as float32."""
        idx = np.asarray(list(indices), dtype=np.intp)
        x1 = self.shape[2] if x1 is None else x1
        if idx.size == self.n and np.array_equal(idx, np.arange(self.n)):
            block = self._data[:, :, y0:y1, x0:x1]
        else:
            block = self._data[idx, :, y0:y1, x0:x1]
        return np.asarray(block, dtype=np.float32)

    def close(self) -> None:
        """Drop the data and delete any spill file."""
        self._data = None  # type: ignore[assignment]
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> "FrameStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass
