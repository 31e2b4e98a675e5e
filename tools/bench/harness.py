"""The end-to-end benchmark: the decode floor and one pipeline run per backend, each in a
fresh process, summarised and saved as JSON (:func:`run_benchmark`)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from skystack.engine.errors import SkystackError
from skystack.tools.bench.config import BenchConfig
from skystack.tools.bench.machine import machine_info, machine_key
from skystack.tools.bench.measure import json_default, run_child
from skystack.tools.bench.report import fmt_value
from skystack.tools.bench.sessions import (
    all_frames,
    ensure_session,
    session_files,
    session_synth_config,
    warm_page_cache,
)

_REPO = Path(__file__).resolve().parents[2]


def _backends(requested: str | None) -> list[str]:
    from skystack.engine.backend import _gpu_cached
    from skystack.engine.errors import BackendUnavailable

    name = (requested or os.environ.get("SKYSTACK_BACKEND") or "auto").lower()
    gpu_ok, reason = _gpu_cached()
    if name == "cpu":
        return ["cpu"]
    if name == "gpu":
        if gpu_ok is None:
            raise BackendUnavailable(f"GPU unavailable ({reason}); use --backend cpu or auto")
        return ["gpu"]
    if name != "auto":
        raise SkystackError(f"--backend {name!r}: choose auto, cpu or gpu")
    return ["cpu", "gpu"] if gpu_ok is not None else ["cpu"]


def _say(cfg: BenchConfig, text: str) -> None:
    if not cfg.quiet:
        print(text, file=sys.stderr, flush=True)


def _say_result(cfg: BenchConfig, result: dict[str, Any], failed: str, describe) -> None:
    """Say how a child went: ``describe(result)`` when it succeeded, else ``<failed>: <its error>``."""
    _say(cfg, describe(result) if result.get("ok") else f"{failed}: {result.get('error')}")


def _best(results: list[dict[str, Any]], key) -> dict[str, Any]:
    ok = [r for r in results if r.get("ok")]
    if not ok:
        return results[-1]
    best = dict(min(ok, key=key))
    best["repeats"] = [key(r) for r in ok]
    return best


def _fastest(config: BenchConfig, spec: dict[str, Any], log_dir: Path, message: str, key) -> dict[str, Any]:
    """Run the child ``spec`` ``config.repeat`` times (saying ``message`` before each); the fastest by ``key``."""
    results = []
    for _ in range(max(1, int(config.repeat))):
        _say(config, message)
        results.append(run_child(spec, log_dir=log_dir, timeout_s=config.timeout_s))
    return _best(results, key=key)


def _summarise_run(run: dict[str, Any], decode: dict[str, Any], n_lights: int, mp: float) -> dict[str, Any]:
    """Add throughput, 'other' time and the decode-floor ratios to a stack run (same-run numbers)."""
    if not run.get("ok"):
        return run
    t = run["timings"]
    total = float(t.get("total", run.get("wall_in_process_s", float("nan"))))
    staged = sum(v for k, v in t.items() if k != "total")
    run["total_s"] = total
    run["other_s"] = max(0.0, total - staged)
    run["frames_per_s"] = n_lights / total if total > 0 else None
    run["megapixels_per_s"] = n_lights * mp / total if total > 0 else None
    if decode.get("ok"):
        run["decode_floor_s"] = decode["total_s"]
        run["ratio_to_decode_floor"] = total / decode["total_s"] if decode["total_s"] > 0 else None
        lights_part = total - float(t.get("masters", 0.0))
        run["ratio_lights_to_decode_lights"] = (lights_part / decode["lights_s"]
                                                if decode["lights_s"] > 0 else None)
        if decode.get("lights_frames"):  # decoder thread-seconds per light (every worker kept busy)
            run["decode_s_per_light"] = decode["lights_s"] * int(decode.get("workers") or 1) / decode["lights_frames"]
    return run


#: Fewest lights of the GPU warm-up run (kernels compiled and loaded outside the measurement).
WARMUP_LIGHTS = 3
#: Lights from which a session's per-session work is whole: the landscape search's small frames
#: (``foreground.N_FRAMES``) and the model choice's validation frames (``register.N_VALIDATE`` besides
#: the reference) stop growing.
WHOLE_SESSION_LIGHTS = 12


def warmup_lights(n_lights: int) -> int:
    """Lights of the GPU warm-up run for a measured run of ``n_lights``: half of them up to
    :data:`WHOLE_SESSION_LIGHTS`, at least :data:`WARMUP_LIGHTS`. From 24 lights on, both runs do the
    whole per-session work, so the difference is the lights' own."""
    return max(WARMUP_LIGHTS, min(WHOLE_SESSION_LIGHTS, n_lights // 2))


def _host_per_added_light(run: dict[str, Any], warm: dict[str, Any], n_lights: int) -> None:
    """Under the simulated device: the host seconds each light adds, from the warm-up run (fewer lights,
    the same session, so the per-session costs cancel) and the measured one. Below 24 lights an upper
    bound: the warm-up's fewer lights may not run the landscape search or the lens model's choice,
    so their costs count as the added lights'."""
    t, w = run.get("device_traffic"), warm.get("device_traffic")
    n_warm = warmup_lights(n_lights)
    if not (run.get("ok") and warm.get("ok") and t and w) or n_lights <= n_warm:
        return
    added = n_lights - n_warm
    for kind in ("host_s", "host_cpu_s"):  # wall-based and thread-CPU-based (child._device_traffic)
        if f"{kind}_lights" not in w:
            continue
        t[f"{kind}_lights_warmup"] = w[f"{kind}_lights"]
        t[f"{kind}_per_added_light"] = (t[f"{kind}_lights"] - w[f"{kind}_lights"]) / added
        t[f"{kind}_per_added_light_by_stage"] = {k: (v - w[f"{kind}_by_stage"].get(k, 0.0)) / added
                                                 for k, v in t[f"{kind}_by_stage"].items()}


def results_name(info: dict[str, Any], label: str, *, prefix: str = "") -> str:
    """``<prefix><machine>-<label>-<utc>.json``: the file name of a results JSON."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", machine_key(info)).strip("-").lower()[:60]
    return f"{prefix}{slug}-{label}-{stamp}.json"


def default_output(info: dict[str, Any], label: str) -> Path:
    """``bench/results/<machine>-<label>-<utc>.json`` in a source checkout, else in the current folder."""
    name = results_name(info, label)
    bench_dir = _REPO / "bench"
    if bench_dir.is_dir():
        return bench_dir / "results" / name
    return Path.cwd() / f"skystack-bench-{name}"


def run_benchmark(config: BenchConfig = BenchConfig()) -> dict[str, Any]:
    """Run the end-to-end benchmark; return (and save unless ``output == ""``) the results.

    Returns
    -------
    dict
        ``command``, ``created``, ``config``, ``machine``, ``session``
        (path, lights, size, calibration frames), ``decode_floor`` (seconds
        for lights and calibration frames, workers) and ``runs``: one dict
        per backend with ``timings`` (per stage), ``total_s``, ``other_s``,
        ``frames_per_s``, ``megapixels_per_s``, ``peak_rss_bytes`` (the
        child process's ``ru_maxrss``), ``gpu_pool_bytes``,
        ``decode_floor_s`` and ``ratio_to_decode_floor`` (pipeline total /
        decode floor of all frames, both from this invocation) and
        ``ratio_lights_to_decode_lights`` (pipeline minus masters / decoding
        the lights). ``output`` is the JSON path written.
    """
    backends = _backends(config.backend)
    info = machine_info()
    session, files, label = _bench_session(config)
    sess, frames, decoder_format = _session_summary(session, files)
    n_lights = sess["lights"]
    _say(config, f"session: {n_lights} lights of {sess['width']}x{sess['height']} "
                 f"({sess['megapixels']:.1f} MP, {decoder_format}), "
                 f"{len(frames) - n_lights} calibration frames; backends: {', '.join(backends)}")
    warm_page_cache(frames)
    log_dir = Path(tempfile.mkdtemp(prefix="skystack-bench-logs-"))
    base = {"session": str(session), "workers": config.workers}
    decode = _decode_floor(config, base, log_dir)
    runs = [_backend_run(config, be, base, log_dir, decode, n_lights, sess["megapixels"]) for be in backends]
    profile = _cpu_profile(config, base, log_dir) if config.profile and "cpu" in backends else None
    out: dict[str, Any] = {
        "command": _command_line(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {k: v for k, v in asdict(config).items()},
        "label": label,
        "machine": info,
        "session": sess,
        "decode_floor": decode,
        "runs": runs,
        "profile": profile,
        "logs": str(log_dir),
    }
    if config.output != "":
        path = Path(config.output) if config.output else default_output(info, label)
        write_json(path, out)
        out["output"] = str(path)
    return out


def _bench_session(config: BenchConfig) -> tuple[Path, Any, str]:
    """``(folder, SessionFiles, label)``: the given session, or the preset's synthetic one (built on first use)."""
    if config.session:
        session = Path(config.session).expanduser()
        label = "session-" + re.sub(r"[^A-Za-z0-9]+", "-", session.name)[:40]
    else:
        n, mp = config.size()
        scfg = session_synth_config(n, mp, file_format=config.file_format, seed=config.seed)
        session = ensure_session(scfg, config.cache_root, quiet=config.quiet)
        label = config.preset if (config.frames is None and config.megapixels is None) else f"{n}x{mp:g}mp"
    return session, session_files(session), label


def _session_summary(session: Path, files) -> tuple[dict[str, Any], list[Path], str]:
    """The results' ``session`` entry, every frame of the session, and the lights' decoder format."""
    from skystack.engine.io import read_meta

    meta = read_meta(files.lights[0])
    h, w = meta.shape[-2:]
    frames = all_frames(files)
    sess = {"path": str(session), "lights": len(files.lights), "width": int(w), "height": int(h),
            "megapixels": h * w / 1e6, "format": files.lights[0].suffix.lstrip(".").lower() or meta.format,
            "bias": len(files.bias), "darks": len(files.darks),
            "flats": len(files.flats), "dark_flats": len(files.dark_flats),
            "bytes": int(sum(p.stat().st_size for p in frames))}
    return sess, frames, meta.format


def _decode_floor(config: BenchConfig, base: dict[str, Any], log_dir: Path) -> dict[str, Any]:
    """The fastest of ``config.repeat`` decode-floor children."""
    decode = _fastest(config, {**base, "mode": "decode"}, log_dir, "decode floor ...", key=lambda r: r["total_s"])
    _say_result(config, decode, "decode floor failed",
                lambda d: f"decode floor: {d['total_s']:.2f} s (lights {d['lights_s']:.2f} s, {d['workers']} workers)")
    return decode


def _backend_run(config: BenchConfig, be: str, base: dict[str, Any], log_dir: Path, decode: dict[str, Any],
                 n_lights: int, mp_frame: float) -> dict[str, Any]:
    """The fastest of ``config.repeat`` pipeline children on backend ``be``, summarised against the decode floor."""
    warm: dict[str, Any] = {}
    if be == "gpu":  # compile/load the kernels once, outside the measurement
        _say(config, f"gpu warm-up ({warmup_lights(n_lights)} lights) ...")
        warm = run_child({**base, "mode": "stack", "backend": "gpu", "lights_limit": warmup_lights(n_lights),
                          "memory_limit": config.memory_limit}, log_dir=log_dir, timeout_s=config.timeout_s)
    run = _fastest(config, {**base, "mode": "stack", "backend": be, "memory_limit": config.memory_limit}, log_dir,
                   f"pipeline on {be} ...", key=lambda r: r["timings"]["total"])
    run["requested_backend"] = be
    if not run.get("ok"):
        run.setdefault("backend", be)
    _summarise_run(run, decode, n_lights, mp_frame)
    _host_per_added_light(run, warm, n_lights)
    _say_result(config, run, f"{be}: failed", lambda r: f"{be}: {r['total_s']:.2f} s, ratio to decode floor "
                                                         f"{fmt_value(r.get('ratio_to_decode_floor'), '{:.2f}')}")
    return run


def _cpu_profile(config: BenchConfig, base: dict[str, Any], log_dir: Path) -> dict[str, Any] | None:
    """One more CPU pipeline run under cProfile: its summary, or ``{"error": ...}``."""
    _say(config, "profiling the CPU pipeline ...")
    prof_path = str(log_dir / "cpu.prof")
    prun = run_child({**base, "mode": "stack", "backend": "cpu", "profile": True, "profile_path": prof_path,
                      "memory_limit": config.memory_limit}, log_dir=log_dir, timeout_s=config.timeout_s)
    return prun.get("profile") if prun.get("ok") else {"error": prun.get("error")}


def _command_line() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(("skystack", "__main__.py")):
        argv[0] = "skystack"
    elif argv and argv[0].endswith(".py"):
        argv = ["python", os.path.relpath(argv[0]) if os.path.isabs(argv[0]) else argv[0], *argv[1:]]
    return " ".join(argv)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write results as indented JSON (atomically; NumPy values and paths converted)."""
    from skystack.engine.output import write_text

    write_text(path, json.dumps(data, indent=1, default=json_default) + "\n")
