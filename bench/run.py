"""End-to-end benchmark: ``python bench/run.py [--preset small] [--profile] ...`` (same as ``skystack bench``).

Synthesizes (and caches) a session of the chosen size with bias, darks and
flats, measures the decode floor, runs the pipeline on every available
backend in a fresh process each, prints per-stage seconds, frames/s, MP/s,
peak memory and the pipeline / decode-floor ratio, and saves the results as
JSON with the machine's CPU, cores, GPU and library versions. See
``python bench/run.py --help`` and :mod:`skystack.tools.bench`.
"""

from __future__ import annotations

import sys

from skystack.tools.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
