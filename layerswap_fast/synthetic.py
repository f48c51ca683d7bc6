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

**LoRA adapters** of a synthetic base (:func:`write_adapter`, :func:`make_lora_trio`) are PEFT
adapter directories whose updates ΔW = s·B·A follow the same pattern: the adapter called
``task...`` or ``lang...`` moves each module as strongly as the full expert of that name does
(:func:`lora_delta_std`), with factors drawn so that every element of s·B·A has that standard
deviation whatever the rank, alpha and rsLoRA setting.

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
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from math import ceil, prod, sqrt
from pathlib import Path

import numpy as np

from .dtypes import TORCH_NAMES, canonical_dtype
from .units import parse_size

__all__ = [
    "ModelShape", "SHAPES", "make_trio", "write_model", "tensor_layout", "delta_level",
    "language_layers", "task_layers", "float32_to_bfloat16", "bfloat16_to_float32", "pool_size",
    "parse_size", "delta_pool_size", "STRONG_STD", "WEAK_STD", "BASE_STD", "NORM_STD", "NORM_STRONG_STD",
    "NORM_WEAK_STD", "DTYPES", "GENERATOR_VERSION", "LINEAR_MODULES", "OUTER_MODULES", "LoraModule",
    "lora_modules", "lora_delta_std", "lora_factors", "write_adapter", "make_lora_trio",
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


@contextmanager
def _staged(path: Path) -> Iterator[Path]:
    """A directory to write beside ``path``, renamed into place (replacing ``path``) when the body
    succeeds and removed when it fails: a model appears whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_checkpoint(path: Path, spec: _ModelSpec, role: str, sources: dict[str | None, _Source]) -> Path:
    """Write the model directory beside ``path``, then rename it into place."""
    layout = tensor_layout(spec.shape, spec.layers, spec.tie)
    windows = _windows(tensor_layout(spec.shape, spec.layers, False), spec.pool, spec.seed)
    itemsize = DTYPES[spec.dtype][0].itemsize
    with _staged(path) as tmp:
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


# ----------------------------------------------------------------------------------------------
# LoRA adapters

#: every linear module of a Llama layer: what PEFT's ``target_modules="all-linear"`` picks there
LINEAR_MODULES = _ATTN + _MLP
#: the non-layer modules an adapter may target as well
OUTER_MODULES = ("embed_tokens", "lm_head")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_LORA_PREFIX = "base_model.model."
_LORA_STREAM = 0x4C4F5241  # "LORA"


@dataclass(frozen=True)
class LoraModule:
    """One module an adapter updates: its name in the model (``model.layers.3.self_attn.q_proj``),
    the weight's shape [out, in], its rank, alpha and scale, and whether it is an embedding
    (whose factors PEFT stores transposed: ``lora_embedding_A`` [r, vocab], ``lora_embedding_B``
    [dim, r])."""

    name: str
    shape: tuple[int, int]
    rank: int
    alpha: float
    scale: float
    embedding: bool

    @property
    def factor_names(self) -> tuple[str, str]:
        if self.embedding:
            return _LORA_PREFIX + self.name + ".lora_embedding_A", _LORA_PREFIX + self.name + ".lora_embedding_B"
        return _LORA_PREFIX + self.name + ".lora_A.weight", _LORA_PREFIX + self.name + ".lora_B.weight"

    @property
    def factor_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(A, B) as stored: [r, in] and [out, r]; for an embedding [r, vocab] and [dim, r]."""
        rows, cols = self.shape
        if self.embedding:
            return (self.rank, rows), (cols, self.rank)
        return (self.rank, cols), (rows, self.rank)


def _lora_pattern(patterns: dict | None, module: str):
    """The value of the first key of ``patterns`` that matches the end of ``module`` after a dot,
    as PEFT's ``get_pattern_key`` finds it; None when none does."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def _layer_index(module: str) -> int | None:
    m = re.match(r"model\.layers\.(\d+)\.", module)
    return None if m is None else int(m.group(1))


def lora_modules(shape: str | ModelShape = "tiny", *, rank: int = 16, alpha: float | None = None,
                 target_modules: Sequence[str] | None = None, use_rslora: bool = False,
                 rank_pattern: dict[str, int] | None = None, alpha_pattern: dict[str, float] | None = None,
                 layers: Sequence[int] | None = None, num_layers: int | None = None,
                 tie_embeddings: bool | None = None) -> list[LoraModule]:
    """The modules an adapter with these settings updates, in state-dict order, each with its
    rank, alpha and scale as PEFT computes them: r and alpha from the first matching key of
    ``rank_pattern`` / ``alpha_pattern``, else ``rank`` / ``alpha`` (default ``2 × rank``); scale
    alpha / r, or alpha / √r with ``use_rslora``. A module is targeted when its last name
    component is in ``target_modules`` (default :data:`LINEAR_MODULES`; :data:`OUTER_MODULES` may
    be added) and, for a layer module, its layer is in ``layers`` (default all)."""
    mshape = _shape(shape)
    n_layers = mshape.num_layers if num_layers is None else int(num_layers)
    tie = mshape.tie_embeddings if tie_embeddings is None else bool(tie_embeddings)
    targets = tuple(LINEAR_MODULES if target_modules is None else target_modules)
    unknown = [t for t in targets if t not in LINEAR_MODULES + OUTER_MODULES]
    if unknown or not targets:
        raise ValueError(f"target modules must be among {', '.join(LINEAR_MODULES + OUTER_MODULES)}; got {targets}")
    if tie and "lm_head" in targets:
        raise ValueError("lm_head is tied to embed_tokens in this model: target embed_tokens instead")
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    chosen = None if layers is None else {int(i) for i in layers}
    if chosen is not None and not chosen <= set(range(n_layers)):
        raise ValueError(f"layers {sorted(chosen - set(range(n_layers)))} are not layers of a {n_layers}-layer model")
    default_alpha = 2 * rank if alpha is None else alpha
    out = []
    for name, tshape in tensor_layout(mshape, n_layers, tie):
        if len(tshape) != 2:
            continue
        module = name[:-len(".weight")]
        if module.rsplit(".", 1)[-1] not in targets:
            continue
        layer = _layer_index(module)
        if chosen is not None and layer is not None and layer not in chosen:
            continue
        r = _lora_pattern(rank_pattern, module) or rank
        a = _lora_pattern(alpha_pattern, module)
        a = default_alpha if a is None else a
        scale = a / sqrt(r) if use_rslora else a / r
        out.append(LoraModule(module, (tshape[0], tshape[1]), int(r), a, float(scale),
                              module.endswith("embed_tokens")))
    return out


def lora_delta_std(role: str, module: str, num_layers: int) -> float:
    """The standard deviation of the elements of ΔW = s·B·A that :func:`write_adapter` gives
    ``module`` of an adapter called ``role``: :data:`STRONG_STD` where :func:`delta_level` says the
    full expert of that name moves the weight strongly, else :data:`WEAK_STD`."""
    return STRONG_STD if delta_level(role, module + ".weight", num_layers) == "strong" else WEAK_STD


def lora_factors(module: LoraModule, role: str, num_layers: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The float32 factors (A, B) of ``module`` in their stored shapes, before rounding to the
    adapter's dtype: A is N(0, 1/r) and B is N(0, (std / s)²), so each element of s·B·A has
    standard deviation ``std`` = :func:`lora_delta_std`. A function of (seed, role, module name,
    shape, rank and scale) only: the other modules and targets change nothing."""
    std = lora_delta_std(role, module.name, num_layers)
    gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [seed, _LORA_STREAM, _stream(role), zlib.crc32(module.name.encode())])))
    (a_shape, b_shape) = module.factor_shapes
    a = gen.standard_normal(a_shape, dtype=np.float32)
    a *= np.float32(1 / sqrt(module.rank))
    b = gen.standard_normal(b_shape, dtype=np.float32)
    b *= np.float32(std / module.scale)
    return a, b


def _to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    return float32_to_bfloat16(x) if dtype == "BF16" else x.astype(DTYPES[dtype][0])


def write_adapter(path: str | os.PathLike, shape: str | ModelShape = "tiny", *, role: str = "task",
                  rank: int = 16, alpha: float | None = None, target_modules: Sequence[str] | None = None,
                  use_rslora: bool = False, rank_pattern: dict[str, int] | None = None,
                  alpha_pattern: dict[str, float] | None = None, layers: Sequence[int] | None = None,
                  dtype: str = "F32", seed: int = 0, num_layers: int | None = None,
                  tie_embeddings: bool | None = None, base_model_name_or_path: str | None = None) -> Path:
    """Write a PEFT LoRA adapter of the synthetic base of ``shape`` (as :func:`write_model` makes
    it with the same ``num_layers`` and ``tie_embeddings``): ``adapter_config.json`` and
    ``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A.weight`` [r, in] and
    ``lora_B.weight`` [out, r] (``lora_embedding_A``/``_B`` for ``embed_tokens``), in ``dtype``
    (F32 by default, as PEFT keeps adapter weights; BF16 and F16 too).

    ``role`` (a name starting with ``task`` or ``lang``) gives the delta pattern of the full
    expert of that name (:func:`delta_level`): a language adapter's update is ten times larger on
    the attention of the bottom and top layers than elsewhere, a task adapter's on the second
    half of the layers (attention and MLP). See :func:`lora_modules` for the modules, ranks and
    scales and :func:`lora_factors` for the values. ``layers`` is written as PEFT's
    ``layers_to_transform``. The directory is built beside ``path`` and renamed into place; an
    existing ``path`` is replaced when it is an adapter or empty, else refused.
    """
    _pattern(role)
    mshape = _shape(shape)
    n_layers = mshape.num_layers if num_layers is None else int(num_layers)
    tie = mshape.tie_embeddings if tie_embeddings is None else bool(tie_embeddings)
    dtype = _normalize_dtype(dtype)
    modules = lora_modules(mshape, rank=rank, alpha=alpha, target_modules=target_modules, use_rslora=use_rslora,
                           rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, layers=layers,
                           num_layers=n_layers, tie_embeddings=tie)
    if not modules:
        raise ValueError("these settings target no module of the model")
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not (path / ADAPTER_CONFIG).exists():
        raise FileExistsError(f"{path} exists and is not an adapter; refusing to replace it")
    itemsize = DTYPES[dtype][0].itemsize
    entries, used = [], 0
    for m in modules:
        for fname, fshape in zip(m.factor_names, m.factor_shapes):
            nbytes = prod(fshape) * itemsize
            entries.append(json.dumps(fname) + ":" + json.dumps(
                {"dtype": dtype, "shape": list(fshape), "data_offsets": [used, used + nbytes]}, separators=(",", ":")))
            used += nbytes
    header = ('{"__metadata__":{"format":"pt"},' + ",".join(entries) + "}").encode()
    header += b" " * (-len(header) % 8)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "r": int(rank), "lora_alpha": 2 * rank if alpha is None else alpha,
        "target_modules": sorted({m.name.rsplit(".", 1)[-1] for m in modules}),
        "use_rslora": bool(use_rslora), "rank_pattern": dict(rank_pattern or {}),
        "alpha_pattern": dict(alpha_pattern or {}), "layers_to_transform": None if layers is None else sorted(layers),
        "layers_pattern": None, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_dora": False, "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
    }
    with _staged(path) as tmp:
        with open(tmp / ADAPTER_WEIGHTS, "wb") as f:
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            for m in modules:
                for factor in lora_factors(m, role, n_layers, seed):
                    f.write(_to_dtype(factor, dtype).tobytes())
            if f.tell() != 8 + len(header) + used:  # pragma: no cover - an internal invariant
                raise AssertionError(f"{ADAPTER_WEIGHTS}: wrote {f.tell()} bytes, expected {8 + len(header) + used}")
        _write_json(tmp / ADAPTER_CONFIG, config)
    return path


def make_lora_trio(out_dir: str | os.PathLike, shape: str | ModelShape = "tiny", *, rank: int = 16,
                   alpha: float | None = None, target_modules: Sequence[str] | None = None,
                   use_rslora: bool = False, dtype: str = "BF16", adapter_dtype: str = "F32",
                   shard_size: int | str = 5 * 10**9, seed: int = 0, num_layers: int | None = None,
                   tie_embeddings: bool | None = None, with_base: bool = True,
                   experts: Sequence[str] = ("task", "language")) -> dict[str, Path]:
    """A synthetic base (``out_dir/base``, the same bytes as :func:`make_trio`'s) and a LoRA
    adapter of it per expert name (``out_dir/task``, ``out_dir/language``), base first; each
    adapter's ``base_model_name_or_path`` is the base's absolute path, so the adapters merge
    without ``--base`` while the trio stays where it is."""
    out = Path(out_dir)
    experts = tuple(experts)
    if len(set(experts)) != len(experts) or "base" in experts:
        raise ValueError(f"expert names must be distinct and not 'base': {experts}")
    for name in experts:
        _pattern(name)
    paths: dict[str, Path] = {}
    if with_base:
        paths["base"] = write_model(out / "base", shape, dtype=dtype, shard_size=shard_size, seed=seed,
                                    num_layers=num_layers, tie_embeddings=tie_embeddings)
    for name in experts:
        paths[name] = write_adapter(out / name, shape, role=name, rank=rank, alpha=alpha,
                                    target_modules=target_modules, use_rslora=use_rslora, dtype=adapter_dtype,
                                    seed=seed, num_layers=num_layers, tie_embeddings=tie_embeddings,
                                    base_model_name_or_path=str((out / "base").resolve()))
    return paths
