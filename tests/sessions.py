"""Small synthetic sessions the CLI tests stack (written by the simulator)."""

from __future__ import annotations

from pathlib import Path

from skystack.tools.synth import SynthConfig, simulate


def write_small_session(root: Path, *, n_lights: int = 6, bias: int = 0, darks: int = 0, flats: int = 0,
                  **config) -> Path:
    """Write a 480x360 session (seed 5, no dark-flats, no trailed, cloudy or shaken frame) to ``root``.

    ``config`` holds further :class:`~skystack.tools.synth.SynthConfig` fields
    (``file_format``...). Returns ``root``.
    """
    simulate(SynthConfig(seed=5, width=480, height=360, n_lights=n_lights, n_bias=bias, n_darks=darks,
                         n_flats=flats, n_dark_flats=0, trail_frames=None, cloudy_frame=None, shake_frame=None,
                         **config), root)
    return root
