"""Layer swapping (Bandarkar et al., 2025, arXiv 2410.01335): the paper's Algorithm 1 as a table.

Walking the task expert's parameters, each is kept, replaced by the language expert's, or averaged
with it: layers ``[0, bottom)`` and ``[L-top, L)`` from the language expert, transition zones
blended, the middle from the task expert, non-layer parameters averaged. Several experts of a
kind are souped within their group in the same pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from ..errors import ConfigError, MismatchError, param
from ..formats.model_card import code_block, options_list
from ..plan import LayerRow, MergePlan, SpecLike, Term, check_same_tensors, describe_role, make_recipe
from ..plan.layers import classify
from .common import AS_ADAPTER, dtype_option, normalize_weights, output_dtype
from .method import Method, Option, PathLike, PlanInputs, as_list

TASK = "task"
LANGUAGE = "language"

TransitionWeights = Literal["uniform", "ramp", "magnitude"]
NonLayer = Literal["average", "task", "language", "magnitude"]
TRANSITION_WEIGHTS = ("uniform", "ramp", "magnitude")
NON_LAYER = ("average", "task", "language", "magnitude")




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
            raise ConfigError(f"magnitude weights need the experts' average MAVs: pass {param('base')} (or {param('stats')})")
        needed = sum(counts.values())
        if needed > num_layers:
            raise ConfigError(
                f"the swap needs {needed} layers (bottom {self.bottom} + lower transition "
                f"{self.lower_transition} + upper transition {self.upper_transition} + top {self.top}) "
                f"but the model has {num_layers}")




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




Groups = Mapping[str, Sequence[tuple[str, float]]]


def expand_groups(terms: Sequence[Term], groups: Groups) -> tuple[Term, ...]:
    """Replace each group term (``task``, ``language``) by its members, weights multiplied: a soup
    of each group, swapped in the same pass."""
    return tuple(Term(member, t.weight * w) for t in terms for member, w in groups[t.role])


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
    return MergePlan(num_layers, config, dtype, rows, non_layer, tuple(recipes), method="layer_swap")


def render_plan(plan: MergePlan) -> str:
    """The layer map as text: layer → zone and sources, then the non-layer tensors."""
    def fmt(terms: Sequence[Term]) -> str:
        if len(terms) == 1:
            return f"{terms[0].role} expert"
        return " + ".join(f"{t.weight:.4g}×{t.role}" for t in terms)

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


SOUP_WEIGHTS = ("uniform", "magnitude")


def groups(options: Mapping[str, Any]) -> dict[str, list[str]]:
    """The input roles of each group: ``task``/``language`` for one expert each, else numbered."""
    tasks, languages = as_list(options["task_expert"]), as_list(options["language_expert"])
    if not tasks or not languages:
        raise ConfigError("a layer swap needs at least one task expert and one language expert")
    if len(tasks) == 1 and len(languages) == 1:
        return {TASK: [TASK], LANGUAGE: [LANGUAGE]}
    return {TASK: [f"task.{i}" for i in range(len(tasks))], LANGUAGE: [f"language.{i}" for i in range(len(languages))]}


def _inputs(options: Mapping[str, Any]) -> dict[str, PathLike]:
    if options["soup_weights"] not in SOUP_WEIGHTS:
        raise ConfigError(f"soup weights must be one of {', '.join(SOUP_WEIGHTS)}, got {options['soup_weights']!r}")
    roles = groups(options)
    paths = as_list(options["task_expert"]) + as_list(options["language_expert"])
    return dict(zip(roles[TASK] + roles[LANGUAGE], paths))


def config_of(options: Mapping[str, Any]) -> SwapConfig:
    return SwapConfig(bottom=options["bottom"], top=options["top"], lower_transition=options["lower_transition"],
                      upper_transition=options["upper_transition"],
                      transition_weights=options["transition_weights"], non_layer=options["non_layer"])


def _swap_weights(config: SwapConfig, soup_weights: str, roles: dict[str, list[str]],
                  inputs: PlanInputs) -> tuple[SwapConfig, dict[str, list[tuple[str, float]]]]:
    """Soup weights within each group and, for ``magnitude``, the task/language weights."""
    needs = soup_weights == "magnitude" or "magnitude" in (config.transition_weights, config.non_layer)
    everyone = roles[TASK] + roles[LANGUAGE]
    mavw = dict(zip(everyone, inputs.magnitude(everyone))) if needs else {}
    weighted = {}
    for group, members in roles.items():
        raw = [mavw[m] for m in members] if soup_weights == "magnitude" else [1.0] * len(members)
        weighted[group] = list(zip(members, normalize_weights(raw)))
    if needs and "magnitude" in (config.transition_weights, config.non_layer):
        # a group's weight is its members' magnitude weights, averaged by their soup weights
        task_w, language_w = normalize_weights([sum(w * mavw[m] for m, w in weighted[g]) for g in (TASK, LANGUAGE)])
        config = replace(config, magnitude_weights=(task_w, language_w))
    return config, weighted


def _plan(inputs: PlanInputs, options: Mapping[str, Any]) -> MergePlan:
    roles = groups(options)
    config, weighted = _swap_weights(config_of(options), options["soup_weights"], roles, inputs)
    return build_swap_plan(inputs.specs[roles[TASK][0]], inputs.specs[roles[LANGUAGE][0]], inputs.num_layers,
                           config, output_dtype(options), members=inputs.specs, groups=weighted)


def _extra(plan: MergePlan) -> dict[str, Any]:
    return {"num_layers": plan.num_layers,
            "layers": [{"layer": r.layer, "zone": r.zone, "sources": {t.role: t.weight for t in r.terms}}
                       for r in plan.layers],
            "non_layer": {t.role: t.weight for t in plan.non_layer}}


def _describe(plan: MergePlan, shown: Mapping[str, Any]) -> str:
    return ("The language expert's bottom and top layers replace the task expert's, the layers between "
            "the blocks are blended, the middle stays the task expert's (Bandarkar et al., 2025, "
            "arXiv 2410.01335). The layer map (`layerswap-fast plan`):\n\n"
            + code_block(render_plan(plan)) + "\n\nOptions:\n\n" + options_list(shown))


METHOD = Method(
    name="layer_swap", command="merge",
    summary="Layer-swap LANGUAGE-EXPERT into TASK-EXPERT and write the merged checkpoint. With several "
            "experts of a kind, each group is souped first, in the same streaming pass.",
    options=(
        Option("task_expert", "paths", "Checkpoint whose middle layers are kept (the paper's math expert). Repeat "
               "to soup several task experts before the swap.", required=True),
        Option("language_expert", "paths", "Checkpoint whose bottom and top layers are swapped in. Repeat to soup "
               "several.", required=True),
        Option("bottom", "int", "Layers swapped in at the bottom.", default=5),
        Option("top", "int", "Layers swapped in at the top.", default=2),
        Option("lower_transition", "int", "Blended layers above the bottom block.", default=1),
        Option("upper_transition", "int", "Blended layers below the top block.", default=1),
        Option("transition_weights", "choice", "uniform: 0.5/0.5; ramp: linear from the language side to the task "
               "side across each zone; magnitude: ∝ 1 / average row MAV against --base (the paper's "
               "magnitude-adjusted average).", default="uniform", choices=TRANSITION_WEIGHTS),
        Option("non_layer", "choice", "Embeddings, final norm, lm_head: average both experts, take one, or "
               "magnitude-weight them.", default="average", choices=NON_LAYER),
        Option("soup_weights", "choice", "How repeated task/language experts are souped within each group.",
               default="uniform", choices=SOUP_WEIGHTS),
        Option("base", "path", "The model both experts were fine-tuned from; needed for magnitude weights."),
        Option("stats", "path", "Reuse an earlier `analyze` output directory for magnitude weights instead of "
               "recomputing."),
        dtype_option("task expert"),
        AS_ADAPTER,
    ),
    inputs=_inputs, plan=_plan, extra=_extra, describe=_describe)


def swap_options(task_expert: Any, language_expert: Any, config: SwapConfig | None, dtype: str | None,
                  soup_weights: str, base: Any, stats: Any) -> dict[str, Any]:
    """The swap's options by their recipe names, from a :class:`SwapConfig` and the rest."""
    c = config or SwapConfig()
    return {"task_expert": task_expert, "language_expert": language_expert, "bottom": c.bottom, "top": c.top,
            "lower_transition": c.lower_transition, "upper_transition": c.upper_transition,
            "transition_weights": c.transition_weights, "non_layer": c.non_layer, "soup_weights": soup_weights,
            "base": base, "stats": stats, "dtype": dtype}
