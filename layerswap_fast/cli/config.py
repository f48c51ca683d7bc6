"""``--config FILE`` and ``--dump-config``: option values from a YAML/JSON file or a recipe."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..errors import ConfigError
from ..safe_read import Bool, Choice, Float, Int, List, Map, Nullable, Schema, Str, read_json, read_yaml, show_path

#: options that never change the output's bytes: left out of recipes
NOT_IN_RECIPE = {"out", "force", "sync", "checksum", "dry_run", "threads", "device", "gpu_memory", "link", "config",
                 "dump_config", "as_json"}


#: what a config may not set, by option name: only flags typed on the command line choose what
#: is written or replaced, so rebuilding a shared recipe cannot overwrite anything
_COMMAND_LINE_ONLY = {"out": "the output", "force": "--force"}
_ALIASES = {"lambda": "lam", "output": "out"}
#: keys of a plain config (not a recipe) that describe it rather than set an option
_DESCRIPTIVE = ("command", "tool", "version")
_CONFIG_SCHEMA = Map({"command": Str(), "options": Map(min_len=1)})


def _load_config(ctx: click.Context, param: click.Parameter, path: Path | None) -> Path | None:
    """``--config FILE``: a YAML (or JSON) mapping of option names to values, or an output's
    ``layerswap_recipe.json`` (whose ``options`` are the values); flags given on the command line
    win. Every value is checked against its option's type; the output and --force are refused."""
    if path is None:
        return None
    read = read_json if Path(path).suffix.lower() == ".json" else read_yaml
    data = read(path, _CONFIG_SCHEMA)
    where = show_path(path)
    command = data.get("command")
    if command is not None and command != ctx.info_name:
        raise ConfigError(f"config {where} is a recipe for '{command}', not '{ctx.info_name}'")
    recipe = "options" in data
    options = data["options"] if recipe else {k: v for k, v in data.items() if k not in _DESCRIPTIVE}
    for key in {*data, *options}:  # a recipe's top level too: the file may not name them anywhere
        name = _option_name(key)
        if name in _COMMAND_LINE_ONLY:
            raise ConfigError(f"config {where} sets {_COMMAND_LINE_ONLY[name]}; only the command line may set "
                              f"the output and --force")
    params = {p.name: p for p in ctx.command.params if p.name not in ("config", "dump_config")}
    defaults: dict[str, Any] = {}
    for key, value in options.items():
        name = _option_name(key)
        if name not in params:
            raise ConfigError(f"config {where}: unknown option {key!r} for '{ctx.info_name}'")
        if name in defaults:
            raise ConfigError(f"config {where} sets {name} twice")
        _option_schema(params[name]).check(value, where, f"options.{key}" if recipe else key)
        defaults[name] = value
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return path


def _option_name(key: str) -> str:
    name = key.replace("-", "_")
    return _ALIASES.get(name, name)


def _option_schema(p: click.Parameter) -> Schema:
    """The type a config value of option ``p`` must have, from the option's own click type:
    an INT option takes an integer (not 2.7, not true), a FLOAT option a finite number, a
    Choice one of its choices, a flag true or false, a repeated option a list of those; null
    only where the option's default is None."""
    t = p.type
    schema: Schema
    if isinstance(p, click.Option) and p.is_flag:
        schema = Bool()
    elif isinstance(t, click.Choice):
        schema = Choice(tuple(map(str, t.choices)))
    elif isinstance(t, click.types.IntParamType):
        schema = Int(getattr(t, "min", None), getattr(t, "max", None))
    elif isinstance(t, click.types.FloatParamType):
        schema = Float(getattr(t, "min", None), getattr(t, "max", None))
    else:
        schema = Str()
    if p.multiple:
        schema = List(schema)
    return Nullable(schema) if p.default is None and not p.required else schema


def recipe_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--dump-config", is_flag=True,
                     help="Print the recipe (YAML) for these options and exit without merging.")(f)
    return click.option("--config", type=click.Path(path_type=Path, dir_okay=False), is_eager=True,
                        expose_value=True, callback=_load_config,
                        help="YAML file of option values, or an output's layerswap_recipe.json; flags override it.")(f)


def dump_config(ctx: click.Context) -> None:
    import yaml

    options = {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
               for k, v in ctx.params.items() if k not in NOT_IN_RECIPE and v not in (None, ())}
    options = {k: [str(x) for x in v] if isinstance(v, list) else v for k, v in options.items()}
    click.echo(yaml.safe_dump({"command": ctx.info_name, "options": options}, sort_keys=False), nl=False)


