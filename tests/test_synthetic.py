"""The synthetic trio generator: valid safetensors and Llama checkpoints, the promised values."""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from math import prod
from pathlib import Path

import numpy as np
import pytest

from layerswap_fast import synthetic as syn

torch = pytest.importorskip("torch")
safetensors = pytest.importorskip("safetensors")
from safetensors.numpy import load_file as load_numpy  # noqa: E402
from support import load_tensors  # noqa: E402

TINY = syn.SHAPES["tiny"]
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def trio(tmp_path_factory) -> dict[str, Path]:
    return syn.make_trio(tmp_path_factory.mktemp("trio"), "tiny")


def shard_files(model: Path) -> list[Path]:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    return sorted({model / f for f in index["weight_map"].values()})


def read_header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8:8 + n])


def digest(model: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(model.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def mav(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


# --- files -----------------------------------------------------------------------------------

def test_tiny_trio_is_small_and_complete(trio):
    assert list(trio) == ["base", "task", "language"]
    total = 0
    for role, model in trio.items():
        assert model.name == role
        for name in ("config.json", "generation_config.json", "tokenizer_config.json",
                     "model.safetensors.index.json"):
            assert (model / name).is_file(), name
        total += sum(p.stat().st_size for p in model.iterdir())
        assert not list(model.parent.glob(".*partial"))
    assert total < 10 * 10**6


def test_headers_index_and_layout(trio):
    layout = syn.tensor_layout(TINY)
    for model in trio.values():
        index = json.loads((model / "model.safetensors.index.json").read_text())
        assert list(index["weight_map"]) == [name for name, _ in layout]
        assert index["metadata"]["total_size"] == sum(prod(s) * 2 for _, s in layout)
        seen = []
        for f in shard_files(model):
            n, header = read_header(f)
            assert (8 + n) % 8 == 0
            assert header.pop("__metadata__") == {"format": "pt"}
            end = 0
            for name, entry in header.items():  # JSON order is the order written
                assert entry["dtype"] == "BF16"
                begin, stop = entry["data_offsets"]
                assert begin == end and stop - begin == prod(entry["shape"]) * 2
                assert index["weight_map"][name] == f.name
                end = stop
                seen.append(name)
            assert f.stat().st_size == 8 + n + end
        assert seen == [name for name, _ in layout]


def test_safetensors_reads_every_tensor(trio):
    expected = dict(syn.tensor_layout(TINY))
    assert "lm_head.weight" in expected and len(expected) == 2 + 9 * TINY.num_layers + 1
    for model in trio.values():
        tensors = load_tensors(model)
        assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
        assert all(t.dtype == torch.bfloat16 for t in tensors.values())
        assert all(torch.isfinite(t.float()).all() for t in tensors.values())


def test_config_is_a_llama_config(trio):
    from transformers import AutoConfig
    raw = json.loads((trio["task"] / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"] and raw["model_type"] == "llama"
    assert raw["torch_dtype"] == raw["dtype"] == "bfloat16"
    config = AutoConfig.from_pretrained(trio["task"])
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (64, 172, 16)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (4, 2, 512)
    assert config.max_position_embeddings == 256 and config.rms_norm_eps == 1e-5
    assert config.tie_word_embeddings is False


def test_shard_size_limit_and_values_independent_of_sharding(trio, tmp_path):
    paths = syn.make_trio(tmp_path, "tiny", shard_size="150KB", with_base=False)
    assert list(paths) == ["task", "language"]
    files = shard_files(paths["task"])
    assert len(files) > 5
    assert [f.name for f in files] == [f"model-{i:05d}-of-{len(files):05d}.safetensors"
                                       for i in range(1, len(files) + 1)]
    assert all(f.stat().st_size <= 150_000 for f in files)
    assert sorted(p.name for p in paths["task"].glob("*.safetensors")) == [f.name for f in files]
    small, big = load_tensors(paths["task"]), load_tensors(trio["task"])
    assert small.keys() == big.keys()
    assert all(torch.equal(small[k], big[k]) for k in big)


def test_tensor_larger_than_shard_size_gets_its_own_shard(tmp_path):
    path = syn.write_model(tmp_path / "m", "tiny", role="task", shard_size=20_000, num_layers=1)
    for f in shard_files(path):
        _, header = read_header(f)
        header.pop("__metadata__")
        assert f.stat().st_size <= 20_000 or len(header) == 1


def test_deterministic_and_seeded(trio, tmp_path):
    again = syn.make_trio(tmp_path / "again", "tiny", experts=("task",))
    assert digest(again["base"]) == digest(trio["base"])
    assert digest(again["task"]) == digest(trio["task"])
    single = syn.write_model(tmp_path / "single", "tiny", role="language")
    assert digest(single) == digest(trio["language"])
    other = syn.make_trio(tmp_path / "other", "tiny", seed=1, with_base=False, experts=("task",))
    assert digest(other["task"]) != digest(trio["task"])


# --- values ----------------------------------------------------------------------------------

def test_base_statistics(trio):
    base = load_tensors(trio["base"])
    emb = base["model.embed_tokens.weight"].float()
    assert abs(emb.std().item() - syn.BASE_STD) < 0.002 and abs(emb.mean().item()) < 0.002
    q = base["model.layers.3.self_attn.q_proj.weight"].float()
    assert abs(q.std().item() - syn.BASE_STD) < 0.002
    norm = base["model.layers.3.input_layernorm.weight"].float()
    assert abs(norm.mean().item() - 1.0) < 0.02 and norm.std().item() < 0.1
    # distinct tensors are not copies of each other
    assert not torch.equal(base["model.layers.3.mlp.up_proj.weight"], base["model.layers.3.mlp.gate_proj.weight"])
    assert not torch.equal(emb, base["lm_head.weight"].float())


def test_delta_pattern(trio):
    base, task, lang = (load_tensors(trio[r]) for r in ("base", "task", "language"))
    layers = TINY.num_layers
    bottom, top = syn.language_layers(layers)
    assert (list(bottom), list(top)) == ([0, 1, 2], [15])
    assert list(syn.task_layers(layers)) == list(range(8, 16))

    def layer_mav(expert, i, kinds):
        part = {k: ("self_attn." if k in ATTN else "mlp.") + k for k in kinds}
        return np.mean([mav(expert[f"model.layers.{i}.{p}.weight"], base[f"model.layers.{i}.{p}.weight"])
                        for p in part.values()])

    # every matrix moved, strong ones about 10x the weak ones (row-MAV of a N(0, s) delta ~ 0.8 s)
    for role, expert in (("task", task), ("language", lang)):
        for name, t in expert.items():
            if t.dim() != 2:
                continue
            m = mav(t, base[name])
            level = syn.delta_level(role, name, layers)
            std = syn.STRONG_STD if level == "strong" else syn.WEAK_STD
            assert 0.6 * std < m < 1.0 * std, (role, name, level, m)

    # language: attention of layer 0 far above a middle layer's; its MLP everywhere weak
    assert layer_mav(lang, 0, ATTN) > 5 * layer_mav(lang, 7, ATTN)
    assert layer_mav(lang, 15, ATTN) > 5 * layer_mav(lang, 7, ATTN)
    assert layer_mav(lang, 0, ATTN) > 5 * layer_mav(lang, 0, MLP)
    # task: the second half far above the first, attention and MLP alike
    first = np.mean([layer_mav(task, i, ATTN + MLP) for i in range(0, 8)])
    second = np.mean([layer_mav(task, i, ATTN + MLP) for i in range(8, 16)])
    assert second > 5 * first
    # the two experts' deltas are independent draws
    name = "model.layers.10.self_attn.q_proj.weight"
    d_task = (task[name].float() - base[name].float()).flatten()
    d_lang = (lang[name].float() - base[name].float()).flatten()
    assert abs(torch.corrcoef(torch.stack([d_task, d_lang]))[0, 1].item()) < 0.1
    # non-layer parameters: small deltas in both
    for expert in (task, lang):
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert 0 < mav(expert[name], base[name]) < syn.WEAK_STD
        assert 0 < mav(expert["model.norm.weight"], base["model.norm.weight"]) < 2 * syn.NORM_WEAK_STD


def test_dtypes_hold_the_same_values(trio, tmp_path):
    f32 = syn.make_trio(tmp_path / "f32", "tiny", dtype="F32", with_base=False, experts=("task",))
    f16 = syn.make_trio(tmp_path / "f16", "tiny", dtype="fp16", with_base=False, experts=("task",))
    assert json.loads((f32["task"] / "config.json").read_text())["torch_dtype"] == "float32"
    bf16 = load_tensors(trio["task"])
    wide = {}
    for f in shard_files(f32["task"]):
        wide.update(load_numpy(str(f)))
    half = {}
    for f in shard_files(f16["task"]):
        half.update(load_numpy(str(f)))
    for name, values in wide.items():
        assert values.dtype == np.float32 and half[name].dtype == np.float16
        assert np.array_equal(syn.float32_to_bfloat16(values), bf16[name].view(torch.int16).numpy().view(np.uint16))
        assert np.array_equal(values.astype(np.float16), half[name])


def test_tied_embeddings(tmp_path):
    path = syn.write_model(tmp_path / "tied", "tiny", role="task", tie_embeddings=True, num_layers=2)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]
    assert list(index["weight_map"])[-1] == "model.norm.weight"
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is True
    assert json.loads((path / "config.json").read_text())["num_hidden_layers"] == 2


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown shape"):
        syn.make_trio(tmp_path, "13b")
    with pytest.raises(ValueError, match="dtype"):
        syn.make_trio(tmp_path, "tiny", dtype="F8_E4M3")
    with pytest.raises(ValueError, match="task"):
        syn.make_trio(tmp_path, "tiny", experts=("math",))
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        syn.make_trio(tmp_path, "tiny")
    assert (tmp_path / "base" / "precious.txt").read_text() == "keep me"
    assert syn.parse_size("5GB") == 5 * 10**9 and syn.parse_size("2MiB") == 2 * 2**20


def test_shapes():
    assert set(syn.SHAPES) >= {"tiny", "1b", "8b", "70b-slice"}
    s = syn.SHAPES["8b"]
    assert (s.num_layers, s.hidden, s.intermediate, s.heads, s.kv_heads, s.vocab) == (32, 4096, 14336, 32, 8, 128256)
    assert syn.SHAPES["70b-slice"].hidden == 8192 and syn.SHAPES["70b-slice"].num_layers == 8
    assert syn.SHAPES["1b"].num_layers == 22
    nbytes = sum(prod(shape) * 2 for _, shape in syn.tensor_layout(s))
    assert 15e9 < nbytes < 17e9  # Llama 3 8B in bf16
    assert syn.pool_size(s) == syn.MAX_POOL and syn.pool_size(TINY) >= sum(
        prod(shape) for _, shape in syn.tensor_layout(TINY) if len(shape) == 2)


# --- transformers and torch ------------------------------------------------------------------

def test_transformers_loads_and_runs_the_task_expert(trio):
    from transformers import AutoModelForCausalLM
    model, info = AutoModelForCausalLM.from_pretrained(trio["task"], dtype=torch.float32,
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    files = load_tensors(trio["task"])
    state = model.state_dict()
    assert all(torch.equal(state[name], t.float()) for name, t in files.items())
    ids = torch.tensor([[1, 17, 42, 300, 511, 2]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 6, TINY.vocab) and torch.isfinite(logits).all()


def test_bf16_rounding_matches_torch():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(100_000) * rng.choice([1e-30, 1e-3, 1.0, 1e5, 1e30], 100_000)).astype(np.float32)
    bits = rng.integers(0, 2**32, 50_000, dtype=np.uint64).astype(np.uint32)
    # exact ties (low half 0x8000) with even and odd kept parts, and their neighbours
    ties = (bits & 0xFFFF0000) | 0x8000
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.finfo(np.float32).max, -np.finfo(np.float32).max,
                        np.finfo(np.float32).tiny, 1e-45, -1e-45, 1.0, 1.00390625, 1.01171875],
                       dtype=np.float32)
    values = np.concatenate([x, bits.view(np.float32), ties.view(np.float32), (ties - 1).view(np.float32),
                             (ties + 1).view(np.float32), special])
    values = values[~np.isnan(values)]  # torch's vectorised path writes NaN as 0xFFFF, c10 as 0x7FC0
    ours = syn.float32_to_bfloat16(values)
    theirs = torch.tensor(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert ours.dtype == np.uint16
    assert np.array_equal(ours, theirs)
    assert np.array_equal(syn.bfloat16_to_float32(ours), torch.from_numpy(ours.view(np.int16)).view(torch.bfloat16).float().numpy())
    assert syn.float32_to_bfloat16(np.array([np.nan], np.float32))[0] == 0x7FC0


def test_bench_trio_cache(tmp_path, monkeypatch):
    bench = Path(__file__).resolve().parent.parent / "bench"
    monkeypatch.syspath_prepend(str(bench))
    sys.modules.pop("common", None)
    import common
    first = common.ensure_trio(tmp_path / "t", "tiny", layers=2, with_base=False)
    assert first.generated and (tmp_path / "t" / "trio.json").is_file()
    assert not common.ensure_trio(tmp_path / "t", "tiny", layers=2, with_base=False).generated
    assert common.ensure_trio(tmp_path / "t", "tiny", layers=2, with_base=True).generated
    assert not common.ensure_trio(tmp_path / "t", "tiny", layers=2, with_base=False).generated
    assert common.ensure_trio(tmp_path / "t", "tiny", layers=3, with_base=False).generated
    sys.modules.pop("common", None)
