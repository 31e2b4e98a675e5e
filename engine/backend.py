"""Compute backend selection: NumPy on the CPU, CuPy (custom kernels) on the GPU.

Stage code never branches on the backend. It calls an *operation* (a function
in the stage's module) that takes arrays; the operation runs its NumPy twin for
NumPy arrays and launches its CUDA kernel (through :func:`launch`) for CuPy
arrays. :func:`get_backend` decides where arrays live.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

from skystack.engine.errors import BackendUnavailable

#: Threads per block for every grid-stride launch.
BLOCK = 256
#: Upper bound on blocks per launch (grid-stride loops cover the rest).
MAX_BLOCKS = 65535

_CHOICES = ("auto", "cpu", "gpu")


@dataclass(frozen=True, kw_only=True)
class Backend:
    """Where arrays live and kernels run.

    Attributes
    ----------
    name : str
        ``"cpu"`` or ``"gpu"``.
    xp : module
        ``numpy`` or ``cupy``.
    device_name : str
        Human-readable device name.
    """

    name: str
    xp: Any
    device_name: str

    @property
    def is_gpu(self) -> bool:
        """True for the CuPy backend."""
        return self.name == "gpu"

    def free_memory(self) -> int:
        """Free bytes on the device (GPU memory, or available RAM on CPU)."""
        if self.is_gpu:
            free, _total = self.xp.cuda.runtime.memGetInfo()
            return int(free)
        import psutil

        return int(psutil.virtual_memory().available)

    def memory_budget(self, limit: int | None = None, *, fraction: float = 0.5) -> int:
        """Bytes the stacking buffers may use: ``min(limit, fraction * free)``."""
        budget = int(self.free_memory() * fraction)
        return budget if limit is None else min(int(limit), budget)

    def asarray(self, a: np.ndarray):
        """Move a host array to this backend."""
        return self.xp.asarray(a)

    def to_host(self, a) -> np.ndarray:
        """Return ``a`` as a NumPy array."""
        return to_host(a)


CPU = Backend(name="cpu", xp=np, device_name="CPU (NumPy)")


def _gpu_probe() -> tuple[Backend | None, str]:
    """Try to build the GPU backend; return (backend, reason-if-not)."""
    try:
        import cupy  # noqa: F401
    except Exception as exc:  # ImportError, or a broken CUDA install
        return None, f"cupy is not installed ({type(exc).__name__})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None, f"no CUDA driver ({msg})"
    if n < 1:
        return None, "no CUDA device"
    try:
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        cupy.zeros(1, dtype=cupy.float32).sum()  # touch the device once
    except Exception as exc:
        return None, f"CUDA device unusable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    try:  # a device without a working compiler (e.g. CuPy >= 14 without the CUDA headers) is unusable
        from skystack.kernels import get_kernel

        get_kernel("rawconv.cu", "cfa_to_float_u16")
    except Exception as exc:
        return None, f"CUDA kernels do not compile: {error_line(exc)}"
    return Backend(name="gpu", xp=cupy, device_name=name), ""


def error_line(exc: BaseException, limit: int = 200) -> str:
    """One line naming an exception's cause: its first line that mentions an error, else its first line.

    Compiler exceptions carry the whole log (dozens of lines); the CLI prints one.
    """
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    line = next((ln for ln in lines if "error" in ln.lower()), lines[0])
    return line if len(line) <= limit else line[:limit - 3] + "..."


@lru_cache(maxsize=1)
def _gpu_cached() -> tuple[Backend | None, str]:
    return _gpu_probe()


_warned_fallback = False


def get_backend(name: str | None = None, *, quiet: bool = False) -> Backend:
    """Return the backend for ``name`` (``auto``, ``cpu`` or ``gpu``).

    ``None`` reads ``SKYSTACK_BACKEND`` (default ``auto``). ``auto`` falls back
    to the CPU and says so once on stderr; ``gpu`` raises
    :class:`BackendUnavailable` with a one-line reason.
    """
    global _warned_fallback
    name = (name or os.environ.get("SKYSTACK_BACKEND") or "auto").lower()
    if name not in _CHOICES:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {', '.join(_CHOICES)}")
    if name == "cpu":
        return CPU
    gpu, reason = _gpu_cached()
    if gpu is not None:
        return gpu
    if name == "gpu":
        raise BackendUnavailable(f"GPU unavailable ({reason}); use --backend cpu or auto")
    if not quiet and not _warned_fallback:
        print(f"GPU unavailable ({reason}); using CPU", file=sys.stderr)
        _warned_fallback = True
    return CPU


def is_device_array(a: Any) -> bool:
    """True when ``a`` is a CuPy array (so operations launch their CUDA kernel)."""
    return type(a).__module__.startswith("cupy")


def array_module(a: Any):
    """``cupy`` for CuPy arrays, else ``numpy``."""
    if is_device_array(a):
        import cupy

        return cupy
    return np


def to_host(a: Any) -> np.ndarray:
    """Return ``a`` as a NumPy array (copying from the device if needed)."""
    if is_device_array(a):
        return a.get()
    return np.asarray(a)


def grid_for(n_items: int, block: int = BLOCK) -> int:
    """Blocks for a grid-stride launch over ``n_items`` work items."""
    return max(1, min(MAX_BLOCKS, (int(n_items) + block - 1) // block))


def launch(source: str, kernel: str, n_items: int, args: Sequence[Any], *,
           defines: Sequence[str] = (), block: int = BLOCK) -> None:
    """Launch ``kernel`` from ``kernels/<source>`` over ``n_items`` (grid-stride).

    ``args`` are passed as CuPy passes them: device arrays, and scalars that
    must already be NumPy-typed (``np.int32``, ``np.float32``) to match the C
    signature. They are checked against the kernel's parsed signature first
    (:func:`skystack.kernels.check_args`): a wrong dtype raises ``TypeError``
    instead of being silently misread on the device.
    """
    from skystack.engine.errors import KernelCompileError
    from skystack.kernels import check_args, get_kernel, kernel_params

    check_args(kernel, kernel_params(source, kernel), args, device=True)
    try:
        k = get_kernel(source, kernel, tuple(defines))
    except Exception as exc:  # NVRTC's log: one line for the user, the rest with --debug
        raise KernelCompileError(f"CUDA kernel {kernel} ({source}) does not compile: {error_line(exc)}; "
                                 "use --backend cpu") from exc
    k((grid_for(n_items, block),), (block,), tuple(args))
