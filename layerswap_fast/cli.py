"""``layerswap-fast``: the command line over the Python API. It parses, calls and prints."""

from __future__ import annotations

import json
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from . import api
from ._core import CoreError
from .engine import format_bytes
from .output import LINK_MODES
from .errors import LayerswapError
from .layout import ReusedShard
from .plan import NON_LAYER, SwapConfig, render_plan


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
            click.echo(f"error: {message}", err=True)
            sys.exit(2)
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
    non-layer parameters averaged."""


def swap_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options that define a swap, shared by ``merge`` and ``plan``."""
    options = [
        click.option("--task-expert", required=True, type=click.Path(path_type=Path),
                     help="Checkpoint whose middle layers are kept (the paper's math expert)."),
        click.option("--language-expert", required=True, type=click.Path(path_type=Path),
                     help="Checkpoint whose bottom and top layers are swapped in."),
        click.option("--bottom", default=5, show_default=True, help="Layers swapped in at the bottom."),
        click.option("--top", default=2, show_default=True, help="Layers swapped in at the top."),
        click.option("--lower-transition", default=1, show_default=True,
                     help="Blended layers above the bottom block."),
        click.option("--upper-transition", default=1, show_default=True,
                     help="Blended layers below the top block."),
        click.option("--transition-weights", type=click.Choice(["uniform", "ramp"]), default="uniform",
                     show_default=True, help="uniform: 0.5/0.5; ramp: linear from the language side "
                     "to the task side across each zone."),
        click.option("--non-layer", type=click.Choice(NON_LAYER), default="average", show_default=True,
                     help="Embeddings, final norm, lm_head: average both experts or take one."),
        click.option("--dtype", default=None, help="Output dtype (bf16, f16, f32); default: the task expert's."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _config(kw: dict[str, Any]) -> SwapConfig:
    return SwapConfig(bottom=kw.pop("bottom"), top=kw.pop("top"),
                      lower_transition=kw.pop("lower_transition"), upper_transition=kw.pop("upper_transition"),
                      transition_weights=kw.pop("transition_weights"), non_layer=kw.pop("non_layer"))


@main.command()
@swap_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON, for tools.")
def plan(task_expert: Path, language_expert: Path, dtype: str | None, as_json: bool, **kw: Any) -> None:
    """Print the layer map (layer → source and weights); reads headers only, no tensor data."""
    result = api.plan_merge(task_expert, language_expert, _config(kw), dtype=dtype)
    click.echo(json.dumps(result.to_json(), indent=2) if as_json else render_plan(result))


@main.command()
@swap_options
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Output directory; it appears complete or not at all.")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest output shard.")
@click.option("--threads", type=int, default=None, help="Worker threads for blends (default: all cores).")
@click.option("--device", type=click.Choice(api.DEVICES), default="auto", show_default=True,
              help="Where blends run: auto uses a CUDA GPU when there is one.")
@click.option("--gpu-memory", default="256MB", show_default=True,
              help="Most GPU memory the CUDA backend may use (staging buffers of all inputs).")
@click.option("--link", type=click.Choice(LINK_MODES), default="auto", show_default=True,
              help="How input shards the merge leaves unchanged are reused whole: auto = a copy-on-write "
                   "reflink where the filesystem supports it, else a kernel-side copy; reflink; copy; "
                   "hard or symlink only when asked for: those share the input's bytes, so a later "
                   "in-place change to one file changes the other.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--dry-run", is_flag=True, help="Validate and plan the layout, write nothing.")
def merge(task_expert: Path, language_expert: Path, out: Path, dtype: str | None, shard_size: str,
          threads: int | None, device: str, gpu_memory: str, link: str, force: bool, dry_run: bool,
          **kw: Any) -> None:
    """Layer-swap LANGUAGE-EXPERT into TASK-EXPERT and write the merged checkpoint."""
    config = _config(kw)
    if dry_run:
        result = api.merge(task_expert, language_expert, out, config, dtype=dtype, shard_size=shard_size,
                           force=force, dry_run=True, link=link)
        reused = [s for s in result.shards if isinstance(s, ReusedShard)]
        written = sum(s.file_size for s in result.shards if not isinstance(s, ReusedShard))
        n = result.plan.counts()
        click.echo(f"dry run: would write {len(result.shards)} shards to {out}: {format_bytes(written)} new, "
                   f"{len(reused)} input shards reused ({format_bytes(sum(s.file_size for s in reused))}); "
                   f"{n['copy']} tensors copied, {n['blend']} blended")
        return
    with _progress_bar() as progress:
        result = api.merge(task_expert, language_expert, out, config, dtype=dtype, shard_size=shard_size,
                           threads=threads, device=device, force=force, link=link, max_gpu_bytes=gpu_memory,
                           progress=progress)
    assert result.stats is not None
    click.echo(result.stats.summary())


@contextmanager
def _progress_bar() -> Iterator[Callable[[int, int], None] | None]:
    """A byte progress bar on a terminal; nothing when stderr is piped."""
    if not sys.stderr.isatty():
        yield None
        return
    bars: list[Any] = []

    def update(n: int, total: int) -> None:
        if not bars:
            bars.append(click.progressbar(length=total, label="merging", file=sys.stderr))
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
    from .verify import verify
    click.echo(verify(out).summary())


@main.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("layerswap-demo"),
              show_default=True, help="Where the synthetic trio and the merged model go.")
def demo(workdir: Path) -> None:
    """Make a small synthetic base/task/language trio, show the plan, merge it, check the bytes."""
    from .demo import run_demo
    run_demo(workdir, echo=click.echo)


if __name__ == "__main__":
    main()
