"""The paper's baselines and multi-expert merges, each against plain torch from the definitions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import layerswap_fast as ls
import layerswap_fast._core
from layerswap_fast.cli import main
from support import (assert_same_shards, average_mav, blend_ref, expected_weights, layer_of, load_tensors, make_llama_trio,
                     raw_bytes, row_mav_ref, snapshot, ties_reference)

L = 12
ROLES = ("base", "task", "language", "task2", "language2")


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base and four experts fine-tuned from it."""
    return make_llama_trio(tmp_path_factory.mktemp("family"), num_layers=L, roles=ROLES)


@pytest.fixture(scope="module")
def tensors(family: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    return {role: load_tensors(path) for role, path in family.items()}


def assert_all(out: Path, expected: dict[str, torch.Tensor]) -> None:
    merged = load_tensors(out)
    assert set(merged) == set(expected)
    for name, want in expected.items():
        assert merged[name].dtype == want.dtype and raw_bytes(merged[name]) == raw_bytes(want), name


@pytest.mark.parametrize("weights, expect", [("uniform", [1 / 3] * 3), ([1.0, 2.0, 1.0], [0.25, 0.5, 0.25])])
def test_soup(family, tensors, tmp_path: Path, weights, expect) -> None:
    models = ["task", "language", "task2"]
    ls.soup([family[m] for m in models], tmp_path / "out", weights=weights)
    assert_all(tmp_path / "out", {n: blend_ref([tensors[m][n] for m in models], expect, t.dtype)
                                  for n, t in tensors["task"].items()})


def test_magnitude_soup(family, tensors, tmp_path: Path) -> None:
    models = ["task", "language"]
    inv = [1 / average_mav(tensors[m], tensors["base"]) for m in models]
    result = ls.soup([family[m] for m in models], tmp_path / "out", weights="magnitude", base=family["base"])
    expect = [w / sum(inv) for w in inv]
    assert result.plan.config.weights == pytest.approx(expect, rel=1e-5)
    used = list(result.plan.config.weights)
    assert_all(tmp_path / "out", {n: blend_ref([tensors[m][n] for m in models], used, t.dtype)
                                  for n, t in tensors["task"].items()})


def test_magnitude_needs_a_base(family, tmp_path: Path) -> None:
    # the API names its parameters; the CLI (below) renders the same message with flags
    with pytest.raises(ls.ConfigError, match=r"magnitude weights need the base model: pass base \(and optionally stats DIR\)"):
        ls.soup([family["task"], family["language"]], tmp_path / "out", weights="magnitude")
    r = CliRunner().invoke(main, ["merge", "--task-expert", str(family["task"]), "--language-expert",
                                  str(family["language"]), "-o", str(tmp_path / "o"), "--transition-weights", "magnitude"])
    assert r.exit_code == 2 and r.output.startswith(
        "error: magnitude weights need the base model: pass --base (and optionally --stats DIR)")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("merge_kind", ["soup", "swap"])
def test_magnitude_analysis_runs_on_the_merges_device_and_threads(family, tmp_path: Path, monkeypatch,
                                                                  merge_kind: str) -> None:
    """``--device cpu`` (or a thread count) given to a merge also holds for the row-MAV analysis
    its magnitude weights need: a GPU must not be picked for it behind the user's back."""
    import layerswap_fast.analysis.weights as analysis  # where magnitude weights run their analysis
    seen = []
    real_analyze = analysis.analyze

    def spy(*args, **kwargs):
        seen.append((kwargs.get("device"), kwargs.get("threads")))
        return real_analyze(*args, **kwargs)

    monkeypatch.setattr(analysis, "analyze", spy)
    if merge_kind == "soup":
        ls.soup([family["task"], family["language"]], tmp_path / "out", weights="magnitude", base=family["base"],
                device="cpu", threads=1)
    else:
        ls.merge(family["task"], family["language"], tmp_path / "out", ls.SwapConfig(transition_weights="magnitude"),
                 base=family["base"], device="cpu", threads=1)
    assert seen == [("cpu", 1)]


def test_soup_then_swap_in_one_pass(family, tensors, tmp_path: Path) -> None:
    """Two task and two language experts: each group souped 0.5/0.5, then swapped (Table 6)."""
    ls.merge([family["task"], family["task2"]], [family["language"], family["language2"]], tmp_path / "out")
    expected = {}
    for name, t in tensors["task"].items():
        w_t, w_l = expected_weights(layer_of(name), L)  # each group's soup weighs 0.5 per member
        terms = [(tensors[r][name], w_t / 2) for r in ("task", "task2")] + [
            (tensors[r][name], w_l / 2) for r in ("language", "language2")]
        kept = [(x, w) for x, w in terms if w]
        expected[name] = blend_ref([x for x, _ in kept], [w for _, w in kept], t.dtype)
    assert_all(tmp_path / "out", expected)
    recipe = json.loads((tmp_path / "out" / "layerswap_recipe.json").read_text())
    assert set(recipe["inputs"]) == {"task.0", "task.1", "language.0", "language.1"}


def test_magnitude_transitions_use_the_experts_average_mavs(family, tensors, tmp_path: Path) -> None:
    inv = [1 / average_mav(tensors[m], tensors["base"]) for m in ("task", "language")]
    w_t, w_l = inv[0] / sum(inv), inv[1] / sum(inv)
    result = ls.merge(family["task"], family["language"], tmp_path / "out",
                      ls.SwapConfig(transition_weights="magnitude", non_layer="magnitude"), base=family["base"])
    got = result.plan.config.magnitude_weights
    assert got == pytest.approx((w_t, w_l), rel=1e-5)
    merged = load_tensors(tmp_path / "out")
    for name, t in tensors["task"].items():
        rule = expected_weights(layer_of(name), L)
        if rule == (0.5, 0.5):  # transition layers and non-layer tensors take the magnitude weights
            want = blend_ref([t, tensors["language"][name]], list(got), t.dtype)
        else:
            want = t if rule == (1.0, 0.0) else tensors["language"][name]
        assert raw_bytes(merged[name]) == raw_bytes(want), name


def test_task_arithmetic(family, tensors, tmp_path: Path) -> None:
    models, lam = ["task", "language", "task2"], 0.7
    ls.task_arithmetic(family["base"], [family[m] for m in models], tmp_path / "out", lam=lam)
    merged = load_tensors(tmp_path / "out")
    for name, b in tensors["base"].items():
        xs = [tensors[m][name] for m in models]
        # exactly the blend form, in its order (experts, then base) ...
        linear = blend_ref(xs + [b], [lam] * 3 + [1 - 3 * lam], b.dtype)
        assert raw_bytes(merged[name]) == raw_bytes(linear), name
        # ... and within 1 ulp of the definition's order: base + λ·Σ(expertᵢ − base)
        definition = (b.float() + lam * sum((x.float() - b.float() for x in xs), torch.zeros_like(b.float()))).to(b.dtype)
        ulp = (merged[name].view(torch.int16).int() - definition.view(torch.int16).int()).abs()
        assert ulp.max().item() <= 1, name


def test_ties(family, tensors, tmp_path: Path) -> None:
    models = ["task", "language", "task2"]
    ls.ties(family["base"], [family[m] for m in models], tmp_path / "out", density=0.2, lam=1.0)
    assert_all(tmp_path / "out", {n: ties_reference(b, [tensors[m][n] for m in models], 0.2, 1.0)
                                  for n, b in tensors["base"].items()})


@pytest.mark.parametrize("density", [0.25, 0.5, 0.975])
def test_ties_keeps_exactly_k_of_distinct_deltas(tmp_path: Path, density: float) -> None:
    """Every |delta| distinct (multiples of 1/16, exact in bf16), so k = floor(density × numel) of
    them are kept, no more and no fewer: a threshold one place off changes the output."""
    gen = torch.Generator().manual_seed(9)
    base = torch.zeros(4, 10, dtype=torch.bfloat16)
    experts = []
    for _ in range(2):
        magnitudes = (torch.randperm(40, generator=gen) + 1).float() / 16
        signs = torch.where(torch.rand(40, generator=gen) < 0.5, -1.0, 1.0)
        experts.append((magnitudes * signs).reshape(4, 10).to(torch.bfloat16))
    name = "model.layers.0.mlp.up_proj.weight"
    paths = [write_model(tmp_path / k, {name: t}, 1) for k, t in zip(("base", "a", "b"), [base, *experts])]
    ls.ties(paths[0], paths[1:], tmp_path / "out", density=density, lam=1.0)
    want = ties_reference(base, experts, density, 1.0)
    got = load_tensors(tmp_path / "out")[name]
    assert raw_bytes(got) == raw_bytes(want)
    kept = [(ties_reference(base, [e], density, 1.0) != 0).sum().item() for e in experts]
    assert kept == [int(density * 40)] * 2


def write_model(path: Path, tensors: dict[str, torch.Tensor], layers: int) -> Path:
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))
    return path


@pytest.fixture
def ties_at_threshold(tmp_path: Path) -> dict[str, Path]:
    """Deltas whose magnitudes tie at the trim threshold, and an expert equal to the base."""
    base = torch.zeros(4, 10, dtype=torch.bfloat16)
    tied = torch.tensor([0.5] * 20 + [0.25] * 20, dtype=torch.bfloat16).reshape(4, 10)
    signs = torch.where(torch.arange(40) % 3 == 0, -1.0, 1.0).reshape(4, 10).to(torch.bfloat16)
    models = {"base": base, "a": tied * signs, "b": -tied, "zero": base.clone()}
    return {k: write_model(tmp_path / k, {"model.layers.0.mlp.up_proj.weight": v}, 1) for k, v in models.items()}


@pytest.mark.parametrize("density", [0.0, 0.3, 0.5, 1.0])
def test_ties_tie_rule_and_all_zero_deltas(ties_at_threshold, tmp_path: Path, density: float) -> None:
    p = ties_at_threshold
    ls.ties(p["base"], [p["a"], p["b"], p["zero"]], tmp_path / "out", density=density, lam=1.0)
    t = {k: load_tensors(v)["model.layers.0.mlp.up_proj.weight"] for k, v in p.items()}
    want = ties_reference(t["base"], [t["a"], t["b"], t["zero"]], density, 1.0)
    got = load_tensors(tmp_path / "out")["model.layers.0.mlp.up_proj.weight"]
    assert raw_bytes(got) == raw_bytes(want)
    if density == 0.3:  # k = floor(0.3 × 40) = 12, but all 20 deltas tied at 0.5 are kept
        ls.ties(p["base"], [p["a"]], tmp_path / "one", density=density, lam=1.0)
        one = load_tensors(tmp_path / "one")["model.layers.0.mlp.up_proj.weight"]
        assert (one != 0).sum().item() == 20 and raw_bytes(one) == raw_bytes(ties_reference(t["base"], [t["a"]], 0.3, 1.0))


def test_revert_layers(family, tensors, tmp_path: Path) -> None:
    ls.revert(family["base"], family["task"], tmp_path / "out", layers="0-2,10-11")
    expected = {n: (tensors["base"][n] if layer_of(n) in {0, 1, 2, 10, 11} else t) for n, t in tensors["task"].items()}
    assert_all(tmp_path / "out", expected)


@pytest.fixture
def graded(tmp_path: Path) -> dict[str, Path]:
    """A model whose row i moved by about (i+1)·0.01 from the base, rows 3 and 5 not at all."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(8, 16, generator=gen).to(torch.bfloat16)
    scale = torch.arange(1, 9, dtype=torch.float32).unsqueeze(1) * 0.01
    scale[3] = scale[5] = 0.0
    model = (base.float() + scale * torch.randn(8, 16, generator=gen).sign()).to(torch.bfloat16)
    norm_b, norm_m = torch.ones(16, dtype=torch.bfloat16), torch.full((16,), 1.5, dtype=torch.bfloat16)
    return {"base": write_model(tmp_path / "b", {"model.layers.0.w.weight": base, "model.layers.0.norm.weight": norm_b}, 1),
            "model": write_model(tmp_path / "m", {"model.layers.0.w.weight": model, "model.layers.0.norm.weight": norm_m}, 1)}


@pytest.mark.parametrize("kw, reverted_rows", [
    ({"row_threshold": 0.035}, {0, 1, 2, 3, 5}),      # MAVs ~ .01,.02,.03,0,.05,0,.07,.08
    ({"row_fraction": 0.25}, {3, 5}),                 # floor(0.25 × 8) = 2 least changed
    ({"row_fraction": 0.125}, {3}),                   # tied at 0: the lower row index first
])
def test_revert_rows(graded, tmp_path: Path, kw: dict, reverted_rows: set[int]) -> None:
    ls.revert(graded["base"], graded["model"], tmp_path / "out", **kw)
    b, m = load_tensors(graded["base"]), load_tensors(graded["model"])
    want = m["model.layers.0.w.weight"].clone()
    for i in reverted_rows:
        want[i] = b["model.layers.0.w.weight"][i]
    out = load_tensors(tmp_path / "out")
    assert raw_bytes(out["model.layers.0.w.weight"]) == raw_bytes(want)
    norm_reverted = ("row_threshold" in kw and
                     row_mav_ref(m["model.layers.0.norm.weight"], b["model.layers.0.norm.weight"])[0] < kw["row_threshold"])
    assert raw_bytes(out["model.layers.0.norm.weight"]) == raw_bytes(
        b["model.layers.0.norm.weight"] if norm_reverted else m["model.layers.0.norm.weight"])


def test_a_row_exactly_at_the_threshold_is_kept(tmp_path: Path) -> None:
    """Rows below the threshold go back to the base, a row whose MAV equals it does not: each row
    moves by exactly one step per element (exact in bf16 and in any sum), so its MAV is the step."""
    gen = torch.Generator().manual_seed(5)
    base = (1 + torch.randint(0, 64, (6, 16), generator=gen) / 128).to(torch.bfloat16)
    steps = torch.tensor([0.0, 0.03125, 0.0625, 0.125, 0.0625, 0.25]).unsqueeze(1)
    signs = torch.where(torch.rand(6, 16, generator=gen) < 0.5, -1.0, 1.0)
    model = (base.float() + steps * signs).to(torch.bfloat16)
    assert torch.equal((model.float() - base.float()).abs(), (steps * signs).abs().expand(6, 16))
    name = "model.layers.0.w.weight"
    b, m = write_model(tmp_path / "b", {name: base}, 1), write_model(tmp_path / "m", {name: model}, 1)
    ls.revert(b, m, tmp_path / "out", row_threshold=0.0625)
    want = torch.where(torch.tensor([True, True, False, False, False, False]).unsqueeze(1), base, model)
    assert raw_bytes(load_tensors(tmp_path / "out")[name]) == raw_bytes(want)


@pytest.mark.parametrize("kw, message", [
    ({}, "nothing to revert"),
    ({"layers": "3-9"}, "outside the model's layers 0-0"),
    ({"row_threshold": 0.1, "row_fraction": 0.5}, "not both"),
    ({"row_fraction": 1.5}, "between 0 and 1"),
    ({"layers": "0-1"}, "layer range '0-1' is outside the model's layers 0-0"),
    ({"layers": [1]}, "layer 1 to revert is outside the model's layers 0-0"),
    ({"layers": [-1]}, "layer -1 to revert is outside"),
    ({"layers": [True]}, "layer True to revert is outside"),
])
def test_revert_errors(graded, tmp_path: Path, kw: dict, message: str) -> None:
    before = snapshot(tmp_path)
    with pytest.raises(ls.ConfigError, match=message):
        ls.revert(graded["base"], graded["model"], tmp_path / "out", **kw)
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------- recipes

def invoke(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def test_dump_config_then_config_rebuilds_the_same_bytes(family, tmp_path: Path) -> None:
    flags = ["--task-expert", family["task"], "--language-expert", family["language"], "--bottom", "3",
             "--transition-weights", "ramp", "--lower-transition", "2", "--shard-size", "60KB"]
    r = invoke("merge", *flags, "-o", tmp_path / "direct")
    assert r.exit_code == 0, r.output
    r = invoke("merge", *flags, "-o", tmp_path / "unused", "--dump-config")
    assert r.exit_code == 0 and not (tmp_path / "unused").exists()
    (tmp_path / "recipe.yaml").write_text(r.output)
    assert "bottom: 3" in r.output and "transition_weights: ramp" in r.output
    r = invoke("merge", "--config", tmp_path / "recipe.yaml", "-o", tmp_path / "from-yaml")
    assert r.exit_code == 0, r.output
    r = invoke("merge", "--config", tmp_path / "direct" / "layerswap_recipe.json", "-o", tmp_path / "from-recipe")
    assert r.exit_code == 0, r.output
    assert_same_shards(tmp_path / "direct", tmp_path / "from-yaml", tmp_path / "from-recipe")


def test_flags_override_the_config(family, tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(f"task-expert: [{family['task']}]\nlanguage-expert: [{family['language']}]\n"
                                     "bottom: 3\ntop: 1\n")
    r = invoke("plan", "--config", tmp_path / "c.yaml", "--top", "2", "--json")
    assert r.exit_code == 0, r.output
    zones = [row["zone"] for row in json.loads(r.output)["layers"]]
    assert zones[:3] == ["language"] * 3 and zones[3] == "lower transition" and zones[-2:] == ["language"] * 2


@pytest.mark.parametrize("text, message", [
    ("bottom: 3\nwhatever: 1\n", "unknown option 'whatever' for 'merge'"),
    ("command: soup\noptions: {weights: uniform}\n", "is a recipe for 'soup', not 'merge'"),
    ("- just\n- a list\n", "must be a mapping"),
])
def test_bad_configs(family, tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "c.yaml").write_text(text)
    r = invoke("merge", "--config", tmp_path / "c.yaml", "--task-expert", family["task"], "--language-expert",
               family["language"], "-o", tmp_path / "o")
    assert r.exit_code == 2 and message in r.output and not (tmp_path / "o").exists()


@pytest.mark.parametrize("command, args", [
    ("soup", ["--model", "task", "--model", "language", "--weights", "1,3"]),
    ("task-arithmetic", ["--base", "base", "--model", "task", "--model", "language", "--lambda", "0.5"]),
    ("revert", ["--base", "base", "--model", "task", "--layers", "0-1"]),
])
def test_every_command_records_a_rebuildable_recipe(family, tmp_path: Path, command: str, args: list[str]) -> None:
    argv = [family[a] if a in family else a for a in args]
    r = invoke(command, *argv, "-o", tmp_path / "a")
    assert r.exit_code == 0, r.output
    r = invoke(command, "--config", tmp_path / "a" / "layerswap_recipe.json", "-o", tmp_path / "b")
    assert r.exit_code == 0, r.output
    assert_same_shards(tmp_path / "a", tmp_path / "b")
    ls.verify(tmp_path / "b")
