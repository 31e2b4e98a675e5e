"""The repository's layout rules (docs/architecture.md)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_TOOLS_IMPORT = re.compile(r"^\s*(from\s+skystack\.tools\b|import\s+skystack\.tools\b|from\s+skystack\s+import\s+.*\btools\b)")


def _offenders(folder: Path) -> list[str]:
    return [f"{p.name}:{i}" for p in sorted(folder.glob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if _TOOLS_IMPORT.match(line)]


def test_the_engine_never_imports_the_tools(tmp_path):
    """engine/ and kernels/ stand alone: the simulator, the truth metrics and the benchmark harness
    (tools/) are imported only by the CLI's synth, demo and bench commands, bench/ and the tests;
    and the rule sees such an import where there is one."""
    assert _offenders(ROOT / "engine") == [] and _offenders(ROOT / "kernels") == []
    (tmp_path / "stage.py").write_text("import numpy\n    from skystack.tools.synth import simulate\n")
    assert _offenders(tmp_path) == ["stage.py:2"]
