"""The merge plan: one recipe per output tensor, computed from names, shapes and the config alone.

This is the paper's Algorithm 1 as a table: walking the task expert's parameters, each is kept,
replaced by the language expert's, or averaged with it. No file is touched here, so a plan can be
printed, saved as JSON and tested on its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from .dtypes import require_float
from .errors import ConfigError, MismatchError
from .layers import classify

TASK = "task"
LANGUAGE = "language"

TransitionWeights = Literal["uniform", "ramp", "magnitude"]
NonLayer = Literal["average", "task", "language"]
TRANSITION_WEIGHTS = ("uniform", "ramp", "magnitude")
NON_LAYER = ("average", "task", "language")


class SpecLike(Protocol):
    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SwapConfig:
    """How to layer-swap: counts refer to layers of the whole model (paper, Section 4).

    Layers ``[0, bottom)`` and ``[L-top, L)`` come from the language expert; the
    ``lower_transition`` layers above the bottom block and the ``upper_transition`` layers below
    the top block blend both experts; the rest is the task expert's.
    """

    bottom: int = 5
    top: int = 2
    lower_transition: int = 1
    upper_transition: int = 1
    transition_weights: TransitionWeights = "uniform"
    non_layer: NonLayer = "average"
    #: (task, language) weights for ``magnitude``, from the row-MAV analysis against a base
    magnitude_weights: tuple[float, float] | None = None

    def validate(self, num_layers: int) -> None:
        counts = {"bottom": self.bottom, "top": self.top,
                  "lower transition": self.lower_transition, "upper transition": self.upper_transition}
        for what, n in counts.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ConfigError(f"{what} must be a non-negative whole number of layers, got {n!r}")
        if self.transition_weights not in TRANSITION_WEIGHTS:
            raise ConfigError(f"transition weights must be one of {', '.join(TRANSITION_WEIGHTS)}, "
                              f"got {self.transition_weights!r}")
        if self.non_layer not in NON_LAYER:
            raise ConfigError(f"non-layer must be one of {', '.join(NON_LAYER)}, got {self.non_layer!r}")
        if self.transition_weights == "magnitude" and self.magnitude_weights is None:
            raise ConfigError("magnitude transition weights need the experts' average MAVs: pass a base model")
        needed = sum(counts.values())
        if needed > num_layers:
            raise ConfigError(
                f"the swap needs {needed} layers (bottom {self.bottom} + lower transition "
                f"{self.lower_transition} + upper transition {self.upper_transition} + top {self.top}) "
                f"but the model has {num_layers}")


@dataclass(frozen=True)
class Term:
    """One input of a recipe: this expert's tensor of the same name, times ``weight``."""

    expert: str
    weight: float


@dataclass(frozen=True)
class LayerRow:
    """One row of the layer map: which zone a layer falls in and how it is made."""

    layer: int
    zone: str  # "language" | "lower transition" | "task" | "upper transition"
    terms: tuple[Term, ...]


@dataclass(frozen=True)
class TensorRecipe:
    """How one output tensor is made. ``op`` is ``copy`` (bytes of ``terms[0]``'s tensor,
    unchanged) or ``blend`` (sum of weight × float32 value, rounded into ``dtype``)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    layer: int | None
    op: Literal["copy", "blend"]
    terms: tuple[Term, ...]


@dataclass(frozen=True)
class MergePlan:
    num_layers: int
    config: SwapConfig
    dtype: str | None
    layers: tuple[LayerRow, ...]
    non_layer: tuple[Term, ...]
    tensors: tuple[TensorRecipe, ...] = field(repr=False)

    def counts(self) -> dict[str, int]:
        copies = sum(t.op == "copy" for t in self.tensors)
        return {"tensors": len(self.tensors), "copy": copies, "blend": len(self.tensors) - copies}

    def to_json(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "config": asdict(self.config),
            "dtype": self.dtype,
            "layers": [{"layer": r.layer, "zone": r.zone, "sources": _terms_json(r.terms)} for r in self.layers],
            "non_layer": {
                "sources": _terms_json(self.non_layer),
                "tensors": [t.name for t in self.tensors if t.layer is None],
            },
            "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "layer": t.layer,
                         "op": t.op, "sources": _terms_json(t.terms)} for t in self.tensors],
            "counts": self.counts(),
        }


def _terms_json(terms: Sequence[Term]) -> list[dict[str, Any]]:
    return [{"expert": t.expert, "weight": t.weight} for t in terms]


def _transition_terms(j: int, n: int, config: SwapConfig) -> tuple[Term, ...]:
    """Weights of the j-th of n transition layers, counted from the language expert's side."""
    if config.transition_weights == "ramp":
        task_w = j / (n + 1)
        return Term(TASK, task_w), Term(LANGUAGE, 1.0 - task_w)
    if config.transition_weights == "magnitude":
        assert config.magnitude_weights is not None
        task_w, lang_w = config.magnitude_weights
        return Term(TASK, task_w), Term(LANGUAGE, lang_w)
    return Term(TASK, 0.5), Term(LANGUAGE, 0.5)


def layer_map(num_layers: int, config: SwapConfig) -> tuple[LayerRow, ...]:
    """The layer table: zone and source weights of every layer 0..L-1."""
    config.validate(num_layers)
    L, b, t = num_layers, config.bottom, config.top
    lt, ut = config.lower_transition, config.upper_transition
    rows = []
    for layer in range(L):
        if layer < b or layer >= L - t:
            rows.append(LayerRow(layer, "language", (Term(LANGUAGE, 1.0),)))
        elif layer < b + lt:
            rows.append(LayerRow(layer, "lower transition", _transition_terms(layer - b + 1, lt, config)))
        elif layer >= L - t - ut:
            rows.append(LayerRow(layer, "upper transition", _transition_terms(L - t - layer, ut, config)))
        else:
            rows.append(LayerRow(layer, "task", (Term(TASK, 1.0),)))
    return tuple(rows)


def non_layer_terms(config: SwapConfig) -> tuple[Term, ...]:
    if config.non_layer == "task":
        return (Term(TASK, 1.0),)
    if config.non_layer == "language":
        return (Term(LANGUAGE, 1.0),)
    return Term(TASK, 0.5), Term(LANGUAGE, 0.5)


def check_pair(task: Sequence[SpecLike], language: Sequence[SpecLike]) -> None:
    """Same tensor names and shapes in both experts; the first difference is named."""
    lang_by_name = {s.name: s for s in language}
    for spec in task:
        other = lang_by_name.get(spec.name)
        if other is None:
            raise MismatchError(f"tensor {spec.name!r} is in the task expert but not in the language expert")
        if tuple(other.shape) != tuple(spec.shape):
            raise MismatchError(
                f"tensor {spec.name!r} has shape {list(spec.shape)} in the task expert but "
                f"{list(other.shape)} in the language expert")
    task_names = {s.name for s in task}
    for spec in language:
        if spec.name not in task_names:
            raise MismatchError(f"tensor {spec.name!r} is in the language expert but not in the task expert")


def build_swap_plan(
    task: Sequence[SpecLike],
    language: Sequence[SpecLike],
    num_layers: int,
    config: SwapConfig,
    dtype: str | None = None,
) -> MergePlan:
    """The plan for layer-swapping ``language`` into ``task``, in the task expert's tensor order.

    Output dtype: ``dtype`` when given, else the task expert's dtype of each tensor. A recipe is a
    byte ``copy`` when it takes one expert's tensor whole and the dtype does not change.
    """
    check_pair(task, language)
    rows = layer_map(num_layers, config)
    non_layer = non_layer_terms(config)
    dtypes: Mapping[str, Mapping[str, str]] = {
        TASK: {s.name: s.dtype for s in task}, LANGUAGE: {s.name: s.dtype for s in language}}
    recipes = []
    for spec in task:
        layer = classify(spec.name).layer
        if layer is not None and layer >= num_layers:
            raise MismatchError(f"tensor {spec.name!r} is in layer {layer} of a {num_layers}-layer model")
        terms = non_layer if layer is None else rows[layer].terms
        out_dtype = dtype or spec.dtype
        single = len(terms) == 1 and terms[0].weight == 1.0
        if single and dtypes[terms[0].expert][spec.name] == out_dtype:
            op: Literal["copy", "blend"] = "copy"
        else:
            op = "blend"
            for term in terms:
                require_float(dtypes[term.expert][spec.name], spec.name)
            require_float(out_dtype, spec.name)
        recipes.append(TensorRecipe(spec.name, out_dtype, tuple(spec.shape), layer, op, terms))
    return MergePlan(num_layers, config, dtype, rows, non_layer, tuple(recipes))


def render_plan(plan: MergePlan) -> str:
    """The layer map as text: layer → zone and sources, then the non-layer tensors."""
    def fmt(terms: Sequence[Term]) -> str:
        if len(terms) == 1:
            return f"{terms[0].expert} expert"
        return " + ".join(f"{t.weight:.4g}×{t.expert}" for t in terms)

    c = plan.config
    lines = [f"layer swap of a {plan.num_layers}-layer model: bottom {c.bottom}, top {c.top}, "
             f"transitions {c.lower_transition}/{c.upper_transition} ({c.transition_weights}), "
             f"non-layer {c.non_layer}",
             f"{'layer':>5}  {'zone':<17} sources"]
    for row in plan.layers:
        lines.append(f"{row.layer:>5}  {row.zone:<17} {fmt(row.terms)}")
    non_layer = [t for t in plan.tensors if t.layer is None]
    lines.append(f"non-layer tensors ({len(non_layer)}): {fmt(plan.non_layer)}")
    lines += [f"       {t.name}  {t.op}" for t in non_layer]
    n = plan.counts()
    lines.append(f"{n['tensors']} tensors: {n['copy']} copied byte for byte, {n['blend']} blended")
    return "\n".join(lines)
