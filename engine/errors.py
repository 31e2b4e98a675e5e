"""Exception tree of skystack.

Every error a user can cause derives from :class:`SkystackError`; the CLI
prints its message as one red line and exits with status 2.
"""

from __future__ import annotations


class SkystackError(Exception):
    """Root of every skystack error meant for the user."""


class FrameReadError(SkystackError):
    """A frame file could not be opened or decoded (message names the file)."""


class FrameMismatchError(SkystackError):
    """Frames (or masters) of different size, pattern or camera were mixed."""


class BackendUnavailable(SkystackError):
    """The requested compute backend (e.g. ``gpu``) cannot be used here."""


class KernelCompileError(SkystackError):
    """A CUDA source failed to compile; the message holds the compiler log."""


class RegistrationError(SkystackError):
    """A frame could not be registered to the reference."""


class NotEnoughStars(RegistrationError):
    """A frame has too few detectable stars to register (clouds, lens cap)."""


class CalibrationError(SkystackError):
    """Calibration frames are inconsistent with the lights or with each other."""


class InputNotFound(SkystackError):
    """A path, folder or glob given by the user matched no file."""


class OutputError(SkystackError):
    """An output could not be written (full disk, permissions, would overwrite input)."""
