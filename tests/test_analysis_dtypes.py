"""`analyze` says, once, when an expert is stored in another dtype than its base: its row MAVs then
carry the coarser dtype's rounding, which the kernels (computing in float32) cannot tell from
fine-tuning. The statistics record the dtypes compared."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from layerswap_fast.analysis import analyze, load_stats
from layerswap_fast.synthetic import make_trio

NOTE = "the inputs differ in dtype"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same synthetic base and experts stored in F32, BF16 and F16."""
    root = tmp_path_factory.mktemp("dtypes")
    paths = {}
    for dtype in ("F32", "BF16", "F16"):
        trio = make_trio(root / dtype, "tiny", dtype=dtype, num_layers=4)
        paths |= {f"{role}-{dtype}": p for role, p in trio.items()}
    return paths


def notes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "layerswap_fast" and NOTE in r.getMessage()]


def test_a_bf16_expert_against_an_f32_base_is_noted_once(models: dict[str, Path], tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="layerswap_fast"):
        stats = analyze(models["base-F32"], {"task": models["task-BF16"], "language": models["language-BF16"],
                                             "same": models["task-F32"]}, tmp_path / "stats")
    n = len(stats.experts["task"].tensors)
    assert notes(caplog) == [
        f"{NOTE}: expert 'task' is BF16 where the base is F32 ({n} tensors); expert 'language' is BF16 where "
        f"the base is F32 ({n} tensors). The row MAVs compare them in float32 (F32), so values below the "
        f"rounding of the coarser dtype (BF16: 2^-8 ≈ 3.9e-03 of each weight's magnitude) are noise, not "
        f"fine-tuning"]
    summary = json.loads((tmp_path / "stats" / "summary.json").read_text())
    assert summary["computed_in"] == "F32" and summary["base"]["dtypes"] == {"F32": n}
    assert {e["name"]: e["dtypes"] for e in summary["experts"]} == {
        "task": {"BF16": n}, "language": {"BF16": n}, "same": {"F32": n}}
    loaded = load_stats(tmp_path / "stats")
    assert loaded.base_dtypes == {"F32": n} and loaded.experts["task"].dtypes == {"BF16": n}


def test_matching_dtypes_say_nothing(models: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="layerswap_fast"):
        stats = analyze(models["base-BF16"], [models["task-BF16"], models["language-BF16"]])
    assert notes(caplog) == []
    assert stats.base_dtypes == {"BF16": len(stats.experts["task"].tensors)}


def test_the_coarser_dtype_is_named(models: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    """F16 has the finer rounding, BF16 the coarser, whichever of them the base is."""
    with caplog.at_level(logging.WARNING, logger="layerswap_fast"):
        analyze(models["base-BF16"], {"task": models["task-F16"]})
    [note] = notes(caplog)
    assert "expert 'task' is F16 where the base is BF16" in note and "(BF16: 2^-8 ≈ 3.9e-03 " in note
    assert "F16: 2^-11" not in note


def test_the_command_line_shows_it_once(models: dict[str, Path], tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "layerswap_fast.cli", "analyze", "--base", str(models["base-F32"]),
                        "--expert", str(models["task-BF16"]), "--expert", str(models["language-BF16"]),
                        "-o", str(tmp_path / "stats")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    lines = [line for line in p.stderr.splitlines() if NOTE in line]
    assert len(lines) == 1 and lines[0].startswith(f"note: {NOTE}: expert 'task' is BF16 where the base is F32"), \
        p.stderr
