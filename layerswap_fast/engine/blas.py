"""numpy's BLAS on one thread while an op runs its own threads.

LoRA products are many small GEMMs (a block of rows × rank 16 × columns), each in cache, run by a
few worker threads of our own. OpenBLAS, numpy's usual BLAS, would split every one of them over
all cores again, and its idle threads spin between calls: measured on the 1b bench (2 cores),
GEMM time 8.7 s with its threads against 0.9 s on one thread per worker. OpenBLAS has no per-call
thread count, so :func:`single_threaded` sets its thread count to 1 (through the symbols it
exports, as threadpoolctl does) and restores it when the last op that asked leaves. Where numpy's
BLAS is not an OpenBLAS found that way, :func:`single_threaded` yields False and changes nothing:
the caller then runs its GEMMs on one thread of its own and lets the BLAS thread them.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_lock = threading.Lock()
_users = 0
_saved: int | None = None
_setter: Callable[[int], int] | None = None
_looked = False


def _openblas_setter() -> Callable[[int], int] | None:
    """``set(n) -> previous n`` for the OpenBLAS that numpy has loaded, or None."""
    import numpy  # noqa: F401  (loads its BLAS)

    try:
        paths = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                 if "openblas" in line.rsplit("/", 1)[-1].lower() and ".so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        local = getattr(lib, "openblas_set_num_threads_local", None)  # OpenBLAS >= 0.3.27: returns the old value
        if local is not None:
            local.restype, local.argtypes = ctypes.c_int, [ctypes.c_int]
            return local
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "64_"), ("openblas", "")):
            setter = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            getter = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            if setter is not None and getter is not None:
                setter.restype, setter.argtypes, getter.restype = None, [ctypes.c_int], ctypes.c_int

                def swap(n: int, setter=setter, getter=getter) -> int:
                    old = int(getter())
                    setter(n)
                    return old
                return swap
    return None


def _after_fork() -> None:
    """A child forked while an op held the setting starts with no users and its own lock."""
    global _lock, _users, _saved
    _lock, _users, _saved = threading.Lock(), 0, None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


@contextmanager
def single_threaded() -> Iterator[bool]:
    """numpy's BLAS on one thread inside the block (True), or untouched (False) where it cannot
    be controlled. Nested and concurrent uses share one setting; the last to leave restores it."""
    global _users, _saved, _setter, _looked
    with _lock:
        if not _looked:
            _setter, _looked = _openblas_setter(), True
        if _setter is not None:
            if _users == 0:
                _saved = _setter(1)
            _users += 1
    try:
        yield _setter is not None
    finally:
        with _lock:
            if _setter is not None:
                _users -= 1
                if _users == 0 and _saved is not None:
                    _setter(_saved)
                    _saved = None
