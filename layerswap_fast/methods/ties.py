"""TIES-merging (Yadav et al., 2023): trim each delta, elect signs, average the agreeing deltas.

Per tensor: keep each model's top ``density`` fraction of |delta| (an exact threshold; values tied
at it are all kept), elect each element's sign by the summed trimmed deltas, average the trimmed
deltas that agree with it, and add λ times that to the base.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..formats.model_card import options_list
from ..plan import MergePlan, SpecLike, Term, make_recipe
from ..plan.layers import classify
from .common import (AS_ADAPTER, BASE, BASE_AND_MODELS, base_and_models, check_all, check_finite, dtypes_of,
                     output_dtype)
from .method import Method, Option, PlanInputs


@dataclass(frozen=True)
class TiesConfig:
    density: float
    lam: float


def kept_per_model(density: float, numel: int) -> int:
    """How many of a tensor's deltas each model keeps: the top ``floor(density × numel)``."""
    return int(density * numel)


def build_ties_plan(base: Sequence[SpecLike], experts: Mapping[str, Sequence[SpecLike]], density: float,
                    lam: float, dtype: str | None = None) -> MergePlan:
    """TIES-merging of every tensor; each recipe carries ``keep`` (deltas kept per model) and ``lambda``."""
    if not 0.0 <= check_finite(density, "density") <= 1.0:
        raise ConfigError(f"density must be between 0 and 1, got {density}")
    lam = check_finite(lam, "lambda")
    members = {BASE: base, **experts}
    first = check_all(members)
    dtypes = dtypes_of(members)
    terms = [Term(BASE, 1.0)] + [Term(role, 1.0) for role in experts]
    recipes = []
    for s in first:
        params = (("keep", kept_per_model(density, math.prod(s.shape))), ("lambda", lam))
        recipes.append(make_recipe(s, classify(s.name).layer, terms, dtype or dtypes[BASE][s.name], dtypes,
                                   op="ties", params=params))
    return MergePlan(0, TiesConfig(density, lam), dtype, (), (), tuple(recipes), method="ties")


def _plan(inputs: PlanInputs, options: Mapping[str, Any]) -> MergePlan:
    specs = dict(inputs.specs)
    return build_ties_plan(specs.pop(BASE), specs, options["density"], options["lam"], output_dtype(options))


def _describe(plan: MergePlan, shown: Mapping[str, Any]) -> str:
    c = plan.config
    return (f"TIES-merging (Yadav et al., 2023), per tensor: each model's delta against the base keeps its "
            f"top {c.density:g} fraction by magnitude (density; values tied at the threshold are all kept), "
            f"each element's sign is elected by the summed trimmed deltas, the deltas that agree with it are "
            f"averaged, and λ = {c.lam:g} times that average is added to the base."
            f"\n\nOptions:\n\n{options_list(shown)}")


METHOD = Method(
    name="ties", command="ties",
    summary="TIES-merging: trim each delta, elect signs, average the agreeing deltas, add to the base.",
    options=(*BASE_AND_MODELS[:3],
             Option("density", "float", "Fraction of each delta kept, by magnitude (values tied at the threshold "
                    "are all kept).", default=0.2),
             BASE_AND_MODELS[3], AS_ADAPTER),
    inputs=base_and_models, plan=_plan, describe=_describe)
