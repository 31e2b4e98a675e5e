"""CUDA C sources of skystack and their one memoized loader.

Every ``*.cu`` file in this folder holds ``extern "C" __global__`` kernels
written with grid-stride loops over float32 data, no warp intrinsics, no
shared memory and no ``__syncthreads`` (so the CPU emulator in
:mod:`skystack.kernels.emulate` can run them one thread at a time).
CuPy only loads and launches them.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent


def list_sources() -> list[str]:
    """File names of every CUDA source shipped with skystack."""
    return sorted(p.name for p in KERNEL_DIR.glob("*.cu"))


def read_source(name: str) -> str:
    """Text of the CUDA source ``name`` (e.g. ``"cfa.cu"``)."""
    return (KERNEL_DIR / name).read_text()


@lru_cache(maxsize=None)
def get_module(name: str, defines: tuple[str, ...] = ()):
    """Build (once per source and set of defines) a ``cupy.RawModule``.

    CuPy compiles with NVRTC and caches the binary on disk.
    """
    import cupy

    opts = tuple(f"-D{d}" for d in defines) + ("--std=c++14",)
    return cupy.RawModule(code=read_source(name), options=opts)


def get_kernel(name: str, kernel: str, defines: tuple[str, ...] = ()):
    """Return the ``cupy.RawKernel`` ``kernel`` of source ``name``."""
    return get_module(name, defines).get_function(kernel)
