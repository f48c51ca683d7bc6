"""Test helpers: tiny real Llama checkpoints made with transformers, and a torch reference reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open


def make_llama_trio(root: Path, *, num_layers: int = 12, tie: bool = False, dtype: torch.dtype = torch.bfloat16,
                    shard: str = "40KB", seed: int = 0, hidden: int = 32,
                    roles: tuple[str, ...] = ("base", "task", "language")) -> dict[str, Path]:
    """A base and experts (base + different noise each), saved by ``save_pretrained`` (sharded)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    paths = {}
    for i, role in enumerate(roles):
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(base_state[name])
                if role != "base":
                    gen = torch.Generator().manual_seed(seed * 100 + i)
                    param.add_(torch.randn(param.shape, generator=gen).to(dtype) * 0.01)
        paths[role] = root / role
        model.save_pretrained(paths[role], max_shard_size=shard, safe_serialization=True)
    return paths


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, read with the safetensors library."""
    index = path / "model.safetensors.index.json"
    files = (sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
             if index.exists() else sorted(path.glob("*.safetensors")))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                out[name] = handle.get_tensor(name)
    return out


def assert_same_shards(a: Path, *others: Path) -> None:
    """Checkpoint directories ``a`` and ``others`` hold the same, non-empty set of shard files,
    byte for byte."""
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names, f"no shards in {a}"
    for b in others:
        assert sorted(p.name for p in b.glob("*.safetensors")) == names, (a, b)
        for name in names:
            assert (a / name).read_bytes() == (b / name).read_bytes(), (b, name)


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file below root: to prove that nothing was written or changed."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()} | {
            str(p.relative_to(root)) + "/": (0, 0) for p in sorted(root.rglob("*")) if p.is_dir()}


# ---- helpers shared by the core's tests (bit patterns of float tensors) --------------------------

TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def raw(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(INT_VIEW[t.dtype]).numpy()


def from_raw(buf, dtype: str) -> torch.Tensor:
    arr = np.frombuffer(buf, dtype=np.int32 if dtype == "F32" else np.int16)
    return torch.from_numpy(arr.copy()).view(TORCH[dtype])


def assert_same(got: torch.Tensor, ref: torch.Tensor, what: object = None) -> None:
    """Bit-identical except that NaN only has to be NaN (torch's NaN encodings vary by path)."""
    where = f"{what}: " if what is not None else ""
    assert got.dtype == ref.dtype and got.shape == ref.shape
    gn, rn = torch.isnan(got.float()), torch.isnan(ref.float())
    assert torch.equal(gn, rn), f"{where}NaN positions differ at {torch.nonzero(gn != rn)[:5].tolist()}"
    g, r = got.view(INT_VIEW[got.dtype]), ref.view(INT_VIEW[ref.dtype])
    bad = (g != r) & ~gn
    if bad.any():
        i = int(torch.nonzero(bad)[0])
        raise AssertionError(f"{where}{int(bad.sum())} elements differ; first at {i}: got {got[i].item()!r} "
                             f"(0x{int(g[i]) & 0xFFFFFFFF:x}), expected {ref[i].item()!r} "
                             f"(0x{int(r[i]) & 0xFFFFFFFF:x})")


def one_line(e: BaseException) -> str:
    s = str(e)
    assert "\n" not in s and s
    return s
