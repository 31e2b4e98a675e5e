"""The session run as a list of stages (engine/pipeline.py, engine/stages/; docs/architecture.md)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from skystack.engine.pipeline import INPUTS, SessionContext, run_stages
from skystack.engine.session import discover_session
from skystack.engine.stack import StackConfig, combine_registered, register_session, session_context
from skystack.engine.stages import SESSION_STAGES
from skystack.tools.synth import SynthConfig, simulate


def test_each_stage_reads_only_what_the_inputs_or_an_earlier_stage_provide():
    """Every stage declares its name, timer and the context fields it consumes and produces; each
    field is one of :class:`SessionContext`'s, and each consumed one is an input or an earlier
    stage's product."""
    fields = {f.name for f in dataclasses.fields(SessionContext)}
    assert set(INPUTS) <= fields
    have = set(INPUTS)
    names = []
    for stage in SESSION_STAGES:
        names.append(stage.name)
        assert isinstance(stage.timer, (str, type(None))) and callable(stage.run), stage.name
        assert set(stage.consumes) <= have, (stage.name, set(stage.consumes) - have)
        assert set(stage.produces) <= fields, (stage.name, set(stage.produces) - fields)
        have |= set(stage.produces)
    assert len(set(names)) == len(names)
    assert names[0] == "scan" and names.index("calibrate") < names.index("register") < names.index("warp")


class _CountSkyStars:
    """A stage as docs/architecture.md's "Adding a stage" writes one: the sky stars of the used frames."""

    name = "sky stars"
    timer = "sky stars"
    consumes = ("registration", "used")
    produces = ("description",)

    def run(self, ctx: SessionContext) -> None:
        sky = ctx.registration.sky_stars
        ctx.description["sky_stars"] = sum(len(sky[i]) for i in ctx.used if i in sky)


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    simulate(SynthConfig(seed=5, width=480, height=360, n_lights=4, n_bias=0, n_darks=0, n_flats=0,
                         n_dark_flats=0, file_format="fits", star_density=4000.0, trail_frames=None,
                         cloudy_frame=None, shake_frame=None), root / "s")
    return root


def test_a_registered_stage_runs_in_order_timed_and_the_stack_is_unchanged(night):
    """A stage added to the list runs after the ones before it, under its own timer, and sees their
    products; the run with it registers the same frames as register_session, bit for bit."""
    cfg = StackConfig(quiet=True, cache_dir=str(night / "c"))
    files = discover_session(night / "s")
    stages = list(SESSION_STAGES)
    stages.insert(len(stages) - 1, _CountSkyStars())  # before "describe", which replaces the description
    stages.append(_CountSkyStars())
    ctx = run_stages(stages, session_context(files, cfg))
    try:
        assert ctx.description["sky_stars"] > 0
        timers = list(ctx.report.timer.t)
        assert timers.index("warp") < timers.index("sky stars")
        with register_session(files, cfg) as reg:
            assert (reg.used, reg.ref) == (ctx.used, ctx.ref)
            for i in reg.used:
                np.testing.assert_array_equal(reg.frame(i), ctx.store.get(i))
            image = combine_registered(reg, cfg).image
        assert np.isfinite(image).any()
    finally:
        ctx.store.close()


def test_the_landscape_searchs_small_frames_binned_beside_registration_are_the_same(rng):
    """``PrefetchLandscape`` bins the likely frames on a thread; the landscape stage takes them and
    bins the rest (a frame registration dropped, the reference it chose): the frames and their order
    are those of ``small_frames`` itself, and another block size bins everything again."""
    from skystack.engine import foreground as fgm
    from skystack.engine.stages.landscape import SmallFrames

    frames = {i: rng.normal(0.1, 0.01, (3, 60, 80)).astype(np.float32) for i in range(20)}
    frames[4][:, :10] = np.nan
    reads = []

    def get(i):
        reads.append(i)
        return frames[i]

    early = SmallFrames(get, [0, 4, 9, 13], 4)
    want = [0, 4, 7, 13, 19]
    got = early.take(get, want, 4)
    ref = fgm.small_frames(lambda i: frames[i], want, 4)
    assert list(got) == want == list(ref)
    for i in want:
        np.testing.assert_array_equal(got[i], ref[i])
    assert sorted(reads) == [0, 4, 7, 9, 13, 19]  # each frame read once; 9 read early, not needed
    again = SmallFrames(get, [0, 4], 4).take(get, [0, 4], 5)
    np.testing.assert_array_equal(again[4], fgm.small_frames(lambda i: frames[i], [4], 5)[4])


def test_raw_lights_are_decoded_once_and_a_light_of_another_pattern_is_named(tmp_path, monkeypatch):
    """The scan decodes one RAW light of the session's camera and layout (LibRaw has no header-only
    mode) and takes the others' headers; pass 1 decodes each light once and names a light whose
    decode shows another CFA pattern (the header could not tell); the rest are stacked."""
    from skystack.engine import rawfile
    from skystack.engine.io import read_frame
    from skystack.tools.dng import write_dng

    c = SynthConfig(seed=5, width=480, height=360, n_lights=5, n_bias=0, n_darks=0, n_flats=0, n_dark_flats=0,
                    file_format="dng", star_density=4000.0, trail_frames=None, cloudy_frame=None, shake_frame=None)
    simulate(c, tmp_path / "s")
    files = discover_session(tmp_path / "s")
    odd = files.lights[3]
    f = read_frame(odd)  # the same camera, size and EXIF; another 2x2 tile
    write_dng(odd, f.data, pattern="GRBG", black_level=c.black_level,
              white_level=c.white_level, exif={"exposure_s": f.meta.exposure_s, "iso": c.iso,
                                               "focal_length_mm": c.focal_length_mm, "f_number": c.f_number,
                                               "timestamp": f.meta.timestamp, "make": c.make, "model": c.model})
    decodes = []
    real = rawfile._unpack_guarded
    monkeypatch.setattr(rawfile, "_unpack_guarded", lambda raw, p: (decodes.append(p.name), real(raw, p)))
    ctx = run_stages(SESSION_STAGES, session_context(files, StackConfig(quiet=True, cache_dir=str(tmp_path / "c"))))
    ctx.store.close()
    names = [p.name for p in files.lights]
    assert sorted(decodes) == sorted([names[0], *names])  # the first light twice, every other once
    assert ctx.pattern == c.pattern and odd.name not in [files.lights[i].name for i in ctx.used]
    assert "differs from the session's" in ctx.records[3].reason and "GRBG" in ctx.records[3].reason
    assert len(ctx.used) == 4 and ctx.metas[3].pattern == "GRBG"
