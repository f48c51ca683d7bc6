"""The files of an adapter a merge writes (``--as-adapter``): PEFT's ``adapter_config.json`` for
its modules, and the check that a tensor an input adapter saves whole is only the base's own.

The config names every module in full (``target_modules``) and gives each its own rank and scale
through ``rank_pattern`` / ``alpha_pattern``, keyed by the module's escaped full name (PEFT matches
a key against the end of a module's name, after a dot or at its start, so a full name matches that
module alone). ``use_rslora`` is off and each ``alpha`` is chosen so that ``alpha / r``, the scale
PEFT computes in double, is the module's scale, so factors copied from an rsLoRA adapter keep their
exact scale. Where the base ties its output head to its input embeddings and the adapter updates an
embedding, ``ensure_weight_tying`` makes PEFT apply the update to the tied head too, as a merged
model (whose head is the updated embedding) does; the default ``r`` and ``lora_alpha`` are then the
embedding's, which PEFT gives the tied head.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import _core
from ..dtypes import DTYPE_SIZES, FLOAT_DTYPES
from ..errors import CheckpointError
from ..plan.adapter_output import OutputModule
from ..safe_read import Map, Nullable, Str, read_json
from .adapter import CONFIG_NAME, WEIGHTS_NAME
from .checkpoint import Checkpoint

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "alpha_for", "peft_config", "config_text", "task_type", "same_values"]

#: elements compared at a time by :func:`same_values`
_CHUNK = 1 << 22


def alpha_for(rank: int, scale: float) -> float:
    """The ``lora_alpha`` for which ``alpha / rank`` (PEFT's scale without rsLoRA, a double
    division) is ``scale``; where no double gives it exactly (the quotient of neighbouring doubles
    can step over ``scale``), the one whose quotient is nearest: one ulp of a double away."""
    candidates = [scale * rank]
    for direction in (math.inf, -math.inf):
        alpha = candidates[0]
        for _ in range(3):
            alpha = math.nextafter(alpha, direction)
            candidates.append(alpha)
    return min(candidates, key=lambda alpha: (abs(alpha / rank - scale), candidates.index(alpha)))


def peft_config(modules: Sequence[OutputModule], *, modules_to_save: Sequence[str], base_model: str | None,
                revision: str | None, fan_in_fan_out: bool, tied_embeddings: bool,
                task: str | None) -> dict[str, Any]:
    """The ``adapter_config.json`` of an adapter holding ``modules`` (and the whole tensors of
    ``modules_to_save``), for ``base_model`` at ``revision``."""
    alphas = {m.name: alpha_for(m.rank, m.scale) for m in modules}
    pairs = Counter((m.rank, alphas[m.name]) for m in modules)
    embeddings = [m for m in modules if m.embedding]
    tie = tied_embeddings and bool(embeddings)
    if tie:  # PEFT gives the tied head the default rank and alpha, with the embedding's factors
        r, alpha = embeddings[0].rank, alphas[embeddings[0].name]
    else:
        r, alpha = pairs.most_common(1)[0][0] if pairs else (8, 8.0)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": task,
        "base_model_name_or_path": base_model,
        "revision": revision,
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": False,
        "target_modules": sorted(m.name for m in modules),
        "rank_pattern": {re.escape(m.name): m.rank for m in modules if m.rank != r},
        "alpha_pattern": {re.escape(m.name): alphas[m.name] for m in modules if alphas[m.name] != alpha},
        "modules_to_save": list(modules_to_save) or None,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "lora_dropout": 0.0,
        "use_dora": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }
    if tie:
        config["ensure_weight_tying"] = True
    return config


def config_text(config: dict[str, Any]) -> str:
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def task_type(directory: Path) -> str | None:
    """The ``task_type`` an adapter's config names (``CAUSAL_LM`` ...), which picks the class
    ``PeftModel.from_pretrained`` builds."""
    config = read_json(directory / CONFIG_NAME, Map({"task_type": Nullable(Str())}), error=CheckpointError)
    return config.get("task_type")


def same_values(a: Checkpoint, name_a: str, b: Checkpoint, name_b: str) -> bool:
    """Whether tensor ``name_a`` of ``a`` and ``name_b`` of ``b`` hold the same values: same shape
    and, widened to float32 (exact for bf16, f16 and f32), the same bit patterns (so -0.0 is not
    0.0, and NaN never equals); in chunks."""
    import numpy as np  # only adapter outputs need it

    sa, sb = a.specs[name_a], b.specs[name_b]
    if tuple(sa.shape) != tuple(sb.shape):
        return False
    if sa.dtype == sb.dtype:  # the same bytes (widening to float32 is one to one)
        return all(x == y for x, y in zip(a.iter_chunks(name_a), b.iter_chunks(name_b)))
    if sa.dtype not in FLOAT_DTYPES or sb.dtype not in FLOAT_DTYPES:
        return False
    size_a, size_b = DTYPE_SIZES[sa.dtype], DTYPE_SIZES[sb.dtype]
    for start in range(0, sa.numel, _CHUNK):
        n = min(_CHUNK, sa.numel - start)
        x, y = np.empty(n, dtype=np.float32), np.empty(n, dtype=np.float32)
        _core.blend_buffers([a.read(name_a, start * size_a, n * size_a)], [sa.dtype], [1.0], x, "F32")
        _core.blend_buffers([b.read(name_b, start * size_b, n * size_b)], [sb.dtype], [1.0], y, "F32")
        if not np.array_equal(x.view(np.uint32), y.view(np.uint32)):
            return False
    return True
