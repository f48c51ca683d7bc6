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
    """float32 ``x`` rounded to nearest even in ``dtype`` (as float32 values); a NaN becomes the
    quiet NaN torch writes."""
    x = np.asarray(x, dtype=F32)
    if dtype in (None, "F32"):
        return x
    if dtype == "F16":
        return x.astype(np.float16).astype(F32)
    if dtype == "BF16":
        u = x.view(np.uint32)
        r = u >> np.uint32(16)  # in place from here: this runs on every chunk of every step
        r &= np.uint32(1)
        r += np.uint32(0x7FFF)
        r += u
        r &= np.uint32(0xFFFF0000)
        r = r.view(F32)
        nan = np.isnan(x)
        return np.where(nan, F32(np.nan), r) if nan.any() else r  # torch's bf16 NaN is 0x7FC0
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
    product = np.multiply(x, np.float64(weight), dtype=np.float64)
    product += acc
    return product.astype(F32)


def sum_rounded(xs: Sequence[np.ndarray], dtype: str | None) -> np.ndarray:
    """``torch.stack(xs).sum(dim=0)``: float32 accumulation in order, one rounding to ``dtype``."""
    acc = np.array(xs[0], dtype=F32, copy=True)
    for x in xs[1:]:
        acc += x
    return round_to(acc, dtype)


#: float32 lanes of torch's CPU reductions (AVX2's 256-bit vectors)
LANES = 8


class TorchSum:
    """``x.sum()`` of a contiguous float32 vector of ``n`` elements, fed in pieces (:meth:`add`),
    as torch's CPU kernel sums it on one thread: 8 lanes, 4 interleaved vectors (rows of 32),
    each summed in a 4-level cascade of blocks of rows, then the leftover vectors, the scalar
    tail and the lanes in order. (Over 32768 elements torch splits a sum among its threads,
    which changes the order; mergekit's own bytes then depend on its thread count.)"""

    def __init__(self, n: int):
        self.n, self.seen = n, 0
        self.rows = n // (LANES * 4)
        self.power = max(4, (int(self.rows - 1).bit_length() if self.rows > 1 else 0) // 4)
        self.acc = np.zeros((4, LANES * 4), dtype=F32)
        self.pending = np.zeros(0, dtype=F32)  # elements of rows not yet in a whole block
        self.done_rows = 0
        self.rest: list[np.ndarray] = []

    @property
    def group(self) -> int:
        """Elements that torch sums on their own before adding them to its last level: parts of
        the sum that start at multiples of it can be summed apart (``mk_program``'s whole_sums)."""
        return (1 << (3 * self.power)) * LANES * 4

    def add(self, x: np.ndarray) -> TorchSum:
        x = np.asarray(x, dtype=F32)
        split = max(0, min(len(x), self.rows * LANES * 4 - self.seen))
        self.seen += len(x)
        if len(x) > split:
            self.rest.append(x[split:])
        if split:
            self._blocks(np.concatenate([self.pending, x[:split]]))
        return self

    def _blocks(self, flat: np.ndarray) -> None:
        step = 1 << self.power
        rows = flat[:len(flat) // (LANES * 4) * LANES * 4].reshape(-1, LANES * 4)
        blocks = len(rows) // step
        if blocks:
            sums = np.cumsum(rows[:blocks * step].reshape(blocks, step, -1), axis=1, dtype=F32)[:, -1]
        for b in range(blocks):
            self.acc[0] = self.acc[0] + sums[b]
            self.done_rows += step
            for j in range(1, 4):
                self.acc[j] = self.acc[j] + self.acc[j - 1]
                self.acc[j - 1] = 0
                if self.done_rows & ((step - 1) << (j * self.power)):
                    break
        self.pending = flat[blocks * step * LANES * 4:]

    def total(self) -> np.float32:
        rest = np.concatenate(self.rest) if self.rest else np.zeros(0, dtype=F32)
        if self.n < LANES:  # too short for a vector: the same cascade over scalars, 4 wide
            return _scalar_sum(rest)
        acc = self.acc.copy()
        for row in self.pending.reshape(-1, LANES * 4):
            acc[0] = acc[0] + row
        for j in range(1, 4):
            acc[0] = acc[0] + acc[j]
        partial = acc[0]
        vectors = len(rest) // LANES
        for i in range(vectors):
            partial[:LANES] = partial[:LANES] + rest[i * LANES:(i + 1) * LANES]
        lanes = partial[:LANES]
        for k in range(1, 4):
            lanes = lanes + partial[k * LANES:(k + 1) * LANES]
        total = F32(0)
        for value in rest[vectors * LANES:]:
            total = F32(total + value)
        for value in lanes:
            total = F32(total + value)
        return total


def _scalar_sum(x: np.ndarray) -> np.float32:
    partial = np.zeros(4, dtype=F32)
    whole = len(x) // 4 * 4
    for i in range(0, whole, 4):
        partial = partial + x[i:i + 4]
    for value in x[whole:]:
        partial[0] = F32(partial[0] + value)
    total = partial[0]
    for value in partial[1:]:
        total = F32(total + value)
    return total


def torch_sum(x: np.ndarray) -> np.float32:
    """:class:`TorchSum` of a whole vector."""
    return TorchSum(len(x)).add(x).total()


class TorchNorm:
    """``torch.linalg.vector_norm(x)`` of a contiguous float32 vector of ``n`` elements, fed in
    pieces: squares summed in 8 lanes (multiply, then add), the lanes in order, then the tail by
    fused multiply-adds, and the square root. (Found against torch 2.13 on AVX2; a tail of
    several elements sometimes rounds otherwise.)"""

    def __init__(self, n: int):
        self.whole = n - n % LANES
        self.seen = 0
        self.lanes = np.zeros(LANES, dtype=F32)
        self.carry = np.zeros(0, dtype=F32)
        self.tail: list[np.ndarray] = []

    def add(self, x: np.ndarray) -> TorchNorm:
        x = np.asarray(x, dtype=F32)
        split = max(0, min(len(x), self.whole - self.seen))
        self.seen += len(x)
        if len(x) > split:
            self.tail.append(x[split:])
        body = np.concatenate([self.carry, x[:split]])
        usable = len(body) - len(body) % LANES
        if usable:
            squares = body[:usable].reshape(-1, LANES) ** 2
            self.lanes = np.cumsum(np.vstack([self.lanes, squares]), axis=0, dtype=F32)[-1]
        self.carry = body[usable:]
        return self

    def total(self) -> np.float32:
        total = self.lanes[0]
        for value in self.lanes[1:]:
            total = F32(total + value)
        for value in (np.concatenate(self.tail) if self.tail else ()):
            total = F32(np.float64(total) + np.float64(value) * np.float64(value))
        return F32(np.sqrt(total))


def torch_norm(x: np.ndarray) -> np.float32:
    """:class:`TorchNorm` of a whole vector."""
    return TorchNorm(len(x)).add(x).total()
