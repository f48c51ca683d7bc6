"""Map tensor names to transformer layers and parameter kinds, across model families.

Knows names only: ``model.layers.7.mlp.up_proj.weight`` is layer 7, kind ``up``. Families covered:
``model.layers.N.`` (Llama, Mistral, Qwen, Gemma, Mixtral, Phi-3 ...), ``transformer.h.N.`` (GPT-2,
Falcon, BLOOM), ``gpt_neox.layers.N.``, ``model.decoder.layers.N.`` (OPT), ``encoder.layer.N.``
(BERT), ``transformer.blocks.N.`` (MPT), and anything else whose name holds a ``layers|h|layer|
blocks`` component followed by an index.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError, MismatchError
from ..safe_read import Int, Map, Nullable, show_value

#: the parameter kinds of the paper's Figure 2, in its column order
FIGURE_KINDS = ("q", "k", "v", "o", "gate", "up", "down")

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.([0-9]+)\.")
#: most layers a model may have: layer counts and indices read from files are bounded by it
#: before anything (a set of indices, a layer table) is allocated from them
MAX_LAYERS = 65536

# Checked in order against the part of the name after the layer index (or the whole name for
# non-layer tensors), without the trailing ``.weight``/``.bias``; the first match wins. Fused
# projections (GPT-2 ``c_attn``, Falcon ``query_key_value``) are ``other``: they are no single kind.
_KIND_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern)) for kind, pattern in (
        ("norm", r"(?i)(?:^|[._])(?:\w*norm\w*|ln(?:_\w+|\d*))$"),
        ("o", r"(?:^|\.)(?:o_proj|out_proj|wo|attn\.c_proj|attention\.output\.dense|(?:self_)?attention\.dense)$"),
        ("q", r"(?:^|\.)(?:q_proj|query|wq)$"),
        ("k", r"(?:^|\.)(?:k_proj|key|wk)$"),
        ("v", r"(?:^|\.)(?:v_proj|value|wv)$"),
        ("gate", r"(?:^|\.)(?:gate_proj|w1)$"),
        ("up", r"(?:^|\.)(?:up_proj|w3|fc1|c_fc|dense_h_to_4h|intermediate\.dense)$"),
        ("down", r"(?:^|\.)(?:down_proj|w2|fc2|mlp\.c_proj|dense_4h_to_h|output\.dense)$"),
        ("embed", r"(?:^|\.)(?:embed_tokens|wte|wpe|embed_in|word_embeddings|tok_embeddings)$"),
        ("lm_head", r"^(?:lm_head|embed_out|output)$"),
    ))


_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_NESTED_CONFIGS = ("text_config", "llm_config", "language_config")
_LAYER_COUNTS = {key: Nullable(Int(1, MAX_LAYERS)) for key in _LAYER_COUNT_KEYS}
#: the keys of ``config.json`` this package reads; any other key may hold anything
CONFIG_SCHEMA = Map({**_LAYER_COUNTS, **{nested: Nullable(Map(_LAYER_COUNTS)) for nested in _NESTED_CONFIGS}})


@dataclass(frozen=True)
class LayerInfo:
    """Where a tensor sits: its layer index (None for non-layer tensors) and parameter kind."""

    layer: int | None
    kind: str


def classify(name: str) -> LayerInfo:
    """Layer index and parameter kind of one tensor name."""
    match = _LAYER.search(name)
    if match is None:
        return LayerInfo(None, _kind(name))
    digits = match.group(1)
    if len(digits) > len(str(MAX_LAYERS)) or int(digits) >= MAX_LAYERS:
        shown = digits if len(digits) <= 20 else digits[:20] + "..."
        raise CheckpointError(f"tensor {show_value(name)}: layer index {shown} is above the limit of "
                              f"{MAX_LAYERS - 1}")
    suffix = name[match.end():]
    return LayerInfo(int(digits), _kind(suffix))


def renumber(name: str, layer: int) -> str:
    """``name`` with its layer index replaced by ``layer`` (``model.layers.3.x`` → ``model.layers.7.x``)."""
    match = _LAYER.search(name)
    if match is None:
        raise ValueError(f"{name!r} has no layer index")
    return name[:match.start(1)] + str(layer) + name[match.end(1):]


def _kind(suffix: str) -> str:
    stem = suffix.rsplit(".", 1)[0] if suffix.endswith((".weight", ".bias")) else suffix
    for kind, pattern in _KIND_RULES:
        if pattern.search(stem):
            return kind
    return "other"


def layer_count_from_config(config: Mapping[str, Any] | None, where: str = "config") -> int | None:
    """``num_hidden_layers`` or one of its aliases, also inside a nested ``text_config``; every
    one present must be an integer in 1..MAX_LAYERS (:data:`CONFIG_SCHEMA`, which
    ``Checkpoint`` already applied to its ``config.json``)."""
    if not config:
        return None
    CONFIG_SCHEMA.check(config, where, error=CheckpointError)
    for sub in (config, *(config.get(n) for n in _NESTED_CONFIGS)):
        for key in _LAYER_COUNT_KEYS:
            if sub is not None and sub.get(key) is not None:
                return int(sub[key])
    return None


def count_layers(names: Iterable[str], config: Mapping[str, Any] | None, where: str) -> int:
    """The model's layer count: from the config, checked against the tensor names.

    Without a config (a bare ``.safetensors`` file), the names alone decide. Either way every
    index 0..L-1 must occur in the names.
    """
    seen = {info.layer for info in map(classify, names) if info.layer is not None}
    from_config = layer_count_from_config(config, f"{where}: config.json")
    count = from_config if from_config is not None else (max(seen) + 1 if seen else 0)
    if seen != set(range(count)):
        missing = sorted(set(range(count)) - seen)
        extra = sorted(seen - set(range(count)))
        detail = f"missing layers {missing[:5]}" if missing else f"unexpected layers {extra[:5]}"
        source = "config.json says" if from_config is not None else "names suggest"
        raise MismatchError(f"{where}: {source} {count} layers but the tensor names disagree ({detail})")
    return count
