"""End-to-end benchmark (``skystack bench``) and the quality metrics of the Siril comparison.

:func:`run_benchmark` synthesizes a session of a given size (lights, bias,
darks and flats; cached by configuration hash), measures the *decode floor*
(the time to only decode every frame with the same
:class:`~skystack.engine.producer.FrameProducer` thread pool) and runs
:func:`~skystack.engine.stack.stack_session` once per available backend, each
in a fresh Python process so that peak memory figures do not mix. It returns
(and saves as JSON) per-stage seconds, frames/s and MP/s, peak memory, the
decode floor and the ratio of pipeline time to decode floor, with the
machine's CPU, cores, GPU and library versions.

The quality measures ``bench/siril_compare.py`` prints side by side for
skystack, Siril and a Python peer (background noise, FWHM, completeness,
registration error, background residual) are in :mod:`.quality` and
:mod:`.registration`.

Modules: :mod:`.config` (presets, :class:`BenchConfig`), :mod:`.sessions`
(cached synthetic sessions), :mod:`.machine` (hardware and versions),
:mod:`.measure` (measured child processes), :mod:`.child` (what a child
measures), :mod:`.harness` (:func:`run_benchmark`), :mod:`.report` (tables,
markdown, RESULTS.md), :mod:`.cli` (``skystack bench`` options and
``bench/run.py``). This package re-exports the names the CLI, ``bench/`` and
the tests use.

Run a child measurement by hand with
``python -m skystack.tools.bench --one '{"mode": "decode", ...}'``.
"""

import importlib
from typing import Any

#: Where each re-exported name lives: the submodule is imported when the name is first used, so that
#: ``skystack stack`` (whose parser lists ``skystack bench``'s options) does not load the harness.
_HOME = {
    "LAUNCH_HOST_S": "child",
    "host_seconds": "child",
    "add_bench_arguments": "cli",
    "bench_command": "cli",
    "main": "cli",
    "PRESETS": "config",
    "BenchConfig": "config",
    "run_benchmark": "harness",
    "machine_info": "machine",
    "machine_key": "machine",
    "Measured": "measure",
    "run_child": "measure",
    "run_measured": "measure",
    "NoiseSpectrum": "quality",
    "QualityMetrics": "quality",
    "noise_spectrum": "quality",
    "star_free_mask": "quality",
    "truth_quality": "quality",
    "measured_registration_error": "registration",
    "registration_error": "registration",
    "bench_tables": "report",
    "markdown_tables": "report",
    "update_results_md": "report",
    "ensure_session": "sessions",
    "sensor_size": "sessions",
    "session_synth_config": "sessions",
    "warm_memory": "sessions",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_HOME)
