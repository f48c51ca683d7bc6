"""Typed errors for user mistakes. The CLI prints ``error: <message>`` and exits 2 for these.

A message names an option with :func:`param`: the API's text shows the option's name, and the CLI
renders the same message with the option's flag (``--base``), so neither layer speaks the other's
language.
"""

from __future__ import annotations

from collections.abc import Callable

from ._core import CoreError  # noqa: F401  (what the C++ core raises: an OSError with one clear line)


_MARK = "\x1d"  # ASCII group separator: brackets an option's name inside a message


def param(name: str) -> str:
    """A reference to option ``name`` inside an error message."""
    return f"{_MARK}{name}{_MARK}"


class LayerswapError(Exception):
    """Base class: a user mistake or a bad input, reported in one line without a traceback."""

    def render(self, name_of: Callable[[str], str]) -> str:
        """The message with every option reference spelled by ``name_of`` (a flag, say)."""
        parts = str(self.args[0] if self.args else "").split(_MARK)
        return "".join(name_of(p) if i % 2 else p for i, p in enumerate(parts))

    def __str__(self) -> str:
        return self.render(lambda name: name)


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
