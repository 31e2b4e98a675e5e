"""A synthetic session on disk: :func:`simulate` writes the frames (DNG or FITS) and
``truth.json``/``truth.npz``; :func:`load_truth` reads the truth back and checks that it reproduces."""

from __future__ import annotations

import io
import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from skystack.engine.errors import OutputError, SkystackError
from skystack.tools.synth.config import SynthConfig
from skystack.tools.synth.records import FOLDERS, FRAME_KINDS, STEMS
from skystack.tools.synth.truth import TRUTH_VERSION, SynthTruth

_IMAGETYP = {"light": "LIGHT", "bias": "BIAS", "dark": "DARK", "flat": "FLAT", "dark_flat": "DARKFLAT"}


def load_truth(path: str | os.PathLike) -> SynthTruth:
    """Load the truth of a session written by :func:`simulate`.

    Parameters
    ----------
    path : str or PathLike
        ``truth.json`` or the session folder holding it.

    Raises
    ------
    SkystackError
        When the file is missing, not a skystack truth file, or was written by
        a simulator whose output this version cannot reproduce.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "truth.json"
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise SkystackError(f"{p}: no truth.json; point at a folder written by 'skystack synth'") from None
    except (OSError, ValueError) as exc:
        raise SkystackError(f"{p}: cannot read truth ({exc}); regenerate it with 'skystack synth'") from None
    if d.get("skystack_synth_truth") != TRUTH_VERSION:
        raise SkystackError(f"{p}: not a skystack synth truth file (version {TRUTH_VERSION}); regenerate it")
    truth = SynthTruth(SynthConfig.from_dict(d["config"]), root=p.parent)
    npz = p.parent / d.get("arrays", "truth.npz")
    try:
        with np.load(npz) as z:
            same = (np.array_equal(z["stars_xy"], truth.stars.xy) and np.array_equal(z["stars_flux"], truth.stars.flux)
                    and np.array_equal(z["hot_pixels_yx"], truth.hot_pixels)
                    and np.allclose(z["transforms"], truth.transforms(), rtol=0, atol=1e-12))
    except (OSError, KeyError, ValueError) as exc:
        raise SkystackError(f"{npz}: cannot read truth arrays ({exc}); regenerate the session") from None
    if not same:
        raise SkystackError(f"{p}: written by a different simulator version (truth does not reproduce); "
                            "regenerate the session with 'skystack synth'")
    return truth


def _atomic_bytes(path: Path, data: bytes) -> None:
    from skystack.engine.output import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Deterministic .npz (fixed zip timestamps)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            b = io.BytesIO()
            np.lib.format.write_array(b, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            zf.writestr(info, b.getvalue())
    return buf.getvalue()


def _write_fits(path: Path, data: np.ndarray, truth: SynthTruth, kind: str, rec: Any) -> None:
    from astropy.io import fits

    c = truth.config
    hdu = fits.PrimaryHDU(data)
    hd = hdu.header
    hd["BAYERPAT"] = (c.pattern, "Bayer pattern, top-left 2x2 tile")
    hd["ROWORDER"] = ("TOP-DOWN", "first row is the top")
    hd["XBAYROFF"] = (0, "Bayer X offset")
    hd["YBAYROFF"] = (0, "Bayer Y offset")
    hd["EXPTIME"] = (float(rec.exposure_s), "[s] exposure time")
    hd["EXPOSURE"] = (float(rec.exposure_s), "[s] exposure time")
    hd["ISOSPEED"] = (int(c.iso), "ISO speed")
    hd["GAIN"] = (int(c.iso), "camera gain setting (= ISO here)")
    hd["EGAIN"] = (float(c.gain_e_per_adu), "[e-/ADU] electrons per ADU")
    hd["CCD-TEMP"] = (round(float(rec.temperature_c), 3), "[C] sensor temperature")
    hd["DATE-OBS"] = (rec.time_start.replace("Z", ""), "UTC start of exposure")
    hd["IMAGETYP"] = (_IMAGETYP[kind], "frame type")
    hd["INSTRUME"] = (f"{c.make} {c.model}", "camera")
    hd["FOCALLEN"] = (float(c.focal_length_mm), "[mm] focal length")
    hd["FOCRATIO"] = (float(c.f_number), "f-number")
    hd["XPIXSZ"] = (float(c.pixel_pitch_um), "[um] pixel size")
    hd["YPIXSZ"] = (float(c.pixel_pitch_um), "[um] pixel size")
    hd["BLKLEVEL"] = (float(np.mean(c.black_level)), "[ADU] mean black level")
    hd["DATAMAX"] = (int(c.white_level), "[ADU] white level")
    hd["OBJECT"] = ("synthetic", "skystack synth")
    from skystack.engine.output import atomic_path

    with atomic_path(path) as tmp:
        hdu.writeto(tmp, overwrite=True, output_verify="exception")


def _write_frame(truth: SynthTruth, kind: str, index: int, root: Path) -> np.ndarray:
    from skystack.tools.dng import write_dng

    c = truth.config
    rec = truth.frames(kind)[index]
    data = truth.render_frame(kind, index)
    path = root / rec.file
    if c.file_format == "dng":
        resp = np.asarray(c.channel_response, dtype=np.float64)
        write_dng(
            path, data, pattern=c.pattern, black_level=c.black_level, white_level=c.white_level,
            as_shot_neutral=tuple(resp / resp[1]),
            exif={"exposure_s": rec.exposure_s, "iso": c.iso, "focal_length_mm": c.focal_length_mm,
                  "f_number": c.f_number, "timestamp": rec.time_start, "make": c.make, "model": c.model,
                  "temperature_c": rec.temperature_c},
        )
    else:
        _write_fits(path, data, truth, kind, rec)
    return data


def _frame_list(truth: SynthTruth) -> list[tuple[str, int]]:
    return [(k, i) for k in FRAME_KINDS for i in range(len(truth.frames(k)))]


def simulate(config: SynthConfig, outdir: str | os.PathLike, *, progress: bool = False) -> Path:
    """Write a synthetic session and its truth; return the path of ``truth.json``.

    Layout: ``outdir/lights/``, ``bias/``, ``darks/``, ``flats/``,
    ``darkflats/`` (``<kind>_NNNN.dng`` or ``.fits``), ``truth.json`` and
    ``truth.npz`` (star list, defect lists, transforms). Byte-identical
    output for the same config. An existing folder is only reused when it is
    empty or holds a previous synthetic session (its frames are replaced).

    Parameters
    ----------
    config : SynthConfig
    outdir : str or PathLike
    progress : bool
        Show a rich progress bar (only when stderr is a terminal).
    """
    truth = SynthTruth(config)
    root = Path(outdir)
    if root.exists() and not root.is_dir():
        raise OutputError(f"{root}: exists and is not a folder; choose another output folder")
    if root.is_dir() and any(root.iterdir()) and not (root / "truth.json").is_file():
        raise OutputError(f"{root}: folder is not empty and is not a synthetic session; choose an empty folder")
    try:
        for kind in FRAME_KINDS:
            (root / FOLDERS[kind]).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{root}: cannot create the session folders ({exc.strerror or exc})") from exc
    truth.root = root
    # remove stale frames of a previous session that this one does not write
    keep = {(root / r.file).resolve() for k in FRAME_KINDS for r in truth.frames(k)}
    for kind in FRAME_KINDS:
        for p in (root / FOLDERS[kind]).glob(f"{STEMS[kind]}_*.*"):
            if p.suffix in (".dng", ".fits") and p.resolve() not in keep:
                p.unlink()
    frames = _frame_list(truth)
    use_bar = progress and sys.stderr.isatty()
    if use_bar:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task("synthesising", total=len(frames))
            for kind, i in frames:
                _write_frame(truth, kind, i, root)
                bar.advance(task)
    else:
        for kind, i in frames:
            _write_frame(truth, kind, i, root)
    try:
        _atomic_bytes(root / "truth.npz", _npz_bytes(truth._arrays()))
        _atomic_bytes(root / "truth.json", (json.dumps(truth.to_json(), indent=1) + "\n").encode())
    except OSError as exc:
        raise OutputError(f"{root}: cannot write truth files ({exc.strerror or exc})") from exc
    return root / "truth.json"
