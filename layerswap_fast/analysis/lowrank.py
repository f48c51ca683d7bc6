"""Row MAVs of a LoRA adapter against its base: of ΔW = s·B·A, formed row chunk by row chunk.

An adapter stands for the model W + ΔW, so its row MAV on a tensor it updates is the mean of
``|ΔW|`` over each row: no subtraction of rounded weights is involved, the factors are the update
itself. Per tensor an adapter expert is one of (:func:`how`):

- ``LOWRANK``: updated by ``s·B·A`` (or its transpose, embeddings and ``fan_in_fan_out``);
  :func:`delta_row_mavs` forms ``ROW_CHUNK_ELEMS`` elements of ΔW at a time, so memory holds the
  two factors (read whole, they are small: ``r × (rows + cols)``), one chunk and what it is
  compared with, never a whole ΔW. When the adapter also saves the tensor whole (an embedding's
  ``base_layer`` saved beside its factors), the expert is ``R + ΔW`` and a chunk's row MAVs are
  those of ``ΔW − (W − R)``, W and R read by rows.
- ``WHOLE``: saved whole (``modules_to_save``): compared with the base by the backend's row-MAV
  kernel like a full expert's tensor (every tensor of a full expert is ``WHOLE``).
- ``UNTOUCHED``: the expert's tensor is the base's: every row MAV is 0, nothing is read.

**Numerics.** A and B are converted to float32 (exactly, from BF16, F16 or F32) and ``float32(s)``
is folded into B (one rounding per element of the small factor); a chunk is the float32 product
``(s·B)[rows] @ A`` (BLAS, a length-r dot product per element). Its row MAVs come from the C++
core's row-MAV kernel (``row_mav_buffers`` against 0, or against ``float32(W − R)``): ``|·|`` in
float32, summed in float32 over blocks of at most 64 elements, the blocks in float64. Against the
exact ``s·B·A`` each element is off by at most ``(r + 2)·2⁻²⁴ · s·Σₖ|Bᵢₖ||Aₖⱼ|`` (first order: r
roundings in the dot product, one in ``s``, one in ``s·B``), and the sums of non-negative terms
add at most ``63·2⁻²⁴`` relative; so a row MAV is within ``(r + 2)·2⁻²⁴`` times the row mean of
``s·|B|·|A|`` plus ``64·2⁻²⁴`` of itself: below 1e-5 relative for ranks up to 8 and random
factors (tests/test_analyze_adapters.py), the errors themselves below 3e-7.
"""

from __future__ import annotations

import numpy as np

from .. import _core
from ..dtypes import DTYPE_SIZES
from ..engine import ops
from ..formats.adapter import Adapter
from ..formats.checkpoint import Checkpoint, TensorSpec
from ..plan.lowrank import Delta

#: float32 elements of ΔW formed at once (2 MiB, and as much for what it is compared with): one
#: chunk of rows, at least one row
ROW_CHUNK_ELEMS = 1 << 19

WHOLE, LOWRANK, UNTOUCHED = "whole", "lowrank", "untouched"


def how(expert: Checkpoint, tensor: str) -> str:
    """What the expert's ``tensor`` is made of: ``WHOLE`` (stored, compared with the base),
    ``LOWRANK`` (base or saved tensor plus s·B·A) or ``UNTOUCHED`` (the base's own)."""
    if not isinstance(expert, Adapter):
        return WHOLE
    if tensor in expert.lora.deltas:
        return LOWRANK
    return WHOLE if tensor in expert.lora.replaced else UNTOUCHED


def saved(expert: Checkpoint, tensor: str) -> bool:
    """Whether the expert stores ``tensor``'s values (a full expert always, an adapter when it saves
    the tensor whole, with or without factors): its row MAVs then compare stored values with the
    base's."""
    return not isinstance(expert, Adapter) or tensor in expert.lora.replaced


def factor_specs(adapter: Adapter, tensor: str) -> tuple[TensorSpec, TensorSpec]:
    delta = adapter.lora.deltas[tensor]
    return adapter.specs[delta.a], adapter.specs[delta.b]


def stored_dtype(expert: Checkpoint, tensor: str, base_dtype: str) -> str:
    """The dtype the expert keeps ``tensor``'s values in: its own tensor's where it stores one
    whole, else the factors' (A's) for a low-rank update, the base's for a tensor it leaves alone."""
    if saved(expert, tensor):
        return expert.specs[tensor].dtype
    if how(expert, tensor) == LOWRANK:
        assert isinstance(expert, Adapter)
        return factor_specs(expert, tensor)[0].dtype
    return base_dtype


def read_dtypes(expert: Checkpoint, tensor: str) -> list[str]:
    """The dtypes of what the pass reads of the expert for ``tensor`` (the base's not included)."""
    own = [expert.specs[tensor].dtype] if saved(expert, tensor) else []
    if how(expert, tensor) != LOWRANK:
        return own
    assert isinstance(expert, Adapter)
    return [s.dtype for s in factor_specs(expert, tensor)] + own


def bytes_read(expert: Checkpoint, tensor: str, base_nbytes: int) -> int:
    """What the pass reads for the expert's ``tensor`` besides the base's bytes that the backend
    reads once for all ``WHOLE`` experts: an update's factors and, where the adapter saves the
    tensor too, that tensor and the base's again."""
    own = expert.specs[tensor].nbytes if saved(expert, tensor) else 0
    if how(expert, tensor) != LOWRANK:
        return own
    assert isinstance(expert, Adapter)
    a, b = factor_specs(expert, tensor)
    return a.nbytes + b.nbytes + (own + base_nbytes if own else 0)


def read_float32(ckpt: Checkpoint, spec: TensorSpec) -> np.ndarray:
    """A whole (small) tensor of ``ckpt`` as a float32 array of its shape, read as the merge reads it."""
    return ops.read_float32(spec, (ckpt.input_file(spec.file), spec.offset))


def _rows(ckpt: Checkpoint, spec: TensorSpec, r0: int, r1: int, cols: int) -> bytes:
    size = DTYPE_SIZES[spec.dtype]
    return ckpt.input_file(spec.file).read(spec.offset + r0 * cols * size, (r1 - r0) * cols * size)


def delta_row_mavs(adapter: Adapter, tensor: str, base: Checkpoint, rows: int, cols: int,
                   chunk_elems: int | None = None, threads: int = 0) -> np.ndarray:
    """float64 (rows,): per row of ``tensor``, the mean |expert − base| where the expert is
    ``base + s·B·A`` (or ``R + s·B·A`` when the adapter saves the tensor whole as R), computed
    ``chunk_elems`` (default :data:`ROW_CHUNK_ELEMS`) elements of ΔW at a time, at least one row
    (see the module's numerics)."""
    delta: Delta = adapter.lora.deltas[tensor]
    a_spec, b_spec = factor_specs(adapter, tensor)
    a = read_float32(adapter, a_spec)
    sb = read_float32(adapter, b_spec)
    sb *= np.float32(delta.scale)  # s folded into B: one rounding per element of the small factor
    replaced = adapter.specs[tensor] if tensor in adapter.lora.replaced else None
    base_spec = base.specs[tensor]
    step = min(rows, max(1, (ROW_CHUNK_ELEMS if chunk_elems is None else chunk_elems) // max(cols, 1)))
    # what ΔW is compared with: 0, or W − R where the adapter saves the tensor whole
    against = np.zeros(step * cols, dtype=np.float32)
    out = np.empty(rows, dtype=np.float64)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        n = (r1 - r0) * cols
        # ΔW[r0:r1] = (s·B)[r0:r1]·A, or Aᵀ[r0:r1]·(s·B)ᵀ for a transposed update
        chunk = a[:, r0:r1].T @ sb.T if delta.transposed else sb[r0:r1] @ a
        if replaced is not None:
            _core.blend_buffers([_rows(base, base_spec, r0, r1, cols), _rows(adapter, replaced, r0, r1, cols)],
                                [base_spec.dtype, replaced.dtype], [1.0, -1.0], against[:n], "F32", threads)
        # |ΔW − 0| or |ΔW − (W − R)| = |R + ΔW − W|, per row, by the core's row-MAV kernel
        out[r0:r1] = _core.row_mav_buffers([np.ascontiguousarray(chunk)], ["F32"], against[:n], "F32",
                                           r1 - r0, cols, threads)[0]
    return out


__all__ = ["ROW_CHUNK_ELEMS", "WHOLE", "LOWRANK", "UNTOUCHED", "how", "saved", "stored_dtype", "read_dtypes",
           "bytes_read", "read_float32", "delta_row_mavs"]
