"""PEFT LoRA adapters as inputs: ``adapter_config.json`` beside ``adapter_model.safetensors``.

An adapter names, for some modules of a base model, two factors whose product is the module's
update: ΔW = s·B·A (``lora_A`` of shape [r, in], ``lora_B`` of shape [out, r]), transposed for
embeddings (``lora_embedding_A`` [r, vocab], ``lora_embedding_B`` [dim, r]) and for
``fan_in_fan_out`` layers, with s = alpha / r, or alpha / √r under rsLoRA, r and alpha per module
from ``rank_pattern`` / ``alpha_pattern`` (the first pattern that matches the end of the module's
name, as PEFT matches them). Other tensors of the adapter (``modules_to_save``, an embedding's
``base_layer`` saved with it, trained biases) replace the base's tensor of the same name whole.

Opening an adapter reads its config and its header; it is a :class:`Checkpoint` whose extra
``lora`` table says what each base tensor becomes. Variants whose merge is not W + s·B·A (DoRA,
``lora_bias``, replicated layers, LoRA on raw parameters, trainable tokens) are refused in one line.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, MismatchError
from ..plan.lowrank import Delta
from ..safe_read import Bool, Float, Int, List, Map, Nullable, Str, read_json
from .checkpoint import Checkpoint, TensorSpec
from .hub import HubSnapshot, find_snapshot

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

#: what this package reads of an adapter's config; the rest (dropout, task type ...) does not
#: change the weights
CONFIG_SCHEMA = Map({
    "peft_type": Str(), "r": Int(lo=1), "lora_alpha": Float(), "use_rslora": Bool(), "fan_in_fan_out": Bool(),
    "rank_pattern": Nullable(Map(values=Int(lo=1))), "alpha_pattern": Nullable(Map(values=Float())),
    "use_dora": Bool(), "lora_bias": Bool(), "base_model_name_or_path": Nullable(Str()),
    "modules_to_save": Nullable(List(Str())),
}, required=("peft_type", "r", "lora_alpha"))

#: config keys whose non-empty value makes the merged weight something other than W + s·B·A
_REFUSED = {
    "use_dora": "DoRA adapters rescale every column of W + ΔW by a learned magnitude",
    "lora_bias": "lora_bias adapters also train a bias of lora_B",
    "layer_replication": "layer_replication adapters change the model's layer stack",
    "target_parameters": "adapters on raw parameters (target_parameters) are not module updates",
    "trainable_token_indices": "trainable-token adapters store rows of the embedding apart",
}


@dataclass(frozen=True)
class LoraTable:
    """What an adapter does to a base model, by base tensor name: low-rank ``deltas`` and whole
    ``replaced`` tensors (available in the adapter's checkpoint under the base name too)."""

    deltas: Mapping[str, Delta]
    replaced: Mapping[str, str]  # base tensor name → the adapter's name for it
    base_model: str | None


def _locate(path: str | os.PathLike[str]) -> tuple[Path | None, HubSnapshot | None]:
    """The adapter's directory (None when ``path`` is not an adapter) and the cached snapshot a
    hub id named."""
    snapshot = find_snapshot(path)
    directory = Path(path) if snapshot is None else snapshot.path
    return (directory if (directory / CONFIG_NAME).is_file() else None), snapshot


def adapter_directory(path: str | os.PathLike[str]) -> Path | None:
    """The directory of the adapter at ``path`` (local, or a cached hub id); None when ``path``
    is not an adapter."""
    return _locate(path)[0]


def is_adapter(path: str | os.PathLike[str]) -> bool:
    return adapter_directory(path) is not None


def base_model_of(path: str | os.PathLike[str]) -> str | None:
    """The base model the adapter names, as written (a local path or a hub id), if any."""
    directory = adapter_directory(path)
    return None if directory is None else _read_config(directory).get("base_model_name_or_path")


class Adapter(Checkpoint):
    """An opened adapter: its tensors as a checkpoint, and :attr:`lora`, what it does to a base."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        directory, snapshot = _locate(path)
        if directory is None:
            raise CheckpointError(f"{path}: no {CONFIG_NAME}: not a PEFT adapter")
        config = _read_config(directory)
        if not os.path.lexists(directory / WEIGHTS_NAME):
            pickled = " (adapter_model.bin is a pickle, which is never unpickled: save the adapter again with " \
                      "safe_serialization=True)" if os.path.lexists(directory / "adapter_model.bin") else ""
            raise CheckpointError(f"{directory}: the adapter has no {WEIGHTS_NAME}{pickled}")
        super().__init__(directory / WEIGHTS_NAME)
        self.path = directory
        if snapshot is not None:
            self.hub_id, self.revision = snapshot.hub_id, snapshot.revision
        try:
            self.lora = _lora_table(config, self.specs, directory / WEIGHTS_NAME)
        except BaseException:
            self.close()
            raise
        for name, stored in self.lora.replaced.items():  # read by its base name, like any input's tensor
            self.specs[name] = replace(self.specs[stored], name=name)


def _read_config(directory: Path) -> dict[str, Any]:
    config: dict[str, Any] = read_json(directory / CONFIG_NAME, CONFIG_SCHEMA, error=CheckpointError)
    where = directory / CONFIG_NAME
    if config["peft_type"] != "LORA":
        raise CheckpointError(f"{where}: peft_type {config['peft_type']!r} is not supported: only LORA adapters are")
    for key, why in _REFUSED.items():
        if config.get(key):
            raise CheckpointError(f"{where}: {key} is set: {why}, which this tool does not support")
    return config


_FACTOR = re.compile(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)")


def _lora_table(config: Mapping[str, Any], specs: Mapping[str, TensorSpec], where: Path) -> LoraTable:
    """Every tensor of the adapter, by what it does to the base tensor it names."""
    factors: dict[str, dict[str, TensorSpec]] = {}
    replaced: dict[str, str] = {}
    for name, spec in specs.items():
        if not name.startswith(PREFIX):
            raise CheckpointError(f"{where}: tensor {name!r} does not start with {PREFIX!r}: not a PEFT adapter")
        match = _FACTOR.fullmatch(name[len(PREFIX):])
        if match:
            factors.setdefault(match[1], {})[match[2].split(".")[0][-1]] = spec
        elif ".lora_" in name:
            raise CheckpointError(f"{where}: tensor {name!r} is no LoRA factor this tool knows")
        else:
            replaced[name[len(PREFIX):].replace(".base_layer.", ".")] = name
    deltas = {}
    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"{where}: module {module!r} has lora_{next(iter(pair))} but not its partner")
        deltas[module + ".weight"] = _delta(config, module, pair["A"], pair["B"], where)
    return LoraTable(deltas, replaced, config.get("base_model_name_or_path"))


def _delta(config: Mapping[str, Any], module: str, a: TensorSpec, b: TensorSpec, where: Path) -> Delta:
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
        raise CheckpointError(f"{where}: module {module!r} has factors of shapes {list(a.shape)} and "
                              f"{list(b.shape)}, which do not multiply")
    rank = a.shape[0]
    r = config.get("rank_pattern") or {}
    declared = r.get(_pattern_key(r, module), config["r"])
    if declared != rank:
        raise CheckpointError(f"{where}: module {module!r} has rank {rank} but its config says {declared}")
    alphas = config.get("alpha_pattern") or {}
    alpha = alphas.get(_pattern_key(alphas, module), config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    embedding = a.name.endswith("lora_embedding_A")
    return Delta(a.name, b.name, rank, scale, embedding or bool(config.get("fan_in_fan_out")))


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """The first pattern that matches the end of the module's name after a dot, as PEFT's
    ``get_pattern_key`` finds it; a pattern that is no regular expression matches nothing."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error:
            continue
    return None


def delta_shape(delta: Delta, specs: Mapping[str, TensorSpec]) -> tuple[int, int]:
    """The shape of the weight the delta updates."""
    b_out, a_in = specs[delta.b].shape[0], specs[delta.a].shape[1]
    return (a_in, b_out) if delta.transposed else (b_out, a_in)


def check_against_base(adapter: Adapter, base: Sequence[TensorSpec], role: str) -> None:
    """Every module the adapter updates or replaces is a tensor of the base, of the same shape;
    the first one that is not is named."""
    shapes = {s.name: tuple(s.shape) for s in base}
    changed = [(name, delta_shape(d, adapter.specs)) for name, d in adapter.lora.deltas.items()]
    changed += [(name, tuple(adapter.specs[name].shape)) for name in adapter.lora.replaced]
    for name, shape in changed:
        if name not in shapes:
            raise MismatchError(f"the {role} {adapter.path} changes {name!r}, which the base does not have")
        if shapes[name] != shape:
            raise MismatchError(f"the {role} {adapter.path} was trained on another base: {name!r} is "
                                f"{list(shapes[name])} in the base but {list(shape)} in the adapter")
