"""``layerswap-fast analyze``: row-MAV statistics of experts against their base, and the heatmap.

A thin layer over :func:`layerswap_fast.analysis.analyze`: it parses, calls and prints. Register it
with ``main.add_command(analyze)``; errors are the package's typed errors, which the CLI group
prints as ``error: ...`` with exit status 2.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..api import DEVICES, IO_MODES, SwapConfig
from ..errors import ConfigError

if TYPE_CHECKING:
    from .. import DeltaStats

# analysis (numpy, matplotlib) is imported when the command runs, so `merge` starts fast
_PATH = click.Path(path_type=Path)


def merge_command(config: SwapConfig, task_expert: str, language_expert: str, out: str = "merged",
                  base: str | None = None) -> str:
    """The ``layerswap-fast merge ...`` command line (shell-quoted) that applies ``config``'s layer
    counts; with ``base`` (needed when an expert is a LoRA adapter), ``--base`` too."""
    argv = ["layerswap-fast", "merge", "--task-expert", task_expert, "--language-expert", language_expert,
            *(["--base", base] if base is not None else []),
            "-o", out, "--bottom", str(config.bottom), "--top", str(config.top),
            "--lower-transition", str(config.lower_transition),
            "--upper-transition", str(config.upper_transition)]
    return shlex.join(argv)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


@click.command("analyze")
@click.option("--base", required=True, type=_PATH,
              help="The pretrained model the experts were fine-tuned from (a full model, not an adapter).")
@click.option("--expert", "experts", multiple=True, type=_PATH,
              help="An expert checkpoint or PEFT LoRA adapter directory (repeat for several); named after "
                   "its directory.")
@click.option("--language-expert", type=_PATH, default=None,
              help="The language expert (the donor of bottom/top layers); analysed like --expert and "
                   "used by --suggest.")
@click.option("--task-expert", type=_PATH, default=None,
              help="The task expert (the receiver); analysed like --expert and used by --suggest.")
@click.option("-o", "--output", "out", required=True, type=_PATH,
              help="Output directory for mav.csv, summary.json, heatmap.png (and rows/).")
@click.option("--rows", is_flag=True, help="Also save every tensor's row MAVs as rows/<expert>/<tensor>.npy.")
@click.option("--suggest", is_flag=True,
              help="Suggest --bottom/--top/transitions for a merge. Needs the two roles: "
                   "--language-expert and --task-expert, or exactly two --expert, the first being the "
                   "language expert and the second the task expert.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="Where the row MAVs are computed: auto uses a CUDA GPU when there is one.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU worker threads (default: all cores).")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--io", type=click.Choice(IO_MODES), default="auto", show_default=True,
              help="How input shards are read: mmap (straight from a read-only mapping, no copy), pread "
                   "(into buffers), or auto: mmap on local filesystems, pread on network and FUSE ones.")
def analyze(base: Path, experts: tuple[Path, ...], language_expert: Path | None, task_expert: Path | None,
            out: Path, rows: bool, suggest: bool, device: str, threads: int | None, force: bool, io: str) -> None:
    """Measure how far each expert moved from BASE: the row MAV (mean |expert - base| per row) of
    every parameter, as in Section 3.2 of the layer-swapping paper.

    Writes OUTPUT/mav.csv (one line per expert and tensor), OUTPUT/summary.json (average MAV and
    magnitude weight per expert) and OUTPUT/heatmap.png (the paper's Figure 2), and prints each
    expert's average MAV and magnitude weight. With --suggest, also two lines of reasoning and the
    `layerswap-fast merge` command line they lead to.

    An expert may be a PEFT LoRA adapter of BASE: it stands for BASE + s·B·A, so its row MAVs are
    those of s·B·A (formed in row chunks), those of tensors it saves whole are measured as usual,
    and those of tensors it leaves alone are 0. Full experts and adapters can be analysed side by
    side.

    \b
    Examples:
      layerswap-fast analyze --base llama --expert math --expert swahili -o stats
      layerswap-fast analyze --base llama --language-expert swahili --task-expert math -o stats --suggest
    """
    if (language_expert is None) != (task_expert is None):
        raise ConfigError("--language-expert and --task-expert go together")
    paths = list(experts)
    roles: tuple[int, int] | None = None  # (language index, task index) into paths
    if language_expert is not None and task_expert is not None:
        roles = (len(paths), len(paths) + 1)
        paths += [language_expert, task_expert]
    elif suggest:
        if len(paths) != 2:
            raise ConfigError(f"--suggest needs exactly two --expert (the language expert, then the task "
                              f"expert) or --language-expert/--task-expert; got {len(paths)} experts")
        roles = (0, 1)
    if not paths:
        raise ConfigError("give at least one --expert (or --language-expert and --task-expert)")
    from .. import analyze as run_analysis
    from .progress import progress_bar as _progress_bar

    with _progress_bar("analyzing") as progress:
        stats = run_analysis(base, paths, out, rows=rows, device=device, threads=threads, force=force,
                             progress=progress, io=io)
    gbps = stats.bytes_read / stats.seconds / 1e9 if stats.seconds > 0 else float("inf")
    n_tensors = len(next(iter(stats.experts.values())).tensors)
    click.echo(f"analyzed {len(stats.experts)} expert(s) against {base}: {n_tensors} tensors, "
               f"{stats.num_layers} layers, {_gb(stats.bytes_read)} read in {stats.seconds:.2f} s "
               f"({gbps:.2f} GB/s)")
    if stats.skipped:
        shown = ", ".join(f"{t} ({r})" for t, r in stats.skipped[:3])
        more = f" and {len(stats.skipped) - 3} more" if len(stats.skipped) > 3 else ""
        click.echo(f"skipped {len(stats.skipped)} tensor(s): {shown}{more}")
    try:
        weights: dict[str, float] | None = stats.magnitude_weights()
    except ConfigError:
        weights = None
    width = max(len("expert"), *(len(n) for n in stats.experts))
    click.echo(f"{'expert':<{width}}  {'average MAV':>12}  {'magnitude weight':>16}")
    for name, e in stats.experts.items():
        w = f"{weights[name]:.4f}" if weights is not None else "n/a"
        click.echo(f"{name:<{width}}  {e.average_mav:>12.6g}  {w:>16}")
    for name, e in stats.experts.items():
        if e.adapter is not None:
            click.echo(f"{name} is a LoRA adapter: {e.adapter['low_rank']} tensors updated by s·B·A, "
                       f"{e.adapter['replaced']} saved whole, {e.adapter['untouched']} left to the base (row MAV 0)")
    if weights is None:
        click.echo("(magnitude weights are undefined: an expert does not differ from the base)")
    click.echo(f"wrote {out}/: mav.csv, summary.json, heatmap.png" + (", rows/" if rows else ""))
    if suggest and roles is not None:
        _echo_suggestion(stats, *roles)


def _echo_suggestion(stats: DeltaStats, language_index: int, task_index: int) -> None:
    from .. import suggest_swap

    experts = list(stats.experts.values())
    language, task = experts[language_index], experts[task_index]
    config, reasons = suggest_swap(stats, language.name, task.name, stats.num_layers)
    click.echo("suggested swap:")
    for line in reasons:
        click.echo(f"  {line}")
    # the analysed paths, resolved (hub ids at their commits): the command works from any directory;
    # an adapter needs its base, which the analysis had
    base = stats.base.argument if language.is_adapter or task.is_adapter else None
    click.echo(merge_command(config, task.source.argument or task.name, language.source.argument or language.name,
                             base=base))

