"""Synthetic Llama model trios (base, task expert, language expert) for the demo, tests and benchmarks.

Every model is a Hugging Face Llama checkpoint (``config.json``, ``generation_config.json``, a
stub ``tokenizer_config.json``, ``model.safetensors.index.json`` and shards) that
``transformers.AutoModelForCausalLM.from_pretrained`` loads. The experts are ``base + delta``,
with deltas shaped like the paper's Figure 2 (Bandarkar et al., arXiv 2410.01335):

- the **language expert** moves attention (q, k, v, o) strongly in its bottom and top layers
  (:func:`language_layers`) and everything else only a little;
- the **task expert** moves attention and MLP strongly in the second half of the layers
  (:func:`task_layers`) and everything else only a little;
- embeddings, the final norm and ``lm_head`` get weak deltas in both.

A strong delta has ten times the standard deviation of a weak one (:data:`STRONG_STD`,
:data:`WEAK_STD`), so a row-MAV analysis shows the pattern plainly; :func:`delta_level` says which
level a tensor gets.

Speed and memory: the files are written at disk speed and in constant memory. One pool of
N(0, 0.02) float32 values per seed (:func:`pool_size` values, at most 16M = 64 MB) is drawn once,
plus one unit-normal delta pool per expert (:func:`delta_pool_size`, a quarter of that). Every
matrix is a sequence of windows into the pool, at offsets that depend only on the tensor's name and
the window's index, so the base and every expert use the same windows: an expert's value at pool
index ``i`` is ``round(base[i] + std * delta[i % len(delta)])``. For 2-byte dtypes the base pool and
each expert's strong and weak pools are converted to the output dtype up front, so writing a
tensor is nothing but ``write()`` calls of pool slices; for F32 the expert windows are computed per
window (two numpy ops). The next model's pools are built on a background thread while the current
model is written. No tensor is ever held whole: the 8b embedding (1 GB) is written in windows of
:data:`WINDOW` elements. Generating the 8b trio needs about 250 MB of RSS.

Pure Python and numpy: no torch, no C++ extension.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from math import ceil, prod
from pathlib import Path

import numpy as np

from .dtypes import TORCH_NAMES, canonical_dtype
from .units import parse_size

__all__ = [
    "ModelShape", "SHAPES", "make_trio", "write_model", "tensor_layout", "delta_level",
    "language_layers", "task_layers", "float32_to_bfloat16", "bfloat16_to_float32", "pool_size",
    "parse_size", "delta_pool_size", "STRONG_STD", "WEAK_STD", "BASE_STD", "NORM_STD", "NORM_STRONG_STD",
    "NORM_WEAK_STD", "DTYPES", "GENERATOR_VERSION",
]


#: bumped whenever the generated values or files change, so cached trios can be recognised as stale
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers of a Llama model."""

    name: str
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SHAPES: dict[str, ModelShape] = {
    s.name: s for s in (
        ModelShape("tiny", num_layers=16, hidden=64, intermediate=172, heads=4, kv_heads=2, vocab=512),
        ModelShape("1b", num_layers=22, hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000),
        ModelShape("8b", num_layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256),
        ModelShape("70b-slice", num_layers=8, hidden=8192, intermediate=28672, heads=64, kv_heads=8,
                   vocab=128256),
    )
}

#: standard deviation of the base model's matrices (embeddings, projections, lm_head)
BASE_STD = 0.02
#: standard deviation of a strong / weak expert delta on a matrix
STRONG_STD = 0.004
WEAK_STD = STRONG_STD / 10
#: norm weights are ``1 + N(0, NORM_STD)`` in the base; their deltas are larger than the matrices'
#: so that they survive rounding to bf16 (whose spacing at 1.0 is 2**-7)
NORM_STD = 0.02
NORM_STRONG_STD = 0.05
NORM_WEAK_STD = 0.01

#: safetensors dtype name -> (numpy storage dtype, config.json dtype)
DTYPES: dict[str, tuple[np.dtype, str]] = {
    "BF16": (np.dtype(np.uint16), TORCH_NAMES["BF16"]),
    "F16": (np.dtype(np.float16), TORCH_NAMES["F16"]),
    "F32": (np.dtype(np.float32), TORCH_NAMES["F32"]),
}

#: elements per write: 8M (16 MB in bf16, 32 MB in F32)
WINDOW = 1 << 23
#: the largest pool: 16M float32 values (64 MB)
MAX_POOL = 1 << 24
_MIN_POOL = 1 << 16
#: elements per RNG block (each block has its own seed, so blocks can be drawn in parallel)
_RNG_BLOCK = 1 << 20
#: elements per in-cache conversion step
_CONVERT_BLOCK = 1 << 16

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp|input_layernorm|post_attention_layernorm)")
_BASE_STREAM = 0
_NORM_STREAM = 0x4E4F524D  # "NORM"


# ----------------------------------------------------------------------------------------------
# small helpers

def _normalize_dtype(dtype: str) -> str:
    name = canonical_dtype(dtype)
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return name


def float32_to_bfloat16(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Round float32 values to bfloat16, to nearest even, as torch does; returns the uint16 bits.

    NaN becomes the quiet NaN 0x7FC0 (torch's choice); overflow rounds to infinity.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    tmp = np.right_shift(bits, 16)
    tmp &= 1
    tmp += 0x7FFF
    tmp += bits  # wraps only for negative NaNs, which are replaced below
    tmp >>= 16
    nan = np.isnan(x)
    if nan.any():
        tmp[nan] = 0x7FC0
    if out is None:
        return tmp.astype(np.uint16)
    out[...] = tmp
    return out


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bits (uint16) to float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _convert_block(x: np.ndarray, out: np.ndarray, tmp: np.ndarray | None, dtype: str) -> None:
    """``out[:] = round(x)`` for a block that fits in cache. ``x`` is float32 and may be clobbered."""
    if dtype == "BF16":
        assert tmp is not None
        bits = x.view(np.uint32)
        np.right_shift(bits, 16, out=tmp)
        tmp &= 1
        tmp += 0x7FFF
        tmp += bits
        tmp >>= 16
        out[...] = tmp
    else:
        out[...] = x


def _shape(shape: str | ModelShape) -> ModelShape:
    if isinstance(shape, ModelShape):
        return shape
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: choose one of {', '.join(SHAPES)}")
    return SHAPES[shape]


def _stable_hash(*parts: object) -> int:
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def _stream(name: str) -> int:
    """The RNG stream of an expert's deltas: a function of its name only."""
    return zlib.crc32(name.encode()) + 1


def _pattern(expert: str) -> str:
    low = expert.lower()
    if low.startswith("task"):
        return "task"
    if low.startswith("lang"):
        return "language"
    raise ValueError(f"expert name {expert!r} must start with 'task' or 'lang' (its delta pattern)")


# ----------------------------------------------------------------------------------------------
# the tensors of a model, and the delta pattern

def tensor_layout(shape: ModelShape, num_layers: int | None = None,
                  tie_embeddings: bool | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, in Hugging Face Llama state-dict order."""
    layers = shape.num_layers if num_layers is None else num_layers
    tie = shape.tie_embeddings if tie_embeddings is None else tie_embeddings
    h, inter, hd = shape.hidden, shape.intermediate, shape.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (shape.heads * hd, h)),
            (p + "self_attn.k_proj.weight", (shape.kv_heads * hd, h)),
            (p + "self_attn.v_proj.weight", (shape.kv_heads * hd, h)),
            (p + "self_attn.o_proj.weight", (h, shape.heads * hd)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not tie:
        out.append(("lm_head.weight", (shape.vocab, h)))
    return out


def language_layers(num_layers: int) -> tuple[range, range]:
    """(bottom, top) layers whose attention the language expert moves strongly: 5/32 and 2/32 of
    the model, rounded up (5 and 2 of 32 layers, the paper's default swap; 3 and 1 of 16)."""
    bottom = max(1, ceil(num_layers * 5 / 32))
    top = max(1, ceil(num_layers * 2 / 32))
    bottom = min(bottom, num_layers)
    top = min(top, num_layers - bottom)
    return range(0, bottom), range(num_layers - top, num_layers)


def task_layers(num_layers: int) -> range:
    """Layers the task expert moves strongly (attention and MLP): the second half."""
    return range(num_layers // 2, num_layers)


def delta_level(expert: str, name: str, num_layers: int) -> str:
    """``"strong"`` or ``"weak"``: how much ``expert`` (a name starting with ``task`` or ``lang``)
    moved tensor ``name`` of a ``num_layers``-layer model."""
    pattern = _pattern(expert)
    m = _LAYER_RE.match(name)
    if m is None:
        return "weak"  # embeddings, final norm, lm_head
    layer, part = int(m.group(1)), m.group(2)
    if pattern == "language":
        bottom, top = language_layers(num_layers)
        edge = layer in bottom or layer in top
        return "strong" if edge and part == "self_attn" else "weak"
    if layer in task_layers(num_layers):
        return "strong"  # attention, MLP and the layer's norms
    return "weak"


def _is_norm(shape: tuple[int, ...]) -> bool:
    return len(shape) == 1


def pool_size(shape: ModelShape, num_layers: int | None = None) -> int:
    """Number of float32 values in the random pool: enough for every matrix of the (untied) model
    to have its own values (so small models repeat nothing), a power of two, at most 16M."""
    total = sum(prod(s) for _, s in tensor_layout(shape, num_layers, tie_embeddings=False) if not _is_norm(s))
    size = _MIN_POOL
    while size < total and size < MAX_POOL:
        size *= 2
    return size


def _windows(layout: Sequence[tuple[str, tuple[int, ...]]], pool: int, seed: int
             ) -> dict[str, list[tuple[int, int]]]:
    """Per matrix, its (pool offset, length) windows. When every matrix fits in the pool they are
    laid out one after the other (no value repeats); otherwise each window starts at a hash of
    (seed, name, window index). Independent of tie_embeddings: lm_head is always counted."""
    total = sum(prod(s) for _, s in layout if not _is_norm(s))
    fits = total <= pool
    out: dict[str, list[tuple[int, int]]] = {}
    start = 0
    for name, shape in layout:
        if _is_norm(shape):
            continue
        n = prod(shape)
        wins = []
        for j, lo in enumerate(range(0, n, WINDOW)):
            length = min(WINDOW, n - lo)
            off = start + lo if fits else _stable_hash(seed, name, j) % pool
            wins.append((off, length))
        out[name] = wins
        start += n
    return out


# ----------------------------------------------------------------------------------------------
# pools

def delta_pool_size(pool: int) -> int:
    """Length of an expert's unit-normal delta pool: odd and coprime to the (power-of-two) value
    pool, so the (base, delta) pairs repeat only every pool × delta_pool values. Small pools get a
    delta per value; the largest get a quarter, which keeps the RNG cheap."""
    return (pool if pool <= 1 << 22 else pool // 4) + 1


def _normal_blocks(seed: int, stream: int, size: int, out: np.ndarray, scale: float) -> None:
    """Fill ``out[:size]`` with N(0, scale) float32, block by block (each block its own seed), on
    a few threads: numpy's generators release the GIL."""
    def fill(k: int) -> None:
        lo = k * _RNG_BLOCK
        view = out[lo:min(size, lo + _RNG_BLOCK)]
        gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stream, k])))
        gen.standard_normal(out=view, dtype=np.float32)
        if scale != 1.0:
            view *= np.float32(scale)
    blocks = range((size + _RNG_BLOCK - 1) // _RNG_BLOCK)
    if len(blocks) == 1:
        fill(0)
        return
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as ex:
        list(ex.map(fill, blocks))


def _scaled_delta(dst: np.ndarray, delta: np.ndarray, start: int, scale: np.float32) -> None:
    """``dst[k] = scale * delta[(start + k) % len(delta)]``."""
    q, k, n = len(delta), 0, len(dst)
    start %= q
    while k < n:
        m = min(n - k, q - start)
        np.multiply(delta[start:start + m], scale, out=dst[k:k + m])
        k += m
        start = 0


class _Source:
    """Where a model's matrix windows come from, for one delta level (or the base)."""

    def chunks(self, off: int, length: int) -> Iterator[np.ndarray]:
        raise NotImplementedError


class _PoolSource(_Source):
    """A precomputed pool in the output dtype: windows are slices, wrapping around the end."""

    def __init__(self, pool: np.ndarray):
        self.pool = pool

    def chunks(self, off: int, length: int) -> Iterator[np.ndarray]:
        size = len(self.pool)
        while length:
            n = min(length, size - off)
            yield self.pool[off:off + n]
            length -= n
            off = 0


class _ComputedSource(_Source):
    """F32 experts: ``base + scale * delta`` computed per window into one scratch buffer."""

    def __init__(self, base: np.ndarray, delta: np.ndarray, scale: float, scratch: np.ndarray):
        self.base, self.delta, self.scale, self.scratch = base, delta, np.float32(scale), scratch

    def chunks(self, off: int, length: int) -> Iterator[np.ndarray]:
        size = len(self.base)
        while length:
            n = min(length, size - off, len(self.scratch))
            buf = self.scratch[:n]
            _scaled_delta(buf, self.delta, off, self.scale)
            buf += self.base[off:off + n]
            yield buf
            length -= n
            off = (off + n) % size


def _expert_pools(base: np.ndarray, delta: np.ndarray, scales: Sequence[float], dtype: str
                  ) -> list[np.ndarray]:
    """``round(base[i] + s * delta[i % len(delta)])`` for each scale s, in the output dtype,
    computed in cache-sized blocks on a few threads."""
    size = len(base)
    store = DTYPES[dtype][0]
    pools = [np.empty(size, dtype=store) for _ in scales]

    def build(k: int) -> None:
        lo, hi = k * _RNG_BLOCK, min(size, (k + 1) * _RNG_BLOCK)
        x = np.empty(_CONVERT_BLOCK, np.float32)
        tmp = np.empty(_CONVERT_BLOCK, np.uint32) if dtype == "BF16" else None
        for s in range(lo, hi, _CONVERT_BLOCK):
            e = min(hi, s + _CONVERT_BLOCK)
            xs = x[:e - s]
            ts = None if tmp is None else tmp[:e - s]
            for scale, pool in zip(scales, pools):
                _scaled_delta(xs, delta, s, np.float32(scale))
                xs += base[s:e]
                _convert_block(xs, pool[s:e], ts, dtype)

    blocks = range((size + _RNG_BLOCK - 1) // _RNG_BLOCK)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as ex:
        list(ex.map(build, blocks))
    return pools


def _base_pool(base: np.ndarray, dtype: str) -> np.ndarray:
    store = DTYPES[dtype][0]
    pool = np.empty(len(base), dtype=store)
    x = np.empty(_CONVERT_BLOCK, np.float32)
    tmp = np.empty(_CONVERT_BLOCK, np.uint32)
    for s in range(0, len(base), _CONVERT_BLOCK):
        e = min(len(base), s + _CONVERT_BLOCK)
        x[:e - s] = base[s:e]
        _convert_block(x[:e - s], pool[s:e], tmp[:e - s], dtype)
    return pool


def _random_base(seed: int, size: int) -> np.ndarray:
    base = np.empty(size, np.float32)
    _normal_blocks(seed, _BASE_STREAM, size, base, BASE_STD)
    return base


def _prepare_sources(role: str, base: np.ndarray, dtype: str, seed: int) -> dict[str | None, _Source]:
    """The per-level sources of one model: ``None`` for the base, ``strong``/``weak`` for experts."""
    if role == "base":
        return {None: _PoolSource(base if dtype == "F32" else _base_pool(base, dtype))}
    q = delta_pool_size(len(base))
    delta = np.empty(q, np.float32)
    _normal_blocks(seed, _stream(role), q, delta, 1.0)
    levels = (("strong", STRONG_STD), ("weak", WEAK_STD))
    if dtype == "F32":
        scratch = np.empty(min(WINDOW, len(base)), np.float32)
        return {lvl: _ComputedSource(base, delta, std, scratch) for lvl, std in levels}
    pools = _expert_pools(base, delta, [std for _, std in levels], dtype)
    return {lvl: _PoolSource(pool) for (lvl, _), pool in zip(levels, pools)}


def _norm_values(name: str, n: int, seed: int, role: str, level: str | None, dtype: str) -> np.ndarray:
    """A norm weight: 1 + N(0, NORM_STD) in the base, plus the expert's delta; output dtype."""
    key = zlib.crc32(name.encode())
    gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _NORM_STREAM, key])))
    values = np.float32(1.0) + gen.standard_normal(n, dtype=np.float32) * np.float32(NORM_STD)
    if level is not None:
        dgen = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _stream(role), _NORM_STREAM, key])))
        scale = NORM_STRONG_STD if level == "strong" else NORM_WEAK_STD
        values += dgen.standard_normal(n, dtype=np.float32) * np.float32(scale)
    if dtype == "BF16":
        return float32_to_bfloat16(values)
    return values.astype(DTYPES[dtype][0])


# ----------------------------------------------------------------------------------------------
# files

def _shard_plan(layout: Sequence[tuple[str, tuple[int, ...]]], dtype: str, shard_size: int
                ) -> list[tuple[bytes, list[tuple[str, tuple[int, ...]]]]]:
    """Greedy, in order: each shard's header and tensors; a shard's whole file (8-byte length,
    header and data) stays within ``shard_size`` unless a single tensor alone exceeds it."""
    itemsize = DTYPES[dtype][0].itemsize
    prefix = '{"__metadata__":{"format":"pt"}'

    def header(entries: list[str]) -> bytes:
        raw = (prefix + "".join("," + e for e in entries) + "}").encode()
        return raw + b" " * (-len(raw) % 8)

    shards: list[tuple[bytes, list[tuple[str, tuple[int, ...]]]]] = []
    entries: list[str] = []
    tensors: list[tuple[str, tuple[int, ...]]] = []
    used = 0  # data bytes
    head_len = len(prefix) + 1
    for name, shape in layout:
        nbytes = prod(shape) * itemsize
        entry = (json.dumps(name) + ":" + json.dumps(
            {"dtype": dtype, "shape": list(shape), "data_offsets": [used, used + nbytes]},
            separators=(",", ":")))
        file_size = 8 + head_len + 1 + len(entry) + 7 + used + nbytes  # +7: padding, at most
        if tensors and file_size > shard_size:
            shards.append((header(entries), tensors))
            entries, tensors, used, head_len = [], [], 0, len(prefix) + 1
            entry = (json.dumps(name) + ":" + json.dumps(
                {"dtype": dtype, "shape": list(shape), "data_offsets": [0, nbytes]},
                separators=(",", ":")))
        entries.append(entry)
        tensors.append((name, shape))
        head_len += 1 + len(entry)
        used += nbytes
    shards.append((header(entries), tensors))
    return shards


def _model_config(shape: ModelShape, num_layers: int, tie: bool, dtype: str) -> dict:
    torch_dtype = DTYPES[dtype][1]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "num_hidden_layers": num_layers,
        "vocab_size": shape.vocab,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "hidden_act": "silu",
        "initializer_range": BASE_STD,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": tie,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
    }


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


@dataclass(frozen=True)
class _ModelSpec:
    shape: ModelShape
    layers: int
    tie: bool
    dtype: str
    shard_size: int
    seed: int

    @classmethod
    def make(cls, shape: str | ModelShape, dtype: str, shard_size: int | str, seed: int,
             num_layers: int | None, tie_embeddings: bool | None) -> _ModelSpec:
        mshape = _shape(shape)
        layers = mshape.num_layers if num_layers is None else int(num_layers)
        if layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {layers}")
        tie = mshape.tie_embeddings if tie_embeddings is None else bool(tie_embeddings)
        return cls(mshape, layers, tie, _normalize_dtype(dtype), parse_size(shard_size), int(seed))

    @property
    def pool(self) -> int:
        return pool_size(self.shape, self.layers)


def _check_target(path: Path) -> None:
    if path.exists() and any(path.iterdir()) and not (path / "model.safetensors.index.json").exists():
        raise FileExistsError(f"{path} exists and is not a checkpoint; refusing to replace it")


def _write_checkpoint(path: Path, spec: _ModelSpec, role: str, sources: dict[str | None, _Source]) -> Path:
    """Write the model directory beside ``path``, then rename it into place."""
    layout = tensor_layout(spec.shape, spec.layers, spec.tie)
    windows = _windows(tensor_layout(spec.shape, spec.layers, False), spec.pool, spec.seed)
    itemsize = DTYPES[spec.dtype][0].itemsize
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    try:
        shards = _shard_plan(layout, spec.dtype, spec.shard_size)
        weight_map: dict[str, str] = {}
        total = 0
        for i, (header, tensors) in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            with open(tmp / fname, "wb") as f:
                f.write(len(header).to_bytes(8, "little"))
                f.write(header)
                for name, tshape in tensors:
                    level = None if role == "base" else delta_level(role, name, spec.layers)
                    if _is_norm(tshape):
                        f.write(_norm_values(name, tshape[0], spec.seed, role, level, spec.dtype))
                    else:
                        src = sources[level]
                        for off, length in windows[name]:
                            for chunk in src.chunks(off, length):
                                f.write(chunk)
                    weight_map[name] = fname
                    total += prod(tshape) * itemsize
                expected = 8 + len(header) + sum(prod(s) for _, s in tensors) * itemsize
                if f.tell() != expected:  # pragma: no cover - an internal invariant
                    raise AssertionError(f"{fname}: wrote {f.tell()} bytes, expected {expected}")
        _write_json(tmp / "model.safetensors.index.json",
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
        _write_json(tmp / "config.json", _model_config(spec.shape, spec.layers, spec.tie, spec.dtype))
        _write_json(tmp / "generation_config.json",
                    {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2})
        _write_json(tmp / "tokenizer_config.json", {
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "model_max_length": 256, "add_bos_token": True, "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "comment": "stub written by layerswap_fast.synthetic; not a working tokenizer",
        })
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_model(path: str | os.PathLike, shape: str | ModelShape = "tiny", *, role: str = "base",
                dtype: str = "BF16", shard_size: int | str = 5 * 10**9, seed: int = 0,
                num_layers: int | None = None, tie_embeddings: bool | None = None) -> Path:
    """Write one model of a trio: ``role`` is ``"base"`` or an expert name (``task...``/``lang...``);
    the same bytes as the corresponding model of :func:`make_trio` with the same arguments.

    The directory is built beside ``path`` and renamed into place when complete; an existing
    ``path`` is replaced if it is an earlier checkpoint (has an index) or empty, else refused.
    """
    spec = _ModelSpec.make(shape, dtype, shard_size, seed, num_layers, tie_embeddings)
    if role != "base":
        _pattern(role)
    path = Path(path)
    _check_target(path)
    base = _random_base(spec.seed, spec.pool)
    return _write_checkpoint(path, spec, role, _prepare_sources(role, base, spec.dtype, spec.seed))


def make_trio(out_dir: str | os.PathLike, shape: str | ModelShape = "tiny", *, dtype: str = "BF16",
              shard_size: int | str = 5 * 10**9, seed: int = 0, num_layers: int | None = None,
              with_base: bool = True, tie_embeddings: bool | None = None,
              experts: Sequence[str] = ("task", "language")) -> dict[str, Path]:
    """Write a base model and its experts under ``out_dir`` (``out_dir/base``, ``out_dir/task``,
    ``out_dir/language``) and return their paths, base first (omitted when ``with_base=False``).

    ``shape`` is a key of :data:`SHAPES` or a :class:`ModelShape`; ``num_layers`` overrides its
    layer count. Expert names must start with ``task`` or ``lang`` (their delta pattern); each name
    has its own delta stream. The values are a function of (shape, num_layers, dtype, seed, expert
    name) only: ``shard_size``, ``tie_embeddings`` and ``with_base`` change which bytes are
    written where, not the values. An existing model directory is replaced.

    The next model's pools are built on a background thread while the current one is written.
    """
    spec = _ModelSpec.make(shape, dtype, shard_size, seed, num_layers, tie_embeddings)
    experts = tuple(experts)
    if len(set(experts)) != len(experts) or "base" in experts:
        raise ValueError(f"expert names must be distinct and not 'base': {experts}")
    for name in experts:
        _pattern(name)
    out = Path(out_dir)
    roles = (("base",) if with_base else ()) + experts
    for role in roles:
        _check_target(out / role)
    base = _random_base(spec.seed, spec.pool)
    paths: dict[str, Path] = {}
    with ThreadPoolExecutor(max_workers=1) as ex:
        pending = ex.submit(_prepare_sources, roles[0], base, spec.dtype, spec.seed) if roles else None
        for k, role in enumerate(roles):
            assert pending is not None
            sources = pending.result()
            pending = (ex.submit(_prepare_sources, roles[k + 1], base, spec.dtype, spec.seed)
                       if k + 1 < len(roles) else None)
            paths[role] = _write_checkpoint(out / role, spec, role, sources)
            del sources
    return paths
