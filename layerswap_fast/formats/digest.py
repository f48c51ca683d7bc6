"""The default recorded checksum, ``blake3-tensors``: one BLAKE3 digest per tensor, combined.

A file is cut into segments: for a safetensors file whose tensors tile its data (every file this
package writes), the length prefix with the header, then each tensor's bytes in file order; any
other file is one segment. Its digest is BLAKE3 over, per segment, the segment's length (8 bytes,
little-endian) and the segment's own BLAKE3 digest (32 bytes).

A tensor's digest does not depend on where it sits. So a tensor a merge copies or clones from an
input, or a tensor a sweep's candidate takes from an earlier candidate, is hashed once: its digest
is remembered per file (algorithm, device, inode, size, mtime) and offset. ``verify`` still reads
and hashes every byte; whole-file BLAKE3 (``blake3``, what ``b3sum`` prints) stays a choice.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import blake3

from .. import _core
from .checkpoint import CheckpointError, parse_header

TENSORS = "blake3-tensors"
_BLOCK = 8 << 20
Segment = tuple[int, int]  # [start, end) in the file


class Combiner:
    """The file digest, fed one finished segment at a time in file order."""

    def __init__(self) -> None:
        self._outer = blake3.blake3()

    def add(self, length: int, digest: bytes) -> None:
        self._outer.update(length.to_bytes(8, "little") + digest)

    def hexdigest(self) -> str:
        return self._outer.hexdigest()


def new_segment_hasher() -> blake3.blake3:
    # BLAKE3 is a tree: a large tensor hashes on every core, with the same digest
    return blake3.blake3(max_threads=blake3.blake3.AUTO)


def layout_segments(data_start: int, tensors: Iterable[tuple[int, int]]) -> list[Segment]:
    """Segments of a safetensors file from its data start and its tensors' (offset in the data
    buffer, bytes), in file order; empty tensors hold no bytes and no segment."""
    return [(0, data_start), *((data_start + b, data_start + b + n) for b, n in tensors if n)]


def file_segments(path: Path, size: int) -> list[Segment]:
    """How ``path`` (``size`` bytes) is cut: its header and tensors when it is a safetensors file
    whose tensors tile its data, else one segment."""
    try:
        f = _core.InputFile(str(path))
        try:
            raw = f.read_header()
        finally:
            f.close()
        _, specs = parse_header(raw, size, path)
    except (_core.CoreError, CheckpointError, OSError, ValueError):
        return [(0, size)]
    start = 8 + len(raw)
    return layout_segments(start, ((s.offset - start, s.nbytes) for s in specs))


def update_from(h: Any, fd: int, start: int, end: int, buffer: bytearray, stop: threading.Event | None = None,
                cancelled: type[Exception] = RuntimeError, name: str = "a file") -> None:
    """Feed the file's bytes [start, end) to the hasher ``h``, read by pread through ``buffer``; a
    file shorter than that is a CoreError (it changed while it was read). A pread, not a mapping:
    a mapped file cut short would be a SIGBUS that kills the interpreter."""
    at = start
    while at < end:
        if stop is not None and stop.is_set():
            raise cancelled(f"hashing stopped at {at}")
        with memoryview(buffer)[:min(len(buffer), end - at)] as view:
            got = os.preadv(fd, [view], at)
            if got <= 0:
                raise _core.CoreError(f"input changed during the merge: {name} was truncated")
            h.update(view[:got])
            at += got


def hash_range(fd: int, start: int, end: int, stop: threading.Event | None = None,
               cancelled: type[Exception] = RuntimeError, name: str = "a file") -> bytes:
    """BLAKE3 of the file's bytes [start, end) (see :func:`update_from`)."""
    h = new_segment_hasher()
    update_from(h, fd, start, end, bytearray(min(_BLOCK, max(1, end - start))), stop, cancelled, name)
    return h.digest()


class DigestCache:
    """Segment digests of files by (algorithm, device, inode, size, mtime), kept under
    ``directory`` one JSON file per file (a whole-file checksum is the segment of the whole
    file), loaded when first asked and written back by :meth:`save`. A file changed since has
    another key, so its old digests are never used."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._files: dict[str, dict[str, str]] = {}
        self._dirty: set[str] = set()

    def key(self, path: str | os.PathLike[str], algorithm: str = TENSORS) -> str:
        st = os.stat(path)
        return f"{algorithm}-{st.st_dev}-{st.st_ino}-{st.st_size}-{st.st_mtime_ns}"

    def get(self, key: str, segment: Segment) -> bytes | None:
        with self._lock:
            found = self._load(key).get(f"{segment[0]}:{segment[1]}")
        return bytes.fromhex(found) if found else None

    def put(self, key: str, segment: Segment, digest: bytes) -> None:
        with self._lock:
            known, name, value = self._load(key), f"{segment[0]}:{segment[1]}", digest.hex()
            if known.get(name) != value:  # only what is new makes its file rewritten at save
                known[name] = value
                self._dirty.add(key)

    def remember(self, path: Path, digests: Sequence[tuple[Segment, bytes]]) -> None:
        """Record the segment digests of a file just written (its key as it is now, closed)."""
        key = self.key(path)
        for segment, digest in digests:
            self.put(key, segment, digest)

    def save(self) -> None:
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            for key in dirty:
                _write_json(self.directory / f"{key}.json", self._files[key])
        if dirty:
            prune(self.directory)

    def _load(self, key: str) -> dict[str, str]:
        if key not in self._files:
            try:
                found = json.loads((self.directory / f"{key}.json").read_text())
                self._files[key] = {k: v for k, v in found.items() if isinstance(v, str) and len(v) == 64}
            except (OSError, ValueError, AttributeError):
                self._files[key] = {}
        return self._files[key]


def file_digest(path: Path, cache: DigestCache | None = None, stop: threading.Event | None = None,
                cancelled: type[Exception] = RuntimeError) -> str:
    """The ``blake3-tensors`` digest of a file; with ``cache``, segments hashed before are not
    read again (``verify`` passes none: it reads every byte)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        key = cache.key(path) if cache is not None else ""
        combined = Combiner()
        for segment in file_segments(path, size):
            digest = cache.get(key, segment) if cache is not None else None
            if digest is None:
                digest = hash_range(fd, segment[0], segment[1], stop, cancelled, str(path))
                if cache is not None:
                    cache.put(key, segment, digest)
            combined.add(segment[1] - segment[0], digest)
        return combined.hexdigest()
    finally:
        os.close(fd)


#: entries the checksum cache keeps; beyond, the least recently written half goes
CACHE_ENTRIES = 4096


def prune(directory: Path, keep: int = CACHE_ENTRIES) -> None:
    """Keep the checksum cache bounded: its entries are keyed by files' identities, which say
    nothing of whether those files still exist, so the oldest go once there are more than
    ``keep`` (a digest dropped is computed again when needed)."""
    try:
        entries = list(os.scandir(directory))
        if len(entries) <= keep:
            return
        entries.sort(key=lambda e: e.stat().st_mtime_ns)
        for entry in entries[:len(entries) - keep // 2]:
            os.unlink(entry.path)
    except OSError:
        pass  # another process pruned it meanwhile, or a read-only home


def _write_json(path: Path, data: dict[str, str]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(data, separators=(",", ":")))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: no cache, same digests
