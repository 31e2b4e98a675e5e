"""skystack: a streaming, GPU-accelerated astrophotography stacking engine.

The repository root is the ``skystack`` package; stages live in
:mod:`skystack.engine`, CUDA sources in :mod:`skystack.kernels`.
"""

__version__ = "0.1.0"

from skystack.engine.errors import SkystackError  # noqa: E402

__all__ = ["SkystackError", "__version__"]
