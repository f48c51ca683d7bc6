"""Plans for the merges layer swapping is compared with (paper, Section 5; follow-up 2505.18356).

Pure functions of tensor specs, like the swap planner: model soups (uniform, magnitude-adjusted
or given weights), task arithmetic, TIES-merging, and reverting fine-tuning updates to the base.
Roles name the inputs: ``model.0``, ``model.1`` ... and ``base``.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import ConfigError
from ..plan.layers import classify
from ..plan import MergePlan, SpecLike, Term, check_same_tensors, describe_role, make_recipe

BASE = "base"


def model_role(i: int) -> str:
    return f"model.{i}"


def _check_all(members: Mapping[str, Sequence[SpecLike]]) -> tuple[str, Sequence[SpecLike]]:
    first = next(iter(members))
    for role, specs in members.items():
        if role != first:
            check_same_tensors((describe_role(first), members[first]), (describe_role(role), specs))
    return first, members[first]


def _dtypes(members: Mapping[str, Sequence[SpecLike]]) -> dict[str, dict[str, str]]:
    return {role: {s.name: s.dtype for s in specs} for role, specs in members.items()}


#: the largest float32: every kernel multiplies in float32, so a weight beyond it is infinite there
FLOAT32_MAX = 3.4028234663852886e38


def check_finite(value: object, what: str, limit: float = FLOAT32_MAX) -> float:
    """``value`` as a float; ConfigError unless it is a real number of magnitude at most
    ``limit`` (by default the float32 range, which every kernel computes in)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{what} must be numbers, got {value!r}")
    x = float(value)
    if not (math.isfinite(x) and abs(x) <= limit):
        range_ = "" if limit == sys.float_info.max else f" (at most {limit:.4g} in magnitude, float32)"
        raise ConfigError(f"{what} must be finite{range_}, got {value!r}")
    return x


def normalize_weights(weights: Sequence[float]) -> tuple[float, ...]:
    """A weighted average: weights scaled to sum to 1 (they must be finite, >= 0, not all 0, and
    sum to a finite number: 1e308 + 1e308 overflows, and every weight would become 0)."""
    ws = [check_finite(w, "soup weights", sys.float_info.max) for w in weights]
    if any(w < 0.0 for w in ws):
        raise ConfigError(f"soup weights must be non-negative, got {list(weights)}")
    total = sum(ws)
    if total <= 0.0:
        raise ConfigError("soup weights must not all be zero")
    if not math.isfinite(total):
        raise ConfigError(f"soup weights must have a finite sum, got {list(weights)}")
    return tuple(w / total for w in ws)


@dataclass(frozen=True)
class SoupConfig:
    weights: tuple[float, ...]


def build_soup_plan(members: Mapping[str, Sequence[SpecLike]], weights: Sequence[float],
                    dtype: str | None = None) -> MergePlan:
    """Σ wᵢ·modelᵢ for every tensor, weights normalised to sum 1; in the first model's order."""
    if len(weights) != len(members):
        raise ConfigError(f"{len(weights)} soup weights for {len(members)} models")
    norm = normalize_weights(weights)
    _, first = _check_all(members)
    dtypes = _dtypes(members)
    terms = [Term(role, w) for role, w in zip(members, norm) if w != 0.0]
    recipes = tuple(make_recipe(s, classify(s.name).layer, terms, dtype or s.dtype, dtypes) for s in first)
    return MergePlan(0, SoupConfig(norm), dtype, (), tuple(terms), recipes, method="soup")


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
    _, first = _check_all(members)
    dtypes = _dtypes(members)
    terms = [Term(role, lam) for role in experts] + [Term(BASE, check_finite(
        1.0 - len(experts) * lam, f"the base's weight 1 - {len(experts)}·lambda"))]
    terms = [t for t in terms if t.weight != 0.0]
    recipes = tuple(make_recipe(s, classify(s.name).layer, terms, dtype or s.dtype, dtypes) for s in first)
    return MergePlan(0, TaskArithmeticConfig(lam), dtype, (), tuple(terms), recipes, method="task_arithmetic")


@dataclass(frozen=True)
class TiesConfig:
    density: float
    lam: float


def build_ties_plan(base: Sequence[SpecLike], experts: Mapping[str, Sequence[SpecLike]], density: float,
                    lam: float, dtype: str | None = None) -> MergePlan:
    """TIES-merging (Yadav et al., 2023) of every tensor: trim, elect sign, disjoint mean, scale."""
    if not 0.0 <= check_finite(density, "density") <= 1.0:
        raise ConfigError(f"density must be between 0 and 1, got {density}")
    lam = check_finite(lam, "lambda")
    members = {BASE: base, **experts}
    _, first = _check_all(members)
    dtypes = _dtypes(members)
    terms = [Term(BASE, 1.0)] + [Term(role, 1.0) for role in experts]
    params = (("density", density), ("lambda", lam))
    recipes = tuple(make_recipe(s, classify(s.name).layer, terms, dtype or dtypes[BASE][s.name], dtypes,
                                op="ties", params=params) for s in first)
    return MergePlan(0, TiesConfig(density, lam), dtype, (), tuple(terms), recipes, method="ties")


@dataclass(frozen=True)
class RevertConfig:
    layers: tuple[int, ...] = ()
    row_threshold: float | None = None
    row_fraction: float | None = None


def parse_layers(text: str, num_layers: int) -> tuple[int, ...]:
    """``0-4,30-31`` → (0, 1, 2, 3, 4, 30, 31); every index must exist in the model."""
    layers: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise ConfigError(f"cannot read layer range {part!r}: use forms like 0-4,30-31") from None
        if not 0 <= a <= b < num_layers:
            raise ConfigError(f"layer range {part!r} is outside the model's layers 0-{num_layers - 1}")
        layers.update(range(a, b + 1))
    return tuple(sorted(layers))


def build_revert_plan(base: Sequence[SpecLike], expert: Sequence[SpecLike], config: RevertConfig,
                      num_layers: int) -> MergePlan:
    """Send fine-tuning updates back to the base (paper, Section 3.3): whole layers, or the rows of
    each tensor that changed least (row MAV below a threshold, or the least-changed fraction)."""
    if config.row_threshold is not None and config.row_fraction is not None:
        raise ConfigError("give --row-threshold or --row-fraction, not both")
    if config.row_threshold is not None:
        check_finite(config.row_threshold, "row threshold")
    if config.row_fraction is not None and not 0.0 <= check_finite(config.row_fraction, "row fraction") <= 1.0:
        raise ConfigError(f"row fraction must be between 0 and 1, got {config.row_fraction}")
    if not config.layers and config.row_threshold is None and config.row_fraction is None:
        raise ConfigError("nothing to revert: give --layers, --row-threshold or --row-fraction")
    for layer in config.layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise ConfigError(f"layer {layer!r} to revert is outside the model's layers 0-{num_layers - 1}")
    members = {BASE: base, "model.0": expert}
    _check_all(members)
    dtypes = _dtypes(members)
    reverted = set(config.layers)
    recipes = []
    for spec in expert:
        layer = classify(spec.name).layer
        if layer is not None and layer >= num_layers:
            raise ConfigError(f"tensor {spec.name!r} is in layer {layer} of a {num_layers}-layer model")
        if layer in reverted:
            recipes.append(make_recipe(spec, layer, [Term(BASE, 1.0)], spec.dtype, dtypes))
        elif config.row_threshold is None and config.row_fraction is None:
            recipes.append(make_recipe(spec, layer, [Term("model.0", 1.0)], spec.dtype, dtypes))
        else:
            if dtypes[BASE][spec.name] != spec.dtype:
                raise ConfigError(f"tensor {spec.name!r} is {dtypes[BASE][spec.name]} in the base but "
                                  f"{spec.dtype} in the model: row reverts need one dtype")
            params = (("threshold", config.row_threshold),) if config.row_threshold is not None else (
                ("fraction", config.row_fraction),)
            recipes.append(make_recipe(spec, layer, [Term(BASE, 1.0), Term("model.0", 1.0)], spec.dtype, dtypes,
                                       op="revert_rows", params=params))  # type: ignore[arg-type]
    return MergePlan(num_layers, config, None, (), (), tuple(recipes), method="revert")
