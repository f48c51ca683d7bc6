"""Triton kernels of layerswap-fast (GPU; run on the CPU under ``TRITON_INTERPRET=1``).

The same small contract as the C++ core (``layerswap_fast._core``), on torch tensors:

- :func:`row_mav` ``(expert, base) -> float32[rows]``: row-wise mean |expert - base|.
- :func:`row_mav_many` ``(experts, base) -> float32[len(experts), rows]``: the same for several
  experts, reading the base once.
- :func:`blend` ``(inputs, weights, out) -> out``: out = round(sum_i w_i * float32(x_i)).

Importing this package imports torch and triton; ``TRITON_INTERPRET`` must be set (if at all)
before that.
"""

from .blend import MAX_INPUTS, blend
from .row_mav_many import MAX_EXPERTS, row_abs_diff_sums, row_mav, row_mav_many

__all__ = ["MAX_EXPERTS", "MAX_INPUTS", "blend", "row_abs_diff_sums", "row_mav", "row_mav_many"]
