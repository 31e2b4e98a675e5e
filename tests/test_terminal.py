"""Terminal and API: progress for every stage, paths on stdout and the rest on stderr,
help texts with defaults, ``info`` on folders and globs, a hint for a folder of sessions."""

from __future__ import annotations

import re

import pytest

from skystack import cli

from sessions import write_small_session


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return write_small_session(tmp_path_factory.mktemp("term") / "s", file_format="fits")


def test_progress_covers_every_stage_in_a_terminal(small, tmp_path, capsys, monkeypatch):
    """A bar per stage (calibrate, register, warp + normalize, combine), each run to its end, on stderr.

    The normalisation statistics are measured as each frame is warped, so they share its bar."""
    import rich.console

    monkeypatch.setattr(rich.console.Console, "is_terminal", property(lambda self: True))
    out = tmp_path / "m.tif"
    assert cli.main(["--backend", "cpu", "stack", str(small), "-o", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    cap = capsys.readouterr()
    err = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", cap.err)
    for stage in ("calibrate", "register", r"warp \+ normalize"):
        assert re.search(rf"{stage}\s.*\b6/6\b", err), stage
    assert re.search(r"combine\s.*\b(\d+)/\1\b", err)
    assert "calibrate" not in cap.out and "register" not in cap.out


def test_progress_is_silent_when_piped_or_quiet(small, tmp_path, capsys):
    from skystack.engine.stack import _Progress

    assert not _Progress(False).enabled  # stderr is not a terminal under pytest
    assert not _Progress(True).enabled
    assert cli.main(["--backend", "cpu", "stack", str(small), "-o", str(tmp_path / "m.tif"), "-q",
                     "--cache-dir", str(tmp_path / "c")]) == 0
    cap = capsys.readouterr()
    assert cap.err == ""  # quiet: nothing but errors and warnings
    assert [ln.split(": ")[0] for ln in cap.out.splitlines()] == ["tiff", "fits", "preview", "report", "html"]


def test_help_shows_what_the_core_options_do_and_their_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["stack", "--help"])
    text = capsys.readouterr().out
    entries: dict[str, str] = {}  # option -> its help text, from the option listing (not the usage line)
    for block in re.split(r"\n(?=  -)", text.split("\nstacking:", 1)[1]):
        m = re.match(r"\s+(--[a-z-]+)", block)
        if m:
            entries[m.group(1)] = " ".join(block.split())
    for option, default in (("--rejection", "auto"), ("--normalization", "additive+scale"),
                            ("--weighting", "noise"), ("--debayer", "rcd"), ("--interpolation", "lanczos3"),
                            ("--transform-model", "auto"), ("--framing", "reference"), ("--foreground", "auto"), ("--min-stars", "15"), ("--store-dtype", "float16"),
                            ("--keep-best", "all usable frames"), ("--memory-limit", "half the free memory")):
        assert f"(default: {default})" in entries[option], (option, entries.get(option))


def test_info_accepts_folders_and_globs(small, capsys):
    import json

    lights = sorted((small / "lights").iterdir())
    assert cli.main(["info", str(small / "lights"), "--json"]) == 0
    by_folder = [d["path"] for d in json.loads(capsys.readouterr().out)]
    assert by_folder == [str(p) for p in lights]
    assert cli.main(["info", str(small / "lights" / "light_000[0-2].fits"), "--json"]) == 0
    assert [d["path"] for d in json.loads(capsys.readouterr().out)] == [str(p) for p in lights[:3]]


def test_a_folder_of_sessions_gets_a_hint(small, tmp_path, capsys):
    import shutil

    arch = tmp_path / "archive"
    for name in ("night1", "night2"):
        shutil.copytree(small, arch / name)
    assert cli.main(["--backend", "cpu", "stack", str(arch), "-o", str(tmp_path / "m.tif"), "-q"]) == 2
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "session folders" in line[0] and "night1" in line[0] and "skystack batch" in line[0]


def test_master_and_finish_print_their_paths_on_stdout(small, tmp_path, capsys):
    from pathlib import Path

    frames = sorted(str(p) for p in (small / "lights").iterdir())[:3]
    out = tmp_path / "mb.fits"
    assert cli.main(["master", "bias", *frames, "-o", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    cap = capsys.readouterr()
    assert cap.out.strip() == f"master bias: {out}" and str(out) not in cap.err
    assert cli.main(["--backend", "cpu", "stack", str(small), "-o", str(tmp_path / "m.tif"), "-q",
                     "--cache-dir", str(tmp_path / "c")]) == 0
    capsys.readouterr()
    pic = tmp_path / "pic.jpg"
    assert cli.main(["finish", str(tmp_path / "m.tif"), "-o", str(pic), "-q"]) == 0
    cap = capsys.readouterr()
    paths = dict(ln.split(": ", 1) for ln in cap.out.strip().splitlines())
    assert paths["picture"] == str(pic) and Path(paths["picture"]).is_file() and str(pic) not in cap.err
