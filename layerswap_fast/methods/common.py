"""Rules every method shares: input roles, numbers a kernel can compute with, weighted averages."""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Mapping, Sequence

from ..dtypes import normalize_dtype
from ..errors import ConfigError, param
from ..plan import SpecLike, check_same_tensors, describe_role
from .method import Option, as_list

BASE = "base"

#: the largest float32: every kernel multiplies in float32, so a weight beyond it is infinite there
FLOAT32_MAX = 3.4028234663852886e38


def model_role(i: int) -> str:
    return f"model.{i}"


def check_all(members: Mapping[str, Sequence[SpecLike]]) -> Sequence[SpecLike]:
    """Every member has the first one's tensors (names and shapes); the first one's specs."""
    first = next(iter(members))
    for role, specs in members.items():
        if role != first:
            check_same_tensors((describe_role(first), members[first]), (describe_role(role), specs))
    return members[first]


def dtypes_of(members: Mapping[str, Sequence[SpecLike]]) -> dict[str, dict[str, str]]:
    return {role: {s.name: s.dtype for s in specs} for role, specs in members.items()}


def check_finite(value: object, what: str, limit: float = FLOAT32_MAX) -> float:
    """``value`` as a float; ConfigError unless it is a real number of magnitude at most
    ``limit`` (by default the float32 range, which every kernel computes in)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{what} must be numbers, got {value!r}")
    x = float(value)
    if not (math.isfinite(x) and abs(x) <= limit):
        range_ = "" if limit == sys.float_info.max else f" (at most {limit:.4g} in magnitude, float32)"
        raise ConfigError(f"{what} must be finite{range_}, got {value!r}")
    return x


def normalize_weights(weights: Sequence[float]) -> tuple[float, ...]:
    """A weighted average: weights scaled to sum to 1 (they must be finite, >= 0, not all 0, and
    sum to a finite number: 1e308 + 1e308 overflows, and every weight would become 0)."""
    ws = [check_finite(w, "soup weights", sys.float_info.max) for w in weights]
    if any(w < 0.0 for w in ws):
        raise ConfigError(f"soup weights must be non-negative, got {list(weights)}")
    total = sum(ws)
    if total <= 0.0:
        raise ConfigError("soup weights must not all be zero")
    if not math.isfinite(total):
        raise ConfigError(f"soup weights must have a finite sum, got {list(weights)}")
    return tuple(w / total for w in ws)


def base_and_models(options: Mapping[str, object]) -> dict[str, object]:
    """Roles of the methods that read a base and fine-tuned models."""
    models = as_list(options["model"])  # type: ignore[arg-type]
    if not models:
        raise ConfigError(f"give at least one {param('model')}")
    return {BASE: options["base"], **{model_role(i): p for i, p in enumerate(models)}}


def dtype_option(default_from: str) -> Option:
    return Option("dtype", "text", f"Output dtype (bf16, f16, f32); default: the {default_from}'s.")


def output_dtype(options: Mapping[str, object]) -> str | None:
    dtype = options["dtype"]
    return normalize_dtype(str(dtype)) if dtype else None


#: write the merge as one PEFT LoRA adapter of the base (every merged model an adapter of it)
AS_ADAPTER = Option("as_adapter", "flag", "Write a PEFT LoRA adapter of the base instead of a full model (every "
                    "merged model must be a LoRA adapter of one base): a module taken whole from one adapter keeps "
                    "its factors byte for byte, a mixed one gets the exact concatenation of the scaled factors. "
                    "--dtype is then the factors' dtype.", default=False)

BASE_AND_MODELS = (
    Option("base", "path", "The model the others were fine-tuned from.", required=True),
    Option("model", "paths", "A fine-tuned model (repeat).", required=True, api="models"),
    Option("lam", "float", "Scale of the merged delta.", default=1.0, flag="--lambda"),
    dtype_option("first model"),
    AS_ADAPTER,
)
