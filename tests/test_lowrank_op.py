"""The ``blend_lowrank`` op's blocks, pieces and workers: the test models are small, so the block
and piece sizes are shrunk here to make every tensor take several uneven blocks and pieces; the
output must not depend on how many workers share them, and stays within one ulp of float64.
(The fused kernel itself, with odd shapes and its errors: tests/test_lowrank_kernel.py.)

References come from the definitions (``support.lora_deltas``), not from the package.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from layerswap_fast import _core
from layerswap_fast import synthetic as syn
from layerswap_fast.engine import ops

torch = pytest.importorskip("torch")
from support import expected_weights, layer_of, load_tensors, lora_deltas, raw_bytes, ulps  # noqa: E402

import layerswap_fast as lf  # noqa: E402

LAYERS = 6


@pytest.fixture(scope="module")
def trio(tmp_path_factory) -> dict[str, Path]:
    """A tiny f32 base (6 layers); a task adapter (rsLoRA, bf16 factors, a rank_pattern) and a
    language adapter that also updates the embedding (its factors stored transposed)."""
    root = tmp_path_factory.mktemp("lowrank")
    base = syn.write_model(root / "base", "tiny", dtype="F32", num_layers=LAYERS)
    task = syn.write_adapter(root / "task", "tiny", role="task", rank=4, use_rslora=True, dtype="BF16",
                             num_layers=LAYERS, rank_pattern={"q_proj": 3})
    language = syn.write_adapter(root / "language", "tiny", role="language", rank=6, num_layers=LAYERS,
                                 target_modules=[*syn.LINEAR_MODULES, "embed_tokens"])
    return {"base": base, "task": task, "language": language}


@pytest.fixture
def small_blocks(monkeypatch):
    # 5 rows of 64 columns per block, 17 rows (of 2-byte output) per piece: blocks and pieces
    # end unevenly, and the 172-row MLP matrices take 11 pieces
    monkeypatch.setattr(ops, "LOWRANK_BLOCK_ELEMS", 5 * 64)
    monkeypatch.setattr(ops, "PIECE_BYTES", 17 * 64 * 4)


def merged(trio, out: Path, threads: int, dtype: str | None = None) -> dict[str, torch.Tensor]:
    lf.merge(trio["task"], trio["language"], out, lf.SwapConfig(bottom=2, top=1), base=trio["base"],
             threads=threads, dtype=dtype)
    return load_tensors(out)


@pytest.mark.parametrize("dtype", [None, "BF16"], ids=["f32 out", "bf16 out"])
def test_workers_blocks_and_pieces_do_not_change_the_bytes(trio, tmp_path, small_blocks, monkeypatch, dtype):
    one = merged(trio, tmp_path / "one", threads=1, dtype=dtype)
    calls = []
    fused = _core.blend_lowrank_file
    monkeypatch.setattr(_core, "blend_lowrank_file", lambda *a, **k: calls.append((a[8], a[9], k)) or fused(*a, **k))
    three = merged(trio, tmp_path / "three", threads=3, dtype=dtype)
    # several blocks per call (so several workers) and several pieces per tensor
    assert any(rows > 5 and k["threads"] == 3 and k["chunk_elems"] == 5 * 64 for rows, cols, k in calls)
    assert any(rows < 17 for rows, cols, k in calls)
    assert set(one) == set(three)
    for name in one:
        assert raw_bytes(one[name]) == raw_bytes(three[name]), name
    base = load_tensors(trio["base"])
    task, language = lora_deltas(trio["task"]), lora_deltas(trio["language"])
    assert "model.embed_tokens.weight" in language
    for name, t in three.items():
        w_t, w_l = expected_weights(layer_of(name), LAYERS, bottom=2, top=1)
        want = base[name].double() + w_t * task.get(name, 0.0) + w_l * language.get(name, 0.0)
        if t.dtype == torch.bfloat16:
            assert ulps(t, want) <= 1, name
        else:  # float32 sums of float32 products: a few roundings at the inputs' magnitude
            assert float((t.double() - want).abs().max()) <= 8 * 2**-24 * float(base[name].abs().max()), name
