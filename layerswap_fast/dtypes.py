"""The safetensors dtype names the package knows, and which of them the kernels compute with."""

from __future__ import annotations

from .errors import UnsupportedDtypeError

#: bytes per element for every dtype the safetensors format defines
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}

#: dtypes the blend and row-MAV kernels read and write
FLOAT_DTYPES = ("BF16", "F16", "F32")

#: what every kernel computes in: inputs are widened to float32 (exactly) before any arithmetic
COMPUTE_DTYPE = "F32"

#: unit roundoff of each float dtype: storing a value in it moves the value by at most this fraction
UNIT_ROUNDOFF = {"BF16": 2.0 ** -8, "F16": 2.0 ** -11, "F32": 2.0 ** -24}

#: each float dtype's name in config.json (``torch_dtype``) and in torch
TORCH_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}

_ALIASES = {
    "bf16": "BF16", "bfloat16": "BF16",
    "f16": "F16", "fp16": "F16", "float16": "F16", "half": "F16",
    "f32": "F32", "fp32": "F32", "float32": "F32", "float": "F32",
}


def canonical_dtype(name: str) -> str:
    """A user-facing dtype name (``bfloat16``, ``fp16``, ``F32`` ...) in safetensors' spelling."""
    key = str(name).strip()
    return _ALIASES.get(key.lower(), key.upper())


def normalize_dtype(name: str) -> str:
    """Map a user-facing dtype name to a kernel dtype (one of :data:`FLOAT_DTYPES`)."""
    canonical = canonical_dtype(name)
    if canonical not in FLOAT_DTYPES:
        raise UnsupportedDtypeError(
            f"unsupported output dtype {name!r}: choose one of bf16, f16, f32")
    return canonical


def require_float(dtype: str, tensor: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise UnsupportedDtypeError(
            f"tensor {tensor!r} has dtype {dtype}, which cannot be averaged "
            f"(supported: {', '.join(FLOAT_DTYPES)})")
