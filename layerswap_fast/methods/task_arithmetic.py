"""Task arithmetic (Ilharco et al., 2023): base + λ·Σ(modelᵢ − base)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..formats.model_card import options_list
from ..plan import MergePlan, SpecLike, Term, make_recipe
from ..plan.layers import classify
from .common import BASE, BASE_AND_MODELS, base_and_models, check_all, check_finite, dtypes_of, output_dtype
from .method import Method, PlanInputs


@dataclass(frozen=True)
class TaskArithmeticConfig:
    lam: float


def build_task_arithmetic_plan(base: Sequence[SpecLike], experts: Mapping[str, Sequence[SpecLike]], lam: float,
                               dtype: str | None = None) -> MergePlan:
    """base + λ·Σ(expertᵢ − base), computed as the linear blend Σ λ·expertᵢ + (1 − nλ)·base.

    The blend form rounds each product to float32 and adds in input order (experts, then base),
    like every blend; the definition's order (differences first) can differ by at most 1 ulp of
    the output dtype, where float32 rounding of the two orders lands on either side of a tie.
    """
    lam = check_finite(lam, "lambda")
    members = {BASE: base, **experts}
    first = check_all(members)
    dtypes = dtypes_of(members)
    terms = [Term(role, lam) for role in experts] + [Term(BASE, check_finite(
        1.0 - len(experts) * lam, f"the base's weight 1 - {len(experts)}·lambda"))]
    terms = [t for t in terms if t.weight != 0.0]
    recipes = tuple(make_recipe(s, classify(s.name).layer, terms, dtype or s.dtype, dtypes) for s in first)
    return MergePlan(0, TaskArithmeticConfig(lam), dtype, (), (), recipes, method="task_arithmetic")


def _plan(inputs: PlanInputs, options: Mapping[str, Any]) -> MergePlan:
    specs = dict(inputs.specs)
    return build_task_arithmetic_plan(specs.pop(BASE), specs, options["lam"], output_dtype(options))


def _describe(plan: MergePlan, shown: Mapping[str, Any]) -> str:
    return (f"Task arithmetic (Ilharco et al., 2023): every tensor is base + λ·Σ(modelᵢ − base) with "
            f"λ = {plan.config.lam:g}, computed in float32 as the blend Σ λ·modelᵢ + (1 − nλ)·base."
            f"\n\nOptions:\n\n{options_list(shown)}")


METHOD = Method(
    name="task_arithmetic", command="task-arithmetic", summary="Task arithmetic: base + λ·Σ(modelᵢ − base).",
    options=BASE_AND_MODELS, inputs=base_and_models, plan=_plan, describe=_describe)
