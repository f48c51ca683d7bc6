"""The merge plan: one recipe per output tensor, computed from names, shapes and the config alone.

This is the paper's Algorithm 1 as a table: walking the task expert's parameters, each is kept,
replaced by the language expert's, or averaged with it. No file is touched here, so a plan can be
printed, saved as JSON and tested on its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from ..dtypes import require_float
from ..errors import ConfigError, MismatchError
from .layers import classify

TASK = "task"
LANGUAGE = "language"

TransitionWeights = Literal["uniform", "ramp", "magnitude"]
NonLayer = Literal["average", "task", "language", "magnitude"]
TRANSITION_WEIGHTS = ("uniform", "ramp", "magnitude")
NON_LAYER = ("average", "task", "language", "magnitude")


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
        if "magnitude" in (self.transition_weights, self.non_layer) and self.magnitude_weights is None:
            raise ConfigError("magnitude weights need the experts' average MAVs: pass --base (or --stats)")
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


Op = Literal["copy", "blend", "ties", "revert_rows"]


@dataclass(frozen=True)
class TensorRecipe:
    """How one output tensor is made from the same-named tensors of the inputs in ``terms``.

    ``copy``: the bytes of ``terms[0]``'s tensor, unchanged. ``blend``: sum of weight × float32
    value, rounded into ``dtype``. ``ties``: TIES-merging of the deltas of ``terms[1:]`` against
    the base ``terms[0]``. ``revert_rows``: rows of ``terms[1]`` whose row MAV against the base
    ``terms[0]`` is small go back to the base. ``params`` holds the op's numbers (density, ...).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    layer: int | None
    op: Op
    terms: tuple[Term, ...]
    params: tuple[tuple[str, float], ...] = ()

    def param(self, key: str) -> float:
        return dict(self.params)[key]


@dataclass(frozen=True)
class MergePlan:
    """One recipe per output tensor, plus (for a swap) the layer table it came from."""

    num_layers: int
    config: Any
    dtype: str | None
    layers: tuple[LayerRow, ...]
    non_layer: tuple[Term, ...]
    tensors: tuple[TensorRecipe, ...] = field(repr=False)
    method: str = "layer_swap"

    def counts(self) -> dict[str, int]:
        copies = sum(t.op == "copy" for t in self.tensors)
        return {"tensors": len(self.tensors), "copy": copies, "blend": len(self.tensors) - copies}

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "num_layers": self.num_layers,
            "config": asdict(self.config) if self.config is not None else None,
            "dtype": self.dtype,
            "layers": [{"layer": r.layer, "zone": r.zone, "sources": _terms_json(r.terms)} for r in self.layers],
            "non_layer": {
                "sources": _terms_json(self.non_layer),
                "tensors": [t.name for t in self.tensors if t.layer is None],
            },
            "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "layer": t.layer,
                         "op": t.op, "sources": _terms_json(t.terms), **dict(t.params)} for t in self.tensors],
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
    if config.non_layer == "magnitude":
        assert config.magnitude_weights is not None
        task_w, lang_w = config.magnitude_weights
        return Term(TASK, task_w), Term(LANGUAGE, lang_w)
    if config.non_layer == "task":
        return (Term(TASK, 1.0),)
    if config.non_layer == "language":
        return (Term(LANGUAGE, 1.0),)
    return Term(TASK, 0.5), Term(LANGUAGE, 0.5)


def check_same_tensors(reference: tuple[str, Sequence[SpecLike]], other: tuple[str, Sequence[SpecLike]]) -> None:
    """Same tensor names and shapes in both checkpoints; the first difference is named."""
    (ref_role, ref), (role, specs) = reference, other
    by_name = {s.name: s for s in specs}
    for spec in ref:
        mine = by_name.get(spec.name)
        if mine is None:
            raise MismatchError(f"tensor {spec.name!r} is in the {ref_role} but not in the {role}")
        if tuple(mine.shape) != tuple(spec.shape):
            raise MismatchError(f"tensor {spec.name!r} has shape {list(spec.shape)} in the {ref_role} but "
                                f"{list(mine.shape)} in the {role}")
    ref_names = {s.name for s in ref}
    for spec in specs:
        if spec.name not in ref_names:
            raise MismatchError(f"tensor {spec.name!r} is in the {role} but not in the {ref_role}")


def describe_role(role: str) -> str:
    """``task`` → ``task expert``; ``task.1`` → ``task expert 2``; ``model.0`` → ``model 1``."""
    kind, _, index = role.partition(".")
    noun = {"task": "task expert", "language": "language expert"}.get(kind, kind)
    return f"{noun} {int(index) + 1}" if index else noun


def make_recipe(spec: SpecLike, layer: int | None, terms: Sequence[Term], out_dtype: str,
                dtypes: Mapping[str, Mapping[str, str]], op: Op | None = None,
                params: tuple[tuple[str, float], ...] = ()) -> TensorRecipe:
    """A recipe for ``spec``: a byte copy when ``terms`` is one input taken whole in the output
    dtype, else ``op`` (default ``blend``), whose inputs must all be float tensors."""
    terms = tuple(terms)
    if op is None and len(terms) == 1 and terms[0].weight == 1.0 and dtypes[terms[0].expert][spec.name] == out_dtype:
        return TensorRecipe(spec.name, out_dtype, tuple(spec.shape), layer, "copy", terms)
    for term in terms:
        require_float(dtypes[term.expert][spec.name], spec.name)
    require_float(out_dtype, spec.name)
    return TensorRecipe(spec.name, out_dtype, tuple(spec.shape), layer, op or "blend", terms, params)


Groups = Mapping[str, Sequence[tuple[str, float]]]


def expand_groups(terms: Sequence[Term], groups: Groups) -> tuple[Term, ...]:
    """Replace each group term (``task``, ``language``) by its members, weights multiplied: a soup
    of each group, swapped in the same pass."""
    return tuple(Term(member, t.weight * w) for t in terms for member, w in groups[t.expert])


def build_swap_plan(
    task: Sequence[SpecLike],
    language: Sequence[SpecLike],
    num_layers: int,
    config: SwapConfig,
    dtype: str | None = None,
    *,
    members: Mapping[str, Sequence[SpecLike]] | None = None,
    groups: Groups | None = None,
) -> MergePlan:
    """The plan for layer-swapping ``language`` into ``task``, in the task expert's tensor order.

    Output dtype: ``dtype`` when given, else the task expert's dtype of each tensor. A recipe is a
    byte ``copy`` when it takes one expert's tensor whole and the dtype does not change.

    Soup-then-swap: ``groups`` maps ``task`` and ``language`` to weighted member roles whose specs
    are in ``members``; every recipe then draws on the members directly (one pass, no
    intermediate soup is written).
    """
    if groups is None:
        groups = {TASK: [(TASK, 1.0)], LANGUAGE: [(LANGUAGE, 1.0)]}
        members = {TASK: task, LANGUAGE: language}
    assert members is not None
    first = groups[TASK][0][0]
    for role, specs in members.items():
        if role != first:
            check_same_tensors((describe_role(first), members[first]), (describe_role(role), specs))
    rows = layer_map(num_layers, config)
    non_layer = non_layer_terms(config)
    dtypes = {role: {s.name: s.dtype for s in specs} for role, specs in members.items()}
    recipes = []
    for spec in members[first]:
        layer = classify(spec.name).layer
        if layer is not None and layer >= num_layers:
            raise MismatchError(f"tensor {spec.name!r} is in layer {layer} of a {num_layers}-layer model")
        terms = expand_groups(non_layer if layer is None else rows[layer].terms, groups)
        recipes.append(make_recipe(spec, layer, terms, dtype or spec.dtype, dtypes))
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
