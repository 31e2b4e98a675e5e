"""Compute backend selection: NumPy on the CPU, CuPy (custom kernels) on the GPU.

Stage code never branches on the backend. It calls an *operation* (a function
in the stage's module) that takes arrays; the operation runs its NumPy twin for
NumPy arrays and launches its CUDA kernel (through :func:`launch`) for CuPy
arrays. :func:`get_backend` decides where arrays live.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator, Sequence

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
        """Free bytes on the device (GPU memory, or available RAM on CPU).

        On a GPU, what the driver has free plus the free blocks CuPy's memory pool keeps for
        reuse: the driver counts those as taken, so a second stack in one process (``batch``
        runs many) would otherwise see the first one's frame store as gone from the device.
        """
        if self.is_gpu:
            free, _total = self.xp.cuda.runtime.memGetInfo()
            return int(free) + int(self.xp.get_default_memory_pool().free_bytes())
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


def gpu_devices() -> list[str]:
    """The CUDA devices this process may use, as ``CUDA_VISIBLE_DEVICES`` names them for a child
    process (empty without CuPy or a driver): one entry per device CuPy counts, taken from this
    process's own ``CUDA_VISIBLE_DEVICES`` when it is set, else ``0 .. n-1``."""
    try:
        import cupy

        n = int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # no CuPy, no driver
        return []
    own = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return own[:n] if len(own) >= n else [str(i) for i in range(n)]


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
    to the CPU and logs it once (a warning when CuPy is installed but finds no
    usable device; only at info level when CuPy is not installed); ``gpu`` raises
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
        import importlib.util
        import logging

        _warned_fallback = True
        # without CuPy installed, the CPU is what the user chose: nothing to warn about
        level = logging.INFO if importlib.util.find_spec("cupy") is None else logging.WARNING
        logging.getLogger("skystack").log(level, "GPU unavailable (%s); using CPU", reason)
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


# ----------------------------------------------------------------------------- native CPU kernels

#: How much faster the winner of a native-or-twin timing must be for the choice to be kept for later
#: processes (a near tie, or a timing disturbed by other load, is timed again in the next process).
KEEP_MARGIN = 1.25

#: Smallest launch (work items) whose timing may choose between a native kernel and its twin.
NATIVE_MIN_ITEMS = 1 << 14
_native_choice: dict[tuple, str] = {}
_native_lock = threading.Lock()
_bench_lock = threading.Lock()  # one native-vs-twin benchmark at a time
_native_active = 0  # native launches in flight (they share the cores)


def native_mode() -> str:
    """``SKYSTACK_NATIVE``: ``auto`` (default: per kernel, the faster of native and twin), ``on``, ``off``."""
    mode = (os.environ.get("SKYSTACK_NATIVE") or "auto").lower()
    mode = {"1": "on", "0": "off", "true": "on", "false": "off"}.get(mode, mode)
    if mode not in ("auto", "on", "off"):
        from skystack.engine.errors import SkystackError

        raise SkystackError(f"SKYSTACK_NATIVE={mode!r}: use auto, on or off")
    return mode


def run_cpu(source: str, kernel: str, n_items: int, twin: Any, native: Any, *,
            defines: Sequence[str] = (), min_items: int = NATIVE_MIN_ITEMS, same_bits: bool = True,
            variant: str = "") -> Any:
    """Run an operation's CPU branch: its NumPy twin, or its kernel compiled natively.

    The native build (:mod:`skystack.kernels.native`: the same CUDA source at
    ``-O3``, blocks over the cores) is used where a C++ compiler exists and,
    under the default ``SKYSTACK_NATIVE=auto``, where it ran faster than the
    twin: the first launch of each kernel (and defines) with at least
    ``min_items`` items runs both, keeps the twin's result (the
    reference) and remembers the faster for the rest of the process, and
    beside the native build for later processes on this machine when it won by
    :data:`KEEP_MARGIN` (:func:`_saved_choice`), which then skip the benchmark. The
    native launch is timed after a warm-up launch, on the cores its thread
    will have (all of them, or their share under :func:`cpu_workers`, against
    a twin that is single-threaded NumPy), one benchmark at a time: callers in
    several threads would otherwise time each other. A native launch gets the cores divided by the native launches
    in flight (:func:`_native_call`), so concurrent callers do not
    oversubscribe the cores (:func:`cpu_workers` declares a pool). Without a compiler, or when the build fails, the
    twins run and a log line says so once.

    Parameters
    ----------
    source, kernel, n_items, defines :
        As for :func:`launch` (``n_items`` only sizes the benchmark).
    min_items : int
        Fewest items of a launch that may be timed (default :data:`NATIVE_MIN_ITEMS`,
        for kernels with a thread per pixel); a kernel whose item is heavy (a star's
        whole stamp, in ``detect.cu``) gives less.
    same_bits : bool
        Whether the native kernel gives the twin's bits. When it agrees only within
        a tolerance (False), the timed launch returns the result of the one chosen,
        so every launch of the process gives that one's numbers (a stack run twice
        in one process gives the same bits).
    variant : str
        A name for one shape of the kernel's launches whose winner may differ from the
        others' (a background mesh's ~140 short rows against a frame's three long ones,
        where the twin's cost is mostly per row): timed and remembered apart.
    twin : callable
        ``twin()`` computes the result with NumPy.
    native : callable
        ``native(module)`` launches the kernel on ``module``
        (:func:`skystack.kernels.native.native`) with NumPy arrays and returns
        the same result.

    Returns
    -------
    object
        What ``twin()`` or ``native(module)`` returned.
    """
    mode = native_mode()
    key = (source, kernel, tuple(defines)) + ((variant,) if variant else ())
    choice = "twin" if mode == "off" else _native_choice.get(key)
    if choice == "twin":
        return twin()
    from skystack.kernels import native as nat

    if not nat.available():
        _native_choice[key] = "twin"
        return twin()
    try:
        module = nat.native(source, tuple(defines))
    except Exception as exc:  # a compiler that cannot build it: keep the twin, say so once
        import logging

        logging.getLogger(__name__).info("native %s (%s) unavailable, using the NumPy twin: %s",
                                         kernel, source, error_line(exc))
        _native_choice[key] = "twin"
        return twin()
    if choice == "native" or mode == "on":
        return _native_call(native, module)
    if n_items < min_items:
        return twin()
    with _bench_lock:
        if key not in _native_choice:
            saved = _saved_choice(module, _label(key), n_items)
            if saved is None:
                return _benchmark(key, twin, native, module, same_bits, n_items)
            _native_choice[key] = saved
    return run_cpu(source, kernel, n_items, twin, native, defines=defines,  # another thread benchmarked it
                   min_items=min_items, same_bits=same_bits, variant=variant)


def _label(key: tuple) -> str:
    """The name a choice is logged and kept under: the kernel, and its variant if any."""
    return key[1] if len(key) == 3 else f"{key[1]}.{key[3]}"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else what :mod:`platform` knows)."""
    import platform

    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _choice_file(module: Any, kernel: str) -> Any:
    """Where the native-or-twin choice of ``kernel`` in ``module`` is kept: beside its library, per
    share of the cores; ``None`` for a module that is not a cached build."""
    from pathlib import Path

    path = getattr(module, "path", None)
    if not isinstance(path, Path):
        return None
    from skystack.kernels.native import threads

    return path.with_name(f"{path.stem}.{kernel}.{_pool_share()}of{threads()}.choice.json")


def _saved_choice(module: Any, kernel: str, n_items: int) -> str | None:
    """The choice an earlier process made for ``kernel`` on this CPU model, or ``None``.

    Only a choice timed on a launch at least half as large as this one counts (one timed
    on a few items, as by a test, does not decide for whole frames).
    """
    import json

    f = _choice_file(module, kernel)
    try:
        rec = json.loads(f.read_text()) if f is not None else None
    except (OSError, ValueError):
        return None
    ok = (isinstance(rec, dict) and rec.get("cpu") == cpu_model() and rec.get("choice") in ("native", "twin")
          and isinstance(rec.get("n_items"), int) and 2 * rec["n_items"] >= n_items)
    return rec["choice"] if ok else None


def _save_choice(module: Any, kernel: str, choice: str, n_items: int, seconds: tuple[float, float]) -> None:
    """Keep ``choice`` for later processes (atomically; a cache that cannot be written is no error)."""
    import logging

    from skystack.engine.output import write_json

    f = _choice_file(module, kernel)
    if f is None:
        return
    try:
        write_json(f, {"cpu": cpu_model(), "choice": choice, "n_items": int(n_items), "native_s": seconds[0],
                       "twin_s": seconds[1]})
    except Exception as exc:  # a read-only cache: the next process benchmarks again
        logging.getLogger(__name__).debug("cannot keep the native choice of %s: %s", kernel, exc)


_workers = threading.local()


@contextmanager
def cpu_workers(k: int) -> Iterator[None]:
    """Within this block, native launches from this thread use the cores divided by ``k``.

    A caller that runs ``k`` threads side by side, each launching native
    kernels, enters this in each of them, so the ``k`` OpenMP teams together
    take the cores once (teams over all cores each would oversubscribe them,
    and libgomp's waiting threads spin on the cores the others need).
    """
    before = getattr(_workers, "k", 1)
    _workers.k = max(1, int(k))
    try:
        yield
    finally:
        _workers.k = before


def _pool_share() -> int:
    """This thread's cores for native launches: all of them, or its share under :func:`cpu_workers`."""
    from skystack.kernels.native import threads

    return max(1, threads() // getattr(_workers, "k", 1))


def _native_call(native: Any, module: Any) -> Any:
    """``native(module)`` on the cores divided by the native launches in flight, or by this
    thread's :func:`cpu_workers`, whichever is more (at least one core)."""
    global _native_active
    from skystack.kernels.native import threads

    with _native_lock:
        _native_active += 1
        share = max(1, threads() // max(_native_active, getattr(_workers, "k", 1)))
    try:
        module.set_threads(share)
        return native(module)
    finally:
        with _native_lock:
            _native_active -= 1


#: Most of the machine's cores that other processes may keep busy during a native-or-twin benchmark
#: for its choice to be kept for later processes (:func:`_busy_elsewhere`).
BUSY_ELSEWHERE_MAX = 0.2


def _cpu_busy() -> tuple[float, float]:
    """Seconds of CPU time the whole machine (all cores) and this process have used so far."""
    import time

    import psutil

    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0) + getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)
    return sum(t) - idle, time.process_time()  # guest time is counted in user time too


def _busy_elsewhere(start: tuple[float, float], wall_s: float) -> float:
    """Share of the machine's cores that other processes kept busy since ``start`` (:func:`_cpu_busy`),
    over ``wall_s`` seconds; less than 0.03 core-seconds counts as none (clock-tick resolution)."""
    machine, own = (b - a for a, b in zip(start, _cpu_busy()))
    other = max(machine - own, 0.0)
    return other / max(wall_s * (os.cpu_count() or 1), 1e-9) if other > 0.03 else 0.0


def _benchmark(key: tuple, twin: Any, native: Any, module: Any, same_bits: bool = True, n_items: int = 0) -> Any:
    """Time ``native`` (after a warm-up, on this thread's share of the cores) against ``twin``.

    Remembers the faster for ``key``; returns the twin's result (the faster's unless ``same_bits``).
    """
    import logging
    import time

    share = _pool_share()
    module.set_threads(share)
    native(module)  # warm-up: the first launch pays for page faults and the OpenMP start-up
    start = _cpu_busy()
    t0 = time.perf_counter()
    native_result = native(module)
    t1 = time.perf_counter()
    result = twin()
    t2 = time.perf_counter()
    _native_choice[key] = "native" if t1 - t0 < t2 - t1 else "twin"
    elsewhere = _busy_elsewhere(start, t2 - t0)
    logging.getLogger(__name__).debug("%s: native %.4f s on %d core(s), twin %.4f s -> %s (%.0f %% of the cores "
                                      "busy elsewhere)", _label(key), t1 - t0, share, t2 - t1, _native_choice[key],
                                      100 * elsewhere)
    # kept for later processes only when the winner is clear and the machine was quiet: other load
    # slows an OpenMP team far more than a single-threaded twin, so a busy machine's winner is not this one's
    if max(t1 - t0, t2 - t1) >= KEEP_MARGIN * min(t1 - t0, t2 - t1) and elsewhere <= BUSY_ELSEWHERE_MAX:
        _save_choice(module, _label(key), _native_choice[key], n_items, (t1 - t0, t2 - t1))
    return native_result if not same_bits and _native_choice[key] == "native" else result
