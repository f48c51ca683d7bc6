"""The engine's GPU path: a merge through the Triton backend gives the CPU backend's bytes.

Without a GPU the backend runs on CPU tensors under TRITON_INTERPRET=1 (set in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import layerswap_fast as ls
from layerswap_fast.cli import main
from support import assert_same_shards, make_llama_trio

gpu = pytest.importorskip("layerswap_fast.engine.cuda")


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_llama_trio(tmp_path_factory.mktemp("gpumerge"), num_layers=12, shard="30KB")


@pytest.mark.parametrize("dtype", [None, "f16", "f32"])
def test_triton_backend_merge_equals_cpu_merge(trio: dict[str, Path], tmp_path: Path, dtype: str | None) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = ls.SwapConfig(bottom=3, top=2, lower_transition=2, upper_transition=2, transition_weights="ramp")
    ls.merge(trio["task"], trio["language"], tmp_path / "cpu", cfg, dtype=dtype, device="cpu")
    with gpu.CudaBackend(device=device, max_gpu_bytes=64 << 10) as blender:  # several chunks per tensor
        ls.merge(trio["task"], trio["language"], tmp_path / "gpu", cfg, dtype=dtype, blender=blender)
    assert_same_shards(tmp_path / "cpu", tmp_path / "gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_device_cuda_without_a_gpu_is_a_clear_error(trio: dict[str, Path], tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["merge", "--task-expert", str(trio["task"]), "--language-expert",
                                  str(trio["language"]), "-o", str(tmp_path / "out"), "--device", "cuda"])
    assert r.exit_code == 2
    assert r.output == "error: --device cuda was asked for but no CUDA device (or no torch/triton) is available\n"
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
