"""Writers: atomic, never overwrite inputs, readable back with the right numbers."""

from __future__ import annotations

import os

import numpy as np
import pytest

from skystack.engine.errors import OutputError
from skystack.engine.output import (
    atomic_path,
    check_outputs,
    fits_rows,
    output_set,
    write_fits,
    write_json,
    write_preview,
    write_tiff,
)


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
        assert h[0].header["ROWORDER"] == "BOTTOM-UP"
        assert np.array_equal(h[0].data[:, ::-1, :], img)  # first stored row = bottom of the picture
        assert np.array_equal(fits_rows(h[0].data, h[0].header), img)


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


def test_preview_png_keeps_every_pixel_at_the_size_of_pillows_default(tmp_path, rng):
    """The preview PNG (zlib's run-length strategy, output.PNG_OPTIONS) decodes to the 8-bit preview's
    pixels exactly, and on a noisy stretched sky with stars and a gradient its file is no larger than
    Pillow's default encoding (+2 %)."""
    import io

    from PIL import Image

    from skystack.engine.stretch import to_8bit

    yy, xx = np.mgrid[0:300, 0:400]
    sky = 0.2 + 0.1 * yy / 300 + rng.normal(0, 0.03, (3, 300, 400))
    sky[:, rng.integers(0, 300, 40), rng.integers(0, 400, 40)] = 1.0
    stretched = np.clip(sky, 0, 1).astype(np.float32)
    p = write_preview(tmp_path / "p.png", stretched)
    want = to_8bit(stretched)
    with Image.open(p) as im:
        np.testing.assert_array_equal(np.asarray(im), want)
    buf = io.BytesIO()
    Image.fromarray(want).save(buf, format="PNG")
    assert p.stat().st_size <= 1.02 * len(buf.getvalue())


@pytest.mark.parametrize("shape", [(37, 23, 3), (64, 1, 3), (1, 50), (45, 17)])
def test_png_bands_join_into_one_stream_that_decodes_to_the_pixels(monkeypatch, rng, shape):
    """png_bytes deflates bands of rows on threads: with bands of a few rows (and of one band), zlib
    checks the joined stream and its Adler-32, and Pillow decodes every pixel and the text chunks
    (Latin-1 as tEXt, other text as iTXt)."""
    import io
    import struct
    import zlib

    from PIL import Image

    from skystack.engine import output

    pixels = rng.integers(0, 256, shape).astype(np.uint8)
    pixels[: shape[0] // 2] = 7  # runs as well as noise
    text = {"Software": "skystack", "Title": "M 94 \u2013 \u00e9t\u00e9 \u2605"}
    for band in (1, 3 * shape[1] * (shape[2] if len(shape) == 3 else 1) + 1, 1 << 20):
        monkeypatch.setattr(output, "PNG_BAND_BYTES", band)
        data = output.png_bytes(pixels, text)
        idat, pos = b"", 8
        while pos < len(data):
            n, kind = struct.unpack(">I4s", data[pos:pos + 8])
            assert zlib.crc32(data[pos + 4:pos + 8 + n]) == struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0]
            idat += data[pos + 8:pos + 8 + n] if kind == b"IDAT" else b""
            pos += 12 + n
        rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(shape[0], -1)
        assert (rows[:, 0] == 0).all()
        np.testing.assert_array_equal(rows[:, 1:], pixels.reshape(shape[0], -1))
        with Image.open(io.BytesIO(data)) as im:
            np.testing.assert_array_equal(np.asarray(im), pixels)
            assert im.text == text


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


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_honour_the_umask(tmp_path, umask):
    """Every writer gives the mode ``open`` would (0666 & ~umask), not mkstemp's 0600."""
    old = os.umask(umask)
    try:
        paths = [write_tiff(tmp_path / "a.tif", np.zeros((4, 4), np.float32)),
                 write_fits(tmp_path / "a.fits", np.zeros((4, 4), np.float32)),
                 write_json(tmp_path / "a.json", {})]
        with output_set():
            paths.append(write_preview(tmp_path / "a.png", np.zeros((4, 4), np.float32)))
        from skystack.tools.dng import write_dng

        write_dng(tmp_path / "a.dng", np.zeros((4, 4), np.uint16), pattern="RGGB", black_level=(0, 0, 0, 0),
                  white_level=4095)
        paths.append(tmp_path / "a.dng")
    finally:
        os.umask(old)
    assert {oct(p.stat().st_mode & 0o777) for p in paths} == {oct(0o666 & ~umask)}


def test_fits_values_are_made_ascii(tmp_path):
    """A session called "Night Ω été 1" ends up in a FITS card: it must not abort the write."""
    from astropy.io import fits

    p = write_fits(tmp_path / "u.fits", np.zeros((4, 4), np.float32),
                   {"OBJECT": ("Night Ω été 1", "target"), "COMMENT": "from Night Ω été 1"})
    with fits.open(p) as h:
        assert h[0].header["OBJECT"] == "Night ? ete 1"
        assert "from Night ? ete 1" in str(h[0].header["COMMENT"])


def test_linear_icc_profile_in_the_tiff(tmp_path):
    """The 32-bit TIFF carries an ICC profile whose tone curve is linear (GIMP: linear light)."""
    import io

    import tifffile
    from PIL import Image, ImageCms

    for img, mode in ((np.zeros((3, 4, 5), np.float32), "RGB"), (np.zeros((4, 5), np.float32), "L")):
        p = write_tiff(tmp_path / f"{mode}.tif", img)
        with tifffile.TiffFile(p) as tf:
            icc = tf.pages[0].tags[34675].value  # InterColorProfile
        prof = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        srgb = ImageCms.createProfile("sRGB")
        if mode == "L":
            continue  # a gray profile: parsed above; the RGB one is checked through a transform
        t = ImageCms.buildTransform(prof, srgb, "RGB", "RGB")
        out = np.asarray(ImageCms.applyTransform(Image.new("RGB", (1, 1), (128, 128, 128)), t))[0, 0]
        # linear 0.502 is sRGB-encoded 0.737 -> 188; a gamma-2.2 (sRGB) source would stay at 128
        assert np.all(np.abs(out.astype(int) - 188) <= 2), out


def test_output_set_replaces_all_or_nothing(tmp_path):
    """A failure before the end of a set leaves the previous files untouched and no temporaries."""
    a, b = tmp_path / "s.tif", tmp_path / "s.json"
    with output_set():
        write_tiff(a, np.ones((4, 4), np.float32))
        write_json(b, {"run": 1})
    with pytest.raises(RuntimeError):
        with output_set():
            write_tiff(a, np.zeros((4, 4), np.float32))
            assert a.stat().st_size > 0 and float(__import__("tifffile").imread(a).mean()) == 1.0
            raise RuntimeError("killed between two writes")
    import tifffile

    assert float(tifffile.imread(a).mean()) == 1.0 and b.read_text().count('"run": 1') == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.tif"]


def test_unwritable_folder_names_the_output_not_the_temp_file(tmp_path, monkeypatch):
    import errno
    import tempfile

    def denied(*_a, **_k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    for call in (lambda: write_json(tmp_path / "r.json", {}),
                 lambda: check_outputs([tmp_path / "r.json"])):
        with pytest.raises(OutputError) as ei:
            call()
        msg = str(ei.value)
        assert str(tmp_path) in msg and "not writable" in msg and ".part" not in msg and "-o" in msg


def test_check_outputs_refuses_clashes_and_a_full_disk(tmp_path, monkeypatch):
    import shutil

    light = tmp_path / "light.fits"
    light.write_bytes(b"x")
    with pytest.raises(OutputError, match="two outputs"):
        check_outputs([tmp_path / "a.png", tmp_path / "b.tif", tmp_path / "." / "a.png"])
    with pytest.raises(OutputError, match="input"):
        check_outputs([tmp_path / "a.tif", light], inputs=[light])
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(OutputError, match="free"):
        check_outputs([tmp_path / "a.tif"], nbytes=50 * 2**20)
    check_outputs([tmp_path / "a.tif"], nbytes=2**10)
    assert light.read_bytes() == b"x" and sorted(p.name for p in tmp_path.iterdir()) == ["light.fits"]
