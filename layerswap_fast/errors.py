"""Typed errors for user mistakes. The CLI prints ``error: <message>`` and exits 2 for these."""

from __future__ import annotations

from ._core import CoreError  # noqa: F401  (what the C++ core raises: an OSError with one clear line)


class LayerswapError(Exception):
    """Base class: a user mistake or a bad input, reported in one line without a traceback."""


class CheckpointError(LayerswapError):
    """A checkpoint is missing, malformed, or violates the safetensors format."""


class ConfigError(LayerswapError):
    """An impossible merge configuration (zones that overlap or exceed the layer count, ...)."""


class MismatchError(LayerswapError):
    """The experts do not fit together (names, shapes, layer counts)."""


class OutputError(LayerswapError):
    """The output location is unusable (exists without --force, inside an input, no space)."""


class UnsupportedDtypeError(LayerswapError):
    """A tensor's dtype cannot take part in the requested arithmetic."""
