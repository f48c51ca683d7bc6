"""mergekit YAML configs run through mergekit 0.1.5 itself and through us: every tensor compared.

Deterministic methods must give the same bytes; where mergekit's order is undefined (``argsort``
among equal magnitudes), the differences must lie only at elements whose |delta| equals a
selection threshold that more elements share than the selection keeps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner

import layerswap_fast as ls
from layerswap_fast.cli import main
from support import load_tensors, make_llama_trio, raw_bytes, snapshot

pytest.importorskip("mergekit")


@pytest.fixture(scope="module")
def trios(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("mergekit_inputs")
    return {"bf16": make_llama_trio(root / "bf16", num_layers=3, roles=("base", "a", "b", "c"), shard="40KB"),
            "f32": make_llama_trio(root / "f32", num_layers=3, roles=("base", "a", "b", "c"), dtype=torch.float32,
                                   shard="1GB", seed=1)}


def run_mergekit(config: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(config), str(out),
              options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False, random_seed=0))
    return load_tensors(out)


def run_ours(config: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    ls.api.run_mergekit_config(config, out, copy_tokenizer=False)
    return load_tensors(out)


def different(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors whose bytes differ, as a mask of the differing elements."""
    assert set(ours) == set(ref)
    for name, t in ref.items():
        assert ours[name].dtype == t.dtype and ours[name].shape == t.shape, name
    return {n: ours[n] != t for n, t in ref.items() if raw_bytes(ours[n]) != raw_bytes(t)}


def configs(trio: dict[str, Path], dtype: str) -> dict[str, dict[str, Any]]:
    a, b, c, base = (str(trio[r]) for r in ("a", "b", "c", "base"))
    return {
        "linear": {"models": [{"model": a, "parameters": {"weight": 0.3}},
                              {"model": b, "parameters": {"weight": [0.2, 0.9]}},
                              {"model": c, "parameters": {"weight": [{"filter": "mlp", "value": 2}, {"value": 0.1}]}}],
                   "merge_method": "linear", "dtype": dtype},
        "linear_slices": {"slices": [
            {"sources": [{"model": a, "layer_range": [0, 2], "parameters": {"weight": [1.0, 0.2]}},
                         {"model": b, "layer_range": [1, 3], "parameters": {"weight": 0.5}}]},
            {"sources": [{"model": b, "layer_range": [0, 3], "parameters": {"weight": 1}},
                         {"model": a, "layer_range": [0, 3], "parameters": {"weight": [0, 1, 0.3]}}],
             "parameters": {"normalize": False}}],
            "merge_method": "linear", "out_dtype": "bfloat16"},
        "linear_layer_swap": {"slices": [  # bench/compare.py's swap: empty slices name the outer tensors' sources
            {"sources": [{"model": a, "layer_range": [0, 0], "parameters": {"weight": 0.5}},
                         {"model": b, "layer_range": [0, 0], "parameters": {"weight": 0.5}}]},
            {"sources": [{"model": b, "layer_range": [0, 1], "parameters": {"weight": 1.0}}]},
            {"sources": [{"model": a, "layer_range": [1, 2], "parameters": {"weight": 0.5}},
                         {"model": b, "layer_range": [1, 2], "parameters": {"weight": 0.5}}]},
            {"sources": [{"model": a, "layer_range": [2, 3], "parameters": {"weight": 1.0}}]},
            {"sources": [{"model": a, "layer_range": [3, 3], "parameters": {"weight": 0.3}},
                         {"model": b, "layer_range": [3, 3], "parameters": {"weight": 0.7}}]}],
            "merge_method": "linear", "dtype": dtype},
        "task_arithmetic": {"models": [{"model": a, "parameters": {"weight": 0.7}},
                                       {"model": b, "parameters": {"weight": [0.2, 0.9]}}],
                            "base_model": base, "merge_method": "task_arithmetic", "dtype": dtype,
                            "parameters": {"lambda": 0.8}},
        "ties": {"models": [{"model": base}, {"model": a, "parameters": {"weight": 0.7, "density": 0.5}},
                            {"model": b, "parameters": {"weight": 0.5, "density": 0.3}},
                            {"model": c, "parameters": {"weight": [1, 0.2], "density": 0.6}}],
                 "base_model": base, "merge_method": "ties", "dtype": dtype},
        "breadcrumbs_ties": {"models": [{"model": a, "parameters": {"weight": 0.7, "density": 0.5}},
                                        {"model": b, "parameters": {"weight": 0.5, "density": 0.8}}],
                             "base_model": base, "merge_method": "breadcrumbs_ties", "dtype": dtype,
                             "parameters": {"gamma": 0.05, "normalize": True}},
        "breadcrumbs": {"models": [{"model": a, "parameters": {"weight": 0.7, "density": 0.5}},
                                   {"model": b, "parameters": {"weight": 0.5, "density": 0.9}}],
                        "base_model": base, "merge_method": "breadcrumbs", "dtype": dtype},
        "slerp": {"slices": [{"sources": [{"model": a, "layer_range": [0, 3]}, {"model": b, "layer_range": [0, 3]}]}],
                  "base_model": a, "merge_method": "slerp", "dtype": dtype,
                  "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]},
                                       {"filter": "mlp", "value": [1, 0.3, 0]}, {"value": 0.4}]}},
        "nearswap": {"models": [{"model": a}, {"model": b}], "base_model": a, "merge_method": "nearswap",
                     "dtype": dtype, "parameters": {"t": [{"filter": "mlp", "value": [0.001, 0.01]}, {"value": 0.004}]}},
        "model_stock": {"models": [{"model": a}, {"model": b}, {"model": c}], "base_model": base,
                        "merge_method": "model_stock", "dtype": dtype},
        "sce": {"models": [{"model": a}, {"model": b}, {"model": c}], "base_model": base, "merge_method": "sce",
                "dtype": dtype, "parameters": {"select_topk": 0.4}},
        "nuslerp": {"models": [{"model": a, "parameters": {"weight": 0.7}},
                               {"model": b, "parameters": {"weight": [0.2, 1.0]}}],
                    "base_model": base, "merge_method": "nuslerp", "dtype": dtype},
        "nuslerp_without_base": {"models": [{"model": a, "parameters": {"weight": 0.7}},
                                            {"model": b, "parameters": {"weight": [0.2, 1.0]}}],
                                 "merge_method": "nuslerp", "dtype": dtype},
        "multislerp": {"models": [{"model": a, "parameters": {"weight": 0.5}},
                                  {"model": b, "parameters": {"weight": [0.2, 1.0]}},
                                  {"model": c, "parameters": {"weight": 0.3}}],
                       "base_model": base, "merge_method": "multislerp", "dtype": dtype},
        "multislerp_without_base": {"models": [{"model": a, "parameters": {"weight": 0.5}},
                                               {"model": b, "parameters": {"weight": [0.2, 1.0]}}],
                                    "merge_method": "multislerp", "dtype": dtype},
        "ram": {"models": [{"model": a}, {"model": b}, {"model": c}], "base_model": base, "merge_method": "ram",
                "dtype": dtype, "parameters": {"epsilon": 0.01}},
        "ramplus_tl": {"models": [{"model": a}, {"model": b}, {"model": c}], "base_model": base,
                       "merge_method": "ramplus_tl", "dtype": dtype,
                       "parameters": {"epsilon": 0.008, "r": 0.3, "alpha": 0.5}},
        "passthrough": {"slices": [{"sources": [{"model": a, "layer_range": [0, 2]}]},
                                   {"sources": [{"model": b, "layer_range": [1, 3], "parameters": {
                                       "scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}}]},
                                   {"sources": [{"model": a, "layer_range": [2, 3]}]}],
                        "merge_method": "passthrough", "dtype": dtype},
    }


EXACT = ["linear", "linear_slices", "linear_layer_swap", "task_arithmetic", "passthrough", "nearswap", "model_stock", "multislerp",
         "multislerp_without_base", "ram", "ramplus_tl"]
SELECTING = ["ties", "breadcrumbs_ties", "breadcrumbs", "sce"]


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
@pytest.mark.parametrize("method", EXACT)
def test_same_bytes_as_mergekit(trios: dict[str, dict[str, Path]], tmp_path: Path, method: str, dtype: str) -> None:
    config = configs(trios[dtype], {"bf16": "bfloat16", "f32": "float32"}[dtype])[method]
    assert different(run_ours(config, tmp_path / "ours"), run_mergekit(config, tmp_path / "ref")) == {}


@pytest.mark.parametrize("method", SELECTING)
def test_selections_same_bytes_as_mergekit_in_float32(trios: dict[str, dict[str, Path]], tmp_path: Path,
                                                      method: str) -> None:
    """Random float32 deltas have no equal magnitudes at a threshold: every byte agrees."""
    config = configs(trios["f32"], "float32")[method]
    assert different(run_ours(config, tmp_path / "ours"), run_mergekit(config, tmp_path / "ref")) == {}


@pytest.mark.parametrize("method", ["slerp", "nuslerp", "nuslerp_without_base"])
def test_spherical_in_bfloat16_same_bytes_and_in_float32_within_a_bit(trios: dict[str, dict[str, Path]],
                                                                      tmp_path: Path, method: str) -> None:
    """Norms and dots are summed in torch's order, so bf16 agrees byte for byte; in float32 a
    coefficient can differ in its last bit where torch's vectorised ``sin`` (SLEEF, 1-ulp) is not
    correctly rounded, and an output then by at most that bit's share of |a| + |b|."""
    bf16 = configs(trios["bf16"], "bfloat16")[method]
    assert different(run_ours(bf16, tmp_path / "ours"), run_mergekit(bf16, tmp_path / "ref")) == {}
    f32 = configs(trios["f32"], "float32")[method]
    ours, ref = run_ours(f32, tmp_path / "ours32"), run_mergekit(f32, tmp_path / "ref32")
    a, b, base = (load_tensors(trios["f32"][r]) for r in ("a", "b", "base"))
    diff = different(ours, ref)
    assert len(diff) < len(ref) / 4
    for name in diff:
        bound = 2.0**-22 * (a[name].abs() + b[name].abs() + 2 * base[name].abs()) + 2.0**-126
        assert ((ours[name] - ref[name]).abs() <= bound).all(), name


def test_ties_in_bfloat16_differs_only_at_tied_magnitudes(trios: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    trio = trios["bf16"]
    config = configs(trio, "bfloat16")["ties"]
    diff = different(run_ours(config, tmp_path / "ours"), run_mergekit(config, tmp_path / "ref"))
    assert diff, "bf16 deltas of this trio do tie at the thresholds; the check below must see some"
    inputs = {r: load_tensors(trio[r]) for r in ("base", "a", "b", "c")}
    for name, mask in diff.items():
        tied = torch.zeros_like(mask)
        for role, density in (("a", 0.5), ("b", 0.3), ("c", 0.6)):
            d = (inputs[role][name] - inputs["base"][name]).abs().float().flatten()
            k = max(1, int(density * d.numel()))
            kth = d.sort(descending=True).values[k - 1]
            if (d >= kth).sum() > k:
                tied |= (d == kth).reshape(mask.shape)
        assert not (mask & ~tied).any(), name


def test_sce_in_bfloat16_differs_only_in_tensors_with_tied_variances(trios: dict[str, dict[str, Path]],
                                                                     tmp_path: Path) -> None:
    """A different choice among tied variances changes sce's mean-square weights too, so a
    tensor with such a tie can differ anywhere; every other tensor must agree byte for byte."""
    trio = trios["bf16"]
    config = configs(trio, "bfloat16")["sce"]
    diff = different(run_ours(config, tmp_path / "ours"), run_mergekit(config, tmp_path / "ref"))
    inputs = {r: load_tensors(trio[r]) for r in ("base", "a", "b", "c")}
    for name in diff:
        tvs = torch.stack([inputs[r][name] - inputs["base"][name] for r in ("a", "b", "c")])
        var = torch.var(tvs, dim=0, unbiased=False).float().flatten()
        k = int(torch.count_nonzero(var) * 0.4)
        kth = var.sort(descending=True).values[k - 1]
        assert (var >= kth).sum() > k, name


def test_config_json_has_the_slices_layer_count(trios: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    import json

    config = configs(trios["bf16"], "bfloat16")["passthrough"]
    run_ours(config, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["num_hidden_layers"] == 5
    assert len({n for n in load_tensors(tmp_path / "ours") if ".layers.4." in n}) == 9


def test_the_command_line_writes_what_the_api_writes(trios: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    config = tmp_path / "ties.yml"
    config.write_text(yaml.safe_dump(configs(trios["bf16"], "bfloat16")["ties"]))
    r = CliRunner().invoke(main, ["mergekit-yaml", str(config), str(tmp_path / "cli"), "--out-shard-size", "50K",
                                  "--lazy-unpickle", "--allow-crimes", "--random-seed", "3", "--no-copy-tokenizer"])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "cli").glob("*.safetensors"))) == 2
    api = run_ours(yaml.safe_load(config.read_text()), tmp_path / "api")
    assert different(load_tensors(tmp_path / "cli"), api) == {}
    assert ls.verify(tmp_path / "cli").summary().startswith("ok")


@pytest.mark.parametrize("text, message", [
    ("merge_method: linear\nmodels: [{model: A}]\nmodules: {}\n", "modules: multi-module configs"),
    ("merge_method: linear\nmodels: [{model: A}]\ntokenizer_source: union\n", "tokenizer_source: union"),
    ("merge_method: linear\nmodels: [{model: A}]\ntokenizer: {source: base}\n", "tokenizer: (token surgery"),
    ("merge_method: linear\nmodels: [{model: A}]\nfrobnicate: 1\n", "unsupported key frobnicate"),
    ("merge_method: linear\nmodels: [{model: A, weight: 1}]\n", "unknown key models[0].weight"),
    ("merge_method: nope\nmodels: [{model: A}]\n", "merge_method 'nope' is not supported"),
    ("merge_method: linear\nmodels: [{model: A}]\nslices: [{sources: [{model: A, layer_range: [0, 1]}]}]\n",
     "exactly one of models: or slices:"),
    ("merge_method: linear\nmodels: [{model: A}]\ndtype: int8\n", "dtype must be one of"),
    ("merge_method: linear\nmodels: [{model: A}]\n", "missing required parameter weight"),
    ("merge_method: linear\nmodels: [{model: A, parameters: {weight: abc}}]\n", "weight must be a finite number"),
    ("merge_method: passthrough\nslices: [{sources: [{model: A, layer_range: [0, 9]}]}]\n", "beyond its 3 layers"),
    ("merge_method: passthrough\nslices: [{sources: [{model: A, layer_range: [2, 1]}]}]\n", "ends before it starts"),
    ("merge_method: ties\nmodels: [{model: A, parameters: {weight: 1}}]\n", "needs a base_model"),
    ("a: &x [1]\nb: *x\n", "alias"),
    ("merge_method: linear\nmodels: [{model: A+lora}]\n", "LoRA applied with '+'"),
    ("merge_method: linear\nmodels: [{model: A, parameters: {weight: 1}}]\nchat_template: chatml\n",
     "built-in templates"),
])
def test_a_bad_config_is_one_line_and_writes_nothing(trios: dict[str, dict[str, Path]], tmp_path: Path, text: str,
                                                     message: str) -> None:
    config = tmp_path / "bad.yml"
    config.write_text(text.replace("A", str(trios["bf16"]["a"])))
    before = snapshot(trios["bf16"]["a"])
    r = CliRunner().invoke(main, ["mergekit-yaml", str(config), str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    assert r.output.count("\n") == 1 and r.output.startswith("error: ") and message in r.output, r.output
    assert not (tmp_path / "out").exists() and snapshot(trios["bf16"]["a"]) == before


def _kept_and_l1(out: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                 model: dict[str, torch.Tensor]) -> tuple[float, float]:
    """The fraction of elements whose delta survived, and the mean over tensors of
    Σ|merged − base| / Σ|model − base| (1 when the kept deltas are rescaled to the L1 norm)."""
    kept = sum(int(((out[n] - base[n]) != 0).sum()) for n in base) / sum(t.numel() for t in base.values())
    ratios = [float((out[n] - base[n]).abs().sum() / (model[n] - base[n]).abs().sum()) for n in base]
    return kept, sum(ratios) / len(ratios)


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_random_masks_in_line_with_mergekit_and_reproducible(trios: dict[str, dict[str, Path]], tmp_path: Path,
                                                             method: str) -> None:
    trio = trios["f32"]
    config = {"models": [{"model": str(trio["a"]), "parameters": {"weight": 1.0, "density": 0.3}}],
              "base_model": str(trio["base"]), "merge_method": method, "dtype": "float32"}
    base, model = load_tensors(trio["base"]), load_tensors(trio["a"])
    ours = run_ours(config, tmp_path / "ours")
    kept, l1 = _kept_and_l1(ours, base, model)
    ref_kept, ref_l1 = _kept_and_l1(run_mergekit(config, tmp_path / "ref"), base, model)
    assert abs(kept - 0.3) < 0.01 and abs(ref_kept - 0.3) < 0.01
    assert abs(l1 - 1) < 1e-5 and abs(ref_l1 - 1) < 1e-5
    ls.api.run_mergekit_config(config, tmp_path / "again", copy_tokenizer=False, threads=1)
    assert different(load_tensors(tmp_path / "again"), ours) == {}
    ls.api.run_mergekit_config(config, tmp_path / "seeded", copy_tokenizer=False, random_seed=7, threads=2)
    assert len(different(load_tensors(tmp_path / "seeded"), ours)) == len(ours)


def test_dare_ties_moves_the_base_as_far_as_mergekit(trios: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    trio = trios["bf16"]
    config = {"models": [{"model": str(trio["a"]), "parameters": {"weight": 0.6, "density": 0.5}},
                         {"model": str(trio["b"]), "parameters": {"weight": 0.4, "density": 0.4}}],
              "base_model": str(trio["base"]), "merge_method": "dare_ties", "dtype": "bfloat16"}
    base = load_tensors(trio["base"])
    moved = [sum(float((out[n].float() - base[n].float()).abs().sum()) for n in base)
             for out in (run_ours(config, tmp_path / "ours"), run_mergekit(config, tmp_path / "ref"))]
    assert abs(moved[0] / moved[1] - 1) < 0.05


def test_a_layer_swap_dumped_as_mergekit_yaml_gives_the_same_model(trios: dict[str, dict[str, Path]],
                                                                   tmp_path: Path) -> None:
    trio = trios["bf16"]
    args = ["merge", "--task-expert", str(trio["a"]), "--language-expert", str(trio["b"]), "--bottom", "1",
            "--top", "1", "--lower-transition", "0", "--upper-transition", "1", "--non-layer", "average"]
    r = CliRunner().invoke(main, [*args, "--dump-mergekit", "-o", str(tmp_path / "never")])
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "never").exists()
    config = yaml.safe_load(r.output)
    assert config["merge_method"] == "linear" and len(config["slices"]) >= 4
    r = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "swap")])
    assert r.exit_code == 0, r.output
    swap = load_tensors(tmp_path / "swap")
    assert different(swap, run_mergekit(config, tmp_path / "ref")) == {}
    assert different(swap, run_ours(config, tmp_path / "ours")) == {}


def test_config_and_tokenizer_come_from_where_mergekit_takes_them(trios: dict[str, dict[str, Path]],
                                                                   tmp_path: Path) -> None:
    """config.json from the base model (here with the slices' layer count), the tokenizer from
    ``tokenizer_source`` or, with copy_tokenizer, from the base; a Jinja ``chat_template``
    beside it."""
    import json
    import shutil

    models = {r: tmp_path / r for r in ("base", "a", "b")}
    for role, path in models.items():
        shutil.copytree(trios["bf16"][role], path)
        (path / "tokenizer.json").write_text(json.dumps({"from": role}))
    slices = [{"sources": [{"model": str(models["a"]), "layer_range": [0, 2], "parameters": {"weight": 0.5}},
                           {"model": str(models["b"]), "layer_range": [1, 3], "parameters": {"weight": 0.5}}]}]
    config = {"slices": slices, "merge_method": "linear", "base_model": str(models["base"]), "dtype": "bfloat16"}

    ls.run_mergekit_config({**config, "tokenizer_source": str(models["b"]), "chat_template": "{{ messages }}"},
                           tmp_path / "b_tok")
    assert json.loads((tmp_path / "b_tok" / "tokenizer.json").read_text()) == {"from": "b"}
    assert (tmp_path / "b_tok" / "chat_template.jinja").read_text() == "{{ messages }}"
    assert json.loads((tmp_path / "b_tok" / "config.json").read_text())["num_hidden_layers"] == 2

    ls.run_mergekit_config(config, tmp_path / "base_tok")
    assert json.loads((tmp_path / "base_tok" / "tokenizer.json").read_text()) == {"from": "base"}
    ls.run_mergekit_config(config, tmp_path / "no_tok", copy_tokenizer=False)
    assert not (tmp_path / "no_tok" / "tokenizer.json").exists()
    assert (tmp_path / "no_tok" / "config.json").exists()
    with pytest.raises(ls.ConfigError, match="is not one of the config's models"):
        ls.run_mergekit_config({**config, "tokenizer_source": str(tmp_path / "elsewhere")}, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_the_recipe_rebuilds_the_same_bytes(trios: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    config = configs(trios["f32"], "float32")["ties"]
    config["merge_method"] = "dare_ties"  # random: the recipe must carry the seed too
    ls.run_mergekit_config(config, tmp_path / "first", copy_tokenizer=False, random_seed=11)
    card = (tmp_path / "first" / "README.md").read_text()
    assert "layerswap-fast mergekit-yaml layerswap_recipe.json OUT" in card
    r = CliRunner().invoke(main, ["mergekit-yaml", str(tmp_path / "first" / "layerswap_recipe.json"),
                                  str(tmp_path / "again"), "--no-copy-tokenizer"])
    assert r.exit_code == 0, r.output
    assert different(load_tensors(tmp_path / "again"), load_tensors(tmp_path / "first")) == {}


def test_the_card_shows_the_config_with_models_by_name(trios: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    trio = trios["bf16"]
    ls.run_mergekit_config(configs(trio, "bfloat16")["task_arithmetic"], tmp_path / "out", copy_tokenizer=False)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "merge_method: task_arithmetic" in card and "model: a" in card and "base_model: base" in card
    assert str(trio["a"].parent) not in card and str(Path.home()) not in card
