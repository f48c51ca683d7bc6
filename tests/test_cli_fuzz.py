"""A fuzz harness for the command line (issue 14): small valid inputs, mutated, run through every
command in a subprocess under memory and time limits, and judged by one oracle
(tests/cli_fuzz_support.py): exit 0 with a valid output, or exit 2 with one ``error:`` line;
never a traceback, signal, hang or blow-up; inputs untouched; nothing left beside the output.

Examples per property: $LAYERSWAP_CLI_FUZZ_EXAMPLES (the default keeps the file near a minute on
two cores). The long run is scripts/fuzz.sh. With $LAYERSWAP_CLI_FUZZ_FINDINGS set to a file, a
failing case is appended there as a JSON line and the run goes on (to collect every class of
failure in one long run); without it the first failing case fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cli_fuzz_support as fz
from cli_fuzz_support import Case, Prepared

EXAMPLES = int(os.environ.get("LAYERSWAP_CLI_FUZZ_EXAMPLES", "10"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                derandomize=not os.environ.get("LAYERSWAP_CLI_FUZZ_RANDOM"), database=None)

#: command -> the roles of inputs it reads
COMMANDS = {
    "plan": ("task", "language"), "plan --json": ("task", "language"), "merge": ("task", "language"),
    "merge --dry-run": ("task", "language"), "merge --config": ("task", "language"),
    "merge magnitude": ("task", "language", "base"), "merge magnitude --stats": ("task", "language", "base", "stats"),
    "soup": ("task", "language"), "soup magnitude --stats": ("task", "language", "base", "stats"),
    "task-arithmetic": ("base", "task", "language"), "ties": ("base", "task", "language"),
    "revert": ("base", "task"), "analyze": ("base", "task", "language"), "verify": ("merged",),
}
WRITERS = [c for c in COMMANDS if c not in ("plan", "plan --json", "merge --dry-run", "verify")]
CHECKPOINT_COMMANDS = [c for c in COMMANDS if c != "verify"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prepared]:
    yield fz.prepare(tmp_path_factory.mktemp("cli-fuzz-inputs"))
    fz.write_counts()


@pytest.fixture(scope="module")
def cases_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli-fuzz-cases")


class Work:
    """The private area of one example: ``in/`` for mutated copies, ``run/`` the cwd (and the
    parent of the output)."""

    def __init__(self, root: Path, prepared: Prepared) -> None:
        self.path = Path(tempfile.mkdtemp(dir=root))
        self.inputs, self.run = self.path / "in", self.path / "run"
        self.inputs.mkdir()
        self.run.mkdir()
        self.roles = {"base": prepared.base, "task": prepared.task, "language": prepared.language,
                      "stats": prepared.stats, "merged": prepared.merged}
        self.prepared = prepared
        self.not_inputs: set[Path] = set()  # copies made only to serve as an output

    def mutable(self, role: str) -> Path:
        """A private copy of an input role (made once), which the case reads instead."""
        dest = self.inputs / role
        if not dest.exists():
            fz.fresh_copy(self.roles[role], dest)
            self.roles[role] = dest
        return dest

    def cleanup(self) -> None:
        for d, _, _ in os.walk(self.path):  # a case may leave a read-only directory behind
            os.chmod(d, 0o755)
        shutil.rmtree(self.path, ignore_errors=True)


def command_line(work: Work, command: str, out: Path | None = None) -> Case:
    r = {k: str(v) for k, v in work.roles.items()}
    out = out if out is not None else work.run / "out"
    swap = ["--task-expert", r["task"], "--language-expert", r["language"]]
    trio = ["--base", r["base"], "--model", r["task"], "--model", r["language"]]
    argv = {
        "plan": ["plan", *swap], "plan --json": ["plan", *swap, "--json"],
        "merge": ["merge", *swap, "-o", str(out)], "merge --dry-run": ["merge", *swap, "-o", str(out), "--dry-run"],
        "merge magnitude": ["merge", *swap, "--base", r["base"], "--transition-weights", "magnitude", "-o", str(out)],
        "merge magnitude --stats": ["merge", *swap, "--base", r["base"], "--stats", r["stats"],
                                    "--transition-weights", "magnitude", "-o", str(out)],
        "soup": ["soup", "--model", r["task"], "--model", r["language"], "-o", str(out)],
        "soup magnitude --stats": ["soup", "--model", r["task"], "--model", r["language"], "--weights", "magnitude",
                                   "--base", r["base"], "--stats", r["stats"], "-o", str(out)],
        "task-arithmetic": ["task-arithmetic", *trio, "-o", str(out)], "ties": ["ties", *trio, "-o", str(out)],
        "revert": ["revert", "--base", r["base"], "--model", r["task"], "--layers", "0-2", "-o", str(out)],
        "analyze": ["analyze", "--base", r["base"], "--expert", r["task"], "--expert", r["language"], "-o", str(out)],
        "verify": ["verify", r["merged"]],
    }.get(command)
    if command == "merge --config":
        config = work.inputs / "recipe.yaml"
        if not config.exists():
            config.write_text(f"command: merge\noptions:\n  task_expert: [{json.dumps(r['task'])}]\n"
                              f"  language_expert: [{json.dumps(r['language'])}]\n  bottom: 4\n")
        argv = ["merge", "--config", str(config), "-o", str(out)]
    assert argv is not None, command
    writes = command in WRITERS
    return Case(command, argv, work.path, out if writes else None, "analysis" if command == "analyze" else "model",
                aux_source=work.roles["task"])


def run_case(work: Work, case: Case) -> None:
    """Run one case, judge it, and fail (or, collecting, record it)."""
    # each input copy on its own, so that a copy the command does not read may be its output
    roots = [*work.prepared.trees(), *(p for p in sorted(work.inputs.iterdir()) if p not in work.not_inputs)]
    before = {str(p): fz.tree_state(p) for p in roots}
    run_before = fz.tree_state(work.run)
    result = fz.run_cli(case.argv, cwd=work.run)
    fz.COUNTS[case.label] += 1
    after = {str(p): fz.tree_state(p) for p in roots}
    problems = fz.judge(case, work.prepared, result, before, after)
    run_after = fz.tree_state(work.run) if work.run.is_dir() else {}
    if result.returncode == 0 and case.out is not None and case.out.parent == work.run:
        prefix = f"./{case.out.name}"
        run_after = {k: v for k, v in run_after.items() if k != prefix and not k.startswith(prefix + "/")}
        run_after["."] = ("dir", tuple(n for n in run_after["."][1] if n != case.out.name))
        run_before = {**run_before, ".": ("dir", tuple(n for n in run_before["."][1] if n != case.out.name))}
        run_before = {k: v for k, v in run_before.items() if k != prefix and not k.startswith(prefix + "/")}
    if not result.timed_out and run_after != run_before and (result.returncode != 0 or case.out is None
                                                             or case.out.parent == work.run):
        problems.append(f"wrote beside the output: {fz.diff_states(run_before, run_after)}")
    if not problems:
        return
    reproducer = case.reproducer(work.prepared)
    findings = os.environ.get("LAYERSWAP_CLI_FUZZ_FINDINGS")
    if findings:
        with open(findings, "a", encoding="utf-8") as f:
            for p in problems:
                f.write(json.dumps({"class": p.split(":")[0], "command": case.label, "problem": p[:600],
                                    "reproducer": reproducer, "stderr": result.stderr[-600:]}) + "\n")
        return
    raise AssertionError(f"{reproducer}\n" + "\n".join(problems) + f"\nstderr: {result.stderr[-2000:]}")


@pytest.fixture
def work_factory(prepared: Prepared, cases_root: Path) -> Iterator:
    made: list[Work] = []

    def make() -> Work:
        made.append(Work(cases_root, prepared))
        return made[-1]
    yield make
    for w in made:
        w.cleanup()


def in_work(work_factory, body) -> None:  # type: ignore[no-untyped-def]
    """Run ``body(work)`` in a fresh work area, removed afterwards (each example its own)."""
    from contextlib import suppress
    work = work_factory()
    try:
        body(work)
    finally:
        with suppress(Exception):
            work.cleanup()


# ------------------------------------------------------------------------------- strategies

weird_ints = st.sampled_from([-1, 0, 1, 3, 10, 11, 2**31, 2**63 - 1, 2**64, 10**12, 10**30])
weird_json = st.sampled_from([None, True, False, 2.5, 1e308, float("inf"), float("nan"), "5", "", "x" * 300,
                              [], [1], {}, {"a": 1}, -1, 10**20, "\ud800"])
surprising_names = st.sampled_from([
    "model.layers.10000000000.self_attn.q_proj.weight", "model.layers.99.mlp.up_proj.weight",
    "model.layers.-1.mlp.up_proj.weight", "model.layers.1e3.mlp.up_proj.weight",
    "model.layers.\u0663.mlp.up_proj.weight", "model.layers.007.mlp.up_proj.weight", "\ud800", "model.\udfff.x",
    "é/ü\u202e", "", " ", "__metadata__", "model.layers.0.self_attn.q_proj.weight", "a" * 5000, "x\ny", "\x00"])


def _deep(depth: int, kind: str = "list") -> str:
    return "[" * depth + "]" * depth if kind == "list" else '{"a":' * depth + "1" + "}" * depth


# ------------------------------------------------------------------------------- properties

@fuzz
@given(data=st.data())
def test_shard_header_mutations(work_factory, data: st.DataObject) -> None:  # type: ignore[no-untyped-def]
    """Header fields and raw bytes of one shard of one input: offsets, dtypes, shapes, names
    (non-ASCII, surrogates, huge layer indices), the length prefix, truncation."""
    command = data.draw(st.sampled_from(CHECKPOINT_COMMANDS), "command")
    role = data.draw(st.sampled_from([r for r in COMMANDS[command] if r != "stats"]), "role")
    shard_name = data.draw(st.sampled_from(fz.SHARD_NAMES), "shard")
    mutation = data.draw(st.sampled_from(["offsets", "dtype", "shape", "rename", "delete", "extra key", "metadata",
                                          "length prefix", "truncate", "append", "flip byte", "not utf-8",
                                          "padding", "deep"]), "mutation")

    def body(work: Work) -> None:
        d = work.mutable(role)
        path = d / shard_name
        header, payload = fz.read_shard(path)
        names = [n for n in header if n != "__metadata__"]
        target = data.draw(st.sampled_from(names), "tensor")
        entry = header[target]
        raw: bytes | None = None
        if mutation == "offsets":
            i = data.draw(st.integers(0, 1), "which offset")
            entry["data_offsets"][i] = data.draw(st.one_of(
                st.integers(-3, 3).map(lambda k: entry["data_offsets"][i] + k), weird_ints, weird_json), "offset")
        elif mutation == "dtype":
            entry["dtype"] = data.draw(st.one_of(st.sampled_from(
                ["F32", "F16", "I64", "BOOL", "F8_E4M3", "U8", "bf16", "X", "F64", "C64"]), weird_json), "dtype")
        elif mutation == "shape":
            entry["shape"] = data.draw(st.one_of(
                st.lists(weird_ints, max_size=3), st.just([]), st.just(entry["shape"] + [1]),
                st.just(list(reversed(entry["shape"]))), weird_json), "shape")
        elif mutation == "rename":
            new = data.draw(surprising_names, "new name")
            header[new] = header.pop(target)
            if data.draw(st.booleans(), "rename in the index too"):
                index_path = d / fz.INDEX
                index = json.loads(index_path.read_text())
                index["weight_map"][new] = index["weight_map"].pop(target)
                fz.replace_file(index_path, json.dumps(index).encode())
        elif mutation == "delete":
            del header[target]
        elif mutation == "extra key":
            entry[data.draw(st.sampled_from(["offsets", "dtype ", "extra"]), "key")] = data.draw(weird_json, "value")
        elif mutation == "metadata":
            header["__metadata__"] = data.draw(st.one_of(weird_json, st.dictionaries(
                st.sampled_from(["format", "layerswap_fast", "x"]), weird_json, max_size=2)), "metadata")
        text = json.dumps(header).encode()
        if mutation == "length prefix":
            raw = fz.encode_shard(text, payload, length=data.draw(st.one_of(
                st.integers(-8, 8).map(lambda k: max(0, len(text) + k)), st.sampled_from([0, 2**63, 2**64 - 1,
                                                                                           100 << 20])), "length"))
        elif mutation == "truncate":
            raw = fz.encode_shard(header, payload)[:-data.draw(st.integers(1, 64), "bytes cut")]
        elif mutation == "append":
            raw = fz.encode_shard(header, payload) + data.draw(st.binary(min_size=1, max_size=16), "tail")
        elif mutation == "flip byte":
            raw = bytearray(fz.encode_shard(header, payload))
            at = data.draw(st.integers(8, 8 + len(text) - 1), "at")
            raw[at] ^= data.draw(st.integers(1, 255), "xor")
            raw = bytes(raw)
        elif mutation == "not utf-8":
            raw = fz.encode_shard(text.replace(b'"F', b'"\xff', 1) if b'"F' in text else b"\xff" + text, payload)
        elif mutation == "padding":
            raw = fz.encode_shard(text + b" " * data.draw(st.integers(1, 9), "spaces"), payload)
        elif mutation == "deep":
            raw = fz.encode_shard(b'{"__metadata__":' + _deep(50000).encode() + b"}", payload)
        fz.replace_file(path, raw if raw is not None else fz.encode_shard(header, payload))
        case = command_line(work, command)
        case.mutations.append(f"{role}/{shard_name}: {mutation} of {target!r}")
        run_case(work, case)

    in_work(work_factory, body)


@fuzz
@given(data=st.data())
def test_index_mutations(work_factory, data: st.DataObject) -> None:  # type: ignore[no-untyped-def]
    """The index: missing, extra and duplicate entries; paths with ``..``, absolute, to symlinks
    and special files; the index itself a FIFO, a link to /dev/zero, not UTF-8, deeply nested."""
    command = data.draw(st.sampled_from(CHECKPOINT_COMMANDS), "command")
    role = data.draw(st.sampled_from([r for r in COMMANDS[command] if r != "stats"]), "role")
    mutation = data.draw(st.sampled_from([
        "drop entry", "extra entry", "duplicate key", "dotdot path", "absolute path", "other shard",
        "shard -> other expert", "shard -> /dev/zero", "shard is fifo", "shard -> loop", "shard is dir",
        "index is fifo", "index -> /dev/zero", "index is dir", "index not utf-8", "index deep", "index list",
        "weight_map list", "metadata weird", "index empty"]), "mutation")

    def body(work: Work) -> None:
        d = work.mutable(role)
        index_path = d / fz.INDEX
        index = json.loads(index_path.read_text())
        wm = index["weight_map"]
        name = data.draw(st.sampled_from(sorted(wm)), "tensor")
        text: bytes | None = None
        shard = d / wm[name]
        if mutation == "drop entry":
            del wm[name]
        elif mutation == "extra entry":
            wm[data.draw(surprising_names, "extra name")] = data.draw(st.sampled_from(
                [fz.SHARD_NAMES[0], "missing.safetensors", "config.json"]), "extra file")
        elif mutation == "duplicate key":
            text = json.dumps(index).replace(json.dumps(name) + ":", f"{json.dumps(name)}: \"x\", {json.dumps(name)}:",
                                             1).encode()
        elif mutation == "dotdot path":
            other = work.mutable("language" if role != "language" else "task")
            wm[name] = f"../{other.name}/{wm[name]}"
        elif mutation == "absolute path":
            wm[name] = str(shard)
        elif mutation == "other shard":
            wm[name] = next(s for s in fz.SHARD_NAMES if s != wm[name])
        elif mutation == "shard -> other expert":
            other = "language" if role != "language" else "task"
            shard.unlink()
            shard.symlink_to(work.prepared.trees()[["base", "task", "language"].index(other)] / shard.name)
        elif mutation == "shard -> /dev/zero":
            shard.unlink()
            shard.symlink_to("/dev/zero")
        elif mutation == "shard is fifo":
            shard.unlink()
            os.mkfifo(shard)
        elif mutation == "shard -> loop":
            shard.unlink()
            shard.symlink_to(shard.name)
        elif mutation == "shard is dir":
            shard.unlink()
            shard.mkdir()
        elif mutation == "index is fifo":
            index_path.unlink()
            os.mkfifo(index_path)
        elif mutation == "index -> /dev/zero":
            index_path.unlink()
            index_path.symlink_to("/dev/zero")
        elif mutation == "index is dir":
            index_path.unlink()
            index_path.mkdir()
        elif mutation == "index not utf-8":
            text = json.dumps(index).encode().replace(b"model", b"mod\xe9l", 1)
        elif mutation == "index deep":
            text = b'{"metadata":' + _deep(100000).encode() + b',"weight_map":' + json.dumps(wm).encode() + b"}"
        elif mutation == "index list":
            text = json.dumps([index]).encode()
        elif mutation == "weight_map list":
            index["weight_map"] = list(wm.items())
        elif mutation == "metadata weird":
            index["metadata"] = data.draw(weird_json, "metadata")
        elif mutation == "index empty":
            text = b""
        if index_path.is_file() and not index_path.is_symlink():
            fz.replace_file(index_path, text if text is not None else json.dumps(index).encode())
        case = command_line(work, command)
        case.mutations.append(f"{role}: {mutation} ({name!r})")
        if mutation in ("shard -> /dev/zero", "shard is fifo", "index is fifo", "index -> /dev/zero"):
            case.fail_if_accepted("an input file that is not a regular file (issue 14, class 9)")
        run_case(work, case)

    in_work(work_factory, body)


@fuzz
@given(data=st.data())
def test_config_json_mutations(work_factory, data: st.DataObject) -> None:  # type: ignore[no-untyped-def]
    """config.json: layer counts of every type and size, deep nesting, not UTF-8, not an object."""
    command = data.draw(st.sampled_from(CHECKPOINT_COMMANDS), "command")
    role = data.draw(st.sampled_from([r for r in COMMANDS[command] if r != "stats"]), "role")
    mutation = data.draw(st.sampled_from(["layers", "text_config layers", "delete layers", "deep", "deep value",
                                          "not utf-8", "list", "empty", "fifo", "-> /dev/zero", "-> /etc/passwd",
                                          "huge"]), "mutation")

    def body(work: Work) -> None:
        d = work.mutable(role)
        path = d / "config.json"
        config = json.loads(path.read_text())
        value = None
        raw: bytes | None = None
        if mutation in ("layers", "text_config layers"):
            value = data.draw(st.one_of(weird_ints, weird_json, st.sampled_from([1e12, 10.0, 9, 11])), "layers")
            if mutation == "layers":
                config["num_hidden_layers"] = value
            else:
                del config["num_hidden_layers"]
                config["text_config"] = {"num_hidden_layers": value}
        elif mutation == "delete layers":
            del config["num_hidden_layers"]
        elif mutation == "deep":
            raw = _deep(100000, data.draw(st.sampled_from(["list", "dict"]), "kind")).encode()
        elif mutation == "deep value":
            raw = json.dumps(config)[:-1].encode() + b', "x": ' + _deep(100000).encode() + b"}"
        elif mutation == "not utf-8":
            raw = json.dumps(config).encode().replace(b"llama", b"ll\xffma")
        elif mutation == "list":
            raw = json.dumps([config]).encode()
        elif mutation == "empty":
            raw = b""
        elif mutation == "huge":
            raw = json.dumps({**config, "pad": "x" * (80 << 20)}).encode()
        path.unlink()
        if mutation == "fifo":
            os.mkfifo(path)
        elif mutation.startswith("->"):
            path.symlink_to(mutation[3:])
        else:
            path.write_bytes(raw if raw is not None else json.dumps(config).encode())
        case = command_line(work, command)
        case.mutations.append(f"{role}/config.json: {mutation}" + (f" = {value!r}" if value is not None else ""))
        swap = command.startswith(("plan", "merge"))
        # null means "not given" (real configs carry nulls), so the names decide, as without the key
        if swap and mutation in ("layers", "text_config layers") and value is not None \
                and not (type(value) is int and value == fz.NUM_LAYERS):
            case.fail_if_accepted("a layer count that is not the integer the names show (issue 14, class 8)")
        if mutation in ("fifo", "-> /dev/zero", "-> /etc/passwd") and role == "task" and command in WRITERS \
                and command != "analyze":
            case.fail_if_accepted("a side file that is not a regular file inside the checkpoint (issue 14, class 2)")
        run_case(work, case)

    in_work(work_factory, body)


MERGE_OPTIONS = ["bottom", "top", "lower_transition", "upper_transition", "transition_weights", "non_layer",
                 "soup_weights", "dtype", "shard_size", "threads", "device", "gpu_memory", "link", "checksum",
                 "sync", "dry_run", "base", "stats", "task_expert", "language_expert"]
INT_OPTIONS = {"bottom", "top", "lower_transition", "upper_transition", "threads"}
yaml_values = st.sampled_from(["[1]", ".inf", "2.7", "-1", "null", "true", "{}", "[]", "'x'", "1e400", "99999999999999999999",
                               "!!binary aGVsbG8=", "[[1]]", "'5'", "nan", "\"\\ud800\""])


@fuzz
@given(data=st.data())
def test_yaml_config_mutations(work_factory, data: st.DataObject) -> None:  # type: ignore[no-untyped-def]
    """``merge --config``: wrong types for every option, unknown keys, output/force keys, aliases,
    deep nesting, an empty or list ``options``, not UTF-8, YAML syntax errors, a FIFO."""
    mutation = data.draw(st.sampled_from(["option value", "unknown key", "force", "output", "alias", "alias bomb",
                                          "deep", "options empty", "options list", "flat", "command mismatch",
                                          "not utf-8", "syntax", "top-level list", "fifo", "tabs"]), "mutation")

    def body(work: Work) -> None:
        r = {k: str(v) for k, v in work.roles.items()}
        lines = ["command: merge", "options:", f"  task_expert: [{json.dumps(r['task'])}]",
                 f"  language_expert: [{json.dumps(r['language'])}]"]
        must_fail = None
        key = None
        if mutation == "option value":
            key = data.draw(st.sampled_from(MERGE_OPTIONS), "option")
            value = data.draw(yaml_values, "value")
            lines = [ln for ln in lines if not ln.startswith(f"  {key}:")] + [f"  {key}: {value}"]
            if value in ("[1]", "{}", "[[1]]", "!!binary aGVsbG8=") and key not in ("task_expert", "language_expert"):
                must_fail = f"a {value} where {key} takes one value (issue 14, class 9)"
            if key in INT_OPTIONS and value in (".inf", "2.7", "1e400", "true", "nan"):
                must_fail = f"{key}: {value} is not an integer (issue 14, class 9)"
        elif mutation == "unknown key":
            lines.append(f"  {data.draw(st.sampled_from(['bogus', 'Bottom', 'lam', '-o', '', '1']), 'key')}: 1")
        elif mutation in ("force", "output"):
            lines.append("  force: true" if mutation == "force" else f"  output: {json.dumps(str(work.run / 'elsewhere'))}")
            must_fail = "a config file that sets the output or --force (issue 14, class 3)"
        elif mutation == "alias":
            lines = ["experts: &e [" + json.dumps(r["task"]) + "]", *lines[:2], "  task_expert: *e", lines[3]]
            must_fail = "a YAML alias (issue 14, class 9)"
        elif mutation == "alias bomb":
            # nine levels of nine references each, the top one under a key the loader skips
            bomb = ["k0: &a0 [x, x, x, x, x, x, x, x, x]"]
            bomb += [f"k{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
            lines = bomb + [f"tool: [{', '.join(['*a8'] * 9)}]"] + lines
            must_fail = "a YAML alias (issue 14, class 9)"
        elif mutation == "deep":
            lines.append("  bottom: " + _deep(20000))
        elif mutation == "options empty":
            lines = ["command: merge", "options:"]
        elif mutation == "options list":
            lines = ["command: merge", "options: [1, 2]"]
        elif mutation == "flat":
            lines = ["command: merge", *[ln.strip() for ln in lines[2:]]]
        elif mutation == "command mismatch":
            lines[0] = "command: " + data.draw(st.sampled_from(["soup", "[merge]", "null", "1"]), "command")
        elif mutation == "syntax":
            lines.append(data.draw(st.sampled_from(["  bottom: [1", "  : :", "\tbottom: 1", "  bottom: 'x"]), "line"))
        elif mutation == "top-level list":
            lines = ["- command: merge"]
        elif mutation == "tabs":
            lines = [ln.replace("  ", "\t") for ln in lines]
        config = work.inputs / "recipe.yaml"
        if mutation == "fifo":
            os.mkfifo(config)
            must_fail = "a config that is not a regular file (issue 14, class 9)"
        elif mutation == "not utf-8":
            config.write_bytes(("\n".join(lines) + "\n").encode() + b"# \xff\xfe\n")
        else:
            config.write_text("\n".join(lines) + "\n")
        case = command_line(work, "merge --config")
        if mutation == "option value" and key == "dry_run":
            case.out = None
        case.mutations.append(f"recipe.yaml: {mutation}: {' | '.join(lines)[-300:]}")
        if must_fail:
            case.fail_if_accepted(must_fail)
        run_case(work, case)

    in_work(work_factory, body)


RECIPE_MUTATIONS = ["none", "options changed", "list for string", "drop shards", "empty shards", "shard size",
                    "checksum algorithm", "digest", "command", "deep", "not utf-8", "inputs changed",
                    "edit config.json", "edit tokenizer", "add file", "index metadata", "index and recipe emptied",
                    "flip shard byte", "recipe is fifo", "recipe -> /dev/zero", "delete side file"]


@fuzz
@given(data=st.data())
def test_output_and_recipe_mutations(work_factory, data: st.DataObject) -> None:  # type: ignore[no-untyped-def]
    """A merge output, changed: ``verify`` must see every change; ``merge --config RECIPE``
    (rebuilding from a recipe, the documented use) must rebuild or refuse in one line."""
    mutation = data.draw(st.sampled_from(RECIPE_MUTATIONS), "mutation")
    command = data.draw(st.sampled_from(["verify", "rebuild"]), "command")

    def body(work: Work) -> None:
        d = work.mutable("merged")
        recipe_path = d / fz.RECIPE
        recipe = json.loads(recipe_path.read_text())
        raw: bytes | None = None
        if mutation == "options changed":
            recipe["options"][data.draw(st.sampled_from(sorted(recipe["options"])), "option")] = data.draw(
                st.sampled_from([7, "ramp", None, "1KB", ["x"]]), "value")
        elif mutation == "list for string":
            key = data.draw(st.sampled_from(["checksum", "command", "method", "dtype", "tool", "version"]), "key")
            recipe[key] = [recipe.get(key)]
        elif mutation == "drop shards":
            recipe["shards"] = recipe["shards"][1:]
        elif mutation == "empty shards":
            recipe["shards"] = []
        elif mutation == "shard size":
            recipe["shards"][0]["size"] = data.draw(st.sampled_from([0, -1, "1", 1.5, None, [1], 2**64]), "size")
        elif mutation == "checksum algorithm":
            recipe["checksum"] = data.draw(st.sampled_from(["sha256", "md5", "", None, ["blake3"]]), "algorithm")
        elif mutation == "digest":
            s = recipe["shards"][0]
            alg = recipe.get("checksum", "sha256")
            s[alg] = data.draw(st.sampled_from(["0" * len(str(s[alg])), "", None, [s[alg]], s[alg].upper()]), "digest")
        elif mutation == "command":
            recipe["command"] = data.draw(st.sampled_from(["soup", None, ["merge"], 1]), "command")
        elif mutation == "deep":
            raw = json.dumps(recipe)[:-1].encode() + b', "x": ' + _deep(100000).encode() + b"}"
        elif mutation == "not utf-8":
            raw = json.dumps(recipe).encode().replace(b"merge", b"m\xffrge", 1)
        elif mutation == "inputs changed":
            recipe["inputs"] = data.draw(st.sampled_from([{}, [], None, "x"]), "inputs")
        if raw is not None or mutation in ("options changed", "list for string", "drop shards", "empty shards",
                                           "shard size", "checksum algorithm", "digest", "command", "inputs changed"):
            fz.replace_file(recipe_path, raw if raw is not None else json.dumps(recipe).encode())
        elif mutation == "edit config.json":
            cfg = json.loads((d / "config.json").read_text())
            cfg["vocab_size"] = 17
            fz.replace_file(d / "config.json", json.dumps(cfg).encode())
        elif mutation == "edit tokenizer":
            fz.replace_file(d / "tokenizer.json", (d / "tokenizer.json").read_bytes() + b" ")
        elif mutation == "add file":
            (d / data.draw(st.sampled_from(["chat_template.jinja", "notes.txt", "extra.safetensors"]), "file")).write_text("{{x}}")
        elif mutation == "delete side file":
            (d / "generation_config.json").unlink()
        elif mutation == "index metadata":
            index = json.loads((d / fz.INDEX).read_text())
            index["metadata"] = {"total_size": 1, "note": "edited"}
            fz.replace_file(d / fz.INDEX, json.dumps(index).encode())
        elif mutation == "index and recipe emptied":
            fz.replace_file(d / fz.INDEX, json.dumps({"metadata": {}, "weight_map": {}}).encode())
            recipe["shards"] = []
            fz.replace_file(recipe_path, json.dumps(recipe).encode())
            for s in d.glob("*.safetensors"):
                s.unlink()
        elif mutation == "flip shard byte":
            shard = sorted(d.glob("*.safetensors"))[0]
            b = bytearray(shard.read_bytes())
            b[-1 - data.draw(st.integers(0, 100), "from the end")] ^= 1
            fz.replace_file(shard, bytes(b))
        elif mutation == "recipe is fifo":
            recipe_path.unlink()
            os.mkfifo(recipe_path)
        elif mutation == "recipe -> /dev/zero":
            recipe_path.unlink()
            recipe_path.symlink_to("/dev/zero")
        if command == "verify":
            case = command_line(work, "verify")
            if mutation != "none":
                case.fail_if_accepted("verify accepted a changed output (issue 14, class 6)")
        else:
            case = Case("merge --config recipe", ["merge", "--config", str(recipe_path), "-o", str(work.run / "out")],
                        work.path, work.run / "out", aux_source=work.prepared.task)
            if mutation in ("recipe is fifo", "recipe -> /dev/zero"):
                case.fail_if_accepted("a config that is not a regular file (issue 14, class 9)")
        case.mutations.append(f"merged output: {mutation}")
        run_case(work, case)

    in_work(work_factory, body)


@fuzz
@given(data=st.data())
def test_side_file_mutations(work_factory, data: st.DataObject) -> None:  # type: ignore[no-untyped-def]
    """Side files of the model whose side files are copied, as links out of the checkpoint,
    special files, directories; a link inside the checkpoint is fine."""
    command = data.draw(st.sampled_from([c for c in WRITERS if c not in ("analyze", "revert")]), "command")
    name = data.draw(st.sampled_from(["tokenizer.model", "tokenizer.json", "generation_config.json",
                                      "chat_template.jinja", "special_tokens_map.json", "config.json"]), "file")
    target = data.draw(st.sampled_from(["/etc/passwd", "/proc/self/environ", "/dev/zero", "fifo", "dir", "loop",
                                        "dangling", "inside", "outside regular"]), "target")

    def body(work: Work) -> None:
        d = work.mutable("task")
        path = d / name
        if path.exists() or path.is_symlink():
            path.unlink()
        if target.startswith("/"):
            path.symlink_to(target)
        elif target == "fifo":
            os.mkfifo(path)
        elif target == "dir":
            path.mkdir()
        elif target == "loop":
            path.symlink_to(name)
        elif target == "dangling":
            path.symlink_to("missing-file")
        elif target == "inside":
            (d / "real").mkdir()
            (d / "real" / name).write_text('{"inside": true}')
            path.symlink_to(Path("real") / name)
        elif target == "outside regular":
            (work.inputs / "secret.txt").write_text("secret")
            path.symlink_to(work.inputs / "secret.txt")
        case = command_line(work, command)
        case.mutations.append(f"task/{name} -> {target}")
        if target in ("/etc/passwd", "/proc/self/environ", "/dev/zero", "fifo", "outside regular"):
            case.fail_if_accepted("a side file that is not a regular file inside the checkpoint (issue 14, class 2)")
        run_case(work, case)

    in_work(work_factory, body)


NUMBERS = ["nan", "inf", "-inf", "1e308", "-1", "0", "1e-320", "99999999999999999999", "2.7", "", "abc", "0x10"]
OPTION_VALUES = {
    "merge": {"--bottom": NUMBERS, "--top": NUMBERS, "--lower-transition": NUMBERS, "--upper-transition": NUMBERS,
              "--shard-size": ["0", "-1KB", "1e308GB", "nanGB", "5XB", "1B", "infGB", "99999999999999999999TB"],
              "--threads": NUMBERS, "--gpu-memory": ["0", "-1", "nanMB", "1e308GB"],
              "--dtype": ["f64", "BF16", "bool", "", "f8", "i8"]},
    "soup": {"--weights": ["1e308,1e308", "nan,1", "inf,1", "1,-1", "0,0", "1", "1,2,3", ",", "1e-320,1e-320",
                           "-1,-1", "1e-300,1e-300", "0.5,nan"]},
    "task-arithmetic": {"--lambda": NUMBERS},
    "ties": {"--lambda": NUMBERS, "--density": NUMBERS},
    "revert": {"--layers": ["0-99999999999", "5-2", "-1", "a", "0-4,30-31", "", "0-9", "10", "1,1", "0--1"],
               "--row-threshold": NUMBERS, "--row-fraction": NUMBERS},
    "analyze": {"--threads": NUMBERS},
}
FAIL_IF_ACCEPTED = {("soup", "--weights"): {"1e308,1e308", "nan,1", "inf,1", "0,0", "0.5,nan", "1,2,3", "1"},
                    ("task-arithmetic", "--lambda"): {"nan", "inf", "-inf"}, ("ties", "--lambda"): {"nan", "inf", "-inf"},
                    ("ties", "--density"): {"nan", "inf", "-inf"}}


@fuzz
@given(data=st.data())
def test_option_values(work_factory, data: st.DataObject) -> None:  # type: ignore[no-untyped-def]
    """Option values typed on the command line: non-finite, huge, negative, malformed numbers."""
    command = data.draw(st.sampled_from(sorted(OPTION_VALUES)), "command")
    option = data.draw(st.sampled_from(sorted(OPTION_VALUES[command])), "option")
    value = data.draw(st.sampled_from(OPTION_VALUES[command][option]), "value")

    def body(work: Work) -> None:
        case = command_line(work, command)
        case.argv += [option, value]
        if command == "revert" and option != "--layers":
            case.argv = [a for a in case.argv if a not in ("--layers", "0-2")]
        case.mutations.append(f"{option} {value!r}")
        case.finite = value not in ("1e308", "99999999999999999999")
        if value in FAIL_IF_ACCEPTED.get((command, option), ()):
            case.fail_if_accepted(f"{option} {value}: non-finite or non-normalisable (issue 14, class 13)")
        run_case(work, case)

    in_work(work_factory, body)


OUTPUTS = ["newline", "long name", "parent is a file", "loop", "dot", "input", "parent of input", "stats",
           "existing", "existing --force", "under symlinked dir", "shard target", "read-only parent", "glob name",
           "dangling symlink"]


@fuzz
@given(data=st.data())
def test_output_and_input_paths(work_factory, data: st.DataObject) -> None:  # type: ignore[no-untyped-def]
    """Paths the OS refuses or that would harm an input: newlines, long names, loops, ``.``, an
    input (or what holds one, or a shard's link target) with --force, --link modes through
    symlinked directories; inputs given through ``link/..`` and over PATH_MAX."""
    command = data.draw(st.sampled_from(WRITERS + ["merge --dry-run"]), "command")
    where = data.draw(st.sampled_from(OUTPUTS + ["input via link/..", "input over PATH_MAX", "input with newline"]),
                      "where")
    link = data.draw(st.sampled_from([None, "symlink", "hard", "copy"]), "link")

    def body(work: Work) -> None:
        run = work.run
        out, force, must_fail = run / "out", False, None
        if where == "newline":
            out = run / "a\nb"
        elif where == "long name":
            out = run / ("m" * 230)
        elif where == "parent is a file":
            (run / "file").write_text("x")
            out = run / "file" / "out"
        elif where == "loop":
            (run / "loop").symlink_to("loop")
            out, force = run / "loop", True
        elif where == "dot":
            out, force = run, True
        elif where == "input":
            out, force = work.mutable("task"), True
            must_fail = "the output is an input (issue 14, class 1)"
        elif where == "parent of input":
            work.mutable("task")
            out, force = work.inputs, True
            must_fail = "the output contains an input (issue 14, class 1)"
        elif where == "stats":
            out, force = work.mutable("stats"), True
            if "stats" in COMMANDS[command]:
                must_fail = "the output is the --stats input (issue 14, class 1)"
            else:
                work.not_inputs.add(out)
        elif where in ("existing", "existing --force"):
            out.mkdir()
            (out / "old.txt").write_text("old")
            force = where == "existing --force"
        elif where == "under symlinked dir":
            (work.path / "real").mkdir()
            (run / "linked").symlink_to(work.path / "real")
            out = run / "linked" / "out"
        elif where == "shard target":
            prev = run / "out"
            shutil.copytree(work.prepared.merged, prev)
            d = work.mutable("language")
            (d / fz.SHARD_NAMES[0]).unlink()
            shutil.copy2(work.prepared.language / fz.SHARD_NAMES[0], prev / "lang-shard.safetensors")
            (d / fz.SHARD_NAMES[0]).symlink_to(prev / "lang-shard.safetensors")
            force = True
            if "language" in COMMANDS[command]:
                must_fail = "an input shard resolves into the output (issue 14, class 1)"
            else:  # a checkpoint the command does not read: replacing the output may dangle its link
                work.not_inputs.add(d)
        elif where == "read-only parent":
            (run / "ro").mkdir()
            out = run / "ro" / "out"
            (run / "ro").chmod(0o555)
        elif where == "glob name":
            out = run / "m[1]*?"
        elif where == "dangling symlink":
            (run / "out").symlink_to("nowhere")
            force = True
        case = command_line(work, command, out=out)
        if where == "dot":
            case.argv = ["." if a == str(run) else a for a in case.argv]
        if where == "input via link/..":
            (run / "deep" / "er").mkdir(parents=True)
            (run / "lnk").symlink_to(run / "deep" / "er")
            # lexically run/lnk/../../in/task is work/in/task; resolved it is run/in/task (absent)
            task = work.mutable("task")
            (run / "in").symlink_to(work.inputs)
            via = str(run / "lnk" / ".." / "in" / "task")
            case.argv = [via if a == str(task) else a for a in case.argv]
        elif where == "input over PATH_MAX":
            long = str(work.roles["task"]) + "/." * 2100
            case.argv = [long if a == str(work.roles["task"]) else a for a in case.argv]
        elif where == "input with newline":
            task = work.mutable("task")
            renamed = task.with_name("ta\nsk")
            task.rename(renamed)
            work.roles["task"] = renamed
            case.argv = [str(renamed) if a == str(task) else a for a in case.argv]
            case.aux_source = renamed
        if force:
            case.argv.append("--force")
        if link and command not in ("analyze",):
            case.argv += ["--link", link]
        case.mutations.append(f"output: {where}" + (f", --link {link}" if link else ""))
        if must_fail:
            case.fail_if_accepted(must_fail)
        run_case(work, case)

    in_work(work_factory, body)
