"""What follows the writer: checksums of finished bytes, and bounded dirty pages.

A :class:`ShardFinisher` trails the writer of one output shard on a background thread. Each time
the writer reports that the file is complete up to some offset, the finisher reads the new bytes
back (mapped from the page cache, where they just went) into a running checksum, so the checksum
costs a second core rather than a second pass. For an output larger than the kernel's own
background-writeback threshold (:func:`needs_throttle`), it also starts writing each hashed range
back to the disk, waits for ranges more than ``max_dirty`` behind, and drops those clean pages
from the cache: such a merge keeps at most about ``max_dirty`` bytes dirty and does not push the
rest of the machine out of the page cache. Smaller outputs leave writeback to the kernel, as
``cp`` does.

The checksum is ``blake3-tensors`` by default (:mod:`.digest`: BLAKE3 per tensor, combined, so
copied tensors take their remembered digests), whole-file BLAKE3 or SHA-256 on request (SHA-256 is
several times slower: it alone takes twice as long as copying the bytes).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import blake3

from .. import _core
from .digest import (TENSORS, Combiner, DigestCache, Segment, file_digest, hash_range, new_segment_hasher,
                     update_from)

_BLOCK = 8 << 20
_DEFAULT_MAX_DIRTY = 256 << 20  # worst case ~3x this dirty: the window, the unhashed lag, a piece in flight
#: the checksums an output can record, the default first; ``none`` records sizes only, for the bare
#: copy speed (``verify`` then checks structure and sizes, and says that no checksum was recorded)
CHECKSUMS = (TENSORS, "blake3", "sha256", "none")
DEFAULT_CHECKSUM = CHECKSUMS[0]
NO_CHECKSUM = "none"


class _NoHash:
    """The hasher of ``none``: takes bytes, keeps nothing."""

    def update(self, data: Any) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


def new_hasher(algorithm: str) -> Any:
    """A running hash object (``update``/``hexdigest``) of a checksum algorithm."""
    if algorithm == "blake3":
        # BLAKE3 is a tree: large updates hash on every core, with the same digest
        return blake3.blake3(max_threads=blake3.blake3.AUTO)
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == NO_CHECKSUM:
        return _NoHash()
    raise ValueError(f"unknown checksum {algorithm!r}")


def digest_entry(algorithm: str, digest: str) -> dict[str, str]:
    """A file's checksum as a recipe entry records it: nothing under ``none``."""
    return {} if algorithm == NO_CHECKSUM else {algorithm: digest}


class Cancelled(Exception):
    """The merge is being abandoned; background work stops early."""


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 << 30


def _background_ratio() -> float:
    try:
        return int(Path("/proc/sys/vm/dirty_background_ratio").read_text()) / 100 or 0.1
    except (OSError, ValueError):
        return 0.1


def needs_throttle(output_bytes: int) -> bool:
    """Whether an output is too large to leave its dirty pages to the kernel."""
    return output_bytes > _background_ratio() * _ram_bytes()


class _DirtyWindow:
    """Keeps a file being written at most about ``max_dirty`` bytes ahead of the disk: each range
    written is sent to writeback at once, and pages more than ``max_dirty`` behind are waited for
    and dropped from the cache."""

    def __init__(self, max_dirty: int) -> None:
        self.max_dirty = max_dirty
        self.clean = 0  # bytes [0, clean) are on disk and out of the cache

    def written(self, writer: _core.ShardWriter, start: int, end: int) -> None:
        writer.writeback(start, end - start, False, False)
        behind = end - self.max_dirty
        if behind > self.clean:
            writer.writeback(self.clean, behind - self.clean, True, True)
            self.clean = behind

    def drain(self, writer: _core.ShardWriter, size: int) -> None:
        """The file is complete: wait for the rest and drop it from the cache."""
        if size > self.clean:
            writer.writeback(self.clean, size - self.clean, True, True)
            self.clean = size


class ShardFinisher:
    """Hashes (and, throttled, writes back) one output shard right behind its writer.

    Under ``blake3-tensors`` each of the shard's ``segments`` (its header, then each tensor) is
    hashed on its own; a segment the writer copied whole from a file whose digest of those bytes
    is in ``cache`` is not read at all, and one hashed from an input is remembered for the next
    merge. :attr:`digests` holds every segment's digest, for :meth:`DigestCache.remember`."""

    def __init__(self, writer: _core.ShardWriter, path: Path, pool: ThreadPoolExecutor, stop: threading.Event,
                 throttle: bool, checksum: str = DEFAULT_CHECKSUM, max_dirty: int = _DEFAULT_MAX_DIRTY,
                 segments: Sequence[Segment] = (), cache: DigestCache | None = None) -> None:
        self.writer, self.pool, self.stop = writer, pool, stop
        self.throttle, self.max_dirty = throttle, max_dirty
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.by_segment = checksum == TENSORS
        self.sha = new_segment_hasher() if self.by_segment else new_hasher(checksum)
        self.combined = Combiner()
        #: segments not yet hashed, in file order (one endless segment for a whole-file checksum)
        self.segments: deque[Segment] = deque(segments if self.by_segment else [(0, 1 << 62)])
        self.cache = cache
        self.digests: list[tuple[Segment, bytes]] = []
        self.hashed = 0    # bytes [0, hashed) are in the checksum
        self.dirty = _DirtyWindow(max_dirty)  # used when throttled
        self.pending: list[Future[None]] = []
        #: ranges of the file copied from inputs, in file order: (start, end, input path, its offset)
        self.copies: deque[tuple[int, int, str, int]] = deque()
        self._inputs: dict[str, tuple[int, str]] = {}  # path -> (fd, cache key)
        self._buffer: bytearray | None = None

    def copied(self, dst_offset: int, nbytes: int, source: str, src_offset: int) -> None:
        """Bytes [dst_offset, +nbytes) are a copy of ``source`` from ``src_offset``: they are hashed
        from the input, whose pages the cache holds, not from the output, whose cloned blocks it
        does not (the end-of-run check refuses an input that changed meanwhile, and one cut short
        is an error here)."""
        if nbytes:
            self.copies.append((dst_offset, dst_offset + nbytes, source, src_offset))

    def advance(self, upto: int) -> None:
        """The file is complete up to ``upto``: hash the new bytes in the background. Blocks the
        writer when it runs more than ``max_dirty`` ahead of the finisher."""
        self.pending.append(self.pool.submit(self._consume, upto))
        while len(self.pending) > 1 and upto - self.hashed > self.max_dirty:
            self.pending.pop(0).result()
        still = []
        for future in self.pending:  # one look at each: a failure in the background surfaces here
            if future.done():
                future.result()
            else:
                still.append(future)
        self.pending = still

    def _consume(self, upto: int) -> None:
        start = self.hashed
        if upto <= start:
            return
        if isinstance(self.sha, _NoHash):  # nothing to read back
            self.hashed = upto
        else:
            while self.hashed < upto:
                if self.stop.is_set():
                    raise Cancelled
                self._hash_segment(upto)
        if self.throttle:
            self.dirty.written(self.writer, start, upto)

    def _hash_segment(self, upto: int) -> None:
        """Hash on from ``hashed`` up to ``upto`` or the end of the current segment, whichever
        comes first; a copied segment whose digest is known is taken whole, unread."""
        seg_start, seg_end = self.segments[0]
        copy = self._copy_at(self.hashed)
        if (self.by_segment and self.hashed == seg_start and copy is not None
                and copy[0] <= seg_start and seg_end <= copy[1]):
            fd, key = self._input(copy[2])
            at = copy[3] + seg_start - copy[0]
            known = self.cache.get(key, (at, at + seg_end - seg_start)) if self.cache is not None else None
            if known is not None:
                self._end_segment(known)
                return
            digest = hash_range(fd, at, at + seg_end - seg_start, self.stop, Cancelled, copy[2])
            if self.cache is not None:
                self.cache.put(key, (at, at + seg_end - seg_start), digest)
            self._end_segment(digest)
            return
        stop = min(upto, seg_end)
        if copy is not None and copy[0] <= self.hashed:
            end = min(stop, copy[1], self.hashed + _BLOCK)
            self._buffer = self._buffer or bytearray(_BLOCK)
            at = copy[3] + self.hashed - copy[0]
            update_from(self.sha, self._input(copy[2])[0], at, at + end - self.hashed, self._buffer, self.stop,
                        Cancelled, copy[2])
            self.hashed = end
        else:
            self._hash_mapped(min(stop, copy[0] if copy is not None else stop, self.hashed + _BLOCK))
        if self.by_segment and self.hashed == seg_end:
            self._end_segment(self.sha.digest())

    def _end_segment(self, digest: bytes) -> None:
        segment = self.segments.popleft()
        self.combined.add(segment[1] - segment[0], digest)
        self.digests.append((segment, digest))
        self.hashed = segment[1]
        self.sha = new_segment_hasher()

    def _copy_at(self, offset: int) -> tuple[int, int, str, int] | None:
        """The first copied range that ends after ``offset`` (it may start later), or None."""
        while self.copies and self.copies[0][1] <= offset:
            self.copies.popleft()
        return self.copies[0] if self.copies else None

    def _input(self, path: str) -> tuple[int, str]:
        if path not in self._inputs:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self._inputs[path] = (fd, self.cache.key(path) if self.cache is not None else "")
        return self._inputs[path]

    def _hash_mapped(self, stop: int) -> None:
        """Hash [hashed, stop) of the output straight from the page cache through a read-only
        mapping: a pread would first copy every byte (a third of the checksum's cost). The
        mapping covers one block at most, so it adds at most a block to the RSS. The file is never
        shorter than the range: the writer reserved its full size before the first byte."""
        at = self.hashed
        base = at - at % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(self.fd, stop - base, prot=mmap.PROT_READ, offset=base)
        try:
            with memoryview(mapped) as view, view[at - base:] as fresh:
                self.sha.update(fresh)
        finally:
            mapped.close()
        self.hashed = stop

    def finish(self, size: int) -> str:
        """Wait for the rest; the file's checksum (hex)."""
        self.advance(size)
        for future in self.pending:
            future.result()
        if self.throttle:
            self.dirty.drain(self.writer, size)
        self.close()
        return self.combined.hexdigest() if self.by_segment else self.sha.hexdigest()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for fd, _ in self._inputs.values():
            os.close(fd)
        self._inputs.clear()


#: bytes a plain copy moves through memory at a time
_PLAIN_PIECE = 32 << 20


def plain_copy(writer: _core.ShardWriter, source: _core.InputFile, src_offset: int, dst_offset: int,
               nbytes: int, buffer: bytearray | None = None) -> None:
    """Copy bytes through memory (read, then write): new storage for every byte, where a kernel
    copy (``copy_range``) on a filesystem that shares extents would clone whole blocks instead.
    ``buffer``: one to reuse across calls (any size)."""
    buffer = buffer if buffer else bytearray(min(nbytes, _PLAIN_PIECE))
    for start in range(0, nbytes, len(buffer) or 1):
        view = memoryview(buffer)[:min(len(buffer), nbytes - start)]
        source.read_into(src_offset + start, view)
        writer.write(dst_offset + start, view)


def copy_whole_file(writer: _core.ShardWriter, source: _core.InputFile, size: int, throttle: bool,
                    max_dirty: int = _DEFAULT_MAX_DIRTY, piece: int = 256 << 20, clone: bool = True) -> None:
    """Kernel-side copy of a whole input file (``clone`` false: through memory, so that nothing is
    shared with it); throttled, written back and dropped as it goes."""
    dirty = _DirtyWindow(max_dirty)
    buffer = None if clone else bytearray(min(size, _PLAIN_PIECE))
    for start in range(0, size, piece):
        n = min(piece, size - start)
        if clone:
            writer.copy_range(source, start, start, n)
        else:
            plain_copy(writer, source, start, start, n, buffer)
        if throttle:
            dirty.written(writer, start, start + n)
    if throttle:
        dirty.drain(writer, size)


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "layerswap-fast" / "checksums"


def hash_file(path: Path, algorithm: str = DEFAULT_CHECKSUM, stop: threading.Event | None = None,
              cache: DigestCache | None = None) -> str:
    """Checksum of a file, read in blocks (the hashers release the GIL); ``stop`` aborts it early.
    ``cache`` (``blake3-tensors`` only): segments whose digests it holds are not read again."""
    if algorithm == TENSORS:
        return file_digest(path, cache, stop, Cancelled)
    h = new_hasher(algorithm)
    if isinstance(h, _NoHash):
        return ""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        update_from(h, fd, 0, size, bytearray(min(_BLOCK, max(1, size))), stop, Cancelled, str(path))
    finally:
        os.close(fd)
    return h.hexdigest()


def digest_cache() -> DigestCache:
    """The cache of remembered checksums: ``blake3-tensors`` segment digests, and whole-file ones
    (one segment) for the other algorithms."""
    return DigestCache(_cache_dir())


def cached_hash(path: Path, algorithm: str = DEFAULT_CHECKSUM, stop: threading.Event | None = None,
                cache: DigestCache | None = None) -> str:
    """Checksum of an input file, remembered per (algorithm, device, inode, size, mtime):
    unchanged inputs are hashed once across merges. Without ``cache``, one is made and saved."""
    if algorithm == NO_CHECKSUM:
        return ""
    own = cache is None
    cache = cache or digest_cache()
    if algorithm == TENSORS:
        digest = hash_file(path, algorithm, stop, cache)
    else:
        key, whole = cache.key(path, algorithm), (0, os.stat(path).st_size)
        known = cache.get(key, whole)
        digest = known.hex() if known is not None else hash_file(path, algorithm, stop)
        cache.put(key, whole, bytes.fromhex(digest))
    if own:
        cache.save()
    return digest


def remember_hash(path: Path, algorithm: str, digest: str, cache: DigestCache) -> None:
    """Record in ``cache`` the whole-file checksum of a file just written, as :func:`cached_hash`
    would after reading it: an output that later feeds another merge (or a sweep's next
    candidate) is not read again (``blake3-tensors`` remembers its segments as it writes them)."""
    if algorithm not in (NO_CHECKSUM, TENSORS) and len(digest) == 64:
        cache.put(cache.key(path, algorithm), (0, os.stat(path).st_size), bytes.fromhex(digest))
