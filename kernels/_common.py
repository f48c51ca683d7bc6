"""Shared pieces of the Triton kernels: dtype handling, float32 <-> bf16 by bit operations, and
launch heuristics.

bf16 tensors are handed to the kernels as their raw 16-bit patterns (an ``int16`` view) and
converted with integer operations inside the kernel:

* bf16 -> float32 is a 16-bit left shift (exact; NaN payloads, subnormals and signs preserved),
* float32 -> bf16 is round-to-nearest-even on the bit pattern, NaN -> 0x7FC0, i.e. exactly
  ``c10::BFloat16``'s ``round_to_nearest_even`` (the C++ core does the same).

That costs a few integer instructions per element (free in a memory-bound kernel) and makes the
result independent of the backend: Triton's interpreter (``TRITON_INTERPRET=1``, Triton 3.x)
truncates on ``.to(tl.bfloat16)`` and flushes bf16 subnormals on both conversions, and the GPU's
``cvt.rn.bf16.f32`` returns 0x7FFF for NaN. float16 uses Triton's own conversion
(round-to-nearest-even on the GPU and in the interpreter) with NaN canonicalised to sign | 0x7E00
(torch's scalar ``fp16_ieee_from_fp32_value``, the C++ core).

Note: torch's *vectorised* CPU float32 -> bf16 cast (``tensor.to(torch.bfloat16)``, torch 2.13,
AVX2/AVX-512) writes 0xFFFF for NaN, unlike its scalar path (0x7FC0); byte comparisons against a
torch reference must therefore treat NaN positions separately.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def interpreting() -> bool:
    """True when the kernels run under Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def check_dtype(t: torch.Tensor, what: str) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{what}: unsupported dtype {t.dtype} (expected bfloat16, float16 or float32)")


def kernel_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor as the kernels take it: bf16 as its raw int16 bit patterns, others unchanged."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def launch_guard():
    """Context for a launch. Under the interpreter the kernel body runs as numpy code, which warns
    on inf - inf, overflow in casts etc.; a GPU does not, so silence those warnings there."""
    if interpreting():
        return np.errstate(all="ignore")
    return contextlib.nullcontext()


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------
# Row tiling shared by row_mav and row_mav_many.
# --------------------------------------------------------------------------------------------

class RowTile:
    """How a (rows, cols) reduction is cut: tiles of BLOCK_R rows x BLOCK_C columns, each
    program reducing one segment of ``seg_len`` columns (a multiple of BLOCK_C) of BLOCK_R rows.
    ``nseg > 1`` only for long rows with few row blocks; the segments' float32 partial sums are
    then added in float64 on the host side of the launch."""

    __slots__ = ("block_r", "block_c", "seg_len", "nseg", "num_warps")

    def __init__(self, block_r: int, block_c: int, seg_len: int, nseg: int, num_warps: int):
        self.block_r, self.block_c, self.seg_len, self.nseg = block_r, block_c, seg_len, nseg
        self.num_warps = num_warps

    def grid(self, rows: int) -> tuple[int, int]:
        return (cdiv(rows, self.block_r), self.nseg)

    def __repr__(self) -> str:
        return (f"RowTile(block_r={self.block_r}, block_c={self.block_c}, seg_len={self.seg_len}, "
                f"nseg={self.nseg}, num_warps={self.num_warps})")


# At most this many BLOCK_C steps are accumulated per lane before the tree reduction: keeps the
# float32 error of one segment's sum at a few ulps, well inside the 1e-6 contract.
MAX_SEG_ITERS = 64
# Below this many programs the GPU is under-filled; long rows are then cut into segments.
TARGET_PROGRAMS = 512


def row_tile(rows: int, cols: int, *, experts: int = 1, block_c: int | None = None, block_r: int | None = None,
             seg_iters: int | None = None, num_warps: int | None = None) -> RowTile:
    """Heuristic tile for a row reduction of ``experts`` experts against one base; depends only
    on the shape (never on the device), so results are reproducible. Any argument given
    overrides the heuristic (tests, benchmarks)."""
    if interpreting():
        # Few, large programs: the interpreter's cost is per program and per loop step.
        max_c, tile = 1 << 12, 1 << 15
    else:
        # H100-class: 1024 columns x 4 rows per step, 8 warps -> 16 elements per thread and
        # tensor (two 16 B loads for bf16), 2 KB contiguous per row per step. With 3-4 experts
        # the float32 accumulators (one per expert) would need ~130 registers per thread: halve
        # the tile (8 elements per thread, still one 16 B load for bf16) to keep occupancy.
        max_c, tile = 1024, (4096 if experts <= 2 else 2048)
    bc = block_c or max(16, min(next_pow2(cols), max_c))
    br = block_r or max(1, min(next_pow2(rows), tile // bc))
    n_iter = max(1, cdiv(cols, bc))
    if seg_iters is None:
        it = min(n_iter, MAX_SEG_ITERS)
        row_blocks = cdiv(max(rows, 1), br)
        while it > 4 and row_blocks * cdiv(n_iter, it) < TARGET_PROGRAMS:
            it //= 2
    else:
        it = max(1, seg_iters)
    seg_len = it * bc
    nseg = max(1, cdiv(cols, seg_len))
    if num_warps is None:
        per_thread = 16 if experts <= 2 else 8
        num_warps = max(1, min(8, br * bc // per_thread // 32))
    return RowTile(br, bc, seg_len, nseg, num_warps)


def as_rows(t: torch.Tensor, what: str) -> torch.Tensor:
    """A 2-D view with unit column stride: 0-D/1-D tensors are one row."""
    if t.dim() == 0:
        t = t.reshape(1, 1)
    elif t.dim() == 1:
        t = t.reshape(1, -1)
    elif t.dim() != 2:
        raise ValueError(f"{what}: expected a 1-D or 2-D tensor, got shape {tuple(t.shape)}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        t = t.contiguous()
    return t


def row_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else max(t.shape[1], 1)


# --------------------------------------------------------------------------------------------
# In-kernel helpers.
# --------------------------------------------------------------------------------------------

@triton.jit
def load_f32(ptr, offs, mask):
    """Load ``ptr[offs]`` as float32. An int16 pointer means bf16 bit patterns."""
    if ptr.dtype.element_ty == tl.int16:
        bits = tl.load(ptr + offs, mask=mask, other=0, eviction_policy="evict_first")
        wide = bits.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        x = wide.to(tl.float32, bitcast=True)
    else:
        x = tl.load(ptr + offs, mask=mask, other=0, eviction_policy="evict_first").to(tl.float32)
    return x


@triton.jit
def store_from_f32(ptr, offs, x, mask):
    """Store float32 ``x`` into ``ptr[offs]``, rounding to nearest even into the pointer's dtype.
    An int16 pointer means bf16: rounded on the bit pattern, NaN -> 0x7FC0 (as c10::BFloat16)."""
    if ptr.dtype.element_ty == tl.int16:
        u = x.to(tl.uint32, bitcast=True)
        rounded = (u + (((u >> 16) & 1) + 0x7FFF)) >> 16
        is_nan = (u & 0x7FFFFFFF) > 0x7F800000
        bits = tl.where(is_nan, 0x7FC0, rounded)
        tl.store(ptr + offs, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    elif ptr.dtype.element_ty == tl.float16:
        # Hardware/numpy RNE conversion; NaN canonicalised to sign | 0x7E00 as torch's scalar
        # fp16_ieee_from_fp32_value and the C++ core (the GPU's cvt would give 0x7FFF).
        u = x.to(tl.uint32, bitcast=True)
        h = x.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
        is_nan = (u & 0x7FFFFFFF) > 0x7F800000
        nan_bits = ((u >> 16) & 0x8000).to(tl.int32) | 0x7E00
        bits = tl.where(is_nan, nan_bits, h & 0xFFFF)
        tl.store(ptr + offs, bits.to(tl.uint16).to(tl.float16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=mask)
