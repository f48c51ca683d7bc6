"""The ops of mergekit 0.1.5's methods, step for step, so that the bytes equal its output.

Each op computes in the recipe's ``compute_dtype`` with torch's rounding
(:mod:`.torch_rounding`) and streams the tensor in chunks of :data:`CHUNK` elements: memory holds
one chunk of every input, never a whole tensor. A selection by magnitude (TIES' top k,
breadcrumbs' band) finds its exact thresholds in two streaming histogram passes over the float32
bit patterns of |delta| (for non-negative floats their order), then keeps ranks in input order.
Ranks among equal magnitudes are mergekit's ``argsort``, whose order among ties torch does not
define; ours is the lower index first, so outputs can differ from mergekit's only at elements whose
|delta| equals a threshold.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TYPE_CHECKING

import numpy as np

from .. import _core
from ..dtypes import DTYPE_SIZES
from ..formats.checkpoint import TensorSpec
from ..plan import TensorRecipe
from . import mergekit_program as program
from .backends import InputRange
from .mergekit_program import locate_rank, Program
from .counter_random import stream_key, uniform
from .torch_rounding import encode, fma, round_to, scalar_in, sum_rounded, to_float32, TorchNorm, TorchSum, torch_norm, torch_sum

if TYPE_CHECKING:  # ops runs these lazily; a runtime import back would be a cycle
    from .ops import OpContext

#: elements per chunk: a few MB of float64 scratch per input
CHUNK = 1 << 20
#: the elements of one tensor that mergekit's slerp reduces at a time (its ``_CHUNK_ELEMENTS``)
SLERP_CHUNK = 1024 * 1024
#: run the ops that have core programs (:mod:`.mergekit_program`) there; False runs the numpy steps
#: they replace (the reference the tests compare the core with)
IN_CORE = True
#: bytes of keep masks (a bit per element and mask) one tensor may hold from one pass to a later
#: one, instead of computing them again (DARE's and DELLA's per model, sce's): a 1b embedding's two
#: models fit; larger tensors (an 8b embedding: 66 MB a model) compute their masks twice, so
#: that peak RSS stays well inside 300 MB
KEPT_MASK_BUDGET = 96 << 20
#: mergekit's consensus methods by the number a recipe holds
CONSENSUS = {0: None, 1: "sum", 2: "count"}


class _Reader:
    """Chunks of a recipe's inputs, each rounded into the compute dtype (mergekit casts on load)."""

    def __init__(self, recipe: TensorRecipe, specs: Sequence[TensorSpec], inputs: Sequence[InputRange]):
        self.specs, self.inputs, self.dtype = specs, inputs, recipe.compute_dtype
        self.numel = specs[0].numel

    def read(self, i: int, start: int, n: int) -> np.ndarray:
        (f, offset), spec = self.inputs[i], self.specs[i]
        size = DTYPE_SIZES[spec.dtype]
        values = to_float32(f.read(offset + start * size, n * size), spec.dtype)
        return values if spec.dtype == self.dtype else round_to(values, self.dtype)

    def chunks(self, size: int = CHUNK) -> Iterator[tuple[int, int]]:
        for start in range(0, self.numel, size):
            yield start, min(size, self.numel - start)


def _write(ctx: OpContext, writer: _core.ShardWriter, recipe: TensorRecipe, dst: int, start: int,
           values: np.ndarray) -> None:
    size = DTYPE_SIZES[recipe.dtype]
    writer.write(dst + start * size, encode(round_to(values, recipe.dtype), recipe.dtype))
    ctx.advance(dst + (start + len(values)) * size, len(values) * size)


def mk_linear(ctx: OpContext, writer: _core.ShardWriter, recipe: TensorRecipe, specs: Sequence[TensorSpec],
              inputs: Sequence[InputRange], dst: int) -> None:
    """mergekit's ``linear``: Σ wᵢ·xᵢ by fused multiply-adds in float32, divided by the float32
    sum of the weights when ``normalize``, rounded into the compute dtype."""
    weights = [np.float32(t.weight) for t in recipe.terms]
    divisor = sum_rounded([np.array([w]) for w in weights], None)[0] if recipe.param("normalize") else None
    if not IN_CORE:
        reader = _Reader(recipe, specs, inputs)
        for start, n in reader.chunks():
            acc = reader.read(0, start, n) * weights[0] + np.float32(0)
            for i, w in enumerate(weights[1:], start=1):
                acc = fma(acc, w, reader.read(i, start, n))
            if divisor is not None:
                acc = acc / divisor
            _write(ctx, writer, recipe, dst, start, round_to(acc, recipe.compute_dtype))
        return
    p = Program(recipe.compute_dtype, [s.dtype for s in specs])
    # the first fused multiply-add onto +0 is one float32 product (+0 added: -0 becomes +0)
    acc = p.addk(p.mulk(p.read(0), weights[0]), 0.0)
    for i, w in enumerate(weights[1:], start=1):
        acc = p.fma64(acc, p.read(i), w)
    if divisor is not None:
        acc = p.divk(acc, divisor)
    p.store(p.round(acc))
    program.write(p, specs, inputs, ctx.threads, writer, dst, recipe.dtype, ctx.advance)


def mk_passthrough(ctx: OpContext, writer: _core.ShardWriter, recipe: TensorRecipe, specs: Sequence[TensorSpec],
                   inputs: Sequence[InputRange], dst: int) -> None:
    """mergekit's ``passthrough``: the one input in the compute dtype, times ``scale`` if given."""
    if IN_CORE:
        p = Program(recipe.compute_dtype, [s_.dtype for s_ in specs])
        x = p.read(0)
        if dict(recipe.params).get("scale") is not None:
            x = p.round(p.mulk(x, np.float32(recipe.param("scale"))))
        p.store(x)
        program.write(p, specs, inputs, ctx.threads, writer, dst, recipe.dtype, ctx.advance)
        return
    reader = _Reader(recipe, specs, inputs)
    scale = dict(recipe.params).get("scale")
    for start, n in reader.chunks():
        x = reader.read(0, start, n)
        if scale is not None:
            x = round_to(x * np.float32(scale), recipe.compute_dtype)
        _write(ctx, writer, recipe, dst, start, x)


def mk_delta(ctx: OpContext, writer: _core.ShardWriter, recipe: TensorRecipe, specs: Sequence[TensorSpec],
             inputs: Sequence[InputRange], dst: int) -> None:
    """mergekit's generalized task arithmetic (task_arithmetic, ties, breadcrumbs, dare, della):
    base ``terms[0]``, models ``terms[1:]`` weighted by their term weights. Each delta is
    sparsified (:class:`_Sparsifier`), weighted, and the deltas summed (only those agreeing with
    the elected sign under a consensus), divided by the summed weights when ``normalize``, scaled
    by ``lambda`` and added to the base."""
    c = recipe.compute_dtype
    params = dict(recipe.params)
    count = len(recipe.terms) - 1
    della = any(f"eps.{i}" in params for i in range(1, count + 1))
    banded = any(params.get(f"hi.{i}", 0) > params.get(f"lo.{i}", 0) for i in range(1, count + 1))
    if IN_CORE and not (della and banded):
        # a rank band counts ties per CHUNK, DELLA's rows need chunks of whole rows; DELLA's own
        # recipes hold no nonempty band (density 0 keeps nothing, 1 everything), others may
        _delta_in_core(ctx, writer, recipe, specs, inputs, dst)
        return
    reader = _Reader(recipe, specs, inputs)
    models = range(1, len(recipe.terms))

    def deltas(start: int, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
        base = reader.read(0, start, n)
        return base, [round_to(reader.read(i, start, n) - base, c) for i in models]

    sparsify = _Sparsifier(recipe, reader, lambda size: (deltas(s, n)[1] for s, n in reader.chunks(size)))
    weights = [scalar_in(recipe.terms[i].weight, c) for i in models]
    consensus = CONSENSUS[int(params.get("consensus", 0))]
    for start, n in reader.chunks(sparsify.chunk):
        base, ds = deltas(start, n)
        ds = [round_to(d * w, c) for d, w in zip(sparsify.apply(start, ds), weights)]
        mixed, divisor = _mix(ds, weights, consensus, c)
        if params.get("normalize"):
            mixed = round_to(mixed / divisor, c)
        if params.get("lambda", 1.0) != 1.0:
            mixed = round_to(mixed * np.float32(params["lambda"]), c)
        _write(ctx, writer, recipe, dst, start, round_to(base + mixed, c))


def _delta_in_core(ctx: OpContext, writer: _core.ShardWriter, recipe: TensorRecipe, specs: Sequence[TensorSpec],
                   inputs: Sequence[InputRange], dst: int) -> None:
    """:func:`mk_delta`'s steps as core programs: the rank bands first
    (:func:`.mergekit_program.rank_bands`), the L1 sums when rescaling, then one writing pass.
    DELLA's programs run over whole rows, in the numpy path's chunks (the L1 sums' order)."""
    c = recipe.compute_dtype
    sparse = _CoreSparsity(ctx, recipe, specs, inputs)
    scales = sparse.l1_scales() if sparse.params.get("rescale") else [None] * sparse.count
    weights = [scalar_in(recipe.terms[i].weight, c) for i in range(1, sparse.count + 1)]
    p = sparse.make()
    base, ds = sparse.deltas(p)
    weighted = []
    for i, (d, kept) in enumerate(zip(ds, sparse.masked(p, ds, reuse=True if sparse.kept_masks else None))):
        d = d if kept is None else kept
        if scales[i] is not None:
            d = p.round(p.mulk(d, scales[i]))
        weighted.append(p.round(p.mulk(d, weights[i])))
    p.store(p.round(p.add(base, _mixed(p, weighted, weights, sparse.params, c))))
    program.write(p, specs, inputs, ctx.threads, writer, dst, recipe.dtype, ctx.advance, chunk=sparse.chunk,
                  masks=sparse.kept_masks)


class _CoreSparsity:
    """What :func:`_delta_in_core` multiplies each model's delta by, as program steps: its rank
    band (TIES, breadcrumbs), its uniform draws (DARE) or DELLA's, or nothing; and the L1 sums that
    rescale them. With rescale the L1 pass keeps the random masks (a bit per element) for the
    writing pass instead of drawing them again (DARE's counter hash, DELLA's ranks of every row),
    within :data:`KEPT_MASK_BUDGET`."""

    def __init__(self, ctx: OpContext, recipe: TensorRecipe, specs: Sequence[TensorSpec],
                 inputs: Sequence[InputRange]) -> None:
        self.ctx, self.recipe, self.specs, self.inputs = ctx, recipe, specs, inputs
        self.params = params = dict(recipe.params)
        self.count = count = len(recipe.terms) - 1
        self.ranges = [(int(params[f"lo.{i}"]), int(params[f"hi.{i}"])) if f"lo.{i}" in params else None
                       for i in range(1, count + 1)]
        self.bands = program.rank_bands(self.ranges, lambda p: self.deltas(p)[1], self.make, specs, inputs,
                                        ctx.threads)
        self.seed = int(params.get("seed", 0))
        self.cols = recipe.shape[-1] if len(recipe.shape) > 1 else max(1, specs[0].numel)  # DELLA's rows
        self.slots = {i: k for k, i in enumerate(i for i in range(count) if f"p.{i + 1}" in params)}  # its mask
        della = any(f"eps.{i + 1}" in params for i in range(count))
        self.chunk = program.row_chunk(self.cols) if della else program.CHUNK  # the numpy path's chunks
        self.kept_masks = _kept_masks(len(self.slots), specs[0].numel) if params.get("rescale") else []

    def make(self) -> Program:
        return Program(self.recipe.compute_dtype, [s.dtype for s in self.specs])

    def deltas(self, p: Program) -> tuple[int, list[int]]:
        return _vectors(p, range(self.count))

    def masked(self, p: Program, ds: list[int], reuse: bool | None = None) -> list[int | None]:
        """Each delta times its mask (None: no mask). ``reuse``: the random masks kept in
        ``kept_masks`` (False: computed and kept; True: read back)."""
        out: list[int | None] = []
        for i, d in enumerate(ds):
            r, band = self.ranges[i], self.bands[i]
            prob, eps = self.params.get(f"p.{i + 1}"), self.params.get(f"eps.{i + 1}")
            key = stream_key(self.seed, self.recipe.name, i + 1)
            if prob is not None and reuse:
                out.append(p.mul(d, p.mask_in(self.slots[i])))
            elif prob is not None:
                keep = p.della_lt(d, key, prob, eps, self.cols) if eps is not None else p.uniform_lt(key, prob)
                if reuse is False:
                    p.mask_out(keep, self.slots[i])
                out.append(p.mul(d, keep))
            elif r is not None:
                out.append(p.mul(d, p.rank(d, band) if band is not None else p.const(0.0)))
            else:
                out.append(None)
        return out

    def l1_scales(self) -> list[np.float32 | None]:
        """Each sparsified delta's rescale factor: its L1 norm before over after, in one pass
        (which keeps the random masks when they fit the budget)."""
        p = self.make()
        _, ds = self.deltas(p)
        for d, kept in zip(ds, self.masked(p, ds, reuse=False if self.kept_masks else None)):
            p.sum64(p.abs(d))
            p.sum64(p.abs(d if kept is None else kept))
        sums, _, _ = program.run(p, self.specs, self.inputs, self.ctx.threads, segment=self.chunk,
                                 masks=self.kept_masks)
        totals = np.zeros(2 * self.count)
        for row in sums:  # the segments' float64 sums, added in order
            totals += row
        c = self.recipe.compute_dtype
        return [l1_scale(totals[2 * i], totals[2 * i + 1], c) for i in range(self.count)]


def _kept_masks(count: int, numel: int) -> list[np.ndarray]:
    """``count`` zeroed masks of a bit per element for a later pass to read back
    (:meth:`.Program.mask_out`), or none when they would pass :data:`KEPT_MASK_BUDGET` (the masks
    are then computed again)."""
    size = -(-numel // 8)
    return [np.zeros(size, dtype=np.uint8) for _ in range(count)] if count * size <= KEPT_MASK_BUDGET else []


def _mixed(p: Program, weighted: list[int], weights: list[np.float32], params: Mapping[str, Any],
           c: str | None) -> int:
    """The weighted deltas added, by sign consensus when one is set (TIES), normalized and scaled
    by lambda when asked: :func:`_mix`'s steps."""
    consensus = CONSENSUS[int(params.get("consensus", 0))]
    # the divisor's steps are made only when normalizing: a program computes every step it holds
    if consensus is None:
        mixed = p.sum_rounded(weighted)
        total = sum_rounded([np.full(1, w) for w in weights], c)[0]
        divisor = lambda: p.const(np.float32(1) if abs(total) < 1e-8 else total)  # noqa: E731
    else:
        signs = [p.sign(d) for d in weighted]
        majority = p.majority(p.sum_rounded(weighted if consensus == "sum" else signs))
        agree = [p.eq(s_, majority) for s_ in signs]
        mixed = p.sum_rounded([p.mul(d, a) for d, a in zip(weighted, agree)])
        divisor = lambda: p.zero_to_one(p.sum_rounded([p.mulk(a, w) for a, w in zip(agree, weights)]))  # noqa: E731
    if params.get("normalize"):
        mixed = p.round(p.div(mixed, divisor()))
    if params.get("lambda", 1.0) != 1.0:
        mixed = p.round(p.mulk(mixed, np.float32(params["lambda"])))
    return mixed


class _Sparsifier:
    """Each model's delta as mergekit's ``sparsify`` leaves it: the descending magnitude ranks
    ``[lo.i, hi.i)`` (magnitude, breadcrumbs); or kept with probability ``p.i`` (DARE), or per
    row with ``p.i − eps.i + 2·eps.i·rank/(cols − 1)`` by ascending magnitude rank (DELLA), from
    the counter-based stream keyed by ``seed``, the tensor's name and the model; then, with
    ``rescale``, scaled to the L1 norm it had (sums over the whole tensor: a first pass)."""

    def __init__(self, recipe: TensorRecipe, reader: _Reader, stream: Callable[[int], Iterator[list[np.ndarray]]]):
        params = dict(recipe.params)
        self.c = recipe.compute_dtype
        count = len(recipe.terms) - 1
        ranges = [(int(params[f"lo.{i}"]), int(params[f"hi.{i}"])) if f"lo.{i}" in params else None
                  for i in range(1, count + 1)]
        self.p = [params.get(f"p.{i}") for i in range(1, count + 1)]
        self.eps = [params.get(f"eps.{i}") for i in range(1, count + 1)]
        self.keys = [stream_key(int(params.get("seed", 0)), recipe.name, i) for i in range(1, count + 1)]
        self.cols = recipe.shape[-1] if len(recipe.shape) > 1 else max(1, reader.numel)
        self.chunk = max(self.cols, CHUNK // self.cols * self.cols) if any(e is not None for e in self.eps) else CHUNK
        self.ranks = _RankSelection(ranges, lambda: stream(CHUNK))
        self.scale: list[np.float32 | None] = [None] * count
        if params.get("rescale"):
            self.scale = self._l1_scales(stream)

    def masks(self, start: int, ds: list[np.ndarray]) -> list[np.ndarray]:
        kept = self.ranks.masks(ds)
        for i, d in enumerate(ds):
            if self.p[i] is None:
                continue
            draw = uniform(self.keys[i], start, len(d))
            if self.eps[i] is None:
                kept[i] = draw < self.p[i]
            else:
                kept[i] = draw < self._della_probabilities(d, self.p[i], self.eps[i])
        return kept

    def _della_probabilities(self, d: np.ndarray, density: float, eps: float) -> np.ndarray:
        rows = np.abs(d).reshape(-1, self.cols)
        rank = np.argsort(np.argsort(rows, axis=1, kind="stable"), axis=1, kind="stable").astype(np.float64)
        norm = rank / (self.cols - 1) if self.cols > 1 else np.zeros_like(rank)
        return ((density - eps) + norm * 2 * eps).reshape(-1)

    def apply(self, start: int, ds: list[np.ndarray]) -> list[np.ndarray]:
        out = []
        for d, mask, scale in zip(ds, self.masks(start, ds), self.scale):
            masked = d * mask.astype(np.float32)
            out.append(masked if scale is None else round_to(masked * scale, self.c))
        return out

    def _l1_scales(self, stream: Callable[[int], Iterator[list[np.ndarray]]]) -> list[np.float32 | None]:
        """mergekit's ``rescaled_masked_tensor`` with the L1 norm (:func:`l1_scale`), the sums in
        float64, each chunk's by :func:`lane_sum`, the chunks in order. The mask is drawn again
        in the writing pass; the rank selection's tie counts start over."""
        before = np.zeros(len(self.p))
        after = np.zeros(len(self.p))
        start = 0
        for ds in stream(self.chunk):
            for i, (d, mask) in enumerate(zip(ds, self.masks(start, ds))):
                magnitude = np.abs(d)
                before[i] += lane_sum(magnitude)
                after[i] += lane_sum(magnitude * mask)
            start += len(ds[0])
        self.ranks.restart()
        return [l1_scale(b, a, self.c) for b, a in zip(before, after)]


def lane_sum(x: np.ndarray) -> float:
    """Σx in float64 in the core's order (its Sum64): element e into lane e % 8, each lane in
    element order, then the eight lanes in order. Eight chains instead of one: the core's sum runs
    at one add's latency per eight elements, and the order stays defined."""
    lanes = [float(np.cumsum(x[k::8], dtype=np.float64)[-1]) if len(x) > k else 0.0 for k in range(8)]
    total = lanes[0]
    for v in lanes[1:]:
        total += v
    return total


def l1_scale(before: float, after: float, c: str | None) -> np.float32 | None:
    """The rescale factor Σ|delta| / Σ|kept| from the float64 sums, each rounded into the compute
    dtype; None when either is below 1e-7."""
    b32, a32 = round_to(np.float32(before), c), round_to(np.float32(after), c)
    return None if b32 < 1e-7 or a32 < 1e-7 else np.float32(round_to(b32 / a32, c))


def mk_nearswap(ctx: OpContext, writer: _core.ShardWriter, recipe: TensorRecipe, specs: Sequence[TensorSpec],
                inputs: Sequence[InputRange], dst: int) -> None:
    """mergekit's ``nearswap``: w = clamp(t / max(|base − x|, 1e-6), 0, 1), then w·x + (1 − w)·base."""
    if IN_CORE:
        p = Program(recipe.compute_dtype, [s_.dtype for s_ in specs])
        a, b = p.read(0), p.read(1)
        near = p.round(p.maxk(p.round(p.abs(p.sub(a, b))), np.float32(1e-6)))
        w = p.clipk(p.round(p.mulk(p.round(p.kdiv(1.0, near)), np.float32(recipe.param("t")))), 0.0, 1.0)
        p.store(p.round(p.add(p.round(p.mul(w, b)), p.round(p.mul(p.round(p.ksub(1.0, w)), a)))))
        program.write(p, specs, inputs, ctx.threads, writer, dst, recipe.dtype, ctx.advance)
        return
    c = recipe.compute_dtype
    reader = _Reader(recipe, specs, inputs)
    t = np.float32(recipe.param("t"))
    for start, n in reader.chunks():
        a, b = reader.read(0, start, n), reader.read(1, start, n)
        near = round_to(np.maximum(round_to(np.abs(a - b), c), np.float32(1e-6)), c)
        # `t / tensor` in torch is reciprocal(tensor) · t, two roundings
        w = np.clip(round_to(round_to(np.float32(1) / near, c) * t, c), 0, 1)
        _write(ctx, writer, recipe, dst, start,
               round_to(round_to(w * b, c) + round_to(round_to(1 - w, c) * a, c), c))


def mk_slerp(ctx: OpContext, writer: _core.ShardWriter, recipe: TensorRecipe, specs: Sequence[TensorSpec],
             inputs: Sequence[InputRange], dst: int) -> None:
    """mergekit's ``slerp`` from the base (input 0) to input 1 at ``t``, the whole tensor one
    vector, in float32: per chunk of :data:`SLERP_CHUNK` the norms, their norm, then per chunk
    the dot product of the normalised vectors, their sum, then the spherical (or, when
    |cos| > 0.9995, linear) coefficients. Two streaming passes find the reductions, summed in
    torch's order (:func:`torch_sum`, :func:`torch_norm`)."""
    if IN_CORE:
        _slerp_in_core(ctx, writer, recipe, specs, inputs, dst)
        return
    reader = _Reader(recipe, specs, inputs)
    parts: list[list[np.float32]] = [[], []]
    for start, n in reader.chunks(SLERP_CHUNK):
        for i in (0, 1):
            parts[i].append(torch_norm(reader.read(i, start, n)))
    norms = [torch_norm(np.array(p, dtype=np.float32)) if p else np.float32(0) for p in parts]
    norms = [x if x > np.float32(1e-8) else np.float32(1) for x in norms]
    dots = [torch_sum((reader.read(0, start, n) / norms[0]) * (reader.read(1, start, n) / norms[1]))
            for start, n in reader.chunks(SLERP_CHUNK)]
    dot = np.clip(torch_sum(np.array(dots, dtype=np.float32)), np.float32(-1), np.float32(1))
    coef_a, coef_b = slerp_coefficients(np.float32(recipe.param("t")), dot)
    for start, n in reader.chunks():
        x, y = reader.read(0, start, n), reader.read(1, start, n)
        _write(ctx, writer, recipe, dst, start, round_to(coef_a * x + coef_b * y, recipe.compute_dtype))


def _task_vectors(reader: _Reader, start: int, n: int, count: int, c: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """The base's chunk (input 0) and each model's offset from it, rounded to the compute dtype."""
    base = reader.read(0, start, n)
    return base, [round_to(reader.read(i, start, n) - base, c) for i in range(1, count + 1)]


def mk_model_stock(ctx: OpContext, writer: _core.ShardWriter, recipe: TensorRecipe, specs: Sequence[TensorSpec],
                   inputs: Sequence[InputRange], dst: int) -> None:
    """mergekit's ``model_stock`` (whole tensors, not ``filter_wise``), in the compute dtype:
    the mean pairwise cosine of the models' offsets from the base (input 0), t = N·cos/(1 +
    (N − 1)·cos) (0 where the denominator vanishes), then t·mean(models) + (1 − t)·base. The
    norms and dot products are a streaming pass in torch's summation order."""
    if IN_CORE:
        _model_stock_in_core(ctx, writer, recipe, specs, inputs, dst)
        return
    c = recipe.compute_dtype
    reader = _Reader(recipe, specs, inputs)
    count = len(recipe.terms) - 1
    pairs = [(i, j) for i in range(count) for j in range(i + 1, count)]
    norms = [TorchNorm(reader.numel) for _ in range(count)]
    dots = [TorchSum(reader.numel) for _ in pairs]
    for start, n in reader.chunks():
        _, offsets = _task_vectors(reader, start, n, count, c)
        for norm, offset in zip(norms, offsets):
            norm.add(offset)
        for dot, (i, j) in zip(dots, pairs):
            dot.add(round_to(offsets[i] * offsets[j], c))
    t = _model_stock_t([norm.total() for norm in norms], [dot.total() for dot in dots], c)
    for start, n in reader.chunks():
        base = reader.read(0, start, n)
        total = reader.read(1, start, n)
        for i in range(2, count + 1):
            total = round_to(total + reader.read(i, start, n), c)
        average = round_to(total / np.float32(count), c)
        _write(ctx, writer, recipe, dst, start,
               round_to(round_to(t * average, c) + round_to(round_to(np.float32(1) - t, c) * base, c), c))


def mk_sce(ctx: OpContext, writer: _core.ShardWriter, recipe: TensorRecipe, specs: Sequence[TensorSpec],
           inputs: Sequence[InputRange], dst: int) -> None:
    """mergekit's ``sce`` in the compute dtype: the task vectors (models minus the base, input 0)
    keep the elements of the top ``select_topk`` fraction of nonzero variance across models;
    each is weighted by its mean square over the sum of them, only the ones agreeing with the
    elected sign count, and their weighted sum, divided by the summed weights, is added to the
    base. Passes: variance count, its threshold (two), the mean squares, the output."""
    if IN_CORE:
        _sce_in_core(ctx, writer, recipe, specs, inputs, dst)
        return
    c = recipe.compute_dtype
    reader = _Reader(recipe, specs, inputs)
    count = len(recipe.terms) - 1

    def task_vectors(start: int, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
        return _task_vectors(reader, start, n, count, c)

    def variances() -> Iterator[list[np.ndarray]]:
        for start, n in reader.chunks():
            yield [round_to(_population_variance(task_vectors(start, n)[1]), c)]

    topk = recipe.param("select_topk")
    select = None
    if topk < 1:
        nonzero = sum(int(np.count_nonzero(v[0])) for v in variances()) if topk > 0 else 0
        k = int(np.float32(np.float32(nonzero) * np.float32(topk)))
        select = _RankSelection([(0, k)], variances)
    squares = [TorchSum(reader.numel) for _ in range(count)]
    for start, n in reader.chunks():
        _, tvs = task_vectors(start, n)
        mask = _sce_mask(select, tvs, c)
        for total, tv in zip(squares, tvs):
            total.add(round_to(np.square(tv * mask), c))
    weights = _sce_weights([round_to(round_to(s.total(), c) / np.float32(reader.numel), c) for s in squares], c)
    if select is not None:
        select.restart()
    for start, n in reader.chunks():
        base, tvs = task_vectors(start, n)
        mask = _sce_mask(select, tvs, c)
        tvs = [tv * mask for tv in tvs]
        signs = [np.sign(tv) for tv in tvs]
        majority = np.where(sum_rounded(tvs, c) >= 0, np.float32(1), np.float32(-1))
        erased = [w * (sign == majority).astype(np.float32) for w, sign in zip(weights, signs)]
        merged = sum_rounded([round_to(tv * e, c) for tv, e in zip(tvs, erased)], c)
        divisor = round_to(np.maximum(sum_rounded(erased, c), np.float32(1e-6)), c)
        _write(ctx, writer, recipe, dst, start, round_to(base + round_to(merged / divisor, c), c))


def _sce_in_core(ctx: OpContext, writer: _core.ShardWriter, recipe: TensorRecipe, specs: Sequence[TensorSpec],
                 inputs: Sequence[InputRange], dst: int) -> None:
    """:func:`mk_sce` as core programs: the count of nonzero variances, the variance band
    (:func:`.mergekit_program.rank_bands`), the mean squares (whole tensor, torch's order), the
    output."""
    c = recipe.compute_dtype
    dtypes = [s_.dtype for s_ in specs]
    count = len(recipe.terms) - 1
    numel = specs[0].numel

    def task_vectors(p: Program) -> tuple[int, list[int]]:
        return _vectors(p, range(count))

    def variance(p: Program) -> int:
        return p.round(p.var_pop(task_vectors(p)[1]))

    topk = recipe.param("select_topk")
    band: tuple[Any, ...] | None = None
    if topk < 1:
        nonzero, high = 0, None
        if topk > 0 and numel:  # one pass: the zero variances and the band's first histogram
            p = Program(c, dtypes)
            v = variance(p)
            p.hist_high(v)
            # rounded to 16 bits, only zero has its high 16 bits zero: bin 0 counts the zeros
            zeros_in_bin_0 = c in ("BF16", "F16")
            if not zeros_in_bin_0:
                p.eq_count(v, 0)
            _, hists, counts, tables = program.run(p, specs, inputs, ctx.threads, task_hists=True)
            high = (hists, tables)
            nonzero = numel - int(hists[0, 0] if zeros_in_bin_0 else counts[:, 0].sum())
        k = int(np.float32(np.float32(nonzero) * np.float32(topk)))
        band = program.rank_bands([(0, k)], lambda p: [variance(p)], lambda: Program(c, dtypes), specs, inputs,
                                  ctx.threads, high=high)[0]

    # the band's mask (a variance and a rank per element) is kept from the squares' pass for the
    # output's, within the budget
    kept = _kept_masks(1, numel) if band is not None else []

    def masked(p: Program, keep: bool = False) -> tuple[int, list[int]]:
        """The task vectors times the band's mask: computed (and with ``keep`` kept), or read
        back from the kept one."""
        base, tvs = task_vectors(p)
        if topk >= 1:
            return base, tvs
        if kept and not keep:
            mask = p.mask_in(0)
        elif band is not None:
            mask = p.rank(p.round(p.var_pop(tvs)), band)
            if kept:
                p.mask_out(mask, 0)
        else:
            mask = p.const(0.0)
        return base, [p.mul(tv, mask) for tv in tvs]

    # one program for every model's squares: the mask they share is computed once
    p = Program(c, dtypes)
    for tv in masked(p, keep=True)[1]:
        p.sum(p.round(p.mul(tv, tv)))
    squares = _whole_sums(p, specs, inputs, ctx.threads, masks=kept)
    weights = _sce_weights([round_to(round_to(np.float32(x), c) / np.float32(numel), c) for x in squares], c)
    p = Program(c, dtypes)
    base, tvs = masked(p)
    signs = [p.sign(tv) for tv in tvs]
    majority = p.majority(p.sum_rounded(tvs))
    erased = [p.mulk(p.eq(sign, majority), w) for sign, w in zip(signs, weights)]
    merged = p.sum_rounded([p.round(p.mul(tv, e)) for tv, e in zip(tvs, erased)])
    divisor = p.round(p.maxk(p.sum_rounded(erased), np.float32(1e-6)))
    p.store(p.round(p.add(base, p.round(p.div(merged, divisor)))))
    program.write(p, specs, inputs, ctx.threads, writer, dst, recipe.dtype, ctx.advance, masks=kept)


def _population_variance(xs: list[np.ndarray]) -> np.ndarray:
    """``torch.var(dim=0, unbiased=False)`` on the CPU: Welford's updates in float64."""
    mean = np.zeros(len(xs[0]))
    m2 = np.zeros(len(xs[0]))
    for k, x in enumerate(xs, start=1):
        x64 = x.astype(np.float64)
        delta = x64 - mean
        mean = mean + delta / k
        m2 = m2 + delta * (x64 - mean)
    return (m2 / len(xs)).astype(np.float32)


def _sce_mask(select: _RankSelection | None, tvs: list[np.ndarray], c: str | None) -> np.ndarray:
    if select is None:
        return np.ones(len(tvs[0]), dtype=np.float32)
    return select.masks([round_to(_population_variance(tvs), c)])[0].astype(np.float32)


def _sce_weights(means: list[np.ndarray], c: str | None) -> list[np.float32]:
    """Each model's mean square over their sum (uniform when the sum is below 1e-6)."""
    total = float(torch_sum(np.array(means, dtype=np.float32).reshape(-1)))
    total = float(round_to(np.float32(total), c))
    if abs(total) < 1e-6:
        return [np.float32(round_to(np.float32(1) / np.float32(len(means)), c))] * len(means)
    return [np.float32(round_to(m / np.float32(total), c)) for m in means]


def mk_nuslerp(ctx: OpContext, writer: _core.ShardWriter, recipe: TensorRecipe, specs: Sequence[TensorSpec],
               inputs: Sequence[InputRange], dst: int) -> None:
    """mergekit's ``nuslerp`` over whole (flattened) tensors in the compute dtype: slerp at ``t``
    between the two models' task vectors (against the base, input 0, when ``base`` is 1; else
    between the models themselves), added back to the base. Passes: norms, cosine, output."""
    if IN_CORE:
        _nuslerp_in_core(ctx, writer, recipe, specs, inputs, dst)
        return
    c = recipe.compute_dtype
    reader = _Reader(recipe, specs, inputs)
    has_base = bool(recipe.param("base"))
    first = 1 if has_base else 0

    def vectors(start: int, n: int) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        base = reader.read(0, start, n) if has_base else None
        v = [reader.read(first + i, start, n) for i in (0, 1)]
        if base is not None:
            v = [round_to(x - base, c) for x in v]
        return base, v[0], v[1]

    norms = [TorchNorm(reader.numel), TorchNorm(reader.numel)]
    for start, n in reader.chunks():
        _, v0, v1 = vectors(start, n)
        norms[0].add(v0)
        norms[1].add(v1)
    length = [round_to(np.maximum(round_to(x.total(), c), np.float32(1e-7)), c) for x in norms]
    dot = TorchSum(reader.numel)
    for start, n in reader.chunks():
        _, v0, v1 = vectors(start, n)
        dot.add(round_to(round_to(v0 / length[0], c) * round_to(v1 / length[1], c), c))
    cos = np.clip(round_to(dot.total(), c), np.float32(-1), np.float32(1))
    t = recipe.param("t")
    colinear, sin_theta, sin_a, sin_b = _nuslerp_angles(cos, t, c)
    for start, n in reader.chunks():
        base, v0, v1 = vectors(start, n)
        if colinear:
            result = round_to(round_to(v0 * np.float32(1 - t), c) + round_to(v1 * np.float32(t), c), c)
        else:
            result = round_to(round_to(round_to(sin_a * v0, c) + round_to(sin_b * v1, c), c) / sin_theta, c)
        _write(ctx, writer, recipe, dst, start, result if base is None else round_to(base + result, c))


def mk_multislerp(ctx: OpContext, writer: _core.ShardWriter, recipe: TensorRecipe, specs: Sequence[TensorSpec],
                  inputs: Sequence[InputRange], dst: int) -> None:
    """mergekit's ``multislerp`` in the compute dtype: the models' vectors (task vectors when
    ``base`` is 1, the base being input 0) projected onto the unit sphere, averaged with the
    term weights, mapped to the tangent space at that mean, averaged there, mapped back and
    scaled by the weighted mean norm. Five streaming passes: norms, the mean's norm, the dot
    products with the mean, the tangent mean's norm, the output."""
    if IN_CORE:
        _multislerp_in_core(ctx, writer, recipe, specs, inputs, dst)
        return
    c = recipe.compute_dtype
    reader = _Reader(recipe, specs, inputs)
    has_base, first, eps, weights = _multislerp_terms(recipe)
    count = len(weights)

    def vectors(start: int, n: int) -> tuple[np.ndarray | None, list[np.ndarray]]:
        base = reader.read(0, start, n) if has_base else None
        vs = [reader.read(first + i, start, n) for i in range(count)]
        return base, vs if base is None else [round_to(v - base, c) for v in vs]

    norms = [TorchNorm(reader.numel) for _ in range(count)]
    for start, n in reader.chunks():
        for norm, v in zip(norms, vectors(start, n)[1]):
            norm.add(v)
    lengths = [np.float32(round_to(x.total(), c)) for x in norms]

    def units(start: int, n: int) -> tuple[np.ndarray | None, list[np.ndarray], np.ndarray]:
        base, vs = vectors(start, n)
        us = [round_to(v / round_to(length + eps, c), c) for v, length in zip(vs, lengths)]
        return base, us, sum_rounded([round_to(u * w, c) for u, w in zip(us, weights)], c)

    mean_norm = TorchNorm(reader.numel)
    for start, n in reader.chunks():
        mean_norm.add(units(start, n)[2])
    center = _multislerp_center(mean_norm.total(), eps, recipe)
    dots = [TorchSum(reader.numel) for _ in range(count)]
    for start, n in reader.chunks():
        _, us, mean = units(start, n)
        mean = round_to(mean / center, c)
        for dot, u in zip(dots, us):
            dot.add(round_to(u * mean, c))
    along = [np.float32(round_to(d.total(), c)) for d in dots]

    def tangent(start: int, n: int) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        base, us, mean = units(start, n)
        mean = round_to(mean / center, c)
        ts = [round_to(u - round_to(d * mean, c), c) for u, d in zip(us, along)]
        return base, mean, sum_rounded([round_to(t * w, c) for t, w in zip(ts, weights)], c)

    tangent_norm = TorchNorm(reader.numel)
    for start, n in reader.chunks():
        tangent_norm.add(tangent(start, n)[2])
    cos, sinc, scale = _multislerp_rotation(tangent_norm.total(), lengths, weights, eps, c)
    for start, n in reader.chunks():
        base, mean, t = tangent(start, n)
        result = round_to(round_to(round_to(mean * cos, c) + round_to(t * sinc, c), c) * scale, c)
        _write(ctx, writer, recipe, dst, start, result if base is None else round_to(result + base, c))


def _multislerp_terms(recipe: TensorRecipe) -> tuple[bool, int, np.float32, list[np.float32]]:
    """Whether multislerp's vectors are task vectors, the first model's input, eps, the weights
    (normalised to sum 1 when asked)."""
    c = recipe.compute_dtype
    has_base = bool(recipe.param("base"))
    first = 1 if has_base else 0
    weights = [scalar_in(t.weight, c) for t in recipe.terms[first:]]
    if recipe.param("normalize"):
        total = round_to(torch_sum(np.array(weights, dtype=np.float32)), c)
        weights = [np.float32(round_to(w / total, c)) for w in weights]
    return has_base, first, np.float32(recipe.param("eps")), weights


def _multislerp_center(norm: np.float32, eps: np.float32, recipe: TensorRecipe) -> np.float32:
    """The norm of the weighted mean of the unit vectors, which must not vanish."""
    center = np.float32(round_to(norm, recipe.compute_dtype))
    if center < eps:
        raise ValueError(f"multislerp of {recipe.name}: the weighted mean of the unit vectors is zero")
    return center


def _multislerp_rotation(tangent_norm: np.float32, lengths: list[np.float32], weights: list[np.float32],
                         eps: np.float32, c: str | None) -> tuple[np.float32, np.float32, np.float32]:
    """From the tangent mean's norm: cos and sin(θ)/θ of the exponential map, and the output's
    scale (the weighted mean norm)."""
    angle = np.float32(round_to(round_to(tangent_norm, c) + eps, c))
    cos = np.float32(round_to(np.float32(math.cos(angle)), c))
    sinc = np.float32(round_to(round_to(np.float32(math.sin(angle)), c) / angle, c))
    scale = round_to(torch_sum(np.array([round_to(x * w, c) for x, w in zip(lengths, weights)], dtype=np.float32)),
                     c)
    return cos, sinc, np.float32(scale)


def _multislerp_in_core(ctx: OpContext, writer: _core.ShardWriter, recipe: TensorRecipe,
                        specs: Sequence[TensorSpec], inputs: Sequence[InputRange], dst: int) -> None:
    """:func:`mk_multislerp` as core programs: four whole-tensor reductions in torch's order (the
    models' norms side by side, one worker each; the mean's norm, the dot products and the
    tangent's norm on every thread) and the output on all threads, each pass rebuilding the steps
    before it."""
    c = recipe.compute_dtype
    dtypes = [s_.dtype for s_ in specs]
    has_base, _, eps, weights = _multislerp_terms(recipe)
    count = len(weights)

    def units(p: Program, lengths: list[np.float32]) -> tuple[int | None, list[int], int]:
        base, vs = _vectors(p, range(count), has_base)
        us = [p.round(p.divk(v, float(round_to(length + eps, c)))) for v, length in zip(vs, lengths)]
        return base, us, p.sum_rounded([p.round(p.mulk(u, w)) for u, w in zip(us, weights)])

    def tangent(p: Program, lengths: list[np.float32], center: np.float32,
                along: list[np.float32]) -> tuple[int | None, int, int]:
        base, us, mean = units(p, lengths)
        mean = p.round(p.divk(mean, center))
        ts = [p.round(p.sub(u, p.round(p.mulk(mean, d)))) for u, d in zip(us, along)]
        return base, mean, p.sum_rounded([p.round(p.mulk(t, w)) for t, w in zip(ts, weights)])

    norms = [Program(c, dtypes) for _ in range(count)]
    for i, p in enumerate(norms):
        p.norm(_vectors(p, [i], has_base)[1][0])
    lengths = [np.float32(round_to(x, c)) for x in _whole_sums(norms, specs, inputs, ctx.threads)]
    p = Program(c, dtypes)
    p.norm(units(p, lengths)[2])
    center = _multislerp_center(_whole_sums(p, specs, inputs, ctx.threads)[0], eps, recipe)
    p = Program(c, dtypes)  # one program: every dot product needs the whole mean
    _, us, mean = units(p, lengths)
    mean = p.round(p.divk(mean, center))
    for u in us:
        p.sum(p.round(p.mul(u, mean)))
    along = [np.float32(round_to(x, c)) for x in _whole_sums(p, specs, inputs, ctx.threads)]
    p = Program(c, dtypes)
    p.norm(tangent(p, lengths, center, along)[2])
    cos, sinc, scale = _multislerp_rotation(_whole_sums(p, specs, inputs, ctx.threads)[0], lengths, weights, eps, c)
    p = Program(c, dtypes)
    base, mean, t = tangent(p, lengths, center, along)
    result = p.round(p.mulk(p.round(p.add(p.round(p.mulk(mean, cos)), p.round(p.mulk(t, sinc)))), scale))
    p.store(result if base is None else p.round(p.add(result, base)))
    program.write(p, specs, inputs, ctx.threads, writer, dst, recipe.dtype, ctx.advance)


def mk_ram(ctx: OpContext, writer: _core.ShardWriter, recipe: TensorRecipe, specs: Sequence[TensorSpec],
           inputs: Sequence[InputRange], dst: int) -> None:
    """mergekit's ``ram`` and ``ramplus_tl``: each task vector (against the base, input 0) counts
    where |tv| > epsilon; an element changed by one model takes that change (``ramplus_tl``: times
    1 + r·clamp(shared/unique, 0, alpha), per model, computed in float32, which makes the result
    float32 as torch promotes it), one changed by several the mean of their changes."""
    if IN_CORE:
        _ram_in_core(ctx, writer, recipe, specs, inputs, dst)
        return
    c = recipe.compute_dtype
    reader = _Reader(recipe, specs, inputs)
    params = dict(recipe.params)
    count = len(recipe.terms) - 1
    threshold = scalar_in(params["epsilon"], c)  # torch compares in the tensor's dtype

    def task_vectors(start: int, n: int) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray], np.ndarray]:
        base = reader.read(0, start, n)
        tvs = [round_to(reader.read(i, start, n) - base, c) for i in range(1, count + 1)]
        changed = [np.abs(tv) > threshold for tv in tvs]
        return base, tvs, changed, np.sum(changed, axis=0)

    scales: list[np.float32] | None = None
    if "r" in params:
        shared, unique = np.zeros(count, dtype=np.int64), np.zeros(count, dtype=np.int64)
        for start, n in reader.chunks():
            _, _, changed, counts = task_vectors(start, n)
            for i, ch in enumerate(changed):
                shared[i] += int(np.count_nonzero(ch & (counts > 1)))
                unique[i] += int(np.count_nonzero(ch & (counts == 1)))
        scales = _ramplus_scales(list(shared), list(unique), params)
    for start, n in reader.chunks():
        base, tvs, changed, counts = task_vectors(start, n)
        unique = (counts == 1).astype(np.float32)
        overlap = (counts > 1).astype(np.float32)
        divisor = np.maximum(counts, 1).astype(np.float32)
        terms = []
        for i, (tv, ch) in enumerate(zip(tvs, changed)):
            kept = tv * ch.astype(np.float32)
            shared_part = round_to(kept * overlap / divisor, c)
            if scales is None:
                terms.append(round_to(kept * unique + shared_part, c))
            else:
                terms.append(kept * unique * scales[i] + shared_part)
        merged = sum_rounded(terms, None if scales is not None else c)
        _write(ctx, writer, recipe, dst, start, round_to(base + merged, None if scales is not None else c))


def _ramplus_scales(shared: list[int], unique: list[int], params: Mapping[str, Any]) -> list[np.float32]:
    """``ramplus_tl``'s factor per model from how many of its changed elements other models
    change too (shared) and how many only it changes (unique): 1 + r·clamp(shared/unique, 0, alpha)."""
    scales = []
    for s_, u in zip(shared, unique):
        rho = np.float32(s_) / max(np.float32(u), np.float32(params["epsilon"]))
        rho = min(max(rho, np.float32(0)), np.float32(params["alpha"]))
        scales.append(np.float32(np.float32(1) + np.float32(np.float32(params["r"]) * rho)))
    return scales


def _ram_in_core(ctx: OpContext, writer: _core.ShardWriter, recipe: TensorRecipe, specs: Sequence[TensorSpec],
                 inputs: Sequence[InputRange], dst: int) -> None:
    """:func:`mk_ram` as core programs on all threads: for ``ramplus_tl`` a pass counting each
    model's shared and unique changes (float64 sums of 0 and 1, exact), then the output. A
    change is ``|tv| > epsilon``: the float32 difference ``|tv| − epsilon`` is positive exactly
    then, so its sign, floored at 0, is the indicator."""
    c = recipe.compute_dtype
    dtypes = [s_.dtype for s_ in specs]
    params = dict(recipe.params)
    count = len(recipe.terms) - 1
    threshold = float(scalar_in(params["epsilon"], c))

    def task_vectors(p: Program) -> tuple[int, list[int], list[int], int, int, int]:
        """base, task vectors, their change indicators, counts == 1, counts > 1, max(counts, 1)."""
        base, tvs = _vectors(p, range(count))
        changed = [p.maxk(p.sign(p.addk(p.abs(tv), -threshold)), 0.0) for tv in tvs]
        counts = changed[0]
        for ch in changed[1:]:
            counts = p.add(counts, ch)
        unique = p.eq(counts, p.const(1.0))
        overlap = p.sign(p.maxk(p.addk(counts, -1.0), 0.0))
        return base, tvs, changed, unique, overlap, p.maxk(counts, 1.0)

    scales: list[np.float32] | None = None
    if "r" in params:
        p = Program(c, dtypes)
        _, _, changed, unique, overlap, _ = task_vectors(p)
        for ch in changed:
            p.sum64(p.mul(ch, overlap))
            p.sum64(p.mul(ch, unique))
        sums, _, _ = program.run(p, specs, inputs, ctx.threads)
        totals = [int(round(x)) for x in sums.sum(axis=0)] if len(sums) else [0] * (2 * count)
        scales = _ramplus_scales(totals[0::2], totals[1::2], params)
    p = Program(c, dtypes)
    base, tvs, changed, unique, overlap, divisor = task_vectors(p)
    rounding = None if scales is not None else c
    terms = []
    for i, (tv, ch) in enumerate(zip(tvs, changed)):
        kept = p.mul(tv, ch)
        shared_part = p.round(p.div(p.mul(kept, overlap), divisor))
        alone = p.mul(kept, unique)
        if scales is None:
            terms.append(p.round(p.add(alone, shared_part)))
        else:
            terms.append(p.add(p.mulk(alone, scales[i]), shared_part))
    merged = p.sum_rounded(terms, rounding)
    p.store(p.round(p.add(base, merged), rounding))
    program.write(p, specs, inputs, ctx.threads, writer, dst, recipe.dtype, ctx.advance)


def _slerp_in_core(ctx: OpContext, writer: _core.ShardWriter, recipe: TensorRecipe, specs: Sequence[TensorSpec],
                   inputs: Sequence[InputRange], dst: int) -> None:
    """:func:`mk_slerp` as core programs: the norms and dot products per :data:`SLERP_CHUNK`
    segment (all threads), reduced here, then the output."""
    dtypes = [s_.dtype for s_ in specs]
    p = Program(recipe.compute_dtype, dtypes)
    x, y = p.read(0), p.read(1)
    p.norm(x)
    p.norm(y)
    parts, _, _ = program.run(p, specs, inputs, ctx.threads, segment=SLERP_CHUNK)
    norms = [torch_norm(parts[:, i].copy()) if len(parts) else np.float32(0) for i in (0, 1)]
    norms = [n if n > np.float32(1e-8) else np.float32(1) for n in norms]
    p = Program(recipe.compute_dtype, dtypes)
    x, y = p.read(0), p.read(1)
    p.sum(p.mul(p.divk(x, norms[0]), p.divk(y, norms[1])))
    dots, _, _ = program.run(p, specs, inputs, ctx.threads, segment=SLERP_CHUNK)
    dot = np.clip(torch_sum(dots[:, 0].copy()), np.float32(-1), np.float32(1))
    coef_a, coef_b = slerp_coefficients(np.float32(recipe.param("t")), dot)
    p = Program(recipe.compute_dtype, dtypes)
    x, y = p.read(0), p.read(1)
    p.store(p.round(p.add(p.mulk(x, coef_a), p.mulk(y, coef_b))))
    program.write(p, specs, inputs, ctx.threads, writer, dst, recipe.dtype, ctx.advance)


def _vectors(p: Program, models: Sequence[int], has_base: bool = True) -> tuple[Any, list[int]]:
    """The base (input 0) when there is one, and each of ``models`` (0: the first input after
    it) in the compute dtype, as its difference from the base when there is one."""
    base = p.read(0) if has_base else None
    vs = [p.read(int(has_base) + i) for i in models]
    return base, vs if base is None else [p.round(p.sub(v, base)) for v in vs]


def _whole_sums(programs: Program | Sequence[Program], specs: Sequence[TensorSpec], inputs: Sequence[InputRange],
                threads: int, masks: Sequence[np.ndarray] = ()) -> np.ndarray:
    """The sum slots of each program over the whole tensor, in order (zeros for an empty tensor).
    A program of plain sums is worked on by every thread (torch's order splits into groups that
    sum apart), and so is a program with norms given alone (a norm's segments are added in order,
    so a worker waits for the one before); programs with norms given together, or with float64
    sums, take one worker each (one segment: their order spans the tensor) and run side by side,
    on up to ``threads`` workers (0: every core): side by side, each streams its inputs without
    waiting."""
    programs = [programs] if isinstance(programs, Program) else list(programs)
    numel = specs[0].numel

    def sums_of(p: Program, whole: bool, workers: int) -> np.ndarray:
        segment = None if whole else max(1, numel)
        sums, _, _ = program.run(p, specs, inputs, workers, segment=segment, masks=masks, whole_sums=whole)
        return sums[0] if len(sums) else np.zeros(p.sums, dtype=np.float32)

    split = [p.sums_split(numel) and (len(programs) == 1 or not p.norms) for p in programs]
    out = [sums_of(p, True, threads) if whole else None for p, whole in zip(programs, split)]
    alone = [i for i, p in enumerate(programs) if out[i] is None]
    workers = min(len(alone), threads if threads > 0 else os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, sums in zip(alone, pool.map(lambda i: sums_of(programs[i], False, 1), alone)):
            out[i] = sums
    return np.concatenate(out)


def _model_stock_in_core(ctx: OpContext, writer: _core.ShardWriter, recipe: TensorRecipe,
                         specs: Sequence[TensorSpec], inputs: Sequence[InputRange], dst: int) -> None:
    """:func:`mk_model_stock` as core programs: the norms and dot products of the offsets over
    the whole tensor (one segment, torch's order), then the output on all threads. A norm takes one
    worker, so each offset's program sums a share of the dot products beside its norm (torch's
    order on one worker is the same sum): one pass over the inputs instead of two."""
    c = recipe.compute_dtype
    dtypes = [s_.dtype for s_ in specs]
    count = len(recipe.terms) - 1
    pairs = [(i, j) for i in range(count) for j in range(i + 1, count)]
    programs = [Program(c, dtypes) for _ in range(count)]
    shares = [pairs[i::count] for i in range(count)]  # the dot products each program sums
    slots: dict[Any, int] = {}  # ("norm", i) or a pair: its place in the programs' sums, in order
    for i, (p, share) in enumerate(zip(programs, shares)):
        models = sorted({i, *(m for pair in share for m in pair)})
        _, ds = _vectors(p, models)
        d = dict(zip(models, ds))
        slots["norm", i] = len(slots)
        p.norm(d[i])
        for a, b in share:
            slots[a, b] = len(slots)
            p.sum(p.round(p.mul(d[a], d[b])))
    sums = _whole_sums(programs, specs, inputs, ctx.threads)
    t = _model_stock_t([sums[slots["norm", i]] for i in range(count)], [sums[slots[pair]] for pair in pairs], c)
    p = Program(c, dtypes)
    base = p.read(0)
    total = p.read(1)
    for i in range(2, count + 1):
        total = p.round(p.add(total, p.read(i)))
    average = p.round(p.divk(total, np.float32(count)))
    p.store(p.round(p.add(p.round(p.mulk(average, t)), p.round(p.mulk(base, round_to(np.float32(1) - t, c))))))
    program.write(p, specs, inputs, ctx.threads, writer, dst, recipe.dtype, ctx.advance)


def _model_stock_t(norms: list[np.float32], dots: list[np.float32], c: str | None) -> np.float32:
    """model_stock's t from the offsets' norms and their pairwise dot products (pairs in order)."""
    count = len(norms)
    pairs = [(i, j) for i in range(count) for j in range(i + 1, count)]
    length = [round_to(x, c) for x in norms]
    cosines = []
    for dot, (i, j) in zip(dots, pairs):
        product = round_to(np.maximum(round_to(length[i] * length[j], c), np.float32(1e-6)), c)
        cosines.append(np.clip(round_to(round_to(dot, c) / product, c), -1, 1))
    cos = round_to(torch_sum(np.array(cosines, dtype=np.float32)) / np.float32(len(cosines)), c)
    denominator = round_to(round_to(cos * np.float32(count - 1), c) + np.float32(1), c)
    return np.float32(0) if abs(denominator) < 1e-6 else round_to(round_to(cos * np.float32(count), c) / denominator, c)


def _nuslerp_angles(cos: np.float32, t: float, c: str | None) -> tuple[bool, np.float32, np.float32, np.float32]:
    """nuslerp's steps from the cosine: whether the vectors are colinear, sin θ, sin((1 − t)θ), sin(tθ)."""
    colinear = bool(round_to(np.float32(1) - round_to(cos * cos, c), c) <= 1e-16)
    theta = round_to(np.float32(0 if colinear else math.acos(cos)), c)
    sin_theta = round_to(np.float32(math.sin(theta)), c)
    sin_a = round_to(np.float32(math.sin(round_to(theta * np.float32(1 - t), c))), c)
    sin_b = round_to(np.float32(math.sin(round_to(theta * np.float32(t), c))), c)
    return colinear, sin_theta, sin_a, sin_b


def _nuslerp_in_core(ctx: OpContext, writer: _core.ShardWriter, recipe: TensorRecipe, specs: Sequence[TensorSpec],
                     inputs: Sequence[InputRange], dst: int) -> None:
    """:func:`mk_nuslerp` as core programs: norms, then the cosine (each over the whole tensor,
    one segment), then the output on all threads."""
    c = recipe.compute_dtype
    dtypes = [s_.dtype for s_ in specs]
    has_base = bool(recipe.param("base"))

    def vectors(p: Program, models: Sequence[int] = (0, 1)) -> tuple[int | None, list[int]]:
        return _vectors(p, models, has_base)

    norms_of = [Program(c, dtypes), Program(c, dtypes)]
    for i, p in enumerate(norms_of):
        p.norm(vectors(p, [i])[1][0])
    norms = _whole_sums(norms_of, specs, inputs, ctx.threads)
    length = [round_to(np.maximum(round_to(x, c), np.float32(1e-7)), c) for x in norms]
    p = Program(c, dtypes)
    _, (v0, v1) = vectors(p)
    p.sum(p.round(p.mul(p.round(p.divk(v0, length[0])), p.round(p.divk(v1, length[1])))))
    cos = np.clip(round_to(_whole_sums(p, specs, inputs, ctx.threads)[0], c), np.float32(-1), np.float32(1))
    t = recipe.param("t")
    colinear, sin_theta, sin_a, sin_b = _nuslerp_angles(cos, t, c)
    p = Program(c, dtypes)
    base, (v0, v1) = vectors(p)
    if colinear:
        result = p.round(p.add(p.round(p.mulk(v0, np.float32(1 - t))), p.round(p.mulk(v1, np.float32(t)))))
    else:
        result = p.round(p.divk(p.round(p.add(p.round(p.mulk(v0, sin_a)), p.round(p.mulk(v1, sin_b)))), sin_theta))
    p.store(result if base is None else p.round(p.add(base, result)))
    program.write(p, specs, inputs, ctx.threads, writer, dst, recipe.dtype, ctx.advance)


def slerp_coefficients(t: np.float32, dot: np.float32, threshold: float = 0.9995) -> tuple[np.float32, np.float32]:
    """The weights of the two vectors, as mergekit's float32 steps compute them. torch's
    ``acos`` and ``sin`` of a one-element tensor are the C library's float functions, correctly
    rounded: the double result rounded to float32 is the same (numpy's own float32 ``sin`` is not
    always)."""
    if abs(dot) > threshold:
        return np.float32(1) - t, t
    theta = np.float32(math.acos(dot))
    sin_theta = np.float32(math.sin(theta))
    one_minus_t = np.float32(1) - t
    return (np.float32(math.sin(np.float32(one_minus_t * theta))) / sin_theta,
            np.float32(math.sin(np.float32(t * theta))) / sin_theta)


def _mix(ds: list[np.ndarray], weights: list[np.float32], consensus: str | None,
         c: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The summed deltas and the divisor ``normalize`` uses (mergekit's ``get_mask`` and sums)."""
    n = len(ds[0])
    if consensus is None:
        divisor = sum_rounded([np.full(1, w) for w in weights], c)
        return sum_rounded(ds, c), np.where(np.abs(divisor) < 1e-8, np.float32(1), divisor)
    signs = [np.sign(d) for d in ds]
    elect = sum_rounded(ds, c) if consensus == "sum" else sum_rounded(signs, c)
    majority = np.where(elect >= 0, np.float32(1), np.float32(-1))
    agree = [(s == majority).astype(np.float32) for s in signs]  # multiplied, as torch does: -0.0 stays
    mixed = sum_rounded([d * a for d, a in zip(ds, agree)], c)
    divisor = sum_rounded([w * a for w, a in zip(weights, agree)], c)
    return mixed, np.where(divisor == 0, np.float32(1), divisor) if n else divisor


class _RankSelection:
    """Per model, the elements whose rank by descending |delta| lies in ``[lo, hi)`` (None: all).

    Thresholds come from :func:`_rank_keys` over ``stream`` (the deltas, chunk by chunk); then
    :meth:`masks`, called on the chunks in order, counts equal magnitudes across chunks so that the
    lower index ranks first."""

    def __init__(self, ranges: Sequence[tuple[int, int] | None], stream: Callable[[], Iterator[list[np.ndarray]]]):
        self.ranges = ranges
        wanted = [sorted({lo, hi - 1}) if r is not None and r[1] > r[0] else [] for r in ranges
                  for lo, hi in [r or (0, 0)]]
        self.keys = _rank_keys(stream, wanted) if any(wanted) else [[] for _ in ranges]
        self.restart()

    def restart(self) -> None:
        """Count equal magnitudes from the tensor's first element again (a new pass)."""
        self.seen: list[dict[int, int]] = [{} for _ in self.ranges]

    def masks(self, ds: list[np.ndarray]) -> list[np.ndarray]:
        return [self._mask(i, d) for i, d in enumerate(ds)]

    def _mask(self, i: int, d: np.ndarray) -> np.ndarray:
        r = self.ranges[i]
        if r is None:
            return np.ones(len(d), dtype=bool)
        lo, hi = r
        if hi <= lo:
            return np.zeros(len(d), dtype=bool)
        key = np.abs(d).view(np.uint32)
        (top, _), (bottom, _) = self.keys[i][0], self.keys[i][-1]
        keep = (key > bottom) & (key < top)
        for value, greater in dict(self.keys[i]).items():
            where = np.flatnonzero(key == value)
            rank = greater + self.seen[i].get(value, 0) + np.arange(len(where))
            keep[where[(rank >= lo) & (rank < hi)]] = True
            self.seen[i][value] = self.seen[i].get(value, 0) + len(where)
        return keep


def _rank_keys(stream: Callable[[], Iterator[list[np.ndarray]]],
               wanted: Sequence[Sequence[int]]) -> list[list[tuple[int, int]]]:
    """For each model and each wanted rank r (descending |delta|): the float32 bit pattern of the
    magnitude at rank r and how many magnitudes exceed it. Two passes: a histogram of the high 16
    bits, then of the low 16 bits inside the bucket each rank falls in."""
    high = [np.zeros(1 << 16, dtype=np.int64) for _ in wanted]
    for ds in stream():
        for i, d in enumerate(ds):
            if wanted[i]:
                high[i] += np.bincount(np.abs(d).view(np.uint32) >> 16, minlength=1 << 16)
    buckets = [[locate_rank(h, r) for r in ranks] for h, ranks in zip(high, wanted)]
    low = [[np.zeros(1 << 16, dtype=np.int64) for _ in ranks] for ranks in wanted]
    for ds in stream():
        for i, d in enumerate(ds):
            key = np.abs(d).view(np.uint32)
            for j, (bucket, _, _) in enumerate(buckets[i]):
                inside = key[(key >> 16) == bucket] & np.uint32(0xFFFF)
                low[i][j] += np.bincount(inside, minlength=1 << 16)
    result = []
    for i, ranks in enumerate(wanted):
        found = []
        for j, r in enumerate(ranks):
            bucket, above, rest = buckets[i][j]
            value, greater, _ = locate_rank(low[i][j], rest)
            found.append(((bucket << 16) | value, above + greater))
        result.append(found)
    return result


MERGEKIT_OPS = {"mk_linear": mk_linear, "mk_passthrough": mk_passthrough, "mk_delta": mk_delta,
                "mk_nearswap": mk_nearswap, "mk_slerp": mk_slerp, "mk_model_stock": mk_model_stock,
                "mk_sce": mk_sce, "mk_nuslerp": mk_nuslerp,
                "mk_multislerp": mk_multislerp, "mk_ram": mk_ram}
