"""Mapped inputs (issue 20): the kernels read input shards straight from read-only mappings, and a
file truncated while a kernel thread reads its mapping is an error, never a SIGBUS that kills the
interpreter.

The faults are driven through the core's test hook (``_core._set_fault_hook``): after N chunks of
file kernels have been prepared, the thread preparing the next one truncates (or replaces) a file
before it reads that chunk, so every fault lands inside a kernel, on a worker thread, with the GIL
released. The references are computed here with numpy/torch from the bytes written, not by the core.
"""

from __future__ import annotations

import json
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
from layerswap_fast.engine import mergekit_program
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
    elif kind == "mk_program":  # a mergekit method's steps: the deltas' histogram, then base + their sum
        p = mergekit_program.Program(None, ["F32"] * 3)
        base, a, b = (p.read(i) for i in range(3))
        p.hist_high(p.sub(a, base))
        p.store(p.add(base, p.add(p.sub(a, base), p.sub(b, base))))
        core.mk_program([(f, o) for o in offsets], ["F32"] * 3, N, p.code, p.consts, p.ints, [], out, 0, "F32",
                        chunk_elems=CHUNK, segment_elems=CHUNK, threads=threads)
    else:
        raise AssertionError(kind)
    return None


KERNELS = ["blend", "row_mav", "row_mav_pieces", "ties", "ties_exact", "lowrank", "mk_program"]


# ---- the read path -----------------------------------------------------------------------------

def test_io_modes(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(b"\0" * 100)
    assert core.InputFile(str(path)).io == "mmap"  # auto, on a local filesystem
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


@pytest.mark.parametrize("threads", [1, 2])
def test_a_histogram_cut_short_leaves_no_counts_for_the_next_call(three, threads: int) -> None:
    """The core keeps its histogram counters from one call to the next; a call that fails part way
    through a segment must not hand on the counts it had not yet added up."""
    path, arrays, offsets = three
    p = mergekit_program.Program(None, ["F32"] * 2)
    p.hist_high(p.sub(p.read(1), p.read(0)))
    bits = np.abs(arrays[1] - arrays[0]).view(np.uint32) >> 16
    want = np.bincount(bits, minlength=65536)

    def hist(f: core.InputFile) -> np.ndarray:
        return core.mk_program([(f, o) for o in offsets[:2]], ["F32"] * 2, N, p.code, p.consts, p.ints, [],
                               None, 0, "F32", chunk_elems=CHUNK, segment_elems=N // 2, threads=threads)[1][0]

    with core.InputFile(str(path), io="mmap") as f:
        core._set_fault_hook(5, str(path), offsets[1])
        with pytest.raises(CoreError):
            hist(f)
    f32_file(path, arrays)
    with core.InputFile(str(path), io="mmap") as f:
        np.testing.assert_array_equal(hist(f), want)
        np.testing.assert_array_equal(hist(f), want)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_norm_over_segments_cut_short_is_an_error(three, threads: int) -> None:
    """A norm over the whole tensor adds its segments in order, each worker waiting for the one
    before. Cut short by a truncated input, the call fails with the truncation (no worker is left
    waiting), and the next one, on the whole file, is torch's norm."""
    path, arrays, offsets = three
    p = mergekit_program.Program(None, ["F32"] * 2)
    p.norm(p.sub(p.read(1), p.read(0)))
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = torch.linalg.vector_norm(torch.from_numpy(arrays[1] - arrays[0])).item()
    finally:
        torch.set_num_threads(torch_threads)

    def norm(f: core.InputFile) -> float:
        return core.mk_program([(f, o) for o in offsets[:2]], ["F32"] * 2, N, p.code, p.consts, p.ints, [],
                               None, 0, "F32", chunk_elems=CHUNK, segment_elems=N // 8, threads=threads,
                               whole_sums=True)[0][0, 0]

    with core.InputFile(str(path), io="mmap") as f:
        core._set_fault_hook(5, str(path), offsets[1])
        with pytest.raises(CoreError) as ei:
            norm(f)
    assert one_line(ei.value).startswith(truncated_message(path))
    f32_file(path, arrays)
    with core.InputFile(str(path), io="mmap") as f:
        assert norm(f) == want


def mapped_kib(path: Path) -> int:
    """KiB of ``path`` resident in this process's mappings of it (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                inside = line.rstrip().endswith(" " + str(path))
            elif inside and head[0] == "Rss:":
                total += int(head[1])
    return total


@pytest.mark.parametrize("threads", [1, 2])
def test_a_pass_keeps_its_pages_mapped_for_the_pass_that_writes(tmp_path: Path, threads: int) -> None:
    """A pass without output asked to keep its inputs mapped leaves them mapped, and the pass
    that writes the tensor drops them; a pass not asked drops its own. A tensor over the core's
    bound (``KEEP_MAPPED_BYTES`` of input) is dropped as it goes either way. Keeping changes no result. The
    tensor spans more than a reader drops behind it at once (16 MiB)."""
    n = 6 << 20
    x = np.random.default_rng(7).standard_normal(n).astype(np.float32)
    path = tmp_path / "in.bin"
    offset = f32_file(path, [x])[0]
    summed = mergekit_program.Program(None, ["F32"])
    summed.sum(summed.read(0))
    copied = mergekit_program.Program(None, ["F32"])
    copied.store(copied.read(0))
    with core.InputFile(str(path), io="mmap") as f:
        def sums(keep: bool) -> np.ndarray:
            return core.mk_program([(f, offset)], ["F32"], n, summed.code, [], [], [], None, 0, "F32",
                                   chunk_elems=CHUNK, segment_elems=n // 4, threads=threads, keep_mapped=keep)[0]

        want = sums(False)
        assert mapped_kib(path) < 1024 and np.array_equal(sums(True), want)
        assert mapped_kib(path) >= 4 * n // 1024
        with core.ShardWriter(str(tmp_path / "out"), 4 * n) as w:
            core.mk_program([(f, offset)], ["F32"], n, copied.code, [], [], [], w, 0, "F32", chunk_elems=CHUNK,
                            segment_elems=CHUNK, threads=threads)
            with pytest.raises(CoreError, match="keep_mapped is for passes that a writing pass follows"):
                core.mk_program([(f, offset)], ["F32"], n, copied.code, [], [], [], w, 0, "F32", keep_mapped=True)
        assert mapped_kib(path) < 1024
    assert (tmp_path / "out").read_bytes() == x.tobytes()
    big = core.KEEP_MAPPED_BYTES // 4 + CHUNK
    with open(path, "r+b") as fh:
        fh.truncate(offset + 4 * big)  # zeros past the first tensor
    with core.InputFile(str(path), io="mmap") as f:
        got = core.mk_program([(f, offset)], ["F32"], big, summed.code, [], [], [], None, 0, "F32",
                              chunk_elems=1 << 16, segment_elems=n // 4, threads=threads, keep_mapped=True)[0]
        assert mapped_kib(path) < 64 * 1024 * threads
    assert np.array_equal(got[:4], want) and not got[4:].any()


def test_cut_inside_the_last_page_is_caught_after_the_kernel(three, tmp_path: Path) -> None:
    """Bytes past a cut inside the page that held the old end read as zeros, with no fault: the
    kernel checks the file's size once it has read everything."""
    path, arrays, offsets = three
    with core.InputFile(str(path), io="mmap") as f, core.ShardWriter(str(tmp_path / "o"), 4 * N) as w:
        os.truncate(path, os.path.getsize(path) - 8)
        for kind in ("blend", "row_mav", "ties", "lowrank", "mk_program"):
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


# ---- the commands ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mapped")
    paths = make_llama_trio(root, num_layers=12, shard="10MB", hidden=64)
    paths["adapter"] = make_adapter(paths["base"], root / "adapter", 1, r=4, lora_alpha=8,
                                    target_modules=["q_proj", "v_proj", "up_proj"])
    return paths


CLI = """
import sys
from layerswap_fast import _core
from layerswap_fast.cli import main
_core._set_fault_hook({after}, {victim!r}, {size}, {replace!r})
sys.argv = ["layerswap-fast", *{args!r}]
main()
"""


def cli_with_hook(args: list[str], victim: Path, after: int, size: int = 0,
                  replace: Path | None = None) -> subprocess.CompletedProcess[str]:
    code = CLI.format(after=after, victim=str(victim), size=size, replace=None if replace is None else str(replace),
                      args=[str(a) for a in args])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def copy_model(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    return dst


def commands(m: dict[str, Path], victim: Path, out: Path) -> dict[str, list]:
    return {
        "merge": ["merge", "--task-expert", m["task"], "--language-expert", victim, "-o", out, "--link", "copy",
                  "--io", "mmap"],
        "analyze": ["analyze", "--base", m["base"], "--expert", m["task"], "--expert", victim, "-o", out,
                    "--io", "mmap"],
        "ties": ["ties", "--base", m["base"], "--model", m["task"], "--model", victim, "-o", out, "--io", "mmap"],
        "lora": ["merge", "--task-expert", victim, "--language-expert", m["adapter"], "--base", m["base"], "-o", out,
                 "--link", "copy", "--io", "mmap"],
    }


@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("command", ["merge", "analyze", "ties", "lora"])
def test_cli_input_truncated_mid_kernel(models: dict[str, Path], tmp_path: Path, command: str, threads: str) -> None:
    victim = copy_model(models["language" if command != "lora" else "task"], tmp_path / "victim")
    (shard,) = victim.glob("*.safetensors")
    args = commands(models, victim, tmp_path / "out")[command] + ["--threads", threads]
    p = cli_with_hook(args, shard, after=3)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert truncated_message(shard) in lines[0], lines[0]
    assert lines[0].endswith("bytes when opened, 0 now)")  # met by a kernel reading the mapping
    assert os.path.getsize(shard) == 0
    assert sorted(x.name for x in tmp_path.iterdir()) == ["victim"]  # nothing written, nothing left


@pytest.mark.parametrize("threads", ["1", "2"])
def test_cli_mergekit_yaml_input_truncated_mid_kernel(models: dict[str, Path], tmp_path: Path, threads: str) -> None:
    victim = copy_model(models["language"], tmp_path / "victim")
    (shard,) = victim.glob("*.safetensors")
    config = tmp_path / "ties.yml"
    config.write_text(json.dumps({
        "models": [{"model": str(models["task"]), "parameters": {"weight": 0.5, "density": 0.5}},
                   {"model": str(victim), "parameters": {"weight": 0.5, "density": 0.3}}],
        "base_model": str(models["base"]), "merge_method": "ties", "dtype": "bfloat16"}))
    p = cli_with_hook(["mergekit-yaml", config, tmp_path / "out", "--io", "mmap", "--threads", threads], shard,
                      after=3)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert truncated_message(shard) in lines[0] and lines[0].endswith("bytes when opened, 0 now)"), lines[0]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ties.yml", "victim"]


def test_cli_input_replaced_mid_kernel(models: dict[str, Path], tmp_path: Path) -> None:
    victim = copy_model(models["language"], tmp_path / "victim")
    (shard,) = victim.glob("*.safetensors")
    replacement = tmp_path / "replacement"
    replacement.write_bytes(shard.read_bytes())  # the same bytes, another file
    p = cli_with_hook(commands(models, victim, tmp_path / "out")["merge"], shard, after=3, replace=replacement)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: input changed during the merge: "), p.stderr
    assert "replaced" in lines[0]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["victim"]


def test_api_input_truncated_mid_kernel(models: dict[str, Path], tmp_path: Path) -> None:
    import layerswap_fast as ls
    victim = copy_model(models["language"], tmp_path / "victim")
    (shard,) = victim.glob("*.safetensors")
    core._set_fault_hook(3, str(shard), 0)
    with pytest.raises(ls.LayerswapError, match=truncated_message(shard)):
        ls.merge(models["task"], victim, tmp_path / "out", link="copy")
    copy_model(models["language"], tmp_path / "victim2")
    (shard2,) = (tmp_path / "victim2").glob("*.safetensors")
    core._set_fault_hook(2, str(shard2), 0)
    with pytest.raises(ls.LayerswapError, match=truncated_message(shard2)):
        ls.analyze(models["base"], [models["task"], tmp_path / "victim2"])


@pytest.mark.parametrize("command", ["merge", "ties", "lora"])
def test_io_choice_changes_no_byte(models: dict[str, Path], tmp_path: Path, command: str) -> None:
    outs = []
    for io in ("mmap", "pread"):
        out = tmp_path / io
        args = commands(models, models["language"] if command != "lora" else models["task"], out)[command]
        p = cli_with_hook([*args, "--io", io], tmp_path / "nothing", after=1 << 62)
        assert p.returncode == 0, p.stderr
        outs.append(out)
        assert '"io"' not in (out / "layerswap_recipe.json").read_text()  # not recorded: it changes no byte
    for a in sorted(outs[0].iterdir()):
        assert a.read_bytes() == (outs[1] / a.name).read_bytes(), a.name


def test_analyze_io_choice(models: dict[str, Path], tmp_path: Path) -> None:
    import layerswap_fast as ls
    a, b = (ls.analyze(models["base"], [models["task"]], io=io, rows=True) for io in ("mmap", "pread"))
    names = [t.tensor for t in a.expert("task").tensors]
    assert names and all(np.array_equal(a.row_mavs("task", n), b.row_mavs("task", n)) for n in names)
    with pytest.raises(ls.ConfigError, match="io must be one of auto, mmap, pread"):
        ls.analyze(models["base"], [models["task"]], io="mapped")
