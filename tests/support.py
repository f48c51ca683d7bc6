"""Test helpers: tiny real Llama checkpoints made with transformers, and a torch reference reader."""

from __future__ import annotations

import json
from pathlib import Path

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


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file below root: to prove that nothing was written or changed."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()} | {
            str(p.relative_to(root)) + "/": (0, 0) for p in sorted(root.rglob("*")) if p.is_dir()}
