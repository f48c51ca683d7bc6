"""Side files: the config, tokenizer and generation files that go beside the merged weights.

They come from the task expert, and a checkpoint is untrusted input: ``tokenizer.model ->
/proc/self/environ`` must not copy the process environment into an output that gets shared.
So a side file is copied only when it resolves to a regular file of at most :data:`MAX_BYTES`
inside the checkpoint directory or, for a Hugging Face cache snapshot
(``models--org--name/snapshots/REV/``, whose files are links to ``../../blobs/SHA``), inside that
repository's ``blobs``. Anything else is refused, naming the file, before anything is written.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..plan.layers import CONFIG_SCHEMA
from ..safe_read import parse_json, show_path

NAMES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
         "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json")
MAX_BYTES = 64 << 20
_HUB_PREFIXES = ("models--", "datasets--", "spaces--")


@dataclass(frozen=True)
class SideFile:
    """One side file to copy: its name in the output and the regular file it resolves to."""

    name: str
    source: Path
    size: int
    identity: tuple[int, int, int, int]  # device, inode, mtime and ctime (ns) when it was checked


def _allowed_roots(directory: Path) -> list[Path]:
    root = Path(os.path.realpath(directory))
    roots = [root]
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith(_HUB_PREFIXES):
        roots.append(root.parent.parent / "blobs")
    return roots


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns


def find_side_files(directory: Path) -> list[SideFile]:
    """The side files of a checkpoint directory that may be copied; CheckpointError for one that
    may not (outside the checkpoint, not a regular file, too large, unreadable)."""
    roots = _allowed_roots(directory)
    found = []
    for name in NAMES:
        path = directory / name
        if not os.path.lexists(path):
            continue
        real = Path(os.path.realpath(path))
        if not any(real == r or r in real.parents for r in roots):
            raise CheckpointError(f"side file {path} resolves to {real}, outside the checkpoint directory; "
                                  f"refusing to copy it")
        try:
            st = os.stat(real)
        except OSError as e:
            raise CheckpointError(f"side file {path}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"side file {path} is not a regular file; refusing to copy it")
        if st.st_size > MAX_BYTES:
            raise CheckpointError(f"side file {path} has {st.st_size} bytes, more than the {MAX_BYTES >> 20} MB "
                                  f"a side file may have")
        found.append(SideFile(name, real, st.st_size, _identity(st)))
    return found


def read_side_file(f: SideFile) -> bytes:
    """The bytes of a side file, from the very file that was checked (CheckpointError if it was
    replaced or changed size since)."""
    try:
        fd = os.open(f.source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise CheckpointError(f"side file {f.source}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(handle.fileno())
        data = handle.read(f.size + 1)
    if _identity(st) != f.identity or len(data) != f.size:
        raise CheckpointError(f"input changed during the merge: side file {f.source} was modified")
    return data


def copy_side_files(files: list[SideFile], dest: Path, config_overrides: Mapping[str, Any]) -> None:
    """Write the side files into ``dest``; ``config.json`` gets ``config_overrides`` merged in."""
    for f in files:
        data = read_side_file(f)
        if f.name == "config.json" and config_overrides:
            config = parse_json(data, show_path(f.source), error=CheckpointError)
            CONFIG_SCHEMA.check(config, show_path(f.source), error=CheckpointError)
            data = (json.dumps({**config, **config_overrides}, indent=2) + "\n").encode()
        (dest / f.name).write_bytes(data)


def side_bytes(files: list[SideFile]) -> int:
    """An upper bound of the bytes the side files take in the output (config.json may grow by
    the overrides, which are a few bytes)."""
    return sum(f.size for f in files) + 4096
