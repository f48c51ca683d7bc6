"""Test helpers: tiny real Llama checkpoints made with transformers, a torch reference reader,
files written by hand, and plain-torch references written from the definitions (never computed
through the package's own kernels or its C++ core)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import struct
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

LORA_PREFIX = "base_model.model."


def make_llama_trio(root: Path, *, num_layers: int = 12, tie: bool = False, dtype: torch.dtype = torch.bfloat16,
                    shard: str = "40KB", seed: int = 0, hidden: int = 32,
                    roles: tuple[str, ...] = ("base", "task", "language")) -> dict[str, Path]:
    """A base and experts (base + different noise each), saved by ``save_pretrained`` (sharded)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    paths = {}
    for i, role in enumerate(roles):
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(base_state[name])
                if role != "base":
                    gen = torch.Generator().manual_seed(seed * 100 + i)
                    param.add_(torch.randn(param.shape, generator=gen).to(dtype) * 0.01)
        paths[role] = root / role
        model.save_pretrained(paths[role], max_shard_size=shard, safe_serialization=True)
    return paths


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, read with the safetensors library."""
    index = path / "model.safetensors.index.json"
    files = (sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
             if index.exists() else sorted(path.glob("*.safetensors")))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                out[name] = handle.get_tensor(name)
    return out


def assert_same_shards(a: Path, *others: Path) -> None:
    """Checkpoint directories ``a`` and ``others`` hold the same, non-empty set of shard files,
    byte for byte."""
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names, f"no shards in {a}"
    for b in others:
        assert sorted(p.name for p in b.glob("*.safetensors")) == names, (a, b)
        for name in names:
            assert (a / name).read_bytes() == (b / name).read_bytes(), (b, name)


def tensors_digest(data: bytes) -> str:
    """The ``blake3-tensors`` checksum of a file's bytes, from the format by hand: BLAKE3 over
    (length, BLAKE3) of the header and of each tensor in offset order when the file is a
    safetensors file whose tensors tile its data, else of the whole file as one piece."""
    import blake3

    pieces = [(0, len(data))]
    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        header.pop("__metadata__", None)
        spans = sorted(tuple(v["data_offsets"]) for v in header.values())
        if [a for a, _ in spans] == [0] + [b for _, b in spans[:-1]] and 8 + n + (spans[-1][1] if spans else 0) == len(data):
            pieces = [(0, 8 + n)] + [(8 + n + a, 8 + n + b) for a, b in spans if b > a]
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        pass
    outer = blake3.blake3()
    for a, b in pieces:
        outer.update((b - a).to_bytes(8, "little") + blake3.blake3(data[a:b]).digest())
    return outer.hexdigest()


def raw_bytes(t: torch.Tensor) -> bytes:
    """The tensor's bytes in memory order (as safetensors stores them)."""
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file below root: to prove that nothing was written or changed."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()} | {
            str(p.relative_to(root)) + "/": (0, 0) for p in sorted(root.rglob("*")) if p.is_dir()}


def fs_state(root: Path) -> dict[str, tuple]:
    """Everything below ``root`` (and root itself), without following links: each entry's type,
    size, mtime and, for a file, its sha256, for a link its target. Equal before and after a
    command: the command wrote, changed, removed and left nothing there."""
    import hashlib

    state: dict[str, tuple] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        key = str(path.relative_to(root))
        if path.is_symlink():
            state[key] = ("link", os.readlink(path))
        elif path.is_file():
            state[key] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            state[key] = ("dir" if path.is_dir() else "other", st.st_mtime_ns)
    return state


def tmpfs(path: Path, options: str):
    """A tmpfs mounted at ``path`` (made here) with mount ``options`` for the body of a fixture;
    the test is skipped where mounting is not allowed (it needs root)."""
    import subprocess

    import pytest

    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip(f"cannot mount a tmpfs ({options}) here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


# ---- helpers shared by the core's tests (bit patterns of float tensors) --------------------------

TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def raw(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(INT_VIEW[t.dtype]).numpy()


def from_raw(buf, dtype: str) -> torch.Tensor:
    arr = np.frombuffer(buf, dtype=np.int32 if dtype == "F32" else np.int16)
    return torch.from_numpy(arr.copy()).view(TORCH[dtype])


def assert_same(got: torch.Tensor, ref: torch.Tensor, what: object = None) -> None:
    """Same dtype, same shape and bit-identical, except that NaN only has to be NaN (torch's NaN
    encodings vary by path: its vectorised float32 -> bf16 cast writes 0xFFFF, its scalar one and
    the package 0x7FC0). Tensors of any shape, on any device."""
    where = f"{what}: " if what is not None else ""
    assert got.dtype == ref.dtype and got.shape == ref.shape, \
        f"{where}got {got.dtype} {tuple(got.shape)}, expected {ref.dtype} {tuple(ref.shape)}"
    got, ref = got.detach().cpu().contiguous().reshape(-1), ref.detach().cpu().contiguous().reshape(-1)
    gn, rn = torch.isnan(got.float()), torch.isnan(ref.float())
    assert torch.equal(gn, rn), f"{where}NaN positions differ at {torch.nonzero(gn != rn)[:5].tolist()}"
    g, r = got.view(INT_VIEW[got.dtype]), ref.view(INT_VIEW[ref.dtype])
    bad = (g != r) & ~gn
    if bad.any():
        i = int(torch.nonzero(bad)[0])
        raise AssertionError(f"{where}{int(bad.sum())} elements differ; first at {i}: got {got[i].item()!r} "
                             f"(0x{int(g[i]) & 0xFFFFFFFF:x}), expected {ref[i].item()!r} "
                             f"(0x{int(r[i]) & 0xFFFFFFFF:x})")


def one_line(e: BaseException) -> str:
    s = str(e)
    assert "\n" not in s and s
    return s


def write_at_offsets(path: Path, tensors: list[torch.Tensor], *, prefix: bytes = b"\x01" * 7,
                     gap: bytes = b"\x02" * 5) -> list[int]:
    """Write ``prefix``, then each tensor's raw bytes followed by ``gap``, to ``path`` (so tensors
    sit at nonzero, odd offsets and reading past a tensor's end would show); return the tensors'
    absolute offsets."""
    offsets, data = [], bytearray(prefix)
    for t in tensors:
        offsets.append(len(data))
        data += raw_bytes(t) + gap
    Path(path).write_bytes(bytes(data))
    return offsets


def write_safetensors_raw(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    """A safetensors file written by hand: the 8-byte little-endian header length (``length``, or
    the header's true length), the header (a dict as JSON, or given bytes), then ``data``."""
    raw_header = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw_header) if length is None else length
    Path(path).write_bytes(struct.pack("<Q", n) + raw_header + data)
    return Path(path)


def run_in_threads(target, arg_tuples) -> None:
    """Call ``target(*args)`` for every tuple of ``arg_tuples``, each in its own thread, all
    started before any is joined; return once all have finished."""
    threads = [threading.Thread(target=target, args=args) for args in arg_tuples]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# ---- plain-torch references, from the definitions ------------------------------------------------

def blend_ref(xs: list[torch.Tensor], ws: list[float], dtype: torch.dtype) -> torch.Tensor:
    """The blend: each weight rounded to float32, the float32 products ``w_i * x_i.float()`` added
    in input order from the first one (no fused multiply-add), the sum rounded into ``dtype``."""
    w32 = [float(np.float32(w)) for w in ws]
    acc = w32[0] * xs[0].float()
    for w, x in zip(w32[1:], xs[1:]):
        acc = acc + w * x.float()
    return acc.to(dtype)


def row_mav_ref(e: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row MAVs in float64: per row, the mean of ``|e - b|``. A tensor of two or more dimensions
    has ``shape[0]`` rows (the other dimensions flattened into each row), a vector one row."""
    assert e.shape == b.shape, (e.shape, b.shape)
    rows = e.shape[0] if e.dim() >= 2 else 1
    return (e.double() - b.double()).abs().reshape(rows, -1).mean(1)


def layer_of(name: str) -> int | None:
    """The decoder layer of a ``model.layers.<i>....`` tensor; None for every other tensor."""
    parts = name.split(".")
    return int(parts[2]) if parts[:2] == ["model", "layers"] else None


def expected_weights(layer: int | None, num_layers: int, bottom: int = 5, top: int = 2, lt: int = 1, ut: int = 1,
                     ramp: bool = False, non_layer: str = "average") -> tuple[float, float]:
    """(task weight, language weight) of a layer swap, written from the paper's rule, independently
    of the planner: the bottom and top layers from the language expert, the middle from the task
    expert, transition layers between them 0.5/0.5 (or a ramp), non-layer tensors by ``non_layer``."""
    if layer is None:
        return {"average": (0.5, 0.5), "task": (1.0, 0.0), "language": (0.0, 1.0)}[non_layer]
    if layer < bottom or layer >= num_layers - top:
        return 0.0, 1.0
    if layer < bottom + lt:
        j, n = layer - bottom + 1, lt
    elif layer >= num_layers - top - ut:
        j, n = num_layers - top - layer, ut
    else:
        return 1.0, 0.0
    return (j / (n + 1), 1 - j / (n + 1)) if ramp else (0.5, 0.5)


def swap_ref(task: torch.Tensor, lang: torch.Tensor, w_t: float, w_l: float, dtype: torch.dtype) -> torch.Tensor:
    """One tensor of a layer swap: a tensor taken whole from one expert in its own dtype is that
    expert's tensor; otherwise ``blend_ref`` of the experts whose weight is not zero (a zero-weight
    term is left out, not added as ``0 * x``: that would turn -0.0 into 0.0 and inf into NaN)."""
    if w_l == 0.0 and task.dtype == dtype:
        return task
    if w_t == 0.0 and lang.dtype == dtype:
        return lang
    if w_l == 0.0:
        return blend_ref([task], [w_t], dtype)
    if w_t == 0.0:
        return blend_ref([lang], [w_l], dtype)
    return blend_ref([task, lang], [w_t, w_l], dtype)


def assert_merged(out: Path, trio: dict[str, Path], dtype: torch.dtype | None = None, **rule) -> None:
    """Every tensor of the merged checkpoint ``out`` has the dtype and the bytes of ``swap_ref``
    under ``expected_weights(..., **rule)``, for the experts ``trio["task"]`` and
    ``trio["language"]`` (the layer count read from the task expert's tensor names)."""
    task, lang, merged = load_tensors(trio["task"]), load_tensors(trio["language"]), load_tensors(out)
    assert set(merged) == set(task)
    num_layers = 1 + max(layer for layer in map(layer_of, task) if layer is not None)
    for name, t in task.items():
        w_t, w_l = expected_weights(layer_of(name), num_layers, **rule)
        want = swap_ref(t, lang[name], w_t, w_l, dtype or t.dtype)
        assert merged[name].dtype == want.dtype, name
        assert raw_bytes(merged[name]) == raw_bytes(want), name


def average_mav(expert: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    """The paper's average MAV: the mean of row MAVs over all rows of all parameters."""
    return torch.cat([row_mav_ref(e, base[name]) for name, e in expert.items()]).mean().item()


def ties_reference(base: torch.Tensor, experts: list[torch.Tensor], density: float, lam: float) -> torch.Tensor:
    """TIES from its definition (Yadav et al. 2023): trim, elect, disjoint mean. Tie rule: every
    delta whose magnitude equals the k-th largest is kept."""
    b = base.float().flatten()
    k = int(density * b.numel())
    trimmed = []
    for e in experts:
        d = e.float().flatten() - b
        a = d.abs()
        tau = (a.kthvalue(a.numel() - k + 1).values if 0 < k < a.numel()
               else torch.tensor(math.inf) if k == 0 else torch.tensor(0.0))
        trimmed.append(torch.where(a >= tau, d, torch.zeros_like(d)))
    s = trimmed[0].clone()
    for t in trimmed[1:]:
        s = s + t
    gamma = torch.sign(s)
    num, cnt = torch.zeros_like(b), torch.zeros_like(b)
    for t in trimmed:
        agree = (torch.sign(t) == gamma) & (t != 0)
        num = num + torch.where(agree, t, torch.zeros_like(t))
        cnt = cnt + agree.float()
    mean = torch.where(cnt > 0, num / cnt.clamp(min=1), torch.zeros_like(num))
    return (b + lam * mean).to(base.dtype).reshape(base.shape)


def shards_without_metadata(out: Path) -> dict[str, tuple[dict, bytes]]:
    """What a loader sees of ``out``: per shard file, its header without ``__metadata__`` and its
    data. The metadata holds a copy of the recipe (input paths, options), which differs whenever
    its record does, even when the tensors do not."""
    shards = {}
    for shard in sorted(out.glob("*.safetensors")):
        raw = shard.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        header.pop("__metadata__", None)
        shards[shard.name] = (header, raw[8 + n:])
    assert shards, f"no shards in {out}"
    return shards


# ------------------------------------------------------------------------------- LoRA adapters

def make_adapter(base: Path, out: Path, seed: int, *, dtype: torch.dtype = torch.float32, **lora) -> Path:
    """A PEFT LoRA adapter of ``base`` with random, non-zero factors, saved by PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # PEFT's advice on tied embeddings and its own deprecations
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        wrapped = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
        with torch.no_grad():
            for name, p in wrapped.named_parameters():
                if "lora_" in name:
                    p.mul_(0.05)
        wrapped.to(dtype).save_pretrained(out)
    return out


def _pattern(patterns: dict, module: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_factors(adapter: Path):
    """Each module of the adapter as (base tensor name, rank, scale, B, A, transposed), read from its
    files by the definitions (s = alpha / r, or alpha / √r with rsLoRA; alpha per module from
    alpha_pattern; ΔW = s·B·A, transposed for embeddings and fan_in_fan_out layers)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_tensors(adapter)
    for key, a in tensors.items():
        m = re.fullmatch(re.escape(LORA_PREFIX) + r"(.+)\.lora_(embedding_)?A(\.weight)?", key)
        if not m:
            continue
        module, embedding = m[1], m[2] is not None
        b = tensors[key.replace("lora_embedding_A", "lora_embedding_B").replace("lora_A", "lora_B")]
        r = a.shape[0]
        alpha = _pattern(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        yield module + ".weight", r, scale, b, a, embedding or bool(config.get("fan_in_fan_out"))


def lora_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW in float64 for every module of the adapter, keyed by the base tensor's name."""
    deltas = {}
    for name, _, scale, b, a, transposed in lora_factors(adapter):
        delta = scale * (b.double() @ a.double())
        deltas[name] = delta.T if transposed else delta
    return deltas


def ulps(got: torch.Tensor, want64: torch.Tensor) -> int:
    """Largest distance in units of the last place of ``got``'s dtype between ``got`` and the
    float64 ``want64`` rounded to that dtype (on a monotone integer line of the bit patterns)."""
    want = want64.to(got.dtype)
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[got.dtype]

    def line(t: torch.Tensor) -> torch.Tensor:
        i = t.view(bits).long()
        sign_bit = 1 << (8 * t.element_size() - 1)
        return torch.where(i < 0, -(i + sign_bit), i)

    return int((line(got) - line(want)).abs().max()) if got.numel() else 0


# ------------------------------------------------------------------------------- a Hugging Face cache

def add_hub_snapshot(cache: Path, repo: str, source: Path, commit: str, refs: tuple[str, ...] = ()) -> Path:
    """``source``'s files as huggingface_hub caches them: blobs by hash, links in the snapshot."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    for f in sorted(source.iterdir()):
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (root / "blobs" / blob).write_bytes(data)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", blob))
    for ref in refs:
        set_hub_ref(cache, repo, ref, commit)
    return snapshot


def set_hub_ref(cache: Path, repo: str, ref: str, commit: str) -> None:
    path = cache / ("models--" + repo.replace("/", "--")) / "refs" / ref
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(commit)  # no newline, as huggingface_hub writes it


# ------------------------------------------------------------------------------- LoRA row-MAV bounds

def lora_abs_products(adapter: Path) -> dict[str, tuple[int, torch.Tensor]]:
    """Per module of the adapter (keyed by the base tensor's name): its rank r and, in float64 and
    in ΔW's orientation, ``s·|B|·|A|``, the magnitude that bounds the rounding of a float32
    ``s·B·A``: each element of it is within ``(r + 2)·2⁻²⁴`` times the same element of this."""
    out = {}
    for name, r, scale, b, a, transposed in lora_factors(adapter):
        product = scale * (b.double().abs() @ a.double().abs())
        out[name] = (r, product.T if transposed else product)
    return out


# ------------------------------------------------------------------------------- the command line

def run_cli(*args) -> "subprocess.CompletedProcess[str]":
    """``python -m layerswap_fast.cli ARGS`` in a child process (exit status and stderr as a user sees them)."""
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "layerswap_fast.cli", *map(str, args)], capture_output=True,
                          text=True)


def refused(args, root: Path, *needles: str, inputs: tuple[Path, ...] = ()) -> str:
    """The command ``args`` fails with exit status 2 and one line ``error: ...`` holding every
    needle, and writes, changes or removes nothing below ``root`` or the ``inputs`` directories;
    the line is returned."""
    roots = (root, *inputs)
    before = [fs_state(r) for r in roots]
    result = run_cli(*args)
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert [fs_state(r) for r in roots] == before
    return lines[0]


def make_adapter_trio(root: Path, num_layers: int) -> dict[str, Path]:
    """A bf16 base with tied embeddings, a full task expert, and three PEFT adapters of the base: a
    task adapter (rank 4, float32, attention and MLP, a rank_pattern and an alpha_pattern), a
    language adapter (rank 8, rsLoRA, bf16 factors, the embedding too, which PEFT saves beside its
    factors as the embedding's base layer) and an adapter on layers 0-2 and the last two only."""
    paths = make_llama_trio(root, num_layers=num_layers, tie=True, roles=("base", "task"))
    paths["task_lora"] = make_adapter(
        paths["base"], root / "task_lora", 1, r=4, lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        rank_pattern={"layers.3.self_attn.q_proj": 2}, alpha_pattern={"down_proj": 3})
    paths["language_lora"] = make_adapter(
        paths["base"], root / "language_lora", 2, dtype=torch.bfloat16, r=8, lora_alpha=4, use_rslora=True,
        target_modules=["q_proj", "v_proj", "up_proj", "embed_tokens"])
    paths["partial_lora"] = make_adapter(
        paths["base"], root / "partial_lora", 3, r=2, lora_alpha=2, target_modules=["o_proj"],
        layers_to_transform=[0, 1, 2, num_layers - 2, num_layers - 1])
    return paths


def edited_adapter(source: Path, to: Path, **changes) -> Path:
    """A copy of the adapter ``source`` at ``to`` whose adapter_config.json has ``changes``."""
    to.mkdir()
    for f in source.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    config = json.loads((to / "adapter_config.json").read_text())
    (to / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return to
