"""Check a merged output against what its recipe recorded: every file, its size and checksum.

The recipe (``layerswap_recipe.json``) lists every other file of the output: the shards, the
index and the side files (config, tokenizer, generation settings), each with its size and
checksum. ``verify`` accepts an output only when the directory holds exactly those files, each
matching, the shards pass the strict header and index checks, and the recipe agrees with the copy
that every new shard carries in its ``__metadata__``. An output without shards is invalid.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import RECIPE_NAME, open_checkpoint
from ..errors import CheckpointError, LayerswapError
from ..safe_read import Choice, Int, List, Map, Str, read_json
from .writeback import CHECKSUMS, NO_CHECKSUM, hash_file

#: recipe keys written after the shards, so absent from the copy inside each shard's metadata
_WRITTEN_AFTER = ("checksum", "shards", "reused_shards", "files", "bytes")


class VerifyError(LayerswapError):
    """The output does not match its recipe (or has none)."""


@dataclass(frozen=True)
class VerifyReport:
    path: Path
    shards: int
    tensors: int
    bytes: int
    checksum: str = "blake3"

    def summary(self) -> str:
        if self.checksum == NO_CHECKSUM:
            return (f"ok: {self.path}: {self.shards} shards, {self.tensors} tensors, {self.bytes / 1e9:.2f} GB, "
                    f"every file's size, the headers and the index match the recipe; no checksum was recorded "
                    f"(--checksum none), so the bytes themselves were not checked")
        return (f"ok: {self.path}: {self.shards} shards, {self.tensors} tensors, {self.bytes / 1e9:.2f} GB, "
                f"every file's size and checksum, the headers and the index match the recipe")


def _load_recipe(out: Path) -> tuple[dict[str, Any], str]:
    """The recipe, checked against its schema, and its checksum algorithm."""
    path = out / RECIPE_NAME
    if not path.is_file():
        raise VerifyError(f"{out}: no {RECIPE_NAME}; not a complete layerswap-fast output")
    recipe = read_json(path, Map({"checksum": Choice(CHECKSUMS)}, required=("checksum",)), error=VerifyError)
    algorithm = recipe["checksum"]
    hashed = () if algorithm == NO_CHECKSUM else (algorithm,)
    entry = Map({"file": Str(), "size": Int(0), **{a: Str() for a in hashed}}, required=("file", "size", *hashed))
    Map({"shards": List(entry), "files": List(entry), "reused_shards": List(Map({"shard": Str()}, required=("shard",)))},
        required=("shards", "files", "reused_shards")).check(recipe, str(path), error=VerifyError)
    for key in ("shards", "files"):
        for i, e in enumerate(recipe[key]):
            if os.path.basename(e["file"]) != e["file"] or e["file"] in ("", ".", ".."):
                raise VerifyError(f"{path}: {key}[{i}] names {e['file']!r}, which is not a file of the output")
    return recipe, algorithm


def _check_file(path: Path, entry: dict[str, Any], algorithm: str) -> None:
    if path.is_symlink() and not path.exists():
        raise VerifyError(f"{path}: a link that does not resolve")
    size = path.stat().st_size
    if size != entry["size"]:
        raise VerifyError(f"{path}: {size} bytes, the recipe recorded {entry['size']}")
    if algorithm != NO_CHECKSUM and hash_file(path, algorithm) != entry[algorithm]:
        raise VerifyError(f"{path}: {algorithm} checksum differs from the recipe's; the file was changed or corrupted")


def verify(out: str | os.PathLike[str]) -> VerifyReport:
    """Raise :class:`VerifyError` unless ``out`` is exactly what its merge recorded."""
    out = Path(out)
    if not out.is_dir():
        raise VerifyError(f"{out} is not a directory")
    recipe, algorithm = _load_recipe(out)
    where = out / RECIPE_NAME
    shards, files = recipe["shards"], recipe["files"]
    if not shards:
        raise VerifyError(f"{where}: the recipe lists no shards; an output without weights is not valid")
    try:
        ckpt = open_checkpoint(out)  # strict header and index validation
    except CheckpointError as e:
        raise VerifyError(str(e)) from None
    with ckpt:
        on_disk = {s.path.name for s in ckpt.shards}
        if on_disk != {e["file"] for e in shards}:
            raise VerifyError(f"{out}: the index names shards {sorted(on_disk)} but the recipe recorded "
                              f"{sorted(e['file'] for e in shards)}")
        recorded = {e["file"]: e for e in shards + files}
        present = set(os.listdir(out)) - {RECIPE_NAME}
        if present != set(recorded):
            extra, missing = sorted(present - set(recorded)), sorted(set(recorded) - present)
            raise VerifyError(f"{out}: " + (f"{extra[0]!r} is not in the recipe" if extra else
                                            f"{missing[0]!r}, recorded in the recipe, is missing"))
        for name, entry in recorded.items():
            _check_file(out / name, entry, algorithm)
        _check_metadata_copies(ckpt, recipe, where)
        return VerifyReport(out, len(shards), len(ckpt.specs), sum(e["size"] for e in shards), algorithm)


def _check_metadata_copies(ckpt: Any, recipe: dict[str, Any], where: Path) -> None:
    """Every new shard carries the recipe (less what was written after it) in its metadata."""
    reused = recipe["reused_shards"]
    expected = {k: v for k, v in recipe.items() if k not in _WRITTEN_AFTER}
    reused_names = {r["shard"] for r in reused}
    for shard in ckpt.shards:
        if shard.path.name in reused_names:
            continue
        try:
            copy = json.loads(shard.metadata.get("layerswap_fast", ""))
        except (ValueError, RecursionError):
            copy = None
        if copy != expected:
            raise VerifyError(f"{where}: the recipe differs from the copy in {shard.path.name}'s metadata; "
                              f"the recipe or the shard was edited")
