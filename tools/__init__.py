"""Developer tooling that ships with skystack but is not the engine.

* :mod:`~skystack.tools.synth` (a package) and :mod:`~skystack.tools.synth_scene`: the night
  simulator with its ground truth (``skystack synth``, ``skystack demo``, the tests);
* :mod:`~skystack.tools.dng`: the minimal DNG writer the simulator uses;
* :mod:`~skystack.tools.skymetrics`: measurements of a stack against that truth;
* :mod:`~skystack.tools.bench` (a package): the benchmark harness (``skystack bench``) and the
  quality metrics of the Siril comparison.

The engine never imports these; only the CLI's ``synth``, ``demo`` and ``bench``
commands, the tests and ``bench/`` do.
"""
