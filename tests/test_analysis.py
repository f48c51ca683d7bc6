"""The fine-tuning delta analysis: row MAVs against a torch reference, the output files, the
heatmap, the swap suggestion, magnitude weights from a stats directory, errors and the CLI."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from support import load_tensors, row_mav_ref, snapshot

from layerswap_fast import analysis, open_checkpoint, synthetic
from layerswap_fast.engine.backends import CpuBackend
from layerswap_fast.analysis import (
    CSV_COLUMNS,
    DeltaStats,
    ExpertStats,
    StatsError,
    TensorStat,
    analyze,
    load_stats,
    magnitude_weights_for,
    suggest_swap,
)
from layerswap_fast.cli.analyze import analyze as analyze_cmd
from layerswap_fast.cli.analyze import merge_command
from layerswap_fast.errors import ConfigError, MismatchError, OutputError
from layerswap_fast.analysis.heatmap import HeatmapFigure, layer_tick_step, prepare_in_background, render_heatmap
from layerswap_fast.plan.layers import FIGURE_KINDS, classify

REL = 1e-5


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return synthetic.make_trio(tmp_path_factory.mktemp("trio"), "tiny")


@pytest.fixture(scope="module")
def reference(trio: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    """Per expert and tensor, the float64 row MAVs computed by torch."""
    base = load_tensors(trio["base"])
    out: dict[str, dict[str, torch.Tensor]] = {}
    for role in ("task", "language"):
        expert = load_tensors(trio[role])
        out[role] = {}
        for name, b in base.items():
            out[role][name] = row_mav_ref(expert[name], b)
    return out


@pytest.fixture(scope="module")
def analysed(trio: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[DeltaStats, Path]:
    out = tmp_path_factory.mktemp("stats") / "out"
    stats = analyze(trio["base"], [trio["task"], trio["language"]], out, rows=True, device="cpu")
    return stats, out


def _close(a: float, b: float, rel: float = REL) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def _kept(c, num_layers: int) -> int:
    """How many middle layers the task expert keeps unblended under the swap ``c``."""
    return num_layers - c.bottom - c.lower_transition - c.top - c.upper_transition


def _command(stats: DeltaStats, config, language: str = "language", task: str = "task") -> str:
    """The merge command line ``analyze --suggest`` prints for ``config``."""
    return merge_command(config, stats.experts[task].source.path, stats.experts[language].source.path)


def test_row_mavs_match_torch(trio, reference):
    progress = []
    stats = analyze(trio["base"], [trio["task"], trio["language"]], rows=True, device="cpu",
                    progress=lambda n, total: progress.append((n, total)))
    assert stats.names == ["task", "language"]
    assert stats.num_layers == 16 and stats.skipped == []
    assert sum(n for n, _ in progress) == progress[-1][1] == stats.bytes_read
    for role, tensors in reference.items():
        got = {t.tensor: t for t in stats.experts[role].tensors}
        assert sorted(got) == sorted(tensors)  # every tensor
        assert list(got) == list(open_checkpoint(trio["base"]).specs)  # in the base's file order
        for name, ref in tensors.items():
            t = got[name]
            assert t.rows == ref.numel()
            assert _close(t.mean_row_mav, ref.mean().item()), name
            assert _close(t.max_row_mav, ref.max().item()), name
            np.testing.assert_allclose(stats.row_mavs(role, name), ref.numpy(), rtol=REL, atol=1e-12)
            info = classify(name)
            assert (t.layer, t.kind) == (info.layer, info.kind)
        # average MAV: the mean of the row MAVs over all rows of all parameters
        all_rows = torch.cat(list(tensors.values()))
        assert _close(stats.average_mav(role), all_rows.mean().item())
    inv = {r: 1 / torch.cat(list(reference[r].values())).mean().item() for r in reference}
    weights = stats.magnitude_weights()
    assert _close(sum(weights.values()), 1.0, 1e-12)
    for r in reference:
        assert _close(weights[r], inv[r] / sum(inv.values()))
    # the language expert moved less, so it weighs more
    assert weights["language"] > weights["task"]


def test_output_files(trio, reference, analysed):
    stats, out = analysed
    assert sorted(p.name for p in out.iterdir()) == ["heatmap.png", "mav.csv", "rows", "summary.json"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left
    with open(out / "mav.csv", newline="") as f:
        lines = list(csv.reader(f))
    assert tuple(lines[0]) == CSV_COLUMNS
    body = lines[1:]
    n_tensors = len(reference["task"])
    assert len(body) == 2 * n_tensors
    assert {(r[0], r[1]) for r in body} == {(e, t) for e in ("task", "language") for t in reference["task"]}
    for expert, tensor, layer, kind, rows, mean, mx in body:
        info = classify(tensor)
        assert layer == ("" if info.layer is None else str(info.layer))
        assert kind == info.kind
        ref = reference[expert][tensor]
        assert int(rows) == ref.numel()
        assert _close(float(mean), ref.mean().item()) and _close(float(mx), ref.max().item())
    assert {r[1] for r in body if r[2] == ""} == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}

    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_layers"] == 16
    assert summary["base"]["path"] == str(trio["base"].resolve())
    by_name = {e["name"]: e for e in summary["experts"]}
    for role in ("task", "language"):
        e = by_name[role]
        assert e["path"] == str(trio[role].resolve())
        assert len(e["fingerprint"]) == 64 and len(e["content_sample"]) == 64
        assert _close(e["average_mav"], torch.cat(list(reference[role].values())).mean().item())
        assert e["magnitude_weight"] == summary["magnitude_weights"][role]
    assert _close(sum(summary["magnitude_weights"].values()), 1.0, 1e-12)
    # experts fine-tuned from one base share the header fingerprint; the content sample differs
    assert by_name["task"]["content_sample"] != by_name["language"]["content_sample"]

    for role in ("task", "language"):
        files = sorted((out / "rows" / role).glob("*.npy"))
        assert len(files) == n_tensors
        for name, ref in reference[role].items():
            rows = np.load(out / "rows" / role / f"{name}.npy")
            assert rows.dtype in (np.float32, np.float64)
            np.testing.assert_allclose(rows, ref.numpy(), rtol=REL, atol=1e-12)

    import matplotlib.image
    img = matplotlib.image.imread(out / "heatmap.png")
    assert img.ndim == 3 and img.shape[0] >= 300 and img.shape[1] >= 400
    assert 5_000 < (out / "heatmap.png").stat().st_size < 300_000


def test_load_stats_roundtrip_and_checks(analysed, tmp_path):
    stats, out = analysed
    loaded = load_stats(out)
    assert loaded.names == stats.names and loaded.num_layers == stats.num_layers
    for name in stats.names:
        assert loaded.experts[name].tensors == stats.experts[name].tensors
        assert loaded.average_mav(name) == stats.average_mav(name)
        assert loaded.experts[name].source == stats.experts[name].source
    assert loaded.magnitude_weights() == stats.magnitude_weights()
    np.testing.assert_array_equal(loaded.row_mavs("task", "model.norm.weight"),
                                  stats.row_mavs("task", "model.norm.weight"))

    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    text = (broken / "mav.csv").read_text()
    (broken / "mav.csv").write_text(text[: len(text) // 2])
    with pytest.raises(StatsError, match="checksum"):
        load_stats(broken)
    (broken / "summary.json").unlink()
    with pytest.raises(StatsError, match="summary.json"):
        load_stats(broken)
    with pytest.raises(StatsError, match="does not exist"):
        load_stats(tmp_path / "nowhere")


def test_magnitude_weights_for(trio, analysed, tmp_path):
    stats, out = analysed
    direct = stats.magnitude_weights()
    got = magnitude_weights_for(trio["base"], [trio["language"], trio["task"]], out)
    assert got == pytest.approx([direct["language"], direct["task"]], rel=1e-12)
    computed = magnitude_weights_for(trio["base"], [trio["language"], trio["task"]], device="cpu")
    assert computed == pytest.approx(got, rel=1e-9)
    # found by content when the directory moved
    import shutil
    moved = tmp_path / "moved-task"
    shutil.copytree(trio["task"], moved)
    assert magnitude_weights_for(None, [trio["language"], moved], out) == pytest.approx(
        [direct["language"], direct["task"]], rel=1e-12)
    # not covered: another expert
    other = synthetic.make_trio(tmp_path / "other", "tiny", with_base=False, experts=("task-b",))
    with pytest.raises(StatsError, match="do not cover"):
        magnitude_weights_for(None, [other["task-b"], trio["task"]], out)
    # computed against another base
    with pytest.raises(StatsError, match="base"):
        magnitude_weights_for(trio["task"], [trio["language"]], out)


def _synthetic_stats(num_layers: int, experts=("language", "task")) -> DeltaStats:
    """Stats shaped like synthetic.py's deltas: MAV of N(0, std) is std * sqrt(2 / pi)."""
    shape = synthetic.ModelShape("s", num_layers, 64, 172, 4, 2, 512)
    mav = {"strong": synthetic.STRONG_STD * math.sqrt(2 / math.pi),
           "weak": synthetic.WEAK_STD * math.sqrt(2 / math.pi)}
    out = {}
    for e in experts:
        tensors = []
        for name, shp in synthetic.tensor_layout(shape):
            info = classify(name)
            m = mav[synthetic.delta_level(e, name, num_layers)]
            tensors.append(TensorStat(name, info.layer, info.kind, shp[0] if len(shp) > 1 else 1, m, 1.3 * m))
        out[e] = ExpertStats(e, tensors)
    return DeltaStats(out, num_layers)


@pytest.mark.parametrize("num_layers", [16, 22, 32, 80])
def test_suggestion_recovers_synthetic_pattern(num_layers):
    stats = _synthetic_stats(num_layers)
    s, reasons = suggest_swap(stats, "language", "task", num_layers)
    bottom, top = synthetic.language_layers(num_layers)
    assert (s.bottom, s.top) == (len(bottom), len(top))
    assert (s.lower_transition, s.upper_transition) == (1, 1)
    assert _kept(s, num_layers) >= num_layers / 2
    if num_layers == 32:  # the paper's choice for 32-layer Llama 3.1 8B
        assert (s.bottom, s.top) == (5, 2)
    assert len(reasons) == 2 and reasons[0].startswith(f"bottom {s.bottom}")
    assert reasons[1].startswith(f"top {s.top}")


def test_suggestion_on_tiny_trio(trio, analysed):
    stats, _ = analysed
    s, _ = suggest_swap(stats, "language", "task", 16)
    bottom, top = synthetic.language_layers(16)
    assert s.bottom >= 1 and s.top >= 1 and s.bottom + s.top <= 16 // 2
    assert (s.bottom, s.top) == (len(bottom), len(top))
    cmd = _command(stats, s)
    assert cmd.startswith("layerswap-fast merge --task-expert ")
    assert f"--language-expert {trio['language'].resolve()}" in cmd
    assert f"--bottom {s.bottom} --top {s.top} --lower-transition 1 --upper-transition 1" in cmd
    with pytest.raises(ConfigError, match="no expert named"):
        suggest_swap(stats, "swahili", "task", 16)
    with pytest.raises(ConfigError, match="16-layer"):
        suggest_swap(stats, "language", "task", 32)


def test_suggestion_clamps_to_keep_the_middle():
    L = 20
    tensors = {"language": [], "task": []}
    for layer in range(L):
        for kind in FIGURE_KINDS:
            # the language expert moved all but the four middle layers, the task expert is flat
            lang = 0.0 if layer in (8, 9, 10, 11) else 2.0
            tensors["language"].append(TensorStat(f"model.layers.{layer}.{kind}", layer, kind, 4, lang, lang))
            tensors["task"].append(TensorStat(f"model.layers.{layer}.{kind}", layer, kind, 4, 1.0, 1.0))
    stats = DeltaStats({n: ExpertStats(n, t) for n, t in tensors.items()}, L)
    s, reasons = suggest_swap(stats, "language", "task", L)
    assert s.bottom + s.top + s.lower_transition + s.upper_transition <= L - math.ceil(L / 2)
    assert s.bottom >= 1 and s.top >= 1 and _kept(s, L) >= L / 2
    assert "shortened" in " ".join(reasons)


def test_heatmap_80_layers(tmp_path):
    stats = _synthetic_stats(80)
    info = render_heatmap(stats, tmp_path / "h80.png")
    assert info.panels == 2 and info.axes == 3  # two panels and the colorbar
    assert info.tick_step == 2 and layer_tick_step(32) == 1 and layer_tick_step(160) == 4
    import matplotlib.image
    img = matplotlib.image.imread(tmp_path / "h80.png")
    assert img.shape[0] > 1000 and img.shape[0] > img.shape[1]  # tall: height grows with layers
    assert (tmp_path / "h80.png").stat().st_size < 300_000
    # a kind with several tensors in one layer (Mixtral experts) is averaged
    t = [TensorStat(f"model.layers.0.block_sparse_moe.experts.{i}.w1.weight", 0, "gate", 2, float(i), float(i))
         for i in range(4)]
    mix = DeltaStats({"m": ExpertStats("m", t)}, 1)
    assert mix.kind_matrix("m")[0, FIGURE_KINDS.index("gate")] == pytest.approx(1.5)
    assert render_heatmap(mix, tmp_path / "mix.png").panels == 1



def test_heatmap_laid_out_before_its_data_shows_the_data(tmp_path):
    """``analyze`` lays the figure out and draws it (placeholder zeros, scale 0..1) while its pass
    runs, and sets the data afterwards: every cell of the PNG has the colormap's colour at
    value / vmax on the one shared scale."""
    import matplotlib
    import matplotlib.image
    stats = _synthetic_stats(6)
    figure = prepare_in_background(list(stats.experts), 6)()
    assert isinstance(figure, HeatmapFigure) and figure.fits(stats)
    info = figure.save(stats, tmp_path / "h.png")
    img = matplotlib.image.imread(tmp_path / "h.png")
    cmap = matplotlib.colormaps["viridis"]
    values = {n: stats.kind_matrix(n) for n in stats.experts}
    assert info.vmax == max(float(m.max()) for m in values.values())
    for ax, name in zip(figure.axes, stats.experts):
        for layer in (0, 3, 5):
            for k in range(len(FIGURE_KINDS)):
                x, y = ax.transData.transform((k + 0.25, layer))  # clear of the attention | MLP line
                pixel = img[int(round(img.shape[0] - y)), int(round(x)), :3]
                assert np.allclose(pixel, cmap(values[name][layer, k] / info.vmax)[:3], atol=2 / 255), (name, layer, k)


@pytest.mark.parametrize("num_layers,experts,kinds", [
    (6, ("language", "task"), FIGURE_KINDS), (80, ("language",), FIGURE_KINDS),
    (3, ("language", "task", "task2"), ("q", "up"))])
def test_a_prepared_heatmap_saves_what_a_full_drawing_of_it_gives(tmp_path, num_layers, experts, kinds):
    """save draws only what the data changes over the figure drawn beforehand; the PNG is the one
    matplotlib writes drawing the whole figure afresh (savefig), byte for byte, also saved twice
    with other data (scale, titles and colorbar ticks change)."""
    first = _synthetic_stats(num_layers, experts)
    second = DeltaStats({n: ExpertStats(n, [TensorStat(t.tensor, t.layer, t.kind, t.rows, 7e-5 * (i + 1) * t.mean_row_mav
                                                        / first.experts[n].average_mav, 0.0)
                                            for t in e.tensors])
                         for i, (n, e) in enumerate(first.experts.items())}, num_layers)
    figure = HeatmapFigure(list(experts), num_layers, kinds)
    for k, stats in enumerate((first, second)):
        figure.save(stats, tmp_path / f"prepared-{k}.png")
        figure.fig.savefig(tmp_path / f"full-{k}.png", dpi=figure.dpi)
        assert (tmp_path / f"prepared-{k}.png").read_bytes() == (tmp_path / f"full-{k}.png").read_bytes()
    assert (tmp_path / "prepared-0.png").read_bytes() != (tmp_path / "prepared-1.png").read_bytes()


def test_a_prepared_heatmap_of_other_experts_is_not_used(tmp_path):
    """write_stats draws afresh when the figure made beforehand has other panels or layers, and a
    figure that could not be built (no experts) is None."""
    stats = _synthetic_stats(4)
    render_heatmap(stats, tmp_path / "want.png")
    for other in (HeatmapFigure(["task"], 4), HeatmapFigure(list(stats.experts), 5)):
        assert not other.fits(stats)
        out = tmp_path / f"{len(other.names)}-{other.num_layers}"
        out.mkdir()
        analysis.write_stats(stats, out, other)
        assert (out / "heatmap.png").read_bytes() == (tmp_path / "want.png").read_bytes()
    assert prepare_in_background([], 4)() is None

def test_the_heatmap_is_built_yielding_the_gil_and_the_interval_is_restored(monkeypatch):
    """While the figure is built beside the pass the GIL changes hands every 0.1 ms at most (the
    pass waits for it after every tensor); with two builds at once the interval comes back only
    when the last ends, and the user's own interval is what comes back."""
    import sys
    import threading

    from layerswap_fast.analysis import heatmap

    seen: list[float] = []
    release = threading.Event()

    class Recording:
        def __init__(self, names, num_layers):
            seen.append(sys.getswitchinterval())
            release.wait(10)

    monkeypatch.setattr(heatmap, "HeatmapFigure", Recording)
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.003)
        first = prepare_in_background(["a"], 2)
        second = prepare_in_background(["b"], 2)
        release.set()
        assert isinstance(first(), Recording) and isinstance(second(), Recording)
        assert len(seen) == 2 and all(s <= 1e-4 for s in seen)
        assert sys.getswitchinterval() == pytest.approx(0.003)
    finally:
        sys.setswitchinterval(before)


# ------------------------------------------------------------------------------------------------
# hand-made checkpoints

def _save(path: Path, tensors: dict[str, torch.Tensor], layers: int | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    if layers is not None:
        (path / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))
    return path


def _small(seed: int, **changes: torch.Tensor) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {
        "model.embed_tokens.weight": torch.randn(10, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(6, 8, generator=g),  # F32
        "model.layers.0.input_layernorm.weight": torch.randn(8, generator=g).to(torch.float16),
        "model.layers.1.self_attn.q_proj.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "model.layers.1.conv.weight": torch.randn(3, 2, 4, generator=g).to(torch.bfloat16),  # 3-D
        "model.layers.1.empty.weight": torch.zeros(0, 8, dtype=torch.bfloat16),
        "model.layers.1.positions": torch.arange(8, dtype=torch.int64),
    }
    t.update(changes)
    return t


def test_small_checkpoints_dtypes_shapes_and_skips(tmp_path):
    base_t = _small(0)
    exp_t = {k: (v + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(7)).to(v.dtype)
                 if v.is_floating_point() else v) for k, v in base_t.items()}
    base = _save(tmp_path / "base", base_t, 2)
    exp = _save(tmp_path / "exp", exp_t, 2)
    stats = analyze(base, {"mine": exp}, rows=True, device="cpu")
    assert dict(stats.skipped).keys() == {"model.layers.1.empty.weight", "model.layers.1.positions"}
    got = {t.tensor: t for t in stats.experts["mine"].tensors}
    for name, b in base_t.items():
        if name in dict(stats.skipped):
            continue
        ref = row_mav_ref(exp_t[name], b)
        assert got[name].rows == (b.shape[0] if b.dim() >= 2 else 1) == ref.numel()
        assert _close(got[name].mean_row_mav, ref.mean().item()) and _close(got[name].max_row_mav, ref.max().item())
        np.testing.assert_allclose(stats.row_mavs("mine", name), ref.numpy(), rtol=REL)


def test_gpu_backend_glue_matches_cpu(tmp_path, monkeypatch):
    """The CUDA path's code (CudaBackend) run on CPU tensors through Triton's interpreter."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a CUDA device is present; the GPU tests cover CudaBackend")
    from layerswap_fast.engine.cuda import CudaBackend
    base_t = _small(0)
    base = _save(tmp_path / "base", base_t, 2)
    e1 = _save(tmp_path / "e1", _small(1), 2)
    e2 = _save(tmp_path / "e2", _small(2), 2)
    cpu = analyze(base, [e1, e2], device="cpu")
    with CudaBackend(device="cpu", chunk_elems=4) as blender:  # rows longer than a chunk, too
        gpu = analyze(base, [e1, e2], backend=blender)
    for name in cpu.names:
        for a, b in zip(cpu.experts[name].tensors, gpu.experts[name].tensors):
            assert a.tensor == b.tensor and a.rows == b.rows
            assert _close(a.mean_row_mav, b.mean_row_mav, 1e-6) and _close(a.max_row_mav, b.max_row_mav, 1e-6)


def test_device_cuda_without_gpu_is_a_config_error(trio, monkeypatch):
    monkeypatch.setattr("layerswap_fast.engine.backends.cuda_present", lambda: False)
    with pytest.raises(ConfigError, match="cuda"):
        analyze(trio["base"], [trio["task"]], device="cuda")
    with pytest.raises(ConfigError, match="device"):
        analyze(trio["base"], [trio["task"]], device="tpu")


def test_expert_names():
    assert analysis.expert_names(["a/task", "b/task", "c/lang", "d/task"]) == [
        ("task", Path("a/task")), ("task-2", Path("b/task")), ("lang", Path("c/lang")), ("task-3", Path("d/task"))]
    assert analysis.expert_names({"x": "a"}) == [("x", Path("a"))]
    snap = "hub/models--org--Llama-swh/snapshots/0123abc"
    assert analysis.expert_names([snap]) == [("Llama-swh", Path(snap))]
    with pytest.raises(ConfigError):
        analysis.expert_names({"a/b": "p"})


def test_mismatched_shape_names_the_tensor_and_writes_nothing(tmp_path):
    base = _save(tmp_path / "base", _small(0), 2)
    bad = _save(tmp_path / "bad", _small(1, **{"model.layers.0.mlp.up_proj.weight": torch.randn(7, 8)}), 2)
    before = snapshot(tmp_path)
    with pytest.raises(MismatchError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*\[7, 8\].*\[6, 8\]"):
        analyze(base, [bad], tmp_path / "out", device="cpu")
    assert snapshot(tmp_path) == before
    missing = _small(1)
    del missing["model.layers.1.conv.weight"]
    miss = _save(tmp_path / "miss", missing, 2)
    with pytest.raises(MismatchError, match=r"no tensor 'model\.layers\.1\.conv\.weight'"):
        analyze(base, [miss], tmp_path / "out", device="cpu")
    extra = _save(tmp_path / "extra", _small(1, **{"model.layers.1.extra.weight": torch.zeros(2)}), 2)
    with pytest.raises(MismatchError, match="extra"):
        analyze(base, [extra], tmp_path / "out", device="cpu")
    three = _save(tmp_path / "three", _small(1), 3)  # config says 3 layers
    with pytest.raises(MismatchError, match="3 layers"):
        analyze(base, [three], tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_existing_output_and_force(trio, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="already exists"):
        analyze(trio["base"], [trio["task"]], out, device="cpu")
    assert (out / "keep.txt").read_text() == "mine"
    analyze(trio["base"], [trio["task"]], out, device="cpu", force=True)
    assert sorted(p.name for p in out.iterdir()) == ["heatmap.png", "mav.csv", "summary.json"]
    with pytest.raises(OutputError, match="is the input"):
        analyze(trio["base"], [trio["task"]], trio["task"], device="cpu", force=True)


def test_failure_during_the_pass_leaves_nothing(trio, tmp_path):
    class Boom:
        calls = 0

        def row_mav_file(self, *args):
            Boom.calls += 1
            if Boom.calls > 5:
                raise OutputError("disk on fire")
            return CpuBackend(1).row_mav_file(*args)

    with pytest.raises(OutputError, match="fire"):
        analyze(trio["base"], [trio["task"]], tmp_path / "out", rows=True, backend=Boom())
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# the CLI command

def test_cli_analyze_and_suggest(trio, tmp_path):
    out = tmp_path / "stats"
    args = ["--base", str(trio["base"]), "--expert", str(trio["language"]), "--expert", str(trio["task"]),
            "-o", str(out), "--suggest", "--device", "cpu", "--threads", "2"]
    result = CliRunner().invoke(analyze_cmd, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("analyzed 2 expert(s)")
    assert any(line.split()[:1] == ["language"] and len(line.split()) == 3 for line in lines)
    assert (out / "heatmap.png").is_file() and (out / "summary.json").is_file()
    stats = load_stats(out)
    s, reasons = suggest_swap(stats, "language", "task", 16)
    assert f"  {reasons[0]}" in lines and f"  {reasons[1]}" in lines
    assert lines[-1] == _command(stats, s)
    assert f"{stats.magnitude_weights()['language']:.4f}" in result.output

    again = CliRunner().invoke(analyze_cmd, args)
    assert isinstance(again.exception, OutputError)
    forced = CliRunner().invoke(analyze_cmd, [*args, "--force", "--rows"])
    assert forced.exit_code == 0 and (out / "rows" / "task").is_dir()

    roles = CliRunner().invoke(analyze_cmd, ["--base", str(trio["base"]), "--task-expert", str(trio["task"]),
                                             "--language-expert", str(trio["language"]), "-o", str(tmp_path / "r"),
                                             "--suggest", "--device", "cpu"])
    assert roles.exit_code == 0, roles.output
    assert roles.output.splitlines()[-1] == _command(stats, s)

    three = CliRunner().invoke(analyze_cmd, ["--base", str(trio["base"]), "--expert", str(trio["task"]),
                                             "-o", str(tmp_path / "x"), "--suggest"])
    assert isinstance(three.exception, ConfigError) and not (tmp_path / "x").exists()
    assert CliRunner().invoke(analyze_cmd, ["--help"]).exit_code == 0


def test_cli_group_prints_error_line(trio, tmp_path):
    from layerswap_fast.cli import main
    out = tmp_path / "o"
    out.mkdir()
    result = CliRunner().invoke(main, ["analyze", "--base", str(trio["base"]), "--expert", str(trio["task"]),
                                       "-o", str(out)])
    assert result.exit_code == 2
    assert "error: output" in result.output


def test_the_package_exports_the_analysis_lazily() -> None:
    import subprocess
    import sys

    import layerswap_fast as ls
    from layerswap_fast import analysis
    assert ls.analyze is analysis.analyze and ls.load_stats is analysis.load_stats
    code = "import sys, layerswap_fast; print('numpy' in sys.modules)"  # merge must not pay for numpy
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
