"""The C++ core of layerswap-fast: bytes, files and kernels; nothing about model architectures.

Every function that reads or writes file data or runs a kernel releases the GIL. No function may
crash the interpreter on bad input: malformed files, short files and out-of-range requests raise
:class:`CoreError` (files are read with ``pread``, never ``mmap``, so a file truncated while in use
gives an error, not SIGBUS).

dtype names are the safetensors ones. ``blend`` and ``row_mav`` accept ``"BF16"``, ``"F16"`` and
``"F32"``; anything else raises :class:`CoreError` naming the dtype.
"""

from collections.abc import Buffer, Sequence

import numpy as np
import numpy.typing as npt

MAX_HEADER_BYTES: int
"""Largest accepted safetensors header (100 MB, as the reference implementation)."""

class CoreError(OSError):
    """Any failure of the core. ``str(e)`` is one line naming the file and the cause; ``errno`` is
    set when an OS call failed (e.g. ``errno.ENOSPC`` for a full disk)."""

class InputFile:
    """One input shard, open read-only. Offsets are absolute positions in the file."""

    def __init__(self, path: str) -> None:
        """Open ``path`` read-only and record its size, device and inode."""
    @property
    def path(self) -> str: ...
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

    def __init__(self, path: str, size: int) -> None:
        """Create ``path`` (error if it exists) and reserve ``size`` bytes with posix_fallocate
        (ENOSPC → CoreError with errno set; the file is removed again)."""
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
    def close(self, sync: bool = True) -> None:
        """fsync (when ``sync``) and close. Idempotent."""
    def rename(self, new_path: str) -> None:
        """Rename the (closed) file; ``path`` becomes ``new_path``."""
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
    (file, absolute offset) are read in chunks of ``chunk_elems`` by ``threads`` workers (pread),
    blended and written (pwrite) to ``out`` at ``out_offset``. Memory is
    O(chunk_elems × (inputs + 1) × threads), independent of ``numel``. Bounds-checked."""

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

def _set_copy_file_range_enabled(enabled: bool) -> None:
    """Testing hook (process-wide): ``False`` forces :meth:`ShardWriter.copy_range` onto its
    pread/pwrite fallback; ``True`` (the default) uses copy_file_range again."""
