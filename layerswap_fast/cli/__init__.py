"""``layerswap-fast``: the command line over the Python API. It parses, calls and prints."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from .. import api
from .._core import CoreError
from ..engine.execute import format_bytes
from ..errors import ConfigError, LayerswapError
from ..formats.layout import ReusedShard
from ..formats.output import LINK_MODES
from ..formats.writeback import CHECKSUMS
from ..plan import NON_LAYER, TRANSITION_WEIGHTS, SwapConfig, render_plan
from ..safe_read import Bool, Choice, Float, Int, List, Map, Nullable, Schema, Str, read_json, read_yaml, show_path

#: options that never change the output's bytes: left out of recipes
_NOT_IN_RECIPE = {"out", "force", "sync", "checksum", "dry_run", "threads", "device", "gpu_memory", "link", "config", "dump_config",
                  "as_json"}


class _Group(click.Group):
    """Every failure a user can cause ends as one line ``error: ...`` and exit status 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs["standalone_mode"] = False
        _log_notes_to_stderr()
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            rv = super().main(*args, **kwargs)
        except (LayerswapError, CoreError, click.ClickException) as e:
            message = e.format_message() if isinstance(e, click.ClickException) else str(e)
            _error_line(message)
        except OSError as e:  # a path the OS refuses, wherever it was met: the API cleaned up already
            _error_line(f"{e.filename!r}: {e.strerror or e}" if e.filename is not None else str(e))
        except (_Interrupted, KeyboardInterrupt, click.exceptions.Abort):
            click.echo("error: interrupted; nothing was written", err=True)
            sys.exit(130)
        finally:
            signal.signal(signal.SIGTERM, previous)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # before click turns it into Abort with a stray blank line
            raise _Interrupted from None


def _error_line(message: str) -> None:
    """Print ``error: MESSAGE`` as one line and exit 2. Control characters (a newline in a path)
    and undecodable bytes (surrogate escapes in a path from argv) are escaped, never printed."""
    safe = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    click.echo(f"error: {safe}", err=True)
    sys.exit(2)


class _Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the API's cleanup has already run."""


def _log_notes_to_stderr() -> None:
    logger = logging.getLogger("layerswap_fast")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("note: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="layerswap-fast")
def main() -> None:
    """Layer swapping (arXiv 2410.01335) of safetensors checkpoints, streamed: the bottom and top
    layers of a language expert replace those of a task expert, transition layers are blended,
    non-layer parameters averaged. Also the paper's baselines: soups, task arithmetic, TIES, reverts."""


def run() -> None:
    """The console script: :func:`main`, then exit without tearing the interpreter down.

    By then the output is published and every file is closed; freeing each module and object one
    by one would only add ~10 ms to every command (a 1b merge takes 0.8 s)."""
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ------------------------------------------------------------------------------- recipes

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


def _dump_config(ctx: click.Context) -> None:
    import yaml

    options = {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
               for k, v in ctx.params.items() if k not in _NOT_IN_RECIPE and v not in (None, ())}
    options = {k: [str(x) for x in v] if isinstance(v, list) else v for k, v in options.items()}
    click.echo(yaml.safe_dump({"command": ctx.info_name, "options": options}, sort_keys=False), nl=False)


# ------------------------------------------------------------------------------- options

def _stack(*options: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            f = option(f)
        return f
    return apply


swap_options = _stack(
    click.option("--task-expert", multiple=True, required=True, type=click.Path(path_type=Path),
                 help="Checkpoint whose middle layers are kept (the paper's math expert). Repeat to soup "
                      "several task experts before the swap."),
    click.option("--language-expert", multiple=True, required=True, type=click.Path(path_type=Path),
                 help="Checkpoint whose bottom and top layers are swapped in. Repeat to soup several."),
    click.option("--bottom", default=5, show_default=True, help="Layers swapped in at the bottom."),
    click.option("--top", default=2, show_default=True, help="Layers swapped in at the top."),
    click.option("--lower-transition", default=1, show_default=True, help="Blended layers above the bottom block."),
    click.option("--upper-transition", default=1, show_default=True, help="Blended layers below the top block."),
    click.option("--transition-weights", type=click.Choice(TRANSITION_WEIGHTS), default="uniform", show_default=True,
                 help="uniform: 0.5/0.5; ramp: linear from the language side to the task side across each "
                      "zone; magnitude: ∝ 1 / average row MAV against --base (the paper's magnitude-adjusted average)."),
    click.option("--non-layer", type=click.Choice(NON_LAYER), default="average", show_default=True,
                 help="Embeddings, final norm, lm_head: average both experts, take one, or magnitude-weight them."),
    click.option("--soup-weights", type=click.Choice(api.SOUP_WEIGHTS), default="uniform", show_default=True,
                 help="How repeated task/language experts are souped within each group."),
    click.option("--base", type=click.Path(path_type=Path), default=None,
                 help="The model both experts were fine-tuned from; needed for magnitude weights."),
    click.option("--stats", type=click.Path(path_type=Path), default=None,
                 help="Reuse an earlier `analyze` output directory for magnitude weights instead of recomputing."),
    click.option("--dtype", default=None, help="Output dtype (bf16, f16, f32); default: the task expert's."),
)

write_options = _stack(
    click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
                 help="Output directory; it appears complete or not at all."),
    click.option("--shard-size", default="5GB", show_default=True, help="Largest new output shard."),
    click.option("--threads", type=int, default=None, help="Worker threads (default: all cores)."),
    click.option("--device", type=click.Choice(api.DEVICES), default="auto", show_default=True,
                 help="Where blends run: auto uses a CUDA GPU when there is one."),
    click.option("--gpu-memory", default="256MB", show_default=True,
                 help="Most GPU memory the CUDA backend may use (staging buffers of all inputs)."),
    click.option("--link", type=click.Choice(LINK_MODES), default="auto", show_default=True,
                 help="How input shards the merge leaves unchanged are reused whole: auto = a copy-on-write "
                      "reflink where the filesystem supports it, else a kernel-side copy; reflink; copy; "
                      "hard or symlink only when asked for: those share the input's bytes, so a later "
                      "in-place change to one file changes the other."),
    click.option("--force", is_flag=True, help="Replace an existing output directory."),
    click.option("--sync", is_flag=True, help="fsync the output before publishing it (durable across a power loss)."),
    click.option("--checksum", type=click.Choice(CHECKSUMS), default="blake3", show_default=True,
                 help="Per-shard checksum recorded for `verify`; sha256 costs about 3x the CPU time of blake3."),
    click.option("--dry-run", is_flag=True, help="Validate and plan the layout, write nothing."),
    recipe_options,
)


def _config(kw: dict[str, Any]) -> SwapConfig:
    return SwapConfig(bottom=kw.pop("bottom"), top=kw.pop("top"),
                      lower_transition=kw.pop("lower_transition"), upper_transition=kw.pop("upper_transition"),
                      transition_weights=kw.pop("transition_weights"), non_layer=kw.pop("non_layer"))


def _write_kwargs(kw: dict[str, Any], progress: Callable[[int, int], None] | None,
                  config: Path | None) -> dict[str, Any]:
    return {"other_inputs": [config] if config is not None else [],
            "shard_size": kw.pop("shard_size"), "threads": kw.pop("threads"), "device": kw.pop("device"),
            "max_gpu_bytes": kw.pop("gpu_memory"), "link": kw.pop("link"), "force": kw.pop("force"),
            "dry_run": kw.pop("dry_run"), "sync": kw.pop("sync"), "checksum": kw.pop("checksum"),
            "progress": progress}


def _report(result: api.MergeResult, out: Path) -> None:
    if result.stats is not None:
        click.echo(result.stats.summary())
        return
    reused = [s for s in result.shards if isinstance(s, ReusedShard)]
    written = sum(s.file_size for s in result.shards if not isinstance(s, ReusedShard))
    n = result.plan.counts()
    click.echo(f"dry run: would write {len(result.shards)} shards to {out}: {format_bytes(written)} new, "
               f"{len(reused)} input shards reused ({format_bytes(sum(s.file_size for s in reused))}); "
               f"{n['copy']} tensors copied, {n['tensors'] - n['copy']} computed")


def _run_writer(ctx: click.Context, kw: dict[str, Any], call: Callable[..., api.MergeResult]) -> None:
    """Shared tail of every command that writes a model: --dump-config, progress, summary."""
    if kw.pop("dump_config"):
        _dump_config(ctx)
        return
    config = kw.pop("config")
    out = kw["out"]
    with _progress_bar() as progress:
        result = call(**_write_kwargs(kw, progress, config))
    _report(result, out)


# ------------------------------------------------------------------------------- commands

@main.command()
@swap_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON, for tools.")
@recipe_options
@click.pass_context
def plan(ctx: click.Context, task_expert: tuple[Path, ...], language_expert: tuple[Path, ...], dtype: str | None,
         soup_weights: str, base: Path | None, stats: Path | None, as_json: bool, config: Path | None,
         dump_config: bool, **kw: Any) -> None:
    """Print the layer map (layer → source and weights); reads headers only, no tensor data."""
    if dump_config:
        _dump_config(ctx)
        return
    result = api.plan_merge(list(task_expert), list(language_expert), _config(kw), dtype=dtype,
                            soup_weights=soup_weights, base=base, stats=stats)
    click.echo(json.dumps(result.to_json(), indent=2) if as_json else render_plan(result))


@main.command()
@swap_options
@write_options
@click.pass_context
def merge(ctx: click.Context, task_expert: tuple[Path, ...], language_expert: tuple[Path, ...], dtype: str | None,
          soup_weights: str, base: Path | None, stats: Path | None, **kw: Any) -> None:
    """Layer-swap LANGUAGE-EXPERT into TASK-EXPERT and write the merged checkpoint. With several
    experts of a kind, each group is souped first, in the same streaming pass."""
    config = None if kw["dump_config"] else _config(kw)
    _run_writer(ctx, kw, lambda **w: api.merge(list(task_expert), list(language_expert), kw["out"], config,
                                                dtype=dtype, soup_weights=soup_weights, base=base, stats=stats, **w))


@main.command()
@click.option("--model", multiple=True, required=True, type=click.Path(path_type=Path), help="A model to soup (repeat).")
@click.option("--weights", default="uniform", show_default=True,
              help="uniform, magnitude (∝ 1 / average row MAV against --base), or w1,w2,... (normalised).")
@click.option("--base", type=click.Path(path_type=Path), default=None, help="Base model, for --weights magnitude.")
@click.option("--stats", type=click.Path(path_type=Path), default=None, help="An earlier `analyze` output to reuse.")
@click.option("--dtype", default=None, help="Output dtype (bf16, f16, f32); default: the first model's.")
@write_options
@click.pass_context
def soup(ctx: click.Context, model: tuple[Path, ...], weights: str, base: Path | None, stats: Path | None,
         dtype: str | None, **kw: Any) -> None:
    """A model soup: the weighted average of several models."""
    parsed: str | list[float] = weights
    if weights not in ("uniform", "magnitude"):
        try:
            parsed = [float(w) for w in str(weights).split(",")]
        except ValueError:
            raise ConfigError(f"--weights must be uniform, magnitude or numbers like 0.3,0.7, got {weights!r}") from None
    _run_writer(ctx, kw, lambda **w: api.soup(list(model), kw["out"], weights=parsed, base=base, stats=stats,
                                              dtype=dtype, **w))


base_and_models = _stack(
    click.option("--base", required=True, type=click.Path(path_type=Path), help="The model the others were fine-tuned from."),
    click.option("--model", multiple=True, required=True, type=click.Path(path_type=Path), help="A fine-tuned model (repeat)."),
    click.option("--lambda", "lam", type=float, default=1.0, show_default=True, help="Scale of the merged delta."),
    click.option("--dtype", default=None, help="Output dtype (bf16, f16, f32); default: the first model's."),
)


@main.command("task-arithmetic")
@base_and_models
@write_options
@click.pass_context
def task_arithmetic(ctx: click.Context, base: Path, model: tuple[Path, ...], lam: float, dtype: str | None,
                    **kw: Any) -> None:
    """Task arithmetic: base + λ·Σ(modelᵢ − base)."""
    _run_writer(ctx, kw, lambda **w: api.task_arithmetic(base, list(model), kw["out"], lam=lam, dtype=dtype, **w))


@main.command()
@base_and_models
@click.option("--density", type=float, default=0.2, show_default=True,
              help="Fraction of each delta kept, by magnitude (values tied at the threshold are all kept).")
@write_options
@click.pass_context
def ties(ctx: click.Context, base: Path, model: tuple[Path, ...], lam: float, dtype: str | None, density: float,
         **kw: Any) -> None:
    """TIES-merging: trim each delta, elect signs, average the agreeing deltas, add to the base."""
    _run_writer(ctx, kw, lambda **w: api.ties(base, list(model), kw["out"], density=density, lam=lam, dtype=dtype, **w))


@main.command()
@click.option("--base", required=True, type=click.Path(path_type=Path), help="The model to revert towards.")
@click.option("--model", required=True, type=click.Path(path_type=Path), help="The fine-tuned model.")
@click.option("--layers", default=None, help="Whole layers back to the base, e.g. 0-4,30-31.")
@click.option("--row-threshold", type=float, default=None, help="Rows whose row MAV is below this go back to the base.")
@click.option("--row-fraction", type=float, default=None,
              help="This fraction of each tensor's rows, the least changed, go back to the base.")
@write_options
@click.pass_context
def revert(ctx: click.Context, base: Path, model: Path, layers: str | None, row_threshold: float | None,
           row_fraction: float | None, **kw: Any) -> None:
    """Send fine-tuning updates back to the base (paper, Section 3.3)."""
    _run_writer(ctx, kw, lambda **w: api.revert(base, model, kw["out"], layers=layers, row_threshold=row_threshold,
                                                row_fraction=row_fraction, **w))


@contextmanager
def _progress_bar(label: str = "merging") -> Iterator[Callable[[int, int], None] | None]:
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


@main.command("verify")
@click.argument("out", type=click.Path(path_type=Path))
def verify_command(out: Path) -> None:
    """Check OUT's headers, index, sizes and per-shard sha256 against its recipe."""
    from ..formats.verify import verify
    click.echo(verify(out).summary())


@main.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("layerswap-demo"),
              show_default=True, help="Where the synthetic trio and the merged model go.")
def demo(workdir: Path) -> None:
    """Make a small synthetic base/task/language trio, show the plan, merge it, check the bytes."""
    from ..demo import run_demo
    run_demo(workdir, echo=click.echo)


def _register_analyze() -> None:
    from .analyze import analyze
    main.add_command(analyze)


_register_analyze()
