"""The Python API: plan and run layer-swap merges. The CLI is a thin layer over these functions."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .checkpoint import Checkpoint, open_checkpoint
from .dtypes import normalize_dtype
from .engine import Blender, CpuBlender, MergeStats, execute
from .output import LINK_MODES, check_output, clean_stale_partials
from .errors import ConfigError, MismatchError
from .layers import count_layers
from .layout import OutputShard, ReusableShard, ReusedShard, find_reusable, layout_shards, parse_size
from .plan import LANGUAGE, TASK, MergePlan, SwapConfig, build_swap_plan

log = logging.getLogger("layerswap_fast")
PathLike = str | os.PathLike[str]
DEVICES = ("auto", "cpu", "cuda")
_TORCH_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


@dataclass
class MergeResult:
    """What :func:`merge` did: the plan, the shard layout and (unless a dry run) the stats."""

    plan: MergePlan
    shards: list[OutputShard]
    stats: MergeStats | None
    recipe: dict[str, Any]


def _layer_count(task: Checkpoint, language: Checkpoint) -> int:
    n_task = count_layers(task.names, task.config, f"task expert {task.path}")
    n_lang = count_layers(language.names, language.config, f"language expert {language.path}")
    if n_task != n_lang:
        raise MismatchError(f"the task expert has {n_task} layers but the language expert has {n_lang}")
    return n_task


def plan_from_checkpoints(task: Checkpoint, language: Checkpoint, config: SwapConfig | None = None,
                          dtype: str | None = None) -> MergePlan:
    """The swap plan for two opened checkpoints (headers only)."""
    num_layers = _layer_count(task, language)
    specs_in_file_order = lambda c: list(c.specs.values())  # noqa: E731
    return build_swap_plan(specs_in_file_order(task), specs_in_file_order(language), num_layers,
                           config or SwapConfig(), normalize_dtype(dtype) if dtype else None)


def plan_merge(task_expert: PathLike, language_expert: PathLike, config: SwapConfig | None = None,
               *, dtype: str | None = None) -> MergePlan:
    """Plan a layer swap from the checkpoints' headers; no tensor data is read."""
    with open_checkpoint(task_expert) as task, open_checkpoint(language_expert) as language:
        return plan_from_checkpoints(task, language, config, dtype)


def make_blender(device: str, threads: int | None, max_gpu_bytes: int | None = None) -> Blender:
    """The blend backend for ``device`` (``auto`` picks CUDA when a GPU is present)."""
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device != "cpu":
        if _cuda_available():
            from .gpu import CudaBlender
            return CudaBlender(device="cuda", **({"max_gpu_bytes": max_gpu_bytes} if max_gpu_bytes else {}))
        if device == "cuda":
            raise ConfigError("--device cuda was asked for but no CUDA device (or no torch/triton) is available")
    return CpuBlender(threads=threads or 0)


def _cuda_available() -> bool:
    # Importing torch costs ~250 MB of RSS: look for an NVIDIA device node first.
    if not any(Path("/dev").glob("nvidia[0-9]*")):
        return False
    try:
        from .gpu import cuda_available
    except ImportError:  # torch or triton not installed: the CPU path needs neither
        return False
    return cuda_available()


def reusable_shards(plan: MergePlan, experts: dict[str, Checkpoint]) -> list[ReusableShard]:
    """Input shards the output can take whole (every tensor copied from that same expert)."""
    candidates = {role: [ReusableShard(role, sh.path, tuple(t.name for t in sh.tensors), sh.size,
                                       sum(t.nbytes for t in sh.tensors)) for sh in ckpt.shards]
                  for role, ckpt in experts.items()}
    return find_reusable(plan.tensors, candidates)


def needed_bytes(shards: list[OutputShard], link: str) -> int:
    """Disk space the output takes: reused shards cost nothing unless they are copied."""
    return sum(s.file_size for s in shards if not isinstance(s, ReusedShard) or link in ("auto", "copy"))


def build_recipe(plan: MergePlan, task: Checkpoint, language: Checkpoint, shard_size: int) -> dict[str, Any]:
    """Everything needed to rebuild the output: tool, inputs (with fingerprints), settings, plan."""
    return {
        "tool": "layerswap-fast",
        "version": __version__,
        "method": "layer_swap",
        "inputs": {role: {"path": str(Path(c.path).resolve()), "fingerprint": c.fingerprint()}
                   for role, c in ((TASK, task), (LANGUAGE, language))},
        "config": asdict(plan.config),
        "dtype": plan.dtype,
        "shard_size": shard_size,
        "num_layers": plan.num_layers,
        "layers": [{"layer": r.layer, "zone": r.zone,
                    "sources": {t.expert: t.weight for t in r.terms}} for r in plan.layers],
        "non_layer": {t.expert: t.weight for t in plan.non_layer},
    }


def merge(
    task_expert: PathLike,
    language_expert: PathLike,
    out: PathLike,
    config: SwapConfig | None = None,
    *,
    dtype: str | None = None,
    shard_size: int | str = "5GB",
    threads: int | None = None,
    device: str = "auto",
    force: bool = False,
    dry_run: bool = False,
    link: str = "auto",
    max_gpu_bytes: int | str = "256MB",
    blender: Blender | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> MergeResult:
    """Layer-swap ``language_expert`` into ``task_expert`` and write the result to ``out``.

    Streams: memory does not grow with the model. The output directory appears complete or not
    at all. ``dry_run`` validates everything and computes the layout but writes nothing.
    ``progress(n, total)`` is called after each step with the bytes it wrote and the total.

    Input shards whose every tensor goes to the output unchanged are reused whole; ``link`` says
    how: ``auto`` (a copy-on-write reflink where the filesystem supports it, else a kernel-side
    copy), ``reflink``, ``copy``, or, only when asked for, ``hard`` or ``symlink`` — these share
    the input's bytes, so a later in-place change to one file changes the other.
    ``max_gpu_bytes`` bounds the GPU memory of the CUDA backend (so a small GPU merges a 70B
    model). ``blender`` replaces the backend chosen by ``device`` (e.g. ``gpu.CudaBlender``).
    """
    if link not in LINK_MODES:
        raise ConfigError(f"link must be one of {', '.join(LINK_MODES)}, got {link!r}")
    size_limit = parse_size(shard_size)
    out_path = Path(out)
    with open_checkpoint(task_expert) as task, open_checkpoint(language_expert) as language:
        plan = plan_from_checkpoints(task, language, config, dtype)
        recipe = build_recipe(plan, task, language, size_limit)
        metadata = {"format": "pt", "layerswap_fast": _compact_json(recipe)}
        experts = {TASK: task, LANGUAGE: language}
        shards = layout_shards(plan.tensors, size_limit, metadata, reusable_shards(plan, experts))
        check_output(out_path, [task.directory, language.directory], force, needed_bytes(shards, link))
        if dry_run:
            return MergeResult(plan, shards, None, recipe)
        clean_stale_partials(out_path, log.warning)
        backend = blender or make_blender(device, threads, parse_size(max_gpu_bytes))
        try:
            overrides = {"torch_dtype": _TORCH_DTYPE[plan.dtype]} if plan.dtype else {}
            stats = execute(shards, experts, out_path, blender=backend, recipe=recipe,
                            aux_source=task.directory, config_overrides=overrides, force=force,
                            link=link, progress=progress)
        finally:
            if blender is None:
                backend.close()
    return MergeResult(plan, shards, stats, recipe)


def _compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)
