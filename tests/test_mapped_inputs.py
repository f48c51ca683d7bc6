"""Mapped inputs (issue 20): the kernels read input shards straight from read-only mappings, and a
file truncated while a kernel thread reads its mapping is an error, never a SIGBUS that kills the
interpreter.

The faults are driven through the core's test hook (``_core._set_fault_hook``): after N chunks of
file kernels have been prepared, the thread preparing the next one truncates (or replaces) a file
before it reads that chunk, so every fault lands inside a kernel, on a worker thread, with the GIL
released. The references are computed here with numpy/torch from the bytes written, not by the core.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from layerswap_fast import _core as core
from support import make_adapter, make_llama_trio, one_line, row_mav_ref

CoreError = core.CoreError
N = 1 << 16          # elements per tensor of the core-level tests
CHUNK = 4096         # elements per chunk: 16 chunks per tensor


@pytest.fixture(autouse=True)
def _disarm_hook():
    yield
    core._clear_fault_hook()


def truncated_message(path: Path) -> str:
    return f"input changed during the merge: {path} was truncated while in use"


def f32_file(path: Path, arrays: list[np.ndarray]) -> list[int]:
    """The arrays as float32, back to back after a 64-byte prefix; their offsets."""
    offsets, pos = [], 64
    with open(path, "wb") as f:
        f.write(b"\x07" * 64)
        for a in arrays:
            offsets.append(pos)
            data = np.ascontiguousarray(a, dtype=np.float32).tobytes()
            f.write(data)
            pos += len(data)
    return offsets


@pytest.fixture
def three(tmp_path: Path) -> tuple[Path, list[np.ndarray], list[int]]:
    rng = np.random.default_rng(20)
    base = rng.standard_normal(N).astype(np.float32)
    arrays = [base, base + rng.standard_normal(N).astype(np.float32) * 0.01,
              base + rng.standard_normal(N).astype(np.float32) * 0.01]
    path = tmp_path / "in.bin"
    return path, arrays, f32_file(path, arrays)


def run_kernel(kind: str, f: core.InputFile, offsets: list[int], out: core.ShardWriter, threads: int,
               record_budget: int = 64 << 20):
    """One file kernel over the three float32 arrays of ``three``; its result (row MAVs) or None."""
    if kind == "blend":
        core.blend_file([(f, o) for o in offsets], ["F32"] * 3, [0.5, 0.25, 0.25], out, 0, "F32", N,
                        chunk_elems=CHUNK, threads=threads)
    elif kind == "row_mav":
        return core.row_mav_file([(f, o) for o in offsets[1:]], ["F32"] * 2, (f, offsets[0]), "F32", 64, N // 64,
                                 chunk_elems=CHUNK, threads=threads)
    elif kind == "row_mav_pieces":  # rows longer than a chunk: each streamed in pieces
        return core.row_mav_file([(f, o) for o in offsets[1:]], ["F32"] * 2, (f, offsets[0]), "F32", 4, N // 4,
                                 chunk_elems=CHUNK, threads=threads)
    elif kind in ("ties", "ties_exact"):  # the one pass over a sampled bracket, then the exact passes
        core.ties_file((f, offsets[0]), "F32", [(f, o) for o in offsets[1:]], ["F32"] * 2, out, 0, "F32", N, N // 5,
                       1.0, chunk_elems=CHUNK, threads=threads, record_budget=record_budget if kind == "ties" else 0)
    elif kind == "lowrank":
        rng = np.random.default_rng(3)
        b = rng.standard_normal((64, 4)).astype(np.float32)
        a = rng.standard_normal((4, N // 64)).astype(np.float32)
        core.blend_lowrank_file([(f, o) for o in offsets], ["F32"] * 3, [0.5, 0.25, 0.25], [(b, a)], [0.1], out, 0,
                                "F32", 64, N // 64, chunk_elems=CHUNK, threads=threads)
    else:
        raise AssertionError(kind)
    return None


KERNELS = ["blend", "row_mav", "row_mav_pieces", "ties", "ties_exact", "lowrank"]


# ---- the read path -----------------------------------------------------------------------------

def test_io_modes(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(b"\0" * 100)
    assert core.InputFile(str(path)).io == "mmap"  # a local filesystem
    f = core.InputFile(str(path), io="pread")
    assert f.io == "pread"
    f.set_io("mmap")
    assert f.io == "mmap"
    f.set_io("pread")
    assert f.io == "pread"
    f.close()
    with pytest.raises(CoreError, match="closed"):
        f.set_io("mmap")
    with pytest.raises(CoreError, match="io must be one of auto, mmap, pread"):
        core.InputFile(str(path), io="mapped")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert core.InputFile(str(empty), io="mmap").io == "pread"  # nothing to map


def test_blend_reads_the_same_bytes_either_way(three, tmp_path: Path) -> None:
    path, arrays, offsets = three
    want = (np.float32(0.5) * arrays[0] + np.float32(0.25) * arrays[1]) + np.float32(0.25) * arrays[2]
    for io in ("mmap", "pread"):
        for threads in (1, 2):
            out = tmp_path / f"o-{io}-{threads}"
            with core.InputFile(str(path), io=io) as f, core.ShardWriter(str(out), 4 * N) as w:
                run_kernel("blend", f, offsets, w, threads)
                w.close(sync=False)
            assert np.array_equal(np.fromfile(out, dtype=np.float32), want)


def test_row_mav_reads_the_same_bytes_either_way(three) -> None:
    path, arrays, offsets = three
    base = torch.from_numpy(arrays[0]).reshape(64, -1)
    want = np.stack([row_mav_ref(torch.from_numpy(a).reshape(64, -1), base).numpy() for a in arrays[1:]])
    for io in ("mmap", "pread"):
        with core.InputFile(str(path), io=io) as f:
            got = run_kernel("row_mav", f, offsets, None, 2)  # type: ignore[arg-type]
        np.testing.assert_allclose(got, want, rtol=1e-6)


# ---- a file truncated under a running kernel ------------------------------------------------------

@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind", KERNELS)
@pytest.mark.parametrize("io", ["mmap", "pread"])
def test_truncated_while_a_kernel_reads_it(three, tmp_path: Path, kind: str, threads: int, io: str) -> None:
    path, _, offsets = three
    for after, size in ((0, 0), (5, offsets[1] + 1000), (9, offsets[2])):
        f32_file(path, three[1])  # whole again
        with core.InputFile(str(path), io=io) as f, core.ShardWriter(str(tmp_path / "o"), 4 * N) as w:
            core._set_fault_hook(after, str(path), size)
            with pytest.raises(CoreError) as ei:
                run_kernel(kind, f, offsets, w, threads)
            w.abort()
        msg = one_line(ei.value)
        assert msg.startswith(truncated_message(path)), msg
        assert os.path.getsize(path) == size  # the hook did fire
    # the process is still healthy: the same file, whole again, merges
    f32_file(path, three[1])
    with core.InputFile(str(path), io=io) as f, core.ShardWriter(str(tmp_path / "o"), 4 * N) as w:
        run_kernel(kind, f, offsets, w, threads)
        w.abort()


def test_cut_inside_the_last_page_is_caught_after_the_kernel(three, tmp_path: Path) -> None:
    """Bytes past a cut inside the page that held the old end read as zeros, with no fault: the
    kernel checks the file's size once it has read everything."""
    path, arrays, offsets = three
    with core.InputFile(str(path), io="mmap") as f, core.ShardWriter(str(tmp_path / "o"), 4 * N) as w:
        os.truncate(path, os.path.getsize(path) - 8)
        for kind in ("blend", "row_mav", "ties", "lowrank"):
            with pytest.raises(CoreError, match=f"^{truncated_message(path)}"):
                run_kernel(kind, f, offsets, w, 2)
        w.abort()


def test_replaced_while_a_kernel_reads_it(three, tmp_path: Path) -> None:
    """A file renamed over the input leaves the mapping on the old one: the kernel reads the bytes
    it started with, and the file's own check says it was replaced."""
    path, arrays, offsets = three
    other = tmp_path / "other.bin"
    f32_file(other, [a * 0 + 7 for a in arrays])
    want = (np.float32(0.5) * arrays[0] + np.float32(0.25) * arrays[1]) + np.float32(0.25) * arrays[2]
    with core.InputFile(str(path), io="mmap") as f, core.ShardWriter(str(tmp_path / "o"), 4 * N) as w:
        core._set_fault_hook(5, str(path), replace_with=str(other))
        run_kernel("blend", f, offsets, w, 2)
        assert not other.exists()
        with pytest.raises(CoreError, match="was replaced while in use"):
            f.check_unchanged()
        w.close(sync=False)
    assert np.array_equal(np.fromfile(tmp_path / "o", dtype=np.float32), want)


def test_copy_from_a_truncated_input(three, tmp_path: Path) -> None:
    path, _, offsets = three
    for cfr in (True, False):
        core._set_copy_file_range_enabled(cfr)
        try:
            with core.InputFile(str(path)) as f, core.ShardWriter(str(tmp_path / "o"), 4 * N) as w:
                os.truncate(path, offsets[1])
                with pytest.raises(CoreError, match=f"^{truncated_message(path)}"):
                    w.copy_range(f, offsets[1], 0, 4 * N)
                w.abort()
        finally:
            core._set_copy_file_range_enabled(True)
        f32_file(path, three[1])


# ---- the handler among others ---------------------------------------------------------------------

CHILD = """
import faulthandler, mmap, os, sys
import numpy as np
from layerswap_fast import _core as core
path = sys.argv[1]
np.arange(1 << 16, dtype=np.float32).tofile(path)

def kernel():
    with core.InputFile(path, io="mmap") as f, core.ShardWriter(path + ".o", 1 << 18) as w:
        core._set_fault_hook(3, path, 0)
        try:
            core.blend_file([(f, 0)], ["F32"], [1.0], w, 0, "F32", 1 << 16, chunk_elems=4096, threads=2)
        except core.CoreError as e:
            print("CoreError:", e, flush=True)
        w.abort()
    np.arange(1 << 16, dtype=np.float32).tofile(path)

{body}
"""


def run_child(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(CHILD).format(body=textwrap.dedent(body))
    return subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.bin")], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)


def test_other_faults_still_kill_the_process(tmp_path: Path) -> None:
    """A SIGBUS outside our mappings (here through Python's own mmap) goes on to the handler that
    was there before ours: the default action, or faulthandler's report."""
    touch_other = """
        kernel()
        with open(path, "r+b") as g:
            m = mmap.mmap(g.fileno(), 0)
            os.truncate(path, 0)
            print("read", m[100_000], flush=True)
    """
    p = run_child(tmp_path, touch_other)
    assert p.returncode == -signal.SIGBUS, (p.returncode, p.stdout, p.stderr)
    assert p.stdout.startswith("CoreError: input changed during the merge")
    assert "read" not in p.stdout
    p = run_child(tmp_path, "faulthandler.enable()\n" + textwrap.dedent(touch_other))
    assert p.returncode == -signal.SIGBUS
    assert "Fatal Python error: Bus error" in p.stderr


def test_the_handler_comes_back_after_another_replaced_it(tmp_path: Path) -> None:
    p = run_child(tmp_path, """
        kernel()
        faulthandler.enable()   # installs its own SIGBUS handler over ours
        kernel()
        faulthandler.disable()  # puts back what it found: ours
        kernel()
        print("alive")
    """)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("CoreError: input changed during the merge") == 3
    assert p.stdout.endswith("alive\n")
