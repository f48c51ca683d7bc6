"""``--config FILE`` and ``--dump-config``: a command's option values from a YAML/JSON file or an
output's recipe, and back. The API reads and checks the file; flags given on the command line win."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .. import api


def _load_config(ctx: click.Context, param: click.Parameter, path: Path | None) -> Path | None:
    if path is not None:
        assert ctx.info_name is not None
        ctx.default_map = {**(ctx.default_map or {}), **api.read_config(path, ctx.info_name)}
    return path


def recipe_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--dump-config", is_flag=True,
                     help="Print the recipe (YAML) for these options and exit without merging.")(f)
    return click.option("--config", type=click.Path(path_type=Path, dir_okay=False), is_eager=True,
                        expose_value=True, callback=_load_config,
                        help="YAML file of option values, or an output's layerswap_recipe.json; flags override it.")(f)


def dump_config(ctx: click.Context) -> None:
    assert ctx.info_name is not None
    click.echo(api.recipe_yaml(ctx.info_name, ctx.params), nl=False)
