"""Merged tensors into memory, one at a time, with the bytes a written merge holds.

Each tensor is written by the very code that writes a shard (the same copy, the same op, the same
backend) into a file on a memory file system, which is then mapped and unlinked: the mapping is the
tensor's only copy, freed when the last reference to it goes. So memory holds the tensor being
handed over plus the chunk buffers of the op that made it, and the bytes cannot drift from
``merge``'s.
"""

from __future__ import annotations

import mmap
from concurrent.futures import ThreadPoolExecutor
import os
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import _core
from ..formats.checkpoint import Checkpoint, TensorSpec
from ..formats.layout import tensor_nbytes
from ..plan import TensorRecipe
from .backends import Backend
from .execute import _ShardFiller

#: where a tensor is made: a memory file system where there is one
_SHM = Path("/dev/shm")


def _scratch_dir() -> Path:
    return _SHM if _SHM.is_dir() and os.access(_SHM, os.W_OK) else Path(tempfile.gettempdir())


def merged_buffers(recipes: Sequence[TensorRecipe], inputs: Mapping[str, Checkpoint], backend: Backend,
                   threads: int = 0) -> Iterator[tuple[TensorRecipe, memoryview]]:
    """Each recipe's output bytes, in order, as a view of a private (copy-on-write) mapping."""
    filler = _ShardFiller(inputs, backend, lambda n: None, threads)
    scratch = _scratch_dir()
    for recipe in recipes:
        nbytes = tensor_nbytes(recipe)
        if nbytes == 0:
            yield recipe, memoryview(b"")
            continue
        path = scratch / f".layerswap-tensor-{os.getpid()}-{uuid.uuid4().hex}"
        try:
            with _core.ShardWriter(str(path), nbytes) as writer:
                filler.write_tensor(writer, recipe, 0)
                writer.close(sync=False)
            with open(path, "rb") as f:
                # private: a consumer may write to its tensor (the pages it touches become its own)
                mapping = mmap.mmap(f.fileno(), nbytes, access=mmap.ACCESS_COPY)
        finally:
            path.unlink(missing_ok=True)
        yield recipe, memoryview(mapping)



class _Kept(dict):  # type: ignore[type-arg]
    """Input tensors kept in memory after their first read, by (file, offset, bytes), while a
    byte budget lasts."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = budget

    def find(self, f: _core.InputFile, spec: TensorSpec) -> Any:
        return self.get((f.path, spec.offset, spec.nbytes))

    def keep(self, f: _core.InputFile, spec: TensorSpec, data: Any) -> None:
        if spec.nbytes <= self.budget:
            self[(f.path, spec.offset, spec.nbytes)] = data
            self.budget -= spec.nbytes


def _sources(recipe: TensorRecipe, inputs: Mapping[str, Checkpoint]) -> list[tuple[_core.InputFile, TensorSpec]]:
    """Each term's input file and tensor."""
    specs = [inputs[t.role].specs[recipe.source(t)] for t in recipe.terms]
    return [(inputs[t.role].input_file(s.file), s) for t, s in zip(recipe.terms, specs)]


class DirectFiller:
    """Copies and blends made on the CPU straight into a caller's buffer (a loaded model's
    parameter), with the bytes :func:`merged_buffers` gives: a copy is read into it, a blend is the
    core's ``blend_buffers``, the arithmetic of the ``blend_file`` a merge runs. With ``resident``
    bytes to spare, every input tensor read stays in memory for the next call (a sweep that moves
    ``bottom`` back and forth reads each expert layer once)."""

    def __init__(self, threads: int = 0, resident: int = 0) -> None:
        self.threads = threads if threads > 0 else (os.cpu_count() or 1)
        self._kept = _Kept(resident)
        self._pool: ThreadPoolExecutor | None = None  # for copies of kept tensors, made at the first

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    @staticmethod
    def can_fill(recipe: TensorRecipe) -> bool:
        return recipe.op in ("copy", "blend") and not recipe.factors

    def fill(self, recipe: TensorRecipe, inputs: Mapping[str, Checkpoint], out: Any) -> None:
        """Write ``recipe``'s bytes into ``out`` (a writable uint8 array of exactly its size)."""
        import numpy as np  # not on import: a merge never needs it

        sources = _sources(recipe, inputs)
        if recipe.op == "copy":
            (f, spec), = sources
            kept = self._kept.find(f, spec)
            if kept is None:
                f.read_into(spec.offset, out)
                if spec.nbytes <= self._kept.budget:  # a copy: the caller's buffer is the caller's
                    self._kept.keep(f, spec, np.array(out, dtype=np.uint8))
            else:
                self._copy(out, kept)
            return
        _core.blend_buffers([self._read(f, s) for f, s in sources], [s.dtype for _, s in sources],
                            [t.weight for t in recipe.terms], out, recipe.dtype, self.threads)

    def _copy(self, out: Any, data: Any) -> None:
        """``out[:] = data`` in one piece per thread (numpy releases the GIL while it copies)."""
        import numpy as np

        if self.threads == 1 or len(data) < _SPLIT_BYTES:
            np.copyto(out, data)
            return
        self._pool = self._pool or ThreadPoolExecutor(self.threads, thread_name_prefix="layerswap-copy")
        step = -(-len(data) // self.threads)
        list(self._pool.map(lambda i: np.copyto(out[i:i + step], data[i:i + step]), range(0, len(data), step)))

    def _read(self, f: _core.InputFile, spec: TensorSpec) -> Any:
        import numpy as np

        kept = self._kept.find(f, spec)
        if kept is None:
            kept = np.empty(spec.nbytes, dtype=np.uint8)
            f.read_into(spec.offset, kept)
            self._kept.keep(f, spec, kept)
        return kept


class DeviceFiller:
    """Copies and blends made on a torch device (a GPU) from the experts' tensors kept there: each
    input tensor crosses to the device once while ``resident`` bytes last, a copy is a copy on the
    device, a blend is the Triton kernel the CUDA backend's ``blend_file`` runs
    (:func:`~layerswap_fast.engine.cuda.blend_tensors`), so the bytes are the merge's. Tensors
    beyond the budget are read from their files for each call."""

    #: the dtypes the blend kernel reads and writes
    DTYPES = ("BF16", "F16", "F32")

    def __init__(self, device: Any, resident: int) -> None:
        self.device = device
        self._kept = _Kept(resident)

    @classmethod
    def can_fill(cls, recipe: TensorRecipe, specs: Sequence[TensorSpec]) -> bool:
        return (DirectFiller.can_fill(recipe) and recipe.dtype in cls.DTYPES
                and (recipe.op == "copy" or all(s.dtype in cls.DTYPES for s in specs)))

    def fill(self, recipe: TensorRecipe, inputs: Mapping[str, Checkpoint], out: Any) -> None:
        """Write ``recipe``'s bytes into ``out``, a contiguous tensor on the device with the
        recipe's dtype and shape."""
        import torch

        from ..dtypes import TORCH_NAMES
        from .cuda import blend_tensors

        sources = _sources(recipe, inputs)
        flat = out.detach().reshape(-1)
        if recipe.op == "copy":
            flat.view(torch.uint8).copy_(self._tensor(*sources[0]))
            return
        blend_tensors([self._tensor(f, s).view(getattr(torch, TORCH_NAMES[s.dtype])) for f, s in sources],
                      [t.weight for t in recipe.terms], flat)

    def _tensor(self, f: _core.InputFile, spec: TensorSpec) -> Any:
        """The input tensor's bytes on the device (uint8), kept there while the budget allows."""
        import numpy as np
        import torch

        kept = self._kept.find(f, spec)
        if kept is None:
            data = np.empty(spec.nbytes, dtype=np.uint8)
            f.read_into(spec.offset, data)
            kept = torch.from_numpy(data).to(self.device)
            self._kept.keep(f, spec, kept)
        return kept


def available_memory() -> int:
    """Bytes the kernel could give without swapping (``MemAvailable``), or the free pages' bytes."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        return 0


#: below this a copy is not worth splitting across threads
_SPLIT_BYTES = 8 << 20
