"""Writers: atomic, never overwrite inputs, readable back with the right numbers."""

from __future__ import annotations

import os

import numpy as np
import pytest

from skystack.engine.errors import OutputError
from skystack.engine.output import atomic_path, write_fits, write_json, write_preview, write_tiff


def test_tiff_float32_rgb_round_trip(tmp_path, rng):
    import tifffile

    img = rng.random((3, 20, 30)).astype(np.float32)
    p = write_tiff(tmp_path / "out.tif", img)
    back = tifffile.imread(p)
    assert back.dtype == np.float32 and back.shape == (20, 30, 3)
    assert np.array_equal(np.moveaxis(back, -1, 0), img)
    assert not [q for q in tmp_path.iterdir() if q.name.endswith(".part")]


def test_fits_headers(tmp_path, rng):
    from astropy.io import fits

    img = rng.random((3, 8, 9)).astype(np.float32)
    p = write_fits(tmp_path / "out.fits", img, {"NCOMBINE": 12, "EXPTIME": (240.0, "total s")})
    with fits.open(p) as h:
        assert h[0].header["NCOMBINE"] == 12
        assert h[0].header["EXPTIME"] == 240.0
        assert np.array_equal(h[0].data, img)


def test_refuses_to_overwrite_an_input(tmp_path):
    src = tmp_path / "light.tif"
    src.write_bytes(b"original")
    with pytest.raises(OutputError, match="input"):
        write_tiff(src, np.zeros((4, 4), np.float32), inputs=[src])
    assert src.read_bytes() == b"original"


def test_failed_write_leaves_no_partial_file(tmp_path):
    final = tmp_path / "x.json"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_preview_png_and_jpeg(tmp_path):
    from PIL import Image

    a = np.zeros((3, 10, 12), np.float32)
    a[1] = 0.5
    for name in ("p.png", "p.jpg"):
        p = write_preview(tmp_path / name, a)
        with Image.open(p) as im:
            arr = np.asarray(im)
        assert arr.shape == (10, 12, 3)
        assert abs(int(arr[..., 1].mean()) - 128) <= 2


def test_json_numpy_values(tmp_path):
    import json

    p = write_json(tmp_path / "r.json", {"a": np.float32(1.5), "m": np.eye(3)})
    d = json.loads(p.read_text())
    assert d["a"] == 1.5 and d["m"][1][1] == 1.0


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_folder(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    with pytest.raises(OutputError):
        write_json(d / "r.json", {})
