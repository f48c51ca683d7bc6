"""Execute a merge plan: stream every output shard into a temporary directory, then rename it.

The engine knows plans, checkpoints and files; nothing of the CLI. Copies are kernel-side byte
copies; blends stream fixed-size chunks through a backend (the C++ core on the CPU, Triton on a
GPU). Memory is O(chunk × inputs × threads), independent of the model's size.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import resource
import shutil
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from . import _core
from .checkpoint import Checkpoint, TensorSpec
from .dtypes import DTYPE_SIZES
from .errors import CheckpointError, LayerswapError, OutputError
from .layout import OutputShard, ReusedShard, ShardLayout, index_json
from .plan import TensorRecipe

#: files copied from the task expert beside the weights (config, tokenizer, generation settings)
AUX_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
             "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json")
RECIPE_NAME = "layerswap_recipe.json"
PARTIAL_MARK = ".layerswap-partial-"
_PROGRESS_STEP = 256 << 20  # long copies are split so a progress bar moves
LINK_MODES = ("auto", "reflink", "hard", "symlink", "copy")
_FICLONE = 0x40049409  # ioctl: share the extents of another file (copy-on-write clone)

Progress = Callable[[int, int], None]  # (bytes just written, total bytes)


class Blender(Protocol):
    def blend_file(self, inputs: Sequence[tuple[_core.InputFile, int]], input_dtypes: Sequence[str],
                   weights: Sequence[float], out: _core.ShardWriter, out_offset: int, out_dtype: str,
                   numel: int) -> None: ...

    def close(self) -> None: ...


@dataclass
class CpuBlender:
    """Blends through the C++ core: multi-threaded, GIL released, chunked."""

    threads: int = 0
    chunk_elems: int = 1 << 20

    def blend_file(self, inputs: Sequence[tuple[_core.InputFile, int]], input_dtypes: Sequence[str],
                   weights: Sequence[float], out: _core.ShardWriter, out_offset: int, out_dtype: str,
                   numel: int) -> None:
        _core.blend_file(inputs, input_dtypes, weights, out, out_offset, out_dtype, numel,
                         self.chunk_elems, self.threads)

    def close(self) -> None:
        pass


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

    @property
    def gb_per_s(self) -> float:
        return self.bytes_written / self.seconds / 1e9 if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        reused = ""
        if self.reused:
            how = ", ".join(f"{n} by {method}" for method, n in sorted(self.reused.items()))
            reused = f"; reused {sum(self.reused.values())} input shards ({format_bytes(self.bytes_reused)}: {how})"
        return (f"wrote {self.out}: {self.shards} shards, {format_bytes(self.bytes_written)} written in "
                f"{self.seconds:.2f} s ({self.gb_per_s:.2f} GB/s){reused}, {self.copied} tensors copied, "
                f"{self.blended} blended, peak RSS {self.peak_rss_bytes / 2**20:.0f} MB")


def format_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _is_within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def check_output(out: Path, input_dirs: Sequence[Path], force: bool, needed_bytes: int) -> None:
    """Refuse an output that exists (without force), overlaps an input, or cannot fit."""
    target = out.resolve()
    for d in input_dirs:
        src = d.resolve()
        if _is_within(target, src):
            raise OutputError(f"output {out} is inside the input {d}; choose another directory")
        if _is_within(src, target):
            raise OutputError(f"input {d} is inside the output {out}; choose another directory")
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputError(f"output {out} already exists; pass --force to replace it")
        if not out.is_dir():
            raise OutputError(f"output {out} exists and is not a directory")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if needed_bytes > free:
        raise OutputError(f"not enough space on the disk holding {parent}: the output needs "
                          f"{needed_bytes / 1e9:.2f} GB, {free / 1e9:.2f} GB are free")


@contextmanager
def staging_directory(out: Path) -> Iterator[Path]:
    """A temporary directory beside ``out``, removed unless the body renamed it away."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}{PARTIAL_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, out: Path, force: bool) -> None:
    """Make the finished staging directory the output in one rename (replacing an old one)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputError(f"output {out} appeared during the merge; pass --force to replace it")
        old = out.parent / f".{out.name}.layerswap-old-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


class _ShardFiller:
    """Writes one shard's tensors: coalesced byte copies and streamed blends."""

    def __init__(self, experts: Mapping[str, Checkpoint], blender: Blender, progress: Callable[[int], None]):
        self.experts = experts
        self.blender = blender
        self.progress = progress

    def source(self, expert: str, name: str) -> TensorSpec:
        return self.experts[expert].specs[name]

    def fill(self, writer: _core.ShardWriter, shard: ShardLayout) -> None:
        writer.write(0, shard.prefix())
        run: list[int] | None = None  # [src_offset, dst_offset, nbytes] of a pending copy
        run_file: Path | None = None
        for placed in shard.tensors:
            recipe, dst = placed.recipe, shard.data_start + placed.begin
            if recipe.op == "copy":
                spec = self.source(recipe.terms[0].expert, recipe.name)
                if run is not None and spec.file == run_file and run[0] + run[2] == spec.offset \
                        and run[1] + run[2] == dst:
                    run[2] += placed.nbytes
                    continue
                self._flush_copy(writer, run_file, run)
                run, run_file = [spec.offset, dst, placed.nbytes], spec.file
            else:
                self._flush_copy(writer, run_file, run)
                run = None
                self._blend(writer, recipe, dst)
        self._flush_copy(writer, run_file, run)

    def _flush_copy(self, writer: _core.ShardWriter, file: Path | None, run: list[int] | None) -> None:
        if run is None or file is None:
            return
        src = self._input_file(file)
        src_offset, dst_offset, nbytes = run
        for start in range(0, nbytes, _PROGRESS_STEP):
            n = min(_PROGRESS_STEP, nbytes - start)
            writer.copy_range(src, src_offset + start, dst_offset + start, n)
            self.progress(n)

    def _input_file(self, file: Path) -> _core.InputFile:
        for ckpt in self.experts.values():
            if any(s.path == file for s in ckpt.shards):
                return ckpt.input_file(file)
        raise KeyError(file)

    def _blend(self, writer: _core.ShardWriter, recipe: TensorRecipe, dst: int) -> None:
        specs = [self.source(t.expert, recipe.name) for t in recipe.terms]
        inputs = [(self.experts[t.expert].input_file(s.file), s.offset) for t, s in zip(recipe.terms, specs)]
        numel = specs[0].numel
        self.blender.blend_file(inputs, [s.dtype for s in specs], [t.weight for t in recipe.terms],
                                writer, dst, recipe.dtype, numel)
        self.progress(numel * DTYPE_SIZES[recipe.dtype])


def _reflink(src: Path, dest: Path) -> bool:
    """Clone ``src`` to a new ``dest`` sharing its extents; False where the filesystem can't."""
    with open(src, "rb") as source:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            fcntl.ioctl(fd, _FICLONE, source.fileno())
        except OSError:
            os.close(fd)
            os.unlink(dest)
            return False
        os.fsync(fd)
        os.close(fd)
    return True


def reuse_shard(shard: ReusedShard, dest: Path, final_dir: Path, mode: str, source: _core.InputFile) -> str:
    """Make ``dest`` the reused input file by ``mode``; returns the method that was used."""
    src = shard.reuse.source
    if mode in ("auto", "reflink") and _reflink(src, dest):
        return "reflink"
    if mode == "reflink":
        raise OutputError(f"cannot reflink {src}: its filesystem does not support copy-on-write clones "
                          f"(use --link auto, copy or hard)")
    if mode == "hard":
        try:
            os.link(src, dest, follow_symlinks=True)
        except OSError as e:
            raise OutputError(f"cannot hard-link {src} into {final_dir}: {e.strerror} "
                              f"(hard links need one filesystem; use --link copy)") from None
        return "hard link"
    if mode == "symlink":
        # relative where possible, as the Hugging Face cache does; the staging directory sits
        # beside the final one, so a link relative to the final directory resolves from both
        os.symlink(os.path.relpath(os.path.abspath(src), os.path.abspath(final_dir)), dest)
        return "symlink"
    with _core.ShardWriter(str(dest), shard.file_size) as writer:
        writer.copy_range(source, 0, 0, shard.file_size)
        writer.close(sync=True)
    return "copy"


def sha256_file(path: Path, block: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _check_inputs_unchanged(experts: Mapping[str, Checkpoint]) -> None:
    """An input replaced or truncated mid-merge may have fed us mixed bytes: refuse the output."""
    for ckpt in experts.values():
        for shard in ckpt.shards:
            try:
                ckpt.input_file(shard.path).check_unchanged()
            except _core.CoreError as e:
                raise CheckpointError(f"input changed during the merge: {e}") from None


def copy_aux_files(source_dir: Path, dest: Path, config_overrides: Mapping[str, Any]) -> None:
    for name in AUX_FILES:
        src = source_dir / name
        if not src.is_file():
            continue
        if name == "config.json" and config_overrides:
            config = json.loads(src.read_text(encoding="utf-8"))
            config.update(config_overrides)
            (dest / name).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(src, dest / name)


def execute(
    shards: Sequence[OutputShard],
    experts: Mapping[str, Checkpoint],
    out: Path,
    *,
    blender: Blender,
    recipe: Mapping[str, Any],
    aux_source: Path,
    config_overrides: Mapping[str, Any] | None = None,
    force: bool = False,
    link: str = "auto",
    progress: Progress | None = None,
) -> MergeStats:
    """Write ``shards`` (with the index, aux files and recipe) to ``out``, atomically."""
    if link not in LINK_MODES:
        raise OutputError(f"link mode must be one of {', '.join(LINK_MODES)}, got {link!r}")
    start = time.perf_counter()
    new = [s for s in shards if isinstance(s, ShardLayout)]
    reused = [s for s in shards if isinstance(s, ReusedShard)]
    total = sum(s.file_size for s in new)
    filler = _ShardFiller(experts, blender, (lambda n: progress(n, total)) if progress else (lambda n: None))
    methods: dict[str, int] = {}
    with staging_directory(out) as tmp, ThreadPoolExecutor(1) as hasher:
        # the recipe records every reused file's sha256; hashing overlaps with the writing
        digests: dict[str, Future[str]] = {s.filename: hasher.submit(sha256_file, s.reuse.source) for s in reused}
        for shard in shards:
            if isinstance(shard, ReusedShard):
                ckpt = experts[shard.reuse.expert]
                how = reuse_shard(shard, tmp / shard.filename, out, link, ckpt.input_file(shard.reuse.source))
                methods[how] = methods.get(how, 0) + 1
                continue
            with _core.ShardWriter(str(tmp / shard.filename), shard.file_size) as writer:
                try:
                    filler.fill(writer, shard)
                except _core.CoreError as e:
                    raise OutputError(f"merge failed while writing {shard.filename}: {e}") from None
                writer.close(sync=True)
        _check_inputs_unchanged(experts)
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index_json(shards), indent=2) + "\n")
        copy_aux_files(aux_source, tmp, config_overrides or {})
        full_recipe = dict(recipe, shards=[s.filename for s in shards], reused_shards=[
            {"shard": s.filename, "from": str(s.reuse.source), "expert": s.reuse.expert,
             "sha256": digests[s.filename].result()} for s in reused])
        (tmp / RECIPE_NAME).write_text(json.dumps(full_recipe, indent=2) + "\n")
        publish(tmp, out, force)
    copied = sum(t.recipe.op == "copy" for s in new for t in s.tensors) + sum(len(s.names) for s in reused)
    blended = sum(len(s.tensors) for s in new) - sum(t.recipe.op == "copy" for s in new for t in s.tensors)
    return MergeStats(out, total, time.perf_counter() - start, peak_rss_bytes(), len(shards), copied, blended,
                      bytes_reused=sum(s.file_size for s in reused), reused=methods)


__all__ = ["execute", "check_output", "CpuBlender", "MergeStats", "LayerswapError", "LINK_MODES"]
