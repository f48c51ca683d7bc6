"""``--as-adapter``: a merge of LoRA adapters of one base, written as one PEFT adapter of that base.

The method plans as for a full model (each adapter standing for the model it makes of the base);
the plan is rewritten into base terms plus LoRA factors (:func:`~layerswap_fast.plan.lowrank.apply_adapters`)
and those into the output adapter's tensors (:func:`~layerswap_fast.plan.adapter_output.adapter_plan`:
copies, or exact concatenations of the scaled factors). The adapter (``adapter_model.safetensors``,
``adapter_config.json``, the model card, the recipe) is written like every output: laid out first,
streamed into a staging directory by the engine, published whole; ``verify`` checks it.

Refused in one line, nothing written: a method that needs each model's full delta (TIES, row-wise
revert), a full model among the merged inputs, adapters that name different bases, and whatever
:mod:`~layerswap_fast.plan.adapter_output` finds no adapter form for.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ._core import __version__
from .engine.backends import make_backend
from .engine.execute import execute
from .errors import CheckpointError, ConfigError, param
from .formats.adapter import Adapter, LoraTable
from .formats.adapter_output import CONFIG_NAME, WEIGHTS_NAME, config_text, peft_config, same_values, task_type
from .formats.checkpoint import Checkpoint, TensorSpec, open_checkpoint
from .formats.hub import find_snapshot
from .formats.layout import layout_shards, needed_bytes
from .formats.model_card import CardInput, local_name, render_card
from .formats.output import check_output, clean_stale_partials, guarded_paths, output_location
from .methods import Method
from .methods.common import BASE, output_dtype
from .options import WriteOptions
from .plan import MergePlan, describe_role
from .plan.adapter_output import AdapterPlan, adapter_plan
from .plan.lowrank import apply_adapters
from .units import parse_size
from .writing import MergeResult, _copied_from, _recipe, _small_files_bytes, plan_method

log = logging.getLogger("layerswap_fast")
PathLike = str | os.PathLike[str]

#: ops that need every model's full delta, and why no adapter can hold their result
_FULL_DELTA = {
    "ties": "TIES trims each model's delta and elects signs element by element",
    "revert_rows": "a row-wise revert measures and reverts single rows of the full delta",
}
#: larger than any adapter: PEFT loads one adapter_model.safetensors, so the adapter is one file
_ONE_FILE = 1 << 62


@dataclass(frozen=True)
class _AdapterView:
    """An input adapter as the conversion reads it, with the saved tensors that are only the
    base's own taken out of its table."""

    lora: LoraTable
    specs: Mapping[str, TensorSpec]


def write_adapter(method: Method, values: Mapping[str, Any], out: PathLike, write: WriteOptions) -> MergeResult:
    """Run ``method`` with its resolved option ``values`` and write the result as a PEFT LoRA
    adapter of the base to ``out``."""
    with ExitStack() as stack:
        plan, inputs = plan_method(stack, method, values, write.device, write.threads, factors=False)
        for recipe in plan.tensors:
            if recipe.op in _FULL_DELTA:
                raise ConfigError(f"{param('as_adapter')}: {method.command} needs every model's full delta "
                                  f"({_FULL_DELTA[recipe.op]}), which no LoRA adapter holds: write a full model "
                                  f"(without {param('as_adapter')})")
        adapters = _adapters_of_one_base(inputs)
        base = inputs[BASE]
        tables = {role: a.lora for role, a in adapters.items()}
        lowrank = apply_adapters(plan, tables, BASE, _dtypes(base, adapters, tables))
        copies = _saved_copies_of_base(lowrank, adapters, base)
        if copies:  # a saved tensor equal to the base's is the base's: the adapter needs nothing for it
            tables = {role: replace(t, replaced={n: s for n, s in t.replaced.items() if (role, n) not in copies})
                      for role, t in tables.items()}
            lowrank = apply_adapters(plan, tables, BASE, _dtypes(base, adapters, tables))
        views = {role: _AdapterView(tables[role], a.specs) for role, a in adapters.items()}
        result = adapter_plan(lowrank.tensors, views, BASE, output_dtype(values) if values.get("dtype") else None)
        if not result.tensors:
            raise ConfigError(f"{param('as_adapter')}: this merge leaves the base unchanged, so there is no adapter "
                              f"to write")
        config = peft_config(result.modules, modules_to_save=result.modules_to_save, **_base_name(adapters, base),
                             fan_in_fan_out=_fan_in_fan_out(adapters, result), tied_embeddings=_tied(base),
                             task=task_type(next(iter(adapters.values())).path))
        read = [values[o.name] for o in method.options if o.kind == "path"]
        return _write(method, replace(plan, tensors=result.tensors), result, inputs, out,
                      method.recorded(values, plan), write, config, read)


def _adapters_of_one_base(inputs: Mapping[str, Checkpoint]) -> dict[str, Adapter]:
    """The merged inputs, each a LoRA adapter, all naming one base (or none)."""
    merged = {role: c for role, c in inputs.items() if role != BASE}
    for role, c in merged.items():
        if not isinstance(c, Adapter):
            raise ConfigError(f"{param('as_adapter')} writes one LoRA adapter of the base, so every merged model must "
                              f"be a LoRA adapter, but the {describe_role(role)} {c.path} is a full model: write a "
                              f"full model (without {param('as_adapter')})")
    adapters: dict[str, Adapter] = dict(merged)  # type: ignore[arg-type]
    named = {role: a.lora.base_model for role, a in adapters.items() if a.lora.base_model}
    first = next(iter(named), None)
    for role, name in named.items():
        if first is not None and not _same_model(named[first], name):
            raise ConfigError(f"{param('as_adapter')} needs adapters of one base, but the {describe_role(first)} names "
                              f"{named[first]!r} and the {describe_role(role)} {name!r} (base_model_name_or_path): "
                              f"their output would be an adapter of neither")
    return adapters


def _same_model(a: str, b: str) -> bool:
    """Whether two base names are one model: the same text, the same directory here, or two
    checkpoints here with the same headers and the same bytes where sampled (a copy: different
    models of one architecture have the same headers, so the headers alone cannot tell)."""
    if a == b:
        return True
    paths = [_local(a), _local(b)]
    if None in paths:
        return False
    if paths[0] == paths[1]:
        return True
    try:
        with open_checkpoint(paths[0]) as x, open_checkpoint(paths[1]) as y:  # type: ignore[arg-type]
            return x.content_sample() == y.content_sample()
    except CheckpointError:
        return False


def _local(name: str) -> Path | None:
    """The directory a base name resolves to here (a local path or a cached hub id), if any."""
    try:
        snapshot = find_snapshot(name)
    except CheckpointError:
        return None
    path = Path(name) if snapshot is None else snapshot.path
    return Path(os.path.realpath(path)) if path.is_dir() else None


def _base_name(adapters: Mapping[str, Adapter], base: Checkpoint) -> dict[str, str | None]:
    """What the output's config names as its base: the name the adapters give (they agree; with
    the revision read from the cache when that name is the base's hub id), else the base's hub id
    and revision, else the base's path."""
    named = [a.lora.base_model for a in adapters.values() if a.lora.base_model]
    if named:
        return {"base_model": named[0], "revision": base.revision if named[0] == base.hub_id else None}
    if base.hub_id is not None:
        return {"base_model": base.hub_id, "revision": base.revision}
    return {"base_model": str(base.path), "revision": None}


def _dtypes(base: Checkpoint, adapters: Mapping[str, Adapter],
            tables: Mapping[str, LoraTable]) -> dict[str, dict[str, str]]:
    """Each role's dtype of each base tensor: the base's, or the adapter's tensor that replaces it."""
    own = {name: spec.dtype for name, spec in base.specs.items()}
    result = {BASE: own}
    for role, adapter in adapters.items():
        result[role] = {**own, **{n: adapter.specs[n].dtype for n in tables[role].replaced}}
    return result


def _saved_copies_of_base(plan: MergePlan, adapters: Mapping[str, Adapter], base: Checkpoint) -> set[tuple[str, str]]:
    """The (role, base tensor name) of every saved tensor the plan reads that holds the base's
    values (an embedding saved beside its LoRA factors, say): reading its data decides it."""
    wanted = {(t.role, r.name) for r in plan.tensors for t in r.terms if t.role != BASE and t.weight != 0.0}
    return {(role, name) for role, name in wanted
            if same_values(adapters[role], adapters[role].lora.replaced[name], base, name)}


def _fan_in_fan_out(adapters: Mapping[str, Adapter], result: AdapterPlan) -> bool:
    """The adapters' ``fan_in_fan_out`` (seen in their non-embedding modules: transposed updates);
    adapters that disagree are refused."""
    used = {role for m in result.modules for role in m.roles}
    seen = {role: any(d.transposed for d in a.lora.deltas.values() if not d.a.endswith("lora_embedding_A"))
            for role, a in adapters.items() if role in used
            and any(not d.a.endswith("lora_embedding_A") for d in a.lora.deltas.values())}
    if len(set(seen.values())) > 1:
        yes = next(r for r, v in seen.items() if v)
        no = next(r for r, v in seen.items() if not v)
        raise ConfigError(f"{param('as_adapter')}: the {describe_role(yes)} sets fan_in_fan_out and the "
                          f"{describe_role(no)} does not: one adapter cannot hold both")
    return any(seen.values())


def _tied(base: Checkpoint) -> bool:
    """Whether the base model ties its output head to its input embeddings (``config.json``)."""
    return bool(base.config) and base.config.get("tie_word_embeddings") is True  # type: ignore[union-attr]


def _write(method: Method, plan: MergePlan, result: AdapterPlan, inputs: Mapping[str, Checkpoint], out: PathLike,
           options: Mapping[str, Any], write: WriteOptions, config: Mapping[str, Any],
           other_inputs: Sequence[PathLike | None]) -> MergeResult:
    """Lay out, check and (unless a dry run) write the adapter, as ``writing.write_plan`` writes a
    model: one weights file, no index, no side files (an adapter carries no config.json)."""
    write.check()  # the shard size too: checked and recorded, though an adapter is one file
    out_path = output_location(out)
    summary = {"base_model": config["base_model_name_or_path"], "modules": len(result.modules),
               "copied": sum(not m.concatenated for m in result.modules),
               "concatenated": sum(m.concatenated for m in result.modules),
               "modules_to_save": list(result.modules_to_save)}
    recipe = _recipe(method.command, plan, inputs, {**options, "shard_size": str(write.shard_size)},
                     {**method.extra(plan), "adapter": summary})
    metadata = {"format": "pt", "layerswap_fast": json.dumps(recipe, separators=(",", ":"), sort_keys=True)}
    laid_out = layout_shards(plan.tensors, _ONE_FILE, metadata, source_offset=lambda r: _copied_from(r, inputs),
                             follow_sources=False)
    shards = [replace(s, filename=WEIGHTS_NAME) for s in laid_out]  # type: ignore[type-var]
    card = _card(method, plan, result, inputs, options)
    texts = {CONFIG_NAME: config_text(dict(config))}
    guarded = guarded_paths(inputs.values(), [*other_inputs, *write.other_inputs])
    check_output(out_path, guarded, write.force, needed_bytes(shards, "copy") + len(texts[CONFIG_NAME])
                 + _small_files_bytes(recipe, shards, 1, card))
    if write.dry_run:
        return MergeResult(plan, shards, None, recipe)
    clean_stale_partials(out_path, log.warning)
    backend = write.blender or make_backend(write.device, write.threads, parse_size(write.max_gpu_bytes))
    try:
        stats = execute(shards, inputs, out_path, backend=backend, recipe=recipe, force=write.force,
                        link=write.link, threads=write.threads or 0, sync=write.sync, checksum=write.checksum, io=write.io,
                        progress=write.progress, card=card, index=False, texts=texts)
    finally:
        if write.blender is None:
            backend.close()
    return MergeResult(plan, shards, stats, recipe)


def _card(method: Method, plan: MergePlan, result: AdapterPlan, inputs: Mapping[str, Checkpoint],
          options: Mapping[str, Any]) -> str:
    named = [CardInput(describe_role(role), local_name(c.directory), c.hub_id, c.revision)
             for role, c in inputs.items()]
    copied = sum(not m.concatenated for m in result.modules)
    account = (f"Written as a PEFT LoRA adapter of the base (`--as-adapter`): load it with "
               f"`PeftModel.from_pretrained(base_model, this_directory)`. {len(result.modules)} modules: {copied} "
               f"keep one adapter's factors, byte for byte in their own dtype (their scale is the merge's weight "
               f"times that adapter's scale), {len(result.modules) - copied} mixed from several are the exact "
               f"concatenation A = [w₁s₁·A₁; w₂s₂·A₂; ...], B = [B₁, B₂, ...] with scale 1, each folded block "
               f"computed in float32 "
               f"and rounded once into A's dtype. Each module's rank and scale are in `adapter_config.json` "
               f"(`rank_pattern`, `alpha_pattern`).\n\n")
    return render_card(plan.method, method.command, __version__, named,
                       account + method.card_section(options, plan), library="peft")
