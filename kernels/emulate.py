"""Run skystack's CUDA kernels on the CPU, one thread at a time (for tests).

:func:`emulated` compiles a ``kernels/*.cu`` source with ``g++`` through the
shim header ``cuda_shim.h`` (CUDA qualifiers defined away; ``dim3``,
``threadIdx``/``blockIdx``/``blockDim``/``gridDim``; atomics; math
intrinsics) into a shared library, plus a generated C++ launcher per kernel
that loops over every block and thread of the launch grid, sets the index
globals and calls the kernel body. Python calls the launcher through
:mod:`ctypes` with exactly the arguments CuPy would get: NumPy arrays stand in
for device arrays (the kernel reads and writes them in place) and scalars
must be NumPy scalars of the exact C type.

The build uses ``-ffp-contract=off`` so ``a*b + c`` rounds twice, like NumPy
and like NVRTC with ``--fmad=false`` (:data:`skystack.kernels.NVRTC_OPTIONS`).
Differences that remain between emulation and the GPU: CuPy compiles with
``-ftz=true`` (subnormal floats flush to zero on the GPU), GPU ``expf``/
``sinf``/... and the ``__expf``-style intrinsics differ by a few ulp, and
float ``atomicAdd`` sums in a different order on the GPU.

Libraries are cached under ``$SKYSTACK_EMU_CACHE`` (default
``$XDG_CACHE_HOME/skystack/emu``, else ``~/.cache/skystack/emu``, else a
temporary folder), keyed by a hash of the source, the shim, the defines, the
compiler and its flags; concurrent builds write a temporary file and rename it.

Example
-------
>>> from skystack.kernels.emulate import emulated
>>> mod = emulated("rawconv.cu")
>>> mod.launch("cfa_to_float_u16", n, (raw, out, np.int64(n), ...))  # doctest: +SKIP

In tests, :func:`use_emulator` sends an engine operation down its GPU branch
with NumPy arrays, running its kernels here.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from skystack.engine.backend import BLOCK, grid_for
from skystack.engine.errors import KernelCompileError
from skystack.kernels import KERNEL_DIR, KernelParam, check_args, parse_kernels, read_source

__all__ = ["EmulatedModule", "emulated", "emulated_launch", "use_emulator", "emulator_available",
           "cache_dir", "CXX_FLAGS"]

#: g++ flags of every emulation build.
CXX_FLAGS: tuple[str, ...] = ("-O2", "-std=c++17", "-ffp-contract=off", "-fPIC", "-shared",
                              "-fno-strict-aliasing")
#: g++ flags of the native CPU backend (:mod:`skystack.kernels.native`): the same IEEE
#: float rules (no contraction, no fast-math), -O3, blocks over the cores, real atomics;
#: no ``errno`` from math functions (the same results, and ``sqrtf`` in a loop can vectorise);
#: no floating-point traps (the same values: only the exception flags, which nothing reads, may
#: differ; a comparison may then run where the source skips it, so a loop of selects on compared
#: values, like RCD's clamped ratios, can vectorise).
NATIVE_CXX_FLAGS: tuple[str, ...] = ("-O3", "-std=c++17", "-ffp-contract=off", "-fPIC", "-shared",
                                     "-fno-strict-aliasing", "-fno-semantic-interposition", "-fno-math-errno",
                                     "-fno-trapping-math", "-fopenmp", "-DSKYSTACK_NATIVE=1")
SHIM = KERNEL_DIR / "cuda_shim.h"
_LAUNCHER_VERSION = "8"  # bump when the generated wrapper changes
_build_lock = threading.Lock()


def _cxx() -> str | None:
    return os.environ.get("CXX_EMU") or _which("g++", os.environ.get("PATH"))


@lru_cache(maxsize=8)
def _which(name: str, path: str | None) -> str | None:
    """``shutil.which`` once per PATH (every CPU kernel launch asks whether a compiler exists)."""
    return shutil.which(name, path=path)


@lru_cache(maxsize=8)
def _cxx_version(cxx: str) -> str:
    """``cxx --version`` (part of a build's cache key), run once per compiler and process."""
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return cxx


def emulator_available() -> bool:
    """True when a C++ compiler (``g++``) for the emulator is on PATH."""
    return _cxx() is not None


def cache_dir() -> Path:
    """Folder holding the emulation libraries."""
    env = os.environ.get("SKYSTACK_EMU_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "skystack" / "emu"


_SCALAR_CTYPES: dict[str, Any] = {
    "float32": ctypes.c_float,
    "float64": ctypes.c_double,
    "int8": ctypes.c_int8,
    "uint8": ctypes.c_uint8,
    "int16": ctypes.c_int16,
    "uint16": ctypes.c_uint16,
    "int32": ctypes.c_int32,
    "uint32": ctypes.c_uint32,
    "int64": ctypes.c_int64,
    "uint64": ctypes.c_uint64,
    "bool": ctypes.c_bool,
}


def _launcher(name: str, params: Sequence[KernelParam], *, parallel: bool = False) -> str:
    """C++ source of ``skystack_emu_<name>``: run every (block, thread) of a launch.

    ``parallel`` builds the native CPU backend's launcher instead: the kernel's
    grid-stride loop, rewritten by :func:`_chunked_loops`, runs over contiguous
    chunks of items, the chunks spread over the cores with OpenMP.
    """
    decls = "".join(f", {p.decl} a{i}" for i, p in enumerate(params))
    call = ", ".join(f"a{i}" for i in range(len(params)))
    if parallel:
        return _chunk_launcher(name, decls, call)
    return f"""
extern "C" void skystack_emu_{name}(unsigned gx, unsigned gy, unsigned gz,
        unsigned bx, unsigned by, unsigned bz, int reverse{decls}) {{
    const long long nb = (long long)gx * gy * gz, nt = (long long)bx * by * bz;
    if (gy == 1 && gz == 1 && by == 1 && bz == 1) {{  // 1-D launches: no index divisions
        for (long long ib = 0; ib < nb; ++ib) {{
            gridDim = dim3(gx, 1, 1);
            blockDim = dim3(bx, 1, 1);
            blockIdx.x = (unsigned)(reverse ? nb - 1 - ib : ib);
            blockIdx.y = blockIdx.z = 0;
            threadIdx.y = threadIdx.z = 0;
            for (long long it = 0; it < nt; ++it) {{
                threadIdx.x = (unsigned)(reverse ? nt - 1 - it : it);
                {name}({call});
            }}
        }}
        return;
    }}
    for (long long ib = 0; ib < nb; ++ib) {{
        gridDim = dim3(gx, gy, gz);
        blockDim = dim3(bx, by, bz);
        const long long b = reverse ? nb - 1 - ib : ib;
        blockIdx.x = (unsigned)(b % gx);
        blockIdx.y = (unsigned)((b / gx) % gy);
        blockIdx.z = (unsigned)(b / ((long long)gx * gy));
        for (long long it = 0; it < nt; ++it) {{
            const long long t = reverse ? nt - 1 - it : it;
            threadIdx.x = (unsigned)(t % bx);
            threadIdx.y = (unsigned)((t / bx) % by);
            threadIdx.z = (unsigned)(t / ((long long)bx * by));
            {name}({call});
        }}
    }}
}}
"""


def _chunk_launcher(name: str, decls: str, call: str) -> str:
    """The native launcher: the launch's threads as a range of items, cut into contiguous chunks
    (about 16 per core, at most 4096 items), each a single call of the rewritten kernel; the last
    chunk runs to the kernel's own bound, so no item is lost whatever the launch geometry."""
    return f"""
extern "C" void skystack_emu_{name}(unsigned gx, unsigned gy, unsigned gz,
        unsigned bx, unsigned by, unsigned bz, int reverse{decls}) {{
    const long long range = (long long)gx * gy * gz * bx * by * bz;
    long long size = range / ((long long)omp_get_max_threads() * 16);
    size = size < 1 ? 1 : (size > 4096 ? 4096 : size);
    const long long nc = (range + size - 1) / size;
    #pragma omp parallel for schedule(dynamic, 1)
    for (long long c = 0; c < nc; ++c) {{
        const long long k = reverse ? nc - 1 - c : c;
        skystack_item_begin = k * size;
        skystack_item_end = (k == nc - 1) ? LLONG_MAX : (k + 1) * size;
        {name}({call});
    }}
}}
"""


#: The kernels' grid-stride loop header (every kernel of ``kernels/`` has it; see
#: docs/architecture.md), and what native builds make of it: a plain loop over the
#: chunk of items the launcher gives the calling core.
_GRID_STRIDE = re.compile(
    r"for\s*\(\s*long long (\w+)\s*=\s*blockIdx\.x\s*\*\s*\(long long\)blockDim\.x\s*\+\s*threadIdx\.x\s*;"
    r"\s*\1\s*<\s*(\w+)\s*;\s*\1\s*\+=\s*\(long long\)blockDim\.x\s*\*\s*gridDim\.x\s*\)")


def _chunked_loops(text: str, n_kernels: int) -> str:
    """``text`` (with ``n_kernels`` kernels) with every kernel's grid-stride loop over the launcher's
    chunk (native builds).

    Raises
    ------
    KernelCompileError
        When a kernel has no such loop (the native launcher could not run it).
    """
    out, count = _GRID_STRIDE.subn(
        lambda m: (f"for (long long {m[1]} = skystack_item_begin, {m[1]}_end = "
                   f"(skystack_item_end < (long long)({m[2]}) ? skystack_item_end : (long long)({m[2]})); "
                   f"{m[1]} < {m[1]}_end; ++{m[1]})"), text)
    if count < n_kernels:
        raise KernelCompileError(f"{n_kernels - count} kernel(s) without the grid-stride loop header "
                                 "(see docs/architecture.md); the native build needs it")
    return out


#: Native builds export the OpenMP team size of the calling thread's next launches
#: (``omp_set_num_threads`` sets a per-thread value when called outside a parallel region).
_NATIVE_THREADS = """
extern "C" void skystack_native_set_threads(int n) { omp_set_num_threads(n > 0 ? n : 1); }
"""

#: Before a native build's kernels: the chunk of items each call runs (set by the launcher).
_NATIVE_PRELUDE = """#include <omp.h>
#include <climits>
static thread_local long long skystack_item_begin = 0;
static thread_local long long skystack_item_end = 0;
"""


def _dims(v: int | Sequence[int]) -> tuple[int, int, int]:
    t = (int(v),) if np.isscalar(v) else tuple(int(x) for x in v)
    if not 1 <= len(t) <= 3 or any(x < 1 for x in t):
        raise ValueError(f"launch dimensions must be 1 to 3 positive ints, got {v!r}")
    return t + (1,) * (3 - len(t))  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)
class EmulatedModule:
    """A CUDA source built for the CPU; see :func:`emulated`.

    Attributes
    ----------
    source : str
        Source name (or absolute path) it was built from.
    defines : tuple of str
        ``-D`` defines of the build (``"MAX_FRAMES=64"``...).
    path : pathlib.Path
        The shared library.
    signatures : dict
        Kernel name -> parameters (:class:`skystack.kernels.KernelParam`).
    """

    source: str
    defines: tuple[str, ...]
    path: Path
    signatures: dict[str, tuple[KernelParam, ...]]
    _lib: Any

    @property
    def kernels(self) -> list[str]:
        """Names of the kernels in this source."""
        return list(self.signatures)

    def params(self, kernel: str) -> tuple[KernelParam, ...]:
        """Parameters of ``kernel``."""
        if kernel not in self.signatures:
            raise ValueError(f"{self.source} has no kernel {kernel!r} (it has: {', '.join(self.signatures)})")
        return self.signatures[kernel]

    def launch(self, kernel: str, n_items: int, args: Sequence[Any], *, block: int = BLOCK,
               reverse: bool = False) -> None:
        """Run ``kernel`` over ``n_items`` with the grid-stride geometry of ``backend.launch``.

        Parameters
        ----------
        kernel : str
            Kernel name.
        n_items : int
            Work items; the grid is ``backend.grid_for(n_items, block)`` blocks of ``block``.
        args : sequence
            As for :func:`skystack.engine.backend.launch`, with NumPy arrays for device arrays.
        block : int
            Threads per block.
        reverse : bool
            Run blocks and threads in reverse order (a kernel obeying the rules
            gives the same answer).
        """
        self.call(kernel, (grid_for(n_items, block),), (block,), args, reverse=reverse)

    def set_threads(self, n: int) -> None:
        """Cores this thread's next launches use (native builds only; the emulator runs one thread)."""
        fn = getattr(self._lib, "skystack_native_set_threads", None)
        if fn is not None:
            fn(int(n))

    def call(self, kernel: str, grid: int | Sequence[int], block: int | Sequence[int],
             args: Sequence[Any], *, reverse: bool = False) -> None:
        """Run ``kernel`` with an explicit launch geometry (``grid``, ``block``: 1-3 dims)."""
        params = self.params(kernel)
        check_args(kernel, params, args, device=False)
        g, b = _dims(grid), _dims(block)
        c_args: list[Any] = [*g, *b, 1 if reverse else 0]
        for p, a in zip(params, args):
            c_args.append(a.ctypes.data if p.pointer else a.item())
        getattr(self._lib, f"skystack_emu_{kernel}")(*c_args)


#: Extra g++ flags of a native build per instruction-set level (:func:`skystack.kernels.native.host_isa`).
#: No ``-mfma``: with ``-ffp-contract=off`` nothing would be fused anyway, and AVX2's wider vectors
#: round every operation as SSE2's do, so both builds give the same bits.
NATIVE_ISA_FLAGS: dict[str, tuple[str, ...]] = {"baseline": (), "avx2": ("-mavx2",)}


def _build(text: str, label: str, defines: tuple[str, ...],
           signatures: dict[str, tuple[KernelParam, ...]], *, native: bool = False,
           isa: str = "baseline") -> Path:
    cxx = _cxx()
    if cxx is None:
        raise KernelCompileError("the CPU kernel emulator needs g++ on PATH (apt-get install g++)")
    shim = SHIM.read_text()
    unit = (f'#include "{SHIM.name}"\n' + (_NATIVE_PRELUDE if native else "")
            + f'#line 1 "{label}"\n{_chunked_loops(text, len(signatures)) if native else text}\n'
            "#line 1 \"<skystack-emulation-launchers>\"\n"
            + "".join(_launcher(k, ps, parallel=native) for k, ps in signatures.items())
            + (_NATIVE_THREADS if native else ""))
    flags = (list(NATIVE_CXX_FLAGS) + list(NATIVE_ISA_FLAGS[isa]) if native else list(CXX_FLAGS)) \
        + [f"-D{d}" for d in defines]
    version = _cxx_version(cxx)
    key = hashlib.sha256("\0".join(
        [_LAUNCHER_VERSION, unit, shim, cxx, version, *flags]).encode()).hexdigest()[:24]
    stem = Path(label).stem
    out_dir = cache_dir()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        out_dir = Path(tempfile.gettempdir()) / f"skystack-emu-{os.getuid()}"
        out_dir.mkdir(parents=True, exist_ok=True)
    so = out_dir / f"{stem}-{key}.so"
    if so.exists():
        return so
    with tempfile.TemporaryDirectory(prefix="skystack-emu-") as tmp:
        cpp = Path(tmp) / f"{stem}.cpp"
        cpp.write_text(unit)
        tmp_so = out_dir / f".{so.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        cmd = [cxx, *flags, f"-I{KERNEL_DIR}", str(cpp), "-o", str(tmp_so)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tmp_so.unlink(missing_ok=True)
            raise KernelCompileError(
                f"g++ could not build {label} for CPU emulation "
                f"(defines {list(defines)}):\n{proc.stderr.strip()}"
            )
        os.replace(tmp_so, so)
    return so


@lru_cache(maxsize=None)
def _emulated(path: str, text: str, defines: tuple[str, ...], native: bool = False,
              isa: str = "baseline") -> EmulatedModule:
    signatures = parse_kernels(text)
    with _build_lock:
        so = _build(text, Path(path).name, defines, signatures, native=native, isa=isa)
    # libgomp reads this when the first OpenMP library loads: a team's idle threads sleep instead of
    # spinning on the cores that skystack's other threads (workers, decoders, writers) need (unless set)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    lib = ctypes.CDLL(str(so))
    for name, params in signatures.items():
        fn = getattr(lib, f"skystack_emu_{name}")
        argtypes = [ctypes.c_uint] * 6 + [ctypes.c_int]
        for p in params:
            argtypes.append(ctypes.c_void_p if p.pointer else _SCALAR_CTYPES[p.dtype.name])
        fn.argtypes = argtypes
        fn.restype = None
    return EmulatedModule(source=path, defines=defines, path=so, signatures=signatures, _lib=lib)


def emulated(source: str | os.PathLike, defines: Sequence[str] = ()) -> EmulatedModule:
    """Build (once per source text and defines) the CPU emulation of a CUDA source.

    Parameters
    ----------
    source : str or path
        File name in ``kernels/`` (``"rawconv.cu"``), or a path to another ``.cu`` file.
    defines : sequence of str
        Preprocessor defines, as for :func:`skystack.engine.backend.launch`
        (e.g. ``("MAX_FRAMES=64",)``).

    Returns
    -------
    EmulatedModule
        Call ``.launch(kernel, n_items, args)`` exactly like ``backend.launch``.

    Raises
    ------
    KernelCompileError
        When g++ is missing or rejects the source (message holds its log).
    """
    return _emulated(str(source), read_source(source), tuple(str(d) for d in defines))


def emulated_launch(source: str, kernel: str, n_items: int, args: Sequence[Any], *,
                    defines: Sequence[str] = (), block: int = BLOCK) -> None:
    """Drop-in for :func:`skystack.engine.backend.launch` that runs the kernel in the emulator."""
    emulated(source, tuple(defines)).launch(kernel, n_items, args, block=block)


def use_emulator(monkeypatch: Any, module: Any) -> None:
    """Make ``module``'s operations take their GPU branch on NumPy arrays (for tests).

    Replaces the module's ``is_device_array`` (so NumPy arrays count as device
    arrays) and ``launch`` (so kernels run in the emulator). This checks, with
    no GPU, that an operation passes its kernel the right arguments. It needs
    the module to import both names directly
    (``from skystack.engine.backend import is_device_array, launch``) and to
    allocate with ``array_module(x)``, which stays NumPy.

    Parameters
    ----------
    monkeypatch : pytest.MonkeyPatch
        The test's ``monkeypatch`` fixture (undone after the test).
    module : module
        The engine module whose operations should be emulated.
    """
    monkeypatch.setattr(module, "is_device_array", lambda a: isinstance(a, np.ndarray))
    monkeypatch.setattr(module, "launch", emulated_launch)
