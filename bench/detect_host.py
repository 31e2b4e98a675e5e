"""Benchmark: host milliseconds of one ``detect_stars`` call on a light that is on the device.

Under the simulated device (``PYTHONPATH=tests/fakecupy SKYSTACK_SIM_DEVICE=1``) the host time is
counted as ``skystack bench`` counts it (:func:`skystack.tools.bench.child.host_seconds`: the wall time
less the seconds spent inside the stand-in, plus CuPy's cost a launch); on a real device it is the wall
time (the device's work then overlaps). Run::

    PYTHONPATH=tests/fakecupy SKYSTACK_SIM_DEVICE=1 python bench/detect_host.py [--light FILE]

Without ``--light`` a 1732x1154 RGGB light (2 MP, the bench's ``--megapixels 2`` size) is simulated
once into ``--cache``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def _light(cache: Path) -> Path:
    from skystack.tools.synth import SynthConfig, simulate

    root = cache / "detect-host-1732x1154"
    if not (root / "truth.json").exists():
        simulate(SynthConfig(seed=7, width=1732, height=1154, n_lights=1, n_bias=0, n_darks=0, n_flats=0,
                             n_dark_flats=0, file_format="fits"), root)
    return sorted((root / "lights").iterdir())[0]


def main() -> None:
    import cupy

    from skystack.engine import detect
    from skystack.engine.io import read_frame
    from skystack.engine.rawconv import cfa_to_float
    from skystack.tools.bench.child import host_seconds

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--light", type=Path, help="a raw light (default: a simulated 2 MP one)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "skystack" / "bench")
    p.add_argument("--repeat", type=int, default=8)
    a = p.parse_args()
    fr = read_frame(a.light or _light(a.cache))
    m = fr.meta
    x = cupy.asarray(cfa_to_float(fr.data, pattern=m.pattern, black_level=m.black_level, white_level=m.white_level))
    sim = getattr(cupy, "sim", None)
    detect.detect_stars(x, pattern=m.pattern)  # builds, first launches
    host = []
    n0 = n1 = v0 = v1 = 0
    i0 = i1 = 0.0
    for _ in range(a.repeat):
        if sim:
            (_, n0), i0, v0 = sim.thread_device(), sim.thread_stand_in(), sim.thread_views()
        t0 = time.perf_counter()
        stars = detect.detect_stars(x, pattern=m.pattern)
        wall = time.perf_counter() - t0
        if sim:
            (_, n1), i1, v1 = sim.thread_device(), sim.thread_stand_in(), sim.thread_views()
        host.append(host_seconds(wall, i1 - i0, n1 - n0, v1 - v0) if sim else wall)
    print(f"{len(stars)} stars, {n1 - n0} launches, {v1 - v0} views; host ms per detect_stars: "
          + ", ".join(f"{1e3 * h:.2f}" for h in host) + f" (median {1e3 * float(np.median(host)):.2f})")


if __name__ == "__main__":
    main()
