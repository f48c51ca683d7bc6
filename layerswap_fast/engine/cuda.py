"""The GPU backend of the streaming engine: ``_core.blend_file`` / ``_core.row_mav_file`` on CUDA,
with the Triton kernels of :mod:`layerswap_fast.kernels`.

Data path of one call, per chunk ``i`` (two buffer sets, "slots", used alternately)::

    file --pread (I/O thread)--> pinned host slot[i%2] --H2D (copy stream)--> device slot[i%2]
         --kernel (compute stream)--> device out slot --D2H (copy stream 2)--> pinned host out
         --pwrite (writer thread)--> ShardWriter

CUDA events order the streams; a slot is reused only when the work of chunk ``i-2`` on it is
done. So reading chunk ``i+1``, transferring and blending chunk ``i`` and writing chunk ``i-1``
overlap. All device buffers together stay under ``max_gpu_bytes``; the pinned host staging
mirrors them (the same number of bytes). Buffers are allocated on first use and kept for the
blender's lifetime (pinned allocations are slow).

With ``device="cpu"`` (no CUDA: the tests, with ``TRITON_INTERPRET=1``) the same code runs on
plain CPU tensors, without streams or events: the chunking, offsets and kernels are exercised.

Numerics are those of the C++ core: blend bytes are identical (see
:mod:`layerswap_fast.kernels.blend`); row MAV sums |expert - base| in float32 within a chunk
(and a segment of a row) and in float64 across chunks, so it agrees with ``_core.row_mav_file``
to 1e-6 relative.

One ``CudaBackend`` serves one call at a time (calls from several threads are serialised).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..dtypes import DTYPE_SIZES
from ..errors import UnsupportedDtypeError

_ALIGN = 256  # bytes; every region of a slot starts at a multiple of this


def cuda_available() -> bool:
    """True when torch sees a CUDA device and triton is importable."""
    try:
        import torch
    except ImportError:
        return False
    try:
        if not torch.cuda.is_available():
            return False
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken CUDA/triton install means "no GPU backend"
        return False
    return True


def blend_tensors(inputs: Sequence[Any], weights: Sequence[float], out: Any) -> None:
    """``out`` = the blend of ``inputs`` (tensors on one device) with ``weights``: the Triton
    kernel ``blend_file`` runs on each chunk, so the bytes are the merge's."""
    from .. import kernels

    kernels.blend(list(inputs), [float(w) for w in weights], out)


def _torch_dtype(name: str):
    import torch

    table = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    try:
        return table[name]
    except KeyError:
        raise UnsupportedDtypeError(
            f"the GPU backend cannot compute with dtype {name!r} (supported: BF16, F16, F32)") from None


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


@dataclass
class _Region:
    offset: int  # bytes from the start of the slot
    nbytes: int  # capacity
    dtype: Any  # torch dtype
    itemsize: int


@dataclass
class _Read:
    file: Any  # _core.InputFile
    file_offset: int
    region: int  # index into the layout
    nbytes: int


@dataclass
class _Chunk:
    reads: list[_Read]
    payload: Any  # what the compute callback needs (element range, rows ...)
    out_region: int | None = None  # region to copy back and write
    out_nbytes: int = 0
    out_offset: int = 0  # absolute offset in the ShardWriter


class CudaBackend:
    """Streams blends and row-MAV reductions of file-backed tensors through the GPU.

    ``max_gpu_bytes`` bounds all device buffers together (two slots of inputs + output [+ a
    float32 accumulator when more than ``kernels.MAX_INPUTS`` inputs are blended]); the chunk
    size follows from it, capped by ``chunk_elems`` when given. ``device="cpu"`` runs the same
    pipeline on CPU tensors (needs ``TRITON_INTERPRET=1`` set before triton is imported).
    """

    def __init__(self, device: str = "cuda", max_gpu_bytes: int = 256 << 20, chunk_elems: int | None = None,
                 io_threads: int = 4):
        import torch

        from .. import kernels
        from ..kernels._common import interpreting

        self._torch = torch
        self._kernels = kernels
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("CudaBackend: no CUDA device is available")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            self._cuda = True
        elif self.device.type == "cpu":
            if not interpreting():
                raise RuntimeError("CudaBackend(device='cpu') runs the Triton kernels in the interpreter: "
                                   "set TRITON_INTERPRET=1 before importing triton")
            self._cuda = False
        else:
            raise ValueError(f"CudaBackend: unsupported device {device!r}")
        if max_gpu_bytes < 8 * _ALIGN:
            raise ValueError(f"CudaBackend: max_gpu_bytes={max_gpu_bytes} is too small")
        if chunk_elems is not None and chunk_elems < 1:
            raise ValueError("CudaBackend: chunk_elems must be >= 1")
        self.max_gpu_bytes = int(max_gpu_bytes)
        self.chunk_elems = chunk_elems
        self._slot_bytes = (self.max_gpu_bytes // 2) // _ALIGN * _ALIGN
        self._lock = threading.Lock()
        self._io = ThreadPoolExecutor(max_workers=max(1, io_threads), thread_name_prefix="lsf-gpu-read")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lsf-gpu-write")
        self._dev: list[Any] | None = None  # per slot: uint8 device tensor
        self._host: list[Any] | None = None  # per slot: uint8 host tensor (pinned on CUDA)
        self._host_np: list[np.ndarray] | None = None
        self._closed = False
        if self._cuda:
            with torch.cuda.device(self.device):
                self._h2d = torch.cuda.Stream(self.device)
                self._comp = torch.cuda.Stream(self.device)
                self._d2h = torch.cuda.Stream(self.device)
                self._events = [
                    {k: torch.cuda.Event() for k in ("h2d", "compute", "d2h")} for _ in range(2)
                ]

    # ------------------------------------------------------------------ public API

    def blend_file(self, inputs: Sequence[tuple[Any, int]], input_dtypes: Sequence[str],
                   weights: Sequence[float], out: Any, out_offset: int, out_dtype: str,
                   numel: int) -> None:
        """Like ``_core.blend_file``: ``numel`` elements from each ``(InputFile, offset)``,
        blended with ``weights`` and written to ``out`` (a ShardWriter) at ``out_offset``."""
        self._check_open()
        inputs = list(inputs)
        input_dtypes = list(input_dtypes)
        weights = [float(w) for w in weights]
        if not inputs:
            raise ValueError("blend_file: need at least one input")
        if not (len(inputs) == len(input_dtypes) == len(weights)):
            raise ValueError(f"blend_file: {len(inputs)} inputs, {len(input_dtypes)} dtypes, {len(weights)} weights")
        if numel < 0 or out_offset < 0:
            raise ValueError("blend_file: negative numel or offset")
        in_t = [_torch_dtype(d) for d in input_dtypes]
        out_t = _torch_dtype(out_dtype)
        if numel == 0:
            return
        in_sz = [DTYPE_SIZES[d] for d in input_dtypes]
        out_sz = DTYPE_SIZES[out_dtype]
        need_scratch = self._needs_scratch(input_dtypes, out_dtype)
        chunk = self.blend_chunk_elems(input_dtypes, out_dtype)

        torch = self._torch
        regions = [_Region(0, chunk * s, t, s) for s, t in zip(in_sz, in_t)]
        regions.append(_Region(0, chunk * out_sz, out_t, out_sz))
        if need_scratch:
            regions.append(_Region(0, chunk * 4, torch.float32, 4))
        out_r = len(inputs)
        scratch_r = out_r + 1 if need_scratch else None

        chunks = []
        for start in range(0, numel, chunk):
            n = min(chunk, numel - start)
            reads = [_Read(f, off + start * s, k, n * s) for k, ((f, off), s) in enumerate(zip(inputs, in_sz))]
            chunks.append(_Chunk(reads, n, out_r, n * out_sz, out_offset + start * out_sz))

        kernels = self._kernels

        def compute(slot: int, c: _Chunk) -> None:
            n = c.payload
            xs = [self._dev_view(slot, regions[k], n) for k in range(len(inputs))]
            o = self._dev_view(slot, regions[out_r], n)
            scratch = self._dev_view(slot, regions[scratch_r], n) if scratch_r is not None else None
            kernels.blend(xs, weights, o, scratch=scratch)

        with self._lock:
            self._check_open()
            self._place(regions)
            self._run(chunks, regions, compute, out)

    def row_mav_file(self, experts: Sequence[tuple[Any, int]], expert_dtypes: Sequence[str],
                     base: tuple[Any, int], base_dtype: str, rows: int, cols: int) -> np.ndarray:
        """Like ``_core.row_mav_file``: float64 (len(experts), rows), the row-wise mean
        |expert - base| of the ``rows x cols`` tensors at the given (file, offset)s; the base is
        read once for all experts."""
        self._check_open()
        experts = list(experts)
        expert_dtypes = list(expert_dtypes)
        if not experts:
            raise ValueError("row_mav_file: need at least one expert")
        if len(experts) != len(expert_dtypes):
            raise ValueError(f"row_mav_file: {len(experts)} experts, {len(expert_dtypes)} dtypes")
        if rows < 0 or cols < 0:
            raise ValueError("row_mav_file: negative shape")
        e_t = [_torch_dtype(d) for d in expert_dtypes]
        b_t = _torch_dtype(base_dtype)
        k = len(experts)
        if rows == 0:
            return np.zeros((k, 0), dtype=np.float64)
        if cols == 0:
            return np.full((k, rows), np.nan, dtype=np.float64)
        e_sz = [DTYPE_SIZES[d] for d in expert_dtypes]
        b_sz = DTYPE_SIZES[base_dtype]
        chunk = self.row_mav_chunk_elems(expert_dtypes, base_dtype)

        regions = [_Region(0, chunk * s, t, s) for s, t in zip(e_sz, e_t)]
        regions.append(_Region(0, chunk * b_sz, b_t, b_sz))
        b_r = k
        files = list(experts) + [base]
        sizes = e_sz + [b_sz]

        chunks = []
        if chunk >= cols:
            # whole rows per chunk
            rpc = chunk // cols
            for r0 in range(0, rows, rpc):
                nr = min(rpc, rows - r0)
                el0 = r0 * cols
                reads = [_Read(f, off + el0 * s, j, nr * cols * s) for j, ((f, off), s) in enumerate(zip(files, sizes))]
                chunks.append(_Chunk(reads, (r0, nr, cols)))
        else:
            # rows longer than a chunk: pieces of one row, cut at multiples of the column block
            piece = chunk // 1024 * 1024 if chunk >= 1024 else chunk
            for r in range(rows):
                for c0 in range(0, cols, piece):
                    nc = min(piece, cols - c0)
                    el0 = r * cols + c0
                    reads = [_Read(f, off + el0 * s, j, nc * s) for j, ((f, off), s) in enumerate(zip(files, sizes))]
                    chunks.append(_Chunk(reads, (r, 1, nc)))

        torch = self._torch
        kernels = self._kernels
        acc_box: list[Any] = []

        def compute(slot: int, c: _Chunk) -> None:
            r0, nr, nc = c.payload
            if not acc_box:
                acc_box.append(torch.zeros((k, rows), dtype=torch.float64, device=self.device))
            acc = acc_box[0]
            es = [self._dev_view(slot, regions[j], nr * nc).view(nr, nc) for j in range(k)]
            b = self._dev_view(slot, regions[b_r], nr * nc).view(nr, nc)
            sums = kernels.row_abs_diff_sums(es, b)  # float64 [k, nr]
            acc[:, r0:r0 + nr] += sums

        with self._lock:
            self._check_open()
            self._place(regions)
            self._run(chunks, regions, compute, None)
            # float64 sums of float32 chunk/segment sums (accumulated on the device, in order)
            result = acc_box[0].cpu().numpy()
        return result / float(cols)

    def blend_chunk_elems(self, input_dtypes: Sequence[str], out_dtype: str) -> int:
        """Elements per chunk that :meth:`blend_file` uses for these dtypes."""
        for d in list(input_dtypes) + [out_dtype]:
            _torch_dtype(d)
        scratch = self._needs_scratch(input_dtypes, out_dtype)
        per_elem = sum(DTYPE_SIZES[d] for d in input_dtypes) + DTYPE_SIZES[out_dtype] + (4 if scratch else 0)
        return self._chunk_elems(per_elem, len(input_dtypes) + 1 + int(scratch))

    def row_mav_chunk_elems(self, expert_dtypes: Sequence[str], base_dtype: str) -> int:
        """Elements per chunk that :meth:`row_mav_file` uses (before cutting at whole rows)."""
        for d in list(expert_dtypes) + [base_dtype]:
            _torch_dtype(d)
        per_elem = sum(DTYPE_SIZES[d] for d in expert_dtypes) + DTYPE_SIZES[base_dtype]
        return self._chunk_elems(per_elem, len(expert_dtypes) + 1)

    def close(self) -> None:
        """Release the thread pools and buffers. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._io.shutdown(wait=True)
            self._writer.shutdown(wait=True)
            if self._cuda:
                self._torch.cuda.synchronize(self.device)
            self._dev = self._host = self._host_np = None

    def __enter__(self) -> CudaBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("CudaBackend is closed")

    def _needs_scratch(self, input_dtypes: Sequence[str], out_dtype: str) -> bool:
        return len(input_dtypes) > self._kernels.MAX_INPUTS and out_dtype != "F32"

    def _chunk_elems(self, bytes_per_elem: int, n_regions: int) -> int:
        """Elements per chunk so that one slot (every region, aligned) fits in half the budget."""
        usable = self._slot_bytes - n_regions * _ALIGN
        chunk = usable // bytes_per_elem
        if chunk < 1:
            raise ValueError(f"CudaBackend: max_gpu_bytes={self.max_gpu_bytes} is too small for "
                             f"{n_regions} buffers")
        if self.chunk_elems is not None:
            chunk = min(chunk, self.chunk_elems)
        # whole GPU blocks when there is room (kernels work on blocks of up to 4096 elements)
        for unit in (1 << 16, 4096, 256):
            if chunk >= 4 * unit:
                return chunk // unit * unit
        return chunk

    def _place(self, regions: list[_Region]) -> None:
        pos = 0
        for r in regions:
            r.offset = pos
            pos += _align(r.nbytes)
        assert pos <= self._slot_bytes, (pos, self._slot_bytes)
        self._ensure_buffers()

    def _ensure_buffers(self) -> None:
        if self._dev is not None:
            return
        torch = self._torch
        n = self._slot_bytes
        if self._cuda:
            self._dev = [torch.empty(n, dtype=torch.uint8, device=self.device) for _ in range(2)]
            self._host = [torch.empty(n, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            torch.cuda.synchronize(self.device)
        else:
            self._dev = [torch.empty(n, dtype=torch.uint8) for _ in range(2)]
            self._host = [torch.empty(n, dtype=torch.uint8) for _ in range(2)]
        self._host_np = [h.numpy() for h in self._host]

    def _dev_view(self, slot: int, r: _Region, n: int):
        return self._dev[slot][r.offset:r.offset + n * r.itemsize].view(r.dtype)

    def _stream(self, s):
        if self._cuda:
            return self._torch.cuda.stream(s)
        return contextlib.nullcontext()

    def _run(self, chunks: list[_Chunk], regions: list[_Region], compute: Callable[[int, _Chunk], None],
             out: Any | None) -> None:
        """Drive the double-buffered pipeline over ``chunks`` (see the module docstring)."""
        cuda = self._cuda
        dev, host, host_np = self._dev, self._host, self._host_np
        ev = self._events if cuda else None
        pending: list[Future] = []

        def submit_reads(i: int) -> list[Future]:
            slot = i % 2
            futs = []
            for rd in chunks[i].reads:
                off = regions[rd.region].offset
                futs.append(self._io.submit(rd.file.read_into, rd.file_offset, host_np[slot][off:off + rd.nbytes]))
            pending.extend(futs)
            return futs

        def write_task(slot: int, event: Any, offset: int, a: int, nbytes: int) -> None:
            if event is not None:
                event.synchronize()
            out.write(offset, host_np[slot][a:a + nbytes])

        reads = {0: submit_reads(0)} if chunks else {}
        writes: dict[int, Future] = {}
        try:
            for i, c in enumerate(chunks):
                slot = i % 2
                for f in reads.pop(i):
                    f.result()
                # host -> device (after the kernel of chunk i-2 is done with this slot's inputs)
                with self._stream(self._h2d if cuda else None):
                    if cuda:
                        self._h2d.wait_event(ev[slot]["compute"])
                    for rd in c.reads:
                        off = regions[rd.region].offset
                        dev[slot][off:off + rd.nbytes].copy_(host[slot][off:off + rd.nbytes], non_blocking=cuda)
                    if cuda:
                        ev[slot]["h2d"].record(self._h2d)
                # start reading the next chunk into the other slot (once its H2D has finished)
                if i + 1 < len(chunks):
                    if cuda:
                        ev[1 - slot]["h2d"].synchronize()
                    reads[i + 1] = submit_reads(i + 1)
                # compute (after this chunk's H2D, and after the D2H of chunk i-2 freed the output)
                with self._stream(self._comp if cuda else None):
                    if cuda:
                        self._comp.wait_event(ev[slot]["h2d"])
                        self._comp.wait_event(ev[slot]["d2h"])
                    compute(slot, c)
                    if cuda:
                        ev[slot]["compute"].record(self._comp)
                if c.out_region is None:
                    continue
                # device -> host, once the write of chunk i-2 has released this slot's host buffer
                if i - 2 in writes:
                    writes.pop(i - 2).result()
                r = regions[c.out_region]
                a = r.offset
                with self._stream(self._d2h if cuda else None):
                    if cuda:
                        self._d2h.wait_event(ev[slot]["compute"])
                    host[slot][a:a + c.out_nbytes].copy_(dev[slot][a:a + c.out_nbytes], non_blocking=cuda)
                    if cuda:
                        ev[slot]["d2h"].record(self._d2h)
                fut = self._writer.submit(write_task, slot, ev[slot]["d2h"] if cuda else None,
                                          c.out_offset, a, c.out_nbytes)
                pending.append(fut)
                writes[i] = fut
            for i in sorted(writes):
                writes.pop(i).result()
            if cuda:
                self._comp.synchronize()
        finally:
            # Leave no background work touching the buffers, whatever happened.
            for f in pending:
                try:
                    f.result()
                except BaseException:  # noqa: BLE001 - the first error is already propagating
                    pass
            if cuda:
                self._torch.cuda.synchronize(self.device)
