"""The byte progress bar of the commands that read or write models."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click


@contextmanager
def progress_bar(label: str = "merging") -> Iterator[Callable[[int, int], None] | None]:
    """A byte progress bar on a terminal, closed even when the command fails; nothing when
    stderr is piped."""
    if not sys.stderr.isatty():
        yield None
        return
    bars: list[Any] = []

    def update(n: int, total: int) -> None:
        if not bars:
            bars.append(click.progressbar(length=total, label=label, file=sys.stderr))
            bars[0].__enter__()
        bars[0].update(n)

    try:
        yield update
    finally:
        if bars:
            bars[0].__exit__(None, None, None)


