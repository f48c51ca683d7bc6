"""Assign output tensors to shards and compute every shard's header before any byte is written."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import prod

from .dtypes import DTYPE_SIZES
from .errors import ConfigError
from .plan import TensorRecipe

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """``5GB`` → 5·10⁹ (decimal, as Hugging Face counts shard sizes), ``512MiB`` → 512·2²⁰."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(text), re.IGNORECASE)
        if m is None:
            raise ConfigError(f"cannot read size {text!r}: use a number with a unit, like 5GB or 500MB")
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if value <= 0:
        raise ConfigError(f"size must be positive, got {text!r}")
    return value


@dataclass(frozen=True)
class PlacedTensor:
    """A recipe with its place in the shard's data buffer (offsets relative to the buffer)."""

    recipe: TensorRecipe
    begin: int
    nbytes: int


@dataclass(frozen=True)
class ShardLayout:
    filename: str
    header: bytes  # the JSON header, space-padded so the data buffer starts 8-byte aligned
    tensors: tuple[PlacedTensor, ...]

    @property
    def data_start(self) -> int:
        return 8 + len(self.header)

    @property
    def data_size(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def file_size(self) -> int:
        return self.data_start + self.data_size

    def prefix(self) -> bytes:
        """The 8-byte little-endian header length followed by the header."""
        return len(self.header).to_bytes(8, "little") + self.header


def tensor_nbytes(recipe: TensorRecipe) -> int:
    return prod(recipe.shape) * DTYPE_SIZES[recipe.dtype]


def group_into_shards(recipes: Sequence[TensorRecipe], shard_size: int) -> list[list[TensorRecipe]]:
    """Greedy, in plan order: a new shard starts when the next tensor would overflow this one.
    A tensor larger than ``shard_size`` gets a shard of its own."""
    groups: list[list[TensorRecipe]] = [[]]
    used = 0
    for recipe in recipes:
        n = tensor_nbytes(recipe)
        if groups[-1] and used + n > shard_size:
            groups.append([])
            used = 0
        groups[-1].append(recipe)
        used += n
    return [g for g in groups if g] or [[]]


def shard_filename(i: int, count: int) -> str:
    return f"model-{i + 1:05d}-of-{count:05d}.safetensors"


def build_header(tensors: Sequence[PlacedTensor], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    for t in tensors:
        header[t.recipe.name] = {"dtype": t.recipe.dtype, "shape": list(t.recipe.shape),
                                 "data_offsets": [t.begin, t.begin + t.nbytes]}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return raw + b" " * (-(8 + len(raw)) % 8)


def layout_shards(recipes: Sequence[TensorRecipe], shard_size: int,
                  metadata: Mapping[str, str]) -> list[ShardLayout]:
    groups = group_into_shards(recipes, shard_size)
    shards = []
    for i, group in enumerate(groups):
        placed, position = [], 0
        for recipe in group:
            n = tensor_nbytes(recipe)
            placed.append(PlacedTensor(recipe, position, n))
            position += n
        shards.append(ShardLayout(shard_filename(i, len(groups)), build_header(placed, metadata), tuple(placed)))
    return shards


def index_json(shards: Sequence[ShardLayout]) -> dict[str, object]:
    return {
        "metadata": {"total_size": sum(s.data_size for s in shards)},
        "weight_map": {t.recipe.name: s.filename for s in shards for t in s.tensors},
    }
