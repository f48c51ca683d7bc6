"""Reverting fine-tuning updates to the base (layer-swapping paper, Section 3.3).

Whole layers go back to the base, or, per tensor, the rows that changed least: those whose row MAV
against the base is below a threshold, or the given fraction of rows with the smallest row MAV.
Which rows that is depends on the data, so the plan carries the rule as numbers (``threshold``, or
``count`` rows) and the engine applies it to the row MAVs it measures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, param
from ..formats.model_card import options_list
from ..plan import MergePlan, SpecLike, Term, make_recipe
from ..plan.layers import classify
from .common import AS_ADAPTER, BASE, base_and_models, check_all, check_finite, dtypes_of, model_role
from .method import Method, Option, PlanInputs

MODEL = model_role(0)


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


def _check(config: RevertConfig, num_layers: int) -> None:
    if config.row_threshold is not None and config.row_fraction is not None:
        raise ConfigError(f"give {param('row_threshold')} or {param('row_fraction')}, not both")
    if config.row_threshold is not None:
        check_finite(config.row_threshold, "row threshold")
    if config.row_fraction is not None and not 0.0 <= check_finite(config.row_fraction, "row fraction") <= 1.0:
        raise ConfigError(f"row fraction must be between 0 and 1, got {config.row_fraction}")
    if not config.layers and config.row_threshold is None and config.row_fraction is None:
        raise ConfigError(f"nothing to revert: give {param('layers')}, {param('row_threshold')} or {param('row_fraction')}")
    for layer in config.layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise ConfigError(f"layer {layer!r} to revert is outside the model's layers 0-{num_layers - 1}")


def _row_rule(config: RevertConfig, shape: Sequence[int]) -> tuple[tuple[str, float], ...]:
    """Rows below ``threshold`` go back, or the ``count`` least changed (floor(fraction × rows))."""
    if config.row_threshold is not None:
        return (("threshold", config.row_threshold),)
    assert config.row_fraction is not None
    rows = shape[0] if len(shape) > 1 else 1
    return (("count", int(config.row_fraction * rows)),)


def build_revert_plan(base: Sequence[SpecLike], expert: Sequence[SpecLike], config: RevertConfig,
                      num_layers: int) -> MergePlan:
    """Whole layers from the base, the rest from the model, or rows of it by :func:`_row_rule`."""
    _check(config, num_layers)
    members = {BASE: base, MODEL: expert}
    check_all(members)
    dtypes = dtypes_of(members)
    reverted = set(config.layers)
    recipes = []
    for spec in expert:
        layer = classify(spec.name).layer
        if layer is not None and layer >= num_layers:
            raise ConfigError(f"tensor {spec.name!r} is in layer {layer} of a {num_layers}-layer model")
        if layer in reverted:
            recipes.append(make_recipe(spec, layer, [Term(BASE, 1.0)], spec.dtype, dtypes))
        elif config.row_threshold is None and config.row_fraction is None:
            recipes.append(make_recipe(spec, layer, [Term(MODEL, 1.0)], spec.dtype, dtypes))
        else:
            if dtypes[BASE][spec.name] != spec.dtype:
                raise ConfigError(f"tensor {spec.name!r} is {dtypes[BASE][spec.name]} in the base but "
                                  f"{spec.dtype} in the model: row reverts need one dtype")
            recipes.append(make_recipe(spec, layer, [Term(BASE, 1.0), Term(MODEL, 1.0)], spec.dtype, dtypes,
                                       op="revert_rows", params=_row_rule(config, spec.shape)))
    return MergePlan(num_layers, config, None, (), (), tuple(recipes), method="revert")


def _config(options: Mapping[str, Any], num_layers: int) -> RevertConfig:
    layers = options["layers"]
    chosen = parse_layers(layers, num_layers) if isinstance(layers, str) else tuple(layers or ())
    return RevertConfig(chosen, options["row_threshold"], options["row_fraction"])


def _plan(inputs: PlanInputs, options: Mapping[str, Any]) -> MergePlan:
    return build_revert_plan(inputs.specs[BASE], inputs.specs[MODEL], _config(options, inputs.num_layers),
                             inputs.num_layers)


def _record(options: Mapping[str, Any], plan: MergePlan) -> dict[str, Any]:
    chosen = plan.config.layers
    return {"layers": ",".join(map(str, chosen)) if chosen else None}


def _describe(plan: MergePlan, shown: Mapping[str, Any]) -> str:
    c = plan.config
    said = [f"layers {', '.join(map(str, c.layers))} are the base's"] if c.layers else []
    where = "in every other tensor" if c.layers else "in every tensor"
    if c.row_threshold is not None:
        said.append(f"{where}, the rows whose row MAV against the base is below {c.row_threshold:g} are the base's")
    if c.row_fraction is not None:
        said.append(f"{where}, the {c.row_fraction:g} fraction of rows that changed least (smallest row MAV) "
                    f"are the base's")
    return (f"Fine-tuning updates reverted to the base (Bandarkar et al., 2025, Section 3.3): "
            f"{'; '.join(said)}; everything else is the model's.\n\nOptions:\n\n{options_list(shown)}")


METHOD = Method(
    name="revert", command="revert", summary="Send fine-tuning updates back to the base (paper, Section 3.3).",
    options=(
        Option("base", "path", "The model to revert towards.", required=True),
        Option("model", "path", "The fine-tuned model.", required=True),
        Option("layers", "text", "Whole layers back to the base, e.g. 0-4,30-31."),
        Option("row_threshold", "float", "Rows whose row MAV is below this go back to the base."),
        Option("row_fraction", "float", "This fraction of each tensor's rows, the least changed, go back to the base."),
        AS_ADAPTER,
    ),
    inputs=lambda options: base_and_models({**options, "model": [options["model"]]}), plan=_plan, record=_record,
    describe=_describe)
