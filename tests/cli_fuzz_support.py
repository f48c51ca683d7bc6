"""Support for tests/test_cli_fuzz.py: tiny valid inputs, a sandboxed CLI runner, tree snapshots
that never open a special file, and the one oracle every fuzzed command run is judged by.

A *case* is one command line over inputs of which some were copied and mutated. The oracle:
exit 0 with a valid output (or none, for commands that write none), or exit 2 with exactly one
stderr line ``error: ...`` after any ``note:`` lines; never a traceback, a signal, a hang or a
memory blow-up; every input tree byte- and mtime-identical; nothing left beside the output.
A case may also carry a rule of issue 14 that makes exit 0 wrong (``must_fail``).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from support import write_safetensors_raw

NUM_LAYERS = 10
HIDDEN, INTER, VOCAB = 8, 16, 16
INDEX = "model.safetensors.index.json"
RECIPE = "layerswap_recipe.json"
CARD = "README.md"
#: the shards of every prepared checkpoint: whole layer blocks first, so that a merge can reuse
#: the language expert's bottom shard as it is (exercising --link), non-layer tensors last
SHARD_NAMES = ("model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
               "model-00003-of-00003.safetensors")
LAYER_PARAMS = {"self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
                "self_attn.v_proj.weight": (HIDDEN, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                "mlp.gate_proj.weight": (INTER, HIDDEN), "mlp.up_proj.weight": (INTER, HIDDEN),
                "mlp.down_proj.weight": (HIDDEN, INTER), "input_layernorm.weight": (HIDDEN,),
                "post_attention_layernorm.weight": (HIDDEN,)}

#: the address-space and wall-clock limits of one command (a tiny merge needs well under 1 GB)
MEMORY_LIMIT = int(os.environ.get("LAYERSWAP_CLI_FUZZ_MEMORY", str(3 << 30)))
TIMEOUT = float(os.environ.get("LAYERSWAP_CLI_FUZZ_TIMEOUT", "30"))
FILE_SIZE_LIMIT = 256 << 20  # a runaway write ends in SIGXFSZ, which the oracle reports

COUNTS: Counter[str] = Counter()


# ------------------------------------------------------------------------------- inputs

def _bf16(values: np.ndarray) -> bytes:
    """float32 -> bf16 bytes by truncation (exact enough for test inputs; all finite)."""
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()


def _tensors_by_shard(seed: int) -> list[dict[str, tuple[tuple[int, ...], bytes]]]:
    rng = np.random.default_rng(seed)
    shards: list[dict[str, tuple[tuple[int, ...], bytes]]] = [{}, {}, {}]
    for layer in range(NUM_LAYERS):
        for suffix, shape in LAYER_PARAMS.items():
            shards[0 if layer < 5 else 1][f"model.layers.{layer}.{suffix}"] = (shape, _bf16(rng.normal(size=shape)))
    for name, shape in (("model.embed_tokens.weight", (VOCAB, HIDDEN)), ("model.norm.weight", (HIDDEN,)),
                        ("lm_head.weight", (VOCAB, HIDDEN))):
        shards[2][name] = (shape, _bf16(rng.normal(size=shape)))
    return shards


def write_checkpoint(directory: Path, seed: int) -> None:
    """A Llama-shaped bf16 checkpoint of NUM_LAYERS layers in three shards, with an index,
    config.json and side files, written by hand (no transformers: the session starts fast)."""
    directory.mkdir(parents=True)
    weight_map, total = {}, 0
    for shard_name, tensors in zip(SHARD_NAMES, _tensors_by_shard(seed)):
        header: dict = {"__metadata__": {"format": "pt"}}
        data = b""
        for name, (shape, raw) in tensors.items():
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [len(data), len(data) + len(raw)]}
            data += raw
            weight_map[name] = shard_name
        total += len(data)
        write_safetensors_raw(directory / shard_name, header, data)
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": NUM_LAYERS, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": VOCAB, "torch_dtype": "bfloat16"}, indent=2))
    (directory / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}}}))
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))


@dataclass(frozen=True)
class Prepared:
    """The pristine inputs of the session; no case may change them."""
    root: Path
    base: Path
    task: Path
    language: Path
    stats: Path   # an `analyze` output of task and language against base
    merged: Path  # a `merge` output of task and language, with its recipe

    def trees(self) -> list[Path]:
        return [self.base, self.task, self.language, self.stats, self.merged]


def prepare(root: Path) -> Prepared:
    base, task, language = root / "base", root / "task", root / "language"
    for i, d in enumerate((base, task, language)):
        write_checkpoint(d, seed=i)
    stats, merged = root / "stats", root / "merged"
    for argv in (["analyze", "--base", base, "--expert", task, "--expert", language, "-o", stats],
                 ["merge", "--task-expert", task, "--language-expert", language, "-o", merged]):
        r = run_cli([str(a) for a in argv], cwd=root)
        assert r.returncode == 0 and not r.timed_out, f"preparing {argv[0]} failed: {r.stderr}"
    return Prepared(root, base, task, language, stats, merged)


# ------------------------------------------------------------------------------- running

@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_cli(argv: list[str], cwd: Path, stdin: bytes = b"") -> Result:
    """``python -m layerswap_fast.cli ARGV`` in its own session, under the memory and time limits;
    a run past the timeout is killed with its whole process group."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "layerswap_fast.cli", *argv], cwd=cwd, env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=_limits, start_new_session=True)
    try:
        out, err = p.communicate(stdin, timeout=TIMEOUT)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        timed_out = True
    return Result(p.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), timed_out,
                  time.monotonic() - start)


# ------------------------------------------------------------------------------- snapshots

def _file_state(path: str, st: os.stat_result) -> tuple:
    """What a file is, without ever opening anything but a regular file (a FIFO would block,
    /dev/zero never ends, /proc files change on every read)."""
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            digest = hashlib.blake2b(f.read(), digest_size=16).hexdigest()
        return ("file", st.st_size, st.st_mtime_ns, st.st_ino, digest)
    return (stat.filemode(st.st_mode)[0], st.st_ino)


def tree_state(root: Path) -> dict[str, tuple]:
    """Every entry below ``root`` (and root itself): symlinks with their text and the state of
    what they resolve to, regular files with size, mtime, inode and a digest of their bytes.
    Symlinked directories are not descended into (a loop must not hang the harness)."""
    state: dict[str, tuple] = {}

    def visit(path: str, rel: str) -> None:
        try:
            st = os.lstat(path)
        except OSError as e:
            state[rel] = ("missing", e.errno)
            return
        if stat.S_ISLNK(st.st_mode):
            try:
                target = _file_state(path, os.stat(path))
            except OSError as e:
                target = ("dangling", e.errno)
            state[rel] = ("link", os.readlink(path), target)
        elif stat.S_ISDIR(st.st_mode):
            names = sorted(os.listdir(path))
            state[rel] = ("dir", tuple(names))
            for name in names:
                visit(os.path.join(path, name), f"{rel}/{name}")
        else:
            state[rel] = _file_state(path, st)

    visit(str(root), ".")
    return state


def diff_states(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    return [f"{k}: {before.get(k)} -> {after.get(k)}" for k in sorted(set(before) | set(after))
            if before.get(k) != after.get(k)][:5]


# ------------------------------------------------------------------------------- cases

@dataclass
class Case:
    """One command line and what was done to its inputs. ``out`` is the output it would write
    (None for plan, verify, dry runs); ``must_fail`` the rule of issue 14 that forbids exit 0."""
    label: str
    argv: list[str]
    work: Path
    out: Path | None = None
    out_kind: str = "model"
    mutations: list[str] = field(default_factory=list)
    must_fail: str | None = None
    aux_source: Path | None = None  # the directory whose side files an output may copy
    finite: bool = True  # False where a huge finite factor may rightly overflow to inf

    def fail_if_accepted(self, why: str) -> None:
        self.must_fail = self.must_fail or why

    def reproducer(self, prepared: Prepared) -> str:
        names = {str(self.work): "$WORK", str(prepared.root): "$INPUTS"}
        text = f"{shlex.join(['layerswap-fast', *self.argv])}  # cwd $WORK/run; mutations: " \
               f"{'; '.join(self.mutations) or 'none'}"
        for path, name in names.items():
            text = text.replace(path, name)
        return text


def judge(case: Case, prepared: Prepared, result: Result, before: dict[str, dict], after: dict[str, dict]) -> list[str]:
    """The problems of one finished case, each starting with its class (empty: it passed)."""
    problems = []
    err_lines = result.stderr.splitlines()
    if result.timed_out:
        problems.append(f"hang: no exit within {TIMEOUT:.0f} s")
    elif result.returncode < 0:
        problems.append(f"signal: killed by {signal.Signals(-result.returncode).name}")
    elif "Traceback (most recent call last)" in result.stderr:
        last = next((line for line in reversed(err_lines) if line and not line.startswith(" ")), "?")
        problems.append(f"traceback: {last.split(':')[0]}: {last[:200]}")
    elif result.returncode == 2:
        body = [line for line in err_lines if not line.startswith("note: ")]
        if len(body) != 1 or not body[0].startswith("error: ") or not result.stderr.endswith("\n"):
            problems.append(f"error not one line: {result.stderr[-300:]!r}")
    elif result.returncode == 0:
        noise = [line for line in err_lines if not line.startswith("note: ")]
        if noise:
            problems.append(f"stderr noise on success: {noise[:2]!r}")
        if case.must_fail:
            problems.append(f"accepted: {case.must_fail}")
    else:
        problems.append(f"exit status {result.returncode}: {result.stderr[-300:]!r}")
    for root, state in before.items():
        if after[root] != state:
            problems.append(f"input changed: {root}: {diff_states(state, after[root])}")
    problems += _leftovers(case, result)
    if result.returncode == 0 and not problems and case.out is not None:
        problems += check_output_tree(case)
    return problems


def _leftovers(case: Case, result: Result) -> list[str]:
    """Nothing but the published output may appear in the work area; on failure nothing at all."""
    found = [name for _, dirs, files in os.walk(case.work) for name in dirs + files
             if "layerswap-partial" in name or "layerswap-old" in name]
    return [f"leftover: {sorted(found)[:3]}"] if found else []


def check_output_tree(case: Case) -> list[str]:
    out = case.out
    assert out is not None
    if not out.is_dir():
        return [f"invalid output: exit 0 but {out} is not a directory"]
    if case.out_kind == "analysis":
        try:
            json.loads((out / "summary.json").read_text())
        except (OSError, ValueError) as e:
            return [f"invalid output: summary.json: {e}"]
        missing = [n for n in ("mav.csv", "heatmap.png") if not (out / n).is_file()]
        return [f"invalid output: missing {missing}"] if missing else []
    return _check_model(out, case.aux_source, case.finite)


def _check_model(out: Path, aux_source: Path | None, finite: bool = True) -> list[str]:
    """A published model opens with the safetensors library, every tensor finite (the inputs
    are), it passes `verify`, and its side files are copies of regular files of the task expert."""
    import torch
    from safetensors import safe_open

    try:
        weight_map = json.loads((out / INDEX).read_text())["weight_map"]
        for shard in sorted(set(weight_map.values())):
            with safe_open(str(out / shard), framework="pt") as f:
                for name in f.keys():
                    if finite and not torch.isfinite(f.get_tensor(name).float()).all():
                        return [f"invalid output: {shard}: tensor {name} is not finite"]
    except Exception as e:  # noqa: BLE001 - any failure to read it back is the finding
        return [f"invalid output: cannot read it back: {type(e).__name__}: {e}"]
    from layerswap_fast.formats.verify import verify
    try:
        verify(out)
    except Exception as e:  # noqa: BLE001
        return [f"invalid output: verify refuses what the command wrote: {e}"]
    problems = []
    card = (out / CARD).read_text(encoding="utf-8")
    for where in {out.resolve().parent, *([aux_source.resolve().parent] if aux_source is not None else [])}:
        if str(where) in card:
            problems.append(f"the model card leaks the local path {where}")
    for p in out.iterdir():
        if p.name in (INDEX, RECIPE, CARD) or p.name.endswith(".safetensors"):
            continue
        # a side file may be a link (the Hugging Face cache uses them), but only to a regular
        # file inside the source checkpoint
        src = (aux_source / p.name).resolve() if aux_source is not None else None
        if src is None or aux_source.resolve() not in src.parents or not src.is_file() or (
                p.name != "config.json" and src.read_bytes() != p.read_bytes()):
            problems.append(f"side file leaked: {p.name} is not a copy of a regular file of the source")
    return problems


def fresh_copy(src: Path, dest: Path, hardlink_shards: bool = True) -> Path:
    """A private copy of a prepared tree to mutate; unmutated shards are hard links (cheap),
    so a mutation must replace a file, never write into it (`replace_file`)."""
    def copy(s: str, d: str) -> None:
        if hardlink_shards and s.endswith(".safetensors"):
            os.link(s, d)
        else:
            shutil.copy2(s, d)
    shutil.copytree(src, dest, copy_function=copy)
    return dest


def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` as a new file at ``path`` (breaking any hard link to a pristine input)."""
    if path.is_symlink() or path.exists():
        path.unlink()
    path.write_bytes(data)


def read_shard(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def encode_shard(header: dict | bytes, data: bytes, length: int | None = None) -> bytes:
    if isinstance(header, dict):
        try:
            header = json.dumps(header, ensure_ascii=False).encode()
        except UnicodeEncodeError:  # a lone surrogate: keep it as a JSON escape
            header = json.dumps(header).encode()
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def write_counts() -> None:
    """Add this session's cases per command to $LAYERSWAP_CLI_FUZZ_COUNTS (a JSON object)."""
    path = os.environ.get("LAYERSWAP_CLI_FUZZ_COUNTS")
    if not path or not COUNTS:
        return
    counts = Counter(json.loads(Path(path).read_text())) if Path(path).is_file() else Counter()
    counts.update(COUNTS)
    Path(path).write_text(json.dumps(dict(sorted(counts.items())), indent=1) + "\n")
