"""Merged tensors into memory, one at a time, with the bytes a written merge holds.

Each tensor is written by the very code that writes a shard (the same copy, the same op, the same
backend) into a file on a memory file system, which is then mapped and unlinked: the mapping is the
tensor's only copy, freed when the last reference to it goes. So memory holds the tensor being
handed over plus the chunk buffers of the op that made it, and the bytes cannot drift from
``merge``'s.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from .. import _core
from ..formats.checkpoint import Checkpoint
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

