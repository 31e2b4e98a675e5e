"""Master calibration frames: build and cache (their FITS form: :mod:`skystack.engine.masterfile`).

Units and what each master holds
--------------------------------
Every frame is first converted by :func:`skystack.engine.rawconv.cfa_to_float`
to normalised float32 ``u = (adu - black) / (white - black)`` with its own
black and white levels, so the camera's black level is already gone and a bias
frame is ``u_bias ~ 0`` plus its fixed pattern (and any offset the metadata
does not know about, e.g. FITS files without a black level). Then, per pixel:

* **bias** ``B`` = combine(bias frames).
* **dark-flat** ``DF`` = combine(dark-flat frames) (bias included).
* **dark** ``D`` = combine(dark_i - B) when a master bias is given: the
  *thermal signal only* (FITS ``BIASSUB = T``), so scaling it to another
  exposure scales nothing but the thermal signal. Without a bias ``D`` =
  combine(dark_i) (``BIASSUB = F``) and holds the bias too.
* **flat** ``F``: each flat first loses its offset, ``flat_i - DF`` (else
  ``flat_i - B``, else nothing; FITS ``FLATOFFS``), is scaled to the first
  flat's median (``scale=`` of the combine, so flats of different brightness
  combine), is combined, and the result is divided, *per CFA colour*, by the
  median of that colour's pixels (both greens share one median; mono frames
  use one median, colour frames one per plane). The stored flat therefore has
  median 1 in every colour: dividing a light by it removes vignetting and dust
  without shifting the colour balance, and the two green sites, divided by the
  same number, keep their real response difference corrected. The medians
  before normalisation are kept in ``FLATMEDR/G/B``. Then the flats' own
  pixel noise is shrunk by its Wiener factor (``MasterConfig.flat_shrink``,
  :mod:`skystack.engine.flatnoise`; ``FLATNOIS``/``FLATPRNU``/``FLATRESN``):
  a few flats otherwise print their shot noise into every light at the same
  pixels.

Combining uses :func:`skystack.engine.combine.sigma_clip_mean` (method
``"sigma"``, or ``"mean"`` = no rejection) or ``nanmedian`` (method
``"median"``), in float32, in row bands so memory stays bounded: the raw
frames are held as read (``uint16``: 2 bytes per pixel; spilled to a
temporary memory-mapped file when larger than half the available RAM) and
converted band by band (bands start on even rows, keeping the CFA phase).
Input files are sorted by absolute path first, so the result does not depend on
the order they were given in.

Cache
-----
A master is stored in ``cache_dir`` (default ``$SKYSTACK_CACHE/masters``, else
``$XDG_CACHE_HOME/skystack/masters``, else ``~/.cache/skystack/masters``) as
``master-<kind>-<key>.fits``. The key is the SHA-256 of the kind, each input's
absolute path, size and modification time (ns), the :class:`MasterConfig`
combine settings, the keys of the masters it depends on (bias for a dark; bias
or dark-flat for a flat) and
:data:`~skystack.engine.masterfile.CACHE_VERSION`. A later build with the
same inputs reads the cached FITS back (``Master.from_cache``; nothing is read
or combined, see :data:`STATS`); touching, replacing or editing an input (new
mtime or size), changing a setting or a dependency gives a new key and a
rebuild. Content edited with the same size and mtime is not detected.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from skystack.engine.backend import Backend, get_backend, to_host
from skystack.engine.errors import (
    CalibrationError,
    FrameMismatchError,
    InputNotFound,
    OutputError,
    SkystackError,
)
from skystack.engine.flatnoise import FlatNoiseStats, shrink_flat_noise
from skystack.engine.frame import FrameMeta
from skystack.engine.masterfile import (
    CACHE_VERSION,
    KINDS,
    Master,
    MasterMeta,
    describe,
    file_identity,
    is_master_file,
    read_master,
    write_master,
)

__all__ = [
    "STATS",
    "MasterConfig",
    "MasterStats",
    "build_master",
    "load_or_build_master",
    "master_command",
    "default_cache_dir",
    "normalize_flat",
    "same_camera",
]

_METHODS = ("sigma", "median", "mean")


@dataclass
class MasterStats:
    """Counters of the work :func:`build_master` did in this process.

    Attributes
    ----------
    combined : int
        Masters computed by combining frames.
    frames_read : int
        Calibration frames read from disk.
    cache_hits : int
        Masters read back from the cache instead.
    """

    combined: int = 0
    frames_read: int = 0
    cache_hits: int = 0


#: Process-wide counters (tests assert that a cached build combined nothing).
STATS = MasterStats()


@dataclass(frozen=True, kw_only=True)
class MasterConfig:
    """How masters are combined.

    Attributes
    ----------
    method : {"sigma", "median", "mean"}
        Kappa-sigma clipped mean (default), per-pixel median, or plain mean.
    kappa_low, kappa_high : float
        Clipping thresholds in standard deviations (method ``"sigma"``).
    max_iter : int
        Most clipping rounds.
    band_bytes : int
        Working memory of one combine band (does not change the result).
    flat_shrink : bool
        Flats: shrink the master's pixel-scale noise by its Wiener factor,
        measured from the flat frames (:mod:`skystack.engine.flatnoise`).
        It keeps the sensor's real pixel response and the flat's large
        scales; deep or many flats are left as they are.
    workers : int
        Masters built at once where they do not depend on each other (the
        bias beside the dark-flat, then the dark beside the flat); 1 builds
        them in turn (within a memory limit). Does not change the result.
    """

    method: str = "sigma"
    kappa_low: float = 3.0
    kappa_high: float = 3.0
    max_iter: int = 5
    band_bytes: int = 256 * 2**20
    flat_shrink: bool = True
    workers: int = 2

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise SkystackError(f"unknown master combine method {self.method!r}; choose one of {', '.join(_METHODS)}")
        if self.workers < 1:
            raise SkystackError(f"master workers must be at least 1, got {self.workers}")

    def key_dict(self) -> dict[str, Any]:
        """Settings that change the result (the cache key's part)."""
        return {"method": self.method, "kappa_low": float(self.kappa_low),
                "kappa_high": float(self.kappa_high), "max_iter": int(self.max_iter),
                "flat_shrink": bool(self.flat_shrink)}


# ----------------------------------------------------------------------------- cache key


def default_cache_dir() -> Path:
    """``$SKYSTACK_CACHE/masters``, else ``$XDG_CACHE_HOME/skystack/masters``, else ``~/.cache/skystack/masters``."""
    env = os.environ.get("SKYSTACK_CACHE")
    if env:
        return Path(env) / "masters"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "skystack" / "masters"


def _cache_key(kind: str, paths: Sequence[Path], config: MasterConfig, deps: dict[str, str]) -> str:
    doc = {
        "cache_version": CACHE_VERSION,
        "kind": kind,
        "inputs": [file_identity(p) for p in paths],
        "config": config.key_dict(),
        "deps": deps,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _cache_path(cache_dir: Path, kind: str, key: str) -> Path:
    return cache_dir / f"master-{kind}-{key[:24]}.fits"


# ----------------------------------------------------------------------------- frames


def _resolve_paths(kind: str, paths: Sequence[str | os.PathLike]) -> list[Path]:
    if not paths:
        raise InputNotFound(f"no {kind} frames given; pass at least one file")
    out = []
    for p in paths:
        q = Path(os.fspath(p)).expanduser()
        if not q.is_file():
            raise InputNotFound(f"{kind} frame {q} does not exist; check the path or glob")
        out.append(q.resolve())
    out = sorted(set(out), key=str)
    return out


def _to_float(data: np.ndarray, meta: FrameMeta, out: np.ndarray | None = None) -> np.ndarray:
    """Normalise one frame (or a band of it starting on an even row)."""
    from skystack.engine.rawconv import cfa_to_float

    if data.ndim == 3 and meta.pattern is None and len(set(meta.black_level)) > 1:
        # colour planes: black_level holds R, G, B, G
        res = np.empty(data.shape, dtype=np.float32) if out is None else out
        for c in range(data.shape[0]):
            b = meta.black_level[c]
            cfa_to_float(np.ascontiguousarray(data[c]), pattern=None, black_level=(b, b, b, b),
                         white_level=meta.white_level, out=res[c])
        return res
    return cfa_to_float(np.ascontiguousarray(data), pattern=meta.pattern, black_level=meta.black_level,
                        white_level=meta.white_level, out=out)


def same_camera(a: str | None, b: str | None) -> bool:
    """True when two camera names match (case and spacing ignored) or either is unknown."""
    if not a or not b:
        return True
    return " ".join(a.lower().split()) == " ".join(b.lower().split())


def _check_frames(kind: str, metas: Sequence[FrameMeta]) -> None:
    """All frames of one camera mode; the odd ones out (the minority) are named."""
    from collections import Counter

    def mode(m: FrameMeta) -> tuple:
        return (tuple(m.shape), m.pattern)

    common = Counter(mode(m) for m in metas).most_common(1)[0][0]
    ref = next(m for m in metas if mode(m) == common)
    cameras = Counter(m.camera for m in metas if mode(m) == common and m.camera).most_common(1)
    camera = cameras[0][0] if cameras else None
    odd = [m for m in metas if mode(m) != common or not same_camera(m.camera, camera)]
    if odd:
        names = ", ".join(Path(m.path).name for m in odd[:3]) + (f" and {len(odd) - 3} more" if len(odd) > 3 else "")
        raise FrameMismatchError(
            f"{kind} frame {odd[0].path} is {_desc(odd[0])} but {ref.path} is "
            f"{describe(ref.shape, ref.pattern, camera)}, like most {kind} frames; combine only {kind} frames "
            "of one camera and mode "
            f"(remove {names})"
        )


def _desc(m: FrameMeta) -> str:
    return describe(m.shape, m.pattern, m.camera)


def _check_dep(kind: str, dep: Master | None, ref: FrameMeta) -> None:
    if dep is None:
        return
    dm = dep.meta
    if tuple(dm.shape) != tuple(ref.shape) or dm.pattern != ref.pattern or not same_camera(dm.camera, ref.camera):
        where = dm.path or f"built from {dm.count} frames"
        raise CalibrationError(
            f"master {dm.kind} ({where}) is {dm.describe()} but the {kind} frames ({ref.path}) are {_desc(ref)}; "
            f"use a master {dm.kind} from the same camera and mode"
        )


def _median(values: list[float | None]) -> float | None:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    return float(np.median(v)) if v else None


def _mean(values: list[float | None]) -> float | None:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    return float(np.mean(v)) if v else None


class _Cube:
    """Raw frames held as read (``(N, H, W)`` or ``(N, C, H, W)``), RAM or memmap."""

    def __init__(self, first: np.ndarray, n: int, spill_dir: Path | None) -> None:
        shape = (n,) + tuple(first.shape)
        nbytes = int(np.prod(shape)) * first.dtype.itemsize
        self._tmp: Path | None = None
        self._lock: int | None = None
        if nbytes > _host_budget():
            from skystack.engine.output import live_dir

            if spill_dir is not None:
                spill_dir.mkdir(parents=True, exist_ok=True)
            self._tmp, self._lock = live_dir("skystack-master-", spill_dir)  # a killed run's is removed
            self.arr = np.lib.format.open_memmap(self._tmp / "cube.npy", mode="w+",
                                                 dtype=first.dtype, shape=shape)
        else:
            self.arr = np.empty(shape, dtype=first.dtype)

    def close(self) -> None:
        self.arr = None  # type: ignore[assignment]
        if self._tmp is not None:
            import shutil

            shutil.rmtree(self._tmp, ignore_errors=True)
            os.close(self._lock)
            self._tmp = self._lock = None


def _host_budget() -> int:
    import psutil

    return int(psutil.virtual_memory().available * 0.5)


def _read_all(kind: str, paths: Sequence[Path], spill_dir: Path | None
              ) -> tuple[_Cube, list[FrameMeta], list[str]]:
    """Read the frames into a cube; unreadable or empty ones are left out with a reason.

    Returns the cube (its first ``len(metas)`` entries hold data), the metadata
    of the frames read, and ``"name: reason"`` for each one left out.
    """
    from skystack.engine.io import read_frame

    metas: list[FrameMeta] = []
    seen: list[FrameMeta] = []  # every readable frame: one camera mode is checked over all of them
    skipped: list[str] = []
    cube: _Cube | None = None
    for p in paths:
        try:
            fr = read_frame(p)
        except SkystackError as exc:
            skipped.append(f"{Path(p).name}: {exc}")
            continue
        STATS.frames_read += 1
        seen.append(fr.meta)
        lo, hi = np.nanmin(fr.data), np.nanmax(fr.data)
        if kind == "flat" and not lo < hi:  # a flat that recorded nothing (all zero, or saturated)
            skipped.append(f"{Path(p).name}: every pixel is {lo:g}, an empty {kind} frame")
            continue
        if cube is None:
            cube = _Cube(fr.data, len(paths), spill_dir)
        if fr.data.shape == cube.arr.shape[1:] and fr.data.dtype != cube.arr.dtype:
            raise FrameMismatchError(
                f"{kind} frame {p} holds {fr.data.dtype} data but {metas[0].path} holds {cube.arr.dtype}; "
                f"combine only {kind} frames of one camera and format"
            )
        metas.append(fr.meta)
        if fr.data.shape == cube.arr.shape[1:]:
            cube.arr[len(metas) - 1] = fr.data
    if seen:
        _check_frames(kind, seen)
    if cube is None:
        raise CalibrationError(f"no usable {kind} frame: " + "; ".join(skipped[:3])
                               + "; replace these files or leave the " + kind + " frames out")
    if skipped:
        warnings.warn(f"{len(skipped)} {kind} frame(s) skipped: " + "; ".join(skipped), RuntimeWarning,
                      stacklevel=3)
    return cube, metas, skipped


def _bands(h: int, row_bytes: int, budget: int) -> list[tuple[int, int]]:
    rows = max(2, int(budget // max(1, row_bytes)))
    rows -= rows % 2
    return [(r, min(h, r + rows)) for r in range(0, h, rows)]


def _combine_band(stack, config: MasterConfig, scale=None):
    """Combine an ``(N, h, W)`` float32 band on its backend; returns a host array."""
    from skystack.engine.backend import array_module
    from skystack.engine.combine import sigma_clip_mean

    xp = array_module(stack)
    band_shape = tuple(stack.shape[1:])
    stack = stack.reshape((stack.shape[0], -1, stack.shape[-1]))  # colour planes: (N, C*h, W)
    if config.method == "median":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if scale is not None:
                stack = stack * xp.asarray(np.asarray(scale, dtype=np.float32))[:, None, None]
            out = xp.nanmedian(stack, axis=0)
    else:
        max_iter = config.max_iter if config.method == "sigma" else 0
        out = sigma_clip_mean(stack, kappa_low=config.kappa_low, kappa_high=config.kappa_high,
                              max_iter=max_iter, scale=scale).mean
    return to_host(out).astype(np.float32, copy=False).reshape(band_shape)


def _colour_sets(pattern: str | None, shape: tuple[int, ...]) -> list[tuple[str, Any]]:
    """(label, index) per colour for flat normalisation."""
    if len(shape) == 3:
        return [(lbl, (c,)) for c, lbl in zip(range(shape[0]), "RGB")]
    if pattern is None:
        return [("L", np.ones(shape, dtype=bool))]
    from skystack.engine.debayer import cfa_colour_map

    cm = cfa_colour_map(pattern, shape)
    return [(lbl, cm == c) for c, lbl in enumerate("RGB")]


def _positive_median(values: np.ndarray, complaint: Callable[[float], str]) -> float:
    """Median of the finite ``values``; a :class:`CalibrationError` saying ``complaint(median)``
    when there are none or it is not positive (an empty or under-exposed flat)."""
    finite = values[np.isfinite(values)]
    med = float(np.median(finite)) if finite.size else math.nan
    if not (math.isfinite(med) and med > 0):
        raise CalibrationError(complaint.format(med=med))
    return med


def normalize_flat(flat: np.ndarray, pattern: str | None) -> tuple[np.ndarray, tuple[float, ...]]:
    """Divide a flat by the median of each CFA colour (see the module docstring).

    Returns
    -------
    (ndarray, tuple of float)
        float32 flat with median 1 per colour, and the medians (R, G, B; or one for mono).

    Raises
    ------
    CalibrationError
        When a colour's median is not positive (an empty or inverted flat).
    """
    out = np.array(flat, dtype=np.float32, copy=True)
    meds = []
    for label, idx in _colour_sets(pattern, out.shape):
        med = _positive_median(out[idx], lambda med: (
            f"master flat: the median of the {label} pixels is {med:g} after removing the offset; "
            "the flats are empty or under-exposed (or the dark-flats/bias are brighter than them)"))
        out[idx] = out[idx] / np.float32(med)
        meds.append(med)
    return out, tuple(meds)


# ----------------------------------------------------------------------------- build


def build_master(kind: str, paths: Sequence[str | os.PathLike], *, config: MasterConfig = MasterConfig(),
                 bias: Master | None = None, dark_flat: Master | None = None,
                 cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                 backend: Backend | None = None) -> Master:
    """Combine calibration frames into a master (or read it from the cache).

    Parameters
    ----------
    kind : {"bias", "dark", "flat", "dark-flat"}
        Master kind.
    paths : sequence of path
        Input frames (sorted by absolute path before combining).
    config : MasterConfig
        Combine settings.
    bias : Master, optional
        Master bias: subtracted from darks (thermal master) and, without a
        dark-flat, from flats.
    dark_flat : Master, optional
        Master dark-flat, subtracted from flats.
    cache_dir : path, optional
        Cache folder (default :func:`default_cache_dir`).
    use_cache : bool
        Read and write the cache.
    backend : Backend, optional
        Where the combine runs (default :func:`get_backend` ``"auto"``, quiet).

    Returns
    -------
    Master
        Host float32 data; ``from_cache`` says whether it was combined.

    Raises
    ------
    InputNotFound
        A path does not exist or no path was given.
    FrameMismatchError
        The frames differ in size, pattern, camera or data type (names the odd file).
    CalibrationError
        ``bias``/``dark_flat`` do not match the frames, or an empty flat.
    """
    if kind not in KINDS:
        raise SkystackError(f"unknown master kind {kind!r}; choose one of {', '.join(KINDS)}")
    files = _resolve_paths(kind, paths)
    if kind != "dark":
        bias_for = bias if kind == "flat" and dark_flat is None else None
    else:
        bias_for = bias
    flat_dep = dark_flat if kind == "flat" else None
    deps: dict[str, str] = {}
    if bias_for is not None:
        deps["bias"] = bias_for.meta.key
    if flat_dep is not None:
        deps["dark-flat"] = flat_dep.meta.key
    key = _cache_key(kind, files, config, deps)
    cdir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cpath = _cache_path(cdir, kind, key)
    if use_cache:
        from skystack.engine.output import remove_stale_partials

        remove_stale_partials(cdir)  # a killed run's half-written masters
    if use_cache and cpath.is_file():
        try:
            m = read_master(cpath)
        except SkystackError:
            m = None
        if m is not None and m.meta.key == key:
            STATS.cache_hits += 1
            return dataclasses.replace(m, from_cache=True)

    backend = backend or get_backend(None, quiet=True)
    master = _combine_files(kind, files, config=config, bias=bias_for, dark_flat=flat_dep, key=key,
                            backend=backend, spill_dir=cdir if use_cache else None)
    if use_cache:
        try:
            cdir.mkdir(parents=True, exist_ok=True)
            master = write_master(master, cpath)
        except (OSError, OutputError) as exc:
            warnings.warn(f"could not cache master {kind} in {cdir}: {exc}", RuntimeWarning, stacklevel=2)
    return master


def _combine_files(kind: str, files: Sequence[Path], *, config: MasterConfig, bias: Master | None,
                   dark_flat: Master | None, key: str, backend: Backend, spill_dir: Path | None) -> Master:
    cube, metas, skipped = _read_all(kind, files, spill_dir)
    try:
        ref = metas[0]
        _check_dep(kind, bias, ref)
        _check_dep(kind, dark_flat, ref)
        offset = dark_flat if dark_flat is not None else bias
        off = None if offset is None else np.asarray(to_host(offset.data), dtype=np.float32)
        n = len(metas)
        shape = tuple(ref.shape)
        h = shape[-2]
        row_px = int(np.prod(shape)) // h
        scale = None
        if kind == "flat":
            scale = _flat_scales(cube.arr, metas, off)
        band_budget = max(1, config.band_bytes)
        bands = _bands(h, row_px * n * 4 * 3, band_budget)  # float32 cube + clipping temporaries
        out = np.empty(shape, dtype=np.float32)
        xp = backend.xp
        fstats = FlatNoiseStats(shape=shape, cfa=ref.pattern is not None and len(shape) == 2, n=n) \
            if kind == "flat" and config.flat_shrink else None
        for r0, r1 in bands:
            sl = (Ellipsis, slice(r0, r1), slice(None))
            stack = xp.empty((n,) + out[sl].shape, dtype=xp.float32)
            for i in range(n):
                raw_band = cube.arr[i][sl]
                if backend.is_gpu:
                    stack[i] = _to_float_dev(backend.asarray(np.ascontiguousarray(raw_band)), metas[i])
                else:
                    _to_float(raw_band, metas[i], out=stack[i])
            if off is not None:
                stack -= backend.asarray(np.ascontiguousarray(off[sl]))[None]
            out[sl] = _combine_band(stack, config, scale=scale)
            if fstats is not None:
                fstats.add_band(stack, scale=scale)
            del stack
    finally:
        cube.close()
    STATS.combined += 1
    medians = shrink = None
    if kind == "flat":
        out, medians = normalize_flat(out, ref.pattern)
        if fstats is not None:
            out, shrink = shrink_flat_noise(out, fstats)
            if shrink is not None:
                out, _ = normalize_flat(out, ref.pattern)  # shrinking moves the medians by ~1e-4
    meta = MasterMeta(
        kind=kind, count=n, shape=shape, pattern=ref.pattern, camera=ref.camera,
        exposure_s=_median([m.exposure_s for m in metas]), iso=_median([m.iso for m in metas]),
        gain=_median([m.gain for m in metas]), temperature_c=_mean([m.temperature_c for m in metas]),
        method=config.method, kappa_low=float(config.kappa_low), kappa_high=float(config.kappa_high),
        max_iter=int(config.max_iter), black_level=tuple(float(b) for b in ref.black_level),
        white_level=float(ref.white_level), bias_subtracted=(kind == "dark" and bias is not None),
        flat_offset=("none" if kind != "flat" else
                     ("dark-flat" if dark_flat is not None else ("bias" if bias is not None else "none"))),
        flat_medians=medians, flat_noise=None if shrink is None else shrink.rms(),
        sources=tuple(m.path for m in metas), key=key, path=None,
        created=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"), skipped=tuple(skipped),
    )
    return Master(data=out, meta=meta, from_cache=False)


def _to_float_dev(raw_dev, meta: FrameMeta):
    from skystack.engine.rawconv import cfa_to_float

    if raw_dev.ndim == 3 and meta.pattern is None and len(set(meta.black_level)) > 1:
        import cupy

        res = cupy.empty(raw_dev.shape, dtype=cupy.float32)
        for c in range(raw_dev.shape[0]):
            b = meta.black_level[c]
            res[c] = cfa_to_float(cupy.ascontiguousarray(raw_dev[c]), pattern=None, black_level=(b, b, b, b),
                                  white_level=meta.white_level)
        return res
    return cfa_to_float(raw_dev, pattern=meta.pattern, black_level=meta.black_level, white_level=meta.white_level)


def _flat_scales(raw: np.ndarray, metas: Sequence[FrameMeta], off: np.ndarray | None) -> np.ndarray:
    """Per-flat multiplier bringing each flat's median to the first one's."""
    meds = []
    for i, m in enumerate(metas):
        f = _to_float(raw[i], m)
        if off is not None:
            f = f - off
        meds.append(_positive_median(f[..., ::3, ::3], lambda med: (
            f"flat {m.path} has median {med:g} after removing the offset; "
            "it is empty or under-exposed (or the bias/dark-flat is brighter): remove it or reshoot")))
    meds_a = np.asarray(meds, dtype=np.float64)
    return (meds_a[0] / meds_a).astype(np.float32)


def load_or_build_master(kind: str, inputs: str | os.PathLike | Sequence[str | os.PathLike], *,
                         config: MasterConfig = MasterConfig(), bias: Master | None = None,
                         dark_flat: Master | None = None, cache_dir: str | os.PathLike | None = None,
                         use_cache: bool = True, backend: Backend | None = None) -> Master:
    """A master from a skystack master FITS, or built from calibration frames.

    ``inputs`` is one path or a list; a single file written by
    :func:`~skystack.engine.masterfile.write_master` is read back (its kind must be ``kind``), anything else
    is combined with :func:`build_master`.
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if len(items) == 1 and is_master_file(items[0]):
        m = read_master(items[0])
        if m.kind != kind:
            raise CalibrationError(f"{items[0]} is a master {m.kind}, not a master {kind}; pass it as --{m.kind}")
        return m
    return build_master(kind, items, config=config, bias=bias, dark_flat=dark_flat, cache_dir=cache_dir,
                        use_cache=use_cache, backend=backend)


def master_command(kind: str, files: Sequence[str | os.PathLike], output: str | os.PathLike, *,
                   config: MasterConfig = MasterConfig(), bias: str | os.PathLike | Master | None = None,
                   dark_flat: str | os.PathLike | Master | None = None,
                   cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                   backend: Backend | None = None) -> Master:
    """``skystack master KIND FILES... -o OUTPUT``: build a master and write it.

    Parameters
    ----------
    files : sequence of path
        Calibration frames.
    output : path
        FITS file to write (atomically; never one of ``files``).
    bias, dark_flat : path or Master, optional
        Master bias (for a thermal dark, or a flat without dark-flat) and master
        dark-flat (for a flat): a skystack master FITS or frame files' master.
    kind, config, cache_dir, use_cache, backend :
        As :func:`build_master`.

    Returns
    -------
    Master
        The master, ``meta.path`` = ``output``.
    """
    out = Path(os.fspath(output)).expanduser()
    for f in files:
        fp = Path(os.fspath(f)).expanduser()
        if out.exists() and fp.exists() and os.path.samefile(out, fp):
            raise OutputError(f"-o {out} is one of the input frames; choose another output path")

    def dep(v, k):
        if v is None or isinstance(v, Master):
            return v
        return load_or_build_master(k, v, config=config, cache_dir=cache_dir, use_cache=use_cache, backend=backend)

    m = build_master(kind, files, config=config, bias=dep(bias, "bias"), dark_flat=dep(dark_flat, "dark-flat"),
                     cache_dir=cache_dir, use_cache=use_cache, backend=backend)
    return write_master(m, out)
