"""What the benchmark records of the machine it ran on: CPU, cores, memory, GPU and library versions."""

from __future__ import annotations

import os
import platform
from typing import Any

from skystack import __version__
from skystack.engine.backend import cpu_model


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"skystack": __version__, "python": platform.python_version()}
    for name in ("numpy", "scipy", "rawpy", "astropy", "tifffile", "psutil", "cupy-cuda12x",
                 "cupy-cuda13x", "cupy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if not name.startswith("cupy"):
                out[name] = None
    try:
        import rawpy

        out["libraw"] = ".".join(map(str, rawpy.libraw_version))
    except Exception:  # pragma: no cover - rawpy is a dependency
        out["libraw"] = None
    return out


def _gpu_info() -> dict[str, Any] | None:
    from skystack.engine.backend import _gpu_cached

    gpu, reason = _gpu_cached()
    if gpu is None:
        return {"available": False, "reason": reason}
    info: dict[str, Any] = {"available": True, "name": gpu.device_name}
    try:
        import cupy

        rt = cupy.cuda.runtime
        props = rt.getDeviceProperties(0)
        info["memory_bytes"] = int(props.get("totalGlobalMem", 0))
        info["compute_capability"] = f"{props.get('major')}.{props.get('minor')}"
        info["cuda_runtime"] = int(rt.runtimeGetVersion())
        info["driver"] = int(rt.driverGetVersion())
    except Exception as exc:  # pragma: no cover - needs a GPU
        info["error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return info


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, GPU and library versions of this machine."""
    import psutil

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_usable": usable,
        "memory_bytes": int(psutil.virtual_memory().total),
        "gpu": _gpu_info(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "versions": _versions(),
    }


def machine_key(info: dict[str, Any]) -> str:
    """Short hardware description used as the RESULTS.md section title."""
    gpu = info.get("gpu") or {}
    g = gpu.get("name") if gpu.get("available") else "no GPU"
    return f"{info.get('cpu')}, {info.get('cores_usable')} cores, {info.get('memory_bytes', 0) / 2**30:.0f} GiB, {g}"
