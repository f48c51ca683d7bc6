"""Execute a merge plan: stream every output shard into a staging directory, then publish it.

The engine knows plans, checkpoints and files; nothing of the CLI. Copies are kernel-side byte
copies; blends stream fixed-size chunks through a backend (the C++ core on the CPU, Triton on a
GPU). Memory is O(chunk × inputs × threads), independent of the model's size.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import _core
from ..formats.checkpoint import INDEX_NAME, RECIPE_NAME, Checkpoint, TensorSpec
from ..errors import OutputError
from ..formats.layout import OutputShard, ReusedShard, ShardLayout, index_json, needed_bytes, tensor_nbytes
from ..formats.model_card import CARD_NAME
from ..formats.output import clone_block, publish, reuse_shard, staging_directory
from ..formats.side_files import SideFile, copy_side_files
from ..formats.digest import DigestCache, layout_segments
from ..formats.writeback import (DEFAULT_CHECKSUM, ShardFinisher, cached_hash, digest_cache, digest_entry, hash_file,
                                 needs_throttle, plain_copy, remember_hash)
from ..plan import TensorRecipe
from ..units import format_bytes
from . import ops
from .backends import Backend
from .ops import OPS


Progress = Callable[[int, int], None]  # (bytes just written, total bytes)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@dataclass
class MergeStats:
    out: Path
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    shards: int
    copied: int
    blended: int
    bytes_reused: int = 0
    reused: dict[str, int] | None = None  # link method -> number of whole input shards reused
    #: tensor bytes computed, copied, cloned and reused in whole shards (the recipe's "bytes")
    made: dict[str, int] | None = None
    clones: bool = False  # whether copies could share the inputs' extents

    @property
    def bytes_total(self) -> int:
        """The output's bytes, new and reused."""
        return self.bytes_written + self.bytes_reused

    @property
    def gb_per_s(self) -> float:
        return self.bytes_total / self.seconds / 1e9 if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        reused = ""
        if self.reused:
            how = ", ".join(f"{n} by {method}" for method, n in sorted(self.reused.items()))
            reused = f", {format_bytes(self.bytes_reused)} in {sum(self.reused.values())} reused input shards: {how}"
        made = ""
        if self.made:
            m = self.made
            made = (f"; tensor bytes {format_bytes(m['computed'])} computed, {format_bytes(m['copied'])} copied, "
                    f"{format_bytes(m['cloned'])} cloned (clones {'on' if self.clones else 'off'})")
        return (f"wrote {self.out}: {self.shards} shards, {format_bytes(self.bytes_total)} in {self.seconds:.2f} s "
                f"({self.gb_per_s:.2f} GB/s; {format_bytes(self.bytes_written)} new{reused}), {self.copied} tensors "
                f"copied, {self.blended} computed{made}, peak RSS {self.peak_rss_bytes / 2**20:.0f} MB")


class _ShardFiller:
    """Writes one shard's tensors: coalesced byte copies and streamed blends."""

    def __init__(self, inputs: Mapping[str, Checkpoint], backend: Backend, progress: Callable[[int], None],
                 threads: int = 0, clones: Clones | None = None):
        self.inputs = inputs
        self.backend = backend
        self.progress = progress
        self.threads = threads
        self.advance: Callable[[int], None] = lambda n: None
        #: told of each copy (dst offset, bytes, input path, src offset) before ``advance`` covers it
        self.copied: Callable[[int, int, str, int], None] = lambda d, n, p, s: None
        self.context = ops.OpContext(backend, threads, self._advance)
        self.clones = clones or Clones(None, True)
        #: bytes of new tensors by how they were made: computed, copied, cloned
        self.made = {"computed": 0, "copied": 0, "cloned": 0}
        self._plain: bytearray | None = None  # the buffer of copies through memory (--link copy)

    def _advance(self, end: int, nbytes: int) -> None:
        self.advance(end)
        self.progress(nbytes)

    def source(self, role: str, name: str) -> TensorSpec:
        return self.inputs[role].specs[name]

    def fill(self, writer: _core.ShardWriter, shard: ShardLayout, advance: Callable[[int], None]) -> None:
        """Write the shard in file order, telling ``advance`` how far the file is complete."""
        self.advance = advance
        writer.write(0, shard.prefix())
        advance(shard.data_start)
        run: list[int] | None = None  # [src_offset, dst_offset, nbytes] of a pending copy
        source: _core.InputFile | None = None  # the file that run copies from
        for placed in shard.tensors:
            recipe, dst = placed.recipe, shard.data_start + placed.begin
            if recipe.op == "copy":
                role = recipe.terms[0].role
                spec = self.source(role, recipe.source(recipe.terms[0]))
                src = self.inputs[role].input_file(spec.file)
                if run is not None and src is source and run[0] + run[2] == spec.offset and run[1] + run[2] == dst:
                    run[2] += placed.nbytes
                    continue
                self._flush_copy(writer, source, run)
                run, source = [spec.offset, dst, placed.nbytes], src
            else:
                self._flush_copy(writer, source, run)
                run = None
                self._compute(writer, recipe, dst)
        self._flush_copy(writer, source, run)

    def write_tensor(self, writer: _core.ShardWriter, recipe: TensorRecipe, dst: int) -> None:
        """One tensor alone at ``dst``: a byte copy or its op (:meth:`fill` does the same for a
        whole shard, coalescing copies)."""
        if recipe.op == "copy":
            spec = self.source(recipe.terms[0].role, recipe.source(recipe.terms[0]))
            self._flush_copy(writer, self.inputs[recipe.terms[0].role].input_file(spec.file),
                             [spec.offset, dst, spec.nbytes])
        else:
            self._compute(writer, recipe, dst)

    def _flush_copy(self, writer: _core.ShardWriter, src: _core.InputFile | None, run: list[int] | None) -> None:
        if run is None or src is None:
            return
        src_offset, dst_offset, nbytes = run
        block = self.clones.block_for(src.path)
        # the whole run first: the finisher takes a tensor inside it by its known digest, unread
        self.copied(dst_offset, nbytes, src.path, src_offset)
        for start, n in copy_pieces(src_offset, dst_offset, nbytes, block or CLONE_BLOCK):
            if self.clones.allowed:
                writer.copy_range(src, src_offset + start, dst_offset + start, n)
            else:
                self._plain = self._plain or bytearray(ops.PIECE_BYTES)
                plain_copy(writer, src, src_offset + start, dst_offset + start, n, self._plain)
            cloned = shared_bytes(src_offset + start, dst_offset + start, n, block if self.clones.allowed else None,
                                  src.size)
            self.made["cloned"] += cloned
            self.made["copied"] += n - cloned
            self.advance(dst_offset + start + n)
            self.progress(n)

    def _compute(self, writer: _core.ShardWriter, recipe: TensorRecipe, dst: int) -> None:
        # a term reads its input's tensor of the recipe's name; a LoRA factor its adapter's A and B
        wanted = [(t.role, recipe.source(t)) for t in recipe.terms]
        wanted += [(f.role, name) for f in recipe.factors for name in (f.a, f.b)]
        specs = [self.source(role, name) for role, name in wanted]
        inputs = [(self.inputs[role].input_file(s.file), s.offset) for (role, _), s in zip(wanted, specs)]
        if recipe.op not in OPS:
            raise ValueError(f"unknown op {recipe.op!r}")
        OPS[recipe.op](self.context, writer, recipe, specs, inputs, dst)
        self.made["computed"] += tensor_nbytes(recipe)


@dataclass
class Clones:
    """Whether copies may share the inputs' extents: ``block`` is the output filesystem's clone
    block size (None where it cannot clone), ``allowed`` false for ``--link copy``. A source on
    another filesystem is always copied."""

    block: int | None
    allowed: bool
    _devices: dict[str, bool] = field(default_factory=dict)
    out_device: int = -1

    @property
    def active(self) -> bool:
        """Whether copies from inputs on the output's filesystem become clones."""
        return self.block is not None and self.allowed

    def block_for(self, source: str) -> int | None:
        if self.block is None:
            return None
        if source not in self._devices:
            try:
                self._devices[source] = os.stat(source).st_dev == self.out_device
            except OSError:
                self._devices[source] = False
        return self.block if self._devices[source] else None

    @classmethod
    def probe(cls, directory: Path, link: str) -> Clones:
        return cls(clone_block(directory), link != "copy", out_device=os.stat(directory).st_dev)


def shared_bytes(src_offset: int, dst_offset: int, nbytes: int, block: int | None, src_size: int) -> int:
    """Of a kernel copy, the bytes a filesystem with clone blocks of ``block`` bytes clones: the
    whole blocks of a range that starts on a block boundary in both files, and its partial last
    block too when the range ends at the source's end (the kernel's rule for remapping)."""
    if block is None or src_offset % block or dst_offset % block:
        return 0
    return nbytes if src_offset + nbytes == src_size else nbytes - nbytes % block


def clone_estimate(directory: Path, shards: Sequence[OutputShard], inputs: Mapping[str, Checkpoint],
                   link: str = "auto") -> int:
    """Bytes of the output's shards that an output in ``directory`` would share with the inputs
    rather than store, where its filesystem clones (probed there once, with a scratch file): the
    reused input files that ``link`` auto reflinks, and the whole blocks of copied tensors from
    inputs on that filesystem. A lower bound: runs of adjacent copies clone a little more."""
    block = clone_block(directory)
    if block is None:
        return 0
    device, total = os.stat(directory).st_dev, 0
    sizes: dict[str, int | None] = {}  # each input file's size, None where it is on another filesystem

    def size_here(path: str) -> int | None:
        if path not in sizes:
            st = os.stat(path)
            sizes[path] = st.st_size if st.st_dev == device else None
        return sizes[path]

    for shard in shards:
        if isinstance(shard, ReusedShard) and link == "auto":  # counted in full by needed_bytes
            total += shard.file_size if size_here(str(shard.reuse.source)) is not None else 0
        for t in shard.tensors if isinstance(shard, ShardLayout) else ():
            if t.recipe.op != "copy":
                continue
            spec = inputs[t.recipe.terms[0].role].specs[t.recipe.source(t.recipe.terms[0])]
            src, dst, src_size = spec.offset, shard.data_start + t.begin, size_here(str(spec.file))
            if src_size is not None:  # the pieces a copy makes, as _flush_copy counts them
                total += sum(shared_bytes(src + start, dst + start, n, block, src_size)
                             for start, n in copy_pieces(src, dst, t.nbytes, block))
    return total


#: the block size by which filesystems that share extents (XFS, btrfs) clone ranges
CLONE_BLOCK = 4096


def copy_pieces(src_offset: int, dst_offset: int, nbytes: int, block: int = CLONE_BLOCK) -> Iterator[tuple[int, int]]:
    """(start, length) pieces of a copy, at most ``PIECE_BYTES`` each. When source and destination
    sit at the same offset within a block (the layout keeps copied tensors so), the first piece
    ends on a block boundary: every later piece then starts on one in both files, and
    ``copy_file_range`` on a filesystem that shares extents clones its whole blocks instead of
    copying them (the kernel tries a clone first and refuses one that starts mid-block)."""
    head = (-src_offset) % block if (src_offset - dst_offset) % block == 0 else 0
    start = 0
    if 0 < head < nbytes:
        yield 0, head
        start = head
    while start < nbytes:
        n = min(ops.PIECE_BYTES, nbytes - start)
        yield start, n
        start += n


@contextmanager
def _writing(tmp: Path, what: str, nbytes: int) -> Iterator[None]:
    """Turn OS errors while writing one file of the output into one clear line."""
    try:
        yield
    except OSError as e:  # the core's CoreError is an OSError too
        if e.errno == errno.ENOSPC:
            raise OutputError(f"the disk holding {tmp.parent} is full: writing {what} needed "
                              f"{nbytes / 1e9:.3f} GB") from None
        detail = e if isinstance(e, _core.CoreError) else f"{e.strerror}: {e.filename}"
        raise OutputError(f"merge failed while writing {what}: {detail}") from None


@dataclass
class _Finishing:
    """Background work shared by the shards of one merge: hashing and write-back."""

    outputs: ThreadPoolExecutor
    inputs: ThreadPoolExecutor
    stop: threading.Event
    throttle: bool
    checksum: str
    cache: DigestCache = field(default_factory=digest_cache)


def _write_shard(tmp: Path, shard: ShardLayout, filler: _ShardFiller, finishing: _Finishing) -> str:
    """Write one new shard; its checksum, computed right behind the writer."""
    path = tmp / shard.filename
    segments = layout_segments(shard.data_start, ((t.begin, t.nbytes) for t in shard.tensors))
    # where copies become clones, their blocks are the inputs': reserving them too would need
    # the whole shard's space at once
    with _core.ShardWriter(str(path), shard.file_size, reserve=not filler.clones.active) as writer:
        finisher = ShardFinisher(writer, path, finishing.outputs, finishing.stop, finishing.throttle,
                                 finishing.checksum, segments=segments, cache=finishing.cache)
        try:
            filler.copied = finisher.copied
            filler.fill(writer, shard, finisher.advance)
            digest = finisher.finish(shard.file_size)
        finally:
            finisher.close()
        writer.close(sync=False)  # durability is publishing's job, for every file at once
    if finisher.digests:
        finishing.cache.remember(path, finisher.digests)
    return digest


@contextmanager
def _finishing(throttle: bool, checksum: str) -> Iterator[_Finishing]:
    state = _Finishing(ThreadPoolExecutor(1, thread_name_prefix="layerswap-out"),
                       ThreadPoolExecutor(1, thread_name_prefix="layerswap-in"), threading.Event(), throttle, checksum)
    try:
        yield state
    except BaseException:
        state.stop.set()  # abandoned: let the background work stop at its next block
        raise
    finally:
        for pool in (state.outputs, state.inputs):
            pool.shutdown(wait=True, cancel_futures=True)


def execute(
    shards: Sequence[OutputShard],
    inputs: Mapping[str, Checkpoint],
    out: Path,
    *,
    backend: Backend,
    recipe: Mapping[str, Any],
    side_files: Sequence[SideFile] = (),
    config_overrides: Mapping[str, Any] | None = None,
    force: bool = False,
    link: str = "auto",
    threads: int = 0,
    sync: bool = False,
    checksum: str = DEFAULT_CHECKSUM,
    io: str = "auto",
    progress: Progress | None = None,
    card: str | None = None,
    index: bool = True,
    texts: Mapping[str, str] | None = None,
) -> MergeStats:
    """Write ``shards`` (with the index, the model ``card``, side files and recipe) to ``out``, atomically.

    The recipe written beside the weights records the size and ``checksum`` (blake3 or sha256) of
    every other file of the output; ``verify`` checks them. ``index``: whether to write
    ``model.safetensors.index.json`` (a PEFT adapter has none); ``texts``: more small files by
    name (an adapter's ``adapter_config.json``), recorded like the card. Every input file is checked at the
    end: one that changed while the merge read it (size, inode, modification or change time)
    fails the merge, nothing published.
    ``io``: how the kernels read the inputs (see :data:`~layerswap_fast.formats.checkpoint.IO_MODES`).
    ``sync`` makes the output durable (fsync) before it is published; without it, as with ``cp``,
    the kernel writes it back in its own time (a large output is still written back as it goes:
    see :mod:`layerswap_fast.writeback`).
    """
    start = time.perf_counter()
    for ckpt in inputs.values():
        ckpt.set_io(io)
    new = [s for s in shards if isinstance(s, ShardLayout)]
    total = sum(s.file_size for s in new)
    filler = _ShardFiller(inputs, backend, (lambda n: progress(n, total)) if progress else (lambda n: None),
                          threads)
    methods: dict[str, int] = {}
    with staging_directory(out) as tmp, _finishing(needs_throttle(needed_bytes(shards, link)), checksum) as finishing:
        filler.clones = Clones.probe(tmp, link)
        digests: dict[str, Future[str]] = {}
        for shard in shards:
            with _writing(tmp, shard.filename, shard.file_size):
                if isinstance(shard, ReusedShard):
                    how = _reuse(shard, tmp, out, link, inputs, finishing.throttle)
                    methods[how] = methods.get(how, 0) + 1
                    # the input's bytes, whose digest is cached: a clone or copy of it holds the same
                    # bytes unless the input changed during the run, which the check below refuses
                    digests[shard.filename] = finishing.inputs.submit(cached_hash, shard.reuse.source, checksum,
                                                                     finishing.stop, finishing.cache)
                else:
                    digests[shard.filename] = _done(_write_shard(tmp, shard, filler, finishing))
        digest = {name: future.result() for name, future in digests.items()}
        for ckpt in inputs.values():  # a changed input may have fed us mixed bytes: refuse the output
            ckpt.check_unchanged("merge")
        files = _write_side_files(tmp, shards, side_files, config_overrides or {}, checksum, card, index, texts)
        full_recipe = dict(recipe, checksum=checksum, shards=[
            {"file": s.filename, "size": s.file_size, **digest_entry(checksum, digest[s.filename])}
            for s in shards],
            reused_shards=[{"shard": s.filename, "from": str(s.reuse.source), "expert": s.reuse.role,
                            **digest_entry(checksum, digest[s.filename])}
                           for s in shards if isinstance(s, ReusedShard)],
            files=files, bytes=_bytes_made(filler, shards))
        text = json.dumps(full_recipe, indent=2) + "\n"
        with _writing(tmp, RECIPE_NAME, len(text)):
            (tmp / RECIPE_NAME).write_text(text, encoding="utf-8")
        publish(tmp, out, force, sync)
        for s in new:
            remember_hash(out / s.filename, checksum, digest[s.filename], finishing.cache)
        finishing.cache.save()
    copied_new = sum(t.recipe.op == "copy" for s in new for t in s.tensors)
    reused = [s for s in shards if isinstance(s, ReusedShard)]
    return MergeStats(out, total, time.perf_counter() - start, peak_rss_bytes(), len(shards),
                      copied_new + sum(len(s.names) for s in reused),
                      sum(len(s.tensors) for s in new) - copied_new,
                      bytes_reused=sum(s.file_size for s in reused), reused=methods,
                      made=full_recipe["bytes"], clones=filler.clones.active)


def _bytes_made(filler: _ShardFiller, shards: Sequence[OutputShard]) -> dict[str, int]:
    """The output's tensor bytes by how they were placed: computed, copied (new storage), cloned
    (blocks shared with an input), and in whole input shards reused (linked or cloned)."""
    reused = sum(s.data_size for s in shards if isinstance(s, ReusedShard))
    return {**filler.made, "reused": reused}


def _done(value: str) -> Future[str]:
    done: Future[str] = Future()
    done.set_result(value)
    return done


def _reuse(shard: ReusedShard, tmp: Path, out: Path, link: str, inputs: Mapping[str, Checkpoint],
           throttle: bool) -> str:
    """Reuse an input shard whole; linking it changes the file's change time, which the end-of-run
    check must not take for a change of its bytes, under any of its names (an earlier sweep
    candidate's shard may be a hard link of an input's)."""
    ckpt = inputs[shard.reuse.role]
    how = reuse_shard(shard, tmp / shard.filename, out, link, ckpt.input_file(shard.reuse.source), throttle)
    if how in ("hard link", "reflink"):
        st = os.stat(shard.reuse.source)
        for other in inputs.values():
            other.relinked_file(st.st_dev, st.st_ino)
    return how


def _write_side_files(tmp: Path, shards: Sequence[OutputShard], side_files: Sequence[SideFile],
                      config_overrides: Mapping[str, Any], checksum: str,
                      card: str | None = None, index: bool = True,
                      more: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """The index, the model card, ``more`` small files and the side files, each with its size and
    checksum for the recipe."""
    texts = {INDEX_NAME: json.dumps(index_json(shards), indent=2) + "\n"} if index else {}
    if card is not None:
        texts[CARD_NAME] = card
    texts.update(more or {})
    for name, text in texts.items():
        data = text.encode("utf-8")
        with _writing(tmp, name, len(data)):
            (tmp / name).write_bytes(data)
    with _writing(tmp, "the side files", sum(f.size for f in side_files)):
        copy_side_files(list(side_files), tmp, config_overrides)
    return [{"file": name, "size": (tmp / name).stat().st_size,
             **digest_entry(checksum, hash_file(tmp / name, checksum))}
            for name in [*texts, *(f.name for f in side_files)]]


