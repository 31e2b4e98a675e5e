"""Compile-check CUDA sources without a GPU: NVRTC through ctypes, or ``nvcc -ptx``.

NVRTC comes from the ``nvidia-cuda-nvrtc`` wheel (a dev dependency): its
library is found under ``site-packages/nvidia/*/lib`` (``cu13/lib`` for the
13.x wheel, ``cuda_nvrtc/lib`` for 12.x), or at the path in
``$SKYSTACK_NVRTC``, or through the system loader / ``$CUDA_HOME``. No driver
or device is needed to produce PTX.

The options are those CuPy gets from :func:`skystack.kernels.get_module`
(:data:`skystack.kernels.NVRTC_OPTIONS`) plus the ``-ftz=true`` CuPy appends.
"""

from __future__ import annotations

import ctypes
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from skystack.engine.errors import KernelCompileError
from skystack.kernels import CUPY_APPENDED_OPTIONS, NVRTC_OPTIONS

__all__ = ["compile_ptx", "compile_nvcc_ptx", "nvrtc_available", "nvrtc_version",
           "nvcc_path", "nvrtc_library_path", "compile_options"]


def _candidates() -> list[str]:
    env = os.environ.get("SKYSTACK_NVRTC")
    if env:
        return [env]
    out: list[str] = []
    roots = [p for p in sys.path if p and os.path.isdir(os.path.join(p, "nvidia"))]
    for root in roots:
        for sub in ("cu13", "cuda_nvrtc", "*"):
            out += sorted(glob.glob(os.path.join(root, "nvidia", sub, "lib", "libnvrtc.so*")),
                          reverse=True)
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            out += sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*")), reverse=True)
    out += ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
    # the .alt. variant is the same compiler with a different C++ ABI; skip it
    return [c for i, c in enumerate(out) if ".alt." not in c and c not in out[:i]]


@lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str, str]:
    """(library, its path, why-not) -- the library is None when none loads."""
    errors = []
    for cand in _candidates():
        if os.sep in cand and not os.path.exists(cand):
            continue
        try:
            d = os.path.dirname(cand)
            if d:  # NVRTC dlopens its builtins library by name; load it first, globally
                for b in sorted(glob.glob(os.path.join(d, "libnvrtc-builtins.so*"))):
                    if ".alt." not in b:
                        ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
            lib = ctypes.CDLL(cand, mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            errors.append(f"{cand}: {exc}")
            continue
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        lib.nvrtcGetErrorString.argtypes = [ctypes.c_int]
        return lib, cand, ""
    why = "; ".join(errors) or "libnvrtc not found (pip install nvidia-cuda-nvrtc==13.0.*)"
    return None, "", why


def nvrtc_available() -> bool:
    """True when an NVRTC library can be loaded."""
    return _load()[0] is not None


def nvrtc_library_path() -> str:
    """Path of the NVRTC library used ('' when none)."""
    return _load()[1]


def nvrtc_unavailable_reason() -> str:
    """Why NVRTC cannot be loaded ('' when it can)."""
    return _load()[2]


def nvrtc_version() -> tuple[int, int]:
    """NVRTC ``(major, minor)``; raises :class:`KernelCompileError` if none loads."""
    lib = _require()
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(lib, lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def _require() -> ctypes.CDLL:
    lib, _path, why = _load()
    if lib is None:
        raise KernelCompileError(f"NVRTC is not available: {why}")
    return lib


def _check(lib: ctypes.CDLL, rc: int, what: str) -> None:
    if rc != 0:
        raise KernelCompileError(f"{what} failed: {lib.nvrtcGetErrorString(rc).decode()}")


def compile_options(arch: str = "compute_75", defines: Sequence[str] = ()) -> list[str]:
    """NVRTC options of a kernel build (as CuPy's RawModule gets them)."""
    return ([f"-D{d}" for d in defines] + list(NVRTC_OPTIONS) + list(CUPY_APPENDED_OPTIONS)
            + [f"--gpu-architecture={arch}"])


def compile_ptx(source_text: str, *, arch: str = "compute_75", defines: Sequence[str] = (),
                name: str = "x.cu") -> str:
    """Compile CUDA C to PTX with NVRTC.

    Parameters
    ----------
    source_text : str
        The CUDA source.
    arch : str
        Virtual architecture, e.g. ``"compute_75"`` or ``"compute_90"``.
    defines : sequence of str
        ``-D`` defines (``"MAX_FRAMES=64"``).
    name : str
        File name shown in the compiler log.

    Returns
    -------
    str
        The PTX text.

    Raises
    ------
    KernelCompileError
        With NVRTC's full log when the source does not compile (or NVRTC is missing).
    """
    lib = _require()
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source_text.encode(), name.encode(),
                                       0, None, None), "nvrtcCreateProgram")
    try:
        opts = [o.encode() for o in compile_options(arch, defines)]
        c_opts = (ctypes.c_char_p * len(opts))(*opts)
        rc = lib.nvrtcCompileProgram(prog, len(opts), c_opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(max(1, size.value))
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode(errors="replace").strip()
        if rc != 0:
            raise KernelCompileError(
                f"NVRTC could not compile {name} for {arch} "
                f"({lib.nvrtcGetErrorString(rc).decode()}; options {' '.join(o.decode() for o in opts)}):\n{log}"
            )
        _check(lib, lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
        ptx = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
        return ptx.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def nvcc_path() -> str | None:
    """``nvcc`` on PATH, or None."""
    return shutil.which("nvcc")


def compile_nvcc_ptx(path: str | os.PathLike, arch: str = "compute_75",
                     defines: Sequence[str] = ()) -> str:
    """Compile a ``.cu`` file to PTX with ``nvcc -ptx`` (same language options as NVRTC).

    Raises
    ------
    KernelCompileError
        With nvcc's output when it fails, or when nvcc is not on PATH.
    """
    nvcc = nvcc_path()
    if nvcc is None:
        raise KernelCompileError("nvcc is not on PATH")
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="skystack-nvcc-") as tmp:
        out = Path(tmp) / (path.stem + ".ptx")
        cmd = [nvcc, "-ptx", f"-arch={arch}", *(f"-D{d}" for d in defines),
               *NVRTC_OPTIONS, *CUPY_APPENDED_OPTIONS, str(path), "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise KernelCompileError(
                f"nvcc could not compile {path.name} for {arch} ({' '.join(cmd[1:])}):\n"
                f"{(proc.stderr + proc.stdout).strip()}"
            )
        return out.read_text()
