"""Assign output tensors to shards and compute every shard's header before any byte is written."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path

from ..dtypes import DTYPE_SIZES
from ..plan import TensorRecipe

_PAGE = 4096
SourceOffset = Callable[[TensorRecipe], int | None]  # a copied tensor's byte offset in its input file

@dataclass(frozen=True)
class PlacedTensor:
    """A recipe with its place in the shard's data buffer (offsets relative to the buffer)."""

    recipe: TensorRecipe
    begin: int
    nbytes: int


@dataclass(frozen=True)
class ShardLayout:
    filename: str
    header: bytes  # the JSON header, space-padded so the data buffer starts where build_header says
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


def group_into_shards(recipes: Sequence[TensorRecipe], shard_size: int, source_offset: SourceOffset | None = None,
                      block: int = _PAGE) -> list[list[TensorRecipe]]:
    """Greedy, in plan order: a new shard starts when the next tensor would overflow this one, or
    when it is a large copied tensor that could not sit at its source's offset within a ``block``
    (:func:`copy_phase`) beside the large copied tensors already in it, so that every one of
    them can be cloned. A tensor larger than ``shard_size`` gets a shard of its own."""
    groups: list[list[TensorRecipe]] = [[]]
    used, phase = 0, None
    for recipe in recipes:
        n = tensor_nbytes(recipe)
        mine = copy_phase(recipe, used, n, source_offset, block)
        if groups[-1] and (used + n > shard_size or None not in (mine, phase) and mine != phase):
            groups.append([])
            used, phase = 0, None
            mine = copy_phase(recipe, 0, n, source_offset, block)
        phase = phase if phase is not None else mine
        groups[-1].append(recipe)
        used += n
    return [g for g in groups if g] or [[]]


#: copied tensors of fewer blocks than this never start a shard of their own
SPLIT_BLOCKS = 16


def copy_phase(recipe: TensorRecipe, begin: int, nbytes: int, source_offset: SourceOffset | None,
               block: int) -> int | None:
    """Where in a block the data buffer must start for a large copied tensor placed at ``begin``
    to sit at its source's offset within a block; None for other tensors (and for sources not
    8-byte aligned, which no header can match)."""
    src = source_offset(recipe) if source_offset is not None and nbytes >= SPLIT_BLOCKS * block else None
    if src is None or (src - begin) % 8:
        return None
    return (src - begin) % block


def shard_filename(i: int, count: int) -> str:
    return f"model-{i + 1:05d}-of-{count:05d}.safetensors"


def page_phase(tensors: Sequence[PlacedTensor], source_offset: SourceOffset | None, block: int = _PAGE) -> int | None:
    """Where in a ``block`` the data buffer should start so that the most copied bytes sit at the
    same place in their block as in their input file: a filesystem that shares extents clones
    only whole blocks at the same offset in both files, and the kernel copies whole pages ~25%
    faster than pages straddling two. None when nothing is copied (or only from inputs not 8-byte
    aligned)."""
    if source_offset is None:
        return None
    weight: Counter[int] = Counter()
    for t in tensors:
        src = source_offset(t.recipe)
        if src is not None:
            weight[(src - t.begin) % block] += t.nbytes
    aligned = [(n, -phase) for phase, n in weight.items() if phase % 8 == 0]
    return -max(aligned)[1] if aligned else None


def build_header(tensors: Sequence[PlacedTensor], metadata: Mapping[str, str], phase: int | None = None,
                 block: int = _PAGE) -> bytes:
    """The JSON header, padded with spaces (as the format allows) so that the data buffer starts
    at ``phase`` within a ``block``, or else at the next multiple of 8."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    for t in tensors:
        header[t.recipe.name] = {"dtype": t.recipe.dtype, "shape": list(t.recipe.shape),
                                 "data_offsets": [t.begin, t.begin + t.nbytes]}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    pad = -(8 + len(raw)) % 8 if phase is None else (phase - 8 - len(raw)) % block
    return raw + b" " * pad


@dataclass(frozen=True)
class ReusableShard:
    """An input shard every tensor of which the output takes unchanged from that same input: the
    output can use the whole file (linked or cloned) instead of writing it again."""

    role: str
    source: Path
    names: tuple[str, ...]
    size: int
    data_size: int


@dataclass(frozen=True)
class ReusedShard:
    """A slot of the output filled by a whole input file; it keeps that file's own header."""

    filename: str
    reuse: ReusableShard

    @property
    def file_size(self) -> int:
        return self.reuse.size

    @property
    def data_size(self) -> int:
        return self.reuse.data_size

    @property
    def names(self) -> tuple[str, ...]:
        return self.reuse.names


OutputShard = ShardLayout | ReusedShard


def needed_bytes(shards: Sequence[OutputShard], link: str) -> int:
    """Bytes a merge may really write: new shards, and reused ones unless linked or cloned."""
    return sum(s.file_size for s in shards if not isinstance(s, ReusedShard) or link in ("auto", "copy"))


def find_reusable(recipes: Sequence[TensorRecipe],
                  shards_by_role: Mapping[str, Sequence[ReusableShard]]) -> list[ReusableShard]:
    """The input shards whose every tensor is a ``copy`` from that shard's own input."""
    copied_from = {r.name: r.terms[0].role for r in recipes if r.op == "copy" and r.source(r.terms[0]) == r.name}
    return [shard for role, shards in shards_by_role.items() for shard in shards
            if shard.names and all(copied_from.get(n) == role for n in shard.names)]


def _segments(recipes: Sequence[TensorRecipe],
              reusable: Sequence[ReusableShard]) -> list[list[TensorRecipe] | ReusableShard]:
    """Plan order, with each reusable shard standing where its first tensor was."""
    owner = {name: shard for shard in reusable for name in shard.names}
    segments: list[list[TensorRecipe] | ReusableShard] = []
    emitted: set[Path] = set()
    for recipe in recipes:
        shard = owner.get(recipe.name)
        if shard is None:
            if not segments or not isinstance(segments[-1], list):
                segments.append([])
            segments[-1].append(recipe)  # type: ignore[union-attr]
        elif shard.source not in emitted:
            emitted.add(shard.source)
            segments.append(shard)
    return segments


def layout_shards(recipes: Sequence[TensorRecipe], shard_size: int, metadata: Mapping[str, str],
                  reusable: Sequence[ReusableShard] = (), source_offset: SourceOffset | None = None,
                  block: int = _PAGE, follow_sources: bool = True) -> list[OutputShard]:
    """Output shards in plan order: reused input files where possible, new shards of at most
    ``shard_size`` for everything else, named ``model-0000i-of-0000N.safetensors``. With
    ``source_offset``, each new shard's data buffer starts at its :func:`page_phase`, and (with
    ``follow_sources``; a PEFT adapter is one file) large copied tensors whose sources sit at
    different offsets within a ``block`` go to different shards."""
    slots: list[list[TensorRecipe] | ReusableShard] = []
    for segment in _segments(recipes, reusable):
        slots += ([segment] if isinstance(segment, ReusableShard)
                  else group_into_shards(segment, shard_size, source_offset if follow_sources else None, block))
    slots = [s for s in slots if not isinstance(s, list) or s] or [[]]
    shards: list[OutputShard] = []
    for i, slot in enumerate(slots):
        name = shard_filename(i, len(slots))
        if isinstance(slot, ReusableShard):
            shards.append(ReusedShard(name, slot))
            continue
        placed, position = [], 0
        for recipe in slot:
            n = tensor_nbytes(recipe)
            placed.append(PlacedTensor(recipe, position, n))
            position += n
        shards.append(ShardLayout(name, build_header(placed, metadata, page_phase(placed, source_offset, block), block),
                                  tuple(placed)))
    return shards


def shard_names(shard: OutputShard) -> tuple[str, ...]:
    return shard.names if isinstance(shard, ReusedShard) else tuple(t.recipe.name for t in shard.tensors)


def index_json(shards: Sequence[OutputShard]) -> dict[str, object]:
    return {
        "metadata": {"total_size": sum(s.data_size for s in shards)},
        "weight_map": {name: s.filename for s in shards for name in shard_names(s)},
    }
