"""The per-element steps of the ``mk_*`` ops as programs for the C++ core (``_core.mk_program``).

A :class:`Program` is a list of float32 steps, each the numpy step of :mod:`.mergekit_ops` it
replaces (same operation, same rounding), run by the core over blocks of the streamed inputs on
all threads. Besides the output a program yields torch-ordered sums and norms per segment,
magnitude histograms and per-segment counts of one magnitude; :func:`rank_bands` builds TIES' and
breadcrumbs' magnitude bands from those with the same thresholds and tie order as
``mergekit_ops._rank_keys``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import _core
from ..dtypes import DTYPE_SIZES
from ..formats.checkpoint import TensorSpec
from .backends import InputRange
from .torch_rounding import TorchSum

(LOAD, ROUND, ADD, SUB, MUL, DIV, ADDK, MULK, DIVK, KDIV, KSUB, FMA64, ABS, SIGN, MAXK, CLIPK, MAJORITY, EQ,
 UNIFORM_LT, STORE, NORM, SUM, CONST, ZERO_TO_ONE, HIST_HIGH, HIST_LOW, EQ_COUNT, RANK, SUM64, VAR_POP,
 DELLA_LT, MASK_OUT, MASK_IN) = range(33)
ROUNDING = {None: 0, "F32": 0, "BF16": 1, "F16": 2}
#: the steps that reduce over the tensor into a sum slot
REDUCTIONS = frozenset({NORM, SUM, SUM64})
#: the steps whose optional last operand rounds their result
_FUSES_ROUNDING = {ADD, SUB, MUL, DIV, ADDK, MULK, DIVK, KDIV, KSUB}
#: elements per read of each input (per worker)
CHUNK = 1 << 20
#: output bytes per core call, after each of which the writer is told how far the file is
PIECE_BYTES = 32 << 20
#: elements per segment of a program of norms over the whole tensor: each worker keeps a
#: segment's operands of each norm until the segments before it are added
NORM_SEGMENT = 1 << 18


@dataclass
class Program:
    """Steps in the compute dtype ``c``; each method returns the register of its result."""

    c: str | None
    input_dtypes: Sequence[str]
    code: list[tuple[int, ...]] = field(default_factory=list)
    consts: list[float] = field(default_factory=list)
    ints: list[int] = field(default_factory=list)
    ranks: list[tuple[Any, ...]] = field(default_factory=list)
    regs: int = 0
    sums: int = 0
    hists: int = 0
    counts: int = 0

    def _new(self) -> int:
        self.regs += 1
        return self.regs - 1

    def k(self, value: float) -> int:
        self.consts.append(float(value))
        return len(self.consts) - 1

    def n(self, value: int) -> int:
        self.ints.append(int(value))
        return len(self.ints) - 1

    @property
    def ranks_rows(self) -> bool:
        """Whether a step ranks within rows (DELLA's): the program then runs over whole rows."""
        return any(ins[0] == DELLA_LT for ins in self.code)

    @property
    def norms(self) -> int:
        """How many :meth:`norm` steps the program has."""
        return sum(ins[0] == NORM for ins in self.code)

    def sums_split(self, numel: int) -> bool:
        """Whether every reduction is a :meth:`sum` or a :meth:`norm` (and no step ranks rows), the
        norms' operands of a segment (:func:`whole_segment`) few enough to keep: :func:`run` can
        then work on each over the whole tensor with every thread (its ``whole_sums``)."""
        reductions = [ins[0] for ins in self.code if ins[0] in REDUCTIONS]
        if self.ranks_rows or not all(r in (SUM, NORM) for r in reductions):
            return False
        return self.norms * min(numel, whole_segment(self, numel)) <= _core.WHOLE_NORM_ELEMS

    def op(self, code: int, *args: int) -> int:
        d = self._new()
        self.code.append((code, d, *args))
        return d

    def read(self, i: int) -> int:
        """Input ``i`` in the compute dtype (``_Reader.read``)."""
        x = self.op(LOAD, i)
        return x if self.input_dtypes[i] == self.c else self.round(x)

    def round(self, x: int, dtype: str | None | bool = True) -> int:
        """``x`` rounded to ``dtype`` (True: the compute dtype). When ``x`` is the result of the
        step just added and that step is arithmetic, the rounding joins it (one loop) and ``x``
        itself is returned: the value before rounding must not be used again."""
        code = ROUNDING[self.c if dtype is True else dtype]
        last = self.code[-1] if self.code else None
        if last is not None and last[0] in _FUSES_ROUNDING and last[1] == x and len(last) == 4:
            self.code[-1] = (*last, code)
            return x
        return self.op(ROUND, x, code)

    def add(self, a: int, b: int) -> int:
        return self.op(ADD, a, b)

    def sub(self, a: int, b: int) -> int:
        return self.op(SUB, a, b)

    def mul(self, a: int, b: int) -> int:
        return self.op(MUL, a, b)

    def div(self, a: int, b: int) -> int:
        return self.op(DIV, a, b)

    def addk(self, a: int, v: float) -> int:
        return self.op(ADDK, a, self.k(v))

    def mulk(self, a: int, v: float) -> int:
        return self.op(MULK, a, self.k(v))

    def divk(self, a: int, v: float) -> int:
        return self.op(DIVK, a, self.k(v))

    def kdiv(self, v: float, a: int) -> int:
        return self.op(KDIV, a, self.k(v))

    def ksub(self, v: float, a: int) -> int:
        return self.op(KSUB, a, self.k(v))

    def fma64(self, acc: int, x: int, w: float) -> int:
        return self.op(FMA64, acc, x, self.k(w))

    def abs(self, a: int) -> int:
        return self.op(ABS, a)

    def sign(self, a: int) -> int:
        return self.op(SIGN, a)

    def maxk(self, a: int, v: float) -> int:
        return self.op(MAXK, a, self.k(v))

    def clipk(self, a: int, lo: float, hi: float) -> int:
        return self.op(CLIPK, a, self.k(lo), self.k(hi))

    def majority(self, a: int) -> int:
        return self.op(MAJORITY, a)

    def eq(self, a: int, b: int) -> int:
        return self.op(EQ, a, b)

    def zero_to_one(self, a: int) -> int:
        return self.op(ZERO_TO_ONE, a)

    def const(self, v: float) -> int:
        return self.op(CONST, self.k(v))

    def uniform_lt(self, key: int, p: float) -> int:
        return self.op(UNIFORM_LT, self.n(key), self.k(p))

    def della_lt(self, x: int, key: int, density: float, eps: float, cols: int) -> int:
        """1 where the counter stream ``key`` draws below DELLA's keep probability of ``x``:
        ``density − eps + 2·eps·rank/(cols − 1)``, rank ascending by |x| within its row of ``cols``
        (``mergekit_ops._Sparsifier``). A program holding it runs over whole rows:
        :func:`row_chunk`."""
        ki, _ = self.n(key), self.n(cols)
        kk, _ = self.k(density), self.k(eps)
        return self.op(DELLA_LT, x, ki, kk)

    def sum_rounded(self, xs: Sequence[int], dtype: str | None | bool = True) -> int:
        """``torch_rounding.sum_rounded``: float32 additions in order, one rounding."""
        acc = xs[0]
        for x in xs[1:]:
            acc = self.add(acc, x)
        return self.round(acc, dtype)

    def rank(self, x: int, band: tuple[Any, ...]) -> int:
        self.ranks.append(band)
        return self.op(RANK, x, len(self.ranks) - 1)

    def store(self, x: int) -> None:
        self.code.append((STORE, 0, x))

    def mask_out(self, x: int, slot: int) -> None:
        """Bit ``slot`` of the masks ``run``/``write`` take: whether ``x`` is non-zero."""
        self.code.append((MASK_OUT, 0, x, slot))

    def mask_in(self, slot: int) -> int:
        """The mask a previous pass set in ``slot``, as 1 and 0."""
        return self.op(MASK_IN, slot)

    def norm(self, x: int) -> int:
        return self._reduce(NORM, x)

    def sum(self, x: int) -> int:
        return self._reduce(SUM, x)

    def _reduce(self, op: int, x: int) -> int:
        """A reduction of ``x`` over the tensor into a new accumulator; its index."""
        self.code.append((op, 0, x, self.sums))
        self.sums += 1
        return self.sums - 1

    def var_pop(self, xs: Sequence[int]) -> int:
        """The population variance across ``xs``, elementwise (Welford's updates in float64)."""
        if xs and list(xs) == list(range(xs[0], xs[0] + len(xs))):
            return self.op(VAR_POP, xs[0], len(xs))
        first = self.regs
        for x in xs:
            self.op(ROUND, x, 0)  # a copy: the op takes consecutive registers
        return self.op(VAR_POP, first, len(xs))

    def sum64(self, x: int) -> int:
        """A float64 sum in element order."""
        return self._reduce(SUM64, x)

    def hist_high(self, x: int) -> int:
        self.code.append((HIST_HIGH, 0, x, self.hists))
        self.hists += 1
        return self.hists - 1

    def hist_low(self, x: int, bucket: int) -> int:
        self.code.append((HIST_LOW, 0, x, self.hists, self.n(bucket)))
        self.hists += 1
        return self.hists - 1

    def eq_count(self, x: int, value: int) -> int:
        self.code.append((EQ_COUNT, 0, x, self.counts, self.n(value)))
        self.counts += 1
        return self.counts - 1


def row_chunk(cols: int) -> int:
    """Elements per chunk (and segment) of a program that ranks within rows of ``cols``: the
    whole rows in :data:`CHUNK`, at least one."""
    return max(cols, CHUNK // cols * cols)


def run(program: Program, specs: Sequence[TensorSpec], inputs: Sequence[InputRange], threads: int,
        segment: int | None = None, index_base: int = 0, task_hists: bool = False,
        masks: Sequence[np.ndarray] = (), whole_sums: bool = False) -> tuple[Any, ...]:
    """A program without output over the whole tensor: (sums per segment, histograms, counts per
    segment), and with ``task_hists`` each segment's histograms too (``_core.mk_program``'s);
    segments of :data:`CHUNK` elements unless given (a program with rank bands: whole chunks; one
    that ranks within rows: :func:`row_chunk`'s). ``whole_sums`` (a program whose reductions are
    all :meth:`Program.sum` or :meth:`Program.norm`): each over the whole tensor in torch's order,
    in row 0, worked on by every thread (segments: :func:`whole_segment`'s unless given). A run
    is a pass that the op's :func:`write` over the same tensor follows: the inputs' mapped pages
    stay mapped for it (within the core's bound) and the write drops them."""
    numel = specs[0].numel
    if whole_sums and segment is None:
        segment = whole_segment(program, numel)
    segment = segment or CHUNK
    chunk = segment if program.ranks_rows else min(CHUNK, segment)  # a row-ranking program reads whole rows
    ranks = program.ranks
    if segment != CHUNK and ranks:  # each segment's tie counts start where its first chunk's do
        if segment % CHUNK and segment < numel:
            raise ValueError(f"rank bands need segments of whole chunks ({CHUNK} elements), not {segment}")
        firsts = [t * segment // CHUNK for t in range(-(-numel // segment))]  # each segment's first chunk
        ranks = [(*band[:6], [x for t in firsts for x in band[6][t * len(band[4]):(t + 1) * len(band[4])]]
                  if band[6] else []) for band in ranks]
    return _core.mk_program(list(inputs), [s.dtype for s in specs], numel, program.code, program.consts,
                            program.ints, ranks, None, 0, "F32", chunk_elems=chunk,
                            segment_elems=segment, index_base=index_base, threads=threads, task_hists=task_hists,
                            masks=list(masks), whole_sums=whole_sums, keep_mapped=True)


def whole_segment(program: Program, numel: int) -> int:
    """The segments of ``program`` over the whole tensor (:func:`run`'s ``whole_sums``): whole
    chunks (rank bands) and whole groups of torch's sum where it sums, else :data:`NORM_SEGMENT`."""
    if any(ins[0] == SUM for ins in program.code):
        return math.lcm(CHUNK, TorchSum(numel).group)
    return NORM_SEGMENT


def write(program: Program, specs: Sequence[TensorSpec], inputs: Sequence[InputRange], threads: int,
          writer: _core.ShardWriter, dst: int, out_dtype: str, advance: Callable[[int, int], None],
          chunk: int | None = None, masks: Sequence[np.ndarray] = ()) -> None:
    """A program that stores, over the whole tensor, written at ``dst`` in pieces (each a whole
    number of chunks; the rank bands' per-chunk counts go with them). ``chunk``: :data:`CHUNK`,
    or :func:`row_chunk`'s for a program that ranks within rows (it has no rank bands)."""
    chunk = chunk or CHUNK
    if chunk != CHUNK and program.ranks:
        raise ValueError("rank bands count ties per chunk of CHUNK elements")
    numel = specs[0].numel
    out_size = DTYPE_SIZES[out_dtype]
    sizes = [DTYPE_SIZES[s.dtype] for s in specs]
    step = max(chunk, PIECE_BYTES // out_size // chunk * chunk)
    for start in range(0, numel, step):
        n = min(step, numel - start)
        first, last = start // CHUNK, (start + n + CHUNK - 1) // CHUNK
        ranks = [(*band[:6], _seen_slice(band, first, last)) for band in program.ranks]
        _core.mk_program([(f, off + start * size) for (f, off), size in zip(inputs, sizes)], [s.dtype for s in specs],
                         n, program.code, program.consts, program.ints, ranks, writer, dst + start * out_size,
                         out_dtype, chunk_elems=chunk, segment_elems=chunk, index_base=start, threads=threads,
                         masks=list(masks))
        advance(dst + (start + n) * out_size, n * out_size)


def _seen_slice(band: tuple[Any, ...], first: int, last: int) -> list[int]:
    seen, values = band[6], len(band[4])
    return list(seen[first * values:last * values]) if seen else []


def rank_bands(ranges: Sequence[tuple[int, int] | None], build: Callable[[Program], list[int]],
               make: Callable[[], Program], specs: Sequence[TensorSpec], inputs: Sequence[InputRange],
               threads: int, high: tuple[np.ndarray, list[Any]] | None = None) -> list[tuple[Any, ...] | None]:
    """For each value ``build`` computes (one per range), the band of descending magnitude ranks
    ``[lo, hi)`` as :meth:`Program.rank` takes it: the bit patterns of the magnitudes at ranks lo
    and hi − 1 and how many exceed each (two histogram passes, as ``mergekit_ops._rank_keys``; one
    when every value is a bfloat16, whose high 16 bits are all of it), and, where a magnitude occurs
    more than once, how many equal ones precede each chunk, so that the lower index ranks first:
    read from the histograms each chunk kept (a third pass only where a chunk had too many distinct
    magnitudes to keep them). None where a range is None or empty. ``high``: the first pass's
    histograms and chunk histograms (:meth:`Program.hist_high` of each value, ``run(...,
    task_hists=True)``), when the caller's own pass already made them."""
    wanted = [sorted({r[0], r[1] - 1}) if r is not None and r[1] > r[0] else [] for r in ranges]
    if not any(wanted):
        return [None] * len(ranges)
    if high is None:
        p = make()
        slots = {i: p.hist_high(x) for i, x in enumerate(build(p)) if wanted[i]}
        _, hists, _, tables = run(p, specs, inputs, threads, task_hists=True)
    else:
        hists, tables = high
        slots = {i: i for i in range(len(ranges)) if wanted[i]}
    buckets = {i: [locate_rank(hists[slots[i]], r) for r in wanted[i]] for i in slots}
    keys: dict[int, list[tuple[int, int, int]]] = {}  # per model and wanted rank: value, how many exceed it, its count
    tallies: dict[tuple[int, int], np.ndarray | None] = {}  # per model and value: its count in each chunk
    if make().c == "BF16":  # every value a bfloat16: its high 16 bits are all of it, its bucket's count its count
        for i in slots:
            keys[i] = [(bucket << 16, above, int(hists[slots[i]][bucket])) for bucket, above, _ in buckets[i]]
            for bucket, _, _ in buckets[i]:
                tallies[i, bucket << 16] = _chunk_counts(tables[slots[i]], bucket)
    else:
        p = make()
        low_slots = {i: [p.hist_low(x, bucket) for bucket, _, _ in buckets[i]]
                     for i, x in enumerate(build(p)) if i in buckets}
        _, low, _, low_tables = run(p, specs, inputs, threads, task_hists=True)
        for i in slots:
            keys[i] = []
            for (bucket, above, rest), slot in zip(buckets[i], low_slots[i]):
                value, greater, _ = locate_rank(low[slot], rest)
                keys[i].append(((bucket << 16) | value, above + greater, int(low[slot][value])))
                tallies[i, (bucket << 16) | value] = _chunk_counts(low_tables[slot], value)
    distinct = {i: {value: (greater, count) for value, greater, count in keys[i]} for i in slots}
    _count_untallied(tallies, distinct, build, make, specs, inputs, threads)
    seen: dict[int, list[int]] = {i: [] for i in slots}
    chunks = -(-specs[0].numel // CHUNK)
    for i in slots:
        if any(count > 1 for _, count in distinct[i].values()):
            before = [np.concatenate([[0], np.cumsum(tallies[i, v][:-1])]) if count > 1 else
                      np.zeros(chunks, dtype=np.int64) for v, (_, count) in distinct[i].items()]
            seen[i] = [int(v) for v in np.stack(before, axis=1).reshape(-1)]
    return [(keys[i][0][0], keys[i][-1][0], r[0], r[1], list(distinct[i]), [g for g, _ in distinct[i].values()], seen[i])
            if i in slots and r is not None else None for i, r in enumerate(ranges)]


def _chunk_counts(table: tuple[np.ndarray, np.ndarray] | None, b: int) -> np.ndarray | None:
    """How many magnitudes of each chunk fell in bin ``b`` of its histogram (None: not kept)."""
    if table is None:
        return None
    offsets, entries = table
    hit = np.nonzero((entries >> np.uint64(32)) == b)[0]
    counts = np.zeros(len(offsets) - 1, dtype=np.int64)
    counts[np.searchsorted(offsets, hit, side="right") - 1] = (entries[hit] & np.uint64(0xFFFFFFFF)).astype(np.int64)
    return counts


def _count_untallied(tallies: dict[tuple[int, int], np.ndarray | None], distinct: dict[int, dict[int, tuple[int, int]]],
                     build: Callable[[Program], list[int]], make: Callable[[], Program], specs: Sequence[TensorSpec],
                     inputs: Sequence[InputRange], threads: int) -> None:
    """A pass counting, chunk by chunk, the repeated magnitudes whose chunk histograms were not
    kept (a chunk with too many distinct ones), into ``tallies``."""
    missing = {(i, v) for i in distinct for v, (_, count) in distinct[i].items() if count > 1 and tallies[i, v] is None}
    if not missing:
        return
    p = make()
    count_slots = {(i, v): p.eq_count(x, v) for i, x in enumerate(build(p)) for v in distinct.get(i, {})
                   if (i, v) in missing}
    _, _, counts = run(p, specs, inputs, threads)
    for key, slot in count_slots.items():
        tallies[key] = counts[:, slot]


def locate_rank(hist: np.ndarray, rank: int) -> tuple[int, int, int]:
    """The bin holding descending rank ``rank``, how many counts lie in higher bins, and the rank
    within the bin (bin -1 past the last count). Over the non-zero bins only: a cumulative sum of
    all 65536 would be a fresh half megabyte per call."""
    bins = np.flatnonzero(hist != 0)[::-1]  # on a boolean array: np.nonzero of int64 is several times slower
    from_top = np.cumsum(hist[bins])
    index = int(np.searchsorted(from_top, rank, side="right"))
    above = int(from_top[index - 1]) if index else 0
    return (int(bins[index]) if index < len(bins) else -1), above, rank - above
