"""The commands: one per merge method, built from its declared options, and ``plan``, ``verify``,
``demo``. Each parses, calls the API and prints."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .. import api
from ..api import Method
from .config import dump_config, recipe_options
from .flags import click_option, stack
from .progress import progress_bar

write_options = stack(*map(click_option, api.WRITE_OPTIONS), recipe_options)


def _write_kwargs(kw: dict[str, Any], progress: Callable[[int, int], None] | None,
                  config: Path | None) -> dict[str, Any]:
    given = {o.api_name: kw.pop(o.name) for o in api.WRITE_OPTIONS if o.name != "out"}
    return {**given, "other_inputs": [config] if config is not None else [], "progress": progress}


def _method_values(m: Method, kw: dict[str, Any]) -> dict[str, Any]:
    """The method's options out of ``kw``, repeated flags as lists."""
    return {o.name: (list(v) if isinstance(v := kw.pop(o.name), tuple) else v) for o in m.options}


def method_command(m: Method) -> click.Command:
    """The command of merge method ``m``: its declared options, then the write options."""
    @click.pass_context
    def command(ctx: click.Context, **kw: Any) -> None:
        if kw.pop("dump_config"):
            dump_config(ctx)
            return
        dump_mergekit = kw.pop("dump_mergekit", False)
        options = _method_values(m, kw)
        if dump_mergekit:
            click.echo(api.swap_mergekit_yaml(options), nl=False)
            return
        config = kw.pop("config")
        out = kw.pop("out")
        with progress_bar() as progress:
            result = api.run(m.name, out, options, **_write_kwargs(kw, progress, config))
        click.echo(result.summary(out))

    command.__doc__ = m.summary
    extra = [DUMP_MERGEKIT] if m.name == "layer_swap" else []
    return click.command(m.command)(stack(*map(click_option, m.options), *extra, write_options)(command))


#: print the swap as a mergekit config (``layerswap-fast mergekit-yaml`` or mergekit itself run it)
DUMP_MERGEKIT = click.option("--dump-mergekit", is_flag=True,
                             help="Print this swap as a mergekit YAML config (linear over slices) and write nothing.")


def plan_command() -> click.Command:
    swap = api.METHODS["layer_swap"]

    @click.pass_context
    def plan(ctx: click.Context, as_json: bool, **kw: Any) -> None:
        """Print the layer map (layer → source and weights); reads headers only, no tensor data."""
        if kw.pop("dump_config"):
            dump_config(ctx)
            return
        kw.pop("config")
        result = api.plan_swap(_method_values(swap, kw))
        click.echo(json.dumps(result.to_json(), indent=2) if as_json else api.render_plan(result))

    options = stack(*map(click_option, api.command_options("plan")), recipe_options)
    return click.command("plan")(options(plan))


@click.command("verify")
@click.argument("out", type=click.Path(path_type=Path))
def verify_command(out: Path) -> None:
    """Check OUT's headers, index, sizes and per-file checksums (blake3 or sha256; sizes only when
    it was written with --checksum none) against its recipe."""
    click.echo(api.verify(out).summary())


@click.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("layerswap-demo"),
              show_default=True, help="Where the synthetic trio and the merged model go.")
def demo(workdir: Path) -> None:
    """Make a small synthetic base/task/language trio, show the plan, merge it, check the bytes."""
    from ..demo import run_demo
    run_demo(workdir, echo=click.echo)


def add_commands(group: click.Group) -> None:
    """Every command, the merge methods in registry order (``plan`` first: it shows a swap)."""
    from .mergekit import mergekit_yaml

    group.add_command(plan_command())
    for method in api.METHODS.values():  # mergekit's takes its own command line (CONFIG OUT), as mergekit's
        group.add_command(mergekit_yaml if method.name == "mergekit" else method_command(method))
    group.add_command(verify_command)
    group.add_command(demo)
