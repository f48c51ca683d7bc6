"""The Triton kernels against plain-torch references (on the CPU under TRITON_INTERPRET=1).

blend must be byte-identical to ``(w0*x0.float() + w1*x1.float() + ...).to(dtype)`` (and to the
C++ core's ``blend_buffers`` when it is built); row_mav within 1e-6 relative of float64 torch.

NaN: torch's vectorised float32 -> bf16 cast writes 0xFFFF, its scalar conversion (and the C++
core, and these kernels) 0x7FC0; so NaN positions are compared with isnan and the kernels' NaN
bit patterns are checked on their own.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from layerswap_fast.kernels import MAX_EXPERTS, MAX_INPUTS, blend, row_mav, row_mav_many  # noqa: E402
from support import INT_VIEW, assert_same, blend_ref, row_mav_ref  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not set", allow_module_level=True)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DNAME = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
SHAPES = [(1, 1), (1, 4097), (3, 5), (37, 129), (1000,)]
WEIGHTS = [0.3, -0.7, 1.1, 0.25, 0.1, -2.0, 0.6, 0.05, 1.0, -0.33, 0.9, 0.125]


# ----------------------------------------------------------------------------- helpers

def rand(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(DEVICE)


def bits(t):
    return t.contiguous().view(INT_VIEW[t.dtype]).cpu()


def assert_nan_bits(t):
    """The kernels' NaN encodings: bf16 0x7FC0 (c10::BFloat16), f16 (+-)0x7E00."""
    nan = torch.isnan(t.float()).cpu()
    if not nan.any() or t.dtype == torch.float32:
        return
    b = bits(t)[nan].to(torch.int32) & 0xFFFF
    if t.dtype == torch.bfloat16:
        assert (b == 0x7FC0).all(), [hex(v) for v in b.tolist()]
    else:
        assert ((b & 0x7FFF) == 0x7E00).all(), [hex(v) for v in b.tolist()]


def assert_rel(got, ref, rtol=1e-6, atol=2.0**-149):
    """|got - ref| <= rtol * |ref|, or within one float32 subnormal step (a float32 result below
    2**-126 cannot carry 1e-6 relative precision); inf and NaN where the reference has them."""
    got = got.double().cpu()
    ref = ref.double().cpu()
    assert got.shape == ref.shape
    both_nan = torch.isnan(got) & torch.isnan(ref)
    assert torch.equal(torch.isnan(got), torch.isnan(ref)), (got, ref)
    g, r = got[~both_nan], ref[~both_nan]
    inf = torch.isinf(r)
    assert torch.equal(g[inf], r[inf])
    g, r = g[~inf], r[~inf]
    zero = r == 0
    assert (g[zero] == 0).all()
    if (~zero).any():
        excess = ((g - r).abs() - torch.clamp(rtol * r.abs(), min=atol))[~zero]
        err = ((g[~zero] - r[~zero]).abs() / r[~zero].abs()).max().item()
        assert excess.max().item() <= 0, f"relative error {err:.3g} > {rtol}"


# ----------------------------------------------------------------------------- blend

@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DNAME.get)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_blend_matches_reference(shape, dtype, n):
    xs = [rand(shape, dtype, seed=10 * n + i) for i in range(n)]
    ws = WEIGHTS[:n]
    out = torch.empty(shape, dtype=dtype, device=DEVICE)
    assert blend(xs, ws, out) is out
    assert_same(out, blend_ref(xs, ws, dtype))


@pytest.mark.parametrize("block", [128, 256])
def test_blend_many_blocks(block):
    """Several programs, the last one partial (4097 = 32 x 128 + 1)."""
    xs = [rand((4097,), torch.bfloat16, seed=i) for i in range(2)]
    out = torch.empty(4097, dtype=torch.bfloat16, device=DEVICE)
    blend(xs, [0.5, 0.5], out, block=block)
    assert_same(out, blend_ref(xs, [0.5, 0.5], torch.bfloat16))


@pytest.mark.parametrize("out_dtype", DTYPES, ids=DNAME.get)
def test_blend_mixed_dtypes(out_dtype):
    xs = [rand((3, 700), torch.bfloat16, 1), rand((3, 700), torch.float16, 2), rand((3, 700), torch.float32, 3)]
    ws = [0.2, 0.3, 0.5]
    out = torch.empty((3, 700), dtype=out_dtype, device=DEVICE)
    blend(xs, ws, out)
    assert_same(out, blend_ref(xs, ws, out_dtype))


@pytest.mark.parametrize("out_dtype", DTYPES, ids=DNAME.get)
@pytest.mark.parametrize("n", [MAX_INPUTS + 3, 2 * MAX_INPUTS + 1])
def test_blend_more_inputs_than_one_launch(out_dtype, n):
    """Inputs beyond MAX_INPUTS go through a float32 accumulator: the bytes must not change."""
    dts = [DTYPES[i % 3] for i in range(n)]
    xs = [rand((2, 333), dts[i], seed=100 + i) for i in range(n)]
    ws = WEIGHTS * 2
    ws = ws[:n]
    out = torch.empty((2, 333), dtype=out_dtype, device=DEVICE)
    blend(xs, ws, out, block=256)
    assert_same(out, blend_ref(xs, ws, out_dtype))


def test_blend_out_may_alias_an_input():
    a, b = rand(999, torch.float32, 1), rand(999, torch.float32, 2)
    want = blend_ref([a, b], [0.5, 0.25], torch.float32)
    blend([a, b], [0.5, 0.25], a)
    assert_same(a, want)
    # also with more inputs than one launch (out must not double as the accumulator)
    xs = [rand(999, torch.float32, 10 + i) for i in range(MAX_INPUTS + 2)]
    want = blend_ref(xs, WEIGHTS[:len(xs)], torch.float32)
    blend(xs, WEIGHTS[:len(xs)], xs[-1])
    assert_same(xs[-1], want)


def test_blend_rejects_bad_arguments():
    x = rand(10, torch.float32, 0)
    out = torch.empty(10, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError):
        blend([], [], out)
    with pytest.raises(ValueError):
        blend([x], [1.0, 2.0], out)
    with pytest.raises(ValueError):
        blend([rand(11, torch.float32, 0)], [1.0], out)
    with pytest.raises(TypeError):
        blend([x.double()], [1.0], out)
    with pytest.raises(TypeError):
        blend([x], [1.0], torch.empty(10, dtype=torch.int32, device=DEVICE))


def _f32(patterns):
    return torch.tensor(np.array(patterns, dtype=np.uint32).view(np.int32)).view(torch.float32).to(DEVICE)


# float32 bit patterns around the bf16/f16 rounding boundaries
ROUNDING_CASES = [
    0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F807FFF, 0xBF808000, 0xBF818000,  # bf16 ties/near-ties
    0x3FFFFFFF, 0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0xFF7FFFFF,  # carry into exponent, overflow
    0x00000001, 0x00008000, 0x00018000, 0x00010000, 0x007FFFFF, 0x807FFFFF, 0x00800000,  # subnormal
    0x00000000, 0x80000000, 0x7F800000, 0xFF800000,  # zeros, infinities
    0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x7FE00001,  # NaNs (quiet, negative, signalling)
    0x3F801000, 0x3F803000, 0x3F800FFF, 0x477FF000, 0x477FEFFF, 0x477FE000,  # f16 ties, 65520/65504
    0x33000000, 0x33400000, 0x33C00000, 0x387FC000, 0x38800000, 0x38000000,  # f16 subnormal ties
]


@pytest.mark.parametrize("out_dtype", DTYPES, ids=DNAME.get)
def test_blend_rounding_and_special_values(out_dtype):
    x = _f32(ROUNDING_CASES)
    out = torch.empty_like(x, dtype=out_dtype)
    blend([x], [1.0], out)
    assert_same(out, x.to(out_dtype))
    assert_nan_bits(out)


@pytest.mark.parametrize("out_dtype", DTYPES, ids=DNAME.get)
def test_blend_random_bit_patterns(out_dtype):
    """Any float32 (NaN, inf, subnormal ...) times 1.0, rounded into out_dtype, as torch does."""
    g = np.random.default_rng(7)
    x = _f32(g.integers(0, 2**32, size=30000, dtype=np.uint64).astype(np.uint32))
    out = torch.empty_like(x, dtype=out_dtype)
    blend([x], [1.0], out)
    assert_same(out, x.to(out_dtype))
    assert_nan_bits(out)


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16], ids=DNAME.get)
def test_blend_reads_every_16bit_pattern_exactly(in_dtype):
    """All 65536 bf16/f16 values (subnormals, NaN payloads, infinities) convert exactly."""
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(in_dtype).to(DEVICE)
    out = torch.empty(x.shape, dtype=torch.float32, device=DEVICE)
    blend([x], [1.0], out)
    assert_same(out, x.float())
    # and back: a value read from dtype and written to it is unchanged (NaN -> canonical NaN)
    back = torch.empty_like(x)
    blend([x], [1.0], back)
    assert_same(back, x)
    assert_nan_bits(back)


def test_blend_specials_in_arithmetic():
    inf, nan = float("inf"), float("nan")
    a = torch.tensor([inf, -inf, inf, nan, 1.0, 3.0e38, 1e-45, -0.0, 0.0, 65504.0], device=DEVICE)
    b = torch.tensor([1.0, 1.0, -inf, 1.0, nan, 3.0e38, 1e-45, -0.0, -0.0, 65504.0], device=DEVICE)
    for dtype in DTYPES:
        xs = [a.to(dtype), b.to(dtype)]
        out = torch.empty(a.shape, dtype=dtype, device=DEVICE)
        blend(xs, [0.5, 0.5], out)
        assert_same(out, blend_ref(xs, [0.5, 0.5], dtype))
        assert_nan_bits(out)
        out2 = torch.empty(a.shape, dtype=dtype, device=DEVICE)
        blend(xs, [1.0, 1.0], out2)
        assert_same(out2, blend_ref(xs, [1.0, 1.0], dtype))


def test_blend_products_are_rounded_before_adding():
    """A fused multiply-add would give different bytes for many of these elements."""
    xs = [rand(5000, torch.float32, 1), rand(5000, torch.float32, 2), rand(5000, torch.float32, 3)]
    ws = [0.1, 0.7, 1 / 3]
    out = torch.empty(5000, dtype=torch.float32, device=DEVICE)
    blend(xs, ws, out)
    assert_same(out, blend_ref(xs, ws, torch.float32))
    x64 = [x.double().cpu() for x in xs]
    w32 = [float(np.float32(w)) for w in ws]
    fused = ((x64[0] * w32[0]).float().double() + x64[1] * w32[1]).float()  # one FMA
    fused = (fused.double() + x64[2] * w32[2]).float()
    assert not torch.equal(fused, out.cpu()), "test data does not tell fused from unfused"


@pytest.mark.parametrize("out_dtype", DTYPES, ids=DNAME.get)
def test_blend_matches_cpp_core(out_dtype):
    core = pytest.importorskip("layerswap_fast._core", reason="C++ extension layerswap_fast._core not built yet")
    specials = _f32(ROUNDING_CASES)
    n = 4097 + specials.numel()
    dts = [torch.bfloat16, torch.float16, torch.float32]
    xs = [torch.cat([rand(4097, torch.float32, 40 + i), specials]).to(dt) for i, dt in enumerate(dts)]
    for k in (1, 2, 3):
        ws = WEIGHTS[:k]
        out = torch.empty(n, dtype=out_dtype, device=DEVICE)
        blend(xs[:k], ws, out)
        cpu_out = torch.empty(n, dtype=out_dtype)
        core.blend_buffers([x.cpu().view(torch.uint8).numpy() for x in xs[:k]], [DNAME[x.dtype] for x in xs[:k]],
                           ws, cpu_out.view(torch.uint8).numpy(), DNAME[out_dtype])
        assert_same(out.cpu(), cpu_out)
        assert_same(out.cpu(), blend_ref(xs[:k], ws, out_dtype).cpu())
        if out_dtype == torch.bfloat16:  # one NaN encoding (0x7FC0) on both backends: every byte equal
            assert torch.equal(bits(out), bits(cpu_out))
        elif out_dtype == torch.float16:  # NaN -> sign | 0x7E00 (the sign of a computed NaN may differ)
            nan = torch.isnan(cpu_out.float())
            assert torch.equal(bits(out)[nan] & 0x7FFF, bits(cpu_out)[nan] & 0x7FFF)


# ----------------------------------------------------------------------------- row_mav

DTYPE_PAIRS = [(d, d) for d in DTYPES] + [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda p: f"{DNAME[p[0]]}-{DNAME[p[1]]}")
def test_row_mav_matches_float64(shape, dtypes):
    e = rand(shape, dtypes[0], 1)
    b = rand(shape, dtypes[1], 2)
    got = row_mav(e, b)
    assert got.dtype == torch.float32 and got.shape == (1 if len(shape) == 1 else shape[0],)
    assert_rel(got, row_mav_ref(e, b))


@pytest.mark.parametrize("tile", [dict(block_c=16, block_r=2, seg_iters=8), dict(block_c=32, block_r=4, seg_iters=3),
                                  dict(block_c=128, block_r=1, seg_iters=64)], ids=str)
@pytest.mark.parametrize("shape", [(1, 4097), (37, 129), (5, 1000)], ids=str)
def test_row_mav_tilings(tile, shape):
    """Rows longer than the block loop; long rows split into segments combine in float64;
    row counts not a multiple of the row block."""
    e = rand(shape, torch.bfloat16, 3)
    b = rand(shape, torch.bfloat16, 4)
    assert_rel(row_mav(e, b, **tile), row_mav_ref(e, b))


def test_row_mav_special_values():
    inf, nan = float("inf"), float("nan")
    tiny = 1e-40  # float32 subnormal
    e = torch.tensor([[1.0, 2.0, 3.0, 4.0],
                      [inf, 0.0, 0.0, 0.0],
                      [nan, 1.0, 1.0, 1.0],
                      [inf, 1.0, 1.0, 1.0],
                      [tiny, 3 * tiny, -tiny, 0.0],
                      [-0.0, 0.0, 5.0, 5.0]], device=DEVICE)
    b = torch.tensor([[1.0, 2.0, 3.0, 4.0],
                      [0.0, 0.0, 0.0, 0.0],
                      [0.0, 0.0, 0.0, 0.0],
                      [inf, 0.0, 0.0, 0.0],
                      [0.0, tiny, tiny, -tiny],
                      [0.0, -0.0, 5.0, 4.0]], device=DEVICE)
    got = row_mav(e, b).cpu()
    assert got[0] == 0
    assert got[1] == inf
    assert torch.isnan(got[2]) and torch.isnan(got[3])
    assert got[4].item() == pytest.approx(6e-40 / 4, abs=2.0**-149)  # a float32 subnormal
    assert got[5] == 0.25
    assert_rel(got, row_mav_ref(e, b))
    # bf16 subnormals are read exactly
    sub = torch.tensor([1, 2, 3, 0x7F], dtype=torch.int16).view(torch.bfloat16).to(DEVICE)
    assert_rel(row_mav(sub, torch.zeros_like(sub)), row_mav_ref(sub, torch.zeros_like(sub)))


def test_row_mav_rejects_bad_arguments():
    a = rand((3, 4), torch.float32, 0)
    with pytest.raises(ValueError):
        row_mav(a, rand((4, 3), torch.float32, 0))
    with pytest.raises(ValueError):
        row_mav(rand((2, 3, 4), torch.float32, 0), rand((2, 3, 4), torch.float32, 0))
    with pytest.raises(TypeError):
        row_mav(a.double(), a)


def test_row_mav_strided_rows():
    big_e, big_b = rand((10, 300), torch.float16, 5), rand((10, 300), torch.float32, 6)
    e, b = big_e[::2, 10:210], big_b[1::2, 50:250]  # row strides 600 / 600, column offset
    assert_rel(row_mav(e, b), row_mav_ref(e, b))


# ----------------------------------------------------------------------------- row_mav_many

@pytest.mark.parametrize("k", [1, 2, 3, MAX_EXPERTS + 1])
@pytest.mark.parametrize("shape", [(1, 4097), (37, 129), (1000,), (1, 1)], ids=str)
def test_row_mav_many_matches_the_reference_and_one_expert_at_a_time(k, shape):
    base = rand(shape, torch.bfloat16, 0)
    experts = [rand(shape, DTYPES[i % 3], 10 + i) for i in range(k)]
    got = row_mav_many(experts, base)
    rows = 1 if len(shape) == 1 else shape[0]
    assert got.shape == (k, rows) and got.dtype == torch.float32
    for i, e in enumerate(experts):
        assert_rel(got[i], row_mav_ref(e, base))
        if k > 1:  # an expert's rows do not depend on the others in its launch
            assert torch.equal(got[i], row_mav(e, base))


def test_row_mav_many_segments_and_special_values():
    base = rand((3, 3000), torch.float32, 0)
    e1 = base.clone()
    e1[0, 5] = float("nan")
    e1[1, 7] = float("inf")
    e2 = rand((3, 3000), torch.float16, 1)
    got = row_mav_many([e1, e2, base], base, block_c=64, block_r=2, seg_iters=4)
    assert torch.isnan(got[0, 0]) and got[0, 1] == float("inf") and got[0, 2] == 0
    assert (got[2] == 0).all()
    assert_rel(got[1], row_mav_ref(e2, base))


def test_row_mav_many_rejects_bad_arguments():
    b = rand((3, 4), torch.float32, 0)
    with pytest.raises(ValueError):
        row_mav_many([], b)
    with pytest.raises(ValueError):
        row_mav_many([b, rand((3, 5), torch.float32, 0)], b)
