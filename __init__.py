"""skystack: a streaming, GPU-accelerated astrophotography stacking engine.

The repository root is the ``skystack`` package; stages live in
:mod:`skystack.engine`, CUDA sources in :mod:`skystack.kernels`, developer
tooling (simulator, benchmarks) in :mod:`skystack.tools`.

The public API, imported on first use (``import skystack`` stays light)::

    import skystack
    result = skystack.stack("night/", rejection="gesd")
    skystack.write_outputs(result, tiff="night.tif", preview="night.png")
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

from skystack.engine.errors import SkystackError  # noqa: E402

#: Public name -> the module that defines it.
_LAZY = {
    "stack": "skystack.engine.stack",
    "stack_session": "skystack.engine.stack",
    "StackConfig": "skystack.engine.stack",
    "StackResult": "skystack.engine.stack",
    "discover_session": "skystack.engine.session",
    "SessionFiles": "skystack.engine.session",
    "read_frame": "skystack.engine.io",
    "write_outputs": "skystack.engine.report",
}

__all__ = ["SkystackError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'skystack' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
