"""The C++ core of layerswap-fast: bytes, files and kernels; nothing about model architectures.

Every function that reads or writes file data or runs a kernel releases the GIL. No function may
crash the interpreter on bad input: malformed files, short files and out-of-range requests raise
:class:`CoreError`. The file kernels read an input either with ``pread`` or straight from a
read-only mapping (:attr:`InputFile.io`); a mapped file truncated while a kernel reads it gives a
CoreError too ("input changed during the merge: FILE was truncated while in use ..."), not a SIGBUS:
the core installs one process-wide SIGBUS handler for faults inside its own mappings and hands
every other SIGBUS to the handler it found (which it puts back on top of, should another replace it).

dtype names are the safetensors ones. ``blend`` and ``row_mav`` accept ``"BF16"``, ``"F16"`` and
``"F32"``; anything else raises :class:`CoreError` naming the dtype.
"""

from collections.abc import Buffer, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

MAX_HEADER_BYTES: int
"""Largest accepted safetensors header (100 MB, as the reference implementation)."""
#: :func:`mk_program` with ``whole_sums``: the most operands a worker keeps of one segment, over
#: all Norm slots
WHOLE_NORM_ELEMS: int
#: :func:`mk_program` with ``keep_mapped``: the most bytes of the tensor its inputs may hold for
#: their pages to stay mapped
KEEP_MAPPED_BYTES: int

#: the package version, from pyproject.toml at build time
__version__: str


class CoreError(OSError):
    """Any failure of the core. ``str(e)`` is one line naming the file and the cause; ``errno`` is
    set when an OS call failed (e.g. ``errno.ENOSPC`` for a full disk)."""

class InputFile:
    """One input shard, open read-only. Offsets are absolute positions in the file."""

    def __init__(self, path: str, io: str = "auto") -> None:
        """Open ``path`` read-only and record its size, device and inode. ``io``: how the file
        kernels read it: ``"mmap"`` (a read-only mapping of the whole file), ``"pread"``, or
        ``"auto"``: mmap on a local filesystem (the choice the core's ``kLocalDefault`` names),
        pread on a network or FUSE filesystem (statfs f_type: NFS, SMB/CIFS, FUSE, 9p, Ceph,
        Lustre, ...). Anything else: CoreError."""
    @property
    def path(self) -> str: ...
    @property
    def io(self) -> str:
        """``"mmap"`` or ``"pread"``: how the file kernels read the file now. An empty file, or one
        that could not be mapped (no address space, 4096 files mapped already), reads with pread."""
    def set_io(self, io: str) -> None:
        """Map or unmap the file (``io`` as for the constructor), once no kernel reads it; CoreError
        when closed. ``read``, ``read_header`` and ``read_into`` always use pread."""
    @property
    def size(self) -> int:
        """The file size when it was opened; every read is bounds-checked against it."""
    def read_header(self) -> bytes:
        """Return the safetensors JSON header bytes: the 8-byte little-endian length N must satisfy
        0 < N <= MAX_HEADER_BYTES and 8 + N <= size, else CoreError."""
    def read(self, offset: int, nbytes: int) -> bytes:
        """Bytes [offset, offset + nbytes); CoreError if the range leaves [0, size) or the file
        turned out shorter than at open (truncated while in use)."""
    def read_into(self, offset: int, out: Buffer) -> None:
        """Fill the writable buffer ``out`` from ``offset``; same checks as :meth:`read`."""
    def check_unchanged(self) -> None:
        """CoreError if the file shrank, or the path now names another file (replaced)."""
    def close(self) -> None: ...
    def __enter__(self) -> InputFile: ...
    def __exit__(self, *exc: object) -> None: ...

class ShardWriter:
    """One output file of a fixed size, created exclusively (O_EXCL) and preallocated."""

    def __init__(self, path: str, size: int, reserve: bool = True) -> None:
        """Create ``path`` (error if it exists) and reserve ``size`` bytes with posix_fallocate
        (ENOSPC → CoreError with errno set; the file is removed again); ``reserve=False`` (or a
        filesystem that cannot reserve) only sets the size, leaving a sparse file: for an output
        whose copies become clones, whose blocks would otherwise be allocated twice."""
    @property
    def path(self) -> str: ...
    @property
    def size(self) -> int: ...
    def write(self, offset: int, data: Buffer) -> None:
        """pwrite ``data`` at ``offset``; CoreError if it would end past ``size``."""
    def copy_range(self, src: InputFile, src_offset: int, dst_offset: int, nbytes: int) -> None:
        """Kernel-side copy of src[src_offset, +nbytes) to [dst_offset, +nbytes) of this file with
        copy_file_range, falling back to pread/pwrite where the kernel refuses (EXDEV, ENOSYS,
        EINVAL, EOPNOTSUPP). Bounds-checked on both sides; a short source is a CoreError."""
    def writeback(self, offset: int, nbytes: int, wait: bool = False, drop: bool = False) -> None:
        """Start writing [offset, +nbytes) back to the disk (sync_file_range); with ``wait`` also
        wait until it is written; with ``drop`` then evict those clean pages from the page cache
        (posix_fadvise DONTNEED, advice only). Bounds-checked."""
    def close(self, sync: bool = True) -> None:
        """fsync (when ``sync``) and close. Idempotent."""
    def abort(self) -> None:
        """Close and unlink the file. Idempotent; never raises."""
    def __enter__(self) -> ShardWriter: ...
    def __exit__(self, *exc: object) -> None:
        """abort() if an exception is propagating, else nothing (close stays explicit)."""

def dtype_size(dtype: str) -> int:
    """Bytes per element of a safetensors dtype name (BOOL, U8, I8, F8_E4M3, F8_E5M2, I16, U16,
    F16, BF16, I32, U32, F32, I64, U64, F64); CoreError for an unknown name."""

def blend_buffers(
    inputs: Sequence[Buffer],
    input_dtypes: Sequence[str],
    weights: Sequence[float],
    out: Buffer,
    out_dtype: str,
    threads: int = 0,
) -> None:
    """out = round_to_out_dtype(sum_i float32(w_i) * float32(x_i)).

    Each product is rounded to float32 before it is added (no FMA), the sum runs in input order
    starting from the first product, and the float32 result is rounded to nearest even into
    ``out_dtype`` (NaN stays NaN). ``numel = len(out) / size(out_dtype)``; every input must hold
    exactly ``numel`` elements of its dtype. N >= 1. ``threads`` <= 0 means all cores."""

def blend_file(
    inputs: Sequence[tuple[InputFile, int]],
    input_dtypes: Sequence[str],
    weights: Sequence[float],
    out: ShardWriter,
    out_offset: int,
    out_dtype: str,
    numel: int,
    chunk_elems: int = 1 << 20,
    threads: int = 0,
) -> None:
    """The same arithmetic as :func:`blend_buffers`, streamed: ``numel`` elements starting at each
    (file, absolute offset) are read in chunks of at most ``chunk_elems`` (fewer where that keeps
    each worker's chunks in its L2 cache) by ``threads`` workers (pread),
    blended and written (pwrite) to ``out`` at ``out_offset``. Memory is
    O(chunk_elems × (inputs + 1) × threads), independent of ``numel``. Bounds-checked."""

def blend_lowrank_file(
    inputs: Sequence[tuple[InputFile, int]],
    input_dtypes: Sequence[str],
    weights: Sequence[float],
    factors: Sequence[tuple[Buffer, Buffer]],
    factor_weights: Sequence[float],
    out: ShardWriter,
    out_offset: int,
    out_dtype: str,
    rows: int,
    cols: int,
    chunk_elems: int = 1 << 18,
    threads: int = 0,
) -> None:
    """A ``rows`` x ``cols`` matrix: round_to_out_dtype(sum_t w_t * float32(x_t) + sum_f c_f * P_f),
    the x_t read from files as in :func:`blend_file` (``rows * cols`` elements at each (file,
    absolute offset)), written to ``out`` at ``out_offset``.

    ``factors[f]`` is ``(B, A)``: float32, C-contiguous, B ``rows`` x r_f and A r_f x ``cols``
    (r_f >= 1, taken from B's length); ``c_f = float32(factor_weights[f])``. Each
    ``P_f[i, j] = sum_k B[i, k] * A[k, j]`` is a chain of fused multiply-adds over k = 0 .. r_f - 1
    starting from +0 (each step rounded once, so every CPU gives the same bits); every other
    product is rounded to float32 before it is added, the terms first in input order, then the
    factors in order, and the float32 sum is rounded once into ``out_dtype``. Byte-identical for
    every ``threads`` (<= 0: all cores) and ``chunk_elems``: rows are shared out in blocks of
    ``max(1, chunk_elems // cols)`` rows rounded up to a multiple of 4, each element computed
    alone. Memory: the factors (the
    caller's) plus per worker one block of every input and of the output. Sizes and bounds are
    checked (CoreError)."""

def row_mav_buffers(
    experts: Sequence[Buffer],
    expert_dtypes: Sequence[str],
    base: Buffer,
    base_dtype: str,
    rows: int,
    cols: int,
    threads: int = 0,
) -> npt.NDArray[np.float64]:
    """Row-wise mean |expert - base| for each expert: shape (len(experts), rows), float64.

    Differences and absolute values in float32; partial sums in float32 over blocks of at most 64
    consecutive elements of a row, blocks accumulated in float64, divided by ``cols``."""

def row_mav_file(
    experts: Sequence[tuple[InputFile, int]],
    expert_dtypes: Sequence[str],
    base: tuple[InputFile, int],
    base_dtype: str,
    rows: int,
    cols: int,
    chunk_elems: int = 1 << 20,
    threads: int = 0,
) -> npt.NDArray[np.float64]:
    """:func:`row_mav_buffers` streamed from files: the base is read once for all experts, in
    chunks of ``chunk_elems`` elements (rows may span chunks). Same numerics and shape."""

def ties_thresholds_buffers(
    base: Buffer,
    base_dtype: str,
    experts: Sequence[Buffer],
    expert_dtypes: Sequence[str],
    keep: int,
    threads: int = 0,
) -> list[float]:
    """The TIES trim threshold ``tau_i`` of every expert (see :func:`ties_buffers`): the
    ``keep``-th largest ``|float32(e_i) - float32(base)|``, exact; ``+inf`` when ``keep == 0``,
    ``0.0`` when ``keep >= numel``; a NaN when NaN deltas (ordered above +inf) reach the
    ``keep``-th place. ``numel = len(base) / size(base_dtype)``; every expert must hold exactly
    ``numel`` elements. Found by the same radix select as :func:`ties_file`, over memory."""

def ties_buffers(
    base: Buffer,
    base_dtype: str,
    experts: Sequence[Buffer],
    expert_dtypes: Sequence[str],
    out: Buffer,
    out_dtype: str,
    keep: int,
    lam: float,
    threads: int = 0,
) -> None:
    """TIES-merging (Yadav et al., 2023) of N >= 1 experts against ``base``, element-wise in
    float32, into ``out`` (``numel = len(out) / size(out_dtype)``; base and every expert must hold
    exactly ``numel`` elements of their dtypes):

    1. ``d_i = float32(e_i) - float32(b)``.
    2. trim: ``t_i = d_i if |d_i| >= tau_i else +0.0`` with ``tau_i`` the ``keep``-th largest
       ``|d_i|`` (:func:`ties_thresholds_buffers`). Every element tied with ``tau_i`` is kept, so
       more than ``keep`` may survive. ``keep == 0`` keeps nothing (not even NaN or infinite
       deltas); ``keep >= numel`` keeps everything. The caller computes
       ``keep = floor(density * numel)``. NaN deltas: ``|NaN|`` orders above ``+inf`` (as its bit
       pattern does) and every NaN delta is kept (for ``keep >= 1``).
    3. elect: ``s = t_0 + t_1 + ...`` (float32, input order, from ``t_0``);
       ``gamma = sign(s)`` in {+1, -1, 0}, with ``sign(NaN) == 0`` (as ``torch.sign`` on CPU).
    4. disjoint mean: agreeing terms are those with ``sign(t_i) == gamma and t_i != 0``;
       ``num = 0.0; num = num + (t_i if agreeing else 0.0)`` for each i in order (float32),
       ``cnt`` = their number, ``mean = num / float32(cnt) if cnt > 0 else 0.0``.
       Consequences: a kept NaN delta makes ``s`` NaN, ``gamma`` 0, and then itself agrees, so
       the output is NaN there; ``+inf`` and ``-inf`` deltas kept together make ``s`` NaN with no
       agreeing term, so the output is the base there.
    5. ``out = round_to_out_dtype(b + float32(lam) * mean)``: ``lam`` rounded to float32 once, the
       product rounded to float32 before the add (no FMA), rounded to nearest even into
       ``out_dtype`` as in :func:`blend_buffers`. (So ``-0.0`` in the base becomes ``+0.0`` where
       ``mean`` is 0 and ``lam >= 0``.)

    Byte-identical for every ``threads`` (<= 0: all cores). dtypes: BF16, F16, F32."""

def ties_file(
    base: tuple[InputFile, int],
    base_dtype: str,
    experts: Sequence[tuple[InputFile, int]],
    expert_dtypes: Sequence[str],
    out: ShardWriter,
    out_offset: int,
    out_dtype: str,
    numel: int,
    keep: int,
    lam: float,
    chunk_elems: int = 1 << 20,
    threads: int = 0,
    record_budget: int = 64 << 20,
) -> None:
    """:func:`ties_buffers` streamed from files, with the same bytes for every ``chunk_elems``,
    ``threads`` and ``record_budget``: ``numel`` elements at each (file, absolute offset), written
    to ``out`` at ``out_offset``. Bounds and dtypes are checked as in :func:`blend_file`.

    No float32 copy of a tensor is made. **Exact passes**: each ``tau_i`` is found by an exact
    radix select over the bit patterns of ``|d_i|``. Pass 1 streams base and experts (the base
    chunk read once for all experts) and histograms the top 16 bits of every ``|d_i|`` (per thread,
    merged after the join), which locates the bin of the ``keep``-th largest; pass 2 streams again
    and histograms the low 16 bits of the elements in that bin, giving ``tau_i`` exactly; pass 3
    streams again and writes the output. Pass 2 is skipped when, for every expert, the ``keep``-th
    largest falls among the values of its bin whose low 16 bits are zero (common for 16-bit
    checkpoints), and passes 1-2 when ``keep == 0`` or ``keep >= numel``.

    **One pass over a sampled bracket** (tensors of at least 65,536 elements, ``0 < keep <
    numel``, ``record_budget > 0``): a sample of about ``numel / 64`` elements (at least 16,384, at
    most 2 Mi, in blocks of 512 spread evenly) gives each expert a guess of ``tau_i`` and a bracket
    of ``|d_i|`` patterns around it, 6 standard deviations of the sample rank wide. One pass writes
    the output under the guesses, counts the patterns above each bracket and those equal to up to
    4 "heavy" patterns (values the sample shows many elements sharing), and records position and
    input bytes of every other element inside a bracket. From those, ``tau_i`` is exact; recorded
    elements whose output differs under it are written again, and if a heavy pattern's decision
    changed, a second pass writes the whole output again. If a ``tau_i`` falls outside its bracket
    or the records would pass ``record_budget`` bytes, the exact passes run. Every route writes the
    same bytes; :func:`ties_file_stats` counts the routes taken.

    Memory: O(512 KiB × N × threads) of histograms, O(chunk_elems × (bytes per element of base +
    experts + out) × threads) of chunk buffers (``threads`` as resolved: at most the number of
    chunks), the sample (at most 8 MiB per expert) and the records (at most ``record_budget``
    bytes, up to twice that while their arrays grow)."""

def mk_program(
    inputs: Sequence[tuple[InputFile, int]],
    input_dtypes: Sequence[str],
    numel: int,
    code: Sequence[Sequence[int]],
    consts: Sequence[float],
    ints: Sequence[int],
    ranks: Sequence[tuple[int, int, int, int, Sequence[int], Sequence[int], Sequence[int]]],
    out: ShardWriter | None,
    out_offset: int,
    out_dtype: str,
    chunk_elems: int = 1 << 20,
    segment_elems: int = 1 << 20,
    index_base: int = 0,
    threads: int = 0,
    task_hists: bool = False,
    masks: Sequence[Any] = (),
    whole_sums: bool = False,
    keep_mapped: bool = False,
) -> tuple[Any, ...]:
    """Run a program of float32 steps (``code``: ``(op, d, a, b, c)`` tuples, the opcodes and their
    meanings in ``csrc/mergekit_program.cpp`` and ``layerswap_fast.engine.mergekit_program``) over
    ``numel`` elements at each (file, absolute offset), in segments of ``segment_elems`` elements
    (the extent of every torch-ordered sum and norm; one worker each, reading chunks of
    ``chunk_elems``), on ``threads`` workers (<= 0: all cores). ``ranks``: per band (top, bottom,
    lo, hi, values, greater, seen) with ``seen`` either empty or segments x values. Writes the
    stored register to ``out`` at ``out_offset`` in ``out_dtype`` when ``out`` is given (the
    program must store exactly when it is). ``masks``: writable zeroed buffers of a bit per element
    (element e at bit e % 8 of byte e / 8, counted from index 0), set by MaskOut and read by MaskIn.
    ``keep_mapped`` (a program without ``out``): the mapped inputs' pages stay mapped for the next
    pass over the tensor, whose readers find them so and drop them (a writing pass does), when
    the inputs hold at most :data:`KEEP_MAPPED_BYTES` of the tensor.
    Returns (sums as float64, segments x sum slots: the
    float32 results of torch-ordered sums and norms, exactly; int64
    histograms, slots x 65536; int64 counts, segments x count slots), the same for every thread
    count; with ``task_hists`` a fourth item, per histogram slot each segment's own histogram:
    ``(offsets, entries)``, segment t's non-zero bins in ``entries[offsets[t]:offsets[t + 1]]`` as
    uint64 ``bin << 32 | count`` in bin order, or None where a segment had more than 4096
    distinct bins (segments must then be below 2^32 elements). A program that ranks within rows
    (DELLA's op) needs ``numel``, ``chunk_elems`` and ``segment_elems`` in whole rows.
    ``whole_sums``: every sum slot (all must be Sum or Norm) is one sum or norm over the whole
    tensor in torch's order, worked on by every worker over segments, in row 0 of the sums (later
    rows 0). With a Sum, segments are whole groups of that sum (a multiple of
    ``torch_rounding.TorchSum(numel).group``, or the whole tensor); each Norm's operands of a
    segment are kept until the segments before it are added (at most 2^22 elements per worker
    over all Norm slots). Bad programs, sizes and bounds: CoreError; the GIL is
    released while it runs."""

def ties_file_stats() -> dict[str, int]:
    """How the :func:`ties_file` calls of this process went: ``one_pass`` (finished in the one
    pass, with ``patched`` elements written again), ``rewritten`` (a second pass under the exact
    thresholds), ``fallback_budget`` and ``fallback_miss`` (the exact passes ran after the one
    pass), and ``records``, the elements recorded in all."""

def _set_copy_file_range_enabled(enabled: bool) -> None:
    """Testing hook (process-wide): ``False`` forces :meth:`ShardWriter.copy_range` onto its
    pread/pwrite fallback; ``True`` (the default) uses copy_file_range again."""

def _set_max_io_bytes(n: int) -> None:
    """Testing hook (process-wide): at most ``n`` bytes per pread, pwrite or copy_file_range call
    (``0``: the default, 1 GiB), so that reads and writes come back short and every retry loop
    runs."""

def _set_ties_simd_enabled(enabled: bool) -> None:
    """Testing hook (process-wide): ``False`` makes the TIES merge loop for BF16 take its portable
    form instead of the AVX-512 one (used only where the CPU has it); both give the same bytes."""

def _set_mask_simd_enabled(enabled: bool) -> None:
    """Testing hook (process-wide): ``False`` makes :func:`mk_program`'s MaskOut and MaskIn take
    their portable form instead of the AVX-512 one (used only where the CPU has it); both give the
    same bits."""

def _set_lowrank_simd_enabled(enabled: bool) -> None:
    """Testing hook (process-wide): ``False`` makes :func:`blend_lowrank_file` form its products
    the portable way instead of with AVX2/FMA (used only where the CPU has them); both give the
    same bytes."""

def _set_fault_hook(after: int, path: str, size: int = 0, replace_with: str | None = None) -> None:
    """Testing hook (process-wide, fires once): once ``after`` more chunks of the file kernels have
    been prepared (over all threads), the thread preparing the next one first truncates ``path`` to
    ``size`` bytes, or with ``replace_with`` renames that file over ``path``, and then reads its
    chunk: a fault lands inside a running kernel, deterministically."""

def _clear_fault_hook() -> None:
    """Testing hook: disarm :func:`_set_fault_hook` if it has not fired."""
