"""The command line: user errors are one red line and exit 2; master and stack write what they say."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from skystack import cli
from skystack.tools.synth import SynthConfig, load_truth, simulate

from sessions import write_small_session


@pytest.fixture(scope="module")
def small_session(tmp_path_factory):
    return write_small_session(tmp_path_factory.mktemp("cli") / "s", bias=4)


@pytest.mark.parametrize("argv,needle", [
    (["--backend", "cpu", "stack", "/nonexistent/lights"], "no such file or folder"),
    (["--backend", "cpu", "stack", "{empty}"], "no frame files"),
    (["info", "/nonexistent/x.dng"], "x.dng"),
    (["plan"], "focal length"),
    (["--backend", "gpu", "stack", "{empty}"], "GPU unavailable"),
])
def test_user_errors_are_one_line_exit_2(tmp_path, capsys, argv, needle):
    from skystack.engine.backend import _gpu_cached

    if "gpu" in argv and _gpu_cached()[0] is not None:
        pytest.skip("a GPU is present")
    (tmp_path / "empty").mkdir()
    argv = [a.replace("{empty}", str(tmp_path / "empty")) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0]


def test_master_honours_backend_gpu_without_device(small_session, tmp_path, capsys):
    """``--backend gpu master`` with no usable GPU is the one-line error, not a silent CPU run."""
    from skystack.engine.backend import _gpu_cached

    if _gpu_cached()[0] is not None:
        pytest.skip("a GPU (or the simulated device) is present")
    out = tmp_path / "bias.fits"
    files = sorted(str(p) for p in (small_session / "bias").iterdir())
    assert cli.main(["--backend", "gpu", "master", "bias", *files, "-o", str(out),
                     "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "GPU unavailable" in err[0] and not out.exists()


def test_master_bias_matches_truth(small_session, tmp_path):
    from astropy.io import fits

    truth = load_truth(small_session / "truth.json")
    out = tmp_path / "bias.fits"
    files = sorted(str(p) for p in (small_session / "bias").iterdir())
    assert cli.main(["master", "bias", *files, "-o", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    with fits.open(out) as h:
        assert h[0].header["NCOMBINE"] == 4
        data = h[0].data.astype(np.float64)
    cfg = truth.config
    # normalised units: (adu - black) / (white - black); the truth pattern holds the black level
    black = np.asarray(cfg.black_level).reshape(2, 2)
    black_map = np.tile(black, (cfg.height // 2, cfg.width // 2))
    want = (truth.bias_pattern() - black_map) / (cfg.white_level - black_map)
    noise = cfg.read_noise_e / cfg.gain_e_per_adu / (cfg.white_level - black_map.mean()) / 2.0  # / sqrt(4)
    assert np.sqrt(np.mean((data - want) ** 2)) < 1.5 * noise


def test_master_flat_shrinks_its_noise_unless_asked_not_to(tmp_path, capsys):
    """The CLI flat is closer to the truth's flat by default; ``--no-shrink`` writes the plain combine."""
    from astropy.io import fits

    root = tmp_path / "s"
    simulate(SynthConfig(seed=6, width=320, height=240, n_lights=1, n_bias=0, n_darks=0, n_flats=6,
                         n_dark_flats=0, trail_frames=None, cloudy_frame=None, shake_frame=None), root)
    truth = load_truth(root / "truth.json")
    files = sorted(str(p) for p in (root / "flats").iterdir())
    ff = truth.flat_field().astype(np.float64)
    col = truth.channel_index()
    err = {}
    for flag in ([], ["--no-shrink"]):
        out = tmp_path / f"flat{len(flag)}.fits"
        assert cli.main(["master", "flat", *files, "-o", str(out), "--cache-dir", str(tmp_path / "c"), *flag]) == 0
        with fits.open(out) as h:
            data, hdr = h[0].data.astype(np.float64), h[0].header
        assert ("FLATNOIS" in hdr) == (not flag)
        r = data / ff
        err[bool(flag)] = np.sqrt(np.mean([np.var(r[col == c] / np.median(r[col == c])) for c in range(3)]))
    assert err[False] < 0.9 * err[True], err
    assert "flat pixel noise" in capsys.readouterr().err


def test_stack_writes_all_outputs_and_never_touches_inputs(small_session, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in small_session.rglob("*") if p.is_file()}
    out = tmp_path / "o" / "m.tif"
    assert cli.main(["stack", str(small_session), "-o", str(out), "-q", "--cache-dir", str(tmp_path / "c")]) == 0
    for suffix in (".tif", ".png", ".fits", ".json"):
        assert out.with_suffix(suffix).stat().st_size > 0
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rep["frames_used"] == 6 and rep["backend"] == "cpu"
    assert {"path", "used", "reason", "stars", "fwhm_px", "roundness", "background", "noise", "score",
            "weight", "transform", "rejected_fraction"} <= set(rep["frames"][0])
    after = {p: p.stat().st_mtime_ns for p in small_session.rglob("*") if p.is_file()}
    assert before == after
    assert not list(out.parent.glob("*.part"))


def test_bad_lights_are_skipped_with_a_reason_and_the_stack_goes_on(small_session, tmp_path):
    """A truncated RAW and a frame from another camera are skipped and named; the rest stacks."""
    import shutil

    from skystack.tools.dng import write_dng
    from skystack.engine.io import read_frame

    s = tmp_path / "s"
    shutil.copytree(small_session, s)
    lights = sorted((s / "lights").iterdir())
    data = lights[1].read_bytes()
    lights[1].write_bytes(data[: len(data) * 6 // 10])  # truncated
    fr = read_frame(lights[2])
    write_dng(lights[2], fr.data, pattern=fr.meta.pattern, black_level=fr.meta.black_level,
              white_level=int(fr.meta.white_level), exif={"make": "Other", "model": "Camera 2"})
    out = tmp_path / "o.tif"
    assert cli.main(["--backend", "cpu", "stack", str(s), "-o", str(out), "-q",
                     "--cache-dir", str(tmp_path / "c")]) == 0
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rep["frames_used"] == 4
    reasons = {f["path"].rsplit("/", 1)[-1]: f["reason"] for f in rep["frames"] if not f["used"]}
    assert set(reasons) == {lights[1].name, lights[2].name}
    assert lights[1].name in reasons[lights[1].name] and "truncated" in reasons[lights[1].name].lower()
    assert "camera" in reasons[lights[2].name] and "Camera 2" in reasons[lights[2].name]


def test_full_disk_is_a_clear_error(tmp_path, monkeypatch):
    import errno
    import os

    from skystack.engine.errors import OutputError
    from skystack.engine.output import write_tiff

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OutputError, match="disk full"):
        write_tiff(tmp_path / "x.tif", np.zeros((4, 4), np.float32))
    assert list(tmp_path.iterdir()) == []  # no partial file left


@pytest.mark.parametrize("name,needle", [("out.png", "out.tif"), ("x.jpg", "x.tif"), ("s.fits", "s.tif")])
def test_o_with_another_image_suffix_is_refused_before_any_work(small_session, tmp_path, capsys, monkeypatch,
                                                                name, needle):
    from skystack.engine import stack

    monkeypatch.setattr(stack, "stack_session", lambda *a, **k: pytest.fail("the pipeline ran"))
    assert cli.main(["--backend", "cpu", "stack", str(small_session), "-o", str(tmp_path / name), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "-o" in err[0] and needle in err[0]
    assert list(tmp_path.iterdir()) == []


def test_o_without_a_suffix_gets_tif_and_outputs_never_overwrite_each_other(small_session, tmp_path, capsys,
                                                                           monkeypatch):
    from skystack.engine import stack

    paths = cli._outputs_for(str(tmp_path / "m42"), cli.build_parser().parse_args(["stack", "x"]))
    assert paths == {k: str(tmp_path / f"m42.{s}") for k, s in
                     (("tiff", "tif"), ("preview", "png"), ("fits", "fits"), ("report", "json"), ("html", "html"))}
    monkeypatch.setattr(stack, "stack_session", lambda *a, **k: pytest.fail("the pipeline ran"))
    # --picture on the preview's name would overwrite it: refused before any work
    argv = ["--backend", "cpu", "stack", str(small_session), "-o", str(tmp_path / "m.tif"), "-q",
            "--picture", str(tmp_path / "m.png")]
    assert cli.main(argv) == 2
    assert "two outputs" in capsys.readouterr().err
    assert cli.main([*argv[:-2], "--report", str(tmp_path / "m.txt")]) == 2
    assert ".json" in capsys.readouterr().err


def test_unwritable_output_folder_fails_before_the_pipeline(small_session, tmp_path, capsys, monkeypatch):
    """A read-only folder is found before any work, named with the fix (not a hidden temp file)."""
    import errno
    import tempfile

    from skystack.engine import stack

    def denied(*_a, **_k):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(stack, "stack_session", lambda *a, **k: pytest.fail("the pipeline ran"))
    monkeypatch.setattr(tempfile, "mkstemp", denied)
    assert cli.main(["--backend", "cpu", "stack", str(small_session), "-o", str(tmp_path / "m.tif"), "-q"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "not writable" in err and ".part" not in err


def test_stack_prints_output_paths_on_stdout(small_session, tmp_path, capsys):
    out = tmp_path / "m.tif"
    # temporaries a killed run left (nobody holds their lock) in the output folder and the master cache
    (tmp_path / "c").mkdir()
    stale = [tmp_path / ".m.tif.k3j_9x2a.part", tmp_path / "c" / ".master-bias-0a.fits.abcdefgh.tmp"]
    for p in stale:
        p.write_bytes(b"x")
    assert cli.main(["--backend", "cpu", "stack", str(small_session), "-o", str(out), "-q",
                     "--cache-dir", str(tmp_path / "c")]) == 0
    cap = capsys.readouterr()
    lines = dict(line.split(": ", 1) for line in cap.out.strip().splitlines())
    assert lines == {"tiff": str(out), "fits": str(out.with_suffix(".fits")), "preview": str(out.with_suffix(".png")),
                     "report": str(out.with_suffix(".json")), "html": str(out.with_suffix(".html"))}
    assert all(Path(p).is_file() for p in lines.values())
    assert str(out) not in cap.err
    assert not any(p.exists() for p in stale)


def test_parser_and_option_checks_import_no_heavy_module():
    """``skystack --help`` and the option checks (StackConfig's validation) stay cheap at start-up:
    they import neither scipy.spatial (registration's k-d tree, ~0.3 s), matplotlib nor astropy,
    and the checks still reject a bad value with the option's name."""
    import subprocess
    import sys

    code = ("import sys, skystack.cli as c\n"
            "c.build_parser()\n"
            "from skystack.engine.errors import SkystackError\n"
            "from skystack.engine.stack import StackConfig\n"
            "for bad in ({'rejection': 'bogus'}, {'framing': 'all'}, {'transform_model': 'x'}, {'debayer': 'vng'}):\n"
            "    try:\n"
            "        StackConfig(**bad)\n"
            "        sys.exit('accepted ' + repr(bad))\n"
            "    except SkystackError as e:\n"
            "        print(e)\n"
            "print(' '.join(m for m in ('scipy.spatial', 'matplotlib', 'astropy') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split()[0] for ln in lines[:4]] == ["--rejection", "--framing", "--transform-model", "--debayer"]
    assert lines[4].strip() == ""  # none of the heavy modules


def test_switches_are_named_for_their_fields():
    """``--apply-wb`` and ``--cosmetic`` (StackConfig's field names) switch on and off, default on as
    the fields do; ``--no-wb`` stays as the older name of ``--no-apply-wb``."""
    from skystack.engine.stack import StackConfig

    def config(*flags):
        return cli._stack_config(cli.build_parser().parse_args(["stack", "x", *flags]))

    base = config()
    assert base.apply_wb is StackConfig().apply_wb is True and base.cosmetic is StackConfig().cosmetic is True
    for flags, field in ((["--no-apply-wb"], "apply_wb"), (["--no-wb"], "apply_wb"), (["--no-cosmetic"], "cosmetic")):
        assert getattr(config(*flags), field) is False, flags
    assert config("--no-wb", "--apply-wb").apply_wb is True  # the last one given wins


def test_a_skystack_process_loads_numpy_with_one_blas_thread_and_no_huge_pages():
    """skystack runs its own threads per frame and tile; OpenBLAS's pool would only spin beside them. A
    process prepared as the CLI prepares itself (and the benchmark's children) starts no BLAS thread and
    does not ask for huge pages; the same import without it starts one per core (where the BLAS has a
    pool at all)."""
    import os
    import subprocess
    import sys

    if (os.cpu_count() or 1) < 2 or not os.path.isdir("/proc/self/task"):
        pytest.skip("needs two cores and /proc")
    code = ("import os, sys\n"
            "if sys.argv[1] == 'cli':\n"
            "    from skystack.cli import prepare_process\n"
            "    prepare_process()\n"
            "import numpy\n"
            "from numpy._core import multiarray\n"
            "print(int(multiarray._get_madvise_hugepage()), len(os.listdir('/proc/self/task')))\n")
    # (OpenBLAS also reads OMP_NUM_THREADS, which dask sets in the test process for its workers)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS") and k != "NUMPY_MADVISE_HUGEPAGE"}

    def run(mode: str) -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, env=env,
                             check=True, timeout=120)
        huge, threads = out.stdout.split()[-2:]
        return int(huge), int(threads)

    _, plain = run("plain")
    assert run("cli")[0] == 0
    if plain == 1:
        pytest.skip("this NumPy's BLAS starts no thread pool")
    assert run("cli")[1] == 1 < plain
