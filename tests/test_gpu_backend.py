"""The GPU streaming backend (layerswap_fast.engine.cuda.CudaBackend) against the C++ core and torch.

Without CUDA it runs with device="cpu" under TRITON_INTERPRET=1: the same chunking, offsets,
double buffering and kernels, on plain CPU tensors. Inputs are raw binary files (the backend
only needs ``(InputFile, absolute offset)`` pairs), with a prefix so offsets are not zero.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
core = pytest.importorskip("layerswap_fast._core", reason="C++ extension layerswap_fast._core not built yet")

from layerswap_fast.engine.cuda import CudaBackend, cuda_available  # noqa: E402
from support import TORCH, assert_same, blend_ref, row_mav_ref, write_at_offsets  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not set", allow_module_level=True)


def write_inputs(path, tensors, prefix=77):
    """``write_at_offsets`` with ``prefix`` junk bytes 0, 1, 2, ... and 0xAB gaps."""
    return write_at_offsets(path, tensors, prefix=bytes(range(prefix)), gap=b"\xAB" * 5)


def rand(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-40])
    t[:4] = specials[:n]
    return t.to(dtype)


def read_back(path, offset, n, dtype):
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(n * torch.empty(0, dtype=dtype).element_size())
    return torch.frombuffer(bytearray(data), dtype=dtype)


@pytest.fixture
def make_blender():
    made = []

    def make(**kw):
        b = CudaBackend(device=DEVICE, **kw)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


BLEND_CASES = [
    # input dtypes, out dtype, numel, max_gpu_bytes
    (["BF16", "BF16"], "BF16", 5000, 8 << 10),
    (["BF16", "F16", "F32"], "F16", 3001, 12 << 10),
    (["F32"], "BF16", 2049, 4 << 10),
    (["F16", "BF16"], "F32", 1, 4 << 10),
    (["BF16"] * 5 + ["F16"] * 6, "BF16", 1500, 32 << 10),  # > MAX_INPUTS: float32 scratch on device
    (["F32"] * 10, "F32", 999, 32 << 10),  # > MAX_INPUTS: out doubles as the accumulator
]


@pytest.mark.parametrize("in_dtypes,out_dtype,numel,budget", BLEND_CASES,
                         ids=[f"{'+'.join(c[0])}->{c[1]}-{c[2]}" for c in BLEND_CASES])
def test_blend_file_matches_core_and_torch(tmp_path, make_blender, in_dtypes, out_dtype, numel, budget):
    n = len(in_dtypes)
    xs = [rand(numel, TORCH[d], seed=i) for i, d in enumerate(in_dtypes)]
    weights = [(0.7, 0.3, -0.45, 0.1, 1.3, 0.05)[i % 6] for i in range(n)]
    # two input files; tensors interleaved between them
    offs_a = write_inputs(tmp_path / "a.bin", xs[0::2])
    offs_b = write_inputs(tmp_path / "b.bin", xs[1::2], prefix=13)
    fa, fb = core.InputFile(str(tmp_path / "a.bin")), core.InputFile(str(tmp_path / "b.bin"))
    inputs = []
    for i in range(n):
        inputs.append((fa, offs_a[i // 2]) if i % 2 == 0 else (fb, offs_b[i // 2]))
    out_size = TORCH[out_dtype].itemsize
    out_offset = 24
    total = out_offset + numel * out_size + 8

    blender = make_blender(max_gpu_bytes=budget)
    chunk = blender.blend_chunk_elems(in_dtypes, out_dtype)
    if numel > 1:
        assert numel // chunk >= 2 and numel % chunk != 0, (numel, chunk)  # several chunks, ragged last

    gpu_path, cpu_path = tmp_path / "gpu.out", tmp_path / "cpu.out"
    w = core.ShardWriter(str(gpu_path), total)
    blender.blend_file(inputs, in_dtypes, weights, w, out_offset, out_dtype, numel)
    w.close()
    w = core.ShardWriter(str(cpu_path), total)
    core.blend_file(inputs, in_dtypes, weights, w, out_offset, out_dtype, numel, 1000, 2)
    w.close()
    fa.close()
    fb.close()

    got = read_back(gpu_path, out_offset, numel, TORCH[out_dtype])
    cpu = read_back(cpu_path, out_offset, numel, TORCH[out_dtype])
    assert_same(got, cpu)
    assert_same(got, blend_ref(xs, weights, TORCH[out_dtype]))
    raw = gpu_path.read_bytes()
    assert raw[:out_offset] == b"\0" * out_offset and raw[out_offset + numel * out_size:] == b"\0" * 8


def test_blend_file_chunk_elems_cap(tmp_path, make_blender):
    numel = 1234
    xs = [rand(numel, torch.bfloat16, 1), rand(numel, torch.bfloat16, 2)]
    offs = write_inputs(tmp_path / "in.bin", xs)
    f = core.InputFile(str(tmp_path / "in.bin"))
    blender = make_blender(chunk_elems=100)
    assert blender.blend_chunk_elems(["BF16", "BF16"], "BF16") == 100
    w = core.ShardWriter(str(tmp_path / "out"), numel * 2)
    blender.blend_file([(f, offs[0]), (f, offs[1])], ["BF16", "BF16"], [0.5, 0.5], w, 0, "BF16", numel)
    w.close()
    f.close()
    assert_same(read_back(tmp_path / "out", 0, numel, torch.bfloat16), blend_ref(xs, [0.5, 0.5], torch.bfloat16))


def test_blend_file_errors_propagate_and_blender_stays_usable(tmp_path, make_blender):
    numel = 3000
    xs = [rand(numel, torch.float16, 1)]
    offs = write_inputs(tmp_path / "in.bin", xs)
    f = core.InputFile(str(tmp_path / "in.bin"))
    blender = make_blender(max_gpu_bytes=4 << 10)
    w = core.ShardWriter(str(tmp_path / "out"), numel * 2)
    with pytest.raises(core.CoreError):  # the tensor would run past the end of the file
        blender.blend_file([(f, offs[0] + 100)], ["F16"], [1.0], w, 0, "F16", numel)
    with pytest.raises(core.CoreError):  # the output would run past the end of the shard
        blender.blend_file([(f, offs[0])], ["F16"], [1.0], w, 2, "F16", numel)
    with pytest.raises(Exception, match="I8"):
        blender.blend_file([(f, offs[0])], ["I8"], [1.0], w, 0, "F16", numel)
    blender.blend_file([(f, offs[0])], ["F16"], [1.0], w, 0, "F16", numel)
    w.close()
    f.close()
    assert_same(read_back(tmp_path / "out", 0, numel, torch.float16), xs[0])


ROW_CASES = [
    # expert dtypes, base dtype, rows, cols, max_gpu_bytes
    (["BF16", "BF16"], "BF16", 37, 129, 8 << 10),  # several whole rows per chunk, ragged last
    (["BF16", "F16", "F32"], "F32", 5, 700, 16 << 10),
    (["F16"], "BF16", 3, 5000, 8 << 10),  # rows longer than a chunk: pieces of rows
    (["F32", "BF16"], "BF16", 1, 1, 4 << 10),
    (["BF16"] * 5, "BF16", 9, 300, 32 << 10),  # more experts than one launch
]


@pytest.mark.parametrize("e_dtypes,b_dtype,rows,cols,budget", ROW_CASES,
                         ids=[f"{'+'.join(c[0])}-vs-{c[1]}-{c[2]}x{c[3]}" for c in ROW_CASES])
def test_row_mav_file_matches_core_and_float64(tmp_path, make_blender, e_dtypes, b_dtype, rows, cols, budget):
    g = torch.Generator().manual_seed(rows * cols)
    base = torch.randn(rows, cols, generator=g).to(TORCH[b_dtype])
    experts = [(base.float() + 0.01 * (i + 1) * torch.randn(rows, cols, generator=g)).to(TORCH[d])
               for i, d in enumerate(e_dtypes)]
    offs = write_inputs(tmp_path / "in.bin", experts + [base])
    f = core.InputFile(str(tmp_path / "in.bin"))
    ex = [(f, o) for o in offs[:-1]]
    blender = make_blender(max_gpu_bytes=budget)
    if rows * cols > 1:
        assert blender.row_mav_chunk_elems(e_dtypes, b_dtype) < rows * cols  # several chunks

    got = blender.row_mav_file(ex, e_dtypes, (f, offs[-1]), b_dtype, rows, cols)
    want = core.row_mav_file(ex, e_dtypes, (f, offs[-1]), b_dtype, rows, cols, 1000, 2)
    f.close()
    assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.shape == (len(e_dtypes), rows)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    ref = np.stack([row_mav_ref(e, base).numpy() for e in experts])
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0)


def test_row_mav_file_special_values(tmp_path, make_blender):
    rows, cols = 4, 50
    base = torch.zeros(rows, cols, dtype=torch.bfloat16)
    e = torch.ones(rows, cols, dtype=torch.bfloat16)
    e[1, 3] = float("inf")
    e[2, 49] = float("nan")
    offs = write_inputs(tmp_path / "in.bin", [e, base])
    f = core.InputFile(str(tmp_path / "in.bin"))
    got = make_blender(max_gpu_bytes=4 << 10).row_mav_file([(f, offs[0])], ["BF16"], (f, offs[1]), "BF16", rows, cols)
    f.close()
    assert got[0, 0] == 1.0 and got[0, 3] == 1.0
    assert got[0, 1] == np.inf and np.isnan(got[0, 2])


def test_cuda_available():
    assert isinstance(cuda_available(), bool)
    if not torch.cuda.is_available():
        assert cuda_available() is False


def test_closed_blender_refuses_work(make_blender):
    b = make_blender()
    b.close()
    b.close()  # idempotent
    with pytest.raises(RuntimeError):
        b.blend_file([], [], [], None, 0, "BF16", 0)
