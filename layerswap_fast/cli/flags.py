"""Click flags from declared options (:class:`~layerswap_fast.api.Option`), for every command."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..api import Option

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def stack(*options: Decorator) -> Decorator:
    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            f = option(f)
        return f
    return apply


def click_option(o: Option) -> Decorator:
    """The flag of a declared option: its type, default and help as declared."""
    kw: dict[str, Any] = {"help": o.help}
    flags = (o.short, o.cli_flag) if o.short else (o.cli_flag,)
    if o.kind == "flag":
        kw.update(is_flag=True)
    elif o.kind in ("path", "paths"):
        kw.update(type=click.Path(path_type=Path), required=o.required, multiple=o.kind == "paths")
    elif o.kind == "choice":
        kw.update(type=click.Choice(o.choices), default=o.default, show_default=True)
    else:
        kw.update(type={"int": int, "float": float, "text": str}[o.kind], default=o.default,
                  show_default=o.default is not None)
    return click.option(*flags, o.name, **kw)
