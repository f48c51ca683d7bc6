"""The ops a recipe can name besides ``copy``, by name: each writes one output tensor.

An op reads its inputs' byte ranges, computes through the backend or the C++ core, and writes
``recipe.dtype`` bytes at ``dst``; every number it needs is in ``recipe.params`` (the planner put it
there). A new op is its kernel, its binding and one entry in :data:`OPS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import _core
from ..dtypes import DTYPE_SIZES
from ..formats.checkpoint import TensorSpec
from ..plan import TensorRecipe
from .backends import Backend, InputRange

# Blends proceed in pieces of at most this many bytes, after each of which the write-behind
# (checksum, bounded dirty pages) and the progress bar are told how far the file is: small enough
# that the checksum trails the writer closely, large enough that the Python loop costs nothing.
PIECE_BYTES = 32 << 20


@dataclass
class OpContext:
    """What an op writes with: the backend, the thread count, and ``advance(end, nbytes)`` to
    report that the output is complete up to ``end`` after ``nbytes`` more bytes."""

    backend: Backend
    threads: int
    advance: Callable[[int, int], None]


Op = Callable[[OpContext, _core.ShardWriter, TensorRecipe, Sequence[TensorSpec], Sequence[InputRange], int], None]


def blend(ctx: OpContext, writer: _core.ShardWriter, recipe: TensorRecipe, specs: Sequence[TensorSpec],
          inputs: Sequence[InputRange], dst: int) -> None:
    """Σ weight × input in float32, rounded; elementwise, so a large tensor goes in pieces and the
    write-behind follows each piece instead of waiting for a whole 1 GB embedding."""
    out_size = DTYPE_SIZES[recipe.dtype]
    dtypes = [s.dtype for s in specs]
    in_sizes = [DTYPE_SIZES[d] for d in dtypes]
    numel = specs[0].numel
    step = max(1, PIECE_BYTES // out_size)
    weights = [t.weight for t in recipe.terms]
    for start in range(0, numel, step):
        n = min(step, numel - start)
        pieces = [(f, off + start * size) for (f, off), size in zip(inputs, in_sizes)]
        ctx.backend.blend_file(pieces, dtypes, weights, writer, dst + start * out_size, recipe.dtype, n)
        ctx.advance(dst + (start + n) * out_size, n * out_size)


def ties(ctx: OpContext, writer: _core.ShardWriter, recipe: TensorRecipe, specs: Sequence[TensorSpec],
         inputs: Sequence[InputRange], dst: int) -> None:
    """TIES-merging of the deltas of inputs 1.. against the base, input 0 (the C++ core)."""
    dtypes = [s.dtype for s in specs]
    numel = specs[0].numel
    _core.ties_file(inputs[0], dtypes[0], inputs[1:], dtypes[1:], writer, dst, recipe.dtype, numel,
                    int(recipe.param("keep")), recipe.param("lambda"), threads=ctx.threads)
    _done(ctx, recipe, numel, dst)


def revert_rows(ctx: OpContext, writer: _core.ShardWriter, recipe: TensorRecipe, specs: Sequence[TensorSpec],
                inputs: Sequence[InputRange], dst: int) -> None:
    """Rows of the model (input 1) that changed least go back to the base (input 0): a row MAV
    pass, then byte copies of runs of rows from one or the other."""
    rows = recipe.shape[0] if len(recipe.shape) > 1 else 1
    cols = specs[0].numel // rows if rows else 0
    if rows and cols:
        mav = _core.row_mav_file([inputs[1]], [specs[1].dtype], inputs[0], specs[0].dtype, rows, cols,
                                 threads=ctx.threads)[0]
        import numpy as np  # only reverts need it; a plain merge starts faster without

        revert = rows_to_revert(mav, dict(recipe.params))
        row_bytes = cols * DTYPE_SIZES[recipe.dtype]
        edges = [0, *(np.flatnonzero(np.diff(revert.astype(np.int8))) + 1).tolist(), rows]
        for a, b in zip(edges, edges[1:]):
            src, offset = inputs[0] if revert[a] else inputs[1]
            writer.copy_range(src, offset + a * row_bytes, dst + a * row_bytes, (b - a) * row_bytes)
    _done(ctx, recipe, specs[0].numel, dst)


def rows_to_revert(mav: Any, params: dict[str, float]) -> Any:
    """Rows whose row MAV is below ``threshold``, or the ``count`` rows of smallest row MAV (equal
    MAVs: lower row index first)."""
    import numpy as np

    if "threshold" in params:
        return mav < params["threshold"]
    revert = np.zeros(len(mav), dtype=bool)
    revert[np.argsort(mav, kind="stable")[:int(params["count"])]] = True
    return revert


#: rows of a LoRA product go in blocks of about this many elements, a pread and a pwrite each
#: (512 KiB writes of bf16 cost the page cache ~5% less CPU than 128 KiB ones, measured on a
#: 5632 x 2048 tensor); the products are formed tile by tile in L1 whatever the block
LOWRANK_BLOCK_ELEMS = 1 << 18


def blend_lowrank(ctx: OpContext, writer: _core.ShardWriter, recipe: TensorRecipe, specs: Sequence[TensorSpec],
                  inputs: Sequence[InputRange], dst: int) -> None:
    """The blend of the terms plus Σ weight × B·A of the LoRA factors (after the terms, A and B of
    each), all in float32 and rounded once into the output dtype. Memory holds the factors, which
    are small, and per worker one block of rows, never a whole ΔW.

    One fused kernel of the core (:func:`_core.blend_lowrank_file`) reads each block of rows
    (pread), forms the products B[rows]·A tile by tile (each element a chain of fused
    multiply-adds over the rank), adds ``Σ fl(wᵢ·xᵢ) + Σ fl(w_f·P_f)`` in that order and rounds
    once, then writes the block (pwrite), on ``ctx.threads`` workers (0: every core) without the
    GIL. Each element is computed alone, so the bytes do not depend on the thread count. The
    output goes in pieces of :data:`PIECE_BYTES`, each complete before the next begins, so the
    write-behind and the progress bar follow piece by piece."""
    n = len(recipe.terms)
    rows, cols = recipe.shape
    if rows == 0 or cols == 0:
        return
    pairs = [_product_operands(f, specs[n + 2 * i], inputs[n + 2 * i], specs[n + 2 * i + 1], inputs[n + 2 * i + 1])
             for i, f in enumerate(recipe.factors)]
    dtypes = [s.dtype for s in specs[:n]]
    weights = [t.weight for t in recipe.terms]
    factor_weights = [f.weight for f in recipe.factors]
    in_sizes = [DTYPE_SIZES[d] for d in dtypes]
    out_size = DTYPE_SIZES[recipe.dtype]
    piece = max(1, min(rows, PIECE_BYTES // (out_size * cols)))
    for p0 in range(0, rows, piece):
        p1 = min(rows, p0 + piece)
        pieces = [(f, off + p0 * cols * size) for (f, off), size in zip(inputs[:n], in_sizes)]
        factors = [(left[p0:p1], right) for left, right in pairs]
        _core.blend_lowrank_file(pieces, dtypes, weights, factors, factor_weights, writer,
                                 dst + p0 * cols * out_size, recipe.dtype, p1 - p0, cols,
                                 chunk_elems=LOWRANK_BLOCK_ELEMS, threads=ctx.threads)
        ctx.advance(dst + p1 * cols * out_size, (p1 - p0) * cols * out_size)


def _product_operands(factor: Any, a_spec: TensorSpec, a_src: InputRange, b_spec: TensorSpec,
                      b_src: InputRange) -> tuple[Any, Any]:
    """(left, right), float32 and C-contiguous, with left[rows] @ right the factor's B·A for
    those rows of the weight: (B, A), or (Aᵀ, Bᵀ) for a transposed one (embeddings,
    ``fan_in_fan_out``)."""
    import numpy as np

    a, b = read_float32(a_spec, a_src), read_float32(b_spec, b_src)
    if factor.transposed:
        return np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)
    return b, a


def stack_rows(ctx: OpContext, writer: _core.ShardWriter, recipe: TensorRecipe, specs: Sequence[TensorSpec],
               inputs: Sequence[InputRange], dst: int) -> None:
    """The terms' matrices one below the other, each times its weight: block i is
    ``weight_i × float32(x_i)``, rounded once into the output dtype (the A factor of a merged LoRA
    adapter, A = [w₁s₁·A₁; w₂s₂·A₂; ...]). A block is a blend of one input, so it goes in pieces."""
    out_size = DTYPE_SIZES[recipe.dtype]
    step = max(1, PIECE_BYTES // out_size)
    for term, spec, (f, offset) in zip(recipe.terms, specs, inputs):
        in_size = DTYPE_SIZES[spec.dtype]
        for start in range(0, spec.numel, step):
            n = min(step, spec.numel - start)
            ctx.backend.blend_file([(f, offset + start * in_size)], [spec.dtype], [term.weight], writer,
                                   dst + start * out_size, recipe.dtype, n)
            ctx.advance(dst + (start + n) * out_size, n * out_size)
        dst += spec.numel * out_size


def join_columns(ctx: OpContext, writer: _core.ShardWriter, recipe: TensorRecipe, specs: Sequence[TensorSpec],
                 inputs: Sequence[InputRange], dst: int) -> None:
    """The terms' matrices side by side: row j is ``[w₁·x₁[j], w₂·x₂[j], ...]``, each value
    ``weight × float32(x)`` rounded into the output dtype, so weight 1 into a dtype as wide as the
    input's is exact (the B factor of a merged LoRA adapter, B = [B₁, B₂, ...]). Row chunks:
    memory holds one chunk of every input."""
    import numpy as np  # only adapter outputs need it

    out_size = DTYPE_SIZES[recipe.dtype]
    rows = recipe.shape[0]
    widths = [spec.numel // rows if rows else 0 for spec in specs]
    step = max(1, PIECE_BYTES // max(1, recipe.shape[1] * out_size))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        blocks = []
        for term, spec, (f, offset), width in zip(recipe.terms, specs, inputs, widths):
            in_size = DTYPE_SIZES[spec.dtype]
            raw = f.read(offset + r0 * width * in_size, (r1 - r0) * width * in_size)
            block = np.empty((r1 - r0, width * out_size), dtype=np.uint8)
            _core.blend_buffers([raw], [spec.dtype], [term.weight], block, recipe.dtype, ctx.threads)
            blocks.append(block)
        out = np.concatenate(blocks, axis=1) if blocks else np.empty((r1 - r0, 0), dtype=np.uint8)
        writer.write(dst + r0 * recipe.shape[1] * out_size, out.tobytes())
        ctx.advance(dst + r1 * recipe.shape[1] * out_size, out.nbytes)


def read_float32(spec: TensorSpec, source: InputRange) -> Any:
    """A whole (small) tensor as a float32 array of its shape, exact from BF16, F16 and F32: LoRA
    factors are read once per output tensor."""
    import numpy as np

    f, offset = source
    values = np.empty(spec.shape, dtype=np.float32)
    _core.blend_buffers([f.read(offset, spec.nbytes)], [spec.dtype], [1.0], values, "F32")
    return values


def _done(ctx: OpContext, recipe: TensorRecipe, numel: int, dst: int) -> None:
    nbytes = numel * DTYPE_SIZES[recipe.dtype]
    ctx.advance(dst + nbytes, nbytes)


def _mergekit_op(name: str) -> Op:
    """An op of :mod:`.mergekit_ops`, imported when first run (it needs numpy)."""
    def run(*args: Any) -> None:
        from .mergekit_ops import MERGEKIT_OPS
        MERGEKIT_OPS[name](*args)
    return run


OPS: dict[str, Op] = {"blend": blend, "blend_lowrank": blend_lowrank, "ties": ties, "revert_rows": revert_rows,
                      "stack_rows": stack_rows, "join_columns": join_columns,
                      **{name: _mergekit_op(name) for name in ("mk_linear", "mk_passthrough", "mk_delta", "mk_nearswap",
                                                                  "mk_slerp", "mk_model_stock", "mk_sce",
                                                                  "mk_nuslerp", "mk_multislerp", "mk_ram")}}
