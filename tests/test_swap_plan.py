"""The planner, on specs alone: zones, weights, ops, and the errors of impossible plans."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from layerswap_fast import ConfigError, MismatchError, SwapConfig, UnsupportedDtypeError
from layerswap_fast.methods.swap import build_swap_plan, layer_map, render_plan


@dataclass(frozen=True)
class Spec:
    name: str
    dtype: str
    shape: tuple[int, ...]


def llama_specs(num_layers: int, dtype: str = "BF16", tie: bool = False) -> list[Spec]:
    specs = [Spec("model.embed_tokens.weight", dtype, (10, 4))]
    for i in range(num_layers):
        for p in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj", "input_layernorm"):
            specs.append(Spec(f"model.layers.{i}.{p}.weight", dtype, (4,) if "norm" in p else (4, 4)))
    specs.append(Spec("model.norm.weight", dtype, (4,)))
    if not tie:
        specs.append(Spec("lm_head.weight", dtype, (10, 4)))
    return specs


def sources(row) -> dict[str, float]:
    return {t.role: t.weight for t in row.terms}


def test_default_plan_for_32_layers_follows_the_paper() -> None:
    rows = layer_map(32, SwapConfig())
    zones = [r.zone for r in rows]
    assert zones[:5] == ["language"] * 5
    assert zones[5] == "lower transition"
    assert zones[6:29] == ["task"] * 23
    assert zones[29] == "upper transition"
    assert zones[30:] == ["language"] * 2
    assert sources(rows[0]) == {"language": 1.0}
    assert sources(rows[5]) == {"task": 0.5, "language": 0.5}
    assert sources(rows[17]) == {"task": 1.0}
    assert sources(rows[29]) == {"task": 0.5, "language": 0.5}


def test_ramp_weights_move_from_language_side_to_task_side() -> None:
    cfg = SwapConfig(bottom=2, top=1, lower_transition=3, upper_transition=2, transition_weights="ramp")
    rows = layer_map(16, cfg)
    # lower zone: layers 2, 3, 4; j = 1, 2, 3 counted from the bottom (language) block
    # (the formula: language weight 1 - j/(n+1), task weight j/(n+1))
    assert [sources(rows[i]) for i in (2, 3, 4)] == [
        {"task": j / 4, "language": 1 - j / 4} for j in (1, 2, 3)]
    # upper zone: layers 13, 14 below the top block at 15; j = 1 is layer 14
    assert sources(rows[14]) == {"task": 1 / 3, "language": 1 - 1 / 3}
    assert sources(rows[13]) == {"task": 2 / 3, "language": 1 - 2 / 3}
    assert [r.zone for r in rows[5:13]] == ["task"] * 8


@pytest.mark.parametrize("cfg, zones", [
    (SwapConfig(bottom=0, top=0, lower_transition=0, upper_transition=0), ["task"] * 6),
    (SwapConfig(bottom=6, top=0, lower_transition=0, upper_transition=0), ["language"] * 6),
    (SwapConfig(bottom=2, top=2, lower_transition=1, upper_transition=1),
     ["language", "language", "lower transition", "upper transition", "language", "language"]),
    (SwapConfig(bottom=0, top=1, lower_transition=1, upper_transition=0),
     ["lower transition", "task", "task", "task", "task", "language"]),
])
def test_edge_plans(cfg: SwapConfig, zones: list[str]) -> None:
    assert [r.zone for r in layer_map(6, cfg)] == zones


@pytest.mark.parametrize("cfg, message", [
    (SwapConfig(), "the swap needs 9 layers (bottom 5 + lower transition 1 + upper transition 1 + top 2) but the model has 6"),
    (SwapConfig(bottom=7, top=0, lower_transition=0, upper_transition=0), "needs 7 layers"),
    (SwapConfig(bottom=-1), "bottom must be a non-negative whole number"),
    (SwapConfig(top=1.5), "top must be a non-negative whole number"),  # type: ignore[arg-type]
    (SwapConfig(transition_weights="magnitude"), "magnitude weights need the experts' average MAVs"),
    (SwapConfig(non_layer="magnitude"), "magnitude weights need the experts' average MAVs"),
    (SwapConfig(non_layer="mean"), "non-layer must be one of"),  # type: ignore[arg-type]
])
def test_impossible_plans_are_errors(cfg: SwapConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        layer_map(6, cfg)


def test_tensor_recipes_follow_the_layer_map() -> None:
    specs = llama_specs(12)
    plan = build_swap_plan(specs, specs, 12, SwapConfig())
    by_name = {t.name: t for t in plan.tensors}
    assert [t.name for t in plan.tensors] == [s.name for s in specs]  # task expert's order
    q0 = by_name["model.layers.0.self_attn.q_proj.weight"]
    assert (q0.op, q0.layer, [(t.role, t.weight) for t in q0.terms]) == ("copy", 0, [("language", 1.0)])
    assert by_name["model.layers.5.mlp.down_proj.weight"].op == "blend"
    assert by_name["model.layers.7.mlp.down_proj.weight"].terms[0].role == "task"
    assert by_name["model.layers.9.input_layernorm.weight"].op == "blend"  # upper transition
    assert by_name["model.layers.10.input_layernorm.weight"].terms[0].role == "language"
    assert by_name["model.layers.11.input_layernorm.weight"].terms[0].role == "language"
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        t = by_name[name]
        assert t.layer is None and t.op == "blend"
        assert {x.role: x.weight for x in t.terms} == {"task": 0.5, "language": 0.5}
    assert plan.counts() == {"tensors": 51, "copy": 40, "blend": 11}


@pytest.mark.parametrize("non_layer, expert", [("task", "task"), ("language", "language")])
def test_non_layer_can_come_from_one_expert(non_layer: str, expert: str) -> None:
    specs = llama_specs(12)
    plan = build_swap_plan(specs, specs, 12, SwapConfig(non_layer=non_layer))  # type: ignore[arg-type]
    head = next(t for t in plan.tensors if t.name == "lm_head.weight")
    assert head.op == "copy" and head.terms[0].role == expert


def test_dtype_override_turns_copies_into_conversions() -> None:
    specs = llama_specs(12)
    plan = build_swap_plan(specs, specs, 12, SwapConfig(), dtype="F32")
    assert all(t.op == "blend" and t.dtype == "F32" for t in plan.tensors)


def test_mixed_dtypes_output_the_task_experts_dtype() -> None:
    task, lang = llama_specs(12, "BF16"), llama_specs(12, "F32")
    plan = build_swap_plan(task, lang, 12, SwapConfig())
    q0 = next(t for t in plan.tensors if t.name == "model.layers.0.self_attn.q_proj.weight")
    q8 = next(t for t in plan.tensors if t.name == "model.layers.8.self_attn.q_proj.weight")
    assert (q0.op, q0.dtype) == ("blend", "BF16")  # language's F32 converted
    assert (q8.op, q8.dtype) == ("copy", "BF16")


def test_tied_embeddings_plan() -> None:
    specs = llama_specs(12, tie=True)
    plan = build_swap_plan(specs, specs, 12, SwapConfig())
    assert "lm_head.weight" not in {t.name for t in plan.tensors}


def test_pair_mismatches_name_the_first_offending_tensor() -> None:
    task = llama_specs(12)
    lang = [Spec(s.name, s.dtype, (4, 5)) if s.name == "model.layers.3.mlp.down_proj.weight" else s for s in task]
    with pytest.raises(MismatchError, match=r"'model.layers.3.mlp.down_proj.weight' has shape \[4, 4\] in the task "
                                            r"expert but \[4, 5\] in the language expert"):
        build_swap_plan(task, lang, 12, SwapConfig())
    with pytest.raises(MismatchError, match="'lm_head.weight' is in the task expert but not in the language"):
        build_swap_plan(task, llama_specs(12, tie=True), 12, SwapConfig())
    with pytest.raises(MismatchError, match="'lm_head.weight' is in the language expert but not in the task"):
        build_swap_plan(llama_specs(12, tie=True), task, 12, SwapConfig())


def test_integer_tensors_cannot_be_averaged() -> None:
    specs = llama_specs(12) + [Spec("model.position_ids", "I64", (1, 8))]
    with pytest.raises(UnsupportedDtypeError, match="'model.position_ids' has dtype I64"):
        build_swap_plan(specs, specs, 12, SwapConfig())
    plan = build_swap_plan(specs, specs, 12, SwapConfig(non_layer="task"))
    assert plan.tensors[-1].op == "copy"


def test_render_and_json_describe_the_same_plan() -> None:
    specs = llama_specs(12)
    plan = build_swap_plan(specs, specs, 12, SwapConfig(transition_weights="ramp"))
    text = render_plan(plan)
    assert "    5  lower transition  0.5×task + 0.5×language" in text
    assert "    0  language          language expert" in text
    assert "51 tensors: 40 copied byte for byte, 11 blended" in text
    data = plan.to_json()
    assert data["layers"][5] == {"layer": 5, "zone": "lower transition",
                                 "sources": [{"expert": "task", "weight": 0.5}, {"expert": "language", "weight": 0.5}]}
    assert data["non_layer"]["tensors"] == ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]


def test_a_terms_role_is_still_readable_as_expert() -> None:
    """Scripts written when every role was called an expert keep working."""
    from layerswap_fast import Term
    assert Term("base", 1.0).expert == Term("base", 1.0).role == "base"
