"""The Python API: plan and run merges. The CLI is a thin layer over these functions.

Every function that writes a model records a recipe beside it (``layerswap_recipe.json``) whose
``options`` are the CLI options that rebuild it: ``layerswap-fast COMMAND --config RECIPE -o OUT``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from . import __version__
from .methods.baselines import (BASE, RevertConfig, build_revert_plan, build_soup_plan, build_task_arithmetic_plan,
                        build_ties_plan, model_role, normalize_weights, parse_layers)
from .formats.checkpoint import Checkpoint, open_checkpoint
from .dtypes import normalize_dtype
from .engine.backends import DEVICES, Backend, make_backend
from .engine.execute import MergeStats, execute
from .errors import ConfigError, MismatchError
from .plan.layers import count_layers
from .formats.layout import (OutputShard, ReusableShard, ReusedShard, find_reusable, index_json, layout_shards,
                     needed_bytes, parse_size)
from .formats.output import LINK_MODES, guarded_paths, check_output, clean_stale_partials, output_location
from .formats.side_files import find_side_files, side_bytes
from .formats.writeback import CHECKSUMS
from .plan import LANGUAGE, TASK, MergePlan, SwapConfig, TensorRecipe, build_swap_plan, describe_role

log = logging.getLogger("layerswap_fast")
PathLike = str | os.PathLike[str]
Paths = PathLike | Sequence[PathLike]
SOUP_WEIGHTS = ("uniform", "magnitude")
_TORCH_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


@dataclass
class MergeResult:
    """What a merge did: the plan, the shard layout and (unless a dry run) the stats."""

    plan: MergePlan
    shards: list[OutputShard]
    stats: MergeStats | None
    recipe: dict[str, Any]


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
    checksum: str = "blake3"
    #: files the command read besides its checkpoints (a ``--config`` file): never written or removed
    other_inputs: Sequence[PathLike] = ()


def _as_list(paths: Paths) -> list[PathLike]:
    return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)


def _layer_count(checkpoints: Mapping[str, Checkpoint]) -> int:
    counts = {role: count_layers(c.names, c.config, f"{describe_role(role)} {c.path}") for role, c in checkpoints.items()}
    first = next(iter(counts))
    for role, n in counts.items():
        if n != counts[first]:
            raise MismatchError(f"the {describe_role(first)} has {counts[first]} layers but the {describe_role(role)} has {n}")
    return counts[first]


def reusable_shards(plan: MergePlan, experts: Mapping[str, Checkpoint]) -> list[ReusableShard]:
    """Input shards the output can take whole (every tensor copied from that same input)."""
    candidates = {role: [ReusableShard(role, sh.path, tuple(t.name for t in sh.tensors), sh.size,
                                       sum(t.nbytes for t in sh.tensors)) for sh in ckpt.shards]
                  for role, ckpt in experts.items()}
    return find_reusable(plan.tensors, candidates)


def _copied_from(recipe: TensorRecipe, inputs: Mapping[str, Checkpoint]) -> int | None:
    """Where in its input file a copied tensor's bytes are (the layout aligns to it)."""
    return inputs[recipe.terms[0].expert].specs[recipe.name].offset if recipe.op == "copy" else None


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
        overrides = {"torch_dtype": _TORCH_DTYPE[plan.dtype]} if plan.dtype else {}
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
        raise ConfigError("magnitude weights need the base model: pass --base (and optionally --stats DIR)")
    from .analysis import magnitude_weights_for
    return list(magnitude_weights_for(base, experts, stats_dir=stats, device=device, threads=threads))


# ---------------------------------------------------------------------------------------- swap

def _groups(tasks: list[PathLike], languages: list[PathLike]) -> dict[str, list[str]]:
    if len(tasks) == 1 and len(languages) == 1:
        return {TASK: [TASK], LANGUAGE: [LANGUAGE]}
    return {TASK: [f"task.{i}" for i in range(len(tasks))], LANGUAGE: [f"language.{i}" for i in range(len(languages))]}


def _swap_weights(config: SwapConfig, soup_weights: str, roles: dict[str, list[str]], paths: dict[str, PathLike],
                  base: PathLike | None, stats: PathLike | None, device: str = "auto",
                  threads: int | None = None) -> tuple[SwapConfig, dict[str, list[tuple[str, float]]]]:
    """Soup weights within each group and, for ``magnitude``, the task/language weights."""
    needs = soup_weights == "magnitude" or "magnitude" in (config.transition_weights, config.non_layer)
    everyone = roles[TASK] + roles[LANGUAGE]
    mavw = (dict(zip(everyone, _magnitude(base, [paths[r] for r in everyone], stats, device, threads)))
            if needs else {})
    groups = {}
    for group, members in roles.items():
        raw = [mavw[m] for m in members] if soup_weights == "magnitude" else [1.0] * len(members)
        groups[group] = list(zip(members, normalize_weights(raw)))
    if needs and "magnitude" in (config.transition_weights, config.non_layer):
        # a group's weight is its members' magnitude weights, averaged by their soup weights
        t, l = (sum(w * mavw[m] for m, w in groups[g]) for g in (TASK, LANGUAGE))
        config = replace(config, magnitude_weights=(t / (t + l), l / (t + l)))
    return config, groups


def plan_merge(task_expert: Paths, language_expert: Paths, config: SwapConfig | None = None, *,
               dtype: str | None = None, soup_weights: str = "uniform", base: PathLike | None = None,
               stats: PathLike | None = None) -> MergePlan:
    """Plan a layer swap from the checkpoints' headers (no tensor data is read, except the
    row-MAV analysis that ``magnitude`` weights need when no ``stats`` are given)."""
    with ExitStack() as stack:
        plan, _ = _plan_swap(stack, task_expert, language_expert, config, dtype, soup_weights, base, stats)
        return plan


def _plan_swap(stack: ExitStack, task_expert: Paths, language_expert: Paths, config: SwapConfig | None,
               dtype: str | None, soup_weights: str, base: PathLike | None, stats: PathLike | None,
               device: str = "auto", threads: int | None = None) -> tuple[MergePlan, dict[str, Checkpoint]]:
    if soup_weights not in SOUP_WEIGHTS:
        raise ConfigError(f"soup weights must be one of {', '.join(SOUP_WEIGHTS)}, got {soup_weights!r}")
    tasks, languages = _as_list(task_expert), _as_list(language_expert)
    if not tasks or not languages:
        raise ConfigError("a layer swap needs at least one task expert and one language expert")
    roles = _groups(tasks, languages)
    paths = dict(zip(roles[TASK] + roles[LANGUAGE], tasks + languages))
    inputs = _open_all(stack, paths)
    num_layers = _layer_count(inputs)
    config, groups = _swap_weights(config or SwapConfig(), soup_weights, roles, paths, base, stats, device, threads)
    members = {role: list(c.specs.values()) for role, c in inputs.items()}
    plan = build_swap_plan(members[roles[TASK][0]], members[roles[LANGUAGE][0]], num_layers, config,
                           normalize_dtype(dtype) if dtype else None, members=members, groups=groups)
    return plan, inputs


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
    checksum: str = "blake3",
    other_inputs: Sequence[PathLike] = (),
) -> MergeResult:
    """Layer-swap ``language_expert`` into ``task_expert`` and write the result to ``out``.

    Streams: memory does not grow with the model. The output directory appears complete or not
    at all. ``dry_run`` validates everything and computes the layout but writes nothing.
    ``progress(n, total)`` is called after each step with the bytes it wrote and the total.

    Several task or language experts (a list) are souped per group (``soup_weights`` uniform or
    magnitude) and swapped in the same streaming pass, with no intermediate model written.
    ``magnitude`` weights (``config.transition_weights``/``non_layer``, ``soup_weights``) are ∝ 1 /
    average row MAV against ``base``, from an earlier ``analyze`` in ``stats`` when given.

    Input shards whose every tensor goes to the output unchanged are reused whole; ``link`` says
    how: ``auto`` (a copy-on-write reflink where the filesystem supports it, else a kernel-side
    copy), ``reflink``, ``copy``, or, only when asked for, ``hard`` or ``symlink`` — these share
    the input's bytes, so a later in-place change to one file changes the other.
    ``max_gpu_bytes`` bounds the GPU memory of the CUDA backend (so a small GPU merges a 70B
    model). ``blender`` replaces the backend chosen by ``device`` (e.g. ``engine.cuda.CudaBackend``).
    ``sync`` fsyncs the output before publishing it (durable across a power loss). ``checksum``
    (blake3 or sha256) is recorded for every file in the recipe, for ``verify``. ``other_inputs``:
    files the caller read besides the checkpoints (a config file), which the output must not touch.
    """
    config = config or SwapConfig()
    write = WriteOptions(shard_size, threads, device, force, dry_run, link, max_gpu_bytes, blender, progress, sync,
                         checksum, other_inputs)
    with ExitStack() as stack:
        plan, inputs = _plan_swap(stack, task_expert, language_expert, config, dtype, soup_weights, base, stats,
                                  device, threads)
        options = {"task_expert": [str(p) for p in _as_list(task_expert)],
                   "language_expert": [str(p) for p in _as_list(language_expert)],
                   "bottom": config.bottom, "top": config.top, "lower_transition": config.lower_transition,
                   "upper_transition": config.upper_transition, "transition_weights": config.transition_weights,
                   "non_layer": config.non_layer, "soup_weights": soup_weights, "dtype": dtype,
                   "base": str(base) if base else None, "stats": str(stats) if stats else None}
        extra = {"num_layers": plan.num_layers,
                 "layers": [{"layer": r.layer, "zone": r.zone, "sources": {t.expert: t.weight for t in r.terms}}
                            for r in plan.layers],
                 "non_layer": {t.expert: t.weight for t in plan.non_layer}}
        first_task = inputs[TASK] if TASK in inputs else inputs["task.0"]
        return _write("merge", plan, inputs, out, options, write, first_task, extra, [base, stats])


# ----------------------------------------------------------------------------------- baselines

def soup(models: Sequence[PathLike], out: PathLike, *, weights: str | Sequence[float] = "uniform",
         base: PathLike | None = None, stats: PathLike | None = None, dtype: str | None = None,
         **write: Any) -> MergeResult:
    """A model soup: Σ wᵢ·modelᵢ with weights ``uniform``, ``magnitude`` (∝ 1 / average row MAV
    against ``base``) or given (normalised to sum 1)."""
    models = list(models)
    if len(models) < 1:
        raise ConfigError("a soup needs at least one --model")
    if weights == "uniform":
        raw = [1.0] * len(models)
    elif weights == "magnitude":
        raw = _magnitude(base, models, stats, write.get("device", "auto"), write.get("threads"))
    elif isinstance(weights, str):
        raise ConfigError(f"weights must be uniform, magnitude or numbers, got {weights!r}")
    else:
        raw = list(weights)  # checked (numbers, finite, a finite sum) by normalize_weights
    with ExitStack() as stack:
        inputs = _open_all(stack, {model_role(i): p for i, p in enumerate(models)})
        plan = build_soup_plan({r: list(c.specs.values()) for r, c in inputs.items()}, raw,
                               normalize_dtype(dtype) if dtype else None)
        options = {"model": [str(m) for m in models],
                   "weights": weights if isinstance(weights, str) else ",".join(map(str, weights)),
                   "base": str(base) if base else None, "stats": str(stats) if stats else None, "dtype": dtype}
        return _write("soup", plan, inputs, out, options, WriteOptions(**write), inputs[model_role(0)],
                      other_inputs=[base, stats])


def _base_and_models(stack: ExitStack, base: PathLike,
                     models: Sequence[PathLike]) -> tuple[dict[str, Checkpoint], int]:
    """The opened base and models, and their layer count (which they must agree on)."""
    if not models:
        raise ConfigError("give at least one --model")
    inputs = _open_all(stack, {BASE: base, **{model_role(i): p for i, p in enumerate(models)}})
    return inputs, _layer_count(inputs)


def task_arithmetic(base: PathLike, models: Sequence[PathLike], out: PathLike, *, lam: float = 1.0,
                    dtype: str | None = None, **write: Any) -> MergeResult:
    """base + λ·Σ(modelᵢ − base) (Ilharco et al., 2023)."""
    with ExitStack() as stack:
        inputs, _ = _base_and_models(stack, base, models)
        specs = {r: list(c.specs.values()) for r, c in inputs.items()}
        plan = build_task_arithmetic_plan(specs.pop(BASE), specs, lam, normalize_dtype(dtype) if dtype else None)
        options = {"base": str(base), "model": [str(m) for m in models], "lam": lam, "dtype": dtype}
        return _write("task-arithmetic", plan, inputs, out, options, WriteOptions(**write), inputs[model_role(0)])


def ties(base: PathLike, models: Sequence[PathLike], out: PathLike, *, density: float = 0.2, lam: float = 1.0,
         dtype: str | None = None, **write: Any) -> MergeResult:
    """TIES-merging (Yadav et al., 2023): per tensor, keep each delta's top ``density`` fraction by
    magnitude (exact threshold; values tied at it are all kept), elect each element's sign by the
    summed trimmed deltas, average the trimmed deltas that agree, add λ times that to the base."""
    with ExitStack() as stack:
        inputs, _ = _base_and_models(stack, base, models)
        specs = {r: list(c.specs.values()) for r, c in inputs.items()}
        plan = build_ties_plan(specs.pop(BASE), specs, density, lam, normalize_dtype(dtype) if dtype else None)
        options = {"base": str(base), "model": [str(m) for m in models], "density": density, "lam": lam,
                   "dtype": dtype}
        return _write("ties", plan, inputs, out, options, WriteOptions(**write), inputs[model_role(0)])


def revert(base: PathLike, model: PathLike, out: PathLike, *, layers: str | Sequence[int] | None = None,
           row_threshold: float | None = None, row_fraction: float | None = None, **write: Any) -> MergeResult:
    """Send fine-tuning updates back to the base (paper, Section 3.3): whole ``layers``
    (``"0-4,30-31"``), rows whose row MAV is below ``row_threshold``, or the ``row_fraction`` of
    each tensor's rows that changed least (equal MAVs: lower row index first)."""
    with ExitStack() as stack:
        inputs, num_layers = _base_and_models(stack, base, [model])
        chosen = parse_layers(layers, num_layers) if isinstance(layers, str) else tuple(layers or ())
        config = RevertConfig(chosen, row_threshold, row_fraction)
        plan = build_revert_plan(list(inputs[BASE].specs.values()), list(inputs[model_role(0)].specs.values()),
                                 config, num_layers)
        options = {"base": str(base), "model": str(model),
                   "layers": ",".join(map(str, chosen)) if chosen else None,
                   "row_threshold": row_threshold, "row_fraction": row_fraction}
        return _write("revert", plan, inputs, out, options, WriteOptions(**write), inputs[model_role(0)])
