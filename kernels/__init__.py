"""Triton kernels of layerswap-fast (GPU; run on the CPU under ``TRITON_INTERPRET=1``).

The same small contract as the C++ core (``layerswap_fast._core``), on torch tensors:

- :func:`row_mav` ``(expert, base) -> float32[rows]``: row-wise mean |expert - base|.
- :func:`row_mav_many` ``(experts, base) -> float32[len(experts), rows]``: the same for several
  experts, reading the base once.
- :func:`row_abs_diff_sums` ``(experts, base) -> float64[len(experts), rows]``: per-row sums of
  |expert - base|, for a caller that streams a tensor in chunks and divides at the end.
- :func:`blend` ``(inputs, weights, out) -> out``: out = round(sum_i w_i * float32(x_i)).

One public op per file (``row_mav`` and ``row_mav_many`` share one, the first being the second
with one expert); the row-MAV kernel both row ops launch is in ``_row_mav_kernel``.

Importing this package imports torch and triton; ``TRITON_INTERPRET`` must be set (if at all)
before that.
"""

from ._row_mav_kernel import MAX_EXPERTS
from .blend import MAX_INPUTS, blend
from .row_abs_diff_sums import row_abs_diff_sums
from .row_mav import row_mav, row_mav_many

__all__ = ["MAX_EXPERTS", "MAX_INPUTS", "blend", "row_abs_diff_sums", "row_mav", "row_mav_many"]
