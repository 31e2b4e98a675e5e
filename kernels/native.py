"""Native CPU backend: skystack's CUDA kernels compiled for the host, chunks of items over the cores.

:func:`native` builds a ``kernels/*.cu`` source like the emulator
(:mod:`skystack.kernels.emulate`: the same shim ``cuda_shim.h``, the same
IEEE float rules, ``-ffp-contract=off``) but with ``-O3``, real atomics, and
each kernel's grid-stride loop rewritten into a plain loop over a contiguous
chunk of items: the launcher calls the kernel once per chunk and OpenMP spreads
the chunks over the cores. The result has the emulator's interface
(``.launch(kernel, n_items, args)`` on NumPy arrays, written in place), so a
kernel that obeys the kernel rules gives the NumPy twin's bits here too
(float ``atomicAdd`` aside, whose order varies between runs as on a GPU).

Libraries are built once per source text, defines and compiler, and cached
beside the emulator's (:func:`skystack.kernels.emulate.cache_dir`), for the
host's vector instruction set (:func:`host_isa`: AVX2 where the CPU has it,
else baseline x86-64; the same bits either way).
:func:`available` says whether a compiler is present; without one, callers
keep the NumPy twins, and :func:`available` logs that once.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Sequence

from skystack.kernels import read_source
from skystack.kernels.emulate import NATIVE_ISA_FLAGS, EmulatedModule, _emulated, emulator_available

__all__ = ["native", "available", "threads", "host_isa"]

_log = logging.getLogger(__name__)
_said = False


def available() -> bool:
    """True when a C++ compiler is on PATH; says once (logging) that the twins are used otherwise."""
    global _said
    ok = emulator_available()
    if not ok and not _said:
        _log.info("no C++ compiler (g++) on PATH: the CPU path uses the NumPy twins, not native kernels")
        _said = True
    return ok


def threads() -> int:
    """Cores the native kernels use (``OMP_NUM_THREADS``, else the CPUs this process may run on)."""
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit():
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def host_isa() -> str:
    """The instruction-set level native builds target: ``"avx2"`` or ``"baseline"`` (x86-64).

    ``SKYSTACK_NATIVE_ISA`` (``avx2`` or ``baseline``) sets it; otherwise AVX2 when
    ``/proc/cpuinfo`` lists it. Kernels written for vectors (the warp's blocks, the
    combine's sorting network) run about 1.1-1.3x faster with it.
    """
    env = os.environ.get("SKYSTACK_NATIVE_ISA", "").strip().lower()
    if env in NATIVE_ISA_FLAGS:
        return env
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return "avx2" if " avx2" in line else "baseline"
    except OSError:
        pass
    return "baseline"


def native(source: str | os.PathLike, defines: Sequence[str] = (), *, isa: str | None = None) -> EmulatedModule:
    """Build (once per source text and defines) the native multi-core CPU module of a CUDA source.

    ``source`` and ``defines`` as for :func:`skystack.kernels.emulate.emulated`
    (``"combine.cu"``, ``("MAX_FRAMES=64",)``); so is the result,
    ``.launch(kernel, n_items, args)`` on NumPy arrays, and the
    ``KernelCompileError`` raised when g++ is missing or rejects the source.
    ``isa`` (``"avx2"`` or ``"baseline"``) overrides :func:`host_isa` (tests build both).
    """
    isa = host_isa() if isa is None else isa
    if isa not in NATIVE_ISA_FLAGS:
        raise ValueError(f"unknown instruction-set level {isa!r}; use one of {', '.join(NATIVE_ISA_FLAGS)}")
    return _emulated(str(source), read_source(source), tuple(str(d) for d in defines), True, isa)
