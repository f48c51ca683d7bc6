"""Row-MAV analysis of LoRA adapters (issue 17, part 4): an adapter stands for base + s·B·A, so its
row MAVs are those of s·B·A, formed in row chunks; tensors it saves whole are measured against
the base as usual; tensors it leaves alone have row MAV 0. Magnitude weights, the heatmap,
``--suggest`` and the merges that take magnitude weights work with adapters, side by side with
full experts.

The adapters are made by PEFT itself on a tiny Llama (B initialised non-zero). The references are
float64, from the files (safetensors, json) and the definitions, never through the package.

**Tolerance.** The package forms ``s·B·A`` in float32 (factors converted exactly, the scale
rounded to float32 and folded into B, a length-r dot product), so each element of ΔW is within
``(r + 2)·2⁻²⁴ · (s·|B|·|A|)ᵢⱼ`` of the exact value (first order), and it sums ``|ΔW|`` per row in
float32 blocks of at most 64 elements (at most ``63·2⁻²⁴`` relative, the terms being
non-negative), the blocks in float64. A row MAV is therefore within ``(r + 3)·2⁻²⁴`` times the
row mean of ``s·|B|·|A|`` plus ``64·2⁻²⁴`` of the float64 reference (one unit of margin each for
the second-order terms): a per-row bound derived from the arithmetic, below 1e-5 relative here
(the errors seen are below 3e-7), checked row by row.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from support import (expected_weights, layer_of, load_tensors, lora_abs_products, lora_deltas, make_adapter,
                     make_llama_trio, raw_bytes, row_mav_ref, snapshot, ulps)

import layerswap_fast as lf
from layerswap_fast.analysis import analyze, load_stats, lowrank, magnitude_weights_for, suggest_swap
from layerswap_fast.errors import ConfigError

pytest.importorskip("peft")

NUM_LAYERS = 8
U32 = 2.0 ** -24
#: the backend's row-MAV kernel (float32 per chunk) against float64, as in test_analysis
REL = 1e-5
ATTENTION_AND_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A bf16 base with tied embeddings, a full task expert (base + noise), and adapters of the
    base: ``task_lora`` (rank 4, attention and MLP, a rank_pattern and an alpha_pattern, float32
    factors), ``language_lora`` (rank 8, rsLoRA, bf16 factors, q/v/up and the embedding: a
    transposed update), and ``saving_lora`` (o_proj, the final norm saved whole and changed, and
    the embedding saved whole beside its own factors)."""
    root = tmp_path_factory.mktemp("analyze-adapters")
    paths = make_llama_trio(root, num_layers=NUM_LAYERS, tie=True, roles=("base", "task"))
    paths["task_lora"] = make_adapter(paths["base"], root / "task_lora", 1, r=4, lora_alpha=8,
                                      target_modules=ATTENTION_AND_MLP,
                                      rank_pattern={"layers.3.self_attn.q_proj": 2}, alpha_pattern={"down_proj": 3})
    paths["language_lora"] = make_adapter(paths["base"], root / "language_lora", 2, dtype=torch.bfloat16, r=8,
                                          lora_alpha=4, use_rslora=True,
                                          target_modules=["q_proj", "v_proj", "up_proj", "embed_tokens"])
    made = make_adapter(paths["base"], root / "saving_made", 3, r=2, lora_alpha=4,
                        target_modules=["o_proj", "embed_tokens"], modules_to_save=["model.norm"])
    tensors = load_file(made / "adapter_model.safetensors")
    gen = torch.Generator().manual_seed(7)
    norm = "base_model.model.model.norm.weight"
    tensors[norm] = tensors[norm] + 0.02 * torch.randn(tensors[norm].shape, generator=gen)
    embed = load_tensors(paths["base"])["model.embed_tokens.weight"].float()
    # PEFT saves the adapted embedding's base layer beside its factors; make it differ from the base
    tensors["base_model.model.model.embed_tokens.base_layer.weight"] = (
        embed + 0.01 * torch.randn(embed.shape, generator=gen))
    paths["saving_lora"] = root / "saving_lora"
    paths["saving_lora"].mkdir()
    (paths["saving_lora"] / "adapter_config.json").write_bytes((made / "adapter_config.json").read_bytes())
    save_file(tensors, paths["saving_lora"] / "adapter_model.safetensors", metadata={"format": "pt"})
    return paths


@pytest.fixture(scope="module")
def base(models) -> dict[str, torch.Tensor]:
    return load_tensors(models["base"])


_REFS: dict[Path, dict[str, torch.Tensor]] = {}


def deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW in float64 per module (tests/support.py ``lora_deltas``), read once per adapter."""
    if adapter not in _REFS:
        _REFS[adapter] = lora_deltas(adapter)
    return _REFS[adapter]


def saved_tensors(adapter: Path) -> dict[str, torch.Tensor]:
    """The tensors the adapter saves whole, by the base tensor's name (PEFT's ``base_layer`` of
    an adapted module is that module's weight)."""
    return {name.removeprefix("base_model.model.").replace(".base_layer.", "."): t
            for name, t in load_tensors(adapter).items() if ".lora_" not in name}


def reference_rows(adapter: Path, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float64 row MAVs of the model ``base + ΔW`` (a tensor the adapter saves whole: that tensor,
    plus ΔW when it has factors too) against ``base``, for every tensor of the base."""
    saved = saved_tensors(adapter)
    rows = {}
    for name, w in base.items():
        diff = (saved[name].double() - w.double()) if name in saved else torch.zeros(w.shape, dtype=torch.float64)
        diff = diff + deltas(adapter).get(name, 0.0)
        n = w.shape[0] if w.dim() >= 2 else 1
        rows[name] = diff.abs().reshape(n, -1).mean(1)
    return rows


def lowrank_bound(adapter: Path, name: str, want: torch.Tensor) -> torch.Tensor:
    """The per-row tolerance of a low-rank row MAV (the module docstring): ``(r + 3)·2⁻²⁴`` times
    the row mean of ``s·|B|·|A|``, plus ``64·2⁻²⁴`` of the reference row MAV ``want``."""
    r, product = lora_abs_products(adapter)[name]
    return (r + 3) * U32 * product.mean(1) + 64 * U32 * want


def assert_adapter_rows(stats, expert: str, adapter: Path, base: dict[str, torch.Tensor]) -> None:
    """Every tensor's row MAVs against the float64 reference: low-rank ones within the derived
    bound, tensors saved whole within the kernel's tolerance, untouched ones exactly 0."""
    ref = reference_rows(adapter, base)
    products = lora_abs_products(adapter)
    got_tensors = {t.tensor: t for t in stats.experts[expert].tensors}
    assert sorted(got_tensors) == sorted(base)
    saved = saved_tensors(adapter)
    for name, want in ref.items():
        got = torch.from_numpy(stats.row_mavs(expert, name))
        assert got.shape == want.shape and got_tensors[name].rows == want.numel(), name
        if name in products:
            bound = lowrank_bound(adapter, name, want)
            if name in saved:  # (R − W) in float32, then + ΔW: two more roundings of each element
                r_minus_w = saved[name].double() - base[name].double()
                bound = bound + 2 * U32 * (r_minus_w.abs().mean(1) + want)
            assert bool(((got - want).abs() <= bound).all()), (name, float(((got - want).abs() / bound).max()))
            assert float((bound / want).max()) < 1e-5, name  # the bound is tight, not vacuous
            assert float(want.min()) > 0, name
        elif name in saved:
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=REL, atol=0)
            assert float(want.min()) > 0, name
        else:
            assert bool((got == 0).all()), name
            assert got_tensors[name].mean_row_mav == 0.0 == got_tensors[name].max_row_mav, name
        assert math.isclose(got_tensors[name].mean_row_mav, float(got.mean()), rel_tol=1e-12, abs_tol=0)
        assert got_tensors[name].max_row_mav == float(got.max())


def average_mav_ref(adapter_or_full: Path, base: dict[str, torch.Tensor], full: bool = False) -> float:
    """The paper's average MAV from float64 references: the mean over all rows of all tensors."""
    if full:
        expert = load_tensors(adapter_or_full)
        rows = [row_mav_ref(expert[n], w) for n, w in base.items()]
    else:
        rows = list(reference_rows(adapter_or_full, base).values())
    return torch.cat(rows).mean().item()


def average_mav_bound(adapter: Path, base: dict[str, torch.Tensor]) -> float:
    """The tolerance of an adapter's average MAV: the mean over all rows of the per-row bounds
    (tensors it saves whole: REL of theirs; untouched ones: 0)."""
    ref = reference_rows(adapter, base)
    products = lora_abs_products(adapter)
    bounds = [lowrank_bound(adapter, n, ref[n]) + 2 * U32 * ref[n] if n in products else REL * ref[n]
              for n in base]
    return torch.cat(bounds).mean().item()


def magnitude_ref(averages: dict[str, float]) -> dict[str, float]:
    inv = {n: 1.0 / a for n, a in averages.items()}
    return {n: v / math.fsum(inv.values()) for n, v in inv.items()}


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layerswap_fast.cli", *map(str, args)], capture_output=True,
                          text=True)


# ------------------------------------------------------------------------------- row MAVs

def test_row_mavs_of_adapters_match_the_float64_reference(models, base, caplog):
    with caplog.at_level("WARNING", logger="layerswap_fast"):
        stats = analyze(models["base"], {"task": models["task_lora"], "language": models["language_lora"]},
                        rows=True, device="cpu")
    assert stats.num_layers == NUM_LAYERS and stats.skipped == []
    assert_adapter_rows(stats, "task", models["task_lora"], base)
    assert_adapter_rows(stats, "language", models["language_lora"], base)
    # what each adapter does, counted over the analysed tensors
    n = len(base)
    task_modules = len(deltas(models["task_lora"]))
    assert task_modules == 7 * NUM_LAYERS
    assert stats.experts["task"].adapter == {"low_rank": task_modules, "replaced": 0, "untouched": n - task_modules}
    assert stats.experts["language"].adapter == {"low_rank": 3 * NUM_LAYERS + 1, "replaced": 0,
                                                 "untouched": n - 3 * NUM_LAYERS - 1}
    # what the pass read: the adapters' tensors, and of the base only the embedding, which PEFT
    # saves whole (equal to the base's) beside the language adapter's embedding factors
    adapter_bytes = sum(t.numel() * t.element_size() for a in ("task_lora", "language_lora")
                        for t in load_tensors(models[a]).values())
    embed = base["model.embed_tokens.weight"]
    assert "model.embed_tokens.weight" in saved_tensors(models["language_lora"])
    assert stats.bytes_read == adapter_bytes + embed.numel() * embed.element_size()
    # the dtypes the adapter keeps its tensors in: the factors', the base's where it changes nothing
    assert stats.experts["task"].dtypes == {"F32": task_modules, "BF16": n - task_modules}
    # a low-rank update is the change itself: no note on rounding, whatever the factors' dtype
    assert not [r for r in caplog.records if "differ in dtype" in r.getMessage()]
    # the untouched kinds of the language adapter are zero in the heatmap's cells
    matrix = stats.kind_matrix("language")
    assert (matrix[:, [1, 3, 4, 6]] == 0).all() and (matrix[:, [0, 2, 5]] > 0).all()  # k o gate down / q v up
    for name, adapter in (("task", models["task_lora"]), ("language", models["language_lora"])):
        want = average_mav_ref(adapter, base)
        assert abs(stats.average_mav(name) - want) <= average_mav_bound(adapter, base), name


def test_tensors_saved_whole_and_beside_their_factors(models, base, caplog):
    """modules_to_save (the final norm): measured like a full expert's tensor; an embedding saved
    whole (R) beside its factors: the row MAVs of R − W + s·B·A. Only the tensors the adapter
    stores whole in another dtype than the base earn the dtype note."""
    with caplog.at_level("WARNING", logger="layerswap_fast"):
        stats = analyze(models["base"], {"saving": models["saving_lora"]}, rows=True, device="cpu")
    assert_adapter_rows(stats, "saving", models["saving_lora"], base)
    assert stats.experts["saving"].adapter == {"low_rank": NUM_LAYERS + 1, "replaced": 1,
                                               "untouched": len(base) - NUM_LAYERS - 2}
    assert "model.embed_tokens.weight" in saved_tensors(models["saving_lora"])
    assert "model.embed_tokens.weight" in deltas(models["saving_lora"])
    # every tensor of the adapter once, and the base's norm and embedding, each compared once
    nbytes = {n: t.numel() * t.element_size() for n, t in base.items()}
    adapter_bytes = sum(t.numel() * t.element_size() for t in load_tensors(models["saving_lora"]).values())
    assert stats.bytes_read == adapter_bytes + nbytes["model.norm.weight"] + nbytes["model.embed_tokens.weight"]
    notes = [r.getMessage() for r in caplog.records if "differ in dtype" in r.getMessage()]
    assert len(notes) == 1 and "expert 'saving' is F32 where the base is BF16 (2 tensors)" in notes[0]


@pytest.mark.parametrize("transposed", [False, True])
def test_memory_holds_a_chunk_never_a_whole_delta(tmp_path, transposed):
    """A 2048 × 4096 float32 ΔW (32 MiB) of a rank-2 adapter (``fan_in_fan_out``: the transposed
    update): the pass allocates a 2 MiB chunk, as much to compare it with, and the factors, never
    the whole ΔW; the row MAVs still match the float64 reference within the bound."""
    rows, cols, r = 2048, 4096, 2
    name = "model.layers.0.mlp.up_proj.weight"
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    save_file({name: torch.zeros(rows, cols)}, base_dir / "model.safetensors", metadata={"format": "pt"})
    (base_dir / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    gen = torch.Generator().manual_seed(0)
    out_dim, in_dim = (cols, rows) if transposed else (rows, cols)  # ΔW = s·(B·A)ᵀ under fan_in_fan_out
    a, b = torch.randn(r, in_dim, generator=gen), torch.randn(out_dim, r, generator=gen)
    adapter = tmp_path / "lora"
    adapter.mkdir()
    module = "base_model.model." + name.removesuffix(".weight")
    save_file({f"{module}.lora_A.weight": a, f"{module}.lora_B.weight": b}, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 3, "fan_in_fan_out": transposed}))
    tracemalloc.start()
    try:
        stats = analyze(base_dir, {"lora": adapter}, rows=True, device="cpu")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB: a whole ΔW is 32 MiB"
    delta = 1.5 * (b.double() @ a.double())
    delta = delta.T if transposed else delta
    want = delta.abs().mean(1)
    product = 1.5 * (b.double().abs() @ a.double().abs())
    bound = (r + 3) * U32 * (product.T if transposed else product).mean(1) + 64 * U32 * want
    got = torch.from_numpy(stats.row_mavs("lora", name))
    assert got.shape == (rows,) and bool(((got - want).abs() <= bound).all())


def test_row_chunks_of_a_few_rows_give_the_same_statistics(models, base, monkeypatch):
    """Chunks that do not divide the rows (3 rows of 32, 1 row of 96 for the embedding's
    transposed update): the same row MAVs within the bound."""
    monkeypatch.setattr(lowrank, "ROW_CHUNK_ELEMS", 100)
    stats = analyze(models["base"], {"language": models["language_lora"]}, rows=True, device="cpu")
    assert_adapter_rows(stats, "language", models["language_lora"], base)


# ------------------------------------------------------------------------------- side by side

def test_full_expert_and_adapter_side_by_side(models, base, tmp_path):
    """The follow-up paper's full-vs-LoRA comparison in one pass: each expert's numbers are
    those of analysing it alone, and the adapter's row MAVs agree with those of the full model it
    makes (merged in float32) within that model's rounding."""
    stats = analyze(models["base"], {"full": models["task"], "lora": models["task_lora"]}, tmp_path / "stats",
                    rows=True, device="cpu")
    full = load_tensors(models["task"])
    for name, w in base.items():
        np.testing.assert_allclose(stats.row_mavs("full", name), row_mav_ref(full[name], w).numpy(), rtol=REL)
    assert_adapter_rows(stats, "lora", models["task_lora"], base)
    alone = analyze(models["base"], {"lora": models["task_lora"]}, rows=True, device="cpu")
    for name in base:
        assert np.array_equal(alone.row_mavs("lora", name), stats.row_mavs("lora", name)), name
    summary = json.loads((tmp_path / "stats" / "summary.json").read_text())
    kinds = {e["name"]: e["adapter"] for e in summary["experts"]}
    assert kinds["full"] is None and kinds["lora"]["low_rank"] == 7 * NUM_LAYERS
    loaded = load_stats(tmp_path / "stats")
    assert loaded.experts["lora"].is_adapter and not loaded.experts["full"].is_adapter
    assert loaded.experts["lora"].adapter == stats.experts["lora"].adapter

    # the same update as a full float32 model: W + ΔW rounded once; its row MAVs (kernel) against
    # the adapter's, within that rounding (2⁻²⁴ of |W + ΔW| per element) and both tolerances
    lf.task_arithmetic(models["base"], [models["task_lora"]], tmp_path / "merged", dtype="f32")
    both = analyze(models["base"], {"merged": tmp_path / "merged", "lora": models["task_lora"]}, rows=True,
                   device="cpu")
    ref = reference_rows(models["task_lora"], base)
    worst = 0.0
    for name, w in base.items():
        merged_t = w.double() + deltas(models["task_lora"]).get(name, 0.0)
        n = w.shape[0] if w.dim() >= 2 else 1
        rounding = 2 * U32 * merged_t.abs().reshape(n, -1).mean(1)
        diff = torch.from_numpy(both.row_mavs("merged", name) - both.row_mavs("lora", name)).abs()
        assert bool((diff <= rounding + REL * ref[name] + 1e-12).all()), name
        worst = max(worst, float(diff.max()))
    assert worst > 0  # two paths, not the same numbers copied


# ------------------------------------------------------------------------------- files, CLI, suggestion

def test_cli_analyze_of_two_adapters_with_suggest(models, base, tmp_path):
    out = tmp_path / "stats"
    result = _cli("analyze", "--base", models["base"], "--task-expert", models["task_lora"], "--language-expert",
                  models["language_lora"], "-o", out, "--suggest", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "heatmap.png").stat().st_size > 1000
    lines = result.stdout.splitlines()
    task_modules = 7 * NUM_LAYERS
    assert (f"task_lora is a LoRA adapter: {task_modules} tensors updated by s·B·A, 0 saved whole, "
            f"{len(base) - task_modules} left to the base (row MAV 0)") in lines
    with open(out / "mav.csv", newline="") as f:
        body = list(csv.reader(f))[1:]
    by = {(e, t): float(mean) for e, t, _, _, _, mean, _ in body}
    assert by[("language_lora", "model.layers.0.self_attn.k_proj.weight")] == 0.0
    assert by[("language_lora", "model.layers.0.self_attn.q_proj.weight")] > 0
    stats = load_stats(out)
    config, reasons = suggest_swap(stats, "language_lora", "task_lora", NUM_LAYERS)
    assert f"  {reasons[0]}" in lines and f"  {reasons[1]}" in lines
    # the suggested merge names the base (adapters need it) and runs as printed
    argv = shlex.split(lines[-1])
    assert argv[:2] == ["layerswap-fast", "merge"] and argv[argv.index("--base") + 1] == str(models["base"].resolve())
    argv[argv.index("-o") + 1] = str(tmp_path / "merged")
    merged = _cli(*argv[1:])
    assert merged.returncode == 0, merged.stderr
    assert list((tmp_path / "merged").glob("*.safetensors"))


def test_adapter_as_base_is_refused(models, tmp_path):
    before = snapshot(tmp_path)
    result = _cli("analyze", "--base", models["task_lora"], "--expert", models["language_lora"], "-o",
                  tmp_path / "stats")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert f"the base {models['task_lora']} is a LoRA adapter: the base must be a full model" in lines[0]
    assert f"(this adapter was trained on {models['base']})" in lines[0]
    assert snapshot(tmp_path) == before and not (tmp_path / "stats").exists()
    with pytest.raises(ConfigError, match="is a LoRA adapter: the base must be a full model"):
        analyze(models["task_lora"], [models["task"]], device="cpu")


# ------------------------------------------------------------------------------- magnitude weights

def _magnitude_from_reference(models, base, names=("task_lora", "language_lora")) -> tuple[list[float], float]:
    """Magnitude weights of the adapters from the float64 reference, and their tolerance: a
    weight 1/aᵢ / Σ 1/aⱼ moves by at most 2·max relative error of the averages, relatively."""
    averages = {n: average_mav_ref(models[n], base) for n in names}
    rel = max(average_mav_bound(models[n], base) / averages[n] for n in names)
    weights = magnitude_ref(averages)
    return [weights[n] for n in names], 2.05 * rel


def test_magnitude_weights_of_adapters(models, base, tmp_path):
    want, rel = _magnitude_from_reference(models, base)
    assert abs(want[0] - 0.5) > 0.05  # the two adapters moved the weights by different amounts
    got = magnitude_weights_for(models["base"], [models["task_lora"], models["language_lora"]], device="cpu")
    for g, w in zip(got, want):
        assert abs(g - w) <= rel * w
    assert math.isclose(sum(got), 1.0, rel_tol=1e-12)
    # from a statistics directory: the adapters found again by path
    analyze(models["base"], [models["language_lora"], models["task_lora"]], tmp_path / "stats", device="cpu")
    again = magnitude_weights_for(models["base"], [models["task_lora"], models["language_lora"]], tmp_path / "stats")
    assert again == pytest.approx(got, rel=1e-12)
    with pytest.raises(ConfigError, match="is a LoRA adapter: the base must be a full model"):
        magnitude_weights_for(models["task_lora"], [models["language_lora"]], tmp_path / "stats")


def _assert_within_one_ulp(out: Path, base: dict[str, torch.Tensor], parts) -> int:
    """Every output tensor within one ulp of base + Σ wᵢ·ΔWᵢ (float64; ``parts(name)`` gives the
    (w, adapter) pairs); a tensor no adapter changes is the base's, byte for byte. Returns the
    largest distance in ulps seen."""
    merged = load_tensors(out)
    assert set(merged) == set(base)
    worst = 0
    for name, t in merged.items():
        terms = [(w, deltas(a)[name]) for w, a in parts(name) if w != 0.0 and name in deltas(a)]
        if not terms:
            assert raw_bytes(t) == raw_bytes(base[name]), name
            continue
        want = base[name].double() + sum(w * d for w, d in terms)
        assert t.dtype == base[name].dtype, name
        worst = max(worst, ulps(t, want))
    return worst


def test_soup_with_magnitude_weights_of_two_adapters(models, base, tmp_path):
    (w_task, w_lang), _ = _magnitude_from_reference(models, base)
    out = tmp_path / "soup"
    result = _cli("soup", "--model", models["task_lora"], "--model", models["language_lora"], "--weights",
                  "magnitude", "--base", models["base"], "-o", out, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert _assert_within_one_ulp(out, base, lambda n: [(w_task, models["task_lora"]),
                                                        (w_lang, models["language_lora"])]) <= 1
    # the same check with uniform weights fails: the test tells the weights apart
    merged = load_tensors(out)
    uniform = [ulps(t, base[n].double() + 0.5 * deltas(models["task_lora"]).get(n, 0.0)
                    + 0.5 * deltas(models["language_lora"]).get(n, 0.0)) for n, t in merged.items()]
    assert max(uniform) > 1


def test_swap_with_magnitude_transition_and_non_layer_weights(models, base, tmp_path):
    (w_task, w_lang), _ = _magnitude_from_reference(models, base)
    out = tmp_path / "swap"
    config = lf.SwapConfig(bottom=2, top=1, transition_weights="magnitude", non_layer="magnitude")
    lf.merge(models["task_lora"], models["language_lora"], out, config, base=models["base"], device="cpu")

    def parts(name):
        layer = layer_of(name)
        plain = expected_weights(layer, NUM_LAYERS, bottom=2, top=1)
        blended = layer is None or plain == (0.5, 0.5)
        w_t, w_l = (w_task, w_lang) if blended else plain
        return [(w_t, models["task_lora"]), (w_l, models["language_lora"])]

    assert _assert_within_one_ulp(out, base, parts) <= 1
    recipe = json.loads((out / "layerswap_recipe.json").read_text())
    assert recipe["options"]["transition_weights"] == "magnitude"


def test_cuda_backend_with_adapters_matches_cpu(models, base):
    """The CUDA path (CudaBackend, here on CPU tensors through Triton's interpreter) gets only the
    experts that store a tensor whole; the adapters' updates are formed as on the CPU."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a CUDA device is present; run on the device instead")
    from layerswap_fast.engine.cuda import CudaBackend
    experts = {"full": models["task"], "saving": models["saving_lora"], "lora": models["task_lora"]}
    cpu = analyze(models["base"], experts, rows=True, device="cpu")
    with CudaBackend(device="cpu") as blender:
        gpu = analyze(models["base"], experts, rows=True, backend=blender)
    for name in experts:
        for tensor in base:
            np.testing.assert_allclose(gpu.row_mavs(name, tensor), cpu.row_mavs(name, tensor), rtol=1e-6, atol=0)
