"""Synthetic LoRA adapters (``synthetic.write_adapter``, ``make_lora_trio``): PEFT's own format,
loaded by PEFT onto the synthetic base; updates that follow the paper's delta pattern;
deterministic per seed; and a layer swap of two of them within one ulp of a float64 reference.

The references are written from the definitions (ΔW = s·B·A, read back with safetensors and json
by ``support.lora_deltas``), never through the package's merge code.
"""

from __future__ import annotations

import hashlib
import json
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

from layerswap_fast import synthetic as syn

torch = pytest.importorskip("torch")
safetensors = pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from support import expected_weights, layer_of, load_tensors, lora_deltas, raw_bytes, ulps  # noqa: E402

import layerswap_fast as lf  # noqa: E402

TINY = syn.SHAPES["tiny"]
LAYERS = TINY.num_layers


@pytest.fixture(scope="module")
def lora_trio(tmp_path_factory) -> dict[str, Path]:
    """The tiny base (bf16) and a rank-8 task and language adapter on every linear module."""
    return syn.make_lora_trio(tmp_path_factory.mktemp("lora"), "tiny", rank=8)


@pytest.fixture(scope="module")
def base_tensors(lora_trio) -> dict[str, torch.Tensor]:
    return load_tensors(lora_trio["base"])


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def header(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    return json.loads(raw[8:8 + n])


# --- the format -------------------------------------------------------------------------------

def test_files_are_a_peft_lora_adapter(lora_trio):
    peft = pytest.importorskip("peft")
    adapter = lora_trio["task"]
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = peft.LoraConfig.from_pretrained(adapter)
    assert (config.peft_type, config.r, config.lora_alpha, config.use_rslora) == ("LORA", 8, 16, False)
    assert set(config.target_modules) == set(syn.LINEAR_MODULES)
    assert config.base_model_name_or_path == str(lora_trio["base"].resolve())
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        for i in range(LAYERS):
            for part, module in [("self_attn", m) for m in syn.LINEAR_MODULES[:4]] + \
                                [("mlp", m) for m in syn.LINEAR_MODULES[4:]]:
                prefix = f"base_model.model.model.layers.{i}.{part}.{module}"
                a, b = f.get_tensor(prefix + ".lora_A.weight"), f.get_tensor(prefix + ".lora_B.weight")
                keys -= {prefix + ".lora_A.weight", prefix + ".lora_B.weight"}
                out, inp = dict(syn.tensor_layout(TINY))[f"model.layers.{i}.{part}.{module}.weight"]
                assert a.shape == (8, inp) and b.shape == (out, 8) and a.dtype == b.dtype == torch.float32
    assert keys == set()


def test_peft_loads_it_onto_the_synthetic_base_and_merges_the_same_update(tmp_path):
    """rsLoRA, rank_pattern, alpha_pattern, embeddings and lm_head: PEFT reads every factor from
    the file (none left at its initial value) and its merge_and_unload adds the ΔW of the float64
    reference (the scale rules agree)."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    base = syn.write_model(tmp_path / "base", "tiny", dtype="F32", num_layers=4)
    adapter = syn.write_adapter(
        tmp_path / "adapter", "tiny", role="language", rank=4, alpha=6, use_rslora=True, num_layers=4,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"],
        rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"down_proj": 3})
    stored = load_tensors(adapter)
    assert stored["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (2, 64)
    assert stored["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, TINY.vocab)
    assert stored["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (TINY.hidden, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' and PEFT's deprecation notices
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        wrapped = peft.PeftModel.from_pretrained(model, adapter)
        loaded = {k.replace(".default", ""): v for k, v in wrapped.state_dict().items() if "lora_" in k}
        assert set(loaded) == set(stored)
        for name, t in stored.items():
            assert torch.equal(loaded[name], t), name
        merged = wrapped.merge_and_unload().state_dict()
    deltas = lora_deltas(adapter)
    assert len(deltas) == 4 * 3 + 2
    want_base = load_tensors(base)
    for name, t in merged.items():
        want = want_base[name].double() + deltas.get(name, 0.0)
        assert torch.allclose(t.double(), want, rtol=0, atol=1e-6), name


def test_a_bf16_adapter_holds_the_rounded_float32_factors(tmp_path):
    f32 = load_tensors(syn.write_adapter(tmp_path / "f32", "tiny", role="task", rank=4, num_layers=2))
    bf16 = load_tensors(syn.write_adapter(tmp_path / "bf16", "tiny", role="task", rank=4, num_layers=2, dtype="bf16"))
    assert set(f32) == set(bf16)
    for name, t in bf16.items():
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, f32[name].to(torch.bfloat16)), name


# --- the values -------------------------------------------------------------------------------

def test_updates_follow_the_paper_pattern(lora_trio):
    """Each module's ΔW has the standard deviation of the full expert's delta of that name:
    strong (10×) on the language adapter's bottom and top attention and on the task adapter's
    second half, weak elsewhere."""
    bottom, top = syn.language_layers(LAYERS)
    for role in ("task", "language"):
        strong = weak = 0
        for name, delta in lora_deltas(lora_trio[role]).items():
            layer, attention = layer_of(name), ".self_attn." in name
            if role == "language":
                is_strong = attention and (layer in bottom or layer in top)
            else:
                is_strong = layer >= LAYERS // 2
            want = syn.STRONG_STD if is_strong else syn.WEAK_STD
            assert syn.lora_delta_std(role, name[:-len(".weight")], LAYERS) == want
            assert 0.6 * want < float(delta.std()) < 1.5 * want, (role, name, float(delta.std()), want)
            strong, weak = strong + is_strong, weak + (not is_strong)
        assert strong and weak
    assert syn.language_layers(LAYERS) == (range(0, 3), range(15, 16))


def test_the_scale_does_not_change_the_update_size(tmp_path):
    """std(s·B·A) is the pattern's whatever the rank, alpha and rsLoRA say."""
    for i, (rank, alpha, rs) in enumerate([(1, 1, False), (16, 4, True), (32, 64, False)]):
        path = syn.write_adapter(tmp_path / f"a{i}", "tiny", role="task", rank=rank, alpha=alpha, use_rslora=rs,
                                 target_modules=["up_proj"])
        stds = [float(d.std()) for n, d in lora_deltas(path).items() if layer_of(n) >= LAYERS // 2]
        assert 0.8 * syn.STRONG_STD < float(np.mean(stds)) < 1.2 * syn.STRONG_STD, (rank, alpha, rs)


def test_deterministic_per_seed(tmp_path):
    a = syn.write_adapter(tmp_path / "a", "tiny", role="language", rank=4, seed=3)
    b = syn.write_adapter(tmp_path / "b", "tiny", role="language", rank=4, seed=3)
    c = syn.write_adapter(tmp_path / "c", "tiny", role="language", rank=4, seed=4)
    t = syn.write_adapter(tmp_path / "t", "tiny", role="task", rank=4, seed=3)
    weights = "adapter_model.safetensors"
    assert sha(a / weights) == sha(b / weights)
    assert sha(a / weights) != sha(c / weights) != sha(t / weights)
    # a module's factors depend on its own name only, not on which others are targeted
    one = load_tensors(syn.write_adapter(tmp_path / "one", "tiny", role="language", rank=4, seed=3,
                                         target_modules=["k_proj"]))
    everything = load_tensors(a)
    assert one and all(torch.equal(v, everything[k]) for k, v in one.items())


def test_lora_trio_base_is_the_trio_base(lora_trio, tmp_path):
    trio = syn.make_trio(tmp_path, "tiny", experts=())
    shards = sorted(p.name for p in trio["base"].glob("*.safetensors"))
    assert shards == sorted(p.name for p in lora_trio["base"].glob("*.safetensors"))
    for s in shards:
        assert sha(trio["base"] / s) == sha(lora_trio["base"] / s)


def test_layers_to_transform(tmp_path):
    path = syn.write_adapter(tmp_path / "a", "tiny", role="language", rank=2, layers=[0, 15],
                             target_modules=["o_proj"])
    assert json.loads((path / "adapter_config.json").read_text())["layers_to_transform"] == [0, 15]
    assert set(lora_deltas(path)) == {"model.layers.0.self_attn.o_proj.weight",
                                      "model.layers.15.self_attn.o_proj.weight"}


@pytest.mark.parametrize("kwargs, message", [
    ({"target_modules": ["mlp"]}, "target modules must be among"),
    ({"target_modules": []}, "target modules must be among"),
    ({"target_modules": ["lm_head"], "tie_embeddings": True}, "tied"),
    ({"layers": [16]}, "not layers of a 16-layer model"),
    ({"rank": 0}, "rank must be at least 1"),
    ({"role": "math"}, "must start with 'task' or 'lang'"),
    ({"dtype": "F64"}, "unsupported dtype"),
])
def test_refusals(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        syn.write_adapter(tmp_path / "a", "tiny", **kwargs)
    assert not (tmp_path / "a").exists()


def test_refuses_to_replace_a_directory_that_is_not_an_adapter(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        syn.write_adapter(tmp_path / "a", "tiny")
    assert (tmp_path / "a" / "notes.txt").read_text() == "mine"
    syn.write_adapter(tmp_path / "b", "tiny", rank=2)
    syn.write_adapter(tmp_path / "b", "tiny", rank=3)  # an adapter is replaced
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["r"] == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# --- merged -------------------------------------------------------------------------------------

@pytest.mark.parametrize("named_base", [True, False], ids=["--base", "base from the adapter config"])
def test_swap_of_the_two_adapters_equals_the_float64_reference(lora_trio, base_tensors, tmp_path, named_base):
    out = tmp_path / "out"
    lf.merge(lora_trio["task"], lora_trio["language"], out, base=lora_trio["base"] if named_base else None)
    merged = load_tensors(out)
    task, language = lora_deltas(lora_trio["task"]), lora_deltas(lora_trio["language"])
    assert set(merged) == set(base_tensors)
    for name, t in merged.items():
        w_t, w_l = expected_weights(layer_of(name), LAYERS)
        base = base_tensors[name]
        assert t.dtype == base.dtype == torch.bfloat16, name
        if name not in task:  # norms, embeddings, lm_head: no adapter touches them
            assert raw_bytes(t) == raw_bytes(base), name
            continue
        want = base.double() + w_t * task[name] + w_l * language[name]
        assert ulps(t, want) <= 1, name
