"""``row_mav``: the row-wise mean |expert - base| of two same-shape tensors (the paper's row MAV,
Section 3.2). A 1-D tensor is one row.

Numerics: both operands converted to float32, subtracted, absolute value, summed per row in
float32 (each lane of a [BLOCK_R, BLOCK_C] tile accumulates at most MAX_SEG_ITERS column steps,
then a tree reduction), divided by ``cols``. Rows so long that they are cut into several
segments (few rows, many columns) have their float32 segment sums added in float64.

Memory-bound design: grid = (row blocks, column segments); each program walks its segment in
coalesced [BLOCK_R, BLOCK_C] steps (a row longer than BLOCK_C loops), reading every input byte
once, and writes one float32 per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    as_rows,
    check_dtype,
    kernel_view,
    launch_guard,
    load_f32,
    row_stride,
    row_tile,
)


@triton.jit
def _row_mav_kernel(
    e_ptr, b_ptr, out_ptr,
    rows, cols, stride_e, stride_b, seg_len,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, FINAL: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    r64 = r.to(tl.int64)
    e_row = r64[:, None] * stride_e
    b_row = r64[:, None] * stride_b
    c_start = pid_s * seg_len
    c_end = tl.minimum(c_start + seg_len, cols)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for c0 in range(c_start, c_end, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = rmask[:, None] & (c < c_end)[None, :]
        e = load_f32(e_ptr, e_row + c[None, :], m)
        b = load_f32(b_ptr, b_row + c[None, :], m)
        acc += tl.abs(e - b)
    s = tl.sum(acc, axis=1)
    if FINAL:
        # IEEE division (Triton's ``/`` is div.full.f32 on NVIDIA: 2 ulp, not correctly rounded)
        denom = tl.zeros([BLOCK_R], dtype=tl.float32) + cols
        tl.store(out_ptr + r, tl.math.div_rn(s, denom), mask=rmask)
    else:
        tl.store(out_ptr + pid_s * rows + r, s, mask=rmask)


def row_mav(
    expert: torch.Tensor,
    base: torch.Tensor,
    *,
    block_r: int | None = None,
    block_c: int | None = None,
    seg_iters: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """float32[rows]: mean |expert - base| per row. ``expert`` and ``base`` have the same shape
    (2-D, or 1-D = one row), dtypes bf16/f16/f32 (they may differ), on the same device. The
    keyword arguments override the tiling heuristic (tests, benchmarks)."""
    check_dtype(expert, "row_mav expert")
    check_dtype(base, "row_mav base")
    if expert.shape != base.shape:
        raise ValueError(f"row_mav: shapes differ: {tuple(expert.shape)} vs {tuple(base.shape)}")
    if expert.device != base.device:
        raise ValueError(f"row_mav: expert on {expert.device}, base on {base.device}")
    e2, b2 = as_rows(expert, "row_mav expert"), as_rows(base, "row_mav base")
    rows, cols = e2.shape
    if rows == 0:
        return torch.empty(0, dtype=torch.float32, device=expert.device)
    if cols == 0:
        return torch.full((rows,), float("nan"), dtype=torch.float32, device=expert.device)
    tile = row_tile(rows, cols, block_c=block_c, block_r=block_r, seg_iters=seg_iters, num_warps=num_warps)
    final = tile.nseg == 1
    out = torch.empty((tile.nseg, rows), dtype=torch.float32, device=expert.device)
    with launch_guard():
        _row_mav_kernel[tile.grid(rows)](
            kernel_view(e2), kernel_view(b2), out,
            rows, cols, row_stride(e2), row_stride(b2), tile.seg_len,
            BLOCK_R=tile.block_r, BLOCK_C=tile.block_c, FINAL=final,
            num_warps=tile.num_warps, enable_fp_fusion=False,
        )
    if final:
        return out[0]
    return (out.sum(dim=0, dtype=torch.float64) / cols).to(torch.float32)
