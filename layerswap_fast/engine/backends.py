"""Where the arithmetic runs: one ``Backend`` protocol, the C++ core on the CPU, Triton on CUDA.

Both implement the same two streaming kernels over byte ranges of open input files: ``blend_file``
(out = round(Σ wᵢ·inputᵢ) in float32) and ``row_mav_file`` (per-row mean |expert − base|), and both
give the same bytes, so nothing above the engine cares which one runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .. import _core
from ..errors import ConfigError, param

DEVICES = ("auto", "cpu", "cuda")
InputRange = tuple[_core.InputFile, int]  # a file and the byte offset of a tensor in it


class Backend(Protocol):
    def blend_file(self, inputs: Sequence[InputRange], input_dtypes: Sequence[str], weights: Sequence[float],
                   out: _core.ShardWriter, out_offset: int, out_dtype: str, numel: int) -> None: ...

    def row_mav_file(self, experts: Sequence[InputRange], expert_dtypes: Sequence[str], base: InputRange,
                     base_dtype: str, rows: int, cols: int) -> Any: ...

    def close(self) -> None: ...


@dataclass
class CpuBackend:
    """The C++ core: multi-threaded, GIL released, chunked."""

    threads: int = 0
    chunk_elems: int = 1 << 20
    #: a row-MAV worker holds a chunk of the base and of every expert: 256K elements keep three bf16
    #: buffers in L2, so the kernel reads what pread just wrote from cache
    row_chunk_elems: int = 1 << 18

    def blend_file(self, inputs: Sequence[InputRange], input_dtypes: Sequence[str], weights: Sequence[float],
                   out: _core.ShardWriter, out_offset: int, out_dtype: str, numel: int) -> None:
        _core.blend_file(inputs, input_dtypes, weights, out, out_offset, out_dtype, numel,
                         self.chunk_elems, self.threads)

    def row_mav_file(self, experts: Sequence[InputRange], expert_dtypes: Sequence[str], base: InputRange,
                     base_dtype: str, rows: int, cols: int) -> Any:
        return _core.row_mav_file(experts, expert_dtypes, base, base_dtype, rows, cols,
                                  self.row_chunk_elems, self.threads)

    def close(self) -> None:
        pass


def cuda_present() -> bool:
    """Whether a CUDA device can run our kernels (torch and triton installed)."""
    # Importing torch costs ~250 MB of RSS: look for an NVIDIA device node first.
    if not any(Path("/dev").glob("nvidia[0-9]*")):
        return False
    try:
        from .cuda import cuda_available
    except ImportError:  # torch or triton not installed: the CPU path needs neither
        return False
    return cuda_available()


def make_backend(device: str, threads: int | None, max_gpu_bytes: int | None = None) -> Backend:
    """The backend for ``device`` (``auto`` picks CUDA when a GPU is present)."""
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device != "cpu" and cuda_present():
        from .cuda import CudaBackend
        return CudaBackend(device="cuda", **({"max_gpu_bytes": max_gpu_bytes} if max_gpu_bytes else {}))
    if device == "cuda":
        raise ConfigError(f"{param('device')} cuda was asked for but no CUDA device (or no torch/triton) is available")
    return CpuBackend(threads=threads or 0)
