"""LoRA adapters (PEFT) as inputs: every writing command takes an adapter directory wherever it
takes a model, and writes the full model the adapters make of their base.

The adapters are made by PEFT itself on a tiny Llama, with B initialised non-zero. The reference
is float64 from the definitions (ΔW = s·B·A, s = alpha / r or alpha / √r, r and alpha per module
from rank_pattern / alpha_pattern), read with safetensors and json, never through the package.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from support import (add_hub_snapshot, edited_adapter, expected_weights, layer_of, load_tensors, lora_deltas,
                     make_adapter, make_adapter_trio, make_llama_trio, raw_bytes, refused, run_cli,
                     shards_without_metadata, ulps)

import layerswap_fast as lf

peft = pytest.importorskip("peft")

NUM_LAYERS = 10


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A bf16 base with tied embeddings, a full task expert, and three adapters of the base: a
    task adapter (rank 4, attention and MLP, a rank_pattern and an alpha_pattern), a language
    adapter (rank 8, rsLoRA, bf16 factors, the embedding too) and a language adapter on layers
    0-2 and 8-9 only."""
    return make_adapter_trio(tmp_path_factory.mktemp("adapters"), NUM_LAYERS)


# ------------------------------------------------------------------------------- the reference

def full_reference(base: dict[str, torch.Tensor], parts: list[tuple[float, dict[str, torch.Tensor] | None, Path | None]],
                   name: str) -> torch.Tensor:
    """Σ w·(expert) in float64, where an expert is a full model's tensors or base + ΔW of an adapter."""
    total = torch.zeros(base[name].shape, dtype=torch.float64)
    for w, full, adapter in parts:
        if full is not None:
            total += w * full[name].double()
        else:
            total += w * (base[name].double() + _DELTAS[adapter].get(name, 0.0))
    return total


_DELTAS: dict[Path, dict[str, torch.Tensor]] = {}


def deltas_of(*adapters: Path) -> None:
    for a in adapters:
        _DELTAS.setdefault(a, lora_deltas(a))


def assert_lora_merge(out: Path, base_dir: Path, weights, *, changed_by=None) -> None:
    """Every output tensor within one ulp of the float64 reference; a tensor no adapter changes
    (and no full expert) is the base's, byte for byte."""
    base, merged = load_tensors(base_dir), load_tensors(out)
    assert set(merged) == set(base)  # tied embeddings stay tied: no lm_head appears
    for name, t in merged.items():
        parts = weights(name)
        want = full_reference(base, parts, name)
        touched = any(full is not None or name in _DELTAS[a] for _, full, a in parts if w_nonzero(_))
        if not touched:
            assert raw_bytes(t) == raw_bytes(base[name]), name
        assert t.dtype == base[name].dtype, name
        assert ulps(t, want) <= 1, name


def w_nonzero(w: float) -> bool:
    return w != 0.0


# ------------------------------------------------------------------------------- full outputs

def test_swap_of_two_adapters(trio, tmp_path):
    deltas_of(trio["task_lora"], trio["language_lora"])
    out = tmp_path / "out"
    lf.merge(trio["task_lora"], trio["language_lora"], out, lf.SwapConfig(lower_transition=2, upper_transition=1),
             base=trio["base"])

    def weights(name):
        w_t, w_l = expected_weights(layer_of(name), NUM_LAYERS, lt=2, ut=1)
        return [(w_t, None, trio["task_lora"]), (w_l, None, trio["language_lora"])]

    assert_lora_merge(out, trio["base"], weights)
    merged, base = load_tensors(out), load_tensors(trio["base"])
    # the transition layer holds both products; a swapped layer only the language expert's
    name = "model.layers.5.self_attn.q_proj.weight"
    assert raw_bytes(merged[name]) != raw_bytes(base[name])
    recipe = json.loads((out / "layerswap_recipe.json").read_text())
    assert set(recipe["inputs"]) == {"task", "language", "base"}


def test_mixed_full_task_expert_and_language_adapter(trio, tmp_path):
    deltas_of(trio["language_lora"])
    out = tmp_path / "out"
    lf.merge(trio["task"], trio["language_lora"], out, base=trio["base"])
    task = load_tensors(trio["task"])

    def weights(name):
        w_t, w_l = expected_weights(layer_of(name), NUM_LAYERS)
        return [(w_t, task, None), (w_l, None, trio["language_lora"])]

    assert_lora_merge(out, trio["base"], weights)
    # a kept layer is the full task expert's tensor, byte for byte
    name = "model.layers.6.mlp.up_proj.weight"
    assert raw_bytes(load_tensors(out)[name]) == raw_bytes(task[name])


def test_adapter_on_some_layers_only(trio, tmp_path):
    deltas_of(trio["task_lora"], trio["partial_lora"])
    out = tmp_path / "out"
    lf.merge(trio["task_lora"], trio["partial_lora"], out, base=trio["base"])

    def weights(name):
        w_t, w_l = expected_weights(layer_of(name), NUM_LAYERS)
        return [(w_t, None, trio["task_lora"]), (w_l, None, trio["partial_lora"])]

    assert_lora_merge(out, trio["base"], weights)


def test_soup_and_task_arithmetic_of_adapters(trio, tmp_path):
    deltas_of(trio["task_lora"], trio["language_lora"])
    lf.soup([trio["task_lora"], trio["language_lora"]], tmp_path / "soup", base=trio["base"])
    assert_lora_merge(tmp_path / "soup", trio["base"],
                      lambda n: [(0.5, None, trio["task_lora"]), (0.5, None, trio["language_lora"])])
    lf.task_arithmetic(trio["base"], [trio["task_lora"], trio["language_lora"]], tmp_path / "ta", lam=0.7)
    base = load_tensors(trio["base"])
    merged = load_tensors(tmp_path / "ta")
    for name, t in merged.items():
        want = base[name].double() + 0.7 * sum(_DELTAS[a].get(name, 0.0)
                                               for a in (trio["task_lora"], trio["language_lora"]))
        assert ulps(t, torch.as_tensor(want)) <= 1, name


def test_revert_layers_of_an_adapter(trio, tmp_path):
    deltas_of(trio["task_lora"])
    lf.revert(trio["base"], trio["task_lora"], tmp_path / "out", layers="0-4")
    base = load_tensors(trio["base"])

    def weights(name):
        reverted = layer_of(name) is not None and layer_of(name) < 5
        return [(1.0, base, None)] if reverted else [(1.0, None, trio["task_lora"])]

    assert_lora_merge(tmp_path / "out", trio["base"], weights)


FULL_OUTPUTS = {
    "swap of adapters": ("layer_swap", lambda p: {"task_expert": p["task_lora"], "language_expert": p["language_lora"],
                                                  "base": p["base"]}),
    "swap of a full expert and an adapter": ("layer_swap", lambda p: {"task_expert": p["task"],
                                                                      "language_expert": p["language_lora"],
                                                                      "base": p["base"]}),
    "soup": ("soup", lambda p: {"model": [p["task_lora"], p["language_lora"]], "base": p["base"]}),
    "task arithmetic": ("task_arithmetic", lambda p: {"base": p["base"], "model": [p["task_lora"], p["partial_lora"]],
                                                      "lam": 0.7}),
    "revert of layers": ("revert", lambda p: {"base": p["base"], "model": p["task_lora"], "layers": "0-4"}),
}


@pytest.mark.parametrize("case", FULL_OUTPUTS)
def test_transformers_loads_the_output_and_generates(trio, tmp_path, case):
    from transformers import AutoModelForCausalLM
    method, options = FULL_OUTPUTS[case]
    out = tmp_path / "out"
    lf.run(method, out, options(trio))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings
    ids = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert ids.shape == (1, 7)


def test_peft_merge_and_unload_agrees(trio, tmp_path):
    """PEFT's own merge (W += s·B·A in the base's dtype) against ours (float32 sum, one rounding):
    both within one bf16 ulp of the float64 value, so at most two ulps apart."""
    from transformers import AutoModelForCausalLM
    deltas_of(trio["task_lora"])
    lf.task_arithmetic(trio["base"], [trio["task_lora"]], tmp_path / "ours")
    model = AutoModelForCausalLM.from_pretrained(trio["base"], dtype=torch.bfloat16)
    theirs = peft.PeftModel.from_pretrained(model, trio["task_lora"]).merge_and_unload().state_dict()
    ours, base = load_tensors(tmp_path / "ours"), load_tensors(trio["base"])
    worst_ours = worst_theirs = 0
    for name, t in ours.items():
        want = base[name].double() + _DELTAS[trio["task_lora"]].get(name, 0.0)
        worst_ours = max(worst_ours, ulps(t, torch.as_tensor(want)))
        worst_theirs = max(worst_theirs, ulps(theirs[name].contiguous(), torch.as_tensor(want)))
    assert worst_ours <= 1
    assert worst_theirs <= 2  # PEFT rounds ΔW into bf16 before adding it: a second rounding


def test_base_from_the_adapter_config(trio, tmp_path):
    """With no base given, the model the adapter names (here, the local directory it was made
    from) is the base, and the recipe records it."""
    config = json.loads((trio["task_lora"] / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == trio["base"]
    out = tmp_path / "out"
    lf.merge(trio["task_lora"], trio["language_lora"], out)
    recipe = json.loads((out / "layerswap_recipe.json").read_text())
    assert Path(recipe["options"]["base"]) == trio["base"]


# ------------------------------------------------------------------------------- refusals

def test_ties_refuses_an_adapter(trio, tmp_path):
    refused(["ties", "--base", trio["base"], "--model", trio["task_lora"], "--model", trio["task"], "-o",
              tmp_path / "out"], tmp_path, "ties needs every model's full weights", "LoRA adapter")


def test_row_revert_refuses_an_adapter(trio, tmp_path):
    refused(["revert", "--base", trio["base"], "--model", trio["task_lora"], "--row-fraction", "0.5", "-o",
              tmp_path / "out"], tmp_path, "full weights")


def test_adapter_of_another_base(trio, tmp_path):
    other = make_llama_trio(tmp_path / "other", num_layers=NUM_LAYERS, tie=True, hidden=48, roles=("base",))
    refused(["merge", "--task-expert", trio["task_lora"], "--language-expert", trio["language_lora"], "--base",
              other["base"], "-o", tmp_path / "out"], tmp_path, "was trained on another base",
             "'model.layers.0.mlp.down_proj.weight' is [48, 96] in the base but [32, 64] in the adapter")


def test_adapter_without_a_base(trio, tmp_path):
    """Neither --base nor a base the adapters name that is here (a hub id not in the cache)."""
    task = edited_adapter(trio["task_lora"], tmp_path / "t", base_model_name_or_path=None)
    lang = edited_adapter(trio["language_lora"], tmp_path / "l", base_model_name_or_path="nobody/nothing")
    refused(["merge", "--task-expert", task, "--language-expert", lang, "-o", tmp_path / "out"], tmp_path,
             "is a LoRA adapter: pass --base")


@pytest.mark.parametrize("key, value, needle", [
    ("use_dora", True, "DoRA"), ("lora_bias", True, "lora_bias"), ("peft_type", "IA3", "only LORA"),
    ("r", "four", "r must be an integer")])
def test_unsupported_adapter_configs(trio, tmp_path, key, value, needle):
    adapter = edited_adapter(trio["task_lora"], tmp_path / "odd", **{key: value})
    refused(["merge", "--task-expert", adapter, "--language-expert", trio["language_lora"], "--base",
              trio["base"], "-o", tmp_path / "out"], tmp_path, needle)


def test_cli_merge_of_adapters(trio, tmp_path):
    result = run_cli("merge", "--task-expert", trio["task_lora"], "--language-expert", trio["language_lora"], "--base",
                  trio["base"], "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert run_cli("verify", tmp_path / "out").returncode == 0


# ------------------------------------------------------------------------------- hub ids

def test_adapters_and_their_base_by_hub_id(trio, tmp_path, monkeypatch):
    """Adapters named by hub id, each naming its base by hub id: the base comes from the cache,
    with no --base, and the output is the merge of the same directories; the recipe pins all three."""
    cache = tmp_path / "hub"
    commit = "2" * 40
    add_hub_snapshot(cache, "org/base", trio["base"], commit, ("main",))
    for repo, role in (("org/task-lora", "task_lora"), ("org/lang-lora", "language_lora")):
        edited = edited_adapter(trio[role], tmp_path / role, base_model_name_or_path="org/base")
        add_hub_snapshot(cache, repo, edited, commit, ("main",))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    lf.merge("org/task-lora", "org/lang-lora", tmp_path / "hub_out")
    lf.merge(trio["task_lora"], trio["language_lora"], tmp_path / "local_out", base=trio["base"])
    assert shards_without_metadata(tmp_path / "hub_out") == shards_without_metadata(tmp_path / "local_out")
    recipe = json.loads((tmp_path / "hub_out" / "layerswap_recipe.json").read_text())
    assert recipe["options"]["base"] == f"org/base@{commit}"
    assert {role: (i.get("hub_id"), i.get("revision")) for role, i in recipe["inputs"].items()} == {
        "task": ("org/task-lora", commit), "language": ("org/lang-lora", commit), "base": ("org/base", commit)}


def test_fan_in_fan_out_adapters_of_gpt2(tmp_path):
    """GPT-2 stores its projections as [in, out] (Conv1D): PEFT's fan_in_fan_out adapters update
    them by (B·A)ᵀ."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=8, n_head=4)
    GPT2LMHeadModel(config).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    task = make_adapter(tmp_path / "base", tmp_path / "t", 1, r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                        fan_in_fan_out=True)
    lang = make_adapter(tmp_path / "base", tmp_path / "l", 2, r=2, lora_alpha=2, target_modules=["c_proj"],
                        fan_in_fan_out=True)
    assert json.loads((task / "adapter_config.json").read_text())["fan_in_fan_out"]
    deltas_of(task, lang)
    lf.merge(task, lang, tmp_path / "out", lf.SwapConfig(bottom=3, top=2), base=tmp_path / "base")

    def weights(name):
        layer = int(name.split(".")[2]) if name.startswith("transformer.h.") else None
        w_t, w_l = expected_weights(layer, 8, bottom=3, top=2)
        return [(w_t, None, task), (w_l, None, lang)]

    assert_lora_merge(tmp_path / "out", tmp_path / "base", weights)


def _adapter_with_tensors(trio, to: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file
    to.mkdir()
    (to / "adapter_config.json").write_bytes((trio["task_lora"] / "adapter_config.json").read_bytes())
    save_file(tensors, str(to / "adapter_model.safetensors"))
    return to


@pytest.mark.parametrize("tensors, needle", [
    ({"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)}, "does not start with"),
    ({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)},
     "has lora_A but not its partner"),
    ({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32),
      "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 3)}, "do not multiply"),
    ({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(3, 32),
      "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 3)},
     "has rank 3 but its config says 4"),
    ({"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.zeros(32)},
     "no LoRA factor this tool knows"),
    ({"base_model.model.model.layers.0.self_attn.nope.lora_A.weight": torch.zeros(4, 32),
      "base_model.model.model.layers.0.self_attn.nope.lora_B.weight": torch.zeros(32, 4)},
     "changes 'model.layers.0.self_attn.nope.weight', which the base does not have"),
])
def test_malformed_adapters(trio, tmp_path, tensors, needle):
    adapter = _adapter_with_tensors(trio, tmp_path / "bad", tensors)
    refused(["merge", "--task-expert", adapter, "--language-expert", trio["language_lora"], "--base",
              trio["base"], "-o", tmp_path / "out"], tmp_path, needle)


def test_an_adapter_without_safetensors_weights(trio, tmp_path):
    adapter = tmp_path / "pickled"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_bytes((trio["task_lora"] / "adapter_config.json").read_bytes())
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04not unpickled")
    refused(["merge", "--task-expert", adapter, "--language-expert", trio["language_lora"], "--base",
              trio["base"], "-o", tmp_path / "out"], tmp_path, "the adapter has no adapter_model.safetensors",
             "adapter_model.bin is a pickle")
