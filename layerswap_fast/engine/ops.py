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


def blend_lowrank(ctx: OpContext, writer: _core.ShardWriter, recipe: TensorRecipe, specs: Sequence[TensorSpec],
                  inputs: Sequence[InputRange], dst: int) -> None:
    """The blend of the terms plus Σ weight × B·A of the LoRA factors (after the terms, A and B of
    each), all in float32 and rounded once into the output dtype. Row chunks: memory holds the
    factors, which are small, and one chunk of rows, never a whole ΔW."""
    import numpy as np  # only adapters need it; a plain merge starts faster without

    n = len(recipe.terms)
    rows, cols = recipe.shape
    factors = [(f, _as_float32(specs[n + 2 * i], inputs[n + 2 * i]), _as_float32(specs[n + 2 * i + 1],
                                                                                inputs[n + 2 * i + 1]))
               for i, f in enumerate(recipe.factors)]
    in_sizes = [DTYPE_SIZES[s.dtype] for s in specs[:n]]
    out_size = DTYPE_SIZES[recipe.dtype]
    step = max(1, PIECE_BYTES // (4 * max(cols, 1)))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        raw = [f.read(off + r0 * cols * size, (r1 - r0) * cols * size) for (f, off), size in zip(inputs[:n], in_sizes)]
        acc = np.empty((r1 - r0, cols), dtype=np.float32)
        _core.blend_buffers(raw, [s.dtype for s in specs[:n]], [t.weight for t in recipe.terms], acc, "F32",
                            ctx.threads)
        for f, a, b in factors:
            product = a[:, r0:r1].T @ b.T if f.transposed else b[r0:r1] @ a
            product *= np.float32(f.weight)
            acc += product
        out = bytearray((r1 - r0) * cols * out_size)
        _core.blend_buffers([acc], ["F32"], [1.0], out, recipe.dtype, ctx.threads)
        writer.write(dst + r0 * cols * out_size, out)
        ctx.advance(dst + r1 * cols * out_size, len(out))


def _as_float32(spec: TensorSpec, source: InputRange) -> Any:
    """A whole (small) tensor as a float32 matrix: LoRA factors are read once per output tensor."""
    import numpy as np

    f, offset = source
    values = np.empty(spec.shape, dtype=np.float32)
    _core.blend_buffers([f.read(offset, spec.nbytes)], [spec.dtype], [1.0], values, "F32")
    return values


def _done(ctx: OpContext, recipe: TensorRecipe, numel: int, dst: int) -> None:
    nbytes = numel * DTYPE_SIZES[recipe.dtype]
    ctx.advance(dst + nbytes, nbytes)


OPS: dict[str, Op] = {"blend": blend, "blend_lowrank": blend_lowrank, "ties": ties, "revert_rows": revert_rows}
