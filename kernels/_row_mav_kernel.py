"""The row-MAV kernel that :mod:`.row_mav` and :mod:`.row_abs_diff_sums` share: per row, the sum
(or the mean) of |expert - base| for up to MAX_EXPERTS experts against one base, reading the base
once. A 1-D tensor is one row.

Numerics: both operands converted to float32, subtracted, absolute value, summed per row in
float32 (each lane of a [BLOCK_R, BLOCK_C] tile accumulates at most MAX_SEG_ITERS column steps,
then a tree reduction) and, when the caller asks for means of one-segment rows, divided by
``cols`` in the kernel. Rows so long that they are cut into several segments (few rows, many
columns) come back as one float32 sum per segment, for the caller to add in float64. With more
than two experts the tile is smaller, so results agree with one-expert calls to well within the
1e-6 relative contract rather than bit for bit.

Memory-bound design: grid = (row blocks, column segments); each program walks its segment in
coalesced [BLOCK_R, BLOCK_C] steps, loading each tile of the base once and the matching tile of
each expert (separate pointers: each expert may have its own dtype and row stride), and writes
one float32 per row and expert.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._common import RowTile, as_rows, check_dtype, kernel_view, launch_guard, load_f32, row_stride

MAX_EXPERTS = 4


@triton.jit
def _row_mav_many_kernel(
    b_ptr, e0, e1, e2, e3, out_ptr,
    rows, cols, stride_b, s0, s1, s2, s3, seg_len, nseg,
    K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, FINAL: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    r64 = r.to(tl.int64)
    b_row = r64[:, None] * stride_b
    e0_row = r64[:, None] * s0
    e1_row = r64[:, None] * s1
    e2_row = r64[:, None] * s2
    e3_row = r64[:, None] * s3
    c_start = pid_s * seg_len
    c_end = tl.minimum(c_start + seg_len, cols)
    acc0 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for c0 in range(c_start, c_end, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = rmask[:, None] & (c < c_end)[None, :]
        b = load_f32(b_ptr, b_row + c[None, :], m)
        acc0 += tl.abs(load_f32(e0, e0_row + c[None, :], m) - b)
        if K > 1:
            acc1 += tl.abs(load_f32(e1, e1_row + c[None, :], m) - b)
        if K > 2:
            acc2 += tl.abs(load_f32(e2, e2_row + c[None, :], m) - b)
        if K > 3:
            acc3 += tl.abs(load_f32(e3, e3_row + c[None, :], m) - b)
    # out is [K, nseg, rows] (FINAL: nseg == 1 and the values are means)
    plane = nseg * rows
    o = out_ptr + pid_s * rows + r
    # IEEE division (Triton's ``/`` is div.full.f32 on NVIDIA: 2 ulp, not correctly rounded)
    denom = tl.zeros([BLOCK_R], dtype=tl.float32) + cols
    s = tl.sum(acc0, axis=1)
    if FINAL:
        s = tl.math.div_rn(s, denom)
    tl.store(o, s, mask=rmask)
    if K > 1:
        s = tl.sum(acc1, axis=1)
        if FINAL:
            s = tl.math.div_rn(s, denom)
        tl.store(o + plane, s, mask=rmask)
    if K > 2:
        s = tl.sum(acc2, axis=1)
        if FINAL:
            s = tl.math.div_rn(s, denom)
        tl.store(o + 2 * plane, s, mask=rmask)
    if K > 3:
        s = tl.sum(acc3, axis=1)
        if FINAL:
            s = tl.math.div_rn(s, denom)
        tl.store(o + 3 * plane, s, mask=rmask)


def check_inputs(experts: Sequence[torch.Tensor], base: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    experts = list(experts)
    if not experts:
        raise ValueError("row_mav_many: need at least one expert")
    check_dtype(base, "row_mav_many base")
    b2 = as_rows(base, "row_mav_many base")
    e2s = []
    for i, e in enumerate(experts):
        check_dtype(e, f"row_mav_many expert {i}")
        if e.shape != base.shape:
            raise ValueError(f"row_mav_many: expert {i} has shape {tuple(e.shape)}, base {tuple(base.shape)}")
        if e.device != base.device:
            raise ValueError(f"row_mav_many: expert {i} is on {e.device}, base on {base.device}")
        e2s.append(as_rows(e, f"row_mav_many expert {i}"))
    return e2s, b2


def launch(e2s: list[torch.Tensor], b2: torch.Tensor, tile: RowTile, final: bool) -> torch.Tensor:
    """[len(e2s), nseg, rows] float32 (segment sums, or means when ``final``)."""
    rows, cols = b2.shape
    out = torch.empty((len(e2s), tile.nseg, rows), dtype=torch.float32, device=b2.device)
    bk = kernel_view(b2)
    with launch_guard():
        for g in range(0, len(e2s), MAX_EXPERTS):
            grp = e2s[g:g + MAX_EXPERTS]
            k = len(grp)
            ptrs = [kernel_view(e) for e in grp] + [bk] * (MAX_EXPERTS - k)
            strides = [row_stride(e) for e in grp] + [0] * (MAX_EXPERTS - k)
            _row_mav_many_kernel[tile.grid(rows)](
                bk, *ptrs, out[g:g + k],
                rows, cols, row_stride(b2), *strides, tile.seg_len, tile.nseg,
                K=k, BLOCK_R=tile.block_r, BLOCK_C=tile.block_c, FINAL=final,
                num_warps=tile.num_warps, enable_fp_fusion=False,
            )
    return out


__all__ = ["MAX_EXPERTS", "check_inputs", "launch"]
