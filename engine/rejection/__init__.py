"""Rejection methods of :func:`skystack.engine.combine.combine`: one module each, and their registry.

Each module (``sigma.py``, ``gesd.py``...) defines one method exactly in its
docstring (kl and kh there are ``kappa_low`` and ``kappa_high``; the rules every
method shares, such as the fewest values a round may leave, are in
:mod:`skystack.engine.combine`) and declares it as ``METHOD``, a :class:`RejectionMethod`: its name,
default kappas and what they mean, its kernel entry in ``kernels/combine.cu`` and
the kernel's NumPy twin (plus, where the method needs them, a kappa check, the
host tables its kernel takes, or a fixed ``max_iter``). :data:`REGISTRY` holds
them in the order of :data:`MODULES`, the order the CLI lists them; the
settings' choices, the CLI's ``--rejection`` choices and ``--kappa`` help and
``combine.DEFAULT_KAPPAS`` all derive from it. docs/architecture.md, "Adding a
rejection method", says what a new method takes.
"""

from __future__ import annotations

from importlib import import_module

from skystack.engine.rejection.base import ClipResult, RejectionMethod

__all__ = ["ClipResult", "RejectionMethod", "MODULES", "REGISTRY"]

#: The method modules, in the order the CLI lists their methods. The kappas mean different things:
#: standard deviations (sigma, winsorized, linear), an outlier fraction and a significance (GESD),
#: fractions of the median (percentile, Siril's 0.2 / 0.1) and values per side (minmax).
MODULES = ("sigma", "winsorized", "linear", "gesd", "percentile", "minmax", "median", "mean")


def _load(modules: tuple[str, ...]) -> dict[str, RejectionMethod]:
    methods: dict[str, RejectionMethod] = {}
    for module in modules:
        method = import_module(f"{__name__}.{module}").METHOD
        if method.name in methods:
            raise ValueError(f"rejection method {method.name!r} is declared twice")
        methods[method.name] = method
    return methods


#: Rejection method name -> its declaration, in :data:`MODULES` order.
REGISTRY: dict[str, RejectionMethod] = _load(MODULES)
