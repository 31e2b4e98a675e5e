"""The outputs after the stack: ``write_outputs`` alone, on one stacked result.

    python bench/bench_outputs.py [SESSION] [--repeat 5] [--keep /tmp/result.pkl]

Stacks SESSION once (default: the real Seestar M 94 session, 20 lights of
1920x1080, when ``../shared/realdata`` is there), then times ``write_outputs``
(TIFF, FITS, preview PNG, JSON, HTML) ``--repeat`` times into fresh folders and
prints each wall time, their median and the stages of one run (preview,
8-bit conversion, PNG encode, HTML report). ``--keep`` pickles the stacked
result (and reuses it), so an A/B comparison of two checkouts stacks once.
"""

from __future__ import annotations

import argparse
import io
import pickle
import statistics
import tempfile
import time
from pathlib import Path

DEFAULT_SESSION = Path(__file__).resolve().parents[2] / "shared/realdata/seestar-m94/lights_session1"


def _result(session: Path, keep: Path | None):
    if keep is not None and keep.is_file():
        return pickle.loads(keep.read_bytes())
    from skystack.engine.session import split_inputs
    from skystack.engine.stack import StackConfig, stack_session

    result = stack_session(split_inputs([str(session)]), StackConfig(quiet=True))
    if keep is not None:
        keep.write_bytes(pickle.dumps(result))
    return result


def _stages(result) -> dict[str, float]:
    """Seconds of the main steps of one ``write_outputs``, run one by one."""
    from PIL import Image

    from skystack.engine.finish import preview_image
    from skystack.engine.htmlreport import preview_uri, render_report
    from skystack.engine.report import build_report, rejection_map
    from skystack.engine.stretch import to_8bit

    t: dict[str, float] = {}
    t0 = time.perf_counter()
    stretched = preview_image(result.image)
    t["preview_image"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    shown = to_8bit(stretched)
    t["to_8bit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    Image.fromarray(shown).save(io.BytesIO(), format="PNG")
    t["png_encode"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    render_report(build_report(result), preview=preview_uri(shown), coverage=result.coverage,
                  rejections=rejection_map(result))
    t["html_report"] = time.perf_counter() - t0
    return t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("session", nargs="?", type=Path, default=DEFAULT_SESSION)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--keep", type=Path, help="pickle of the stacked result (written once, then reused)")
    args = ap.parse_args(argv)
    from skystack.engine.report import write_outputs

    result = _result(args.session, args.keep)
    walls = []
    with tempfile.TemporaryDirectory(prefix="skystack-bench-outputs-") as tmp:
        for k in range(args.repeat):
            d = Path(tmp) / f"r{k}"
            t0 = time.perf_counter()
            write_outputs(result, tiff=str(d / "s.tif"), preview=str(d / "s.png"), fits=str(d / "s.fits"),
                          report=str(d / "s.json"), html=str(d / "s.html"))
            walls.append(time.perf_counter() - t0)
            print(f"write_outputs {walls[-1]:.3f} s")
    print(f"median {statistics.median(walls):.3f} s over {len(walls)}")
    for name, sec in _stages(result).items():
        print(f"  {name:14s} {sec:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
