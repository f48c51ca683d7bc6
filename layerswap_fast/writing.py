"""From a method and its options to a written model: open the inputs, plan, lay out, check, execute.

Every method's output goes through here (``api.run``); the method itself only plans.
"""

from __future__ import annotations

import json
import logging
import os
import weakref
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ._core import __version__
from .dtypes import TORCH_NAMES
from .engine.backends import make_backend
from .engine.execute import MergeStats, clone_estimate, execute
from .errors import CheckpointError, ConfigError, MismatchError, param
from .formats.adapter import Adapter, base_model_of, check_against_base, is_adapter
from .formats.checkpoint import Checkpoint, open_checkpoint
from .formats.hub import find_snapshot, pinned
from .formats.layout import (OutputShard, ReusableShard, ReusedShard, find_reusable, index_json, layout_shards,
                             needed_bytes)
from .formats.model_card import CardInput, local_name, render_card
from .formats.output import check_output, clean_stale_partials, guarded_paths, layout_block, output_location
from .formats.side_files import SideFile, find_side_files, side_bytes
from .methods import Method, PlanInputs
from .methods.common import BASE
from .methods.method import as_list
from .options import WriteOptions
from .plan import MergePlan, TensorRecipe, describe_role
from .plan.layers import count_layers
from .plan.lowrank import apply_adapters
from .units import format_bytes, parse_size

log = logging.getLogger("layerswap_fast")
PathLike = str | os.PathLike[str]


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


#: each open checkpoint's layer count (a sweep plans many candidates over the same experts)
_LAYERS: weakref.WeakKeyDictionary[Checkpoint, int] = weakref.WeakKeyDictionary()


def _layer_count(checkpoints: Mapping[str, Checkpoint]) -> int:
    counts = {}
    for role, c in checkpoints.items():
        if c not in _LAYERS:
            _LAYERS[c] = count_layers(c.names, c.config, f"{describe_role(role)} {c.path}")
        counts[role] = _LAYERS[c]
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


def plan_layout(plan: MergePlan, inputs: Mapping[str, Checkpoint], shard_size: int,
                metadata: Mapping[str, str], out: Path) -> list[OutputShard]:
    """The output's shards: input shards reused whole, new ones of at most ``shard_size`` with each
    copied tensor at its source's offset within a block of ``out``'s filesystem (which tensors go
    together depends on the plan, the inputs, the size and that block only, not on the metadata)."""
    return layout_shards(plan.tensors, shard_size, metadata, reusable_shards(plan, inputs),
                         source_offset=lambda r: _copied_from(r, inputs), block=layout_block(out))


def _copied_from(recipe: TensorRecipe, inputs: Mapping[str, Checkpoint]) -> int | None:
    """Where in its input file a copied tensor's bytes are (the layout aligns to it)."""
    if recipe.op != "copy":
        return None
    return inputs[recipe.terms[0].role].specs[recipe.source(recipe.terms[0])].offset


def _recipe(command: str, plan: MergePlan, inputs: Mapping[str, Checkpoint], options: Mapping[str, Any],
            extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to rebuild the output: tool, command and options, inputs, plan summary."""
    recipe: dict[str, Any] = {
        "tool": "layerswap-fast", "version": __version__, "method": plan.method, "command": command,
        "options": {k: v for k, v in options.items() if v is not None},
        "inputs": {role: {"path": str(Path(c.path).resolve()), **_hub_ref(c), "fingerprint": c.fingerprint(),
                          "content_sample": c.content_sample()} for role, c in inputs.items()},
        "config": asdict(plan.config) if plan.config is not None else None,
        "dtype": plan.dtype,
    }
    return {**recipe, **(extra or {})}


def _hub_ref(c: Checkpoint) -> dict[str, str]:
    """Where a model named by its hub id came from: the snapshot path alone would not tell."""
    return {} if c.hub_id is None or c.revision is None else {"hub_id": c.hub_id, "revision": c.revision}


def _card(method: Method, plan: MergePlan, inputs: Mapping[str, Checkpoint], options: Mapping[str, Any]) -> str:
    """The model card: every input by its hub id where it has one, else by its directory name."""
    named = [CardInput(describe_role(role), local_name(c.directory), c.hub_id, c.revision) for role, c in inputs.items()]
    return render_card(plan.method, method.command, __version__, named, method.card_section(options, plan),
                       rebuild=method.rebuild)


def write_plan(method: Method, plan: MergePlan, inputs: Mapping[str, Checkpoint], out: PathLike,
           options: Mapping[str, Any], write: WriteOptions, side_source: Checkpoint,
           extra: Mapping[str, Any] | None = None, other_inputs: Sequence[PathLike | None] = (),
           side_files: Sequence[SideFile] | None = None, texts: Mapping[str, str] | None = None,
           sources: Mapping[str, Checkpoint] | None = None) -> MergeResult:
    """Lay out, check and (unless a dry run) execute a plan over opened inputs; ``options`` are
    the method's as recorded. The side files are ``side_source``'s unless ``side_files`` are
    given; ``texts`` are more small files by name. ``sources``: outputs the plan also copies
    tensors from (a sweep's earlier candidates), read and guarded like inputs but not recorded as
    inputs: the recipe and card name what the output is made of."""
    command = method.command
    size_limit = write.check()
    out_path = output_location(out)
    # only what decides the bytes: thread count, device and link mode never change them
    recipe = _recipe(command, plan, inputs, {**options, "shard_size": str(write.shard_size)}, extra)
    metadata = {"format": "pt", "layerswap_fast": json.dumps(recipe, separators=(",", ":"), sort_keys=True)}
    card = _card(method, plan, inputs, options)
    inputs = {**inputs, **(sources or {})}
    shards = plan_layout(plan, inputs, size_limit, metadata, out_path)
    side_files = list(find_side_files(side_source.directory) if side_files is None else side_files)
    guarded = guarded_paths(inputs.values(), [*other_inputs, *write.other_inputs])
    # where it seems not to fit, a real run asks the filesystem whether copies would be clones (a
    # dry run writes nothing, not even that probe, so it counts every byte)
    clones = None if write.dry_run or write.link == "copy" else lambda d: clone_estimate(d, shards, inputs, write.link)
    check_output(out_path, guarded, write.force, needed_bytes(shards, write.link) + side_bytes(side_files)
                 + _small_files_bytes(recipe, shards, len(side_files), card)
                 + sum(len(t.encode("utf-8")) for t in (texts or {}).values()), clones)
    if write.dry_run:
        return MergeResult(plan, shards, None, recipe)
    clean_stale_partials(out_path, log.warning)
    backend = write.blender or make_backend(write.device, write.threads, parse_size(write.max_gpu_bytes))
    try:
        overrides = {**({"torch_dtype": TORCH_NAMES[plan.dtype]} if plan.dtype else {}), **dict(plan.config_changes)}
        stats = execute(shards, inputs, out_path, backend=backend, recipe=recipe, side_files=side_files,
                        config_overrides=overrides, force=write.force, link=write.link,
                        threads=write.threads or 0, sync=write.sync, checksum=write.checksum, io=write.io,
                        progress=write.progress, card=card, texts=texts)
    finally:
        if write.blender is None:
            backend.close()
    return MergeResult(plan, shards, stats, recipe)


def _small_files_bytes(recipe: Mapping[str, Any], shards: Sequence[OutputShard], side_files: int, card: str) -> int:
    """An upper bound of the index, the model card and the recipe: the index and the card exactly,
    the recipe as known now and a generous entry per shard (name, size, checksum, source), and a
    block per file for rounding."""
    index = len(json.dumps(index_json(shards), indent=2)) + 1
    entries = sum(512 + (len(str(s.reuse.source)) if isinstance(s, ReusedShard) else 0) for s in shards)
    small = index + len(card.encode("utf-8")) + len(json.dumps(recipe, indent=2)) + 2 * entries
    return small + 4096 * (len(shards) + side_files + 4)


def open_all(stack: ExitStack, roles: Mapping[str, PathLike]) -> dict[str, Checkpoint]:
    """Each role's checkpoint, or LoRA adapter (an :class:`Adapter`, a checkpoint too)."""
    return {role: stack.enter_context(Adapter(path) if is_adapter(path) else open_checkpoint(path))
            for role, path in roles.items()}


def resolve(method: Method, options: Mapping[str, Any]) -> dict[str, Any]:
    """Every option's value (given or default), the base that adapters name filled in, hub ids
    pinned: what a merge plans from and its recipe records."""
    return _pin_hub_ids(method, with_adapter_base(method, method.resolve(options)))


def _pin_hub_ids(m: Method, values: Mapping[str, Any]) -> dict[str, Any]:
    """Hub ids of cached models as ``org/name@<commit>``: every reader of a model (the plan, a
    magnitude analysis) and the recipe then name one snapshot, which a rebuild finds again after
    the cache's ``main`` has moved."""
    result = dict(values)
    for o in m.options:
        value = values[o.name]
        if value is not None and o.kind == "path":
            result[o.name] = pinned(value)
        elif value is not None and o.kind == "paths":
            result[o.name] = [pinned(p) for p in as_list(value)]
    return result


def with_adapter_base(method: Method, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with the base an adapter among the inputs names (``base_model_name_or_path``)
    as the ``base`` when none is given and that model is here: a local path or a cached hub id."""
    result = dict(options)
    if "base" not in result or result["base"] is not None:
        return result
    for path in method.inputs({**result, "base": None}).values():
        named = None if path is None else base_model_of(path)
        if named is not None and (os.path.isdir(named) or _cached(named)):
            result["base"] = named
            break
    return result


def _cached(hub_id: str) -> bool:
    try:
        return find_snapshot(hub_id) is not None
    except CheckpointError:
        return False


def side_source(inputs: Mapping[str, Checkpoint]) -> Checkpoint:
    """Whose side files (config, tokenizer) go with the output: the first full model among the
    merged inputs, else the base (adapters carry no config)."""
    full = [c for role, c in inputs.items() if not isinstance(c, Adapter)]
    merged = [c for role, c in inputs.items() if role != BASE and not isinstance(c, Adapter)]
    return (merged or full)[0]


def _open_adapter_base(stack: ExitStack, inputs: dict[str, Checkpoint], adapters: Mapping[str, Adapter],
                       options: Mapping[str, Any]) -> Checkpoint:
    """The model the adapters apply to, opened into ``inputs`` as the base role; each adapter
    checked against its shapes."""
    if BASE not in inputs:
        if options.get("base") is None:
            role, adapter = next(iter(adapters.items()))
            raise ConfigError(f"the {describe_role(role)} {adapter.path} is a LoRA adapter: pass {param('base')}, "
                              f"the model it was trained on")
        inputs[BASE] = stack.enter_context(open_checkpoint(options["base"]))
    base = inputs[BASE]
    if isinstance(base, Adapter):
        raise ConfigError(f"the base {base.path} is a LoRA adapter: the base must be a full model")
    for role, adapter in adapters.items():
        check_against_base(adapter, list(base.specs.values()), describe_role(role))
    return base


def _magnitude(base: PathLike | None, experts: Sequence[PathLike], stats: PathLike | None, device: str = "auto",
               threads: int | None = None) -> list[float]:
    """Magnitude-adjusted weights (∝ 1 / average row MAV against the base), normalised; an analysis
    they need runs on the merge's ``device`` and ``threads``."""
    if base is None:
        raise ConfigError(f"magnitude weights need the base model: pass {param('base')} (and optionally {param('stats')} DIR)")
    from .analysis import magnitude_weights_for
    return magnitude_weights_for(base, experts, stats_dir=stats, device=device, threads=threads)


def plan_method(stack: ExitStack, method: Method, options: Mapping[str, Any], device: str = "auto",
          threads: int | None = None, factors: bool = True,
          opened: Mapping[str, Checkpoint] | None = None) -> tuple[MergePlan, dict[str, Checkpoint]]:
    """Open the method's inputs (unless ``opened`` holds them from an earlier call with the same
    inputs) and plan: headers only, except the row-MAV analysis that magnitude weights need when
    no ``stats`` are given. With ``factors`` false, adapters' terms stay as planned (each adapter
    standing for the model it makes), for a caller that turns them into something else than base
    terms plus factors (an adapter output)."""
    paths = method.inputs(options)
    inputs = dict(opened) if opened is not None else open_all(stack, paths)
    adapters = {role: c for role, c in inputs.items() if isinstance(c, Adapter)}
    full = {role: c for role, c in inputs.items() if role not in adapters}
    specs = {role: list(c.specs.values()) for role, c in full.items()}
    if adapters:  # the method plans as if each adapter were the model it makes of the base
        base = _open_adapter_base(stack, inputs, adapters, options)
        full[BASE], specs[BASE] = base, list(base.specs.values())
        for role, adapter in adapters.items():
            specs[role] = [adapter.specs[s.name] if s.name in adapter.lora.replaced else s
                           for s in base.specs.values()]
    num_layers = _layer_count(full) if method.counts_layers else 0

    def magnitude(roles: Sequence[str]) -> list[float]:  # adapters too: the analysis forms s·B·A
        return _magnitude(options.get("base"), [paths[r] for r in roles], options.get("stats"), device, threads)

    plan = method.plan(PlanInputs({r: specs[r] for r in paths}, num_layers, magnitude), options)
    if adapters and factors:
        dtypes = {role: {s.name: s.dtype for s in role_specs} for role, role_specs in specs.items()}
        plan = apply_adapters(plan, {r: a.lora for r, a in adapters.items()}, BASE, dtypes)
    return plan, inputs
