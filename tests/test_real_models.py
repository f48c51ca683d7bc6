"""Every command on real trained models (scripts/real_models.py): SmolLM2-135M-Instruct (Llama,
tied embeddings, GQA, a chat template) and Gemma-3-270m (its own family), each a base converted
from the GGUF on PyPI and two short fine-tunes of it (Python, French).

Each output is checked against plain torch from the inputs, then loaded by transformers, which
generates from it; tied embeddings stay tied and the side files arrive byte for byte.
"""

from __future__ import annotations

import csv
import json
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import real_trio
from support import (average_mav, blend_ref, expected_weights, layer_of, load_tensors, raw_bytes, row_mav_ref,
                     swap_ref, ties_reference)

from layerswap_fast.cli import main

FAMILIES = ("smollm2", "gemma3")
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja")
Tensors = dict[str, torch.Tensor]


@pytest.fixture(scope="module", params=FAMILIES)
def real(request: pytest.FixtureRequest) -> dict[str, Path]:
    return real_trio(request.param)


@pytest.fixture(scope="module")
def tensors(real: dict[str, Path]) -> dict[str, Tensors]:
    return {role: load_tensors(real[role]) for role in ("base", "task", "language")}


def num_layers(t: Tensors) -> int:
    return 1 + max(layer for layer in map(layer_of, t) if layer is not None)


def swap(t: dict[str, Tensors], **rule) -> Tensors:
    n = num_layers(t["task"])
    return {name: swap_ref(x, t["language"][name], *expected_weights(layer_of(name), n, **rule), x.dtype)
            for name, x in t["task"].items()}


def soup(t: dict[str, Tensors], weights: list[float]) -> Tensors:
    return {name: blend_ref([t["task"][name], t["language"][name]], weights, x.dtype) for name, x in t["task"].items()}


def task_arithmetic(t: dict[str, Tensors], lam: float) -> Tensors:
    return {name: blend_ref([t["task"][name], t["language"][name], b], [lam, lam, 1 - 2 * lam], b.dtype)
            for name, b in t["base"].items()}


def ties(t: dict[str, Tensors], density: float) -> Tensors:
    return {name: ties_reference(b, [t["task"][name], t["language"][name]], density, 1.0)
            for name, b in t["base"].items()}


def revert_layers(t: dict[str, Tensors], layers: set[int]) -> Tensors:
    return {name: t["base"][name] if layer_of(name) in layers else x for name, x in t["task"].items()}


def magnitude_soup(t: dict[str, Tensors]) -> Tensors:
    inv = [1 / average_mav(t[m], t["base"]) for m in ("task", "language")]
    return soup(t, [w / sum(inv) for w in inv])


#: command (without -o), the plain-torch reference of its output
CASES: dict[str, tuple[list[str], Callable[[dict[str, Tensors]], Tensors]]] = {
    "swap-default": (["merge", "--task-expert", "{task}", "--language-expert", "{language}"], swap),
    "swap-custom": (["merge", "--task-expert", "{task}", "--language-expert", "{language}", "--bottom", "3",
                     "--top", "3", "--lower-transition", "2", "--upper-transition", "0",
                     "--transition-weights", "ramp", "--non-layer", "task"],
                    lambda t: swap(t, bottom=3, top=3, lt=2, ut=0, ramp=True, non_layer="task")),
    "soup-uniform": (["soup", "--model", "{task}", "--model", "{language}"], lambda t: soup(t, [0.5, 0.5])),
    "task-arithmetic": (["task-arithmetic", "--base", "{base}", "--model", "{task}", "--model", "{language}",
                         "--lambda", "0.7"], lambda t: task_arithmetic(t, 0.7)),
    "ties": (["ties", "--base", "{base}", "--model", "{task}", "--model", "{language}", "--density", "0.2"],
             lambda t: ties(t, 0.2)),
    "revert-layers": (["revert", "--base", "{base}", "--model", "{task}", "--layers", "0-2,10"],
                      lambda t: revert_layers(t, {0, 1, 2, 10})),
}


def run_cli(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result.output


def assert_tensors(out: Path, expected: Tensors) -> None:
    merged = load_tensors(out)
    assert set(merged) == set(expected)
    for name, want in expected.items():
        assert merged[name].dtype == want.dtype and raw_bytes(merged[name]) == raw_bytes(want), name


def assert_usable(out: Path, source: Path) -> None:
    """Side files byte for byte from ``source``; verify passes; transformers loads every weight
    (none missing, none invented: a tied model gets no lm_head) and generates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in SIDE_FILES:
        if (source / name).exists():
            assert (out / name).read_bytes() == (source / name).read_bytes(), name
    assert "ok:" in run_cli(["verify", str(out)])
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    config = json.loads((source / "config.json").read_text())
    if config.get("tie_word_embeddings", True):
        assert "lm_head.weight" not in load_tensors(out)
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("def fibonacci(n):", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 4


@pytest.mark.parametrize("case", CASES)
def test_command_on_real_models(real, tensors, tmp_path: Path, case: str) -> None:
    args, reference = CASES[case]
    out = tmp_path / "out"
    run_cli([a.format(**real) for a in args] + ["-o", str(out)])
    assert_tensors(out, reference(tensors))
    assert_usable(out, real["task"])


def test_magnitude_soup_on_real_models(real, tensors, tmp_path: Path) -> None:
    """The weights are ∝ 1 / average MAV against the base (float32 kernels against a float64
    reference: close, not equal); the bytes are exactly the blend with the weights used."""
    out = tmp_path / "out"
    run_cli(["soup", "--model", str(real["task"]), "--model", str(real["language"]), "--weights", "magnitude",
             "--base", str(real["base"]), "-o", str(out)])
    used = json.loads((out / "layerswap_recipe.json").read_text())["config"]["weights"]
    inv = [1 / average_mav(tensors[m], tensors["base"]) for m in ("task", "language")]
    assert used == pytest.approx([w / sum(inv) for w in inv], rel=1e-5)
    assert_tensors(out, soup(tensors, used))
    assert_usable(out, real["task"])


def test_analyze_and_its_suggestion_on_real_models(real, tensors, tmp_path: Path) -> None:
    """Every tensor's mean and max row MAV against float64 torch (the kernels accumulate in float32);
    the suggested merge command runs as printed and gives a usable model."""
    stats = tmp_path / "stats"
    printed = run_cli(["analyze", "--base", str(real["base"]), "--language-expert", str(real["language"]),
                       "--task-expert", str(real["task"]), "-o", str(stats), "--suggest"])
    with open(stats / "mav.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 2 * len(tensors["base"])
    for line in lines:
        ref = row_mav_ref(tensors[line["expert"]][line["tensor"]], tensors["base"][line["tensor"]])
        assert int(line["rows"]) == ref.numel(), line
        assert float(line["mean_row_mav"]) == pytest.approx(ref.mean().item(), rel=1e-4, abs=1e-9), line
        assert float(line["max_row_mav"]) == pytest.approx(ref.max().item(), rel=1e-4, abs=1e-9), line
    summary = {e["name"]: e for e in json.loads((stats / "summary.json").read_text())["experts"]}
    for role in ("task", "language"):
        assert summary[role]["average_mav"] == pytest.approx(average_mav(tensors[role], tensors["base"]), rel=1e-5)
    assert (stats / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    command = shlex.split(printed.strip().splitlines()[-1])
    assert command[:4] == ["layerswap-fast", "merge", "--task-expert", str(real["task"])], command
    out = tmp_path / "out"
    run_cli(command[1:] + ["-o", str(out)])
    flags = dict(zip(command[2::2], command[3::2]))
    assert_tensors(out, swap(tensors, bottom=int(flags["--bottom"]), top=int(flags["--top"]),
                             lt=int(flags["--lower-transition"]), ut=int(flags["--upper-transition"])))
    assert_usable(out, real["task"])
