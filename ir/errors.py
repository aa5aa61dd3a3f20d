"""Errors a user sees: each names the file, node or layer and says what to do.

They live in `ir` because it is the lowest layer: every other folder may import it.
"""
from __future__ import annotations


class TensorfoldError(Exception):
    """Base class; the CLI prints these as one paragraph, without a traceback."""


class CaptureError(TensorfoldError):
    """A model could not be captured or loaded into a Graph."""


class InvalidModelError(TensorfoldError):
    """A model's contents are unusable (non-finite weights, malformed graph)."""


class PipelineError(TensorfoldError):
    """A pipeline names an unknown pass or option, or an option has a bad value."""


class InputShapeError(TensorfoldError):
    """Inputs given to a graph do not match what the graph expects."""


class ExportError(TensorfoldError):
    """A graph could not be written out or converted."""


class TargetError(TensorfoldError):
    """A target name is unknown, or its toolchain or device is missing."""


class BuildError(TensorfoldError):
    """A graph could not be imported into TVM, tuned or compiled for a target."""
