"""Model soups (Wortsman et al., 2022): the weighted average Σ wᵢ·modelᵢ of several models.

Weights are uniform, magnitude-adjusted (∝ 1 / average row MAV against a base: the layer-swapping
paper's baseline) or given, and always normalised to sum to 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, param
from ..formats.model_card import options_list
from ..plan import MergePlan, Term, describe_role, make_recipe
from ..plan.layers import classify
from .common import AS_ADAPTER, check_all, dtype_option, dtypes_of, model_role, normalize_weights, output_dtype
from .method import Method, Option, PlanInputs, PathLike


@dataclass(frozen=True)
class SoupConfig:
    weights: tuple[float, ...]


def build_soup_plan(members: Mapping[str, Sequence[Any]], weights: Sequence[float],
                    dtype: str | None = None) -> MergePlan:
    """Σ wᵢ·modelᵢ for every tensor, weights normalised to sum 1; in the first model's order."""
    if len(weights) != len(members):
        raise ConfigError(f"{len(weights)} soup weights for {len(members)} models")
    norm = normalize_weights(weights)
    first = check_all(members)
    dtypes = dtypes_of(members)
    terms = [Term(role, w) for role, w in zip(members, norm) if w != 0.0]
    recipes = tuple(make_recipe(s, classify(s.name).layer, terms, dtype or s.dtype, dtypes) for s in first)
    return MergePlan(0, SoupConfig(norm), dtype, (), (), recipes, method="soup")


def parse_weights(weights: str | Sequence[float]) -> str | list[float]:
    """``uniform``, ``magnitude`` or numbers (``0.3,0.7`` as text, or a list)."""
    if not isinstance(weights, str):
        return list(weights)  # checked (numbers, finite, a finite sum) by normalize_weights
    if weights in ("uniform", "magnitude"):
        return weights
    try:
        return [float(w) for w in weights.split(",")]
    except ValueError:
        raise ConfigError(f"{param('weights')} must be uniform, magnitude or numbers like 0.3,0.7, got {weights!r}") from None


def _inputs(options: Mapping[str, Any]) -> dict[str, PathLike]:
    models = list(options["model"])
    if len(models) < 1:
        raise ConfigError(f"a soup needs at least one {param('model')}")
    return {model_role(i): p for i, p in enumerate(models)}


def _plan(inputs: PlanInputs, options: Mapping[str, Any]) -> MergePlan:
    weights = parse_weights(options["weights"])
    roles = list(inputs.specs)
    if weights == "uniform":
        raw: Sequence[float] = [1.0] * len(roles)
    elif weights == "magnitude":
        raw = inputs.magnitude(roles)
    else:
        raw = weights
    return build_soup_plan(inputs.specs, raw, output_dtype(options))


def _record(options: Mapping[str, Any], plan: MergePlan) -> dict[str, Any]:
    weights = parse_weights(options["weights"])  # numbers given as text are recorded as read: "1,2" → "1.0,2.0"
    return {"weights": weights if isinstance(weights, str) else ",".join(map(str, weights))}


def _describe(plan: MergePlan, shown: Mapping[str, Any]) -> str:
    weights = ", ".join(f"{describe_role(model_role(i))} {w:.6g}" for i, w in enumerate(plan.config.weights))
    return (f"A model soup (Wortsman et al., 2022): every tensor is Σ wᵢ·modelᵢ, computed in float32, "
            f"with the weights normalised to sum 1: {weights}.\n\nOptions:\n\n{options_list(shown)}")


METHOD = Method(
    name="soup", command="soup", summary="A model soup: the weighted average of several models.",
    options=(
        Option("model", "paths", "A model to soup (repeat).", required=True, api="models"),
        Option("weights", "text", "uniform, magnitude (∝ 1 / average row MAV against --base), or w1,w2,... "
               "(normalised).", default="uniform"),
        Option("base", "path", "Base model, for --weights magnitude."),
        Option("stats", "path", "An earlier `analyze` output to reuse."),
        dtype_option("first model"),
        AS_ADAPTER,
    ),
    inputs=_inputs, plan=_plan, record=_record, counts_layers=False, describe=_describe)
