"""The fused LoRA kernel of the core, ``_core.blend_lowrank_file``, against a float64 torch
reference: odd shapes (rows and columns that are no multiple of the 4-row register block, the
512-column tile or the 8-float AVX2 vector), ranks 1, 16 and 33, BF16/F16/F32 in and out; the
bytes for every thread count, block size and product path (AVX2 or portable); and its errors,
which are CoreErrors (or TypeErrors), never a crash.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from layerswap_fast import _core as core
from support import TORCH, ulps, write_at_offsets

CoreError = core.CoreError
SIZE = {"BF16": 2, "F16": 2, "F32": 4}
DTYPES = ["BF16", "F16", "F32"]


def _case(tmp_path: Path, rows: int, cols: int, ranks: list[int], in_dtype: str, seed: int = 0):
    """Two terms (a base of values in [1, 2] and a small second model, away from cancellation)
    at odd offsets of one file, and one (B, A) pair per rank."""
    gen = torch.Generator().manual_seed(seed)
    base = (1 + torch.rand(rows, cols, generator=gen, dtype=torch.float64)).to(TORCH[in_dtype])
    other = (0.1 * torch.randn(rows, cols, generator=gen, dtype=torch.float64)).to(TORCH["BF16"])
    path = tmp_path / f"in-{rows}x{cols}-{in_dtype}.bin"
    offsets = write_at_offsets(path, [base, other])
    factors = []
    for r in ranks:
        b = (torch.randn(rows, r, generator=gen) / r ** 0.5).numpy()
        a = (0.05 * torch.randn(r, cols, generator=gen)).numpy()
        factors.append((np.ascontiguousarray(b, np.float32), np.ascontiguousarray(a, np.float32)))
    return path, offsets, [base, other], factors


WEIGHTS = [1.0, 0.7]
FACTOR_WEIGHTS = [0.8, -1.3, 0.3]


def _reference(terms, factors) -> torch.Tensor:
    """Σ w·x + Σ c·(B·A) in float64, the weights rounded to float32 as the core does."""
    f32 = [float(np.float32(w)) for w in WEIGHTS + FACTOR_WEIGHTS]
    want = sum(w * t.double() for w, t in zip(f32, terms))
    for c, (b, a) in zip(f32[len(terms):], factors):
        want = want + c * (torch.from_numpy(b).double() @ torch.from_numpy(a).double())
    return want


def _run(tmp_path: Path, path: Path, offsets, in_dtype: str, factors, out_dtype: str, rows: int, cols: int,
         *, threads: int = 1, chunk_elems: int = 1 << 16, out_offset: int = 5, name: str = "out") -> bytes:
    """The kernel's output bytes, checking that the bytes around them stay zero."""
    osz = SIZE[out_dtype]
    dst = tmp_path / f"{name}.bin"
    n = rows * cols * osz
    with core.InputFile(str(path)) as f:
        w = core.ShardWriter(str(dst), out_offset + n + 3)
        core.blend_lowrank_file([(f, offsets[0]), (f, offsets[1])], [in_dtype, "BF16"], WEIGHTS, factors,
                                FACTOR_WEIGHTS[:len(factors)], w, out_offset, out_dtype, rows, cols,
                                chunk_elems=chunk_elems, threads=threads)
        w.close()
    got = dst.read_bytes()
    dst.unlink()
    assert got[:out_offset] == bytes(out_offset) and got[out_offset + n:] == bytes(3)
    return got[out_offset:out_offset + n]


def _tensor(data: bytes, dtype: str, rows: int, cols: int) -> torch.Tensor:
    ints = np.frombuffer(data, dtype=np.int32 if dtype == "F32" else np.int16).copy()
    return torch.from_numpy(ints).view(TORCH[dtype]).reshape(rows, cols)


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("rows, cols, ranks", [(37, 523, [1, 33]), (6, 1031, [16, 7, 1]), (131, 9, [33])],
                         ids=["37x523 r1,33", "6x1031 r16,7,1", "131x9 r33"])
def test_within_one_ulp_of_float64_whatever_the_threads(tmp_path, rows, cols, ranks, in_dtype, out_dtype):
    path, offsets, terms, factors = _case(tmp_path, rows, cols, ranks, in_dtype)
    one = _run(tmp_path, path, offsets, in_dtype, factors, out_dtype, rows, cols, threads=1)
    # blocks of 1, 2 or 3 rows (and rows that end mid-block) shared by 3 workers: the same bytes
    for chunk in (cols, 2 * cols + 1, 3 * cols, 1 << 16):
        assert _run(tmp_path, path, offsets, in_dtype, factors, out_dtype, rows, cols, threads=3,
                    chunk_elems=chunk) == one, chunk
    got = _tensor(one, out_dtype, rows, cols)
    want = _reference(terms, factors)
    if out_dtype == "F32":  # float32 sums of float32 products: a few roundings at the result's magnitude
        assert float((got.double() - want).abs().max()) <= 8 * 2**-24 * float(want.abs().max())
    else:
        assert ulps(got, want) <= 1


def test_avx2_and_portable_products_give_the_same_bytes(tmp_path):
    rows, cols = 41, 777
    path, offsets, _, factors = _case(tmp_path, rows, cols, [33, 1, 16], "BF16", seed=3)
    fast = _run(tmp_path, path, offsets, "BF16", factors, "F32", rows, cols, threads=2)
    core._set_lowrank_simd_enabled(False)
    try:
        portable = _run(tmp_path, path, offsets, "BF16", factors, "F32", rows, cols, threads=2)
    finally:
        core._set_lowrank_simd_enabled(True)
    assert fast == portable


def test_products_are_fused_multiply_add_chains_and_terms_are_rounded_products(tmp_path):
    """One element, worked by hand in float64 then rounded the way the kernel states: P is
    fma(b1, a1, fma(b0, a0, 0)), then fl(w·x) + fl(c·P) rounded once into F32."""
    b = np.array([[1 + 2**-12, 1 + 2**-13]], np.float32)
    a = np.array([[1 + 2**-12], [-(1 + 2**-11)]], np.float32)
    x = torch.tensor([[3.0]], dtype=torch.float32)
    path = tmp_path / "one.bin"
    offsets = write_at_offsets(path, [x, x])
    dst = tmp_path / "o.bin"
    with core.InputFile(str(path)) as f:
        w = core.ShardWriter(str(dst), 4)
        core.blend_lowrank_file([(f, offsets[0])], ["F32"], [1.0], [(b, a)], [1.0], w, 0, "F32", 1, 1)
        w.close()
    got = float(np.frombuffer(dst.read_bytes(), np.float32)[0])
    p0 = float(np.float32(float(b[0, 0]) * float(a[0, 0])))  # fma(b0, a0, 0): exact product, one rounding
    p = float(np.float32(float(b[0, 1]) * float(a[1, 0]) + p0))  # exact in float64 here, then one rounding
    assert got == float(np.float32(3.0 + p))


def test_no_factors_is_the_blend(tmp_path):
    rows, cols = 7, 300
    path, offsets, terms, _ = _case(tmp_path, rows, cols, [], "F16")
    got = _tensor(_run(tmp_path, path, offsets, "F16", [], "BF16", rows, cols, threads=2), "BF16", rows, cols)
    want = (np.float32(WEIGHTS[0]) * terms[0].float() + np.float32(WEIGHTS[1]) * terms[1].float()).to(torch.bfloat16)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_errors_are_core_errors(tmp_path):
    rows, cols, r = 6, 10, 3
    path, offsets, _, factors = _case(tmp_path, rows, cols, [r], "BF16")
    (b, a), = factors
    f = core.InputFile(str(path))
    w = core.ShardWriter(str(tmp_path / "o.bin"), rows * cols * 2)
    ins = [(f, offsets[0])]

    def call(inputs=ins, dtypes=("BF16",), weights=(1.0,), fs=((b, a),), fw=(1.0,), out=w, offset=0, rows=rows,
             cols=cols, **kw):
        core.blend_lowrank_file(inputs, list(dtypes), list(weights), list(fs), list(fw), out, offset, "BF16",
                                rows, cols, **kw)

    call()  # the arguments as they stand are fine
    big = core.ShardWriter(str(tmp_path / "big.bin"), 1000)
    with pytest.raises(CoreError, match=r"inputs\[0\]: 70 elements of BF16 .* run past the end"):
        call(inputs=[(f, offsets[1])], rows=7, fs=((np.zeros((7, r), np.float32), a),), out=big)
    big.abort()
    with pytest.raises(CoreError, match=r"outside the file"):
        call(offset=2)
    with pytest.raises(CoreError, match="rows and cols must be >= 1"):
        call(rows=0)
    with pytest.raises(CoreError, match="rows and cols must be >= 1"):
        call(cols=0)
    with pytest.raises(CoreError, match="overflows"):
        call(rows=2**40, cols=2**40)
    with pytest.raises(CoreError, match="rows must be >= 0"):
        call(rows=-1)
    with pytest.raises(CoreError, match="chunk_elems must be >= 1"):
        call(chunk_elems=0)
    with pytest.raises(CoreError, match="at least one input"):
        call(inputs=[], dtypes=(), weights=())
    with pytest.raises(CoreError, match="weights has 2 entries"):
        call(weights=(1.0, 2.0))
    with pytest.raises(CoreError, match="factor_weights has 0 entries but factors has 1"):
        call(fw=())
    with pytest.raises(CoreError, match=r"factors\[0\]\[0\] \(B\) has 68 bytes"):
        call(fs=((b.ravel()[:-1], a),))
    with pytest.raises(CoreError, match=r"factors\[0\]\[0\] \(B\) has 0 bytes"):
        call(fs=((np.zeros((rows, 0), np.float32), np.zeros((0, cols), np.float32)),))
    with pytest.raises(CoreError, match=r"factors\[0\]\[1\] \(A\) has 116 bytes but 3 x 10 elements"):
        call(fs=((b, a.ravel()[:-1]),))
    with pytest.raises(CoreError, match=r"factors\[0\]\[1\] \(A\) has 120 bytes but 6 x 10 elements"):
        call(fs=((np.zeros((rows, 6), np.float32), a),))  # B's rank says 6, A holds rank 3
    with pytest.raises(CoreError, match=r"factors\[0\]\[1\] \(A\) is not a C-contiguous buffer"):
        call(fs=((b, np.asfortranarray(a)),))
    unaligned = np.zeros(b.nbytes + 1, np.uint8)[1:]
    unaligned[:] = b.view(np.uint8).ravel()
    with pytest.raises(CoreError, match=r"factors\[0\]\[0\] \(B\) is not aligned"):
        call(fs=((unaligned, a),))
    with pytest.raises(TypeError):
        call(fs=((b,),))
    with pytest.raises(TypeError):
        call(fs=((b, 3),))
    with pytest.raises(TypeError):
        call(fs=(b,))
    with pytest.raises(CoreError, match="unknown dtype|not a float dtype|dtype"):
        call(dtypes=("I32",))
    w.close()
    with pytest.raises(CoreError, match="o.bin is closed"):
        call()
    f.close()
    w2 = core.ShardWriter(str(tmp_path / "o2.bin"), rows * cols * 2)
    with pytest.raises(CoreError, match="is closed"):
        call(out=w2)
    w2.abort()
