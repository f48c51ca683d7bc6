"""``blend``: out = round(sum_i w_i * float32(x_i)) — the linear merge of N tensors.

Numerics (the contract shared with the C++ core, ``_core.blend_buffers``): every input element is
converted to float32, multiplied by its float32 weight (the product rounded to float32; the kernel
is compiled with ``enable_fp_fusion=False`` so no FMA contracts multiply and add), the products
are added in input order starting from the first (``acc = p0; acc = acc + p1; ...``), and the
float32 sum is rounded to nearest even into the output dtype (bf16 NaN -> 0x7FC0).

Memory-bound design: a 1-D grid over blocks of BLOCK elements, each program loading its block of
every input once (coalesced, 16-byte vector loads) and storing its block of the output once. Up
to MAX_INPUTS inputs are fused in one launch; more inputs are folded in groups through a float32
accumulator (``out`` itself when it is float32, else a scratch buffer), which holds exactly the
float32 running sum, so the bytes do not depend on the grouping.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from ._common import (
    cdiv,
    check_dtype,
    interpreting,
    kernel_view,
    launch_guard,
    load_f32,
    next_pow2,
    store_from_f32,
)

MAX_INPUTS = 8


@triton.jit
def _blend_kernel(
    out_ptr, acc_ptr, numel,
    x0, x1, x2, x3, x4, x5, x6, x7,
    w0, w1, w2, w3, w4, w5, w6, w7,
    N: tl.constexpr, ACC_IN: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    if ACC_IN:
        acc = tl.load(acc_ptr + offs, mask=mask, other=0.0)
        acc = acc + load_f32(x0, offs, mask) * w0
    else:
        acc = load_f32(x0, offs, mask) * w0
    if N > 1:
        acc = acc + load_f32(x1, offs, mask) * w1
    if N > 2:
        acc = acc + load_f32(x2, offs, mask) * w2
    if N > 3:
        acc = acc + load_f32(x3, offs, mask) * w3
    if N > 4:
        acc = acc + load_f32(x4, offs, mask) * w4
    if N > 5:
        acc = acc + load_f32(x5, offs, mask) * w5
    if N > 6:
        acc = acc + load_f32(x6, offs, mask) * w6
    if N > 7:
        acc = acc + load_f32(x7, offs, mask) * w7
    store_from_f32(out_ptr, offs, acc, mask)


def blend_config(numel: int, block: int | None = None, num_warps: int | None = None) -> tuple[int, int]:
    """(BLOCK, num_warps) for ``numel`` elements. On a GPU 4096 elements x 8 warps: 16 elements
    per thread, i.e. 16-byte vector loads (two per input for bf16, four for float32), enough
    bytes in flight per SM to saturate HBM; under the interpreter much larger blocks (its cost is
    per program)."""
    if block is None:
        cap = 1 << 16 if interpreting() else 4096
        block = max(128, min(cap, next_pow2(numel)))
    if num_warps is None:
        num_warps = 8 if block >= 4096 else 4 if block >= 1024 else 2
    return block, num_warps


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    a1, b1 = a0 + a.numel() * a.element_size(), b0 + b.numel() * b.element_size()
    return a0 < b1 and b0 < a1


def blend(
    inputs: Sequence[torch.Tensor],
    weights: Sequence[float],
    out: torch.Tensor,
    *,
    scratch: torch.Tensor | None = None,
    block: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """out = round_to_out_dtype(sum_i float32(w_i) * float32(inputs_i)); returns ``out``.

    ``inputs``: N >= 1 tensors with ``out.numel()`` elements each (any shape; read flat, copied
    if not contiguous), bf16/f16/f32, mixed allowed. ``out``: contiguous bf16/f16/f32 on the same
    device. ``scratch``: optional float32 buffer of at least ``numel`` elements, used only when
    N > MAX_INPUTS and ``out`` is not float32 (else one is allocated). ``block``/``num_warps``
    override the launch heuristic.
    """
    inputs = list(inputs)
    weights = list(weights)
    if not inputs:
        raise ValueError("blend: need at least one input")
    if len(weights) != len(inputs):
        raise ValueError(f"blend: {len(inputs)} inputs but {len(weights)} weights")
    check_dtype(out, "blend out")
    if not out.is_contiguous():
        raise ValueError("blend: out must be contiguous")
    numel = out.numel()
    flat_in = []
    for i, x in enumerate(inputs):
        check_dtype(x, f"blend input {i}")
        if x.numel() != numel:
            raise ValueError(f"blend: input {i} has {x.numel()} elements, out has {numel}")
        if x.device != out.device:
            raise ValueError(f"blend: input {i} is on {x.device}, out on {out.device}")
        flat_in.append(kernel_view(_flat(x)))
    # Each weight rounded to float32 once, on the host (the kernel multiplies in float32).
    w32 = [float(np.float32(w)) for w in weights]
    if numel == 0:
        return out
    out_k = kernel_view(_flat(out))

    groups = [(flat_in[i:i + MAX_INPUTS], w32[i:i + MAX_INPUTS]) for i in range(0, len(flat_in), MAX_INPUTS)]
    acc = None
    if len(groups) > 1:
        if out.dtype == torch.float32 and not any(_overlaps(out, x) for x in inputs):
            acc = out_k
        else:
            if scratch is None:
                scratch = torch.empty(numel, dtype=torch.float32, device=out.device)
            elif scratch.dtype != torch.float32 or scratch.numel() < numel or not scratch.is_contiguous():
                raise ValueError("blend: scratch must be a contiguous float32 tensor of >= numel elements")
            acc = scratch.reshape(-1)[:numel]

    # Triton vectorises the loads (16 B per thread) only when it can prove ``numel`` a multiple of
    # 16 (it specialises integer arguments divisible by 16); a ragged count makes every load
    # scalar. So a ragged tensor is blended as a bulk of 16k elements plus a short tail.
    tail = numel % 16
    pieces = [(0, numel)] if tail == 0 or numel < 256 else [(0, numel - tail), (numel - tail, numel)]
    with launch_guard():
        for a, b in pieces:
            n_el = b - a
            BLOCK, warps = blend_config(n_el, block, num_warps)
            grid = (cdiv(n_el, BLOCK),)
            piece_out = out_k[a:b]
            piece_acc = acc[a:b] if acc is not None else None
            for g, (xs, ws) in enumerate(groups):
                last = g == len(groups) - 1
                dst = piece_out if last else piece_acc
                src = piece_acc if g > 0 else dst  # not read when ACC_IN is False
                n = len(xs)
                xs = [x[a:b] for x in xs]
                xs = xs + [xs[0]] * (MAX_INPUTS - n)
                ws = ws + [0.0] * (MAX_INPUTS - n)
                _blend_kernel[grid](
                    dst, src, n_el, *xs, *ws,
                    N=n, ACC_IN=g > 0, BLOCK=BLOCK,
                    num_warps=warps, enable_fp_fusion=False,
                )
    return out
