"""The output directory: checks before writing, the staging directory, reuse of input files, publish.

An output is built in a staging directory beside it, named ``.OUT.layerswap-partial-PID-XXXX``,
and renamed into place once complete, so the output appears complete or not at all. A staging
directory left by a killed run is recognisable by that name; the next run for the same output
reports and removes it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import hashlib
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .. import _core
from ..errors import OutputError, param
from .layout import ReusedShard
from .writeback import copy_whole_file

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

PathLike = str | os.PathLike[str]

PARTIAL_MARK = ".layerswap-partial-"
OLD_MARK = ".layerswap-old-"  # an output being replaced, where the filesystem cannot exchange
LINK_MODES = ("auto", "reflink", "hard", "symlink", "copy")
_FICLONE = 0x40049409  # ioctl: share the extents of another file (copy-on-write clone)
_NAME_MAX = 255
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def output_location(out: str | os.PathLike[str]) -> Path:
    """The absolute path the OS will create for ``out``: its parent resolved (``link/../x`` and a
    symlinked parent mean what the OS makes of them), its last component as given."""
    path = Path(os.fspath(out))
    if path.name in ("", ".", ".."):
        return Path(os.path.realpath(path))
    return Path(os.path.realpath(path.parent)) / path.name


def _overlaps(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are one path or one lies inside the other (by their parts, as
    ``Path.parents`` compares them, without building every parent)."""
    n = min(len(a.parts), len(b.parts))
    return a.parts[:n] == b.parts[:n]


def check_output(out: Path, guarded: Mapping[Path, str], force: bool, needed_bytes: int,
                 cloned: Callable[[Path], int] | None = None) -> None:
    """Refuse an output that exists (without force), that is, contains or lies inside any path an
    input occupies (``guarded``: resolved path -> what it is), that cannot be created, or that
    cannot fit (see :func:`check_space`)."""
    for target in dict.fromkeys((out, Path(os.path.realpath(out)))):
        for path, what in guarded.items():
            if _overlaps(target, path):
                clash = (f"{what} is inside the output {out}" if target in path.parents else
                         f"output {out} is {'inside ' if path in target.parents else ''}{what}")
                raise OutputError(f"{clash}; choose another directory")
    if os.path.lexists(out):
        if not force:
            raise OutputError(f"output {out} already exists; pass {param('force')} to replace it")
        if not out.is_dir():
            raise OutputError(f"output {out} exists and is not a directory")
        real, cwd = Path(os.path.realpath(out)), Path.cwd()
        if real == cwd or real in cwd.parents:
            raise OutputError(f"output {out} is or contains the current directory; choose another directory")
    check_space(check_creatable(out), needed_bytes, cloned)


def nearest_existing(out: Path) -> Path:
    """The nearest ancestor of ``out`` that exists (where its filesystem is decided)."""
    ancestor = out.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    return ancestor


def check_creatable(out: Path) -> Path:
    """Check that ``out`` (and its staging directory) can be made: the nearest existing ancestor
    is a writable directory on a writable filesystem and every new name fits. Returns that
    ancestor."""
    ancestor = nearest_existing(out)
    new_names = [out.name, staging_prefix(out, PARTIAL_MARK) + "4194304-xxxxxxxx",
                 *out.parent.relative_to(ancestor).parts]
    try:
        st = os.stat(ancestor)
        if not stat.S_ISDIR(st.st_mode):
            raise OutputError(f"cannot create {out}: {ancestor} is not a directory")
        if os.statvfs(ancestor).f_flag & os.ST_RDONLY:
            raise OutputError(f"cannot create {out}: {ancestor} is on a read-only filesystem")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise OutputError(f"cannot create {out}: no permission to write in {ancestor}")
        name_max = os.pathconf(ancestor, "PC_NAME_MAX")
    except OSError as e:
        raise OutputError(f"cannot create {out}: {ancestor}: {e.strerror}") from None
    for name in new_names:
        if len(os.fsencode(name)) > name_max:
            raise OutputError(f"cannot create {out}: the name {name[:40]}... is longer than the "
                              f"{name_max} bytes its filesystem allows")
    return ancestor


def layout_block(out: Path) -> int:
    """The block size the layout aligns copied tensors to: that of the filesystem ``out`` will be
    on (``statvfs`` of its nearest existing directory; nothing is written, so a dry run lays out
    the same shards), where it is a power of two from 4 KiB to 64 KiB, else 4 KiB."""
    try:
        size = os.statvfs(nearest_existing(out)).f_bsize
    except OSError:
        return 4096
    return size if 4096 <= size <= 65536 and size & (size - 1) == 0 else 4096


def check_space(directory: Path, needed_bytes: int, cloned: Callable[[Path], int] | None = None) -> None:
    """Refuse an output of ``needed_bytes`` that the disk holding ``directory`` cannot take. Where
    it seems not to fit, ``cloned`` (given ``directory``) says how many of those bytes the
    filesystem would share with the inputs instead of storing them anew."""
    free = shutil.disk_usage(directory).free
    if needed_bytes > free and cloned is not None:
        needed_bytes -= cloned(directory)
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


def staging_prefix(out: Path, mark: str) -> str:
    """Name prefix of the directories a run makes beside ``out`` (``.NAME.layerswap-partial-``);
    a digest of NAME where NAME is too long for the prefix, a PID and a tag to fit NAME_MAX."""
    prefix = f".{out.name}{mark}"
    if len(os.fsencode(prefix)) + 24 > _NAME_MAX:
        prefix = f".{hashlib.sha256(os.fsencode(out.name)).hexdigest()[:32]}{mark}"
    return prefix


def stale_partials(out: Path) -> list[Path]:
    """Directories that runs for ``out`` left beside it and whose process is gone (killed runs):
    staging directories and outputs being replaced. Names are compared, never globbed."""
    try:
        names = os.listdir(out.parent)
    except OSError:
        return []
    found = []
    for prefix in (staging_prefix(out, PARTIAL_MARK), staging_prefix(out, OLD_MARK)):
        for name in names:
            pid = name[len(prefix):].split("-", 1)[0] if name.startswith(prefix) else ""
            if pid.isdigit() and not _pid_alive(int(pid)):
                found.append(out.parent / name)
    return sorted(found)


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def clean_stale_partials(out: Path, report: Callable[[str], None]) -> None:
    for path in stale_partials(out):
        report(f"removing {path}, left by an interrupted run")
        _remove(path)


@contextmanager
def staging_directory(out: Path) -> Iterator[Path]:
    """A temporary directory beside ``out``, removed unless the body renamed it away."""
    tmp = out.parent / f"{staging_prefix(out, PARTIAL_MARK)}{os.getpid()}-{os.urandom(4).hex()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise OutputError(f"cannot create {out}: {e.strerror}") from None
    try:
        yield tmp
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)


def fsync_path(path: Path) -> None:
    """fsync one file or directory (the one seam through which publishing makes data durable)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rename(src: Path, dst: Path, flags: int = 0) -> bool:
    """``renameat2``: with ``_RENAME_NOREPLACE`` fail if ``dst`` exists, with ``_RENAME_EXCHANGE``
    swap the two atomically. False where the kernel or filesystem cannot (the caller falls back)."""
    if not flags:
        os.rename(src, dst)
        return True
    fn = getattr(_libc(), "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def publish(tmp: Path, out: Path, force: bool, sync: bool = False) -> None:
    """Make the finished staging directory the output. ``sync``: every file's data is made durable
    first. A new output is one rename that never replaces a directory that appeared meanwhile;
    an old one (``force``) is exchanged with the new in one atomic step (``renameat2``
    RENAME_EXCHANGE) where the filesystem can, and otherwise renamed aside first, in which case a
    run killed between the two renames leaves no output and the old one under
    ``.OUT.layerswap-old-PID-*``, which the next run for ``out`` reports and removes."""
    if sync:
        for entry in sorted(tmp.iterdir()):
            fsync_path(entry)
    fsync_path(tmp)
    try:
        if os.path.lexists(out):
            if not force:
                raise FileExistsError(errno.EEXIST, "exists", str(out))
            _replace(tmp, out)
        elif not rename(tmp, out, _RENAME_NOREPLACE):
            rename(tmp, out)
    except FileExistsError:
        raise OutputError(f"output {out} appeared during the merge; pass {param('force')} to replace it") from None
    except OSError as e:
        raise OutputError(f"cannot publish {out}: {e.strerror}") from None
    fsync_path(out.parent)


def _replace(tmp: Path, out: Path) -> None:
    if rename(tmp, out, _RENAME_EXCHANGE):
        _remove(tmp)  # now the old output, under the staging name: a kill here leaves a stale partial
        return
    old = out.parent / f"{staging_prefix(out, OLD_MARK)}{os.getpid()}-{os.urandom(4).hex()}"
    rename(out, old)
    rename(tmp, out)
    _remove(old)


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
        os.close(fd)
    return True


def clone_block(directory: Path) -> int | None:
    """The block size by which files in ``directory`` can share extents (a scratch file there is
    cloned once to find out), or None where its filesystem cannot clone."""
    probe = directory / f".layerswap-clone-probe-{os.getpid()}"
    clone = probe.with_name(probe.name + "-clone")
    try:
        probe.write_bytes(b"\0" * 4096)
        shared = _reflink(probe, clone)
        return os.statvfs(directory).f_bsize if shared else None
    except OSError:
        return None
    finally:
        for path in (probe, clone):
            path.unlink(missing_ok=True)


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
        _relative_symlink(src, dest, final_dir)
        return "symlink"
    with _core.ShardWriter(str(dest), shard.file_size) as writer:
        # --link copy asks for storage of the output's own: no extents shared with the input
        copy_whole_file(writer, source, shard.file_size, throttle, clone=mode != "copy")
        writer.close(sync=False)
    return "copy"


def _relative_symlink(src: Path, dest: Path, final_dir: Path) -> None:
    """A link relative to the final directory, as the Hugging Face cache makes them, computed from
    resolved paths (a link computed from ``link/../x`` as written would dangle). The staging
    directory sits beside the final one in the same resolved parent, so it resolves from both."""
    target = os.path.realpath(src)
    link = os.path.relpath(target, os.path.realpath(final_dir.parent) + os.sep + final_dir.name)
    os.symlink(link, dest)
    if os.path.realpath(dest) != target or not os.path.isfile(dest):
        raise OutputError(f"cannot link {src} into {final_dir}: the link {link} does not resolve to it")


def guarded_paths(checkpoints: Iterable[Checkpoint], others: Iterable[PathLike | None]) -> dict[Path, str]:
    """Every resolved path the inputs occupy (checkpoints with their shard link targets, and any
    other file or directory read: a base, a statistics directory, a config), with what it is."""
    guarded: dict[Path, str] = {}
    for ckpt in checkpoints:
        for path, what in ckpt.occupied_paths().items():
            guarded.setdefault(path, what)
    for other in others:
        if other is not None:
            guarded.setdefault(Path(os.path.realpath(other)), f"the input {other}")
    return guarded
