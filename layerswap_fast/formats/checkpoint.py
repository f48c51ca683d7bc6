"""Open safetensors checkpoints by their headers alone, validating them strictly.

A checkpoint is a directory holding ``model.safetensors.index.json`` and its shards, a directory
holding one ``*.safetensors`` file, or a single ``.safetensors`` file; or a Hugging Face hub id
(``org/name[@revision]``) of a model in the local cache, which names its snapshot directory. Opening one reads only the
headers; the result is a table of :class:`TensorSpec` (where every tensor's bytes live). Tensor
data is read lazily, in chunks, through the C++ core.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

from .. import _core
from ..dtypes import DTYPE_SIZES
from ..errors import CheckpointError
from ..plan.layers import CONFIG_SCHEMA
from ..safe_read import Map, Str, parse_json, read_json, show_path
from .hub import find_snapshot
from .side_files import NAMES as SIDE_FILE_NAMES

INDEX_NAME = "model.safetensors.index.json"
#: how the kernels read input shards: ``mmap`` straight from a read-only mapping (no copy; a file
#: truncated under it is an error, not a crash), ``pread`` into buffers, or ``auto``: mmap except on
#: network and FUSE filesystems, where faulting a mapping in page by page is far slower than reads
IO_MODES = ("auto", "mmap", "pread")

#: written beside every output: what made it, and every file's size and checksum (see verify)
RECIPE_NAME = "layerswap_recipe.json"
_PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin", "consolidated.00.pth")
_CONVERT_HINT = ("pickle checkpoints are never unpickled; convert it to safetensors first, "
                 "e.g. load it once with transformers and call save_pretrained(safe_serialization=True)")


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor's bytes live: ``nbytes`` bytes at absolute ``offset`` of ``file``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return prod(self.shape)


@dataclass(frozen=True)
class ShardHeader:
    """One shard's parsed header: its tensors in data order and its ``__metadata__``."""

    path: Path
    size: int
    header_sha256: str
    metadata: dict[str, str]
    tensors: tuple[TensorSpec, ...]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_entry(name: str, entry: Any, where: str) -> tuple[str, tuple[int, ...], int, int]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{where}: tensor {name!r} must have exactly dtype, shape, data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise CheckpointError(f"{where}: tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: tensor {name!r} has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_int(o) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    expected = prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise CheckpointError(
            f"{where}: tensor {name!r} spans {end - begin} bytes but shape {shape} of {dtype} "
            f"needs {expected}")
    return dtype, tuple(shape), begin, end


def parse_header(raw: bytes, file_size: int, path: Path) -> tuple[dict[str, str], list[TensorSpec]]:
    """Validate a safetensors header against its file and return (metadata, tensors by offset).

    Rules: a JSON object; ``__metadata__`` (optional) maps strings to strings; every other key is
    a tensor with a known dtype, a shape, and data offsets whose length is numel × dtype size;
    offsets tile the data buffer from 0 without gaps or overlaps, and the buffer ends exactly at
    the end of the file.
    """
    where = show_path(path)
    header = parse_json(raw, f"{where}: header", error=CheckpointError)
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(f"{where}: __metadata__ must map strings to strings")
    data_start = 8 + len(raw)
    entries = []
    for name, entry in header.items():
        dtype, shape, begin, end = _parse_entry(name, entry, where)
        entries.append((begin, end, name, dtype, shape))
    entries.sort(key=lambda e: (e[0], e[1]))
    position = 0
    specs = []
    for begin, end, name, dtype, shape in entries:
        if begin != position:
            kind = "overlaps the previous tensor" if begin < position else "leaves a gap before it"
            raise CheckpointError(f"{where}: tensor {name!r} at offset {begin} {kind} (expected {position})")
        position = end
        specs.append(TensorSpec(name, dtype, shape, path, data_start + begin, end - begin))
    if data_start + position != file_size:
        raise CheckpointError(
            f"{where}: file is {file_size} bytes but its header describes {data_start + position}"
            f" ({'trailing bytes' if file_size > data_start + position else 'truncated data'})")
    return metadata, specs


def open_shard(path: Path) -> tuple[_core.InputFile, ShardHeader]:
    """Open a shard and parse its header. The handle is the one later reads must use: a file
    put in the shard's place after this would otherwise feed bytes the header never described."""
    try:
        f = _core.InputFile(str(path))
    except _core.CoreError as e:
        raise CheckpointError(str(e)) from None
    try:
        raw = f.read_header()
        metadata, tensors = parse_header(raw, f.size, path)
    except _core.CoreError as e:
        f.close()
        raise CheckpointError(str(e)) from None
    except BaseException:
        f.close()
        raise
    return f, ShardHeader(path, f.size, hashlib.sha256(raw).hexdigest(), metadata, tuple(tensors))


def read_shard_header(path: Path) -> ShardHeader:
    f, header = open_shard(path)
    f.close()
    return header


def _lexically_inside(directory: Path, relative: str) -> bool:
    # Symbolic links are allowed (the Hugging Face cache links shards into snapshots), so this
    # checks the path as written, not where it resolves to.
    if not relative or os.path.isabs(relative) or "\\" in relative:
        return False
    return ".." not in Path(relative).parts


#: what this package reads of an index: the tensor → shard file map (``metadata`` is free-form)
INDEX_SCHEMA = Map({"weight_map": Map(values=Str())}, required=("weight_map",))


def _read_index(index_path: Path) -> dict[str, str]:
    weight_map = read_json(index_path, INDEX_SCHEMA, error=CheckpointError)["weight_map"]
    for shard in dict.fromkeys(weight_map.values()):  # each file once: an index names it per tensor
        if not _lexically_inside(index_path.parent, shard):
            name = next(n for n, s in weight_map.items() if s == shard)
            raise CheckpointError(
                f"{index_path}: shard path {shard!r} of tensor {name!r} is outside the checkpoint directory")
    return weight_map


def _find_weight_files(path: Path) -> tuple[Path, list[Path], dict[str, str] | None]:
    """Return (directory, shard files in order, weight map or None) for a checkpoint path."""
    if path.is_file():
        if path.suffix != ".safetensors":
            if path.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
                raise CheckpointError(f"{path}: {_CONVERT_HINT}")
            raise CheckpointError(f"{path}: not a .safetensors file")
        return path.parent, [path], None
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    index_path = path / INDEX_NAME
    if index_path.exists():
        weight_map = _read_index(index_path)
        shards = list(dict.fromkeys(weight_map.values()))
        return path, [path / s for s in shards], weight_map
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:
        return path, singles, None
    if len(singles) > 1:
        raise CheckpointError(f"{path}: several .safetensors files but no {INDEX_NAME}")
    if any((path / n).exists() for n in _PICKLE_NAMES) or list(path.glob("*.bin")):
        raise CheckpointError(f"{path}: {_CONVERT_HINT}")
    raise CheckpointError(f"{path}: no safetensors weights found")


class Checkpoint:
    """A validated checkpoint: tensor specs in file order, its config, and lazy data access."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        snapshot = find_snapshot(path)
        self.path = Path(path) if snapshot is None else snapshot.path
        #: ``org/name`` and the commit it resolved to, for a hub id; None for a local path
        self.hub_id: str | None = None if snapshot is None else snapshot.hub_id
        self.revision: str | None = None if snapshot is None else snapshot.revision
        self.directory, shard_paths, weight_map = _find_weight_files(self.path)
        self._files: dict[Path, _core.InputFile] = {}
        self._io = "auto"
        self._occupied: dict[Path, str] | None = None
        self._samples: dict[tuple[int, int], str] = {}
        self._stamps: dict[Path, tuple[int, ...]] = {}
        try:
            self.shards: tuple[ShardHeader, ...] = tuple(self._open_shards(shard_paths))
            self.specs = self._collect_specs()
            if weight_map is not None:
                _check_index_agrees(self.directory / INDEX_NAME, weight_map, self.specs)
            self.config = _read_config(self.directory)
        except BaseException:
            self.close()
            raise

    def _open_shards(self, paths: list[Path]) -> Iterator[ShardHeader]:
        for p in paths:
            if not p.is_file():
                raise CheckpointError(f"shard {p} named in the index does not exist")
            self._files[p], header = open_shard(p)
            try:
                self._stamps[p] = _stamp(p)
                self._files[p].check_unchanged()  # the stamp is of the file the header came from
            except OSError as e:  # CoreError is one
                raise CheckpointError(f"{p}: {e.strerror if type(e) is OSError else e}") from None
            yield header

    def _collect_specs(self) -> dict[str, TensorSpec]:
        specs: dict[str, TensorSpec] = {}
        for shard in self.shards:
            for spec in shard.tensors:
                if spec.name in specs:
                    raise CheckpointError(
                        f"{self.path}: tensor {spec.name!r} appears in both "
                        f"{specs[spec.name].file.name} and {shard.path.name}")
                specs[spec.name] = spec
        return specs

    @property
    def names(self) -> list[str]:
        return list(self.specs)

    def fingerprint(self) -> str:
        """sha256 over every shard's name, size and header: cheap, and changes with any re-save."""
        h = hashlib.sha256()
        for shard in self.shards:
            h.update(f"{shard.path.name}\0{shard.size}\0{shard.header_sha256}\n".encode())
        return h.hexdigest()

    def content_sample(self, samples: int = 8, size: int = 4096) -> str:
        """sha256 over :meth:`fingerprint` and ``samples × size`` bytes read at evenly spaced
        offsets of every shard's data: tells apart experts whose headers are identical (the usual
        case for models fine-tuned from one base), at the cost of a few small reads. Taken once
        while the checkpoint is open (:meth:`check_unchanged` vouches for it after that)."""
        key = (samples, size)
        if key not in self._samples:
            self._samples[key] = self._sample(samples, size)
        return self._samples[key]

    def _sample(self, samples: int, size: int) -> str:
        h = hashlib.sha256(self.fingerprint().encode())
        for shard in self.shards:
            if not shard.tensors:
                continue
            start = min(t.offset for t in shard.tensors)
            length = shard.size - start
            n = min(size, length)
            f = self.input_file(shard.path)
            for i in range(samples if length > n else 1):
                offset = start + (length - n) * i // max(1, samples - 1)
                try:
                    h.update(f.read(offset, n))
                except _core.CoreError as e:
                    raise CheckpointError(str(e)) from None
        return h.hexdigest()

    def check_unchanged(self, during: str) -> None:
        """CheckpointError when a shard was replaced, truncated, grown or rewritten in place since
        it was opened (size, inode, modification and change times): the ``during`` (a merge, an
        analysis) may have read mixed bytes."""
        for shard in self.shards:
            try:
                self.input_file(shard.path).check_unchanged()
                now = _stamp(shard.path)
            except OSError as e:  # CoreError is one
                raise CheckpointError(f"input changed during the {during}: {e}") from None
            if now != self._stamps[shard.path]:
                raise CheckpointError(f"input changed during the {during}: {shard.path} was modified "
                                      f"while in use")

    def relinked_file(self, device: int, inode: int) -> None:
        """The file (device, inode) was just hard-linked or cloned by us, which moves its change
        time only: take the new one for each of this checkpoint's shards that is that file, by
        whatever name."""
        for path, then in list(self._stamps.items()):
            if then[:2] == (device, inode):
                now = _stamp(path)
                if now[:-1] == then[:-1]:
                    self._stamps[path] = now

    def occupied_paths(self) -> dict[Path, str]:
        """Every resolved path this checkpoint occupies (its directory or file, and the targets of
        its shard links), each with what it is: what no command may write, replace or delete.
        Resolved once while it is open (a sweep asks for every candidate)."""
        if self._occupied is None:
            self._occupied = self._resolve_occupied()
        return dict(self._occupied)

    def _resolve_occupied(self) -> dict[Path, str]:
        found = {Path(os.path.realpath(self.path)): f"the input {self.path}",
                 Path(os.path.realpath(self.directory)): f"the input {self.path}"}
        files = [s.path for s in self.shards] + [self.directory / n for n in SIDE_FILE_NAMES + (INDEX_NAME,)]
        for path in files:
            if os.path.lexists(path):
                found.setdefault(Path(os.path.realpath(path)), f"the file {path} of the input {self.path}")
        return found

    def set_io(self, io: str) -> None:
        """How the kernels read this checkpoint's shards from now on: one of :data:`IO_MODES`
        (the bytes are the same either way)."""
        if io not in IO_MODES:
            raise ValueError(f"io must be one of {', '.join(IO_MODES)}, got {io!r}")
        self._io = io
        for f in self._files.values():
            try:
                f.set_io(io)
            except _core.CoreError as e:
                raise CheckpointError(str(e)) from None

    def input_file(self, path: Path) -> _core.InputFile:
        """The read handle of one shard: the one its header was read through, kept open until
        :meth:`close` (reopened after that)."""
        f = self._files.get(path)
        if f is None:
            try:
                f = self._files[path] = _core.InputFile(str(path), io=self._io)
            except _core.CoreError as e:
                raise CheckpointError(str(e)) from None
        return f

    def read(self, name: str, start: int = 0, nbytes: int | None = None) -> bytes:
        """Bytes [start, start + nbytes) of tensor ``name`` (to its end when nbytes is None)."""
        spec = self.specs[name]
        if nbytes is None:
            nbytes = spec.nbytes - start
        if start < 0 or nbytes < 0 or start + nbytes > spec.nbytes:
            raise ValueError(f"range [{start}, {start + nbytes}) outside tensor {name!r} of {spec.nbytes} bytes")
        return self.input_file(spec.file).read(spec.offset + start, nbytes)

    def iter_chunks(self, name: str, chunk_bytes: int = 64 << 20) -> Iterator[bytes]:
        """The tensor's bytes in pieces of at most ``chunk_bytes`` (memory stays O(chunk))."""
        nbytes = self.specs[name].nbytes
        for start in range(0, nbytes, chunk_bytes):
            yield self.read(name, start, min(chunk_bytes, nbytes - start))

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.specs)} tensors, {len(self.shards)} shards)"


def _stamp(path: Path) -> tuple[int, ...]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _check_index_agrees(index_path: Path, weight_map: dict[str, str], specs: dict[str, TensorSpec]) -> None:
    for name, shard in weight_map.items():
        spec = specs.get(name)
        if spec is None or spec.file.name != Path(shard).name:
            raise CheckpointError(f"{index_path}: tensor {name!r} is not in its shard {shard}")
    for name, spec in specs.items():
        if name not in weight_map:
            raise CheckpointError(f"{index_path}: shard {spec.file.name} holds {name!r}, which the index does not list")


def _read_config(directory: Path) -> dict[str, Any] | None:
    """``config.json`` checked against :data:`layers.CONFIG_SCHEMA`; None when there is none (a
    FIFO or a dangling link in its place is an error, not an absent config)."""
    path = directory / "config.json"
    if not os.path.lexists(path):
        return None
    config: dict[str, Any] = read_json(path, CONFIG_SCHEMA, error=CheckpointError)
    return config


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open and validate a checkpoint by its headers; no tensor data is read."""
    return Checkpoint(path)
