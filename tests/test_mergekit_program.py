"""The core's mergekit programs (``_core.mk_program``) against the numpy steps they replace
(``mergekit_ops`` with ``IN_CORE`` off, themselves checked against mergekit in test_mergekit.py):
the same bytes, on 1 and 2 threads, with chunks and pieces small enough that the rank bands' tie
counts cross chunk boundaries; and bad programs refused with CoreError."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import layerswap_fast as ls
from layerswap_fast import _core
from layerswap_fast.engine import mergekit_ops, mergekit_program
import test_mergekit
from support import load_tensors, raw_bytes


trios = test_mergekit.trios  # the same module-scoped pico trios


def configs(trio: dict[str, Path], dtype: str) -> dict[str, dict[str, Any]]:
    """test_mergekit's configs, and DARE without rescaling (its masks are the core's too)."""
    a, b, c, base = (str(trio[r]) for r in ("a", "b", "c", "base"))
    return {**test_mergekit.configs(trio, dtype),
            "dare_ties": {"models": [{"model": a, "parameters": {"weight": 0.6, "density": 0.5}},
                                     {"model": b, "parameters": {"weight": 0.4, "density": 0.4}}],
                          "base_model": base, "merge_method": "dare_ties", "dtype": dtype,
                          "parameters": {"rescale": False}},
            "sce_all": {**test_mergekit.configs(trio, dtype)["sce"], "parameters": {"select_topk": 1.0}},
            "dare_linear": {"models": [{"model": a, "parameters": {"weight": 0.6, "density": 0.3}},
                                       {"model": b, "parameters": {"weight": 0.4, "density": 0.7}}],
                            "base_model": base, "merge_method": "dare_linear", "dtype": dtype},
            "della": {"models": [{"model": a, "parameters": {"weight": 0.6, "density": 0.5, "epsilon": 0.2}},
                                 {"model": b, "parameters": {"weight": 0.4, "density": 0.4, "epsilon": 0.1}}],
                      "base_model": base, "merge_method": "della", "dtype": dtype},
            "della_linear": {"models": [{"model": a, "parameters": {"weight": 0.6, "density": 0.3, "epsilon": 0.1}},
                                        {"model": b, "parameters": {"weight": 0.4, "density": 0.7, "epsilon": 0.25}}],
                             "base_model": base, "merge_method": "della_linear", "dtype": dtype,
                             "parameters": {"lambda": 0.9, "normalize": True}},
            "della_zero": {"models": [{"model": a, "parameters": {"weight": 0.6, "density": 0.5, "epsilon": 0.1}},
                                      {"model": b, "parameters": {"weight": 0.4, "density": 0.0, "epsilon": 0.1}},
                                      {"model": c, "parameters": {"weight": 0.3, "density": 1.0, "epsilon": 0.1}}],
                           "base_model": base, "merge_method": "della", "dtype": dtype}}


def run(config: dict[str, Any], out: Path, threads: int) -> dict[str, torch.Tensor]:
    ls.api.run_mergekit_config(config, out, copy_tokenizer=False, threads=threads)
    return load_tensors(out)


@pytest.fixture(scope="module")
def wide_trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A three-layer trio whose MLP matrices (384 x 768) and q and o (384 x 384) hold more than one
    group of torch's sum."""
    from support import make_llama_trio
    return make_llama_trio(tmp_path_factory.mktemp("wide"), num_layers=3, hidden=384, roles=("base", "a", "b", "c"),
                           shard="1GB")


@pytest.mark.parametrize("method", ["sce", "model_stock", "nuslerp", "slerp"])
def test_whole_tensor_sums_over_segments_write_the_numpy_steps_bytes(wide_trio: dict[str, Path], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     method: str) -> None:
    """The methods whose sums span a tensor (sce's mean squares with its variance band and kept
    mask, model_stock's and the slerps' dot products), on tensors of several groups of torch's
    sum, so that every thread sums whole groups of them, write the numpy steps' bytes; with chunks
    of 4096 elements the band's tie counts start each segment 32 chunks in."""
    config = configs(wide_trio, "bfloat16")[method]
    monkeypatch.setattr(mergekit_ops, "IN_CORE", False)
    want = run(config, tmp_path / "numpy", 1)
    monkeypatch.setattr(mergekit_ops, "IN_CORE", True)
    monkeypatch.setattr(mergekit_program, "CHUNK", 4096)
    tensors_over_a_group = [n for n, t in want.items() if t.numel() > 131072]
    assert len(tensors_over_a_group) == 15  # q, o and the three MLP matrices of each layer
    for threads in (1, 2):
        got = run(config, tmp_path / f"core{threads}", threads)
        assert [n for n in want if raw_bytes(got[n]) != raw_bytes(want[n])] == [], threads


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
@pytest.mark.parametrize("method", ["linear", "linear_slices", "task_arithmetic", "ties", "breadcrumbs_ties",
                                    "breadcrumbs", "dare_ties", "dare_linear", "della", "della_linear", "della_zero", "slerp", "nuslerp", "nuslerp_without_base",
                                    "model_stock", "nearswap", "passthrough", "sce", "sce_all", "multislerp",
                                    "multislerp_without_base", "ram", "ramplus_tl"])
def test_core_programs_write_the_numpy_steps_bytes(trios: dict[str, dict[str, Path]], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, method: str, dtype: str) -> None:
    config = configs(trios[dtype], {"bf16": "bfloat16", "f32": "float32"}[dtype])[method]
    monkeypatch.setattr(mergekit_ops, "CHUNK", 1000)  # odd chunks: ties counted and L1 sums split across them
    monkeypatch.setattr(mergekit_ops, "IN_CORE", False)
    want = run(config, tmp_path / "numpy", 1)
    monkeypatch.setattr(mergekit_ops, "IN_CORE", True)
    monkeypatch.setattr(mergekit_program, "CHUNK", 1000)
    monkeypatch.setattr(mergekit_program, "PIECE_BYTES", 5000)
    for threads in (1, 2):
        got = run(config, tmp_path / f"core{threads}", threads)
        assert set(got) == set(want)
        assert [n for n in want if raw_bytes(got[n]) != raw_bytes(want[n])] == [], threads


def _slices(tmp_path: Path, values: np.ndarray) -> tuple[Any, int]:
    path = tmp_path / "x.bin"
    path.write_bytes(values.astype("<f4").tobytes())
    return _core.InputFile(str(path)), 0


def _stable_band(mags: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """1 where an element's place in a stable descending sort of its magnitude lies in [lo, hi)."""
    keep = np.zeros(len(mags), dtype=np.float32)
    keep[np.argsort(-mags, kind="stable")[lo:hi]] = 1
    return keep


def _core_band(tmp_path: Path, x: np.ndarray, dtype: str, lo: int, hi: int, threads: int) -> np.ndarray:
    """kMkRank's mask over x stored in dtype, with rank_bands' thresholds and tie counts."""
    from types import SimpleNamespace
    path = tmp_path / "x.bin"
    path.write_bytes(raw_bytes(torch.from_numpy(x).to(torch.bfloat16 if dtype == "BF16" else torch.float32)))
    specs = [SimpleNamespace(numel=len(x), dtype=dtype)]
    inputs = [(_core.InputFile(str(path)), 0)]
    c = "BF16" if dtype == "BF16" else None
    band = mergekit_program.rank_bands([(lo, hi)], lambda p: [p.read(0)], lambda: mergekit_program.Program(c, [dtype]),
                                       specs, inputs, threads)[0]
    p = mergekit_program.Program(c, [dtype])
    p.store(p.rank(p.read(0), band))
    out = tmp_path / "mask.bin"
    out.unlink(missing_ok=True)
    writer = _core.ShardWriter(str(out), len(x) * 4)
    mergekit_program.write(p, specs, inputs, threads, writer, 0, "F32", lambda *_: None)
    writer.close()
    return np.frombuffer(out.read_bytes(), dtype=np.float32)


@pytest.mark.parametrize("dtype", ["BF16", "F32"])
@pytest.mark.parametrize("band", [(0, 2500), (700, 5200), (0, 1), (6999, 7000), (0, 7000), (3000, 3001)])
@pytest.mark.parametrize("threads", [1, 2])
def test_rank_bands_keep_the_stable_descending_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str,
                                                    band: tuple[int, int], threads: int) -> None:
    """A rank band keeps exactly the elements whose place in a stable descending sort by magnitude
    (the lower index first among equals) lies in it. Few distinct magnitudes: the band's edges are
    long runs of ties crossing blocks, chunks and pieces, their counts per chunk read from the
    chunks' own histograms."""
    monkeypatch.setattr(mergekit_program, "CHUNK", 1000)
    monkeypatch.setattr(mergekit_program, "PIECE_BYTES", 5000)
    x = (np.random.default_rng(5).integers(-6, 7, 7000) * 0.375).astype(np.float32)
    got = _core_band(tmp_path, x, dtype, *band, threads)
    assert np.array_equal(got, _stable_band(np.abs(x), *band))


@pytest.mark.parametrize("dtype", ["BF16", "F32"])
@pytest.mark.parametrize("threads", [1, 2])
def test_rank_band_ties_are_counted_where_a_chunk_has_too_many_magnitudes_to_keep(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str, threads: int) -> None:
    """A first chunk with more distinct magnitudes in the histogram that places the band's edge
    than a chunk's histogram keeps (4096): bfloat16 magnitudes over many binades (the one pass's
    bins), or float32 ones a few ulps apart (the second pass's bins, within the edge's high
    bits). The ties at the edge (1.5, in the later chunks) are counted by a pass of their own,
    with the same result."""
    monkeypatch.setattr(mergekit_program, "CHUNK", 6000)
    monkeypatch.setattr(mergekit_program, "PIECE_BYTES", 24000)
    rng = np.random.default_rng(9)
    if dtype == "BF16":
        spread = torch.from_numpy(np.exp2(rng.uniform(-60, 60, 6000)).astype(np.float32)).bfloat16().float().numpy()
        bins = spread.view(np.uint32) >> 16
    else:
        spread = (np.float32(1.5) * (1 + np.arange(1, 6001) * np.float32(2.0**-23))).astype(np.float32)
        bins = spread.view(np.uint32) & 0xFFFF
        assert len(np.unique(spread.view(np.uint32) >> 16)) == 1
    assert len(np.unique(bins)) > 4096
    x = np.concatenate([spread * rng.choice([-1, 1], 6000), rng.choice([-1.5, 1.5, 0.25], 12000)]).astype(np.float32)
    above = int((np.abs(x) > 1.5).sum())
    for lo, hi in ((0, above + 1500), (above + 10, above + 3000)):
        got = _core_band(tmp_path, x, dtype, lo, hi, threads)
        assert np.array_equal(got, _stable_band(np.abs(x), lo, hi)), (lo, hi)


@pytest.mark.parametrize("distinct, kept", [(4096, True), (4097, False)])
@pytest.mark.parametrize("threads", [1, 2])
def test_segment_histograms_are_each_segments_bins_up_to_4096(tmp_path: Path, distinct: int, kept: bool,
                                                              threads: int) -> None:
    """``task_hists``: each segment's non-zero bins of |x|'s high 16 bits with their counts, as
    numpy counts them; a slot with a segment of more than 4096 distinct bins has none."""
    rng = np.random.default_rng(distinct)
    segment = 10000
    bits = (np.arange(distinct, dtype=np.uint32) + 0x2000) << 16  # 'distinct' bins in the first segment
    first = rng.permutation(np.concatenate([bits, rng.choice(bits, segment - distinct)])).view(np.float32)
    x = np.concatenate([-first, rng.choice([0.5, -2.0, 3.0], 2 * segment + 17).astype(np.float32)])
    p = mergekit_program.Program(None, ["F32"])
    p.hist_high(p.read(0))
    _, hists, _, tables = _core.mk_program([_slices(tmp_path, x)], ["F32"], len(x), p.code, p.consts, p.ints, p.ranks,
                                           None, 0, "F32", chunk_elems=3000, segment_elems=segment,
                                           threads=threads, task_hists=True)
    high = np.abs(x).view(np.uint32) >> 16
    assert np.array_equal(hists[0], np.bincount(high, minlength=65536))
    if not kept:
        assert tables == [None]
        return
    offsets, entries = tables[0]
    assert len(offsets) == 5  # four segments, the last of 17
    for t in range(4):
        bins, counts = np.unique(high[t * segment:(t + 1) * segment], return_counts=True)
        got = entries[offsets[t]:offsets[t + 1]]
        assert np.array_equal(got >> np.uint64(32), bins) and np.array_equal(got & np.uint64(0xFFFFFFFF), counts), t


def _summed(tmp_path: Path, n: int) -> tuple[np.ndarray, Any, mergekit_program.Program, int]:
    """n float32 values over many binades, their file, and a program that reads and sums them
    (and the register read)."""
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * rng.uniform(0.1, 100, n)).astype(np.float32)
    p = mergekit_program.Program(None, ["F32"])
    v = p.read(0)
    p.sum(v)
    return x, _slices(tmp_path, x), p, v


@pytest.mark.parametrize("n", [1, 7, 8, 31, 33, 1000, 4099, 70001])
@pytest.mark.parametrize("threads", [1, 2])
def test_sums_and_norms_in_torch_order(tmp_path: Path, n: int, threads: int) -> None:
    """Sum and norm slots equal torch's own ``sum`` and ``vector_norm`` on one thread, and the
    Python replay (torch_rounding) for every segment."""
    from layerswap_fast.engine.torch_rounding import torch_norm, torch_sum
    x, f, p, v = _summed(tmp_path, n)
    p.norm(v)
    for segment in (n, max(1, n // 3)):
        sums, _, _ = _core.mk_program([f], ["F32"], n, p.code, p.consts, p.ints, p.ranks, None, 0, "F32",
                                      chunk_elems=max(1, segment // 2 + 1), segment_elems=segment, threads=threads)
        for t in range(len(sums)):
            part = x[t * segment:(t + 1) * segment]
            assert sums[t, 0] == torch_sum(part) and sums[t, 1] == torch_norm(part), (segment, t)
    torch.set_num_threads(1)
    sums, _, _ = _core.mk_program([f], ["F32"], n, p.code, p.consts, p.ints, p.ranks, None, 0, "F32",
                                  chunk_elems=997, segment_elems=n, threads=threads)
    t = torch.from_numpy(x)
    assert sums[0, 0] == t.sum().item()
    assert sums[0, 1] == torch.linalg.vector_norm(t).item()


@pytest.mark.parametrize("models", [1, 2, 3, 4])
def test_population_variance_is_torchs(tmp_path: Path, models: int) -> None:
    """VarPop across models equals ``torch.var(dim=0, unbiased=False)`` of their float32 values
    (Welford in float64) bit for bit, whether the count divides exactly (a power of two) or not,
    signed zeros, infinities, NaN and the float32 extremes included."""
    n = 4099
    rng = np.random.default_rng(models)
    xs = [(rng.standard_normal(n) * rng.uniform(0.01, 100, n)).astype(np.float32) for _ in range(models)]
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, -3.4e38, 1e-45], dtype=np.float32)
    for i, x in enumerate(xs):
        x[:64] = np.roll(np.repeat(special, 8), 3 * i)  # the models' specials meet in different pairs
    path = tmp_path / "x.bin"
    path.write_bytes(b"".join(x.tobytes() for x in xs))
    f = _core.InputFile(str(path))
    p = mergekit_program.Program(None, ["F32"] * models)
    p.store(p.var_pop([p.read(i) for i in range(models)]))
    out = tmp_path / "out.bin"
    writer = _core.ShardWriter(str(out), n * 4)
    _core.mk_program([(f, i * n * 4) for i in range(models)], ["F32"] * models, n, p.code, p.consts, p.ints,
                     p.ranks, writer, 0, "F32", chunk_elems=1000, segment_elems=1000, threads=2)
    writer.close()
    want = torch.var(torch.from_numpy(np.stack(xs)), dim=0, unbiased=False).numpy()
    got = np.frombuffer(out.read_bytes(), dtype=np.float32)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.array_equal(got[~np.isnan(got)].view(np.uint32), want[~np.isnan(want)].view(np.uint32))


@pytest.mark.parametrize("n, threads", [(1, 1), (70001, 2), (3 * 131072, 1), (3 * 131072 + 5, 2), (2_000_037, 1),
                                        (2_000_037, 2), (2 ** 24 + 2 ** 20 + 7, 2)])
def test_whole_sums_over_segments_are_torchs_one_sum(tmp_path: Path, n: int, threads: int) -> None:
    """With whole_sums, a sum over the tensor worked on in segments of whole groups (131072
    elements up to 2^24: torch's 4-level cascade of 16-row blocks of 32 lanes; 2^20 beyond, with
    blocks of 32 rows that a segment alone would not have) by every thread is torch's own
    single-threaded ``sum`` bit for bit, and the one-segment sum; the last segment holds a partial
    group, partial block rows and the scalar tail. Norms cannot be split, and segments must be
    whole groups."""
    from layerswap_fast.engine.torch_rounding import TorchSum
    x, f, p, v = _summed(tmp_path, n)
    p.sum(p.mul(v, v))
    group = TorchSum(n).group
    assert group == (131072 if n < 2 ** 24 else 1 << 20)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = [torch.from_numpy(x).sum().item(), torch.from_numpy(x * x).sum().item()]
    finally:
        torch.set_num_threads(torch_threads)
    one, _, _ = _core.mk_program([f], ["F32"], n, p.code, p.consts, p.ints, p.ranks, None, 0, "F32",
                                 chunk_elems=65536, segment_elems=n, threads=threads)
    assert list(one[0]) == want
    for segment in (group, 2 * group, 8 * group):
        sums, _, _ = _core.mk_program([f], ["F32"], n, p.code, p.consts, p.ints, p.ranks, None, 0, "F32",
                                      chunk_elems=65536 + 3, segment_elems=segment, threads=threads, whole_sums=True)
        assert list(sums[0]) == want, segment
        assert not sums[1:].any()
    if n > group:
        with pytest.raises(_core.CoreError, match=f"whole groups of {group} elements, not {group // 2}"):
            _core.mk_program([f], ["F32"], n, p.code, p.consts, p.ints, p.ranks, None, 0, "F32",
                             segment_elems=group // 2, threads=threads, whole_sums=True)
    p.norm(v)
    p.sum64(v)
    with pytest.raises(_core.CoreError, match="sum slots are all Sum or Norm"):
        _core.mk_program([f], ["F32"], n, p.code, p.consts, p.ints, p.ranks, None, 0, "F32",
                         segment_elems=group, threads=threads, whole_sums=True)


@pytest.mark.parametrize("n, threads", [(1, 2), (70001, 2), (3 * 131072 + 5, 2), (2_000_037, 1), (2_000_037, 2)])
def test_whole_norms_over_segments_are_torchs_one_norm(tmp_path: Path, n: int, threads: int) -> None:
    """With whole_sums, Norm slots beside a Sum are worked on in segments by every thread, each
    segment's operands added in segment order whichever worker finishes first: torch's own
    single-threaded ``vector_norm`` bit for bit, and the sum still torch's. A segment whose
    operands would exceed what a worker keeps is refused, naming the limit."""
    from layerswap_fast.engine.torch_rounding import TorchSum
    x, f, p, v = _summed(tmp_path, n)
    p.norm(v)
    p.norm(p.mul(v, p.const(0.5)))
    group = TorchSum(n).group
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = torch.from_numpy(x)
        want = [t.sum().item(), torch.linalg.vector_norm(t).item(), torch.linalg.vector_norm(t * 0.5).item()]
    finally:
        torch.set_num_threads(torch_threads)
    for segment in (group, 3 * group):
        sums, _, _ = _core.mk_program([f], ["F32"], n, p.code, p.consts, p.ints, p.ranks, None, 0, "F32",
                                      chunk_elems=65536 + 3, segment_elems=segment, threads=threads, whole_sums=True)
        assert list(sums[0]) == want, segment
        assert not sums[1:].any()
    if n > 1_500_000:
        p.norm(v)
        with pytest.raises(_core.CoreError, match=r"at most 4194304 elements over its 3 Norm slots, not 1572864 each"):
            _core.mk_program([f], ["F32"], n, p.code, p.consts, p.ints, p.ranks, None, 0, "F32",
                             segment_elems=12 * 131072, threads=threads, whole_sums=True)


@pytest.mark.parametrize("chunk, segment", [(997, 5000), (512, 4096), (3, 50), (1, 7), (8, 8)])
@pytest.mark.parametrize("threads", [1, 2])
def test_float64_sums_add_in_eight_lanes(tmp_path: Path, chunk: int, segment: int, threads: int) -> None:
    """Sum64 adds as ``mergekit_ops.lane_sum`` defines (element e of a segment into lane e % 8,
    each lane in order, then the lanes in order), whatever the chunks: values of very different
    magnitudes, so that another order gives another float64 sum."""
    rng = np.random.default_rng(chunk)
    n = 3 * segment + 5
    x = (rng.standard_normal(n) * np.exp2(rng.integers(-60, 60, n))).astype(np.float32)
    p = mergekit_program.Program(None, ["F32"])
    p.sum64(p.read(0))
    sums, _, _ = _core.mk_program([_slices(tmp_path, x)], ["F32"], n, p.code, p.consts, p.ints, p.ranks, None, 0, "F32",
                                  chunk_elems=chunk, segment_elems=segment, threads=threads)
    parts = [x[t * segment:(t + 1) * segment] for t in range(len(sums))]
    assert [s[0] for s in sums] == [mergekit_ops.lane_sum(part) for part in parts]
    if segment > 8:  # up to 8 elements the lanes are the element order
        assert any(mergekit_ops.lane_sum(part) != float(np.cumsum(part, dtype=np.float64)[-1]) for part in parts)


@pytest.mark.parametrize("code", [[(99, 0, 0)], [(0, 0, 5)], [(0, 70, 0)], [(0, 0, 0), (2, 0, 0, 99)],
                                  [(0, 0, 0), (20, 0, 0, 0), (21, 0, 0, 0)], [(0, -1, 0)], [(0, 0, 0), (19, 0, 0)],
                                  [(0, 0, 0), (30, 1, 0, 0, 0)]])
def test_bad_programs_are_core_errors(tmp_path: Path, code: list[tuple[int, ...]]) -> None:
    f = _slices(tmp_path, np.ones(10, dtype=np.float32))
    with pytest.raises(_core.CoreError):
        _core.mk_program([f], ["F32"], 10, code, [], [], [], None, 0, "F32")


@pytest.mark.parametrize("p", [0.0, -1.0, 2.0**-60, 0.3, 0.5, 1 - 2.0**-53, 1.0, 1.5, float("nan")])
@pytest.mark.parametrize("threads", [1, 2])
def test_uniform_masks_are_the_counter_streams(tmp_path: Path, p: float, threads: int) -> None:
    """kMkUniformLt compares integers; it keeps exactly where counter_random's float64 draw < p."""
    from layerswap_fast.engine.counter_random import stream_key, uniform
    n = 5003
    f = _slices(tmp_path, np.ones(n, dtype=np.float32))
    prog = mergekit_program.Program(None, ["F32"])
    key = stream_key(7, "model.layers.0.mlp.up_proj.weight", 1)
    prog.sum64(prog.mul(prog.uniform_lt(key, p), prog.const(1.0)))
    for first, base in ((0, 0), (1, 10**12)):
        sums, _, _ = _core.mk_program([f], ["F32"], n, prog.code, prog.consts, prog.ints, prog.ranks, None, 0, "F32",
                                      chunk_elems=1000, segment_elems=1, index_base=base, threads=threads)
        assert [bool(x) for x in sums[:, 0]] == list(uniform(key, base, n) < p), first


@pytest.mark.parametrize("cols, step", [(1, 0.25), (3, 0.25), (64, 0.25), (700, 0.25), (2048, 0.25),
                                        (700, 0.1), (2048, 0.1), (65537, 0.25), (700, 0.0), (2048, 0.0)])
@pytest.mark.parametrize("threads", [1, 2])
def test_della_masks_are_the_numpy_rows(tmp_path: Path, cols: int, step: float, threads: int) -> None:
    """kMkDellaLt keeps exactly where the numpy path's draw falls below its per-row probabilities
    (ranks by ascending |x|, the lower index first among equal magnitudes: few distinct values
    here, so most are tied), over chunks of several rows, across segments and an index base.
    Multiples of 0.25 share their low 16 bits, as bfloat16 magnitudes do (few bins to count);
    multiples of 0.1 differ in every byte (too many bins: sorted); step 0 stands for magnitudes
    a few float32 ulps above 1, which differ only in their lowest bits; one row is longer than 16
    bits of index."""
    from layerswap_fast.engine.counter_random import stream_key, uniform
    rows = max(3, 6000 // cols)
    rng = np.random.default_rng(cols)
    n = rng.integers(-8, 9, rows * cols)
    if step:
        x = (n * np.float32(step)).astype(np.float32)
    else:
        x = np.where(n == 0, 0, np.sign(n) * (1 + np.abs(n) * 2.0**-23)).astype(np.float32)
    f = _slices(tmp_path, x)
    key, density, eps = stream_key(3, "model.layers.1.mlp.down_proj.weight", 2), 0.5, 0.2
    sparsifier = object.__new__(mergekit_ops._Sparsifier)
    sparsifier.cols = cols
    base = 10**9
    want = uniform(key, base, len(x)) < sparsifier._della_probabilities(x, density, eps)
    prog = mergekit_program.Program(None, ["F32"])
    prog.store(prog.della_lt(prog.read(0), key, density, eps, cols))
    out = tmp_path / "out.bin"
    writer = _core.ShardWriter(str(out), len(x) * 4)
    chunk = cols * max(1, 1000 // cols)
    _core.mk_program([f], ["F32"], len(x), prog.code, prog.consts, prog.ints, prog.ranks, writer, 0, "F32",
                     chunk_elems=chunk, segment_elems=chunk * 2, index_base=base, threads=threads)
    writer.close()
    got = np.frombuffer(out.read_bytes(), dtype=np.float32)
    assert 0 < want.sum() < len(x)
    assert np.array_equal(got, want.astype(np.float32))


@pytest.mark.parametrize("ints, chunk", [([5], 4), ([5, 3], 4), ([5, 0], 10), ([5, 2], 3)])
def test_della_without_whole_rows_is_a_core_error(tmp_path: Path, ints: list[int], chunk: int) -> None:
    f = _slices(tmp_path, np.ones(10, dtype=np.float32))
    code = [(0, 0, 0), (30, 1, 0, 0, 0), (21, 0, 1, 0)]  # load, della_lt, sum
    with pytest.raises(_core.CoreError):
        _core.mk_program([f], ["F32"], 10, code, [0.5, 0.1], ints, [], None, 0, "F32",
                         chunk_elems=chunk, segment_elems=chunk)


@pytest.mark.parametrize("change", [{"numel": 11}, {"segment_elems": 0}, {"chunk_elems": 0},
                                    {"ranks": [(1, 0, 0, 5, [1, 2], [0], [])]},
                                    {"ranks": [(1, 0, 0, 5, [1], [0], [0, 0])]},
                                    {"ranks": [(2**40, 0, 0, 5, [1], [0], [])]}])
def test_bad_arguments_are_core_errors(tmp_path: Path, change: dict[str, Any]) -> None:
    f = _slices(tmp_path, np.ones(10, dtype=np.float32))
    args: dict[str, Any] = {"numel": 10, "ranks": [(1, 0, 0, 5, [1], [0], [])], "chunk_elems": 4, "segment_elems": 4}
    code = [(0, 0, 0), (27, 1, 0, 0)]  # load, rank

    def call() -> None:
        _core.mk_program([f], ["F32"], args["numel"], code, [], [], args["ranks"], None, 0, "F32",
                         chunk_elems=args["chunk_elems"], segment_elems=args["segment_elems"])

    call()  # the arguments before the change are good
    args.update(change)
    with pytest.raises(_core.CoreError):
        call()


@pytest.mark.parametrize("budget", [None, 0])
@pytest.mark.parametrize("method, masks", [("della", 2), ("dare_linear", 2), ("sce", 1)])
def test_masks_kept_between_passes_or_computed_again_give_the_same_bytes(trios: dict[str, dict[str, Path]],
                                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                         budget: int | None, method: str,
                                                                         masks: int) -> None:
    """DELLA with rescale ranks each row once and keeps its keep masks (a bit per element and
    model) for the writing pass, DARE keeps its draws, sce its variance band's mask from the
    squares' pass; over the budget they compute them again. Either way the bytes are the numpy steps', on 1 and 2
    threads, with pieces that start mid-byte of the masks."""
    config = configs(trios["bf16"], "bfloat16")[method]
    monkeypatch.setattr(mergekit_ops, "CHUNK", 1000)
    monkeypatch.setattr(mergekit_ops, "IN_CORE", False)
    want = run(config, tmp_path / "numpy", 1)
    monkeypatch.setattr(mergekit_ops, "IN_CORE", True)
    monkeypatch.setattr(mergekit_program, "CHUNK", 1000)
    monkeypatch.setattr(mergekit_program, "PIECE_BYTES", 5004)  # pieces of 2502 bf16 elements: not whole bytes of bits
    if budget is not None:
        monkeypatch.setattr(mergekit_ops, "KEPT_MASK_BUDGET", budget)
    kept: list[int] = []
    write = mergekit_program.write
    monkeypatch.setattr(mergekit_program, "write",
                        lambda *a, **k: (kept.append(len(k.get("masks", ()))), write(*a, **k))[1])
    for threads in (1, 2):
        got = run(config, tmp_path / f"core{threads}", threads)
        assert [n for n in want if raw_bytes(got[n]) != raw_bytes(want[n])] == [], threads
    assert set(kept) == ({masks} if budget is None else {0}), kept


@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("blocks", [5, 78])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_kept_mask_reads_back_what_was_drawn_over_rows_that_split_its_bytes(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch,
                                                                             threads: int, blocks: int,
                                                                             simd: bool) -> None:
    """MaskOut then MaskIn give back DELLA's draws bit for bit where rows of 13 elements, the
    blocks and chunks made of them, and the written pieces start inside a byte of the mask (bytes
    that two workers fill); with chunks of 78 rows (blocks of 39), 64 bits at a time between those
    bytes, on AVX-512 and in the portable form."""
    monkeypatch.setattr(mergekit_program, "PIECE_BYTES", 4 * 13 * blocks * 7 // 5)
    _core._set_mask_simd_enabled(simd)
    try:
        _mask_round_trip(tmp_path, threads, blocks)
    finally:
        _core._set_mask_simd_enabled(True)


def _mask_round_trip(tmp_path: Path, threads: int, blocks: int) -> None:
    from types import SimpleNamespace
    cols, rows = 13, 301 if blocks < 10 else 2003
    x = np.random.default_rng(3).normal(size=rows * cols).astype(np.float32)
    path = tmp_path / "x.bin"
    path.write_bytes(x.tobytes())
    specs = [SimpleNamespace(numel=len(x), dtype="F32")]
    inputs = [(_core.InputFile(str(path)), 0)]
    chunk = cols * blocks  # chunks and segments of 65 or 1014 elements

    def written(build: Any, masks: list[np.ndarray]) -> np.ndarray:
        p = mergekit_program.Program(None, ["F32"])
        p.store(build(p))
        out = tmp_path / "out.bin"
        out.unlink(missing_ok=True)
        writer = _core.ShardWriter(str(out), len(x) * 4)
        mergekit_program.write(p, specs, inputs, threads, writer, 0, "F32", lambda *_: None, chunk=chunk, masks=masks)
        writer.close()
        return np.frombuffer(out.read_bytes(), dtype=np.float32)

    draws = written(lambda p: p.della_lt(p.read(0), 11, 0.5, 0.3, cols), [])
    mask = np.zeros(-(-len(x) // 8), dtype=np.uint8)
    p = mergekit_program.Program(None, ["F32"])
    p.mask_out(p.della_lt(p.read(0), 11, 0.5, 0.3, cols), 0)
    mergekit_program.run(p, specs, inputs, threads, segment=chunk, masks=[mask])
    assert 0.2 < draws.mean() < 0.8
    assert np.array_equal(np.unpackbits(mask, bitorder="little")[:len(x)], draws.astype(np.uint8))
    assert np.array_equal(written(lambda p: p.mask_in(0), [mask]), draws)


@pytest.mark.parametrize("masks, why", [([], "operand 2 is 0, not below 0"),
                                        ([np.zeros(1, dtype=np.uint8)], "masks[0] holds 1 bytes, too few"),
                                        ([b"\0\0"], "masks[0] is a read-only buffer")])
def test_bad_masks_are_core_errors(tmp_path: Path, masks: list[Any], why: str) -> None:
    """A mask slot without a buffer, a buffer shorter than the elements, a read-only one: refused."""
    f = _slices(tmp_path, np.ones(10, dtype=np.float32))
    p = mergekit_program.Program(None, ["F32"])
    p.mask_out(p.read(0), 0)
    with pytest.raises(_core.CoreError, match=re.escape(why)):
        _core.mk_program([f], ["F32"], 10, p.code, [], [], [], None, 0, "F32", masks=masks)
