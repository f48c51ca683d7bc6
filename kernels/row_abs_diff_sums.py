"""``row_abs_diff_sums``: float64 per-row sums (not means) of |expert - base|, the building block
of the streaming GPU backend (:class:`layerswap_fast.engine.cuda.CudaBackend`), which adds the
sums of a tensor's chunks in float64 and divides by the full row length at the end. Kernel and
numerics: :mod:`._row_mav_kernel`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._common import row_tile
from ._row_mav_kernel import MAX_EXPERTS, check_inputs, launch


def row_abs_diff_sums(
    experts: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    block_r: int | None = None,
    block_c: int | None = None,
    seg_iters: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """float64[len(experts), rows]: per-row sum of |expert - base| (float32 within a segment of
    a row, float64 across segments). Used to stream a tensor in chunks: the caller adds the
    chunks' sums in float64 and divides by the full row length at the end."""
    e2s, b2 = check_inputs(experts, base)
    rows, cols = b2.shape
    if rows == 0 or cols == 0:
        return torch.zeros((len(e2s), rows), dtype=torch.float64, device=base.device)
    tile = row_tile(rows, cols, experts=min(len(e2s), MAX_EXPERTS), block_c=block_c, block_r=block_r,
                    seg_iters=seg_iters, num_warps=num_warps)
    out = launch(e2s, b2, tile, final=False)
    if tile.nseg == 1:
        return out[:, 0].to(torch.float64)
    return out.sum(dim=1, dtype=torch.float64)


__all__ = ["row_abs_diff_sums"]
