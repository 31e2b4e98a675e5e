"""The stages of a session's run, in order: :data:`SESSION_STAGES`.

Each module holds one stage: a class with a ``name``, the
:class:`~skystack.engine.pipeline.SessionContext` fields it ``consumes`` and
``produces``, its stage ``timer`` and ``run(context)`` (the
:class:`~skystack.engine.pipeline.Stage` protocol).
:func:`skystack.engine.stack.register_session` runs them with
:func:`~skystack.engine.pipeline.run_stages`; the combine
(:func:`skystack.engine.stack.combine_registered`) follows. To add a stage,
write its module here and put an instance in :data:`SESSION_STAGES` where it
belongs (``docs/architecture.md``, "Adding a stage").
"""

from __future__ import annotations

from skystack.engine.pipeline import Stage
from skystack.engine.stages.budget import PlanMemory
from skystack.engine.stages.calibration import BuildMasters
from skystack.engine.stages.canvas import MakeCanvas
from skystack.engine.stages.description import DescribeRegistration
from skystack.engine.stages.landscape import PrefetchLandscape, SeparateLandscape
from skystack.engine.stages.lights import CalibrateLights
from skystack.engine.stages.registration import RegisterFrames
from skystack.engine.stages.scan import ScanHeaders
from skystack.engine.stages.selection import SelectFrames
from skystack.engine.stages.store import OpenStore
from skystack.engine.stages.warping import WarpFrames

#: The session run, in order: from the lights' files to the registered frame store.
SESSION_STAGES: tuple[Stage, ...] = (
    ScanHeaders(),  # headers -> metas, shape, pattern
    PlanMemory(),  # --memory-limit -> plan (and fewer workers under a limit)
    BuildMasters(),  # bias/darks/flats -> calibration set, on the backend
    OpenStore(),  # the frame store: device memory, RAM or a spill file
    CalibrateLights(),  # pass 1: decode, calibrate, detect, debayer -> store
    SelectFrames(),  # quality selection, provisional reference
    PrefetchLandscape(),  # the landscape search's small frames, binned beside registration
    RegisterFrames(),  # transforms (and lens) to the reference
    SeparateLandscape(),  # the still landscape, stacked unregistered
    MakeCanvas(),  # the output grid
    WarpFrames(),  # pass 2: warp into the canvas, normalisation statistics
    DescribeRegistration(),  # the report's registration section
)

__all__ = ["SESSION_STAGES"]
