"""Values of BF16, F16 and F32 tensors as float32 arrays, rounded as torch on the CPU rounds them.

mergekit computes in its config's dtype with torch: every elementwise op on half-precision
tensors converts to float32, computes, and rounds the result to nearest even in the tensor's dtype;
a sum over inputs accumulates in float32, in input order, and rounds once; ``addcmul_`` is one
fused multiply-add. These helpers give the ``mk_*`` ops those steps in numpy, so their bytes
equal mergekit's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

F32 = np.float32


def to_float32(raw: Any, dtype: str) -> np.ndarray:
    """The little-endian values in ``raw`` (bytes of ``dtype``) as a new float32 array, exactly."""
    if dtype == "BF16":
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(F32)
    if dtype == "F16":
        return np.frombuffer(raw, dtype="<f2").astype(F32)
    if dtype == "F32":
        return np.frombuffer(raw, dtype="<f4").astype(F32)
    raise ValueError(f"unsupported dtype {dtype}")


def round_to(x: np.ndarray, dtype: str | None) -> np.ndarray:
    """float32 ``x`` rounded to nearest even in ``dtype`` (as float32 values); NaN stays NaN."""
    x = np.asarray(x, dtype=F32)
    if dtype in (None, "F32"):
        return x
    if dtype == "F16":
        return x.astype(np.float16).astype(F32)
    if dtype == "BF16":
        u = x.view(np.uint32)
        r = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)).view(F32)
        return np.where(np.isnan(x), x, r)
    raise ValueError(f"unsupported dtype {dtype}")


def encode(x: np.ndarray, dtype: str) -> bytes:
    """float32 values already representable in ``dtype`` as that dtype's little-endian bytes."""
    if dtype == "BF16":
        return (np.asarray(x, dtype=F32).view(np.uint32) >> 16).astype("<u2").tobytes()
    if dtype == "F16":
        return np.asarray(x, dtype=F32).astype("<f2").tobytes()
    return np.asarray(x, dtype="<f4").tobytes()


def scalar_in(value: float, dtype: str | None) -> np.float32:
    """A Python float as ``torch.tensor(value, dtype=dtype)`` holds it: rounded once from double."""
    if dtype == "F16":
        return F32(np.float16(value))
    if dtype == "BF16":
        u = np.array([value], dtype=np.float64).view(np.uint64)
        shift = np.uint64(45)  # float64 keeps 52 fraction bits, bfloat16 7
        r = (u + np.uint64((1 << 44) - 1) + ((u >> shift) & np.uint64(1))) >> shift << shift
        return F32(r.view(np.float64)[0])
    return F32(value)


def fma(acc: np.ndarray, weight: np.float32, x: np.ndarray) -> np.ndarray:
    """``acc + weight·x`` rounded once to float32, as ``addcmul_``: the product of two float32
    values is exact in float64; the float64 sum is rounded twice (to 53 then 24 bits), which
    differs from one rounding only when it lands exactly halfway between two float32 values."""
    return (acc.astype(np.float64) + np.float64(weight) * x.astype(np.float64)).astype(F32)


def sum_rounded(xs: Sequence[np.ndarray], dtype: str | None) -> np.ndarray:
    """``torch.stack(xs).sum(dim=0)``: float32 accumulation in order, one rounding to ``dtype``."""
    acc = np.array(xs[0], dtype=F32, copy=True)
    for x in xs[1:]:
        acc += x
    return round_to(acc, dtype)
