"""Exposure planner: the seed's numbers and the NPF formula."""

from __future__ import annotations

import json
import math

import pytest

from skystack import cli
from skystack.engine.errors import SkystackError
from skystack.engine.plan import PlanInputs, exposure_plan, rule_500, rule_npf


def test_seed_500_rule_prints_19_8_seconds(capsys):
    # The seed: 500 / (4.71 mm x 5.35) = 19.8424 s.
    assert cli.main(["plan", "--focal-length", "4.71", "--crop-factor", "5.35"]) == 0
    out = capsys.readouterr().out
    assert "19.8 s" in out
    assert rule_500(4.71, 5.35) == pytest.approx(500 / (4.71 * 5.35), rel=1e-12)


def test_npf_matches_formula_and_declination():
    f, n, p = 24.0, 2.8, 4.3
    expected = (16.856 * n + 0.0997 * f + 13.713 * p) / f
    assert rule_npf(f, n, p) == pytest.approx(expected, rel=1e-12)
    # cos(60 deg) = 0.5 doubles the allowed exposure.
    assert rule_npf(f, n, p, 60.0) == pytest.approx(2 * expected, rel=1e-9)
    # Longer lenses allow shorter exposures.
    assert rule_npf(50.0, n, p) < rule_npf(24.0, n, p)


def test_plan_json_lists_both_rules(capsys):
    argv = ["plan", "--focal-length", "4.71", "--crop-factor", "5.35", "--aperture", "1.7",
            "--pixel-pitch", "0.8", "--json"]
    assert cli.main(argv) == 0
    rows = {r["rule"]: r["seconds"] for r in json.loads(capsys.readouterr().out)}
    assert rows["500 rule"] == pytest.approx(19.8424, abs=1e-4)
    assert rows["NPF rule"] == pytest.approx((16.856 * 1.7 + 0.0997 * 4.71 + 13.713 * 0.8) / 4.71)


def test_plan_without_focal_length_is_a_user_error(capsys):
    with pytest.raises(SkystackError):
        exposure_plan(PlanInputs())
    assert cli.main(["plan"]) == 2
    err = capsys.readouterr().err
    assert "focal length" in err and len(err.strip().splitlines()) == 1


def test_plan_from_seestar_header(realdata):
    from skystack.engine.plan import inputs_from_frame

    frame = next((realdata / "seestar-m94" / "lights_session1").glob("*.fit"))
    inp = inputs_from_frame(str(frame))
    assert inp.focal_length_mm == pytest.approx(250.0)
    assert inp.pixel_pitch_um == pytest.approx(2.9)
    assert inp.aperture == pytest.approx(5.0)  # 250 mm / 50 mm
    diag = math.hypot(1920 * 2.9, 1080 * 2.9) / 1000
    assert inp.crop_factor == pytest.approx(math.hypot(36, 24) / diag, rel=1e-6)
    assert inp.declination_deg == pytest.approx(40.97, abs=0.01)
