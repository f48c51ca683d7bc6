"""``--as-adapter``: a merge of LoRA adapters of one base written as one PEFT adapter of that base.

The adapters are made by PEFT itself on a tiny Llama (B initialised non-zero), and PEFT is the
reference for the output: ``PeftModel.from_pretrained(base, OUT)`` must load it, hold exactly its
tensors, and give the logits of the full-model merge of the same inputs. Factors are checked
against the input files, read with safetensors and json (never through the package): a module
from one adapter keeps that adapter's A and B byte for byte (scale w·s), a mixed one is the
concatenation A = [w₁s₁·A₁; w₂s₂·A₂ ...] (within one ulp of the float64 product), B = [B₁, B₂ ...]
(exact), scale 1.

**Tolerance of the logits.** All logits are computed in float64 (the bf16 base and every factor
widen exactly), so only the stored roundings differ between models:

- the adapter: each folded block w·s·A is rounded once into float32 (the mixed factors here are
  float32: a float32 task adapter with a bf16 language adapter), a relative error of 2⁻²⁴ of a
  small update. Against the float64 merge L* its logits must agree within ``F32_TOL`` = 2⁻²⁰ of the
  logits' scale (16 float32 roundoffs: slack for the rounding to add up over ten layers).
- the full-model swap: every merged weight W* is rounded once into the base's bf16 (within one
  ulp: test_adapters.py checks that). Its logits therefore move from L* by about what rounding W*
  into bf16 moves them, which the test measures on the float64 reference itself (L_rt: the
  logits of W* rounded by torch). The adapter and the full swap must agree within
  2·|L_rt − L*| + ``F32_TOL``: the bf16 rounding (twice, as the package may land one ulp from
  torch's nearest) plus the adapter's own. A full swap written in float32 (``--dtype f32``)
  must agree within 2·``F32_TOL``.

Each comparison also checks that the adapters move the logits far more (1000×) than the float32
tolerance, and, for the swap, that a wrong adapter (the task adapter alone) lands far outside
even the bf16 one: these tests can fail.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch

from support import (edited_adapter, expected_weights, layer_of, load_tensors, lora_deltas, make_adapter, make_adapter_trio,
                     make_llama_trio, raw_bytes,
                     refused, run_cli, ulps)

import layerswap_fast as lf
from layerswap_fast.errors import ConfigError

peft = pytest.importorskip("peft")

NUM_LAYERS = 10
PREFIX = "base_model.model."
F32_TOL = 2.0 ** -20
IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
#: layers 0-2 and 8-9 the language adapter's, 3-4 and 7 transitions (mixed modules), 5-6 the task adapter's
SWAP = {"bottom": 3, "top": 2, "lower_transition": 2, "upper_transition": 1}
TORCH_DTYPE = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A bf16 base with tied embeddings, a full task expert, and adapters of the base: a task
    adapter (rank 4, float32, attention and MLP, a rank_pattern and an alpha_pattern), a language
    adapter (rank 8, rsLoRA, bf16 factors, the embedding too, which PEFT saves beside its factors
    as the embedding's base layer), an adapter on layers 0-2 and 8-9 only (rank 2), and one that
    saves the final norm whole (modules_to_save), changed so that it is not the base's."""
    root = tmp_path_factory.mktemp("as_adapter")
    paths = make_adapter_trio(root, NUM_LAYERS)
    paths["norm_lora"] = make_adapter(paths["base"], root / "norm_lora", 4, r=2, lora_alpha=4,
                                      target_modules=["q_proj"], modules_to_save=["model.norm"])
    edit_tensor(paths["norm_lora"], PREFIX + "model.norm.weight", lambda t: t * 1.5)
    return paths


def inputs(trio: dict[str, Path]) -> tuple[Path, ...]:
    """Where the fixture's inputs live: a refusal must leave them as they were."""
    return (trio["base"].parent,)


def edit_tensor(adapter: Path, name: str, change) -> None:
    """Rewrite one tensor of an adapter's weights file (safetensors, by hand)."""
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert name in tensors, sorted(tensors)
    tensors[name] = change(tensors[name]).contiguous()
    save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})


# ------------------------------------------------------------------------------- reading adapters

def factors(adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, str, str]]:
    """Each module's (A, B, A's key, B's key), from the adapter's weights file."""
    tensors = load_tensors(adapter)
    found = {}
    for key, a in tensors.items():
        m = re.fullmatch(re.escape(PREFIX) + r"(.+)\.lora_(embedding_)?A(\.weight)?", key)
        if m:
            b_key = key.replace("lora_embedding_A", "lora_embedding_B").replace("lora_A", "lora_B")
            found[m[1]] = (a, tensors[b_key], key, b_key)
    return found


def scale_of(config: dict, module: str, rank: int) -> float:
    """ΔW = scale·B·A as PEFT computes the scale: alpha from the first alpha_pattern key that
    matches the end of the module's name, over r, or over √r with rsLoRA."""
    alpha = config["lora_alpha"]
    for key, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            alpha = value
            break
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def config_of(adapter: Path) -> dict:
    return json.loads((adapter / "adapter_config.json").read_text())


def assert_factors(out: Path, parts_of) -> dict[str, int]:
    """Every module of the output against its inputs: ``parts_of(module)`` lists (weight, input
    adapter) in the merge's order. One input with the module: its A and B byte for byte, scale
    w·s; several: B the columns of theirs (exact), A the rows w·s·A (within one ulp of the float64
    product), rank their sum, scale 1; none: the module is absent. Returns how many of each."""
    out_config, out_factors = config_of(out), factors(out)
    assert out_config["use_rslora"] is False and out_config["peft_type"] == "LORA"
    opened = {}
    counts = {"copied": 0, "concatenated": 0}
    modules = {m for _, adapter in parts_of(None) for m in factors(adapter)}
    for module in sorted(modules):
        parts = []
        for w, adapter in parts_of(module):
            if w != 0.0 and module in opened.setdefault(adapter, factors(adapter)):
                a, b, _, _ = opened[adapter][module]
                parts.append((w * scale_of(config_of(adapter), module, a.shape[0]), a, b))
        if not parts:
            assert module not in out_factors, module
            continue
        a, b, a_key, _ = out_factors[module]
        scale = scale_of(out_config, module, a.shape[0])
        if len(parts) == 1:
            (s, a_in, b_in), = parts
            assert raw_bytes(a) == raw_bytes(a_in) and raw_bytes(b) == raw_bytes(b_in), module
            assert a.dtype == a_in.dtype and b.dtype == b_in.dtype, module
            assert math.isclose(scale, s, rel_tol=1e-15), (module, scale, s)
            counts["copied"] += 1
        else:
            assert scale == 1.0, module
            def common(dtypes):  # one dtype, or float32 where they differ
                return dtypes.pop() if len(dtypes) == 1 else torch.float32
            assert a.dtype == common({p[1].dtype for p in parts}), module
            assert b.dtype == common({p[2].dtype for p in parts}), module
            assert b.shape == (b.shape[0], sum(p[1].shape[0] for p in parts)), module
            want_b = torch.cat([p[2].to(b.dtype) for p in parts], dim=1)
            assert raw_bytes(b) == raw_bytes(want_b), module
            want_a = torch.cat([s * p_a.double() for s, p_a, _ in parts], dim=0)
            assert ulps(a, want_a) <= 1, module
            counts["concatenated"] += 1
        assert a_key.endswith("lora_embedding_A") == ("embed_tokens" in module)
    assert set(out_factors) <= modules
    return counts


# ------------------------------------------------------------------------------- logits

def base_model(base: Path):
    from transformers import AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)


def peft_model(base: Path, adapter: Path):
    """The adapter loaded by PEFT onto the base, in float64; PEFT's warnings must be only the
    tied head's (its LoRA shares the embedding's factors, so PEFT finds no keys of its own)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base_model(base), adapter)
    for w in caught:
        text = str(w.message)
        assert "did not match" not in text and "were ignored" not in text, text
        if "missing adapter keys" in text:
            head = {f"base_model.model.lm_head.lora_{x}.default.weight" for x in "AB"}
            assert set(re.findall(r"'([^']+)'", text)) <= head, text
    return model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def full_logits(path: Path) -> torch.Tensor:
    return logits(base_model(path))


def reference_logits(base: Path, parts_of, dtype: torch.dtype | None = None,
                     saved: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Logits of the exact merge W* = W + Σ w·ΔW (float64, ΔW from the files), or of W* rounded
    once into ``dtype`` by torch; ``saved`` tensors replace the base's whole."""
    model, base_tensors = base_model(base), load_tensors(base)
    state = model.state_dict()
    deltas = {}
    with torch.no_grad():
        for name, w in base_tensors.items():
            value = (saved[name] if saved and name in saved else w).double()
            for weight, adapter in parts_of(name[:-len(".weight")] if name.endswith(".weight") else name):
                delta = deltas.setdefault(adapter, lora_deltas(adapter)).get(name)
                if delta is not None and weight != 0.0:
                    value = value + weight * delta
            state[name].copy_(value if dtype is None else value.to(dtype).double())
    return logits(model)


def assert_logits(adapter_out: Path, full_out: Path, base: Path, parts_of, saved=None, wrong: Path | None = None):
    """The adapter output (through PEFT) against the float64 merge and the full-model merge, with
    the tolerances of the module's account; ``wrong`` is an adapter that must land outside them."""
    exact = reference_logits(base, parts_of, saved=saved)
    rounded = reference_logits(base, parts_of, torch.bfloat16, saved=saved)
    ours, full = logits(peft_model(base, adapter_out)), full_logits(full_out)
    scale = exact.abs().max().item()
    f32 = F32_TOL * scale
    bf16 = 2 * (rounded - exact).abs().max().item() + f32
    assert (ours - exact).abs().max().item() <= f32
    assert (ours - full).abs().max().item() <= bf16
    moved = (exact - logits(base_model(base))).abs().max().item()
    assert moved > 1000 * f32, (moved, f32)  # the adapters matter far more than the float32 tolerance
    if wrong is not None:  # and a wrong adapter misses even the bf16 one
        assert (logits(peft_model(base, wrong)) - full).abs().max().item() > 10 * bf16


def assert_loaded_as_written(model, out: Path) -> None:
    """PEFT holds exactly the output's factors (widened to float64) in its LoRA layers."""
    params = dict(model.named_parameters())
    for module, (a, b, a_key, b_key) in factors(out).items():
        for key, t in ((a_key, a), (b_key, b)):
            stem, _, last = key.rpartition(".") if key.endswith(".weight") else (key, "", "")
            name = (f"{stem}.default.{last}" if last else f"{key}.default")
            assert torch.equal(params[name].detach(), t.double()), name


def swap_parts(task: Path, language: Path, non_layer: str = "average", swap: dict | None = None):
    """(weight, adapter) of each module in a layer swap (``SWAP`` unless ``swap`` is given) of the
    ``task`` and ``language`` adapters; ``parts(None)`` has every adapter."""
    s = SWAP if swap is None else swap

    def parts(module: str | None):
        w_t, w_l = expected_weights(None if module is None else layer_of(module + ".weight"), NUM_LAYERS,
                                    bottom=s.get("bottom", 5), top=s.get("top", 2), lt=s.get("lower_transition", 1),
                                    ut=s.get("upper_transition", 1), non_layer=non_layer)
        return [(w_t, task), (w_l, language)]
    return parts


# ------------------------------------------------------------------------------- the swap

def swap(trio, out: Path, task: str = "task_lora", language: str = "language_lora", **options):
    """``merge --as-adapter`` of two of the trio's adapters (with ``SWAP`` unless told otherwise)."""
    return lf.merge(trio[task], trio[language], out, lf.SwapConfig(**{**SWAP, **options}), base=trio["base"],
                    as_adapter=True)


def test_swap_as_adapter_loads_in_peft_and_gives_the_full_swap(trio, tmp_path):
    out = tmp_path / "adapter"
    result = swap(trio, out)
    lf.merge(trio["task_lora"], trio["language_lora"], tmp_path / "full", lf.SwapConfig(**SWAP), base=trio["base"])
    lf.merge(trio["task_lora"], trio["language_lora"], tmp_path / "full32", lf.SwapConfig(**SWAP), base=trio["base"],
             dtype="f32")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "layerswap_recipe.json"]
    parts = swap_parts(trio["task_lora"], trio["language_lora"])
    counts = assert_factors(out, parts)
    # language layers 0-2 and 8-9 (q, v, up), task layers 5-6 (all seven), the task adapter's k, o,
    # gate and down in the transitions 3, 4 and 7, and the embedding (the language adapter's, at
    # half weight): copies; q, v and up of the transitions: concatenations
    assert counts == {"copied": 5 * 3 + 2 * 7 + 3 * 4 + 1, "concatenated": 3 * 3}, counts
    model = peft_model(trio["base"], out)
    assert_loaded_as_written(model, out)
    assert_logits(out, tmp_path / "full", trio["base"], parts, wrong=trio["task_lora"])
    exact = reference_logits(trio["base"], parts)
    assert (logits(model) - full_logits(tmp_path / "full32")).abs().max() <= 2 * F32_TOL * exact.abs().max()
    # the embedding is tied to the head: PEFT applies its update to both, as the merged model does
    assert config_of(out)["ensure_weight_tying"] is True
    assert result.stats is not None and lf.verify(out).shards == 1


def test_rslora_and_patterns(trio, tmp_path):
    """A module copied from the rsLoRA adapter (scale alpha/√r) keeps its exact scale with
    use_rslora off; the task adapter's own rank and alpha patterns come through per module; a
    transition's concatenation has rank r_t + r_l (2 + 8 where the task adapter's rank_pattern
    says 2) and scale 1."""
    swap(trio, tmp_path / "out")
    config, language = config_of(tmp_path / "out"), config_of(trio["language_lora"])
    assert language["use_rslora"] and not config["use_rslora"]
    assert scale_of(config, "model.layers.0.self_attn.q_proj", 8) == language["lora_alpha"] / math.sqrt(8)
    assert scale_of(config, "model.layers.5.mlp.down_proj", 4) == 3 / 4  # alpha_pattern down_proj: 3
    assert scale_of(config, "model.layers.5.mlp.up_proj", 4) == 8 / 4
    q3 = re.escape("model.layers.3.self_attn.q_proj")
    assert config["rank_pattern"][q3] == 2 + 8 and scale_of(config, "model.layers.3.self_attn.q_proj", 10) == 1.0
    assert factors(tmp_path / "out")["model.layers.3.self_attn.q_proj"][0].shape == (10, 32)


def test_the_adapter_read_back_makes_the_same_model(trio, tmp_path):
    """The output is itself an adapter input: merged into its base, it gives the full swap's
    model, every tensor within one ulp of the float64 merge."""
    swap(trio, tmp_path / "adapter")
    lf.task_arithmetic(trio["base"], [tmp_path / "adapter"], tmp_path / "full")
    parts = swap_parts(trio["task_lora"], trio["language_lora"])
    base, merged = load_tensors(trio["base"]), load_tensors(tmp_path / "full")
    deltas = {a: lora_deltas(a) for a in (trio["task_lora"], trio["language_lora"])}
    changed = 0
    for name, t in merged.items():
        want = base[name].double()
        for w, adapter in parts(name[:-len(".weight")] if name.endswith(".weight") else name):
            want = want + w * deltas[adapter].get(name, 0.0)
        assert ulps(t, want) <= 1, name
        changed += raw_bytes(t) != raw_bytes(base[name])
    assert changed > 40


def test_adapter_on_some_layers_only(trio, tmp_path):
    """The partial adapter (rank 2, o_proj of layers 0-2 and 8-9) swapped into the task adapter
    (rank 4) with the default swap: a swapped layer it lacks (3, 4) has no o_proj at all, a
    transition it lacks (5) has the task adapter's alone, at half its scale."""
    default = {"bottom": 5, "top": 2, "lower_transition": 1, "upper_transition": 1}
    out = tmp_path / "out"
    swap(trio, out, language="partial_lora", **default)
    lf.merge(trio["task_lora"], trio["partial_lora"], tmp_path / "full", base=trio["base"])
    parts = swap_parts(trio["task_lora"], trio["partial_lora"], swap=default)
    assert_factors(out, parts)
    got = factors(out)
    assert "model.layers.3.self_attn.o_proj" not in got and "model.layers.3.self_attn.q_proj" not in got
    assert got["model.layers.8.self_attn.o_proj"][0].shape[0] == 2
    assert got["model.layers.5.self_attn.o_proj"][0].shape[0] == 4
    assert scale_of(config_of(out), "model.layers.5.self_attn.o_proj", 4) == 0.5 * 8 / 4
    assert_logits(out, tmp_path / "full", trio["base"], parts)


# ------------------------------------------------------------------------------- soups and sums

def test_soup_as_adapter(trio, tmp_path):
    """Three adapters of ranks 4 (2 on one module), 8 and 2, weights 1:2:1: modules of all three,
    of two, or of one (copied, scale w·s)."""
    adapters = [trio["task_lora"], trio["language_lora"], trio["partial_lora"]]
    lf.soup(adapters, tmp_path / "out", weights=[1, 2, 1], base=trio["base"], as_adapter=True)
    lf.soup(adapters, tmp_path / "full", weights=[1, 2, 1], base=trio["base"])
    weights = [0.25, 0.5, 0.25]

    def parts(module):
        return list(zip(weights, adapters))

    counts = assert_factors(tmp_path / "out", parts)
    assert counts["copied"] and counts["concatenated"]
    q = factors(tmp_path / "out")["model.layers.3.self_attn.q_proj"]
    assert q[0].shape[0] == 2 + 8  # the rank_pattern's 2 and the language adapter's 8
    assert_logits(tmp_path / "out", tmp_path / "full", trio["base"], parts)


@pytest.mark.parametrize("lam", [0.7, -0.5])
def test_task_arithmetic_as_adapter(trio, tmp_path, lam):
    """base + λ·Σ ΔWᵢ: the scales are λ·sᵢ, negative for λ < 0 (a negative alpha, which PEFT takes)."""
    adapters = [trio["task_lora"], trio["language_lora"]]
    lf.task_arithmetic(trio["base"], adapters, tmp_path / "out", lam=lam, as_adapter=True)
    lf.task_arithmetic(trio["base"], adapters, tmp_path / "full", lam=lam)

    def parts(module):
        return [(lam, a) for a in adapters]

    assert_factors(tmp_path / "out", parts)
    assert_logits(tmp_path / "out", tmp_path / "full", trio["base"], parts)


def test_dtype_converts_the_factors(trio, tmp_path):
    """--dtype bf16: copies become conversions (torch's rounding), concatenated A within one bf16
    ulp of the float64 product, B converted."""
    lf.merge(trio["task_lora"], trio["language_lora"], tmp_path / "out", lf.SwapConfig(**SWAP), base=trio["base"],
             dtype="bf16", as_adapter=True)
    got, task, language = factors(tmp_path / "out"), factors(trio["task_lora"]), factors(trio["language_lora"])
    assert all(a.dtype == b.dtype == torch.bfloat16 for a, b, _, _ in got.values())
    a, b, _, _ = got["model.layers.6.self_attn.k_proj"]  # a middle layer: the task adapter's, converted
    assert raw_bytes(a) == raw_bytes(task["model.layers.6.self_attn.k_proj"][0].to(torch.bfloat16))
    a, b, _, _ = got["model.layers.4.self_attn.q_proj"]  # a transition layer: both, mixed
    s_t, s_l = 8 / 4, 4 / math.sqrt(8)
    ta, tb = task["model.layers.4.self_attn.q_proj"][:2]
    la, lb = language["model.layers.4.self_attn.q_proj"][:2]
    assert ulps(a, torch.cat([0.5 * s_t * ta.double(), 0.5 * s_l * la.double()])) <= 1
    assert raw_bytes(b) == raw_bytes(torch.cat([tb.to(torch.bfloat16), lb], dim=1))


# ------------------------------------------------------------------------------- saved tensors

def test_a_saved_tensor_taken_whole_is_carried(trio, tmp_path):
    """The final norm, saved whole by the language adapter, taken whole with --non-layer language:
    copied byte for byte and listed in modules_to_save; PEFT loads it and the logits are the full
    swap's."""
    out = tmp_path / "out"
    swap(trio, out, language="norm_lora", non_layer="language")
    lf.merge(trio["task_lora"], trio["norm_lora"], tmp_path / "full", lf.SwapConfig(**SWAP, non_layer="language"),
             base=trio["base"])
    config, tensors = config_of(out), load_tensors(out)
    assert config["modules_to_save"] == ["model.norm"]
    name = PREFIX + "model.norm.weight"
    assert raw_bytes(tensors[name]) == raw_bytes(load_tensors(trio["norm_lora"])[name])
    parts = swap_parts(trio["task_lora"], trio["norm_lora"], non_layer="language")
    assert_factors(out, parts)
    saved = {"model.norm.weight": tensors[name]}
    assert_logits(out, tmp_path / "full", trio["base"], parts, saved=saved)


def test_a_saved_copy_of_the_base_is_left_out(trio, tmp_path):
    """PEFT saves the embedding it adapts beside its factors (``base_layer``); holding the base's
    values, it is the base's tensor, so averaging the non-layer tensors is exact and the output
    carries no copy of the embedding."""
    language = load_tensors(trio["language_lora"])
    assert PREFIX + "model.embed_tokens.base_layer.weight" in language
    out = tmp_path / "out"
    swap(trio, out)
    assert not any("base_layer" in name for name in load_tensors(out))
    assert "model.embed_tokens" in factors(out)


def test_a_changed_saved_embedding_taken_whole_is_carried(trio, tmp_path):
    """An embedding's saved base layer that differs from the base's (a resized or trained one) is
    carried, under its base_layer name, when the swap takes it whole (--non-layer language)."""
    changed = edited_adapter(trio["language_lora"], tmp_path / "changed")
    name = PREFIX + "model.embed_tokens.base_layer.weight"
    edit_tensor(changed, name, lambda t: t + 0.125)
    out = tmp_path / "out"
    lf.merge(trio["task_lora"], changed, out, lf.SwapConfig(**SWAP, non_layer="language"), base=trio["base"],
             as_adapter=True)
    lf.merge(trio["task_lora"], changed, tmp_path / "full", lf.SwapConfig(**SWAP, non_layer="language"),
             base=trio["base"])
    tensors = load_tensors(out)
    assert raw_bytes(tensors[name]) == raw_bytes(load_tensors(changed)[name])
    assert config_of(out)["modules_to_save"] is None
    parts = swap_parts(trio["task_lora"], changed, non_layer="language")
    assert_logits(out, tmp_path / "full", trio["base"], parts, saved={"model.embed_tokens.weight": tensors[name]})


# ------------------------------------------------------------------------------- fan_in_fan_out

def test_gpt2_fan_in_fan_out_adapters(tmp_path):
    """GPT-2's Conv1D projections (fan_in_fan_out): concatenation does not care how ΔW is laid
    out, and PEFT loads the output with the flag kept."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=8, n_head=4)).to(
        torch.bfloat16).save_pretrained(tmp_path / "base")
    task = make_adapter(tmp_path / "base", tmp_path / "t", 1, r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                        fan_in_fan_out=True)
    lang = make_adapter(tmp_path / "base", tmp_path / "l", 2, r=2, lora_alpha=2, target_modules=["c_attn"],
                        fan_in_fan_out=True)
    config = lf.SwapConfig(bottom=3, top=2)
    lf.merge(task, lang, tmp_path / "out", config, base=tmp_path / "base", as_adapter=True)
    lf.merge(task, lang, tmp_path / "full32", config, base=tmp_path / "base", dtype="f32")
    assert config_of(tmp_path / "out")["fan_in_fan_out"] is True

    def parts(module):
        layer = None if module is None or not module.startswith("transformer.h.") else int(module.split(".")[2])
        w_t, w_l = expected_weights(layer, 8, bottom=3, top=2)
        return [(w_t, task), (w_l, lang)]

    counts = assert_factors(tmp_path / "out", parts)
    assert counts["concatenated"] == 2  # c_attn of the transition layers 3 and 5
    ours = logits(peft_model(tmp_path / "base", tmp_path / "out"))
    full = full_logits(tmp_path / "full32")  # both one float32 rounding from the exact merge
    assert (ours - full).abs().max() <= 2 * F32_TOL * full.abs().max()
    assert (full - full_logits(tmp_path / "base")).abs().max() > 1000 * F32_TOL * full.abs().max()


# ------------------------------------------------------------------------------- the output

def test_recipe_card_verify_and_rebuild(trio, tmp_path):
    out = tmp_path / "out"
    r = run_cli("merge", "--task-expert", trio["task_lora"], "--language-expert", trio["language_lora"], "--base",
                trio["base"], "--lower-transition", "2", "--as-adapter", "-o", out)
    assert r.returncode == 0, r.stderr
    recipe = json.loads((out / "layerswap_recipe.json").read_text())
    assert recipe["options"]["as_adapter"] is True
    assert recipe["adapter"]["modules"] == len(factors(out))
    assert [f["file"] for f in recipe["shards"]] == ["adapter_model.safetensors"]
    assert {f["file"] for f in recipe["files"]} == {"README.md", "adapter_config.json"}
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "PeftModel.from_pretrained" in card
    assert run_cli("verify", out).returncode == 0
    rebuilt = tmp_path / "rebuilt"
    assert run_cli("merge", "--config", out / "layerswap_recipe.json", "-o", rebuilt).returncode == 0
    for name in sorted(p.name for p in out.iterdir()):
        assert (out / name).read_bytes() == (rebuilt / name).read_bytes(), name
    # a changed file is caught, as for any output
    config = out / "adapter_config.json"
    config.write_text(config.read_text().replace('"r": ', '"r":  '))
    assert run_cli("verify", out).returncode == 2


def test_dry_run_writes_nothing(trio, tmp_path):
    result = lf.run("soup", tmp_path / "out", {"model": [trio["task_lora"], trio["language_lora"]],
                                                "base": trio["base"], "as_adapter": True}, dry_run=True)
    assert result.stats is None and not (tmp_path / "out").exists()
    assert "would write 1 shards" in result.summary(tmp_path / "out")


def test_force_replaces_an_output_whole(trio, tmp_path):
    out = tmp_path / "out"
    lf.merge(trio["task_lora"], trio["language_lora"], out, base=trio["base"])
    lf.merge(trio["task_lora"], trio["language_lora"], out, base=trio["base"], as_adapter=True, force=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "layerswap_recipe.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or old directory left
    lf.verify(out)


# ------------------------------------------------------------------------------- refusals

def test_ties_refuses(trio, tmp_path):
    refused(["ties", "--base", trio["base"], "--model", trio["task_lora"], "--model", trio["language_lora"],
             "--as-adapter", "-o", tmp_path / "out"], tmp_path, "--as-adapter: ties needs every model's full delta",
            "TIES trims", "write a full model", inputs=inputs(trio))


def test_row_revert_refuses(trio, tmp_path):
    refused(["revert", "--base", trio["base"], "--model", trio["task_lora"], "--row-fraction", "0.5", "--as-adapter",
             "-o", tmp_path / "out"], tmp_path, "revert needs every model's full delta", "single rows",
             inputs=inputs(trio))


def test_layer_revert_drops_the_layers(trio, tmp_path):
    """Reverting whole layers of an adapter is exact: those layers' modules are left out."""
    lf.revert(trio["base"], trio["task_lora"], tmp_path / "out", layers="0-4", as_adapter=True)
    got, task = factors(tmp_path / "out"), factors(trio["task_lora"])
    assert set(got) == {m for m in task if layer_of(m + ".weight") >= 5}
    assert all(raw_bytes(got[m][0]) == raw_bytes(task[m][0]) for m in got)


def test_reverting_everything_refuses(trio, tmp_path):
    refused(["revert", "--base", trio["base"], "--model", trio["task_lora"], "--layers", f"0-{NUM_LAYERS - 1}",
             "--as-adapter", "-o", tmp_path / "out"], tmp_path, "leaves the base unchanged", inputs=inputs(trio))


def test_a_full_model_among_the_inputs_refuses(trio, tmp_path):
    refused(["merge", "--task-expert", trio["task"], "--language-expert", trio["language_lora"], "--base",
             trio["base"], "--as-adapter", "-o", tmp_path / "out"], tmp_path,
            "every merged model must be a LoRA adapter", "the task expert", "is a full model", inputs=inputs(trio))
    refused(["soup", "--model", trio["task"], "--model", trio["task"], "--as-adapter", "-o", tmp_path / "out"],
            tmp_path, "model 1", "is a full model", inputs=inputs(trio))


def test_adapters_of_different_bases_refuse(trio, tmp_path):
    """An adapter naming another base (here: a model of the same shapes, another checkpoint) is
    refused even with --base given: the output would be an adapter of neither."""
    other = make_llama_trio(tmp_path / "other", num_layers=NUM_LAYERS, tie=True, seed=5, roles=("base",))["base"]
    stranger = edited_adapter(trio["language_lora"], tmp_path / "stranger", base_model_name_or_path=str(other))
    refused(["merge", "--task-expert", trio["task_lora"], "--language-expert", stranger, "--base", trio["base"],
             "--as-adapter", "-o", tmp_path / "out"], tmp_path, "--as-adapter needs adapters of one base",
            "the language expert", str(other), inputs=inputs(trio))
    # the same base named two ways (a path and a copy of the directory) is one base
    copy = tmp_path / "base_copy"
    copy.mkdir()
    for f in trio["base"].iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    alias = edited_adapter(trio["language_lora"], tmp_path / "alias", base_model_name_or_path=str(copy))
    lf.merge(trio["task_lora"], alias, tmp_path / "ok", base=trio["base"], as_adapter=True)
    assert config_of(tmp_path / "ok")["base_model_name_or_path"] == str(trio["base"])


def test_blending_a_saved_tensor_refuses(trio, tmp_path):
    """The norm the adapter saves whole, averaged with the task adapter's (the base's) norm: no
    adapter holds that blend."""
    refused(["merge", "--task-expert", trio["task_lora"], "--language-expert", trio["norm_lora"], "--base",
             trio["base"], "--as-adapter", "-o", tmp_path / "out"], tmp_path,
            "the language expert saves 'model.norm.weight' whole", "blends it with the base",
            "write a full model instead", inputs=inputs(trio))


def test_fan_in_fan_out_disagreement_refuses(trio, tmp_path):
    """One adapter says fan_in_fan_out, the other not (square modules only, so both pass the base's
    shapes): one adapter config cannot say both."""
    square = make_adapter(trio["base"], tmp_path / "square", 5, r=2, lora_alpha=2, target_modules=["q_proj"])
    flipped = edited_adapter(square, tmp_path / "flipped", fan_in_fan_out=True)
    refused(["merge", "--task-expert", trio["task_lora"], "--language-expert", flipped, "--base", trio["base"],
             "--as-adapter", "-o", tmp_path / "out"], tmp_path, "the language expert sets fan_in_fan_out",
            "the task expert does not", inputs=inputs(trio))


def test_iter_merged_refuses(trio):
    with pytest.raises(ConfigError, match="as_adapter writes an adapter"):
        next(lf.iter_merged("soup", {"model": [trio["task_lora"]], "base": trio["base"], "as_adapter": True}))


# ------------------------------------------------------------------------------- the plan's rules

def _recipe(name, terms, factors=()):
    from layerswap_fast.plan import Factor, TensorRecipe, Term
    return TensorRecipe(name, "BF16", (4, 4), 0, "blend_lowrank" if factors else "blend",
                        tuple(Term(r, w) for r, w in terms), factors=tuple(Factor(*f) for f in factors))


class _Side:
    def __init__(self, replaced=None, specs=None):
        from types import SimpleNamespace
        self.lora = SimpleNamespace(deltas={}, replaced=replaced or {})
        self.specs = specs or {}


@pytest.mark.parametrize("recipe, needle", [
    (_recipe("w.weight", [("base", 0.5)]), "scales the base's 'w.weight' by 0.5"),
    (_recipe("m.weight", [("a", 1.0)]), "saves 'm.weight' as the base layer of its LoRA module, which this merge "
                                        "does not adapt"),
    (_recipe("n.weight", [("b", 1.0)], [("b", "n.lora_A.weight", "n.lora_B.weight", 1.0, False)]),
     "saves 'n.weight' whole (modules_to_save) and this merge also adds LoRA factors to it"),
    (_recipe("n.weight", [("b", 0.5), ("a", 0.5)]), "the b saves 'n.weight' whole and this merge blends it with a"),
])
def test_what_has_no_adapter_form(recipe, needle):
    """Rules no command above reaches with well-formed inputs, checked on the plan directly."""
    from layerswap_fast.plan.adapter_output import adapter_plan
    from types import SimpleNamespace
    spec = SimpleNamespace(dtype="F32", shape=(4, 4))
    sides = {"a": _Side({"m.weight": "base_model.model.m.base_layer.weight"},
                        {"base_model.model.m.base_layer.weight": spec}),
             "b": _Side({"n.weight": "base_model.model.n.weight"},
                        {"base_model.model.n.weight": spec, "n.lora_A.weight": spec, "n.lora_B.weight": spec})}
    with pytest.raises(ConfigError, match=re.escape(needle)):
        adapter_plan([recipe], sides, "base")


def test_adapters_and_base_by_hub_id(trio, tmp_path, monkeypatch):
    """Adapters and their base named by hub id (the cache only): the output names the same base,
    at the revision the cache resolved, and holds the same tensors as from local directories."""
    from support import add_hub_snapshot
    cache, commit = tmp_path / "hub", "3" * 40
    add_hub_snapshot(cache, "org/base", trio["base"], commit, ("main",))
    for repo, role in (("org/task-lora", "task_lora"), ("org/lang-lora", "language_lora")):
        edited = edited_adapter(trio[role], tmp_path / role, base_model_name_or_path="org/base")
        add_hub_snapshot(cache, repo, edited, commit, ("main",))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    lf.merge("org/task-lora", "org/lang-lora", tmp_path / "hub_out", as_adapter=True)
    swap(trio, tmp_path / "local_out", bottom=5, top=2, lower_transition=1, upper_transition=1)
    config = config_of(tmp_path / "hub_out")
    assert (config["base_model_name_or_path"], config["revision"]) == ("org/base", commit)
    hub, local = load_tensors(tmp_path / "hub_out"), load_tensors(tmp_path / "local_out")
    assert hub.keys() == local.keys() and all(raw_bytes(hub[n]) == raw_bytes(local[n]) for n in hub)
