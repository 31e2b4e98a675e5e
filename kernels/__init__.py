"""CUDA C sources of skystack and their one memoized loader.

Every ``*.cu`` file in this folder holds ``extern "C" __global__`` kernels
written with grid-stride loops over float32 data, no warp intrinsics, no
shared memory and no ``__syncthreads`` (so the CPU emulator in
:mod:`skystack.kernels.emulate` can run them one thread at a time).
CuPy only loads and launches them.

This module also parses the kernels' C signatures (:func:`kernel_params`) so
that every launch, on the GPU (:func:`skystack.engine.backend.launch`) or in
the CPU emulator, checks its arguments' dtypes against the signature: a
``float64`` array passed to a ``float*`` parameter would otherwise be
silently misread on the device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

KERNEL_DIR = Path(__file__).resolve().parent

#: NVRTC options of every kernel build (CuPy appends ``-ftz=true`` itself).
#: ``--fmad=false`` keeps ``a*b+c`` as two IEEE roundings, so float32 results
#: match the NumPy twins (and the ``-ffp-contract=off`` CPU emulation) bit for
#: bit wherever the order of operations is the same.
NVRTC_OPTIONS: tuple[str, ...] = ("--std=c++17", "--fmad=false")
#: Options CuPy adds after ours (the compile check passes them too).
CUPY_APPENDED_OPTIONS: tuple[str, ...] = ("-ftz=true",)


def list_sources() -> list[str]:
    """File names of every CUDA source shipped with skystack."""
    return sorted(p.name for p in KERNEL_DIR.glob("*.cu"))


def read_source(name: str | Path) -> str:
    """Text of the CUDA source ``name``: a file name in ``kernels/`` (e.g. ``"rawconv.cu"``), read once
    per process (the package's sources do not change while it runs, and the host launches small
    blocks many times a second), or a path to another ``.cu`` file, read on every call.

    Raises
    ------
    FileNotFoundError
        When there is no such source.
    """
    if _is_package_source(str(name)):
        return _package_source(str(name))
    p = Path(name)
    if not p.is_file():
        raise FileNotFoundError(f"no CUDA source {name} (give a name in {KERNEL_DIR} or a path)")
    return p.read_text()


@lru_cache(maxsize=None)
def _is_package_source(name: str) -> bool:
    """Whether ``name`` is a source in ``kernels/`` (asked once per name: no ``stat`` per launch)."""
    return not Path(name).is_absolute() and (KERNEL_DIR / name).is_file()


@lru_cache(maxsize=None)
def _package_source(name: str) -> str:
    return (KERNEL_DIR / name).read_text()


@lru_cache(maxsize=None)
def get_module(name: str, defines: tuple[str, ...] = ()):
    """Build (once per source and set of defines) a ``cupy.RawModule``.

    CuPy compiles with NVRTC and caches the binary on disk.
    """
    import cupy

    opts = tuple(f"-D{d}" for d in defines) + NVRTC_OPTIONS
    return cupy.RawModule(code=read_source(name), options=opts)


def get_kernel(name: str, kernel: str, defines: tuple[str, ...] = ()):
    """Return the ``cupy.RawKernel`` ``kernel`` of source ``name``."""
    return get_module(name, tuple(defines)).get_function(kernel)


# ----------------------------------------------------------------------------- signatures

#: C type (normalised spelling) -> NumPy dtype. Pointer and scalar parameters
#: use the same table; a scalar argument must be a NumPy scalar of exactly this
#: dtype, a pointer argument a C-contiguous array of it.
C_TYPES: dict[str, np.dtype] = {
    "float": np.dtype(np.float32),
    "double": np.dtype(np.float64),
    "char": np.dtype(np.int8),
    "signed char": np.dtype(np.int8),
    "unsigned char": np.dtype(np.uint8),
    "short": np.dtype(np.int16),
    "short int": np.dtype(np.int16),
    "signed short": np.dtype(np.int16),
    "unsigned short": np.dtype(np.uint16),
    "unsigned short int": np.dtype(np.uint16),
    "int": np.dtype(np.int32),
    "signed": np.dtype(np.int32),
    "signed int": np.dtype(np.int32),
    "unsigned": np.dtype(np.uint32),
    "unsigned int": np.dtype(np.uint32),
    "long": np.dtype(np.int64),
    "long int": np.dtype(np.int64),
    "unsigned long": np.dtype(np.uint64),
    "long long": np.dtype(np.int64),
    "long long int": np.dtype(np.int64),
    "signed long long": np.dtype(np.int64),
    "unsigned long long": np.dtype(np.uint64),
    "unsigned long long int": np.dtype(np.uint64),
    "size_t": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
}

_QUALIFIERS = {"const", "volatile", "__restrict__", "__restrict", "restrict"}


@dataclass(frozen=True, kw_only=True)
class KernelParam:
    """One parameter of a kernel entry point.

    Attributes
    ----------
    name : str
        Parameter name in the source.
    ctype : str
        Normalised C base type (``"float"``, ``"unsigned short"``...).
    dtype : numpy.dtype
        NumPy dtype matching ``ctype``.
    pointer : bool
        True for ``T*`` (an array argument).
    const : bool
        True when the pointee (or scalar) is ``const``.
    decl : str
        The declaration as written (type part only, without the name).
    """

    name: str
    ctype: str
    dtype: np.dtype
    pointer: bool
    const: bool
    decl: str


#: A string or character literal (kept), a // comment, or a /* */ comment (unterminated: to the end).
_TOKEN_RE = re.compile(r'"(?:\\.|[^"\\])*"?|\'(?:\\.|[^\'\\])*\'?|//[^\n]*|/\*.*?(?:\*/|\Z)', re.DOTALL)


def strip_comments(text: str) -> str:
    """``text`` with C/C++ comments replaced by spaces (string literals kept, line breaks too)."""
    def blank(m: re.Match) -> str:
        t = m.group(0)
        return t if t[0] in "\"'" else re.sub(r"[^\n]", " ", t)

    return _TOKEN_RE.sub(blank, text)


_ENTRY_RE = re.compile(
    r'extern\s+"C"\s+__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?void\s+'
    r'(?:__launch_bounds__\s*\([^)]*\)\s*)?([A-Za-z_]\w*)\s*\('
)


def _parse_param(text: str, kernel: str) -> KernelParam:
    decl = " ".join(text.replace("*", " * ").split())
    tokens = decl.split()
    if len(tokens) < 2 or not re.fullmatch(r"[A-Za-z_]\w*", tokens[-1]):
        raise ValueError(f"kernel {kernel}: cannot parse parameter {text.strip()!r}")
    name = tokens[-1]
    type_tokens = tokens[:-1]
    n_ptr = type_tokens.count("*")
    if n_ptr > 1:
        raise ValueError(f"kernel {kernel}: parameter {name!r} is a pointer to pointer (unsupported)")
    const = False
    base = []
    for tok in type_tokens:
        if tok == "*":
            continue
        if tok == "const":
            const = True
        if tok in _QUALIFIERS:
            continue
        base.append(tok)
    ctype = " ".join(base)
    if ctype not in C_TYPES:
        raise ValueError(
            f"kernel {kernel}: parameter {name!r} has unsupported type {ctype!r} "
            f"(use one of: {', '.join(sorted(C_TYPES))})"
        )
    type_decl = " ".join(type_tokens).replace(" *", "*")
    return KernelParam(name=name, ctype=ctype, dtype=C_TYPES[ctype], pointer=n_ptr == 1,
                       const=const, decl=type_decl)


#: An object-like ``#define NAME text`` (continuation lines included; not ``NAME(args)``).
_DEFINE_RE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+([A-Za-z_]\w*)(?![\w(])((?:[^\n]*\\\n)*[^\n]*)", re.M)


def _expand_macros(text: str, macros: dict[str, str], kernel: str) -> str:
    """``text`` with the object-like ``macros`` expanded (a parameter list shared by several kernels)."""
    for _ in range(16):
        new = re.sub(r"[A-Za-z_]\w*", lambda m: macros.get(m[0], m[0]), text)
        if new == text:
            return text
        text = new
    raise ValueError(f"kernel {kernel}: its signature's macros do not expand")


def parse_kernels(text: str) -> dict[str, tuple[KernelParam, ...]]:
    """Parse every ``extern "C" __global__ void name(...)`` entry point of a CUDA source.

    A signature may use the source's object-like macros (``#define COMBINE_IN
    const float* cube, ...``): kernels that take the same parameters share one list.

    Parameters
    ----------
    text : str
        CUDA C source text.

    Returns
    -------
    dict
        Kernel name -> its parameters, in source order.
    """
    src = strip_comments(text)
    macros = {m[1]: m[2].replace("\\\n", " ").strip() for m in _DEFINE_RE.finditer(src)}
    kernels: dict[str, tuple[KernelParam, ...]] = {}
    for m in _ENTRY_RE.finditer(src):
        name = m.group(1)
        depth, j = 1, m.end()
        while j < len(src) and depth:
            depth += {"(": 1, ")": -1}.get(src[j], 0)
            j += 1
        if depth:
            raise ValueError(f"kernel {name}: unbalanced parentheses in its signature")
        inner = _expand_macros(src[m.end():j - 1], macros, name).strip()
        params = () if inner in ("", "void") else tuple(
            _parse_param(p, name) for p in inner.split(",")
        )
        if name in kernels:
            raise ValueError(f"kernel {name} is defined twice")
        kernels[name] = params
    return kernels


@lru_cache(maxsize=None)
def _source_kernels(name: str) -> dict[str, tuple[KernelParam, ...]]:
    return parse_kernels(read_source(name))


def kernel_params(source: str, kernel: str) -> tuple[KernelParam, ...]:
    """Parameters of ``kernel`` in ``kernels/<source>`` (parsed once per source)."""
    kernels = _source_kernels(str(source))
    if kernel not in kernels:
        raise ValueError(f"{source} has no kernel {kernel!r} (it has: {', '.join(kernels) or 'none'})")
    return kernels[kernel]


def _describe(a: Any) -> str:
    if hasattr(a, "dtype") and hasattr(a, "shape"):
        return f"{type(a).__module__.split('.')[0]} {a.dtype} array of shape {tuple(a.shape)}"
    return f"{type(a).__name__} {a!r}"


def check_args(kernel: str, params: Sequence[KernelParam], args: Sequence[Any], *,
               device: bool) -> None:
    """Check launch arguments against a kernel's signature.

    Pointer parameters need C-contiguous arrays of the exact dtype (CuPy arrays
    when ``device``, NumPy arrays otherwise; non-``const`` pointees must be
    writeable); scalar parameters need NumPy scalars of the exact dtype
    (``np.int32`` for ``int``, ``np.float32`` for ``float``, ``np.int64`` for
    ``long long``...). Python ``int``/``float`` are refused: CuPy would pass
    them as 64-bit values and the kernel would read garbage.

    Raises
    ------
    TypeError
        Naming the kernel, the parameter and what to pass instead.
    """
    if len(args) != len(params):
        raise TypeError(
            f"kernel {kernel} takes {len(params)} arguments "
            f"({', '.join(p.name for p in params)}), got {len(args)}"
        )
    for i, (p, a) in enumerate(zip(params, args)):
        problem = _arg_problem(p, a, device)
        if problem:  # (the message is only built for a wrong argument: this runs at every launch)
            raise TypeError(f"kernel {kernel} argument {i} '{p.name}' ({p.decl}): {problem}")


def _arg_problem(p: KernelParam, a: Any, device: bool) -> str:
    """What is wrong with ``a`` as parameter ``p`` (:func:`check_args`), or ``""``."""
    if not p.pointer:
        if not isinstance(a, np.generic) or a.dtype != p.dtype:
            return f"expected a NumPy scalar np.{p.dtype.name}(...), got {_describe(a)}"
        return ""
    if not (type(a).__module__.startswith("cupy") if device else isinstance(a, np.ndarray)):
        return f"expected {'a CuPy array' if device else 'a NumPy array'}, got {_describe(a)}"
    if a.dtype != p.dtype:
        return f"expected a {p.dtype} array, got {_describe(a)}"
    if not a.flags.c_contiguous:
        return "the array must be C-contiguous (use ascontiguousarray)"
    if not p.const and not device and not a.flags.writeable:
        return "the kernel writes this array but it is read-only"
    return ""
