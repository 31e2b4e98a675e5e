"""Micro-benchmarks of each pipeline stage on one synthetic session, CPU always, GPU when present.

Run with ``python -m pytest bench/bench_stages.py --benchmark-enable``.
The session (6 lights + 4 bias, darks and flats, DNG, the size of
``SKYSTACK_BENCH_SIZE``, default 1800x1200) is synthesized once and cached
like ``skystack bench`` sessions (``$SKYSTACK_BENCH_CACHE`` or
``~/.cache/skystack/bench``). Each stage is timed on the data the previous
stage would hand it, in the order of :func:`skystack.engine.stack.stack_session`:
decode, masters, calibrate (+ cosmetic), detect, debayer, match, warp,
normalise, combine, write; the last benchmark is the whole pipeline.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

N_LIGHTS = 6


@pytest.fixture(scope="module")
def session(frame_size):
    from skystack.tools.bench.sessions import ensure_session, session_synth_config
    from skystack.engine.session import discover_session

    h, w = frame_size
    cfg = dataclasses.replace(session_synth_config(N_LIGHTS, w * h / 1e6, n_calib=4), width=w, height=h)
    root = ensure_session(cfg)
    return root, discover_session(root)


@pytest.fixture(scope="module")
def masters(session):
    from skystack.engine.masters import build_master

    _root, files = session
    bias = build_master("bias", files.bias, use_cache=False)
    dark = build_master("dark", files.darks, bias=bias, use_cache=False)
    flat = build_master("flat", files.flats, bias=bias, use_cache=False)
    return bias, dark, flat


@pytest.fixture(scope="module")
def lights(session):
    from skystack.engine.io import read_frame

    _root, files = session
    return [read_frame(p) for p in files.lights]


@pytest.fixture(scope="module")
def calibrated(lights, masters):
    """Calibrated CFA frames on the host (input of detect and debayer)."""
    from skystack.engine.calibrate import calibrate
    from skystack.engine.rawconv import cfa_to_float

    bias, dark, flat = masters
    out = []
    for fr in lights:
        m = fr.meta
        x = cfa_to_float(fr.data, pattern=m.pattern, black_level=m.black_level, white_level=m.white_level)
        out.append(calibrate(x, bias=bias.data, dark=dark.data, flat=flat.data))
    return out


@pytest.fixture(scope="module")
def stars(calibrated, lights):
    from skystack.engine.detect import detect_stars

    return [detect_stars(x, pattern=fr.meta.pattern) for x, fr in zip(calibrated, lights)]


def test_decode_one_light(benchmark, session):
    from skystack.engine.io import read_frame

    _root, files = session
    fr = benchmark(read_frame, files.lights[0])
    assert fr.data.dtype == np.uint16


def test_decode_floor_all_lights(benchmark, session):
    from skystack.engine.producer import FrameProducer

    _root, files = session

    def run():
        return sum(1 for item in FrameProducer(files.lights) if item.frame is not None)

    n = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    assert n == len(files.lights)


@pytest.mark.parametrize("kind", ["bias", "dark", "flat"])
def test_master(benchmark, session, masters, kind):
    from skystack.engine.masters import build_master

    _root, files = session
    bias = masters[0]
    paths = {"bias": files.bias, "dark": files.darks, "flat": files.flats}[kind]
    deps = {} if kind == "bias" else {"bias": bias}
    m = benchmark.pedantic(lambda: build_master(kind, paths, use_cache=False, **deps), rounds=3)
    assert m.data.shape == bias.data.shape


def test_calibrate_stage(benchmark, backend, sync, lights, masters):
    """uint16 upload + cfa_to_float + bias/dark/flat + defect correction of one light."""
    from skystack.engine.calibrate import calibrate
    from skystack.engine.cosmetic import correct_defects, find_defects_from_dark
    from skystack.engine.rawconv import cfa_to_float

    xp = backend.xp
    bias, dark, flat = masters
    fr = lights[0]
    m = fr.meta
    dev = [xp.asarray(a.data) for a in (bias, dark, flat)]
    mask = xp.asarray(find_defects_from_dark(dark.data, pattern=m.pattern).mask)

    def run():
        x = cfa_to_float(xp.asarray(fr.data), pattern=m.pattern, black_level=m.black_level,
                         white_level=m.white_level)
        x = calibrate(x, bias=dev[0], dark=dev[1], flat=dev[2])
        x, _n = correct_defects(x, mask, pattern=m.pattern)
        return sync(x)

    out = benchmark(run)
    assert out.shape == fr.data.shape


def test_detect_stage(benchmark, calibrated, lights):
    from skystack.engine.detect import detect_stars, measure_quality

    x, m = calibrated[0], lights[0].meta

    def run():
        st = detect_stars(x, pattern=m.pattern)
        return st, measure_quality(st)

    st, q = benchmark(run)
    assert q.n_stars >= 15


def test_debayer_stage(benchmark, backend, sync, calibrated, lights):
    from skystack.engine.debayer import debayer

    x = backend.xp.asarray(calibrated[0])
    m = lights[0].meta
    rgb = benchmark.pedantic(lambda: sync(debayer(x, m.pattern, method="bilinear", wb=m.wb)), rounds=5,
                             warmup_rounds=1)
    assert rgb.shape[0] == 3


def test_match_stage(benchmark, stars, session):
    from skystack.engine.match import grid_rms, match_stars
    from skystack.tools.synth import load_truth

    root, _files = session
    truth = load_truth(root)
    res = benchmark(match_stars, stars[3], stars[0])
    expected = np.linalg.inv(truth.transforms()[0]) @ truth.transforms()[3]
    assert grid_rms(res.transform, expected, truth.shape) < 0.1


def test_warp_stage(benchmark, backend, sync, calibrated, lights, session):
    from skystack.engine.debayer import debayer
    from skystack.tools.synth import load_truth
    from skystack.engine.warp import warp

    root, _files = session
    truth = load_truth(root)
    t = np.linalg.inv(truth.transforms()[0]) @ truth.transforms()[3]
    rgb = backend.xp.asarray(debayer(calibrated[3], lights[3].meta.pattern))
    out = benchmark.pedantic(lambda: sync(warp(rgb, t, truth.shape, method="lanczos3")), rounds=3,
                             warmup_rounds=1)
    assert out.shape == rgb.shape


def test_normalize_stage(benchmark, calibrated, lights):
    from skystack.engine.debayer import debayer
    from skystack.engine.normalize import robust_stats

    rgb = debayer(calibrated[0], lights[0].meta.pattern)
    st = benchmark(robust_stats, rgb)
    assert np.all(np.isfinite(st.location))


def test_combine_stage(benchmark, backend, sync, calibrated, lights):
    """Sigma-clip combine of all lights, every channel, over a 256-row tile."""
    from skystack.engine.combine import combine
    from skystack.engine.debayer import debayer

    rows = 256
    tile = np.stack([debayer(x, fr.meta.pattern)[:, :rows] for x, fr in zip(calibrated, lights)])
    cubes = [backend.xp.asarray(np.ascontiguousarray(tile[:, ch])) for ch in range(3)]

    def run():
        return sync([combine(c, method="sigma", kappa_low=3.0, kappa_high=3.0) for c in cubes])

    res = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    assert res[0].mean.shape == tile.shape[-2:]


def test_write_outputs_stage(benchmark, calibrated, lights, tmp_path):
    from skystack.engine.debayer import debayer
    from skystack.engine.output import write_fits, write_preview, write_tiff
    from skystack.engine.stretch import autostretch

    img = debayer(calibrated[0], lights[0].meta.pattern)

    def run():
        write_tiff(tmp_path / "s.tif", img)
        write_fits(tmp_path / "s.fits", img, {})
        write_preview(tmp_path / "s.png", autostretch(img))

    benchmark.pedantic(run, rounds=3)
    assert (tmp_path / "s.png").stat().st_size > 0


def test_stack_session(benchmark, backend, session, tmp_path):
    """The whole pipeline on the session (masters built each round: fresh cache folder)."""
    from skystack.engine.stack import StackConfig, stack_session

    _root, files = session
    counter = iter(range(1000))

    def run():
        cache = tmp_path / f"masters-{next(counter)}"
        return stack_session(files, StackConfig(backend=backend.name, quiet=True, cache_dir=str(cache)))

    res = benchmark.pedantic(run, rounds=2)
    assert res.n_used >= N_LIGHTS - 1
    assert Path(res.reference).exists()
