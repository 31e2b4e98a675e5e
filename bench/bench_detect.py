"""Benchmark: star detection time per frame and registration error against simulator truth.

Simulates (once, cached in ``--cache``) the 64-light 640x480 RGGB tripod hour of
``tests/test_register_synth.py`` and a 1920x1080 one, detects the stars of each
calibrated light, matches every selected frame to the best-scoring one and
reports the detection time per frame and the grid RMS of the transforms
against ``truth.json``. Run: ``python bench/bench_detect.py``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

SESSIONS = {
    "640x480x64": dict(seed=3, width=640, height=480, n_lights=64),
    "1920x1080x16": dict(seed=5, width=1920, height=1080, n_lights=16),
}


def run(name: str, cfg: dict, cache: Path) -> dict:
    from skystack.engine.detect import choose_reference, detect_stars, measure_quality, select_frames
    from skystack.engine.io import read_frame
    from skystack.engine.match import grid_rms, match_stars
    from skystack.tools.synth import SynthConfig, load_truth, simulate

    out = cache / name
    if not (out / "truth.json").exists() and not any(out.glob("**/truth.json")):
        simulate(SynthConfig(**cfg, n_bias=0, n_darks=0, n_flats=0, n_dark_flats=0, exposure_s=30.0,
                             interval_s=60.0, file_format="fits"), out)
    path = next(iter(out.glob("**/truth.json"))).parent
    truth = load_truth(path)
    bias, flat = truth.bias_pattern(), truth.flat_field()
    stars, times = [], []
    for i, lt in enumerate(truth.lights):
        fr = read_frame(truth.file_path("light", i))
        cal = ((fr.data.astype(np.float64) - bias - truth.dark_signal(lt.exposure_s, lt.temperature_c))
               / flat).astype(np.float32)
        t0 = time.perf_counter()
        stars.append(detect_stars(cal, pattern=fr.meta.pattern))
        times.append(time.perf_counter() - t0)
    qual = [measure_quality(s) for s in stars]
    used = [u for u, _ in select_frames(qual, min_stars=15)]
    ref = choose_reference(qual, used=used)
    t_ref_inv = np.linalg.inv(truth.lights[ref].transform)
    err = []
    for i, s in enumerate(stars):
        if used[i] and i != ref:
            res = match_stars(s, stars[ref])
            err.append(grid_rms(res.transform, t_ref_inv @ truth.lights[i].transform, truth.shape))
    err = np.array(err)
    return {"session": name, "detect_ms_median": 1000 * float(np.median(times)),
            "stars_median": float(np.median([len(s) for s in stars])),
            "fwhm_median": float(np.nanmedian([q.fwhm_px for q in qual])),
            "reg_rms_px": float(np.sqrt(np.mean(err ** 2))), "reg_median_px": float(np.median(err)),
            "reg_max_px": float(err.max()), "n_registered": int(err.size)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, default=Path("/tmp/skystack_bench_detect"))
    ap.add_argument("--sessions", nargs="*", default=list(SESSIONS))
    args = ap.parse_args()
    for name in args.sessions:
        print(json.dumps(run(name, SESSIONS[name], args.cache)))


if __name__ == "__main__":
    main()
