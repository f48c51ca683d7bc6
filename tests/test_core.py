"""Tests of the C++ core (layerswap_fast._core) against independent references (torch, numpy)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from layerswap_fast import _core as core
from support import (TORCH, assert_same, blend_ref, from_raw, one_line, raw, row_mav_ref, run_in_threads,
                     write_at_offsets, write_safetensors_raw)

CoreError = core.CoreError

SIZE = {"BF16": 2, "F16": 2, "F32": 4}
FLOAT_DTYPES = ["BF16", "F16", "F32"]


# ---- helpers -------------------------------------------------------------------------------------

SPECIAL_BITS = {
    # +-0, +-inf, NaN, smallest/largest subnormals, smallest normal, max, 1.0, ties
    "BF16": [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x0001, 0x8001, 0x007F, 0x0080,
             0x7F7F, 0xFF7F, 0x3F80, 0xBF80, 0x3F81],
    "F16": [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0xFE01, 0x7C01, 0x0001, 0x8001, 0x03FF,
            0x0400, 0x7BFF, 0xFBFF, 0x3C00, 0xBC00, 0x3C01],
}
SPECIAL_F32 = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-45, 1e-40,
               1.1754944e-38, 3.4028235e38, -3.4028235e38, 65504.0, 65519.0, 65520.0, -65520.0,
               70000.0, 5.960464477539063e-08, 2.9802322387695312e-08, 8.940696716308594e-08,
               1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, -(1.0 + 2.0 ** -8), 1.0 + 2.0 ** -11,
               1.0 + 3 * 2.0 ** -11, 2049.0, 2051.0, 1.0 + 2.0 ** -9, 1.0 - 2.0 ** -25]


def make_tensor(dtype: str, n: int, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Random normal values with the special values of the dtype mixed in."""
    t = (torch.randn(n, generator=gen) * scale).to(TORCH[dtype])
    if dtype == "F32":
        special = torch.tensor(SPECIAL_F32, dtype=torch.float32)
    else:
        special = torch.tensor(SPECIAL_BITS[dtype], dtype=torch.int32).to(torch.int16).view(TORCH[dtype])
    k = min(n // 4, len(special))
    if k:
        idx = torch.randperm(n, generator=gen)[:k]
        t[idx] = special[:k]
    return t


def core_blend(inputs, in_dtypes, weights, out_dtype, threads=0):
    n = inputs[0].numel()
    out = np.zeros(n * SIZE[out_dtype], np.uint8)
    core.blend_buffers([raw(x) for x in inputs], in_dtypes, weights, out, out_dtype, threads)
    return from_raw(out, out_dtype)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def cfr_off():
    core._set_copy_file_range_enabled(False)
    try:
        yield
    finally:
        core._set_copy_file_range_enabled(True)


def write_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ---- module basics -------------------------------------------------------------------------------

def test_module_surface():
    assert core.MAX_HEADER_BYTES == 100_000_000
    assert issubclass(CoreError, OSError)
    assert CoreError.__module__ == "layerswap_fast._core"
    for name in ["InputFile", "ShardWriter", "dtype_size", "blend_buffers", "blend_file",
                 "row_mav_buffers", "row_mav_file", "_set_copy_file_range_enabled", "_set_max_io_bytes"]:
        assert hasattr(core, name)


def test_dtype_size():
    expected = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
    for name, size in expected.items():
        assert core.dtype_size(name) == size
    for bad in ["bf16", "F128", "", "FLOAT"]:
        with pytest.raises(CoreError, match="unknown dtype") as ei:
            core.dtype_size(bad)
        assert ei.value.errno is None
        assert repr(bad)[1:-1] in one_line(ei.value)


# ---- blend numerics ------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 3, 4097, 1_000_003])
@pytest.mark.parametrize("in_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
def test_blend_buffers_matches_torch(n, in_dtype, out_dtype, gen):
    cases = [([0.7], 1), ([0.3, 0.7], 2), ([0.1, 0.7, 0.2], 3), ([-1.25, 2.0, 1e-3], 3)]
    if n == 1_000_003:  # keep the run short: the large size with two inputs only
        cases = cases[1:2]
    for weights, k in cases:
        inputs = [make_tensor(in_dtype, n, gen, scale=s) for s in (1.0, 3.0, 1e3)[:k]]
        got = core_blend(inputs, [in_dtype] * k, weights, out_dtype)
        assert_same(got, blend_ref(inputs, weights, TORCH[out_dtype]))


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n", [1, 4097, 100_003])
def test_blend_buffers_mixed_dtypes(out_dtype, n, gen):
    dts = ["BF16", "F16", "F32"]
    inputs = [make_tensor(d, n, gen, scale=10.0) for d in dts]
    for order in ([0, 1, 2], [2, 0, 1], [1, 2]):
        ins = [inputs[i] for i in order]
        ws = [0.25, 1 / 3, 0.4][: len(order)]
        got = core_blend(ins, [dts[i] for i in order], ws, out_dtype)
        assert_same(got, blend_ref(ins, ws, TORCH[out_dtype]))


def test_blend_order_and_no_fma():
    # Summation in input order starting from the first product: 1e8 + 1 - 1e8 = 0 in float32 when
    # added left to right, and 1 if reassociated.
    a = torch.tensor([1e8, 1.0], dtype=torch.float32)
    b = torch.tensor([1.0, 1e8], dtype=torch.float32)
    c = torch.tensor([-1e8, -1e8], dtype=torch.float32)
    got = core_blend([a, b, c], ["F32"] * 3, [1.0, 1.0, 1.0], "F32")
    assert got.tolist() == [0.0, 0.0]
    # w*x rounded to float32 before the add (an FMA would keep the low bits of the product)
    x = torch.tensor([1.0 + 2.0 ** -12], dtype=torch.float32)
    y = torch.tensor([-1.0], dtype=torch.float32)
    w = 1.0 + 2.0 ** -12
    got = core_blend([x, y], ["F32", "F32"], [w, 1.0], "F32")
    assert_same(got, blend_ref([x, y], [w, 1.0], torch.float32))
    assert got.item() == np.float32(np.float32(w) * np.float32(x.item())) - 1.0


def test_weights_rounded_to_float32_once():
    x = torch.tensor([3.0, 1.0, 1e30], dtype=torch.float32)
    w = 0.1  # not representable: float32(0.1) * 3 differs from float64 0.1 * 3 rounded
    got = core_blend([x], ["F32"], [w], "F32")
    assert got.tolist() == [float(np.float32(w) * np.float32(v)) for v in x.tolist()]
    # a weight beyond the float32 range becomes inf
    got = core_blend([x], ["F32"], [1e300], "F32")
    assert got.tolist() == [float("inf")] * 3


@pytest.mark.parametrize("in_dtype", ["BF16", "F16"])
def test_all_16bit_patterns_to_f32_exact(in_dtype):
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    t = bits.view(TORCH[in_dtype])
    got = core_blend([t], [in_dtype], [1.0], "F32")
    assert_same(got, t.float())


@pytest.mark.parametrize("out_dtype", ["BF16", "F16"])
def test_f32_rounding_random_bit_patterns(out_dtype):
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 2 ** 32, size=400_000, dtype=np.uint64).astype(np.uint32)
    if out_dtype == "F16":
        # concentrate on the f16 range (normal, subnormal, overflow): exponents 100..145
        exp = rng.integers(100, 146, size=bits.size).astype(np.uint32)
        bits = (bits & np.uint32(0x807FFFFF)) | (exp << np.uint32(23))
    x = torch.from_numpy(bits.view(np.float32).copy())
    x = torch.cat([x, torch.tensor(SPECIAL_F32, dtype=torch.float32)])
    got = core_blend([x], ["F32"], [1.0], out_dtype)
    assert_same(got, x.to(TORCH[out_dtype]))


def test_ties_round_to_even():
    ties = torch.tensor([1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11,
                         2049.0, 2051.0, 65520.0, 2.0 ** -25, 3 * 2.0 ** -25], dtype=torch.float32)
    bf = core_blend([ties], ["F32"], [1.0], "BF16")
    assert bf[:2].tolist() == [1.0, 1.015625]
    hf = core_blend([ties], ["F32"], [1.0], "F16")
    assert hf[2:].float().tolist() == [1.0, 1.0 + 2 * 2.0 ** -10, 2048.0, 2052.0, float("inf"), 0.0,
                                       2.0 ** -23]
    assert_same(bf, ties.to(torch.bfloat16))
    assert_same(hf, ties.to(torch.float16))


def test_nan_encodings():
    x = torch.tensor([float("nan"), -float("nan"), float("inf")], dtype=torch.float32)
    bf = core_blend([x, x], ["F32", "F32"], [1.0, -1.0], "BF16")
    assert [int(v) & 0xFFFF for v in bf.view(torch.int16).tolist()] == [0x7FC0] * 3
    hf = core_blend([x], ["F32"], [1.0], "F16")
    assert torch.isnan(hf[:2]).all() and hf[2].item() == float("inf")
    assert int(hf.view(torch.int16)[0]) & 0x7FFF == 0x7E00


@pytest.mark.parametrize("threads", [0, 2, 3, 7])
def test_blend_buffers_threads_identical(threads, gen):
    n = 300_001
    a, b = make_tensor("BF16", n, gen), make_tensor("F16", n, gen)
    ref = core_blend([a, b], ["BF16", "F16"], [0.6, 0.4], "BF16", threads=1)
    got = core_blend([a, b], ["BF16", "F16"], [0.6, 0.4], "BF16", threads=threads)
    assert torch.equal(got.view(torch.int16), ref.view(torch.int16))


def test_blend_buffers_accepts_buffer_kinds(gen):
    a = make_tensor("BF16", 100, gen)
    b = make_tensor("BF16", 100, gen)
    ref = blend_ref([a, b], [0.5, 0.5], torch.bfloat16)
    out = bytearray(200)
    core.blend_buffers([raw(a).tobytes(), memoryview(raw(b))], ["BF16", "BF16"], (0.5, 0.5), out, "BF16")
    assert_same(from_raw(np.frombuffer(out, np.uint8), "BF16"), ref)
    # in place: out aliases the first input
    a_np = raw(a).copy()
    core.blend_buffers([a_np, raw(b)], ["BF16", "BF16"], [0.5, 0.5], a_np, "BF16")
    assert_same(from_raw(a_np.view(np.uint8), "BF16"), ref)


def test_blend_buffers_errors(gen):
    a = raw(make_tensor("BF16", 10, gen))
    out = np.zeros(20, np.uint8)
    with pytest.raises(CoreError, match="at least one input"):
        core.blend_buffers([], [], [], out, "BF16")
    with pytest.raises(CoreError, match="weights has 1 entries but inputs has 2"):
        core.blend_buffers([a, a], ["BF16", "BF16"], [1.0], out, "BF16")
    with pytest.raises(CoreError, match="input_dtypes has 1 entries but inputs has 2"):
        core.blend_buffers([a, a], ["BF16"], [1.0, 1.0], out, "BF16")
    with pytest.raises(CoreError, match="unsupported dtype 'F64'"):
        core.blend_buffers([a], ["F64"], [1.0], out, "BF16")
    with pytest.raises(CoreError, match="unknown dtype 'bfloat16'"):
        core.blend_buffers([a], ["bfloat16"], [1.0], out, "BF16")
    with pytest.raises(CoreError, match="out_dtype: unsupported dtype 'I8'"):
        core.blend_buffers([a], ["BF16"], [1.0], out, "I8")
    with pytest.raises(CoreError, match=r"inputs\[1\] has 20 bytes but 10 elements of F32 need 40"):
        core.blend_buffers([a, a], ["BF16", "F32"], [1.0, 1.0], out, "BF16")
    with pytest.raises(CoreError, match="not a multiple of 4"):
        core.blend_buffers([a], ["BF16"], [1.0], np.zeros(6, np.uint8), "F32")
    with pytest.raises(CoreError, match="read-only"):
        core.blend_buffers([a], ["BF16"], [1.0], bytes(20), "BF16")
    ro = np.zeros(20, np.uint8)
    ro.flags.writeable = False
    with pytest.raises(CoreError, match="read-only"):
        core.blend_buffers([a], ["BF16"], [1.0], ro, "BF16")
    with pytest.raises(CoreError, match="C-contiguous"):
        core.blend_buffers([np.zeros(40, np.uint8)[::2]], ["BF16"], [1.0], out, "BF16")
    with pytest.raises(TypeError):
        core.blend_buffers([object()], ["BF16"], [1.0], out, "BF16")
    with pytest.raises(TypeError):
        core.blend_buffers([a], ["BF16"], ["x"], out, "BF16")
    with pytest.raises(CoreError) as ei:
        core.blend_buffers([a], ["BF16"], [1.0], out, "BF16", threads=2 ** 70)
    assert "threads" in one_line(ei.value)
    # zero-length buffers are fine
    core.blend_buffers([b""], ["BF16"], [1.0], bytearray(), "F32")
    assert out.tobytes() == bytes(20)  # nothing written by the failed calls


# ---- row MAV -------------------------------------------------------------------------------------

def torch_mav(experts: list[torch.Tensor], base: torch.Tensor, rows: int, cols: int) -> np.ndarray:
    """row_mav_ref of each flat expert against the flat base, both seen as rows x cols."""
    return np.stack([row_mav_ref(e.reshape(rows, cols), base.reshape(rows, cols)).numpy() for e in experts])


@pytest.mark.parametrize("shape", [(1, 1), (1, 4097), (3, 5), (7, 64), (130, 300), (2, 70_000)])
@pytest.mark.parametrize("dts", [("BF16", "BF16"), ("F16", "F16"), ("F32", "F32"), ("F32", "BF16"),
                                 ("BF16", "F16")])
def test_row_mav_buffers_matches_float64(shape, dts, gen):
    rows, cols = shape
    exp_dt, base_dt = dts
    n = rows * cols
    base = (torch.randn(n, generator=gen) * 0.02).to(TORCH[base_dt])
    experts = [(base.float() + torch.randn(n, generator=gen) * s).to(TORCH[exp_dt])
               for s in (0.001, 0.01, 0.5)]
    got = core.row_mav_buffers([raw(e) for e in experts], [exp_dt] * 3, raw(base), base_dt, rows, cols)
    assert got.dtype == np.float64 and got.shape == (3, rows)
    np.testing.assert_allclose(got, torch_mav(experts, base, rows, cols), rtol=1e-6, atol=0)


def test_row_mav_identical_rows_and_specials():
    base = torch.tensor([[1.0, 2.0], [0.0, float("inf")], [float("nan"), 0.0]], dtype=torch.float32)
    ex = base.clone()
    ex[0, 0] = 4.0
    got = core.row_mav_buffers([raw(ex), raw(base)], ["F32", "F32"], raw(base), "F32", 3, 2)
    assert got[0, 0] == 1.5
    assert np.isnan(got[0, 1]) and np.isnan(got[0, 2])  # inf - inf, nan
    assert got[1, 0] == 0.0


def test_row_mav_blocks_of_64_in_float32():
    # One row of 128: block sums in float32, then float64. The first block is 2**24 (exact) plus
    # 63 ones, which float32 absorbs one at a time; the second block is exactly 64.
    cols = 128
    e = torch.ones(cols, dtype=torch.float32)
    e[0] = 2.0 ** 24
    b = torch.zeros(cols, dtype=torch.float32)
    got = core.row_mav_buffers([raw(e)], ["F32"], raw(b), "F32", 1, cols)
    assert got[0, 0] == (2.0 ** 24 + 64.0) / cols


def _row_mav_in_order(e: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row MAVs summed as documented: |e - b| in float32, each 64-element block summed one element
    at a time in float32 (add.accumulate is sequential), the block sums added in order in float64."""
    out = np.empty(e.shape[0])
    for r in range(e.shape[0]):
        d = np.abs(e[r] - b[r])
        acc = 0.0
        for k in range(0, d.size, 64):
            acc += float(np.add.accumulate(d[k:k + 64], dtype=np.float32)[-1])
        out[r] = acc / d.size
    return out


@pytest.mark.parametrize("cols", [64 * 8, 64 * 37 + 13, 2048 * 2 + 100, 8192])
def test_row_mav_bits_follow_the_documented_order(cols, gen):
    # Values over many binades, so that any other order of the float32 additions (the vector
    # forms regroup blocks across lanes) would change the last bits somewhere.
    rows = 5
    scale = torch.exp2(torch.randint(-20, 20, (rows, cols), generator=gen).float())
    e = (torch.randn(rows, cols, generator=gen) * scale).to(torch.bfloat16)
    b = (torch.randn(rows, cols, generator=gen) * scale).to(torch.bfloat16)
    got = core.row_mav_buffers([raw(e)], ["BF16"], raw(b), "BF16", rows, cols)
    want = _row_mav_in_order(e.float().numpy(), b.float().numpy())
    assert np.array_equal(got[0], want)


@pytest.mark.parametrize("shape", [(1, 1), (1, 4097), (3, 5), (7, 64), (130, 300), (3, 5000)])
def test_row_mav_file_independent_of_chunks_and_threads(tmp_path, shape, gen):
    rows, cols = shape
    n = rows * cols
    base = torch.randn(n, generator=gen).to(torch.bfloat16)
    experts = [(base.float() + torch.randn(n, generator=gen) * s).to(TORCH[d])
               for s, d in ((0.01, "BF16"), (0.1, "F32"))]
    dts = ["BF16", "F32"]
    ref = core.row_mav_buffers([raw(e) for e in experts], dts, raw(base), "BF16", rows, cols)
    np.testing.assert_allclose(ref, torch_mav(experts, base, rows, cols), rtol=1e-6, atol=0)
    # base and experts in one file at odd offsets, like tensors in a shard
    path = tmp_path / "in.bin"
    offsets = write_at_offsets(path, [base, *experts], prefix=b"x" * 13, gap=b"yy")
    with core.InputFile(str(path)) as f:
        for chunk in (1, 63, 64, 100, 301, 4096, 1 << 20):
            for threads in (1, 2, 3):
                got = core.row_mav_file([(f, offsets[1]), (f, offsets[2])], dts, (f, offsets[0]), "BF16",
                                        rows, cols, chunk_elems=chunk, threads=threads)
                assert got.shape == (2, rows)
                assert np.array_equal(got, ref, equal_nan=True), (chunk, threads)


def test_row_mav_errors(tmp_path, gen):
    b = raw(torch.randn(15, generator=gen).to(torch.bfloat16))
    with pytest.raises(CoreError, match="rows and cols must be >= 1"):
        core.row_mav_buffers([b], ["BF16"], b, "BF16", 0, 15)
    with pytest.raises(CoreError, match="cols must be >= 0"):
        core.row_mav_buffers([b], ["BF16"], b, "BF16", 1, -15)
    with pytest.raises(CoreError, match=r"experts\[0\] has 30 bytes but 3 x 4 elements of BF16 need 24"):
        core.row_mav_buffers([b], ["BF16"], raw(torch.zeros(12, dtype=torch.bfloat16)), "BF16", 3, 4)
    with pytest.raises(CoreError, match="base has 30 bytes but 2305843009213693952 x 2 elements"):
        core.row_mav_buffers([b], ["BF16"], b, "BF16", 2 ** 61, 2)
    with pytest.raises(CoreError, match="base has 30 bytes but 2305843009213693952 x 4 elements of BF16 need more"):
        core.row_mav_buffers([b], ["BF16"], b, "BF16", 2 ** 61, 4)
    with pytest.raises(CoreError, match="overflows"):
        core.row_mav_buffers([b], ["BF16"], b, "BF16", 2 ** 40, 2 ** 40)
    with pytest.raises(CoreError, match="expert_dtypes has 2 entries but experts has 1"):
        core.row_mav_buffers([b], ["BF16", "BF16"], b, "BF16", 3, 5)
    with pytest.raises(CoreError, match="base_dtype: unsupported dtype 'U8'"):
        core.row_mav_buffers([b], ["BF16"], b, "U8", 3, 5)
    empty = core.row_mav_buffers([], [], b, "BF16", 3, 5)
    assert empty.shape == (0, 3)

    path = write_file(tmp_path / "t.bin", b.tobytes())
    with core.InputFile(str(path)) as f:
        with pytest.raises(CoreError, match=r"experts\[0\]: 15 elements of F32 \(60 bytes\) at offset 0 run past"):
            core.row_mav_file([(f, 0)], ["F32"], (f, 0), "BF16", 3, 5)
        with pytest.raises(CoreError, match="base: 15 elements of BF16 .* at offset 2 run past the end"):
            core.row_mav_file([(f, 0)], ["BF16"], (f, 2), "BF16", 3, 5)
        with pytest.raises(CoreError, match="chunk_elems must be >= 1"):
            core.row_mav_file([(f, 0)], ["BF16"], (f, 0), "BF16", 3, 5, chunk_elems=0)
        with pytest.raises(CoreError, match="offset must be >= 0"):
            core.row_mav_file([(f, -1)], ["BF16"], (f, 0), "BF16", 3, 5)
        with pytest.raises(TypeError):
            core.row_mav_file([(b, 0)], ["BF16"], (f, 0), "BF16", 3, 5)
    with pytest.raises(CoreError, match="is closed"):
        core.row_mav_file([(f, 0)], ["BF16"], (f, 0), "BF16", 3, 5)


# ---- blend_file ----------------------------------------------------------------------------------

def _blend_file_setup(tmp_path, gen, n, dts):
    inputs = [make_tensor(d, n, gen, scale=2.0) for d in dts]
    path = tmp_path / "in.bin"
    return inputs, write_at_offsets(path, inputs), path


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
def test_blend_file_equals_blend_buffers(tmp_path, gen, out_dtype):
    dts = ["BF16", "F16", "F32"]
    weights = [0.2, 0.5, 0.3]
    n = 50_003
    inputs, offsets, path = _blend_file_setup(tmp_path, gen, n, dts)
    ref = core_blend(inputs, dts, weights, out_dtype)
    assert_same(ref, blend_ref(inputs, weights, TORCH[out_dtype]))
    osz = SIZE[out_dtype]
    out_offset = 11
    with core.InputFile(str(path)) as f:
        for i, (chunk, threads) in enumerate([(1, 2), (7, 1), (7, 3), (4096, 2), (10_000, 3),
                                              (1 << 20, 1), (1 << 20, 0), (50_003, 2)]):
            m = n if chunk > 1 else 3000  # chunk=1 is one pread per element: keep it small
            dst = tmp_path / f"out{i}.bin"
            w = core.ShardWriter(str(dst), out_offset + n * osz + 3)
            core.blend_file([(f, off) for off in offsets], dts, weights, w, out_offset, out_dtype, m,
                            chunk_elems=chunk, threads=threads)
            w.close()
            got = dst.read_bytes()
            assert got[:out_offset] == bytes(out_offset)
            assert got[out_offset:out_offset + m * osz] == raw(ref).tobytes()[:m * osz], (chunk, threads)
            assert got[out_offset + m * osz:] == bytes(n * osz + 3 - m * osz)


def test_blend_file_errors(tmp_path, gen):
    inputs, offsets, path = _blend_file_setup(tmp_path, gen, 100, ["BF16"])
    f = core.InputFile(str(path))
    w = core.ShardWriter(str(tmp_path / "o.bin"), 200)
    with pytest.raises(CoreError, match=r"inputs\[0\]: 103 elements of BF16 \(206 bytes\) at offset 7 run past the end"):
        core.blend_file([(f, offsets[0])], ["BF16"], [1.0], w, 0, "BF16", 103)
    with pytest.raises(CoreError, match=r"outside the file \(200 bytes\)"):
        core.blend_file([(f, offsets[0])], ["BF16"], [1.0], w, 2, "BF16", 100)
    with pytest.raises(CoreError, match="overflow"):
        core.blend_file([(f, offsets[0])], ["BF16"], [1.0], w, 0, "BF16", 2 ** 63 + 5)
    with pytest.raises(CoreError, match="numel is out of range"):
        core.blend_file([(f, offsets[0])], ["BF16"], [1.0], w, 0, "BF16", 2 ** 64)
    with pytest.raises(CoreError, match="out_offset must be >= 0"):
        core.blend_file([(f, offsets[0])], ["BF16"], [1.0], w, -2, "BF16", 10)
    with pytest.raises(CoreError, match="chunk_elems must be >= 1"):
        core.blend_file([(f, offsets[0])], ["BF16"], [1.0], w, 0, "BF16", 10, chunk_elems=0)
    with pytest.raises(CoreError, match="at least one input"):
        core.blend_file([], [], [], w, 0, "BF16", 10)
    with pytest.raises(CoreError, match="weights has 2 entries"):
        core.blend_file([(f, offsets[0])], ["BF16"], [1.0, 2.0], w, 0, "BF16", 10)
    with pytest.raises(TypeError):
        core.blend_file([f], ["BF16"], [1.0], w, 0, "BF16", 10)
    core.blend_file([(f, offsets[0])], ["BF16"], [1.0], w, 0, "BF16", 0)  # numel 0: nothing to do
    f.close()
    with pytest.raises(CoreError, match="is closed"):
        core.blend_file([(f, offsets[0])], ["BF16"], [1.0], w, 0, "BF16", 10)
    w.close()
    f = core.InputFile(str(path))
    with pytest.raises(CoreError, match="o.bin is closed"):
        core.blend_file([(f, offsets[0])], ["BF16"], [1.0], w, 0, "BF16", 10)
    f.close()


def test_blend_file_truncated_input(tmp_path, gen):
    n = 200_000
    inputs, offsets, path = _blend_file_setup(tmp_path, gen, n, ["BF16", "BF16"])
    f = core.InputFile(str(path))
    os.truncate(path, offsets[1] + 1000)
    w = core.ShardWriter(str(tmp_path / "o.bin"), 2 * n)
    for threads in (1, 3):
        with pytest.raises(CoreError, match="was truncated while in use") as ei:
            core.blend_file([(f, off) for off in offsets], ["BF16", "BF16"], [0.5, 0.5], w, 0, "BF16", n,
                            chunk_elems=4096, threads=threads)
        assert str(path) in one_line(ei.value)
    w.abort()
    f.close()


# ---- InputFile -----------------------------------------------------------------------------------

def _safetensors_file(tmp_path) -> Path:
    from safetensors.numpy import save_file
    path = tmp_path / "model.safetensors"
    save_file({"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.int8)}, str(path),
              metadata={"format": "pt"})
    return path


def test_input_file_header_and_reads(tmp_path):
    path = _safetensors_file(tmp_path)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    with core.InputFile(path) as f:  # os.PathLike accepted
        assert f.path == str(path)
        assert f.size == len(data)
        header = f.read_header()
        assert header == data[8:8 + n]
        meta = json.loads(header)
        start, end = meta["a"]["data_offsets"]
        a = np.frombuffer(f.read(8 + n + start, end - start), np.float32)
        assert a.tolist() == list(range(12))
        assert f.read(0, 0) == b"" and f.read(len(data), 0) == b""
        assert f.read(len(data) - 3, 3) == data[-3:]
        buf = bytearray(10)
        f.read_into(5, buf)
        assert bytes(buf) == data[5:15]
        arr = np.zeros(4, np.float32)
        f.read_into(8 + n + start, arr)
        assert arr.tolist() == [0.0, 1.0, 2.0, 3.0]
        f.read_into(3, bytearray())
        f.check_unchanged()


@pytest.mark.parametrize("length,match", [
    (0, "header length is 0"),
    (10_000, "header length 10000 runs past the end of the file"),
    (100_000_001, "header length 100000001 exceeds the limit of 100000000 bytes"),
    (2 ** 64 - 1, "header length 18446744073709551615 exceeds the limit"),
])
def test_read_header_errors(tmp_path, length, match):
    path = write_safetensors_raw(tmp_path / "bad.safetensors", b"{}", b" " * 100, length=length)
    with core.InputFile(str(path)) as f:
        with pytest.raises(CoreError, match=match) as ei:
            f.read_header()
        assert str(path) in one_line(ei.value)


def test_read_header_short_file(tmp_path):
    path = write_file(tmp_path / "short", b"\x02\x00\x00")
    with core.InputFile(str(path)) as f, pytest.raises(CoreError, match="too short"):
        f.read_header()
    # a header exactly filling the file is fine
    path = write_safetensors_raw(tmp_path / "exact", b"{}")
    with core.InputFile(str(path)) as f:
        assert f.read_header() == b"{}"


def test_input_file_open_errors(tmp_path):
    with pytest.raises(CoreError, match="No such file or directory: opening") as ei:
        core.InputFile(str(tmp_path / "missing"))
    assert ei.value.errno == errno.ENOENT
    assert str(tmp_path / "missing") in one_line(ei.value)
    assert str(ei.value).startswith(f"[Errno {errno.ENOENT}]")
    with pytest.raises(CoreError, match="not a regular file"):
        core.InputFile(str(tmp_path))


def test_input_file_out_of_range(tmp_path):
    path = write_file(tmp_path / "f", bytes(range(100)))
    f = core.InputFile(str(path))
    for off, n in [(101, 0), (100, 1), (50, 51), (0, 101), (2 ** 63, 1), (2 ** 64 - 1, 2),
                   (1, 2 ** 64 - 1)]:
        with pytest.raises(CoreError, match="is outside the file") as ei:
            f.read(off, n)
        assert "f: range" in one_line(ei.value)
        assert ei.value.errno is None
    with pytest.raises(CoreError, match="offset must be >= 0"):
        f.read(-1, 1)
    with pytest.raises(CoreError, match="nbytes must be >= 0"):
        f.read(0, -1)
    with pytest.raises(CoreError, match="offset is out of range"):
        f.read(2 ** 64, 1)
    with pytest.raises(CoreError, match="is outside the file"):
        f.read_into(95, bytearray(6))
    with pytest.raises(CoreError, match="read-only"):
        f.read_into(0, b"abc")
    with pytest.raises(CoreError, match="read-only"):
        f.read_into(0, memoryview(bytearray(3)).toreadonly())
    with pytest.raises(TypeError):
        f.read("0", 1)
    assert f.read(np.int64(3), np.uint8(2)) == bytes([3, 4])
    f.close()
    f.close()  # idempotent
    with pytest.raises(CoreError, match="is closed"):
        f.read(0, 1)
    with pytest.raises(CoreError, match="is closed"):
        f.check_unchanged()


def test_input_file_truncated_while_in_use(tmp_path):
    path = write_file(tmp_path / "big", os.urandom(1 << 20))
    f = core.InputFile(str(path))
    os.truncate(path, 1000)
    assert f.size == 1 << 20
    assert len(f.read(0, 1000)) == 1000
    with pytest.raises(CoreError, match="was truncated while in use") as ei:
        f.read(0, 1 << 20)
    assert str(path) in one_line(ei.value)
    with pytest.raises(CoreError, match="truncated"):
        f.read_into(500_000, bytearray(10))
    with pytest.raises(CoreError, match="truncated while in use: it now has 1000 bytes"):
        f.check_unchanged()
    f.close()


def test_check_unchanged_detects_replace(tmp_path):
    path = write_file(tmp_path / "a", b"a" * 100)
    other = write_file(tmp_path / "b", b"b" * 200)
    with core.InputFile(str(path)) as f:
        f.check_unchanged()
        os.replace(other, path)
        with pytest.raises(CoreError, match="was replaced while in use") as ei:
            f.check_unchanged()
        assert str(path) in one_line(ei.value)
        assert f.read(0, 3) == b"aaa"  # still reads the file it opened
        os.unlink(path)
        with pytest.raises(CoreError, match="removed or replaced") as ei:
            f.check_unchanged()
        assert ei.value.errno == errno.ENOENT


# ---- ShardWriter ---------------------------------------------------------------------------------

def test_shard_writer_write_close(tmp_path):
    dst = tmp_path / "out.tmp"
    w = core.ShardWriter(str(dst), 16)
    assert w.path == str(dst) and w.size == 16
    assert dst.stat().st_size == 16
    assert dst.stat().st_mode & 0o777 == 0o644 & ~_umask()
    w.write(0, b"abcd")
    w.write(12, np.frombuffer(b"wxyz", np.uint8))
    w.write(16, b"")
    with pytest.raises(CoreError, match=r"range \[15, 15 \+ 2\) is outside the file \(16 bytes\)"):
        w.write(15, b"ab")
    with pytest.raises(CoreError, match="offset must be >= 0"):
        w.write(-1, b"a")
    with pytest.raises(CoreError, match="outside the file"):
        w.write(2 ** 64 - 1, b"a")
    w.close()
    w.close(sync=False)  # idempotent
    with pytest.raises(CoreError, match="is closed"):
        w.write(0, b"a")
    assert w.path == str(dst)
    assert dst.read_bytes() == b"abcd" + bytes(8) + b"wxyz"


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_shard_writer_exclusive(tmp_path):
    dst = write_file(tmp_path / "exists", b"keep")
    with pytest.raises(CoreError, match="File exists: creating") as ei:
        core.ShardWriter(str(dst), 10)
    assert ei.value.errno == errno.EEXIST
    assert str(dst) in one_line(ei.value)
    assert dst.read_bytes() == b"keep"
    with pytest.raises(CoreError, match="No such file or directory"):
        core.ShardWriter(str(tmp_path / "no" / "dir"), 10)
    with pytest.raises(CoreError, match="size must be >= 0"):
        core.ShardWriter(str(tmp_path / "neg"), -1)
    assert not (tmp_path / "neg").exists()


def test_shard_writer_no_space(tmp_path):
    # Too large to reserve: ENOSPC (or EFBIG where the file system caps the size); the file is
    # removed again.
    for d in (Path("/dev/shm"), tmp_path):
        if not d.is_dir() or not os.access(d, os.W_OK):
            continue
        dst = d / f"lsf-test-nospace-{os.getpid()}"
        with pytest.raises(CoreError) as ei:
            core.ShardWriter(str(dst), 2 ** 62)
        assert ei.value.errno in (errno.ENOSPC, errno.EFBIG)
        assert f"reserving {2 ** 62} bytes for {dst}" in one_line(ei.value)
        assert not dst.exists()


def test_shard_writer_abort_and_context_manager(tmp_path):
    dst = tmp_path / "a"
    w = core.ShardWriter(str(dst), 10)
    w.write(0, b"x")
    w.abort()
    assert not dst.exists()
    w.abort()  # idempotent
    w.close()  # no-op after abort
    with pytest.raises(CoreError, match="is closed"):
        w.write(0, b"z")

    with pytest.raises(ValueError):
        with core.ShardWriter(str(dst), 10) as w:
            w.write(0, b"y")
            raise ValueError("boom")
    assert not dst.exists()

    with core.ShardWriter(str(dst), 3) as w:
        w.write(0, b"abc")
    assert dst.exists()  # no exception: nothing aborted, close stays explicit
    w.close()
    assert dst.read_bytes() == b"abc"

    # abort does not remove a file that replaced ours at the path
    w = core.ShardWriter(str(tmp_path / "c"), 3)
    write_file(tmp_path / "d", b"other")
    os.replace(tmp_path / "d", tmp_path / "c")
    w.abort()
    assert (tmp_path / "c").read_bytes() == b"other"


@pytest.mark.parametrize("use_cfr", [True, False])
def test_copy_range(tmp_path, use_cfr):
    data = os.urandom(3 * (1 << 20) + 17)  # more than one 8 MiB fallback buffer is not needed
    src_path = write_file(tmp_path / "src", data)
    core._set_copy_file_range_enabled(use_cfr)
    try:
        with core.InputFile(str(src_path)) as src:
            dst = tmp_path / "dst"
            w = core.ShardWriter(str(dst), len(data) + 100)
            w.copy_range(src, 0, 100, len(data))
            w.copy_range(src, 5, 0, 50)
            w.copy_range(src, 0, 0, 0)
            with pytest.raises(CoreError, match="copying from .*src: range"):
                w.copy_range(src, len(data) - 10, 0, 11)
            with pytest.raises(CoreError, match="copying to .*dst: range"):
                w.copy_range(src, 0, 101, len(data))
            with pytest.raises(CoreError, match="src_offset must be >= 0"):
                w.copy_range(src, -5, 0, 1)
            with pytest.raises(CoreError, match="copying from"):
                w.copy_range(src, 2 ** 64 - 1, 0, 1)
            w.close()
            got = dst.read_bytes()
            assert got[:50] == data[5:55] and got[50:100] == bytes(50) and got[100:] == data
    finally:
        core._set_copy_file_range_enabled(True)


@pytest.mark.parametrize("use_cfr", [True, False])
def test_copy_range_truncated_source(tmp_path, use_cfr):
    data = os.urandom(1 << 20)
    src_path = write_file(tmp_path / "src", data)
    core._set_copy_file_range_enabled(use_cfr)
    try:
        src = core.InputFile(str(src_path))
        os.truncate(src_path, 1000)
        w = core.ShardWriter(str(tmp_path / "dst"), len(data))
        with pytest.raises(CoreError, match="src was truncated while in use") as ei:
            w.copy_range(src, 0, 0, len(data))
        one_line(ei.value)
        w.abort()
        src.close()
        with pytest.raises(CoreError, match="is closed"):
            core.ShardWriter(str(tmp_path / "dst2"), 10).copy_range(src, 0, 0, 1)
    finally:
        core._set_copy_file_range_enabled(True)


def test_copy_range_fallback_hook(tmp_path, cfr_off):
    data = os.urandom(9 << 20)  # more than one fallback buffer
    src_path = write_file(tmp_path / "src", data)
    with core.InputFile(str(src_path)) as src:
        w = core.ShardWriter(str(tmp_path / "dst"), len(data))
        w.copy_range(src, 0, 0, len(data))
        w.close(sync=False)
    assert (tmp_path / "dst").read_bytes() == data


@pytest.mark.parametrize("use_cfr", [True, False])
def test_short_reads_writes_and_copies_resume_where_they_stopped(tmp_path, use_cfr):
    """With every call capped at 999 bytes, each read, write and copy takes many calls; the bytes
    must be those of one call."""
    data = os.urandom(100_003)
    src_path = write_file(tmp_path / "src", data)
    core._set_copy_file_range_enabled(use_cfr)
    core._set_max_io_bytes(999)
    try:
        with core.InputFile(str(src_path)) as src:
            assert src.read(7, 50_000) == data[7:50_007]
            w = core.ShardWriter(str(tmp_path / "dst"), 2 * len(data))
            w.write(0, data)
            w.copy_range(src, 3, len(data), len(data) - 3)
            w.close(sync=False)
    finally:
        core._set_max_io_bytes(0)
        core._set_copy_file_range_enabled(True)
    assert (tmp_path / "dst").read_bytes() == data + data[3:] + bytes(3)


@pytest.fixture
def other_filesystem(tmp_path):
    """A directory on another filesystem than ``tmp_path`` (/dev/shm, a tmpfs on Linux), so no
    mount is needed; skipped where there is none."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK) or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no writable /dev/shm on another filesystem")
    d = Path(tempfile.mkdtemp(dir=shm, prefix="layerswap-test-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_copy_range_across_filesystems(tmp_path, other_filesystem):
    """copy_file_range refuses (EXDEV) or copies between filesystems, depending on the kernel:
    either way the bytes arrive, through the pread/pwrite fallback where it refuses."""
    data = os.urandom((9 << 20) + 5)
    src_path = write_file(other_filesystem / "src", data)
    with core.InputFile(str(src_path)) as src:
        w = core.ShardWriter(str(tmp_path / "dst"), len(data) + 3)
        w.copy_range(src, 0, 3, len(data))
        w.close(sync=False)
    assert (tmp_path / "dst").read_bytes() == bytes(3) + data


def test_gil_released_during_blend(gen):
    # Two blends in Python threads give the same bytes as one after the other.
    n = 1 << 20
    a, b = make_tensor("BF16", n, gen), make_tensor("BF16", n, gen)
    ref = core_blend([a, b], ["BF16", "BF16"], [0.5, 0.5], "BF16", threads=1)
    outs = [np.zeros(2 * n, np.uint8) for _ in range(4)]
    run_in_threads(core.blend_buffers, [([raw(a), raw(b)], ["BF16", "BF16"], [0.5, 0.5], o, "BF16", 1) for o in outs])
    for o in outs:
        assert o.tobytes() == raw(ref).tobytes()
