"""``row_mav`` (the paper's Section 3.2): row-wise mean |expert - base|, and ``row_mav_many``, the
same for several experts against one base, reading the base once per MAX_EXPERTS experts.

``row_mav`` is ``row_mav_many`` with one expert, so both live here. The mean is the float32 row
sum divided by ``cols`` in the kernel (IEEE division) when a row is one segment; rows cut into
several segments have their float32 segment sums added in float64 before the division. Kernel and
numerics: :mod:`._row_mav_kernel`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._common import row_tile
from ._row_mav_kernel import MAX_EXPERTS, check_inputs, launch


def row_mav_many(
    experts: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    block_r: int | None = None,
    block_c: int | None = None,
    seg_iters: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """float32[len(experts), rows]: ``row_mav(e, base)`` for every expert ``e``, reading the base
    once per MAX_EXPERTS experts. Same shapes/dtypes rules as :func:`row_mav`."""
    e2s, b2 = check_inputs(experts, base)
    rows, cols = b2.shape
    if rows == 0:
        return torch.empty((len(e2s), 0), dtype=torch.float32, device=base.device)
    if cols == 0:
        return torch.full((len(e2s), rows), float("nan"), dtype=torch.float32, device=base.device)
    tile = row_tile(rows, cols, experts=min(len(e2s), MAX_EXPERTS), block_c=block_c, block_r=block_r,
                    seg_iters=seg_iters, num_warps=num_warps)
    final = tile.nseg == 1
    out = launch(e2s, b2, tile, final)
    if final:
        return out[:, 0]
    return (out.sum(dim=1, dtype=torch.float64) / cols).to(torch.float32)


def row_mav(expert: torch.Tensor, base: torch.Tensor, **tiling: int | None) -> torch.Tensor:
    """float32[rows]: mean |expert - base| per row. ``expert`` and ``base`` have the same shape
    (2-D, or 1-D = one row), dtypes bf16/f16/f32 (they may differ), on the same device. Keyword
    arguments (block_r, block_c, seg_iters, num_warps) override the tiling heuristic."""
    return row_mav_many([expert], base, **tiling)[0]


__all__ = ["row_mav", "row_mav_many"]
