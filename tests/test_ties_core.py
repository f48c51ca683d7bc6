"""Tests of the TIES-merging kernels of the C++ core (ties_thresholds_buffers, ties_buffers,
ties_file) against a plain-torch reference written from the definition in _core.pyi."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from layerswap_fast import _core as core
from support import TORCH, assert_same, from_raw, one_line, raw, run_in_threads, write_at_offsets

CoreError = core.CoreError

SIZE = {"BF16": 2, "F16": 2, "F32": 4}
DTYPE_SETS = {  # (base, experts..., out)
    "bf16": ("BF16", ["BF16"] * 3, "BF16"),
    "f16": ("F16", ["F16"] * 3, "F16"),
    "f32": ("F32", ["F32"] * 3, "F32"),
    "mixed": ("BF16", ["F16", "F32", "BF16"], "F32"),
    "mixed2": ("F32", ["BF16", "BF16", "F16"], "BF16"),
}
SIZES = [1, 5, 4097, 100_003]


# ---- helpers -------------------------------------------------------------------------------------

def sgn(x: torch.Tensor) -> torch.Tensor:
    """sign with sign(NaN) == 0 (what torch.sign gives on CPU; spelled out so as not to depend
    on it)."""
    return (x > 0).to(torch.int32) - (x < 0).to(torch.int32)


def kth_largest(a: torch.Tensor, k: int) -> torch.Tensor:
    """torch.topk(a, k).values[-1] (NaN above everything); through a sort when k is large, where
    topk is slow. test_thresholds_equal_topk checks the core against topk itself."""
    if k <= 64:
        return torch.topk(a, k).values[-1]
    return torch.sort(a, descending=True, stable=True).values[k - 1]


def ref_taus(base, experts, keep, topk=False) -> list[torch.Tensor | None]:
    """tau_i per expert: None for keep == 0 (nothing kept) and for keep >= numel (all kept)."""
    b = base.float().flatten()
    out = []
    for e in experts:
        a = (e.float().flatten() - b).abs()
        if keep == 0 or keep >= a.numel():
            out.append(None)
        else:
            out.append(torch.topk(a, keep).values[-1] if topk else kth_largest(a, keep))
    return out


def ref_thresholds(base, experts, keep, topk=False) -> list[float]:
    taus = ref_taus(base, experts, keep, topk)
    return [float("inf") if keep == 0 else 0.0 if t is None else t.item() for t in taus]


def ties_ref(base, experts, keep, lam, out_dtype, taus=None):
    """TIES from the definition in _core.pyi, in plain float32 torch ops (``taus``: ref_taus of
    the same arguments, to save recomputing them)."""
    b = base.float().flatten()
    ds = [e.float().flatten() - b for e in experts]
    if taus is None:
        taus = ref_taus(base, experts, keep)
    ts = []
    for d, tau in zip(ds, taus):
        a = d.abs()
        if keep == 0:
            kept = torch.zeros_like(d, dtype=torch.bool)  # keep == 0 keeps nothing at all
        elif keep >= a.numel():
            kept = torch.ones_like(d, dtype=torch.bool)
        else:
            kept = (a >= tau) | torch.isnan(d)  # NaN deltas are always kept
        ts.append(torch.where(kept, d, torch.zeros_like(d)))
    s = ts[0].clone()
    for t in ts[1:]:
        s = s + t
    g = sgn(s)
    num = torch.zeros_like(b)
    cnt = torch.zeros_like(b)
    for t in ts:
        agree = (sgn(t) == g) & (t != 0)
        num = num + torch.where(agree, t, torch.zeros_like(t))
        cnt = cnt + agree.float()
    mean = torch.where(cnt > 0, num / cnt.clamp(min=1), torch.zeros_like(num))
    lam32 = torch.tensor(lam, dtype=torch.float32)  # lam rounded to float32 once
    return (b + lam32 * mean).to(TORCH[out_dtype])


def core_ties(base, bdt, experts, edts, keep, lam, odt, threads=0):
    out = np.zeros(base.numel() * SIZE[odt], np.uint8)
    core.ties_buffers(raw(base), bdt, [raw(e) for e in experts], edts, out, odt, keep, lam, threads)
    return from_raw(out, odt)


def same_floats(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all((x != x and y != y) or x == y for x, y in zip(a, b))


def make_set(bdt, edts, n, gen, specials=True):
    """A base and experts near it (fine-tune-like deltas that tie a lot in 16-bit dtypes), one
    expert far from it, with a few special values mixed in."""
    base = (torch.randn(n, generator=gen) * 0.05).to(TORCH[bdt])
    experts = []
    for i, d in enumerate(edts):
        scale = 0.002 if i != 1 else 0.05
        e = (base.float() + torch.randn(n, generator=gen) * scale).to(TORCH[d])
        experts.append(e)
    if specials and n >= 50:
        idx = torch.randperm(n, generator=gen)[:12]
        base[idx[0]] = -0.0
        experts[0][idx[0]] = 0.0  # delta +0
        experts[0][idx[1]] = float("inf")
        experts[-1][idx[2]] = float("nan")
        experts[-1][idx[3]] = float("-inf")
        base[idx[4]] = float("inf")  # inf - inf = NaN delta for every expert there
        for e in experts:
            e[idx[5]] = base[idx[5]]  # all deltas 0
        experts[0][idx[6]] = 1e-40 if edts[0] == "F32" else 0.0
        base[idx[6]] = 0.0
    return base, experts


def keeps_for(n):
    return sorted({0, 1, n // 5, max(n - 1, 0), n})


# ---- module surface ------------------------------------------------------------------------------

def test_surface():
    for name in ["ties_thresholds_buffers", "ties_buffers", "ties_file"]:
        assert hasattr(core, name)


def test_reference_sign_follows_the_contract():
    # The reference spells sign() out rather than trusting torch.sign's NaN handling.
    x = torch.tensor([1.0, -2.0, 0.0, -0.0, float("inf"), float("-inf"), float("nan")])
    assert sgn(x).tolist() == [1, -1, 0, 0, 1, -1, 0]  # the contract's sign, NaN -> 0


# ---- ties_buffers vs the reference ---------------------------------------------------------------

@pytest.mark.parametrize("dset", list(DTYPE_SETS))
@pytest.mark.parametrize("n_ex", [1, 2, 3])
def test_ties_buffers_matches_reference(dset, n_ex):
    gen = torch.Generator().manual_seed(1000 + n_ex)
    bdt, edts_all, odt = DTYPE_SETS[dset]
    edts = edts_all[:n_ex]
    for n in SIZES:
        base, experts = make_set(bdt, edts, n, gen)
        for keep in keeps_for(n):
            rt = ref_taus(base, experts, keep)
            taus = core.ties_thresholds_buffers(raw(base), bdt, [raw(e) for e in experts], edts, keep)
            expect = [float("inf") if keep == 0 else 0.0 if t is None else t.item() for t in rt]
            assert same_floats(taus, expect), (n, keep)
            for lam in (1.0, 0.7):
                got = core_ties(base, bdt, experts, edts, keep, lam, odt)
                assert_same(got, ties_ref(base, experts, keep, lam, odt, rt), (dset, n, keep, lam))


@pytest.mark.parametrize("dset", ["bf16", "f16", "mixed"])
def test_thresholds_equal_topk(dset):
    gen = torch.Generator().manual_seed(21)
    bdt, edts, _ = DTYPE_SETS[dset]
    n = 100_003
    base, experts = make_set(bdt, edts, n, gen)
    for keep in (1, 2, 17, n // 5, n // 2, n - 1):
        got = core.ties_thresholds_buffers(raw(base), bdt, [raw(e) for e in experts], edts, keep)
        assert same_floats(got, ref_thresholds(base, experts, keep, topk=True)), keep


def test_thresholds_every_rank_in_a_bin():
    # One top-16-bit bin holding values whose low 16 bits are 0 (1.0, x5) and values that are not
    # (1.0 + 1, 2, 3 ulps), below 2.0 (x2) and above 0.5 (x3): every keep from 0 to numel + 1,
    # i.e. every rank in the bin, on both sides of the pass-2 shortcut.
    pats = [0x3F800000] * 5 + [0x3F800001, 0x3F800002, 0x3F800003, 0x3F800003] + [0x40000000] * 2 + [0x3F000000] * 3
    d = torch.tensor(pats, dtype=torch.int64).to(torch.int32).view(torch.float32)
    signs = torch.tensor([1.0, -1.0] * 7)
    d = d * signs
    n = d.numel()
    base = torch.zeros(n, dtype=torch.float32)
    for keep in range(n + 2):
        for threads in (1, 2):
            got = core.ties_thresholds_buffers(raw(base), "F32", [raw(d), raw(d.flip(0))], ["F32", "F32"],
                                               keep, threads)
            assert same_floats(got, ref_thresholds(base, [d, d.flip(0)], keep, topk=True)), keep
        got = core_ties(base, "F32", [d, -d.flip(0)], ["F32", "F32"], keep, 1.0, "F32")
        assert_same(got, ties_ref(base, [d, -d.flip(0)], keep, 1.0, "F32"), keep)


def test_thresholds_random_f32_bit_patterns():
    # Deltas spread over the whole float32 range (pass 2 of the select always runs here), and
    # magnitudes that share their top 16 bits (one bin, many distinct low halves).
    rng = np.random.default_rng(5)
    n = 200_000
    e = torch.from_numpy(rng.integers(0, 2 ** 32, size=n, dtype=np.uint64).astype(np.uint32).view(np.float32).copy())
    b = torch.zeros(n, dtype=torch.float32)
    bits = (0x3F80 << 16) | rng.integers(0, 1 << 16, size=n, dtype=np.uint32)
    f = torch.from_numpy(bits.astype(np.uint32).view(np.float32) * np.where(rng.random(n) < 0.5, -1, 1).astype(np.float32))
    for keep in (1, 2, 7, 1000, n // 3, n // 2, n - 2, n - 1):
        for threads in (1, 3):
            got = core.ties_thresholds_buffers(raw(b), "F32", [raw(e), raw(f)], ["F32", "F32"], keep, threads)
            assert same_floats(got, ref_thresholds(b, [e, f], keep)), keep
        got = core_ties(b, "F32", [e, f], ["F32", "F32"], keep, 0.5, "F32")
        assert_same(got, ties_ref(b, [e, f], keep, 0.5, "F32"), keep)


# ---- the semantics, case by case -----------------------------------------------------------------

def test_ties_at_threshold_all_kept():
    # |d| = 5 (x3), 3 (x10, both signs), 1 (x20): keep=5 puts the 5th place among the 3s: all ten
    # 3s survive (13 elements kept for k=5); keep=3 keeps exactly the 5s; keep=14 keeps all 1s too.
    mags = [5.0] * 3 + [3.0] * 10 + [1.0] * 20
    signs = [1, -1] * 16 + [1]
    d = torch.tensor([m * s for m, s in zip(mags, signs)], dtype=torch.float32)
    perm = torch.randperm(d.numel(), generator=torch.Generator().manual_seed(3))
    d = d[perm]
    base = torch.full_like(d, 100.0)
    expert = base + d
    for dt in ("F32", "BF16", "F16"):
        bx, ex = base.to(TORCH[dt]), expert.to(TORCH[dt])
        for keep, tau, nkept in ((1, 5.0, 3), (3, 5.0, 3), (4, 3.0, 13), (5, 3.0, 13), (13, 3.0, 13),
                                 (14, 1.0, 33), (32, 1.0, 33)):
            assert core.ties_thresholds_buffers(raw(bx), dt, [raw(ex)], [dt], keep) == [tau]
            got = core_ties(bx, dt, [ex], [dt], keep, 1.0, "F32")
            assert_same(got, ties_ref(bx, [ex], keep, 1.0, "F32"))
            changed = got != base
            assert int(changed.sum()) == nkept, (dt, keep)
            assert torch.equal(got[changed], expert[changed])


def test_ties_between_experts_threshold_per_expert():
    # Each expert has its own tau: expert 0's deltas are 10x expert 1's.
    gen = torch.Generator().manual_seed(9)
    n = 4097
    base = torch.zeros(n)
    e0 = torch.randn(n, generator=gen) * 10
    e1 = torch.randn(n, generator=gen)
    taus = core.ties_thresholds_buffers(raw(base), "F32", [raw(e0), raw(e1)], ["F32", "F32"], 100)
    assert same_floats(taus, ref_thresholds(base, [e0, e1], 100))
    assert taus[0] > 5 * taus[1]


def test_all_zero_deltas_give_base():
    gen = torch.Generator().manual_seed(4)
    for dt in ("BF16", "F16", "F32"):
        base = (torch.randn(4097, generator=gen) * 3).to(TORCH[dt])
        base[::7] = -0.0
        base[1::7] = 0.0
        for n_ex in (1, 3):
            for keep in (0, 1, 800, 4097):
                for lam in (1.0, 0.7, -2.0):
                    got = core_ties(base, dt, [base.clone()] * n_ex, [dt] * n_ex, keep, lam, dt)
                    assert_same(got, ties_ref(base, [base] * n_ex, keep, lam, dt))
                    # b + lam * (+0.0): the base bytes, except -0.0 + 0.0 = +0.0 (and -0.0 + -0.0
                    # = -0.0 when lam < 0)
                    expect = base.clone()
                    if lam > 0:
                        expect[base == 0] = 0.0
                    assert raw(got).tobytes() == raw(expect).tobytes(), (dt, n_ex, keep, lam)


def test_signs_cancelling_elect_zero():
    b = torch.tensor([1.0, 2.0, -3.0, 0.5, 7.0, -0.0])
    x = torch.tensor([0.25, -1.0, 4.0, 0.125, 0.0, 0.5])
    # two experts: +x and -x: s == 0 everywhere, gamma 0, nothing agrees, out == b (-0 -> +0)
    got = core_ties(b, "F32", [b + x, b - x], ["F32", "F32"], 6, 1.0, "F32")
    assert got.tolist() == [1.0, 2.0, -3.0, 0.5, 7.0, 0.0]
    assert_same(got, ties_ref(b, [b + x, b - x], 6, 1.0, "F32"))
    # three experts with deltas +2, -1, -1: s == 0 again
    got = core_ties(b, "F32", [b + 2 * x, b - x, b - x], ["F32"] * 3, 6, 1.0, "F32")
    assert_same(got, b + 0.0)
    # +2, -1, +0.5: s > 0 where x > 0, and the mean is over the agreeing deltas only (2 and 0.5)
    es = [b + 2 * x, b - x, b + 0.5 * x]
    got = core_ties(b, "F32", es, ["F32"] * 3, 6, 1.0, "F32")
    assert_same(got, ties_ref(b, es, 6, 1.0, "F32"))
    assert got[0].item() == 1.0 + (0.5 + 0.125) / 2


def test_disjoint_mean_order_and_float32():
    # num is summed in input order from 0.0 in float32: 1e8 + 1 - ... ; the mean is num / cnt.
    b = torch.zeros(2, dtype=torch.float32)
    es = [torch.tensor([1e8, 1.0]), torch.tensor([1.0, 1e8]), torch.tensor([3.0, 3.0])]
    got = core_ties(b, "F32", es, ["F32"] * 3, 2, 1.0, "F32")
    assert_same(got, ties_ref(b, es, 2, 1.0, "F32"))
    assert got[0].item() == np.float32(np.float32(np.float32(1e8) + np.float32(1.0)) + np.float32(3.0)) / np.float32(3)
    # lam is rounded to float32, the product rounded before the add (no FMA)
    b = torch.tensor([1.0], dtype=torch.float32)
    e = torch.tensor([1.0 + 2.0 ** -12 + 1.0], dtype=torch.float32)
    lam = 1.0 + 2.0 ** -12
    got = core_ties(b, "F32", [e], ["F32"], 1, lam, "F32")
    d = np.float32(e.item()) - np.float32(1.0)
    assert got.item() == np.float32(1.0) + np.float32(np.float32(lam) * d)


def test_nan_and_inf_deltas():
    # NaN deltas are kept whatever keep is (|NaN| orders above +inf) and make s NaN, whose sign
    # is 0; a kept NaN then "agrees" with gamma 0 (sign 0, != 0), so the output is NaN. +inf and
    # -inf deltas kept together also give s = NaN, but nothing agrees: out = base there.
    nan, inf = float("nan"), float("inf")
    b = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float32)
    e0 = torch.tensor([nan, inf, 2.0, 5.0, 1.5], dtype=torch.float32)
    e1 = torch.tensor([2.0, -inf, 3.0, 9.0, 1.25], dtype=torch.float32)
    taus = core.ties_thresholds_buffers(raw(b), "F32", [raw(e0), raw(e1)], ["F32", "F32"], 1)
    assert taus[0] != taus[0] and taus[1] == inf  # keep=1: the NaN, and the inf
    got = core_ties(b, "F32", [e0, e1], ["F32", "F32"], 1, 1.0, "F32")
    assert_same(got, ties_ref(b, [e0, e1], 1, 1.0, "F32"))
    assert torch.isnan(got[0]) and got[1:].tolist() == [-inf, 1.0, 1.0, 1.0]  # e1 keeps its -inf
    # keep=2: both infinities kept at [1]: s = inf + -inf = NaN, nothing agrees, out = base
    got = core_ties(b, "F32", [e0, e1], ["F32", "F32"], 2, 1.0, "F32")
    assert_same(got, ties_ref(b, [e0, e1], 2, 1.0, "F32"))
    assert torch.isnan(got[0]) and got[1:].tolist() == [1.0, 1.0, 1.0 + 8.0, 1.0]
    # keep == 0 keeps nothing, not even NaN or infinite deltas; tau is +inf
    assert core.ties_thresholds_buffers(raw(b), "F32", [raw(e0)], ["F32"], 0) == [inf]
    got = core_ties(b, "F32", [e0, e1], ["F32", "F32"], 0, 1.0, "F32")
    assert got.tolist() == b.tolist()
    # keep >= numel keeps everything; tau is 0
    assert core.ties_thresholds_buffers(raw(b), "F32", [raw(e0)], ["F32"], 99) == [0.0]
    got = core_ties(b, "F32", [e0, e1], ["F32", "F32"], 99, 1.0, "F32")
    assert_same(got, ties_ref(b, [e0, e1], 99, 1.0, "F32"))


def test_many_nans_threshold_is_nan():
    # More NaN deltas than keep: tau is a NaN and exactly the NaNs survive.
    b = torch.zeros(10, dtype=torch.bfloat16)
    e = torch.tensor([float("nan")] * 4 + [1.0] * 6, dtype=torch.bfloat16)
    e_bits = e.view(torch.int16).clone()
    e_bits[1] = 0x7FC1  # NaNs with different payloads
    e_bits[2] = -0x3F  # 0xFFC1
    e = e_bits.view(torch.bfloat16)
    tau = core.ties_thresholds_buffers(raw(b), "BF16", [raw(e)], ["BF16"], 3)[0]
    assert tau != tau
    got = core_ties(b, "BF16", [e], ["BF16"], 3, 1.0, "F32")
    assert torch.isnan(got[:4]).all() and got[4:].tolist() == [0.0] * 6


# ---- threads and chunks --------------------------------------------------------------------------

def test_ties_buffers_threads_identical():
    gen = torch.Generator().manual_seed(77)
    n = 300_001
    base, experts = make_set("BF16", ["BF16", "F16", "F32"], n, gen)
    edts = ["BF16", "F16", "F32"]
    ref = core_ties(base, "BF16", experts, edts, n // 10, 0.7, "BF16", threads=1)
    for threads in (0, 2, 3, 7):
        got = core_ties(base, "BF16", experts, edts, n // 10, 0.7, "BF16", threads=threads)
        assert torch.equal(got.view(torch.int16), ref.view(torch.int16)), threads
        taus = core.ties_thresholds_buffers(raw(base), "BF16", [raw(e) for e in experts], edts, n // 10, threads)
        assert same_floats(taus, ref_thresholds(base, experts, n // 10))


def _write_set(tmp_path, base, experts):
    """All tensors in one file at odd offsets, with padding around them: (base offset, expert
    offsets, path)."""
    path = tmp_path / "in.bin"
    offsets = write_at_offsets(path, [base, *experts])
    return offsets[0], offsets[1:], path


@pytest.mark.parametrize("dset", ["bf16", "mixed", "f32"])
def test_ties_file_equals_buffers(tmp_path, dset):
    gen = torch.Generator().manual_seed(31)
    bdt, edts, odt = DTYPE_SETS[dset]
    osz = SIZE[odt]
    for n, n_ex in ((100_003, 3), (4097, 2), (5, 1), (1, 3)):
        ed = edts[:n_ex]
        base, experts = make_set(bdt, ed, n, gen)
        boff, eoffs, path = _write_set(tmp_path, base, experts)
        out_offset = 11
        with core.InputFile(str(path)) as f:
            for keep in keeps_for(n):
                lam = 0.7
                ref = core_ties(base, bdt, experts, ed, keep, lam, odt, threads=1)
                assert_same(ref, ties_ref(base, experts, keep, lam, odt))
                combos = [(1 << 20, 0), (7, 3), (4096, 2), (10_000, 3), (n, 1)]
                if n <= 5000:
                    combos.append((1, 2))
                for i, (chunk, threads) in enumerate(combos):
                    dst = tmp_path / f"out_{n}_{keep}_{i}.bin"
                    w = core.ShardWriter(str(dst), out_offset + n * osz + 3)
                    core.ties_file((f, boff), bdt, [(f, o) for o in eoffs], ed, w, out_offset, odt, n,
                                   keep, lam, chunk_elems=chunk, threads=threads)
                    w.close(sync=False)
                    got = dst.read_bytes()
                    assert got[:out_offset] == bytes(out_offset)
                    assert got[out_offset:out_offset + n * osz] == raw(ref).tobytes(), (n, keep, chunk, threads)
                    assert got[out_offset + n * osz:] == bytes(3)
                    dst.unlink()


def test_ties_file_separate_files_and_numel_zero(tmp_path):
    gen = torch.Generator().manual_seed(8)
    n = 50_000
    base, experts = make_set("F16", ["F16", "BF16"], n, gen)
    paths = []
    for i, t in enumerate([base, *experts]):
        p = tmp_path / f"t{i}.bin"
        p.write_bytes(raw(t).tobytes())
        paths.append(p)
    files = [core.InputFile(str(p)) for p in paths]
    ref = core_ties(base, "F16", experts, ["F16", "BF16"], 1234, 1.0, "F16")
    w = core.ShardWriter(str(tmp_path / "o.bin"), 2 * n)
    core.ties_file((files[0], 0), "F16", [(files[1], 0), (files[2], 0)], ["F16", "BF16"], w, 0, "F16", n,
                   1234, 1.0, chunk_elems=3333, threads=2)
    core.ties_file((files[0], 0), "F16", [(files[1], 0)], ["F16"], w, 0, "F16", 0, 5, 1.0)  # nothing to do
    w.close(sync=False)
    assert (tmp_path / "o.bin").read_bytes() == raw(ref).tobytes()
    for f in files:
        f.close()


# ---- ties_file's one pass over a sampled bracket ---------------------------------------------------

def _file_ties(tmp_path, path, boff, eoffs, bdt, edts, odt, n, keep, lam, **kw) -> tuple[bytes, dict]:
    """ties_file's output bytes, and how the core's path counters moved during the call."""
    dst = tmp_path / "one.bin"
    before = core.ties_file_stats()
    with core.InputFile(str(path)) as f:
        w = core.ShardWriter(str(dst), n * SIZE[odt])
        core.ties_file((f, boff), bdt, [(f, o) for o in eoffs], edts, w, 0, odt, n, keep, lam, **kw)
        w.close(sync=False)
    after = core.ties_file_stats()
    data = dst.read_bytes()
    dst.unlink()
    return data, {k: after[k] - before[k] for k in after}


@pytest.mark.parametrize("dset", ["bf16", "f16", "f32", "mixed2"])
def test_one_pass_equals_reference(tmp_path, dset):
    """Tensors large enough for the sampled one pass give the exact passes' bytes (which equal the
    reference's values) for every keep,
    chunking and thread count, through the one pass (with records written again where the guess
    was wrong) or its second pass; never through the exact passes here."""
    gen = torch.Generator().manual_seed(41)
    bdt, edts, odt = DTYPE_SETS[dset]
    n = 300_007
    base, experts = make_set(bdt, edts, n, gen)
    boff, eoffs, path = _write_set(tmp_path, base, experts)
    patched = 0
    for keep in (1, 17, n // 5, n // 2, n - 3):
        expected = core_ties(base, bdt, experts, edts, keep, 0.9, odt, threads=1)
        assert_same(expected, ties_ref(base, experts, keep, 0.9, odt))  # NaNs may differ in payload
        ref = raw(expected).tobytes()
        for chunk, threads in ((1 << 20, 0), (10_000, 3)):
            got, moved = _file_ties(tmp_path, path, boff, eoffs, bdt, edts, odt, n, keep, 0.9,
                                    chunk_elems=chunk, threads=threads)
            assert got == ref, (keep, chunk, threads, moved)
            assert moved["one_pass"] + moved["rewritten"] == 1, moved
            patched += moved["patched"]
    if dset == "f32":
        assert patched > 0  # continuous deltas: the guess is off by a few elements, which are rewritten


def test_one_pass_record_budget_falls_back(tmp_path):
    gen = torch.Generator().manual_seed(42)
    n = 200_000
    base, experts = make_set("F32", ["F32", "F32"], n, gen)
    boff, eoffs, path = _write_set(tmp_path, base, experts)
    ref = raw(ties_ref(base, experts, n // 5, 1.0, "F32")).tobytes()
    got, moved = _file_ties(tmp_path, path, boff, eoffs, "F32", ["F32", "F32"], "F32", n, n // 5, 1.0,
                            record_budget=64)
    assert got == ref
    assert moved["fallback_budget"] == 1 and moved["one_pass"] == 0
    got, moved = _file_ties(tmp_path, path, boff, eoffs, "F32", ["F32", "F32"], "F32", n, n // 5, 1.0,
                            record_budget=0)  # 0: the exact passes only
    assert got == ref and not any(moved.values())


def _sampled_blocks(n: int) -> list[tuple[int, int]]:
    """The sample the core reads for n elements (see sample_bracket in csrc/ties.cpp)."""
    nb = -(-max(n // 64, 1 << 14) // 512)
    return [(i * n // nb, i * n // nb + 512) for i in range(nb)]


def test_one_pass_misleading_sample_falls_back(tmp_path):
    """Large deltas exactly where the sample looks, small ones elsewhere: tau lies far below the
    bracket, and the exact passes give the right bytes."""
    gen = torch.Generator().manual_seed(43)
    n = 1 << 17
    base = torch.zeros(n, dtype=torch.float32)
    experts = []
    for _ in range(2):
        d = torch.rand(n, generator=gen) * 1e-3
        for a, b in _sampled_blocks(n):
            d[a:b] = 1.0 + torch.rand(b - a, generator=gen)
        experts.append(base + d)
    boff, eoffs, path = _write_set(tmp_path, base, experts)
    keep = n // 5  # more than the sampled 1/8 of the elements
    ref = raw(ties_ref(base, experts, keep, 1.0, "F32")).tobytes()
    got, moved = _file_ties(tmp_path, path, boff, eoffs, "F32", ["F32", "F32"], "F32", n, keep, 1.0)
    assert got == ref
    assert moved["fallback_miss"] == 1 and moved["one_pass"] == 0


def test_one_pass_heavy_value_decided_wrong_rewrites(tmp_path):
    """|d| takes two values, each shared by half the elements; the sample puts the keep-th largest
    on the upper one, the whole tensor on the lower one: every element of a heavy value changes
    its decision, and the second pass writes the output again under the exact threshold."""
    n = 1 << 17
    base = torch.zeros(n, dtype=torch.bfloat16)
    sign = torch.where(torch.arange(n) % 3 == 0, -1.0, 1.0)
    d = torch.where(torch.arange(n) % 2 == 0, 0.5, 0.25)
    for i in range(10):  # ten upper values turned lower, none of them sampled
        d[i * 4096 + 1000] = 0.25
    expert = (sign * d).to(torch.bfloat16)
    boff, eoffs, path = _write_set(tmp_path, base, [expert])
    keep = n // 2 - 5  # > the 65526 upper values: tau is the lower one
    ref = raw(ties_ref(base, [expert], keep, 1.0, "BF16")).tobytes()
    got, moved = _file_ties(tmp_path, path, boff, eoffs, "BF16", ["BF16"], "BF16", n, keep, 1.0)
    assert got == ref
    assert moved["rewritten"] == 1, moved


def quantized_set(n: int, levels: int, n_experts: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A BF16 base and experts whose |d| takes ``levels`` distinct values (exact in bfloat16), each
    shared by many elements, with random signs: like the deltas of 16-bit checkpoints."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.arange(levels, dtype=torch.float32)
    values = torch.pow(2.0, -(k // 128)) * (1 + (k % 128) / 128)
    base = (torch.randn(n, generator=gen) * 0.02).to(torch.bfloat16)
    experts = []
    for _ in range(n_experts):
        pick = torch.randint(0, levels, (n,), generator=gen)
        sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
        experts.append((base.float() + sign * values[pick] * 0.01).to(torch.bfloat16))
    return base, experts


@pytest.mark.parametrize("levels", [2, 30, 200, 1000])
def test_one_pass_with_quantized_deltas_equals_exact_passes(tmp_path, levels):
    """|d| takes `levels` distinct values, each shared by many elements (as in 16-bit checkpoints):
    the bracket then holds none to several heavy values, and the one pass, whichever number of
    heavy values its loop compares with, gives the exact passes' bytes."""
    n = 1 << 17
    base, experts = quantized_set(n, levels, 2, seed=44)
    boff, eoffs, path = _write_set(tmp_path, base, experts)
    for keep in (n // 5, n // 2):
        exact, _ = _file_ties(tmp_path, path, boff, eoffs, "BF16", ["BF16"] * 2, "BF16", n, keep, 1.0,
                              record_budget=0)
        assert_same(from_raw(exact, "BF16"), ties_ref(base, experts, keep, 1.0, "BF16"))
        got, moved = _file_ties(tmp_path, path, boff, eoffs, "BF16", ["BF16"] * 2, "BF16", n, keep, 1.0)
        assert got == exact, (keep, moved)
        assert moved["one_pass"] + moved["rewritten"] == 1, moved


def _both_loops(run):
    """run() with the BF16 merge loop in its AVX-512 form (where the CPU has it) and its portable
    form."""
    fast = run()
    core._set_ties_simd_enabled(False)
    try:
        portable = run()
    finally:
        core._set_ties_simd_enabled(True)
    return fast, portable


@pytest.mark.parametrize("n_experts", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("n", [15, 16, 100_003])
def test_bf16_merge_loops_agree_with_each_other_and_the_reference(n_experts, n):
    """Both forms of the BF16 loop, over whole vectors and a tail, 1-4 experts (5 take the
    generic loop), NaN/inf/zero deltas and all three-expert agreements (density 0.5 and 1)."""
    gen = torch.Generator().manual_seed(45 + n_experts)
    base, experts = make_set("BF16", ["BF16"] * n_experts, n, gen)
    for keep in (n // 5, n // 2, n):
        args = (raw(base), "BF16", [raw(e) for e in experts], ["BF16"] * n_experts)

        def run():
            out = np.zeros(2 * n, np.uint8)
            core.ties_buffers(*args, out, "BF16", keep, 0.9)
            return out.tobytes()

        fast, portable = _both_loops(run)
        assert fast == portable, (keep, n_experts, n)
        assert_same(from_raw(fast, "BF16"),
                    ties_ref(base, experts, keep, 0.9, "BF16"))


@pytest.mark.parametrize("levels", [2, 30, 1000])
def test_bf16_merge_loops_agree_in_the_one_pass(tmp_path, levels):
    """The one pass's bracket counts and flags, from both forms of the loop, give the same bytes
    and the same route."""
    n = (1 << 17) + 5
    base, experts = quantized_set(n, levels, 3, seed=46)
    boff, eoffs, path = _write_set(tmp_path, base, experts)
    for keep in (n // 5, n // 2):
        (fast, fast_route), (portable, portable_route) = _both_loops(
            lambda: _file_ties(tmp_path, path, boff, eoffs, "BF16", ["BF16"] * 3, "BF16", n, keep, 1.0))
        assert fast == portable and fast_route == portable_route, (keep, fast_route, portable_route)
        assert fast_route["one_pass"] + fast_route["rewritten"] == 1
        # and against the reference, so the test holds where both runs take the same loop
        assert_same(from_raw(fast, "BF16"), ties_ref(base, experts, keep, 1.0, "BF16"))


# ---- errors --------------------------------------------------------------------------------------

def test_ties_buffers_errors():
    a = raw(torch.ones(10, dtype=torch.bfloat16))
    out = np.zeros(20, np.uint8)
    with pytest.raises(CoreError, match="ties_buffers: at least one expert is required"):
        core.ties_buffers(a, "BF16", [], [], out, "BF16", 1, 1.0)
    with pytest.raises(CoreError, match="ties_thresholds_buffers: at least one expert is required"):
        core.ties_thresholds_buffers(a, "BF16", [], [], 1)
    with pytest.raises(CoreError, match="expert_dtypes has 1 entries but experts has 2"):
        core.ties_buffers(a, "BF16", [a, a], ["BF16"], out, "BF16", 1, 1.0)
    with pytest.raises(CoreError, match="base_dtype: unknown dtype 'bfloat16'"):
        core.ties_buffers(a, "bfloat16", [a], ["BF16"], out, "BF16", 1, 1.0)
    with pytest.raises(CoreError, match=r"expert_dtypes\[0\]: unsupported dtype 'I16'"):
        core.ties_thresholds_buffers(a, "BF16", [a], ["I16"], 1)
    with pytest.raises(CoreError, match="out_dtype: unknown dtype 'X'"):
        core.ties_buffers(a, "BF16", [a], ["BF16"], out, "X", 1, 1.0)
    with pytest.raises(CoreError, match=r"ties_buffers: experts\[1\] has 20 bytes but 10 elements of F32 need 40"):
        core.ties_buffers(a, "BF16", [a, a], ["BF16", "F32"], out, "BF16", 1, 1.0)
    with pytest.raises(CoreError, match=r"ties_buffers: base has 20 bytes but 5 elements of BF16 need 10"):
        core.ties_buffers(a, "BF16", [a], ["BF16"], np.zeros(20, np.uint8), "F32", 1, 1.0)
    with pytest.raises(CoreError, match="not a multiple of 4"):
        core.ties_buffers(a, "BF16", [a], ["BF16"], np.zeros(6, np.uint8), "F32", 1, 1.0)
    with pytest.raises(CoreError, match="ties_thresholds_buffers: base has 3 bytes, not a multiple of 2"):
        core.ties_thresholds_buffers(b"abc", "BF16", [a], ["BF16"], 1)
    with pytest.raises(CoreError, match="read-only"):
        core.ties_buffers(a, "BF16", [a], ["BF16"], bytes(20), "BF16", 1, 1.0)
    with pytest.raises(CoreError, match=r"keep must be >= 0 \(got -1\)"):
        core.ties_buffers(a, "BF16", [a], ["BF16"], out, "BF16", -1, 1.0)
    with pytest.raises(TypeError):
        core.ties_buffers(a, "BF16", [a], ["BF16"], out, "BF16", 1, "x")
    with pytest.raises(TypeError):
        core.ties_buffers(a, "BF16", [object()], ["BF16"], out, "BF16", 1, 1.0)
    with pytest.raises(CoreError) as ei:
        core.ties_buffers(a, "BF16", [a], ["BF16"], out, "BF16", 1, 1.0, threads=2 ** 70)
    assert "threads" in one_line(ei.value)
    assert out.tobytes() == bytes(20)  # nothing written by the failed calls
    # zero elements are fine
    core.ties_buffers(b"", "BF16", [b""], ["BF16"], bytearray(), "F32", 3, 1.0)
    assert core.ties_thresholds_buffers(b"", "BF16", [b""], ["BF16"], 0) == [float("inf")]


def test_ties_file_errors(tmp_path):
    gen = torch.Generator().manual_seed(2)
    base, experts = make_set("BF16", ["BF16"], 100, gen, specials=False)
    boff, eoffs, path = _write_set(tmp_path, base, experts)
    f = core.InputFile(str(path))
    w = core.ShardWriter(str(tmp_path / "o.bin"), 200)
    ok = dict(base=(f, boff), base_dtype="BF16", experts=[(f, eoffs[0])], expert_dtypes=["BF16"], out=w,
              out_offset=0, out_dtype="BF16", numel=100, keep=10, lam=1.0)

    def call(**kw):
        core.ties_file(**{**ok, **kw})

    with pytest.raises(CoreError, match=r"ties_file: experts\[0\]: 103 elements of BF16 \(206 bytes\) at offset "
                                        rf"{eoffs[0]} run past the end"):
        call(numel=103)
    with pytest.raises(CoreError, match=r"ties_file: base: 100 elements of F32 \(400 bytes\) at offset "
                                        rf"{eoffs[0]} run past the end of .*in\.bin \(417 bytes\)"):
        call(base=(f, eoffs[0]), base_dtype="F32")
    with pytest.raises(CoreError, match=r"ties_file: writing .*o\.bin: range \[2, 2 \+ 200\) is outside the file"):
        call(out_offset=2)
    with pytest.raises(CoreError, match="overflow"):
        call(numel=2 ** 63 + 5)
    with pytest.raises(CoreError, match="numel is out of range"):
        call(numel=2 ** 64)
    with pytest.raises(CoreError, match="out_offset must be >= 0"):
        call(out_offset=-2)
    with pytest.raises(CoreError, match="keep must be >= 0"):
        call(keep=-2)
    with pytest.raises(CoreError, match=r"ties_file: chunk_elems must be >= 1 \(got 0\)"):
        call(chunk_elems=0)
    with pytest.raises(CoreError, match="ties_file: at least one expert is required"):
        call(experts=[], expert_dtypes=[])
    with pytest.raises(CoreError, match="expert_dtypes has 2 entries but experts has 1"):
        call(expert_dtypes=["BF16", "BF16"])
    with pytest.raises(CoreError, match=r"expert_dtypes\[0\]: unknown dtype 'bf16'"):
        call(expert_dtypes=["bf16"])
    with pytest.raises(CoreError, match="out_dtype: unsupported dtype 'U8'"):
        call(out_dtype="U8")
    with pytest.raises(TypeError):
        call(experts=[f])
    with pytest.raises(TypeError):
        call(base=f)
    assert (tmp_path / "o.bin").read_bytes() == bytes(200)  # nothing written by the failed calls
    f.close()
    with pytest.raises(CoreError, match="ties_file: reading: .*in.bin is closed"):
        call()
    w.close()
    f = core.InputFile(str(path))
    with pytest.raises(CoreError, match="ties_file: writing: .*o.bin is closed"):
        call(base=(f, boff), experts=[(f, eoffs[0])])
    f.close()


def test_ties_file_truncated_input(tmp_path):
    gen = torch.Generator().manual_seed(6)
    n = 200_000
    base, experts = make_set("BF16", ["BF16", "BF16"], n, gen, specials=False)
    boff, eoffs, path = _write_set(tmp_path, base, experts)
    f = core.InputFile(str(path))
    os.truncate(path, eoffs[1] + 1000)
    w = core.ShardWriter(str(tmp_path / "o.bin"), 2 * n)
    for threads in (1, 3):
        with pytest.raises(CoreError, match="was truncated while in use") as ei:
            core.ties_file((f, boff), "BF16", [(f, o) for o in eoffs], ["BF16", "BF16"], w, 0, "BF16", n,
                           n // 2, 0.5, chunk_elems=4096, threads=threads)
        assert str(path) in one_line(ei.value)
    w.abort()
    f.close()


def test_gil_released_during_ties():
    gen = torch.Generator().manual_seed(12)
    n = 1 << 19
    base, experts = make_set("BF16", ["BF16", "BF16"], n, gen, specials=False)
    ref = core_ties(base, "BF16", experts, ["BF16", "BF16"], n // 5, 1.0, "BF16", threads=1)
    outs = [np.zeros(2 * n, np.uint8) for _ in range(4)]
    run_in_threads(core.ties_buffers, [(raw(base), "BF16", [raw(e) for e in experts], ["BF16", "BF16"], o, "BF16",
                                        n // 5, 1.0, 1) for o in outs])
    for o in outs:
        assert o.tobytes() == raw(ref).tobytes()
