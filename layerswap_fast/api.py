"""The Python API: plan and run merges. The CLI is a thin layer over these functions.

Every function that writes a model records a recipe beside it (``layerswap_recipe.json``) whose
``options`` are the CLI options that rebuild it: ``layerswap-fast COMMAND --config RECIPE -o OUT``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ._core import __version__
from .formats.checkpoint import Checkpoint, open_checkpoint
from .engine.backends import DEVICES, Backend, make_backend
from .engine.execute import MergeStats, execute
from .dtypes import TORCH_NAMES
from .errors import ConfigError, MismatchError, param
from .plan.layers import count_layers
from .formats.layout import (OutputShard, ReusableShard, ReusedShard, find_reusable, index_json, layout_shards,
                             needed_bytes)
from .formats.output import LINK_MODES, guarded_paths, check_output, clean_stale_partials, output_location
from .formats.side_files import find_side_files, side_bytes
from .formats.verify import verify
from .formats.writeback import CHECKSUMS, DEFAULT_CHECKSUM
from .methods import METHODS, Method, Option, PlanInputs
from .methods.common import BASE
from .methods.swap import SOUP_WEIGHTS, SwapConfig, render_plan
from .plan import MergePlan, TensorRecipe, describe_role
from .safe_read import Map, Str, read_json, read_yaml, show_path
from .units import format_bytes, parse_size

#: what the command line offers, named here so that it needs nothing below the API
__all__ = ["METHODS", "Method", "Option", "DEVICES", "LINK_MODES", "CHECKSUMS", "SOUP_WEIGHTS", "MergeResult", "WriteOptions", "run",
           "plan_merge", "plan_swap", "read_config", "recipe_yaml", "command_options", "WRITE_OPTIONS", "merge", "soup", "task_arithmetic", "ties", "revert", "render_plan", "verify"]

log = logging.getLogger("layerswap_fast")
PathLike = str | os.PathLike[str]
Paths = PathLike | Sequence[PathLike]


@dataclass
class MergeResult:
    """What a merge did: the plan, the shard layout and (unless a dry run) the stats."""

    plan: MergePlan
    shards: list[OutputShard]
    stats: MergeStats | None
    recipe: dict[str, Any]

    def summary(self, out: PathLike) -> str:
        """One line: what was written (or, for a dry run, what would be)."""
        if self.stats is not None:
            return self.stats.summary()
        reused = [s for s in self.shards if isinstance(s, ReusedShard)]
        written = sum(s.file_size for s in self.shards if not isinstance(s, ReusedShard))
        n = self.plan.counts()
        return (f"dry run: would write {len(self.shards)} shards to {out}: {format_bytes(written)} new, "
                f"{len(reused)} input shards reused ({format_bytes(sum(s.file_size for s in reused))}); "
                f"{n['copy']} tensors copied, {n['tensors'] - n['copy']} computed")


@dataclass(frozen=True)
class WriteOptions:
    """How a model is written; none of these change its bytes except ``shard_size``."""

    shard_size: int | str = "5GB"
    threads: int | None = None
    device: str = "auto"
    force: bool = False
    dry_run: bool = False
    link: str = "auto"
    max_gpu_bytes: int | str = "256MB"
    blender: Backend | None = None
    progress: Callable[[int, int], None] | None = None
    sync: bool = False
    checksum: str = DEFAULT_CHECKSUM
    #: files the command read besides its checkpoints (a ``--config`` file): never written or removed
    other_inputs: Sequence[PathLike] = ()


#: the options of every command that writes a model, declared once like a method's (the CLI's
#: flags and ``--config`` checks follow); only ``shard_size`` changes the bytes, so only it is recorded
WRITE_OPTIONS: tuple[Option, ...] = (
    Option("out", "path", "Output directory; it appears complete or not at all.", required=True, flag="--output",
           short="-o", recorded=False),
    Option("shard_size", "text", "Largest new output shard.", default="5GB"),
    Option("threads", "int", "Worker threads (default: all cores).", recorded=False),
    Option("device", "choice", "Where blends run: auto uses a CUDA GPU when there is one.", default="auto",
           choices=DEVICES, recorded=False),
    Option("gpu_memory", "text", "Most GPU memory the CUDA backend may use (staging buffers of all inputs).",
           default="256MB", api="max_gpu_bytes", recorded=False),
    Option("link", "choice", "How input shards the merge leaves unchanged are reused whole: auto = a copy-on-write "
           "reflink where the filesystem supports it, else a kernel-side copy; reflink; copy; hard or symlink "
           "only when asked for: those share the input's bytes, so a later in-place change to one file changes "
           "the other.", default="auto", choices=LINK_MODES, recorded=False),
    Option("force", "flag", "Replace an existing output directory.", default=False, recorded=False),
    Option("sync", "flag", "fsync the output before publishing it (durable across a power loss).", default=False,
           recorded=False),
    Option("checksum", "choice", "Per-file checksum recorded for `verify`: blake3, or sha256 at about 3x its "
           "CPU time.", default=DEFAULT_CHECKSUM, choices=CHECKSUMS, recorded=False),
    Option("dry_run", "flag", "Validate and plan the layout, write nothing.", default=False, recorded=False),
)
#: what only the command line may set: rebuilding a shared recipe or config must not choose where
#: the output goes or whether something is replaced
COMMAND_LINE_ONLY = ("out", "force")
PLAN_OPTIONS = (Option("as_json", "flag", "Print the plan as JSON, for tools.", default=False, flag="--json",
                       recorded=False),)


def command_options(command: str) -> tuple[Option, ...]:
    """Every option of a CLI command that plans or writes a merge, as declared."""
    if command == "plan":
        return METHODS["layer_swap"].options + PLAN_OPTIONS
    method = next((m for m in METHODS.values() if m.command == command), None)
    if method is None:
        raise ConfigError(f"no merge command {command!r}")
    return method.options + WRITE_OPTIONS


#: keys of a plain config (not a recipe) that describe it rather than set an option
_DESCRIPTIVE = ("command", "tool", "version")
_CONFIG_SCHEMA = Map({"command": Str(), "options": Map(min_len=1)})


def read_config(path: PathLike, command: str) -> dict[str, Any]:
    """Option values of ``command`` from a YAML (or JSON) mapping of option names to values, or
    from an output's ``layerswap_recipe.json`` (whose ``options`` are the values). Every value is
    checked against its option's declared type; the output and ``force`` are refused."""
    read = read_json if Path(path).suffix.lower() == ".json" else read_yaml
    data = read(path, _CONFIG_SCHEMA)
    where = show_path(path)
    if data.get("command") not in (None, command):
        raise ConfigError(f"config {where} is a recipe for '{data['command']}', not '{command}'")
    recipe = "options" in data
    given = data["options"] if recipe else {k: v for k, v in data.items() if k not in _DESCRIPTIVE}
    declared = {o.name: o for o in command_options(command)}
    aliases = {o.alias: o.name for o in declared.values()}
    for key in {*data, *given}:  # a recipe's top level too: the file may not name them anywhere
        name = _config_name(key, aliases)
        if name in COMMAND_LINE_ONLY:
            what = "the output" if name == "out" else param(name)
            raise ConfigError(f"config {where} sets {what}; only the command line may set the output and "
                              f"{param('force')}")
    values: dict[str, Any] = {}
    for key, value in given.items():
        name = _config_name(key, aliases)
        if name not in declared:
            raise ConfigError(f"config {where}: unknown option {key!r} for '{command}'")
        if name in values:
            raise ConfigError(f"config {where} sets {name} twice")
        declared[name].schema().check(value, where, f"options.{key}" if recipe else key)
        values[name] = value
    return values


def _config_name(key: str, aliases: Mapping[str, str]) -> str:
    name = key.replace("-", "_")
    return aliases.get(name, name)


def recipe_yaml(command: str, values: Mapping[str, Any]) -> str:
    """The ``--config`` file (YAML) that gives ``command`` these option values: those that are
    recorded in recipes, and set."""
    import yaml

    def plain(v: Any) -> Any:
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else str(v) if isinstance(v, os.PathLike) else v

    options = {o.name: plain(values[o.name]) for o in command_options(command)
               if o.recorded and values.get(o.name) not in (None, ())}
    return yaml.safe_dump({"command": command, "options": options}, sort_keys=False)


def _layer_count(checkpoints: Mapping[str, Checkpoint]) -> int:
    counts = {role: count_layers(c.names, c.config, f"{describe_role(role)} {c.path}") for role, c in checkpoints.items()}
    first = next(iter(counts))
    for role, n in counts.items():
        if n != counts[first]:
            raise MismatchError(f"the {describe_role(first)} has {counts[first]} layers but the {describe_role(role)} has {n}")
    return counts[first]


def reusable_shards(plan: MergePlan, inputs: Mapping[str, Checkpoint]) -> list[ReusableShard]:
    """Input shards the output can take whole (every tensor copied from that same input)."""
    candidates = {role: [ReusableShard(role, sh.path, tuple(t.name for t in sh.tensors), sh.size,
                                       sum(t.nbytes for t in sh.tensors)) for sh in ckpt.shards]
                  for role, ckpt in inputs.items()}
    return find_reusable(plan.tensors, candidates)


def _copied_from(recipe: TensorRecipe, inputs: Mapping[str, Checkpoint]) -> int | None:
    """Where in its input file a copied tensor's bytes are (the layout aligns to it)."""
    return inputs[recipe.terms[0].role].specs[recipe.name].offset if recipe.op == "copy" else None


def _recipe(command: str, plan: MergePlan, inputs: Mapping[str, Checkpoint], options: Mapping[str, Any],
            extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to rebuild the output: tool, command and options, inputs, plan summary."""
    recipe: dict[str, Any] = {
        "tool": "layerswap-fast", "version": __version__, "method": plan.method, "command": command,
        "options": {k: v for k, v in options.items() if v is not None},
        "inputs": {role: {"path": str(Path(c.path).resolve()), "fingerprint": c.fingerprint(),
                          "content_sample": c.content_sample()} for role, c in inputs.items()},
        "config": asdict(plan.config) if plan.config is not None else None,
        "dtype": plan.dtype,
    }
    return {**recipe, **(extra or {})}


def _write(command: str, plan: MergePlan, inputs: Mapping[str, Checkpoint], out: PathLike,
           options: Mapping[str, Any], write: WriteOptions, side_source: Checkpoint,
           extra: Mapping[str, Any] | None = None, other_inputs: Sequence[PathLike | None] = ()) -> MergeResult:
    """Lay out, check and (unless a dry run) execute a plan over opened inputs."""
    if write.link not in LINK_MODES:
        raise ConfigError(f"link must be one of {', '.join(LINK_MODES)}, got {write.link!r}")
    if write.checksum not in CHECKSUMS:
        raise ConfigError(f"checksum must be one of {', '.join(CHECKSUMS)}, got {write.checksum!r}")
    size_limit = parse_size(write.shard_size)
    out_path = output_location(out)
    # only what decides the bytes: thread count, device and link mode never change them
    recipe = _recipe(command, plan, inputs, {**options, "shard_size": str(write.shard_size)}, extra)
    metadata = {"format": "pt", "layerswap_fast": json.dumps(recipe, separators=(",", ":"), sort_keys=True)}
    shards = layout_shards(plan.tensors, size_limit, metadata, reusable_shards(plan, inputs),
                           source_offset=lambda r: _copied_from(r, inputs))
    side_files = find_side_files(side_source.directory)
    guarded = guarded_paths(inputs.values(), [*other_inputs, *write.other_inputs])
    check_output(out_path, guarded, write.force, needed_bytes(shards, write.link) + side_bytes(side_files)
                 + _small_files_bytes(recipe, shards, len(side_files)))
    if write.dry_run:
        return MergeResult(plan, shards, None, recipe)
    clean_stale_partials(out_path, log.warning)
    backend = write.blender or make_backend(write.device, write.threads, parse_size(write.max_gpu_bytes))
    try:
        overrides = {"torch_dtype": TORCH_NAMES[plan.dtype]} if plan.dtype else {}
        stats = execute(shards, inputs, out_path, backend=backend, recipe=recipe, side_files=side_files,
                        config_overrides=overrides, force=write.force, link=write.link,
                        threads=write.threads or 0, sync=write.sync, checksum=write.checksum,
                        progress=write.progress)
    finally:
        if write.blender is None:
            backend.close()
    return MergeResult(plan, shards, stats, recipe)


def _small_files_bytes(recipe: Mapping[str, Any], shards: Sequence[OutputShard], side_files: int) -> int:
    """An upper bound of the index and the recipe: the index exactly, the recipe as known now and
    a generous entry per shard (name, size, checksum, source), and a block per file for rounding."""
    index = len(json.dumps(index_json(shards), indent=2)) + 1
    entries = sum(512 + (len(str(s.reuse.source)) if isinstance(s, ReusedShard) else 0) for s in shards)
    return index + len(json.dumps(recipe, indent=2)) + 2 * entries + 4096 * (len(shards) + side_files + 3)


def _open_all(stack: ExitStack, roles: Mapping[str, PathLike]) -> dict[str, Checkpoint]:
    return {role: stack.enter_context(open_checkpoint(path)) for role, path in roles.items()}


def _magnitude(base: PathLike | None, experts: Sequence[PathLike], stats: PathLike | None, device: str = "auto",
               threads: int | None = None) -> list[float]:
    """Magnitude-adjusted weights (∝ 1 / average row MAV against the base), normalised; an analysis
    they need runs on the merge's ``device`` and ``threads``."""
    if base is None:
        raise ConfigError(f"magnitude weights need the base model: pass {param('base')} (and optionally {param('stats')} DIR)")
    from .analysis import magnitude_weights_for
    return list(magnitude_weights_for(base, experts, stats_dir=stats, device=device, threads=threads))


def _plan(stack: ExitStack, method: Method, options: Mapping[str, Any], device: str = "auto",
          threads: int | None = None) -> tuple[MergePlan, dict[str, Checkpoint]]:
    """Open the method's inputs and plan: headers only, except the row-MAV analysis that
    magnitude weights need when no ``stats`` are given."""
    paths = method.inputs(options)
    inputs = _open_all(stack, paths)
    num_layers = _layer_count(inputs) if method.counts_layers else 0

    def magnitude(roles: Sequence[str]) -> list[float]:
        return _magnitude(options.get("base"), [paths[r] for r in roles], options.get("stats"), device, threads)

    specs = {role: list(c.specs.values()) for role, c in inputs.items()}
    return method.plan(PlanInputs(specs, num_layers, magnitude), options), inputs


def run(method: str, out: PathLike, options: Mapping[str, Any], **write: Any) -> MergeResult:
    """Run the merge method ``method`` (a key of :data:`layerswap_fast.methods.METHODS`) with its
    ``options`` (by their recipe names; the rest take their defaults) and write the model to ``out``.

    ``write`` takes :class:`WriteOptions`. Every other function of this module that writes a model
    is this one with the method's own signature.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown merge method {method!r}: choose one of {', '.join(METHODS)}")
    m = METHODS[method]
    values = m.resolve(options)
    settings = WriteOptions(**write)
    with ExitStack() as stack:
        plan, inputs = _plan(stack, m, values, settings.device, settings.threads)
        recorded = m.recorded(values, plan)
        side_source = next(c for role, c in inputs.items() if role != BASE)
        read = [values[o.name] for o in m.options if o.kind == "path"]  # a base, statistics: never written
        return _write(m.command, plan, inputs, out, recorded, settings, side_source, m.extra(plan), read)


def plan_merge(task_expert: Paths, language_expert: Paths, config: SwapConfig | None = None, *,
               dtype: str | None = None, soup_weights: str = "uniform", base: PathLike | None = None,
               stats: PathLike | None = None) -> MergePlan:
    """Plan a layer swap from the checkpoints' headers (no tensor data is read, except the
    row-MAV analysis that ``magnitude`` weights need when no ``stats`` are given)."""
    return plan_swap(_swap_options(task_expert, language_expert, config, dtype, soup_weights, base, stats))


def plan_swap(options: Mapping[str, Any]) -> MergePlan:
    """:func:`plan_merge` with the swap's options by their recipe names (``bottom``, ``top`` ...)."""
    swap = METHODS["layer_swap"]
    with ExitStack() as stack:
        return _plan(stack, swap, swap.resolve(options))[0]


def _swap_options(task_expert: Paths, language_expert: Paths, config: SwapConfig | None, dtype: str | None,
                  soup_weights: str, base: PathLike | None, stats: PathLike | None) -> dict[str, Any]:
    c = config or SwapConfig()
    return {"task_expert": task_expert, "language_expert": language_expert, "bottom": c.bottom, "top": c.top,
            "lower_transition": c.lower_transition, "upper_transition": c.upper_transition,
            "transition_weights": c.transition_weights, "non_layer": c.non_layer, "soup_weights": soup_weights,
            "base": base, "stats": stats, "dtype": dtype}


def merge(
    task_expert: Paths,
    language_expert: Paths,
    out: PathLike,
    config: SwapConfig | None = None,
    *,
    dtype: str | None = None,
    soup_weights: str = "uniform",
    base: PathLike | None = None,
    stats: PathLike | None = None,
    shard_size: int | str = "5GB",
    threads: int | None = None,
    device: str = "auto",
    force: bool = False,
    dry_run: bool = False,
    link: str = "auto",
    max_gpu_bytes: int | str = "256MB",
    blender: Backend | None = None,
    progress: Callable[[int, int], None] | None = None,
    sync: bool = False,
    checksum: str = DEFAULT_CHECKSUM,
    other_inputs: Sequence[PathLike] = (),
) -> MergeResult:
    """Layer-swap ``language_expert`` into ``task_expert`` and write the result to ``out``.

    Streams: memory does not grow with the model. The output directory appears complete or not
    at all. Several task or language experts (a list) are souped per group (``soup_weights``
    uniform or magnitude) and swapped in the same streaming pass, with no intermediate model
    written. ``magnitude`` weights (``config.transition_weights``/``non_layer``, ``soup_weights``)
    are ∝ 1 / average row MAV against ``base``, from an earlier ``analyze`` in ``stats`` when given.
    The other keywords are the :class:`WriteOptions`, as for every method.
    """
    options = _swap_options(task_expert, language_expert, config, dtype, soup_weights, base, stats)
    return run("layer_swap", out, options, **vars(WriteOptions(
        shard_size, threads, device, force, dry_run, link, max_gpu_bytes, blender, progress, sync, checksum,
        other_inputs)))


def soup(models: Sequence[PathLike], out: PathLike, *, weights: str | Sequence[float] = "uniform",
         base: PathLike | None = None, stats: PathLike | None = None, dtype: str | None = None,
         **write: Any) -> MergeResult:
    """A model soup: Σ wᵢ·modelᵢ with weights ``uniform``, ``magnitude`` (∝ 1 / average row MAV
    against ``base``) or given (normalised to sum 1)."""
    return run("soup", out, {"model": models, "weights": weights, "base": base, "stats": stats, "dtype": dtype},
               **write)


def task_arithmetic(base: PathLike, models: Sequence[PathLike], out: PathLike, *, lam: float = 1.0,
                    dtype: str | None = None, **write: Any) -> MergeResult:
    """base + λ·Σ(modelᵢ − base) (Ilharco et al., 2023)."""
    return run("task_arithmetic", out, {"base": base, "model": models, "lam": lam, "dtype": dtype}, **write)


def ties(base: PathLike, models: Sequence[PathLike], out: PathLike, *, density: float = 0.2, lam: float = 1.0,
         dtype: str | None = None, **write: Any) -> MergeResult:
    """TIES-merging (Yadav et al., 2023): per tensor, keep each delta's top ``density`` fraction by
    magnitude (exact threshold; values tied at it are all kept), elect each element's sign by the
    summed trimmed deltas, average the trimmed deltas that agree, add λ times that to the base."""
    return run("ties", out, {"base": base, "model": models, "density": density, "lam": lam, "dtype": dtype},
               **write)


def revert(base: PathLike, model: PathLike, out: PathLike, *, layers: str | Sequence[int] | None = None,
           row_threshold: float | None = None, row_fraction: float | None = None, **write: Any) -> MergeResult:
    """Send fine-tuning updates back to the base (paper, Section 3.3): whole ``layers``
    (``"0-4,30-31"``), rows whose row MAV is below ``row_threshold``, or the ``row_fraction`` of
    each tensor's rows that changed least (equal MAVs: lower row index first)."""
    return run("revert", out, {"base": base, "model": model, "layers": layers, "row_threshold": row_threshold,
                               "row_fraction": row_fraction}, **write)
