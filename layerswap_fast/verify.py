"""Check a merged output against what its recipe recorded: headers, index, sizes, checksums."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import INDEX_NAME, open_checkpoint
from .engine import RECIPE_NAME
from .errors import CheckpointError, LayerswapError
from .writeback import CHECKSUMS, hash_file


class VerifyError(LayerswapError):
    """The output does not match its recipe (or has none)."""


@dataclass(frozen=True)
class VerifyReport:
    path: Path
    shards: int
    tensors: int
    bytes: int

    def summary(self) -> str:
        return (f"ok: {self.path}: {self.shards} shards, {self.tensors} tensors, {self.bytes / 1e9:.2f} GB, "
                f"headers, index, sizes and checksums match the recipe")


def _recorded_shards(out: Path) -> list[dict]:
    recipe_path = out / RECIPE_NAME
    if not recipe_path.is_file():
        raise VerifyError(f"{out}: no {RECIPE_NAME}; not a complete layerswap-fast output")
    unreadable = VerifyError(f"{recipe_path}: unreadable recipe (no list of shards with size and checksum)")
    try:
        recipe = json.loads(recipe_path.read_text(encoding="utf-8"))
        shards, algorithm = recipe["shards"], recipe.get("checksum", "sha256")
        well_formed = algorithm in CHECKSUMS and isinstance(shards, list) and all(
            {"file", "size", algorithm} <= set(s) for s in shards)
    except (ValueError, KeyError, TypeError):
        raise unreadable from None
    if not well_formed:  # an explicit check, not an assert: `python -O` must not skip it
        raise unreadable
    return [dict(s, digest=s[algorithm], algorithm=algorithm) for s in shards]


def verify(out: str | os.PathLike[str]) -> VerifyReport:
    """Raise :class:`VerifyError` unless ``out`` is exactly what its merge recorded."""
    out = Path(out)
    if not out.is_dir():
        raise VerifyError(f"{out} is not a directory")
    shards = _recorded_shards(out)
    if not (out / INDEX_NAME).is_file():
        raise VerifyError(f"{out}: no {INDEX_NAME}")
    try:
        ckpt = open_checkpoint(out)  # strict header and index validation
    except CheckpointError as e:
        raise VerifyError(str(e)) from None
    with ckpt:
        on_disk = {s.path.name for s in ckpt.shards}
        recorded = {s["file"] for s in shards}
        if on_disk != recorded:
            raise VerifyError(f"{out}: the index names shards {sorted(on_disk)} but the recipe recorded {sorted(recorded)}")
        sizes = {s.path.name: s.size for s in ckpt.shards}  # as open_checkpoint found them
        for entry in shards:
            path = out / entry["file"]
            size = sizes[entry["file"]]
            if size != entry["size"]:
                raise VerifyError(f"{path}: {size} bytes, the recipe recorded {entry['size']}")
            if hash_file(path, entry["algorithm"]) != entry["digest"]:
                raise VerifyError(f"{path}: {entry['algorithm']} checksum differs from the recipe's; "
                                  f"the file was changed or corrupted")
        return VerifyReport(out, len(shards), len(ckpt.specs), sum(s["size"] for s in shards))
