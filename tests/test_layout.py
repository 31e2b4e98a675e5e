"""The repository's layout rules (docs/architecture.md)."""

from __future__ import annotations

import re

import pytest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_TOOLS_IMPORT = re.compile(r"^\s*(from\s+skystack\.tools\b|import\s+skystack\.tools\b|from\s+skystack\s+import\s+.*\btools\b)")


def _offenders(folder: Path) -> list[str]:
    return [f"{p.relative_to(folder)}:{i}" for p in sorted(folder.rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if _TOOLS_IMPORT.match(line)]


def test_the_engine_never_imports_the_tools(tmp_path):
    """engine/ and kernels/ stand alone: the simulator, the truth metrics and the benchmark harness
    (tools/) are imported only by the CLI's synth, demo and bench commands, bench/ and the tests;
    and the rule sees such an import where there is one."""
    assert _offenders(ROOT / "engine") == [] and _offenders(ROOT / "kernels") == []
    (tmp_path / "stage.py").write_text("import numpy\n    from skystack.tools.synth import simulate\n")
    assert _offenders(tmp_path) == ["stage.py:2"]


def test_every_package_folder_is_installed():
    """pyproject.toml lists every folder of the package that holds an ``__init__.py`` (a plain
    ``pip install .`` copies only the listed ones), and nothing else."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"skystack"} | {"skystack." + ".".join(p.parent.relative_to(ROOT).parts)
                            for top in ("engine", "kernels", "tools") for p in (ROOT / top).rglob("__init__.py")}
    assert listed == found


def test_the_public_api_is_lazy_and_stacks(tmp_path):
    """``import skystack`` loads no stage; every name of ``skystack.__all__`` resolves; and
    ``skystack.stack(folder, **fields)`` is ``stack_session(discover_session(folder), StackConfig(**fields))``,
    bit for bit."""
    import subprocess
    import sys

    import numpy as np

    import skystack
    from skystack.engine.session import discover_session
    from skystack.engine.stack import StackConfig, stack_session
    from skystack.tools.synth import SynthConfig, simulate

    code = "import sys, skystack; print(sorted(m for m in sys.modules if m.startswith('skystack.engine.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['skystack.engine.errors']", loaded
    assert all(getattr(skystack, name) is not None for name in skystack.__all__)
    simulate(SynthConfig(seed=5, width=480, height=360, n_lights=4, n_bias=0, n_darks=0, n_flats=0,
                         n_dark_flats=0, file_format="fits", star_density=4000.0, trail_frames=None,
                         cloudy_frame=None, shake_frame=None), tmp_path / "s")
    got = skystack.stack(tmp_path / "s", quiet=True, rejection="median", cache_dir=str(tmp_path / "c"))
    want = stack_session(discover_session(tmp_path / "s"),
                         StackConfig(quiet=True, rejection="median", cache_dir=str(tmp_path / "c")))
    np.testing.assert_array_equal(got.image, want.image)
    with pytest.raises(skystack.SkystackError, match="either a StackConfig or its fields"):
        skystack.stack(tmp_path / "s", StackConfig(), quiet=True)
