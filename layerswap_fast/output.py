"""The output directory: checks before writing, the staging directory, reuse of input files, publish.

An output is built in a staging directory beside it, named ``.OUT.layerswap-partial-PID-XXXX``,
and renamed into place once complete, so the output appears complete or not at all. A staging
directory left by a killed run is recognisable by that name; the next run for the same output
reports and removes it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import _core
from .errors import OutputError
from .layout import ReusedShard
from .writeback import copy_whole_file

PARTIAL_MARK = ".layerswap-partial-"
#: files copied from the task expert beside the weights (config, tokenizer, generation settings)
AUX_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
             "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json")
LINK_MODES = ("auto", "reflink", "hard", "symlink", "copy")
_FICLONE = 0x40049409  # ioctl: share the extents of another file (copy-on-write clone)


def _is_within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def _existing_parent(path: Path) -> Path:
    parent = path.resolve().parent
    while not parent.exists():
        parent = parent.parent
    return parent


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
    check_space(_existing_parent(out), needed_bytes)


def check_space(directory: Path, needed_bytes: int) -> None:
    free = shutil.disk_usage(directory).free
    if needed_bytes > free:
        raise OutputError(f"not enough space on the disk holding {directory}: the output needs "
                          f"{needed_bytes / 1e9:.2f} GB, {free / 1e9:.2f} GB are free")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_partials(out: Path) -> list[Path]:
    """Staging directories of earlier runs for ``out`` whose process is gone (killed runs)."""
    found = []
    for path in out.parent.glob(f".{out.name}{PARTIAL_MARK}*"):
        pid = path.name[len(f".{out.name}{PARTIAL_MARK}"):].split("-", 1)[0]
        if path.is_dir() and pid.isdigit() and not _pid_alive(int(pid)):
            found.append(path)
    return sorted(found)


def clean_stale_partials(out: Path, report: Callable[[str], None]) -> None:
    for path in stale_partials(out):
        report(f"removing {path}, left by an interrupted run")
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def staging_directory(out: Path) -> Iterator[Path]:
    """A temporary directory beside ``out``, removed unless the body renamed it away."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}{PARTIAL_MARK}{os.getpid()}-{os.urandom(4).hex()}"
    tmp.mkdir()
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, out: Path, force: bool) -> None:
    """Make the finished staging directory the output in one rename (replacing an old one)."""
    _fsync_dir(tmp)
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputError(f"output {out} appeared during the merge; pass --force to replace it")
        old = out.parent / f".{out.name}.layerswap-old-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
    _fsync_dir(out.parent)


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


def reuse_shard(shard: ReusedShard, dest: Path, final_dir: Path, mode: str, source: _core.InputFile,
                throttle: bool = False) -> str:
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
        copy_whole_file(writer, source, shard.file_size, throttle)
        writer.close(sync=False)
    return "copy"


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
