"""Finding a session's frames: files, folders, globs, DSS/Siril sub-folder names."""

from __future__ import annotations

import pytest

from skystack.engine.errors import InputNotFound
from skystack.engine.session import discover_session, resolve_inputs, split_inputs


def _touch(p, name):
    p.mkdir(parents=True, exist_ok=True)
    f = p / name
    f.write_bytes(b"x")
    return f


def test_discover_case_insensitive_dss_and_siril_names(tmp_path):
    for i in range(3):
        _touch(tmp_path / "Lights", f"L{i}.CR2")
    _touch(tmp_path / "DARKS", "d0.cr2")
    _touch(tmp_path / "Offsets", "b0.fit")  # Siril's name for bias
    _touch(tmp_path / "flats", "f0.fits")
    _touch(tmp_path / "DarkFlats", "df0.fits")
    _touch(tmp_path / "Lights", "notes.txt")
    _touch(tmp_path / "Lights", "._L0.CR2")  # macOS resource fork
    s = discover_session(tmp_path)
    assert s.counts() == {"lights": 3, "darks": 1, "flats": 1, "bias": 1, "dark_flats": 1}
    assert [p.name for p in s.lights] == ["L0.CR2", "L1.CR2", "L2.CR2"]


def test_split_inputs_session_folder_vs_files(tmp_path):
    _touch(tmp_path / "lights", "a.dng")
    assert split_inputs([str(tmp_path)]).counts()["lights"] == 1
    loose = tmp_path / "loose"
    for n in ("b.fit", "a.fit"):
        _touch(loose, n)
    s = split_inputs([str(loose)])
    assert [p.name for p in s.lights] == ["a.fit", "b.fit"]
    s = split_inputs([str(loose / "*.fit"), str(loose / "a.fit")])  # glob + duplicate
    assert [p.name for p in s.lights] == ["a.fit", "b.fit"]


@pytest.mark.parametrize("spec", ["missing_dir", "nothing*.dng"])
def test_missing_inputs_name_the_path(tmp_path, spec):
    with pytest.raises(InputNotFound, match=spec.split("*")[0]):
        resolve_inputs([str(tmp_path / spec)])


def test_empty_folder_and_session_without_lights(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputNotFound, match="no frame files"):
        resolve_inputs([str(tmp_path / "empty")])
    _touch(tmp_path / "s" / "darks", "d.fit")
    with pytest.raises(InputNotFound, match="no light frames"):
        discover_session(tmp_path / "s")
