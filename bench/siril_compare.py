"""Side-by-side comparison of skystack with Siril (and ccdproc + astroalign) on the same frames.

Usage::

    python bench/siril_compare.py [--preset small | --frames N --megapixels M | --session DIR]
                                  [--keep] [--json PATH] [--results-md bench/RESULTS.md]

The session is synthesized as Bayer FITS (which Siril reads directly) with
``truth.json``, so every tool stacks the very same files and the result can
be scored against the simulator's truth. Siril is ``siril-cli`` from
Debian's ``siril`` package; when it is missing and this runs as root, the
script installs it with apt-get.

The Siril script mirrors skystack's default pipeline (Siril 1.0 commands,
checked against the 1.0.6 binary's usage strings):

* master bias: ``stack bias rej s 3 3 -nonorm``; master dark (bias included,
  same exposure as the lights): ``stack dark rej s 3 3 -nonorm``; master
  flat: ``preprocess flat -bias=bias_stacked`` then ``stack pp_flat rej s 3 3 -norm=mul``
  (skystack: sigma-clipped masters, flat from bias-subtracted flats);
* lights: ``preprocess light -dark=dark_stacked -flat=pp_flat_stacked -cfa -equalize_cfa -debayer``
  (skystack: bias + exposure-scaled dark, per-CFA-colour normalised flat; Siril 1.0 demosaics
  with RCD by default; skystack runs with its own defaults unless ``--debayer`` says otherwise);
* ``register pp_light`` (global star alignment onto the first light; skystack
  is given the same reference with ``StackConfig(reference=light 0)``);
* ``stack r_pp_light rej s 3 3 -norm=addscale`` (kappa-sigma 3/3, additive +
  scale normalisation: skystack's defaults).

Siril 1.0.6 has no cosmetic correction in ``preprocess`` (skystack fixes the
hot pixels it finds in the master dark); sigma clipping removes most of them
in both.

Printed side by side: wall time of the whole process, peak memory
(``ru_maxrss`` of that process), background noise in the same star-free
boxes (light-frame ADU, through a photometric scale measured on the same
truth stars), median star FWHM, registration error against the truth
transforms (skystack: its transforms; Siril 1.0 keeps no transforms, so its
registered ``r_`` frames are measured against the truth star positions) and
the background residual against the noise-free truth sky.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from skystack.tools.bench.cli import split_child_request
from skystack.tools.bench.config import PRESETS
from skystack.tools.bench.harness import results_name, write_json
from skystack.tools.bench.machine import machine_info, machine_key
from skystack.tools.bench.measure import run_child, run_measured
from skystack.tools.bench.quality import star_free_mask, truth_quality
from skystack.tools.bench.registration import measured_registration_error, registration_error
from skystack.tools.bench.report import fmt_value, update_results_md
from skystack.tools.bench.sessions import (
    ensure_session,
    session_files,
    session_synth_config,
    warm_memory,
    warm_page_cache,
)
from skystack.engine.errors import SkystackError

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- Siril


def siril_version(exe: str) -> str | None:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"siril\s+([\w.\-]+)", out)
    return m.group(1) if m else (out.strip() or None)


def ensure_siril(*, install: bool = True) -> str:
    """Path of ``siril-cli``; installs Debian's ``siril`` package when missing and running as root."""
    exe = shutil.which("siril-cli")
    if exe:
        return exe
    if not install:
        raise SkystackError("siril-cli not found; install it with 'apt-get install siril' (Debian/Ubuntu)")
    if os.geteuid() != 0:
        raise SkystackError("siril-cli not found and not running as root; run 'sudo apt-get install siril' "
                            "or run this script as root to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    policy = subprocess.run(["apt-cache", "policy", "siril"], capture_output=True, text=True, env=env)
    if "Candidate: (none)" in policy.stdout or not policy.stdout.strip():
        subprocess.run(["apt-get", "update"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "siril"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    exe = shutil.which("siril-cli")
    if not exe:
        raise SkystackError("apt-get installed siril but siril-cli is still not on PATH")
    return exe


def siril_script(work: Path, files, *, fits: bool) -> str:
    """The Siril 1.0 script (absolute paths: Siril resolves ``..`` through symlinked folders)."""
    proc = work / "process"
    get = "link" if fits else "convert"

    def q(p: Path) -> str:
        return f'"{p}"' if " " in str(p) else str(p)

    lines = ["requires 1.0.0"]

    def sequence(kind_dir: Path, name: str) -> None:
        lines.extend([f"cd {q(kind_dir)}", f"{get} {name} -out={q(proc)}", f"cd {q(proc)}"])

    calib = []
    if files.bias:
        sequence(work / "bias", "bias")
        lines.append("stack bias rej s 3 3 -nonorm")
    if files.flats:
        sequence(work / "flats", "flat")
        lines.append("preprocess flat -bias=bias_stacked" if files.bias else "preprocess flat")
        lines.append("stack pp_flat rej s 3 3 -norm=mul")
        calib.append("-flat=pp_flat_stacked")
    if files.darks:
        sequence(work / "darks", "dark")
        lines.append("stack dark rej s 3 3 -nonorm")
        calib.insert(0, "-dark=dark_stacked")
    sequence(work / "lights", "light")
    lines.append(" ".join(["preprocess light", *calib, "-cfa -equalize_cfa -debayer"]))
    lines.append("register pp_light")
    lines.append(f"stack r_pp_light rej s 3 3 -norm=addscale -out={q(work / 'result')}")
    lines.append("close")
    return "\n".join(lines) + "\n"


def _link_inputs(work: Path, files) -> None:
    """Siril converts every frame of a folder: give it folders holding only this session's frames."""
    for kind, paths in (("bias", files.bias), ("darks", files.darks), ("flats", files.flats),
                        ("lights", files.lights)):
        d = work / kind
        d.mkdir(parents=True, exist_ok=True)
        for p in paths:
            (d / p.name).symlink_to(p.resolve())
    (work / "process").mkdir(exist_ok=True)


def run_siril(exe: str, files, work: Path, *, timeout_s: float) -> dict[str, Any]:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    fits = all(p.suffix.lower() in (".fit", ".fits", ".fts") for p in files.lights)
    _link_inputs(work, files)
    script = work / "skystack_compare.ssf"
    script.write_text(siril_script(work, files, fits=fits))
    log = work / "siril.log"
    m = run_measured([exe, "-s", str(script), "-d", str(work)], log_path=log, timeout_s=timeout_s)
    text = log.read_text(errors="replace")
    internal = None
    for mt in re.finditer(r"Total execution time: ([\d.]+) s", text):
        internal = float(mt.group(1))
    ok = m.returncode == 0 and (work / "result.fit").is_file()
    out: dict[str, Any] = {"ok": ok, "tool": "siril", "version": siril_version(exe), "wall_s": m.wall_s,
                           "internal_s": internal, "peak_rss_bytes": m.peak_rss_bytes,
                           "cpu_s": m.user_s + m.sys_s, "log": str(log), "script": str(script)}
    if not ok:
        tail = [ln for ln in text.splitlines() if ln.startswith("log:")][-6:]
        out["error"] = f"siril-cli exit {m.returncode}: " + " | ".join(tail)
    return out


def _siril_registered(work: Path, truth) -> list[tuple[int, np.ndarray]]:
    """Siril's registered frames (``r_pp_light_*.fit``), keyed by light index through DATE-OBS."""
    from astropy.io import fits

    by_time = {lt.time_start.replace("Z", "")[:19]: lt.index for lt in truth.lights}
    out = []
    for p in sorted((work / "process").glob("r_pp_light_*.fit")):
        with fits.open(p, memmap=False) as hd:
            date = str(hd[0].header.get("DATE-OBS", ""))[:19]
            data = np.asarray(hd[0].data, dtype=np.float32)
        if date in by_time:
            out.append((by_time[date], data))
    return out


# ----------------------------------------------------------------------------- Python peer


def _peer_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("ccdproc", "astroalign"))


def _peer_main(spec: dict[str, Any]) -> int:
    """ccdproc calibration + astroalign registration + ccdproc sigma-clip combine (child process).

    ccdproc has no demosaicing, so the calibrated mosaics are debayered with
    skystack's bilinear debayer (a plain linear interpolation; skystack's own stacks default to RCD).
    """
    import astroalign
    import astropy.units as u
    import ccdproc
    from astropy.io import fits
    from astropy.nddata import CCDData
    from astropy.stats import mad_std

    from skystack.engine.debayer import debayer
    from skystack.engine.session import discover_session

    t0 = time.perf_counter()
    files = discover_session(spec["session"])

    def load(p):
        with fits.open(p, memmap=False) as hd:
            h = hd[0].header
            return CCDData(np.asarray(hd[0].data, dtype=np.float32), unit="adu", meta=h)

    def master(paths, **kw):
        return ccdproc.combine([load(p) for p in paths], method="average", sigma_clip=True,
                               sigma_clip_low_thresh=3, sigma_clip_high_thresh=3,
                               sigma_clip_func=np.ma.median, sigma_clip_dev_func=mad_std, unit="adu",
                               dtype=np.float32, **kw)

    bias = master(files.bias)
    dark = ccdproc.subtract_bias(master(files.darks), bias)
    dark_exp = float(load(files.darks[0]).meta["EXPTIME"])
    flats = [ccdproc.subtract_bias(load(p), bias) for p in files.flats]
    for f in flats:
        f.data = f.data / np.median(f.data)
    flat = ccdproc.combine(flats, method="average", sigma_clip=True, sigma_clip_low_thresh=3,
                           sigma_clip_high_thresh=3, unit="adu", dtype=np.float32)
    fd = np.asarray(flat.data, dtype=np.float64)
    for dy in (0, 1):  # equalise the CFA colours (like -equalize_cfa / skystack's flat normalisation)
        for dx in (0, 1):
            fd[dy::2, dx::2] /= np.median(fd[dy::2, dx::2])
    flat.data = fd.astype(np.float32)
    pattern = str(load(files.lights[0]).meta.get("BAYERPAT", "RGGB")).strip()
    ref_i = int(spec.get("reference_index", 0))
    rgbs = []
    for p in files.lights:
        ccd = load(p)
        ccd = ccdproc.subtract_bias(ccd, bias)
        ccd = ccdproc.subtract_dark(ccd, dark, dark_exposure=dark_exp * u.s,
                                    data_exposure=float(ccd.meta["EXPTIME"]) * u.s, scale=True)
        ccd = ccdproc.flat_correct(ccd, flat, norm_value=1.0)
        rgbs.append(debayer(np.asarray(ccd.data, dtype=np.float32), pattern))
    ref_lum = rgbs[ref_i].mean(axis=0)
    aligned, transforms = [], {}
    for i, rgb in enumerate(rgbs):
        if i == ref_i:
            aligned.append(rgb)
            transforms[str(i)] = np.eye(3).tolist()
            continue
        try:
            tf, _pts = astroalign.find_transform(rgb.mean(axis=0), ref_lum)
        except Exception as exc:  # astroalign.MaxIterError and friends: frame left out
            print(f"light {i}: astroalign failed: {exc}", file=sys.stderr)
            continue
        transforms[str(i)] = np.asarray(tf.params, dtype=np.float64).tolist()
        chans = [astroalign.apply_transform(tf, rgb[c], ref_lum, fill_value=np.nan)[0] for c in range(3)]
        aligned.append(np.stack(chans).astype(np.float32))
    # additive + scale normalisation onto the reference, then kappa-sigma 3/3 per channel
    ref = aligned[0] if ref_i == 0 else rgbs[ref_i]
    out = np.empty_like(ref)
    for c in range(3):
        r_loc, r_sc = np.nanmedian(ref[c]), mad_std(ref[c], ignore_nan=True)
        norm = []
        for a in aligned:
            loc, sc = np.nanmedian(a[c]), mad_std(a[c], ignore_nan=True)
            norm.append(CCDData((a[c] - loc) * (r_sc / sc) + r_loc, unit="adu"))
        comb = ccdproc.Combiner(norm)
        comb.sigma_clipping(low_thresh=3, high_thresh=3, func=np.ma.median)
        out[c] = np.asarray(comb.average_combine().data, dtype=np.float32)
    np.save(spec["save_image"], out)
    total = time.perf_counter() - t0
    versions = {m: __import__(m).__version__ for m in ("ccdproc", "astroalign")}
    import resource

    print("SKYSTACK_PEER_RESULT " + json.dumps({
        "ok": True, "internal_s": total, "transforms": transforms, "versions": versions,
        "peak_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}), flush=True)
    return 0


def run_peer(session: Path, work: Path, *, timeout_s: float) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    img = work / "peer.npy"
    spec = {"session": str(session), "save_image": str(img), "reference_index": 0}
    log = work / "peer.log"
    m = run_measured([sys.executable, str(Path(__file__).resolve()), "--peer", json.dumps(spec)], log_path=log,
                     timeout_s=timeout_s)
    text = log.read_text(errors="replace")
    res: dict[str, Any] = {"ok": False}
    for line in text.splitlines():
        if line.startswith("SKYSTACK_PEER_RESULT "):
            res = json.loads(line.split(" ", 1)[1])
    res.update({"tool": "ccdproc+astroalign", "wall_s": m.wall_s, "peak_rss_bytes": m.peak_rss_bytes,
                "cpu_s": m.user_s + m.sys_s, "log": str(log)})
    if res.get("ok"):
        res["image"] = str(img)
    else:
        res["error"] = " | ".join(text.strip().splitlines()[-5:])
    return res


# ----------------------------------------------------------------------------- comparison


def _score(image: np.ndarray, truth, mask, ref: dict[str, np.ndarray], reg: dict[str, Any] | None
           ) -> dict[str, Any]:
    from skystack.engine.background import luminance
    from skystack.tools import skymetrics

    q = truth_quality(image, truth, 0, mask=mask, star_image=ref["stars"], background=ref["background"])
    pts = skymetrics.isolated_stars(truth, 0, truth.shape, flux_range=(1500.0, 2.0e4), avoid=truth.horizon_mask())
    regions = skymetrics.star_regions(luminance(image, np.float64), pts)
    return {"quality": q.to_dict(), "registration": reg, "regions": regions}


def _score_synthetic(images: dict[str, np.ndarray], truth, sk_entry, siril, peer, sk, work_root: Path) -> None:
    """Score every image against the truth, and again blurred to the broadest tool's FWHM."""
    mask = star_free_mask(truth, 0)
    land = truth.horizon_mask()
    if land.any():  # a tripod night: noise and stars are measured in the sky only
        from scipy.ndimage import distance_transform_edt

        mask &= distance_transform_edt(~land) > 12
    ref = {"stars": truth.sky(0, background=False, gradient=False, trail=False),
           "background": truth.sky(0, stars=False, trail=False)}
    if "skystack" in images:
        transforms = {int(k): v for k, v in sk.get("transforms", {}).items()}
        sk_entry["score"] = _score(images["skystack"], truth, mask, ref,
                                   registration_error(transforms, truth, 0) if not land.any() else None)
    if "siril" in images:
        reg = measured_registration_error(_siril_registered(work_root / "siril", truth), truth, 0) \
            if not land.any() else None
        siril["score"] = _score(images["siril"], truth, mask, ref, reg)
    if peer is not None and peer.get("ok"):
        tr = {int(k): v for k, v in peer.get("transforms", {}).items()}
        images["peer"] = np.load(peer["image"])
        peer["score"] = _score(images["peer"], truth, mask, ref, registration_error(tr, truth, 0))
    scored = {k: t for k, t in (("skystack", sk_entry), ("siril", siril), ("peer", peer))
              if t is not None and t.get("score") and k in images}

    def measure(img):
        q = truth_quality(img, truth, 0, mask=mask, star_image=ref["stars"], background=ref["background"])
        return q.noise_mean_adu, q.noise_binned_mean_adu, q.fwhm_px, q.colour_noise_mean_adu

    _matched_resolution(images, scored, measure)


def _score_real(images: dict[str, np.ndarray], sk_entry, siril, adu: float) -> None:
    """Real frames: both stacks against each other (:mod:`real_metrics`), in ADU of one light.

    skystack's image is in normalised units (``adu`` per unit: white - black
    level of the lights); Siril's is brought to them by star photometry.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from real_metrics import Scorer

    if len(images) < 2:
        return
    scorer = Scorer(images)
    for name, tool in (("skystack", sk_entry), ("siril", siril)):
        v = scorer.score(images[name], name=name)
        tool["score"] = {"quality": {
            "noise_adu": [x * adu for x in v["noise"]], "noise_mean_adu": v["noise_mean"] * adu,
            "noise_binned_mean_adu": v["noise_binned_mean"] * adu, "fwhm_px": v["fwhm_px"], "n_stars": v["n_stars"],
            "colour_noise_adu": [x * adu for x in v["colour_noise"]],
            "colour_noise_mean_adu": float(np.mean(v["colour_noise"])) * adu if v["colour_noise"] else None,
            "scale": v["scale"]}, "registration": None, "regions": None}

    def measure(img):  # a blurred stack, in the same boxes and units as the two above
        v = scorer.score(img)
        return (v["noise_mean"] * adu, v["noise_binned_mean"] * adu, v["fwhm_px"],
                float(np.mean(v["colour_noise"])) * adu if v["colour_noise"] else None)

    _matched_resolution(images, {"skystack": sk_entry, "siril": siril}, measure)


def _matched_resolution(images: dict[str, np.ndarray], tools: dict[str, dict[str, Any]], measure) -> None:
    """Noise of each image blurred (Gaussian) to the broadest image's FWHM: noise at equal resolution.

    Per-pixel noise falls as an image is smoothed, and so do its stars' sharpness;
    comparing noise at the same FWHM shows which stack holds more information
    (the sharper one can always be blurred into the softer one, not the reverse).
    """
    from scipy.ndimage import gaussian_filter

    fw = {k: t["score"]["quality"].get("fwhm_px") for k, t in tools.items() if t.get("score")}
    fw = {k: v for k, v in fw.items() if v is not None and math.isfinite(v)}
    if len(fw) < 2:
        return
    target = max(fw.values())
    for name, f in fw.items():
        img = images[name]
        sigma, got = 0.0, (None, None, f, None)
        lo, hi = 0.0, math.sqrt(max(target ** 2 - f ** 2, 0.0) / (8.0 * math.log(2.0))) * 2.0
        for _ in range(10):  # bisect the Gaussian blur that brings the measured FWHM to the target
            if abs(got[2] - target) <= 0.005 or target - f <= 0.005:
                break
            sigma = 0.5 * (lo + hi)
            blurred = np.stack([gaussian_filter(np.nan_to_num(c), sigma) for c in img]) if img.ndim == 3 \
                else gaussian_filter(np.nan_to_num(img), sigma)
            blurred[~np.isfinite(img)] = np.nan
            got = measure(blurred)
            lo, hi = (sigma, hi) if got[2] < target else (lo, sigma)
        if got[0] is None:
            q = tools[name]["score"]["quality"]
            got = (q.get("noise_mean_adu"), q.get("noise_binned_mean_adu"), f, q.get("colour_noise_mean_adu"))
        tools[name]["score"]["matched"] = {"fwhm_target": target, "blur_sigma_px": sigma, "noise": got[0],
                                           "noise_binned": got[1], "fwhm_px": got[2], "colour_noise": got[3]}


def comparison_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    tools = results["tools"]
    cols = ["metric", *[t["label"] for t in tools]]

    def row(label, fn):
        def cell(t):
            if t.get("ok"):
                return fn(t)
            if label != "wall time (s)":
                return "-"
            return "not installed" if t.get("skipped") else "failed"

        return [label, *[cell(t) for t in tools]]

    def q(t, k):
        return (t.get("score") or {}).get("quality", {}).get(k)

    def mt(t, k):
        return ((t.get("score") or {}).get("matched") or {}).get(k)

    def rg(t, k):
        return ((t.get("score") or {}).get("regions") or {}).get(k)

    def reg(t, k):
        r = (t.get("score") or {}).get("registration") or {}
        return r.get(k)

    rows = [
        row("wall time (s)", lambda t: fmt_value(t.get("wall_s"))),
        row("internal time (s)", lambda t: fmt_value(t.get("internal_s"))),
        row("CPU time (s)", lambda t: fmt_value(t.get("cpu_s"))),
        row("peak memory (MiB)", lambda t: fmt_value((t.get("peak_rss_bytes") or 0) / 2**20, "{:.0f}")),
        row("frames stacked", lambda t: str(t.get("frames_used", "-"))),
        row("background noise (ADU, mean RGB)", lambda t: fmt_value(q(t, "noise_mean_adu"), "{:.3f}")),
        row("background noise R/G/B (ADU)",
            lambda t: "/".join(fmt_value(v, "{:.3f}") for v in (q(t, "noise_adu") or []))),
        row("noise at 4x4 binning (ADU, mean RGB)", lambda t: fmt_value(q(t, "noise_binned_mean_adu"), "{:.3f}")),
        row("colour noise R-G / B-G (ADU)",
            lambda t: "/".join(fmt_value(v, "{:.3f}") for v in (q(t, "colour_noise_adu") or [])) or "-"),
        row("median star FWHM (px)", lambda t: fmt_value(q(t, "fwhm_px"), "{:.3f}")),
        row("at equal FWHM: noise 1x1 / 4x4 / colour (ADU)",
            lambda t: f"{fmt_value(mt(t, 'noise'), '{:.3f}')} / {fmt_value(mt(t, 'noise_binned'), '{:.3f}')} / "
                      f"{fmt_value(mt(t, 'colour_noise'), '{:.3f}')} (FWHM {fmt_value(mt(t, 'fwhm_px'), '{:.3f}')})"),
        row("faint-star completeness / 50 % limit (ADU)",
            lambda t: f"{fmt_value(q(t, 'completeness'), '{:.3f}')} / {fmt_value(q(t, 'limit_flux_adu'), '{:.0f}')}"),
        row("FWHM centre / corner ninths (px)",
            lambda t: f"{fmt_value(rg(t, 'fwhm_centre'))} / {fmt_value(rg(t, 'fwhm_corner'))}"),
        row("elongation centre / corner",
            lambda t: f"{fmt_value(rg(t, 'elong_centre'))} / {fmt_value(rg(t, 'elong_corner'))}"),
        row("stars detected", lambda t: str(q(t, "n_stars") or "-")),
        row("registration error RMS / max (px)",
            lambda t: f"{fmt_value(reg(t, 'rms_px'), '{:.3f}')} / {fmt_value(reg(t, 'max_px'), '{:.3f}')}"),
        row("registration error measured from",
            lambda t: str(reg(t, "method") or "-") + (f" (floor {reg(t, 'floor_px'):.3f} px)"
                                                      if reg(t, "floor_px") is not None else "")),
        row("background residual vs truth (ADU)", lambda t: fmt_value(q(t, "bg_residual_adu"), "{:.3f}")),
        row("large-scale background error (ADU)", lambda t: fmt_value(q(t, "bg_large_scale_adu"), "{:.3f}")),
    ]
    return cols, [r for r in rows if any(c.strip("-/ ") for c in r[1:])]


def markdown(results: dict[str, Any]) -> str:
    cols, rows = comparison_rows(results)
    s = results["session"]
    lines = [f"Command: `{results['command']}` ({results['created']})", "",
             f"Session: {s['lights']} lights of {s['width']}x{s['height']} Bayer FITS, {s['bias']} bias, "
             f"{s['darks']} darks, {s['flats']} flats " + (
                 "(synthetic, with truth). Noise and residuals are in ADU of one light exposure "
                 "(lower is better)." if s.get("truth", True) else
                 f"(real frames: {s['path']}). No truth: noise is measured in the same star-free boxes of "
                 "both stacks, in skystack's units (Siril's image brought to them by star photometry per "
                 "channel; lower is better)."), "",
             "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Stack one session with skystack, Siril and (when installed) the Python peer; score each.

    Every tool runs in its own measured process on memory the host has
    backed; the images are scored in the grid of light 0, against the truth
    when the session has one. Returns the results :func:`main` prints and saves.
    """
    from skystack.engine.io import read_meta
    from skystack.tools.synth import load_truth

    say = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    session = _compare_session(args)
    files = session_files(session)
    truth = load_truth(session) if (session / "truth.json").is_file() else None  # None: real frames
    if truth is not None and truth.reference_index != 0:
        say("note: the session's truth reference is not light 0; metrics use light 0's grid anyway")
    meta = read_meta(files.lights[0])
    h, w = meta.shape[-2:]
    work_root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="skystack-siril-"))
    work_root.mkdir(parents=True, exist_ok=True)
    warm_page_cache([*files.lights, *files.bias, *files.darks, *files.flats])
    # each tool starts on memory the host has backed: twice the registered frames (RGB float32) + 1 GiB
    warm = 2 * len(files.lights) * h * w * 12 + (1 << 30)
    img_path = work_root / "skystack.npy"

    say("skystack (cpu) ...")
    warm_memory(warm)
    sk, sk_entry = _run_skystack(args, session, files, work_root, img_path)
    say("siril ...")
    warm_memory(warm)
    siril = _run_siril_entry(args, files, work_root)
    tools: list[dict[str, Any]] = [sk_entry, siril]
    peer = None
    if _peer_available() and not args.no_peer and truth is not None:
        say("ccdproc + astroalign ...")
        peer = _run_peer_entry(session, work_root, args.timeout)
        tools.append(peer)

    # --- scoring, all in the grid of light 0
    say("scoring ...")
    images = _tool_images(sk_entry, siril, img_path, work_root)
    if truth is None:
        _score_real(images, sk_entry, siril, float(meta.white_level) - float(np.mean(meta.black_level)))
    else:
        _score_synthetic(images, truth, sk_entry, siril, peer, sk, work_root)
    if not (peer is not None or args.no_peer):
        tools.append({"label": "ccdproc+astroalign", "ok": False, "skipped": True,
                      "error": "not installed (pip install ccdproc astroalign to include it)"})
    results = _results(session, files, (w, h), truth is not None, tools, siril, work_root)
    if not args.keep:
        for sub in ("siril", "peer"):
            shutil.rmtree(work_root / sub, ignore_errors=True)
        img_path.unlink(missing_ok=True)
    return results


def _compare_session(args: argparse.Namespace) -> Path:
    """The ``--session`` folder, or the synthetic FITS session of the preset/scene (built on first use)."""
    if args.session:
        return Path(args.session).expanduser()
    n, mp = PRESETS[args.preset]
    n = args.frames or n
    mp = args.megapixels or mp
    if args.scene == "tripod":
        from skystack.tools.synth_scene import tripod_config

        scfg = tripod_config(file_format="fits", seed=args.seed, n_lights=args.frames or 40)
    else:
        scfg = session_synth_config(n, mp, file_format="fits", seed=args.seed)
    return ensure_session(scfg, args.cache_dir, quiet=args.quiet)


def _run_skystack(args: argparse.Namespace, session: Path, files, work_root: Path, img_path: Path
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """skystack in a fresh process, same reference as Siril (light 0): its child result and its table entry."""
    sk = run_child({"mode": "stack", "session": str(session), "backend": args.backend or "cpu",
                    "workers": args.workers, "reference": str(files.lights[0]), "save_image": str(img_path),
                    "options": {k: v for k, v in (("debayer", args.debayer),
                                                  ("interpolation", args.interpolation)) if v}},
                   log_dir=work_root, timeout_s=args.timeout)
    opts = ", ".join(v for v in (args.debayer, args.interpolation) if v) or "defaults"
    sk_entry: dict[str, Any] = {"label": f"skystack ({sk.get('backend', args.backend or 'cpu')}, {opts})",
                                "ok": sk.get("ok")}
    if sk.get("ok"):
        sk_entry.update(wall_s=sk["process"]["wall_s"], internal_s=sk["timings"].get("total"),
                        cpu_s=sk["process"]["user_s"] + sk["process"]["sys_s"],
                        peak_rss_bytes=sk["process"]["peak_rss_bytes"], frames_used=sk["frames_used"],
                        timings=sk["timings"], skipped=sk.get("skipped"))
    else:
        sk_entry["error"] = sk.get("error")
    return sk, sk_entry


def _run_siril_entry(args: argparse.Namespace, files, work_root: Path) -> dict[str, Any]:
    """Siril's table entry (installing ``siril-cli`` first when allowed and needed)."""
    try:
        exe = ensure_siril(install=not args.no_install)
        siril = run_siril(exe, files, work_root / "siril", timeout_s=args.timeout)
    except (SkystackError, subprocess.CalledProcessError) as exc:
        siril = {"ok": False, "error": str(exc), "tool": "siril"}
    siril["label"] = f"Siril {siril.get('version') or ''}".strip()
    if siril.get("ok"):
        siril["frames_used"] = len(list((work_root / "siril" / "process").glob("r_pp_light_*.fit")))
    return siril


def _run_peer_entry(session: Path, work_root: Path, timeout_s: float) -> dict[str, Any]:
    """The Python peer's (ccdproc + astroalign) table entry."""
    peer = run_peer(session, work_root / "peer", timeout_s=timeout_s)
    peer["label"] = "ccdproc+astroalign"
    if peer.get("ok"):
        peer["frames_used"] = len(peer.get("transforms", {}))
    return peer


def _tool_images(sk_entry: dict[str, Any], siril: dict[str, Any], img_path: Path, work_root: Path
                 ) -> dict[str, np.ndarray]:
    """The stacked images of the tools that succeeded (skystack's ``.npy``, Siril's ``result.fit``)."""
    images = {}
    if sk_entry.get("ok"):
        images["skystack"] = np.load(img_path)
    if siril.get("ok"):
        from astropy.io import fits

        images["siril"] = np.asarray(fits.getdata(work_root / "siril" / "result.fit"), dtype=np.float32)
    return images


def _results(session: Path, files, size: tuple[int, int], has_truth: bool, tools: list[dict[str, Any]],
             siril: dict[str, Any], work_root: Path) -> dict[str, Any]:
    """The comparison's results: command, machine (with Siril's version), session and the tools' entries."""
    w, h = size
    info = machine_info()
    if siril.get("ok"):
        info["versions"]["siril"] = siril.get("version")
    return {
        "command": " ".join(["python", "bench/siril_compare.py", *sys.argv[1:]]),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": info,
        "session": {"path": str(session), "lights": len(files.lights), "width": int(w), "height": int(h),
                    "bias": len(files.bias), "darks": len(files.darks), "flats": len(files.flats),
                    "truth": has_truth},
        "tools": tools,
        "workdir": str(work_root),
    }


def print_results(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    cols, rows = comparison_rows(results)
    s = results["session"]
    t = Table(title=f"skystack vs Siril: {s['lights']} lights of {s['width']}x{s['height']} "
                    f"({s['width'] * s['height'] / 1e6:.1f} MP) Bayer FITS")
    for c in cols:
        t.add_column(c, justify="left" if c == "metric" else "right", overflow="fold")
    for r in rows:
        t.add_row(*r)
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    console.print(t)
    for tool in results["tools"]:
        if not tool.get("ok"):
            console.print(f"{tool['label']}: {tool.get('error')}")


def build_parser() -> argparse.ArgumentParser:
    from skystack.engine import debayer, warp
    from skystack.engine.stack import StackConfig

    p = argparse.ArgumentParser(prog="bench/siril_compare.py", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=tuple(PRESETS))
    p.add_argument("--scene", default="telescope", choices=("telescope", "tripod"),
                   help="tripod: the phone-on-a-tripod hour (wide barrel lens, landscape; 40 lights of 960x720)")
    p.add_argument("--frames", type=int, help="number of lights (overrides the preset)")
    p.add_argument("--megapixels", type=float, help="megapixels per frame (overrides the preset)")
    p.add_argument("--session", help="existing synthetic FITS session (with truth.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=("cpu", "gpu"), help="skystack backend (default cpu)")
    p.add_argument("--workers", type=int, help="skystack decoder threads")
    p.add_argument("--debayer", choices=debayer.METHODS,
                   help=f"skystack debayer (default: skystack's default, {StackConfig.debayer})")
    p.add_argument("--interpolation", choices=warp.METHODS,
                   help=f"skystack resampling (default: skystack's default, {StackConfig.interpolation}; "
                        "Siril 1.0's register resamples bilinearly)")
    p.add_argument("--cache-dir", help="where synthetic sessions are kept")
    p.add_argument("--workdir", help="Siril/peer working folder (default: a new temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep Siril's intermediate files and the images")
    p.add_argument("--no-install", action="store_true", help="never apt-get install siril")
    p.add_argument("--no-peer", action="store_true", help="skip ccdproc + astroalign even when installed")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per tool")
    p.add_argument("--json", help="results file (default bench/results/siril-...json)")
    p.add_argument("--results-md", help="update this RESULTS.md with the table for this machine")
    p.add_argument("--quiet", "-q", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    argv, spec = split_child_request(argv, "--peer")
    if spec is not None:
        return _peer_main(spec)
    args = build_parser().parse_args(argv)
    try:
        results = compare(args)
    except SkystackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_results(results)
    s = results["session"]
    out = Path(args.json) if args.json else REPO / "bench" / "results" / results_name(
        results["machine"], f"{s['lights']}x{s['width']}x{s['height']}", prefix="siril-")
    write_json(out, results)
    print(f"results: {out}")
    if args.results_md:
        scene = "" if args.scene == "telescope" else f", {args.scene} night"
        update_results_md(args.results_md, f"Siril comparison{scene}: " + machine_key(results["machine"]),
                          markdown(results))
        print(f"updated {args.results_md}")
    return 0 if all(t.get("ok") for t in results["tools"][:2]) else 1


if __name__ == "__main__":
    sys.exit(main())
