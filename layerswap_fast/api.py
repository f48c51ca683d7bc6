"""The Python API: plan and run merges. The CLI is a thin layer over these functions.

``run(method, out, options)`` runs any method of the registry (:data:`METHODS`); ``merge``, ``soup``,
``task_arithmetic``, ``ties`` and ``revert`` are the same with each method's own signature. Every
function that writes a model records a recipe beside it (``layerswap_recipe.json``) whose
``options`` rebuild it: ``layerswap-fast COMMAND --config RECIPE -o OUT``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from typing import Any

from .adapter_writing import write_adapter
from .engine.backends import DEVICES, Backend
from .errors import ConfigError
from .formats.checkpoint import IO_MODES
from .formats.output import LINK_MODES
from .formats.verify import verify
from .formats.writeback import CHECKSUMS, DEFAULT_CHECKSUM
from .methods import METHODS, Method, Option
from .methods.swap import SOUP_WEIGHTS, SwapConfig, render_plan, swap_options
from .options import WRITE_OPTIONS, WriteOptions, command_options, read_config, recipe_yaml
from .plan import MergePlan
from .sweeps import Candidate, sweep
from .writing import MergeResult, plan_method, resolve, side_source, write_plan
from .mergekit_run import parse_kmb, run_mergekit_config, swap_mergekit_yaml

#: the command line needs nothing below the API: what it uses is named here
__all__ = ["METHODS", "Method", "Option", "DEVICES", "LINK_MODES", "CHECKSUMS", "IO_MODES", "SOUP_WEIGHTS", "WRITE_OPTIONS",
           "MergeResult", "WriteOptions", "SwapConfig", "run", "plan_merge", "plan_swap", "merge", "soup",
           "task_arithmetic", "ties", "revert", "render_plan", "verify", "read_config", "recipe_yaml",
           "command_options", "sweep", "Candidate", "run_mergekit_config", "parse_kmb", "swap_mergekit_yaml"]

PathLike = str | os.PathLike[str]
Paths = PathLike | Sequence[PathLike]


def run(method: str, out: PathLike, options: Mapping[str, Any], **write: Any) -> MergeResult:
    """Run the merge method ``method`` (a key of :data:`layerswap_fast.methods.METHODS`) with its
    ``options`` (by their recipe names; the rest take their defaults) and write the model to ``out``.

    ``write`` takes :class:`WriteOptions`. Every other function of this module that writes a model
    is this one with the method's own signature.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown merge method {method!r}: choose one of {', '.join(METHODS)}")
    m = METHODS[method]
    values = resolve(m, options)
    settings = WriteOptions(**write)
    if values.get("as_adapter"):
        return write_adapter(m, values, out, settings)
    with ExitStack() as stack:
        plan, inputs = plan_method(stack, m, values, settings.device, settings.threads)
        recorded = m.recorded(values, plan)
        read = [values[o.name] for o in m.options if o.kind == "path"]  # a base, statistics: never written
        return write_plan(m, plan, inputs, out, recorded, settings, side_source(inputs), m.extra(plan), read)


def plan_merge(task_expert: Paths, language_expert: Paths, config: SwapConfig | None = None, *,
               dtype: str | None = None, soup_weights: str = "uniform", base: PathLike | None = None,
               stats: PathLike | None = None) -> MergePlan:
    """Plan a layer swap from the checkpoints' headers (no tensor data is read, except the
    row-MAV analysis that ``magnitude`` weights need when no ``stats`` are given)."""
    return plan_swap(swap_options(task_expert, language_expert, config, dtype, soup_weights, base, stats))


def plan_swap(options: Mapping[str, Any]) -> MergePlan:
    """:func:`plan_merge` with the swap's options by their recipe names (``bottom``, ``top`` ...)."""
    swap = METHODS["layer_swap"]
    with ExitStack() as stack:
        return plan_method(stack, swap, resolve(swap, options))[0]


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
    io: str = "auto",
    other_inputs: Sequence[PathLike] = (),
    as_adapter: bool = False,
) -> MergeResult:
    """Layer-swap ``language_expert`` into ``task_expert`` and write the result to ``out``.

    Streams: memory does not grow with the model. The output directory appears complete or not
    at all. Several task or language experts (a list) are souped per group (``soup_weights``
    uniform or magnitude) and swapped in the same streaming pass, with no intermediate model
    written. ``magnitude`` weights (``config.transition_weights``/``non_layer``, ``soup_weights``)
    are ∝ 1 / average row MAV against ``base``, from an earlier ``analyze`` in ``stats`` when given.
    ``as_adapter``: the experts are LoRA adapters of one base, and the swap is written as one
    PEFT adapter of it. The other keywords are the :class:`WriteOptions`, as for every method.
    """
    options = {**swap_options(task_expert, language_expert, config, dtype, soup_weights, base, stats),
               "as_adapter": as_adapter}
    return run("layer_swap", out, options, **vars(WriteOptions(
        shard_size, threads, device, force, dry_run, link, max_gpu_bytes, blender, progress, sync, checksum,
        io, other_inputs)))


def soup(models: Sequence[PathLike], out: PathLike, *, weights: str | Sequence[float] = "uniform",
         base: PathLike | None = None, stats: PathLike | None = None, dtype: str | None = None,
         as_adapter: bool = False, **write: Any) -> MergeResult:
    """A model soup: Σ wᵢ·modelᵢ with weights ``uniform``, ``magnitude`` (∝ 1 / average row MAV
    against ``base``) or given (normalised to sum 1); ``as_adapter``: of LoRA adapters, written as one."""
    return run("soup", out, {"model": models, "weights": weights, "base": base, "stats": stats, "dtype": dtype,
                             "as_adapter": as_adapter}, **write)


def task_arithmetic(base: PathLike, models: Sequence[PathLike], out: PathLike, *, lam: float = 1.0,
                    dtype: str | None = None, as_adapter: bool = False, **write: Any) -> MergeResult:
    """base + λ·Σ(modelᵢ − base) (Ilharco et al., 2023); ``as_adapter``: of LoRA adapters, written as one."""
    return run("task_arithmetic", out, {"base": base, "model": models, "lam": lam, "dtype": dtype,
                                        "as_adapter": as_adapter}, **write)


def ties(base: PathLike, models: Sequence[PathLike], out: PathLike, *, density: float = 0.2, lam: float = 1.0,
         dtype: str | None = None, as_adapter: bool = False, **write: Any) -> MergeResult:
    """TIES-merging (Yadav et al., 2023): per tensor, keep each delta's top ``density`` fraction by
    magnitude (exact threshold; values tied at it are all kept), elect each element's sign by the
    summed trimmed deltas, average the trimmed deltas that agree, add λ times that to the base.
    (``as_adapter`` is refused: no adapter holds TIES' result.)"""
    return run("ties", out, {"base": base, "model": models, "density": density, "lam": lam, "dtype": dtype,
                             "as_adapter": as_adapter}, **write)


def revert(base: PathLike, model: PathLike, out: PathLike, *, layers: str | Sequence[int] | None = None,
           row_threshold: float | None = None, row_fraction: float | None = None, as_adapter: bool = False,
           **write: Any) -> MergeResult:
    """Send fine-tuning updates back to the base (paper, Section 3.3): whole ``layers``
    (``"0-4,30-31"``), rows whose row MAV is below ``row_threshold``, or the ``row_fraction`` of
    each tensor's rows that changed least (equal MAVs: lower row index first). ``as_adapter``: the
    model is a LoRA adapter, written back as one without the reverted layers (rows are refused)."""
    return run("revert", out, {"base": base, "model": model, "layers": layers, "row_threshold": row_threshold,
                               "row_fraction": row_fraction, "as_adapter": as_adapter}, **write)
