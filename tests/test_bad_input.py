"""Untrusted input, read (issue 14, items 3, 8, 9, 10, 13): every bad file or option value is one
`error:` line and exit status 2, nothing is written and every input is left as it was.

Each case runs through the CLI. Cases that would hang or exhaust memory on a broken reader (a FIFO,
/dev/zero, an alias bomb) run in a subprocess with a time and memory limit.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from layerswap_fast import _core
from layerswap_fast.cli import main
from support import make_llama_trio, snapshot, write_safetensors_raw


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_llama_trio(tmp_path_factory.mktemp("badtrio"), num_layers=4, hidden=16)


def _args(args: list[object]) -> list[str]:
    return [str(a) for a in args]


def assert_one_error(stdout: str, stderr: str, code: int, words: list[str]) -> str:
    assert code == 2, (code, stdout, stderr)
    assert stdout == "", stdout
    lines = stderr.splitlines()
    assert len(lines) == 1 and stderr.endswith("\n"), stderr
    assert lines[0].startswith("error: "), stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def fails(roots: list[Path], args: list[object], *words: str) -> str:
    """Run the CLI in-process; expect one `error:` line holding ``words`` and ``roots`` unchanged."""
    before = [snapshot(r) for r in roots]
    r = CliRunner().invoke(main, _args(args))
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    line = assert_one_error(r.stdout, r.stderr, r.exit_code, list(words))
    assert [snapshot(r) for r in roots] == before
    return line


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


def fails_in_subprocess(roots: list[Path], args: list[object], *words: str, timeout: float = 60) -> str:
    """As :func:`fails`, in a child process limited to 3 GiB of address space and ``timeout`` s."""
    before = [snapshot(r) for r in roots]
    p = subprocess.run([sys.executable, "-m", "layerswap_fast.cli", *_args(args)], capture_output=True,
                       text=True, timeout=timeout, preexec_fn=_limits)
    line = assert_one_error(p.stdout, p.stderr, p.returncode, list(words))
    assert [snapshot(r) for r in roots] == before
    return line


def plan_args(trio: dict[str, Path], language: Path | None = None) -> list[object]:
    return ["plan", "--task-expert", trio["task"], "--language-expert", language or trio["language"],
            "--bottom", "1", "--top", "1"]


def merge_args(trio: dict[str, Path], out: Path, *extra: object) -> list[object]:
    return ["merge", "--task-expert", trio["task"], "--language-expert", trio["language"], "-o", out,
            "--bottom", "1", "--top", "1", *extra]


def copy_model(src: Path, dst: Path) -> Path:
    """A copy of checkpoint directory ``src`` (to damage one of its files)."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ------------------------------------------------------------------ item 3: output and --force

@pytest.mark.parametrize("text", [
    "output: {victim}\n",
    "out: {victim}\n",
    "force: true\n",
    "command: merge\noptions: {{output: {victim}, bottom: 1}}\n",
    "command: merge\noptions: {{force: true}}\n",
    "options: {{bottom: 1}}\nforce: true\n",
])
def test_a_config_cannot_set_the_output_or_force(trio: dict[str, Path], tmp_path: Path, text: str) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    config = tmp_path / "c.yaml"
    config.write_text(text.format(victim=victim))
    line = fails([tmp_path, trio["task"]], merge_args(trio, victim, "--config", config, "--force"),
                 str(config), "only the command line may set the output and --force")
    assert ("sets --force" in line) == ("force" in text)
    assert (victim / "precious.txt").read_text() == "keep me"


def test_a_recipe_that_names_an_output_is_refused(trio: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "a"
    r = CliRunner().invoke(main, _args(merge_args(trio, out)))
    assert r.exit_code == 0, r.output
    recipe = json.loads((out / "layerswap_recipe.json").read_text())
    recipe["options"]["output"] = str(trio["task"])
    (tmp_path / "evil.json").write_text(json.dumps(recipe))
    fails([tmp_path, trio["task"]], ["merge", "--config", tmp_path / "evil.json", "-o", tmp_path / "b", "--force"],
          "sets the output")
    # the untouched recipe still rebuilds
    r = CliRunner().invoke(main, ["merge", "--config", str(out / "layerswap_recipe.json"), "-o", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output


# ------------------------------------------------------------------ item 8: numbers from files

def model_with_config(trio: dict[str, Path], tmp_path: Path, config: object) -> Path:
    m = copy_model(trio["language"], tmp_path / "lang")
    (m / "config.json").write_text(json.dumps(config) if not isinstance(config, str) else config)
    return m


@pytest.mark.parametrize("value, expected", [
    (10**12, "at most 65536"),
    (0, "at least 1"),
    (-3, "at least 1"),
    ("4", "must be an integer, got '4'"),
    (4.0, "must be an integer, got 4.0"),
    (2.7, "must be an integer, got 2.7"),
    (True, "must be an integer, got true"),
    ([4], "must be an integer, got [4]"),
])
def test_layer_count_from_config_is_a_bounded_integer(trio: dict[str, Path], tmp_path: Path, value: object,
                                                      expected: str) -> None:
    m = model_with_config(trio, tmp_path, {"num_hidden_layers": value})
    fails_in_subprocess([tmp_path], plan_args(trio, m), "config.json", "num_hidden_layers", expected)


@pytest.mark.parametrize("config, key", [
    ({"num_hidden_layers": 4, "n_layer": "four"}, "n_layer"),
    ({"text_config": {"num_hidden_layers": 1e12}}, "text_config.num_hidden_layers"),
    ({"text_config": [1, 2]}, "text_config"),
])
def test_every_layer_count_key_is_checked(trio: dict[str, Path], tmp_path: Path, config: dict, key: str) -> None:
    m = model_with_config(trio, tmp_path, config)
    fails_in_subprocess([tmp_path], plan_args(trio, m), "config.json", f"{key} must be")


def test_config_nulls_and_other_keys_are_fine(trio: dict[str, Path], tmp_path: Path) -> None:
    """Only the keys this package reads are typed: a real config's other keys may hold anything."""
    config = json.loads((trio["language"] / "config.json").read_text())
    m = model_with_config(trio, tmp_path, {**config, "text_config": None, "n_layer": None,
                                           "vision_config": {"num_hidden_layers": "x"}, "extra": [[1.5, None]]})
    r = CliRunner().invoke(main, _args(plan_args(trio, m)))
    assert r.exit_code == 0, r.output
    assert "layer swap of a 4-layer model" in r.output


def one_tensor_model(d: Path, name: str) -> Path:
    d.mkdir()
    save_file({name: torch.ones(2)}, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("index", ["10000000000", "65536", "9" * 5000])
def test_layer_index_in_a_tensor_name_is_bounded(tmp_path: Path, index: str) -> None:
    m = one_tensor_model(tmp_path / "m", f"model.layers.{index}.mlp.up_proj.weight")
    line = fails_in_subprocess([tmp_path], ["plan", "--task-expert", m, "--language-expert", m],
                               "layer index", "above the limit of 65535")
    assert len(line) < 400


def test_core_checks_its_arguments_before_it_allocates(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(b"\0" * 64)
    with _core.InputFile(str(path)) as f:
        for rows, cols in ((2**58, 1), (1, 2**40), (33, 1)):
            with pytest.raises(_core.CoreError, match="row_mav_file: .*(outside|beyond|past)"):
                _core.row_mav_file([(f, 0)], ["F16"], (f, 0), "F16", rows, cols, 16, 1)


# ------------------------------------------------------------------ item 9: JSON/YAML

DEEP_JSON = '{"a": ' * 100_000 + "1" + "}" * 100_000
SHALLOW_BUT_TOO_DEEP = '{"a": ' * 100 + "1" + "}" * 100


@pytest.mark.parametrize("text, words", [
    (DEEP_JSON, ["nested deeper than 64 levels"]),
    (SHALLOW_BUT_TOO_DEEP, ["nested deeper than 64 levels"]),
    ("[1, 2]", ["must be a mapping, got [1, 2]"]),
    ("{oops", ["not valid JSON", "line 1 column 2"]),
    ('{"num_hidden_layers": NaN}', ["not valid JSON", "NaN"]),
    ('{"num_hidden_layers": 4, "num_hidden_layers": 4}', ["duplicate key 'num_hidden_layers'"]),
])
def test_bad_config_json(trio: dict[str, Path], tmp_path: Path, text: str, words: list[str]) -> None:
    m = model_with_config(trio, tmp_path, text)
    fails([tmp_path], plan_args(trio, m), "config.json", *words)


def test_non_utf8_files_are_one_line(trio: dict[str, Path], tmp_path: Path) -> None:
    m = copy_model(trio["language"], tmp_path / "lang")
    (m / "config.json").write_bytes(b'{"model_type": "\xff"}')
    fails([tmp_path], plan_args(trio, m), "config.json", "not valid UTF-8")
    (m / "config.json").unlink()
    (m / "model.safetensors.index.json").write_bytes(b'{"weight_map": {"\xc3\x28": "a"}}')
    fails([tmp_path], plan_args(trio, m), "model.safetensors.index.json", "not valid UTF-8")
    (tmp_path / "c.yaml").write_bytes(b"bottom: 1\ndtype: \xff\n")
    fails([tmp_path], merge_args(trio, tmp_path / "o", "--config", tmp_path / "c.yaml"), "c.yaml", "not valid UTF-8")


def special_file(kind: str, path: Path) -> None:
    """Put a FIFO, a link to /dev/zero or a directory at ``path`` (replacing a file there)."""
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        os.symlink("/dev/zero", path)
    elif kind == "directory":
        path.mkdir()
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
@pytest.mark.parametrize("name", ["model.safetensors.index.json", "config.json"])
def test_json_files_must_be_regular_files(trio: dict[str, Path], tmp_path: Path, kind: str, name: str) -> None:
    m = copy_model(trio["language"], tmp_path / "lang")
    special_file(kind, m / name)
    fails_in_subprocess([tmp_path], plan_args(trio, m), name, "not a regular file", timeout=30)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_config_file_must_be_a_regular_file(trio: dict[str, Path], tmp_path: Path, kind: str) -> None:
    special_file(kind, tmp_path / "c.yaml")
    fails_in_subprocess([tmp_path], merge_args(trio, tmp_path / "o", "--config", tmp_path / "c.yaml"),
                        "c.yaml", "not a regular file", timeout=30)


def test_json_files_have_a_size_cap(trio: dict[str, Path], tmp_path: Path) -> None:
    m = copy_model(trio["language"], tmp_path / "lang")
    with open(m / "config.json", "wb") as f:  # sparse: no disk space used
        f.truncate((64 << 20) + 1)
    fails_in_subprocess([tmp_path], plan_args(trio, m), "config.json", "larger than 64 MB")
    with open(tmp_path / "c.yaml", "w") as f:
        f.write("bottom: 1\n" + "# padding\n" * (1 << 17))
    fails_in_subprocess([tmp_path], merge_args(trio, tmp_path / "o", "--config", tmp_path / "c.yaml"),
                        "c.yaml", "larger than 1 MB", timeout=30)



def test_yaml_aliases_are_refused(trio: dict[str, Path], tmp_path: Path) -> None:
    bomb = "tool: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"t{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 10)) + "bottom: 1\n"
    (tmp_path / "bomb.yaml").write_text(bomb)
    fails_in_subprocess([tmp_path], merge_args(trio, tmp_path / "o", "--config", tmp_path / "bomb.yaml"),
                        "bomb.yaml", "line 1, column 7: anchors and aliases are not allowed", timeout=30)
    (tmp_path / "alias.yaml").write_text("bottom: &b 1\ntop: *b\n")
    fails([tmp_path], merge_args(trio, tmp_path / "o", "--config", tmp_path / "alias.yaml"),
          "alias.yaml", "line 1, column 9", "aliases")


@pytest.mark.parametrize("text, words", [
    ("bottom: [1]\n", ["bottom must be an integer, got [1]"]),
    ("bottom: .inf\n", ["bottom must be an integer, got inf"]),
    ("bottom: 2.7\n", ["bottom must be an integer, got 2.7"]),
    ("bottom: true\n", ["bottom must be an integer, got true"]),
    ("bottom: '2'\n", ["bottom must be an integer, got '2'"]),
    ("bottom: 1" + "0" * 5000 + "\n", ["line 1, column 9: an integer of 5001 digits"]),
    ("threads: [1]\n", ["threads must be an integer, got [1]"]),
    ("options:\n", ["options must be a non-empty mapping, got null"]),
    ("options: []\n", ["options must be a non-empty mapping, got []"]),
    ("options: [bottom, 1]\n", ["options must be a non-empty mapping"]),
    ("options: {}\n", ["options must be a non-empty mapping"]),
    ("transition_weights: cubic\n", ["transition_weights must be one of uniform, ramp, magnitude, got 'cubic'"]),
    ("transition_weights: 1\n", ["transition_weights must be one of"]),
    ("task_expert: /x\n", ["task_expert must be a list of strings, got '/x'"]),
    ("task_expert: [1]\n", ["task_expert[0] must be a string, got 1"]),
    ("dtype: 16\n", ["dtype must be a string, got 16"]),
    ("sync: 'yes'\n", ["sync must be true or false, got 'yes'"]),
    ("bottom: 1\nbottom: 2\n", ["duplicate key 'bottom'"]),
    ("whatever: 1\n", ["unknown option 'whatever' for 'merge'"]),
    ("config: other.yaml\n", ["unknown option 'config' for 'merge'"]),
    ("1: 2\n", ["keys must be strings, got 1"]),
    ("command: 5\n", ["command must be a string, got 5"]),
    ("bottom: [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]"
     "]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]\n", ["nested deeper than 64 levels"]),
    ("bottom: " + "[" * 50_000 + "]" * 50_000 + "\n", ["nested deeper than 64 levels"]),
    ("bottom: 1\n  top: 2\n", ["line 2, column 6"]),
    ("bottom: 'x\n", ["line"]),
    ('bottom: "\\ud800"\n', ["not valid Unicode"]),
    ("bottom: 1\x00\n", ["character 10: unacceptable character U+0000"]),
    ("", ["must be a mapping, got null"]),
])
def test_bad_config_yaml(trio: dict[str, Path], tmp_path: Path, text: str, words: list[str]) -> None:
    (tmp_path / "c.yaml").write_text(text, encoding="utf-8", errors="surrogatepass")
    fails([tmp_path, trio["task"]], merge_args(trio, tmp_path / "o", "--config", tmp_path / "c.yaml"),
          "c.yaml", *words)


@pytest.mark.parametrize("text, words", [
    ('{"command": "merge", "options": {"bottom": 1, "top": Infinity}}', ["not valid JSON"]),
    ('{"command": "merge", "options": {"bottom": 1e999}}', ["not valid JSON", "1e999"]),
    ('{"command": "merge", "options": {"bottom": 1}, "command": "soup"}', ["duplicate key 'command'"]),
    (DEEP_JSON, ["nested deeper than 64 levels"]),
    ('{"command": "merge", "options": {"bottom": 1}, "layers": ' + "[" * 65 + "]" * 65 + "}",
     ["nested deeper than 64 levels"]),
    ('{"command": "merge", "options": {"bottom": 2.7}}', ["options.bottom must be an integer, got 2.7"]),
    ('{"command": ["merge"], "options": {"bottom": 1}}', ["command must be a string"]),
])
def test_bad_config_json_recipe(trio: dict[str, Path], tmp_path: Path, text: str, words: list[str]) -> None:
    (tmp_path / "c.json").write_text(text)
    fails([tmp_path], merge_args(trio, tmp_path / "o", "--config", tmp_path / "c.json"), "c.json", *words)


def test_typed_values_that_are_right_still_work(trio: dict[str, Path], tmp_path: Path) -> None:
    """Ints for float options, flags as booleans, lists for repeated options, null for unset ones."""
    (tmp_path / "c.yaml").write_text(f"task-expert: [{trio['task']}]\nlanguage_expert: [{trio['language']}]\n"
                                     "bottom: 1\ntop: 1\nsync: false\ndtype: null\nthreads: 1\n")
    r = CliRunner().invoke(main, ["merge", "--config", str(tmp_path / "c.yaml"), "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    (tmp_path / "t.yaml").write_text(f"base: {trio['base']}\nmodel: [{trio['task']}]\nlambda: 1\n")
    r = CliRunner().invoke(main, ["task-arithmetic", "--config", str(tmp_path / "t.yaml"), "-o", str(tmp_path / "t")])
    assert r.exit_code == 0, r.output


SUMMARY = {"format": "layerswap-fast delta stats", "format_version": 1, "num_layers": 4, "base": {}, "experts": [],
           "files": {"mav.csv": "", "heatmap.png": ""}, "csv_lines": 0}


@pytest.mark.parametrize("summary, words", [
    (DEEP_JSON, ["nested deeper than 64 levels"]),
    (json.dumps({**SUMMARY, "num_layers": 1e12}), ["num_layers must be an integer, got 1000000000000.0"]),
    (json.dumps({**SUMMARY, "num_layers": 10**12}), ["num_layers must be at most 65536"]),
    (json.dumps({**SUMMARY, "experts": 5}), ["experts must be a list of mappings, got 5"]),
    (json.dumps({**SUMMARY, "experts": [{"name": ["x"], "tensors": 1}]}), ["experts[0].name must be a string"]),
    (json.dumps({**SUMMARY, "experts": [{"name": "../..", "tensors": 1}]}), ["expert name '../..' must be"]),
    (json.dumps({**SUMMARY, "format_version": "x" * 10**6}), ["format version 'xxx"]),
    (b'{"format": "\xff"}', ["not valid UTF-8"]),
])
def test_bad_summary_json(trio: dict[str, Path], tmp_path: Path, summary: str | bytes, words: list[str]) -> None:
    stats = tmp_path / "stats"
    stats.mkdir()
    (stats / "summary.json").write_bytes(summary if isinstance(summary, bytes) else summary.encode())
    fails([tmp_path, trio["task"]], merge_args(trio, tmp_path / "o", "--transition-weights", "magnitude", "--base",
                                               trio["base"], "--stats", stats), "summary.json", *words)


@pytest.mark.parametrize("index, words", [
    ('{"weight_map": []}', ["weight_map must be a mapping"]),
    ('{"weight_map": {"a": 1}}', ["weight_map.a must be a string, got 1"]),
    ("[1]", ["must be a mapping"]),
    ('{"metadata": {}}', ["weight_map is required"]),
    ('{"weight_map": {"a": "x.safetensors"}, "weight_map": {}}', ["duplicate key 'weight_map'"]),
])
def test_bad_index(trio: dict[str, Path], tmp_path: Path, index: str, words: list[str]) -> None:
    m = copy_model(trio["language"], tmp_path / "lang")
    (m / "model.safetensors.index.json").write_text(index)
    fails([tmp_path], plan_args(trio, m), "model.safetensors.index.json", *words)


# ------------------------------------------------------------------ item 10: names

@pytest.mark.parametrize("header", [
    b'{"model.layers.0.\\ud800.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
    b'{"__metadata__": {"\\udc80": "x"}, "model.layers.0.w.weight": {"dtype": "F32", "shape": [2], '
    b'"data_offsets": [0, 8]}}',
    b'{"__metadata__": {"format": "\\ud800"}, "model.layers.0.w.weight": {"dtype": "F32", "shape": [2], '
    b'"data_offsets": [0, 8]}}',
])
def test_names_that_are_not_unicode_are_rejected_at_the_header(tmp_path: Path, header: bytes) -> None:
    m = tmp_path / "m"
    m.mkdir()
    write_safetensors_raw(m / "model.safetensors", header, b"\0" * 8)
    fails([tmp_path], ["merge", "--task-expert", m, "--language-expert", m, "-o", tmp_path / "o", "--bottom", "0",
                       "--top", "0", "--lower-transition", "0", "--upper-transition", "0"],
          "model.safetensors", "not valid Unicode")


# ------------------------------------------------------------------ item 13: arithmetic

@pytest.mark.parametrize("command, extra, words", [
    ("soup", ["--weights", "1e308,1e308"], ["soup weights", "sum"]),
    ("soup", ["--weights", "nan,1"], ["soup weights", "finite"]),
    ("soup", ["--weights", "inf,1"], ["soup weights", "finite"]),
    ("soup", ["--weights", "1e400,1"], ["soup weights", "finite"]),
    ("soup", ["--weights", "0,0"], ["soup weights"]),
    ("soup", ["--weights", "-1,2"], ["soup weights"]),
    ("task-arithmetic", ["--lambda", "nan"], ["lambda", "finite"]),
    ("task-arithmetic", ["--lambda", "inf"], ["lambda", "finite"]),
    ("task-arithmetic", ["--lambda", "-inf"], ["lambda", "finite"]),
    ("task-arithmetic", ["--lambda", "1e39"], ["lambda", "finite"]),
    ("task-arithmetic", ["--lambda", "2e38"], ["float32"]),
    ("ties", ["--lambda", "nan"], ["lambda", "finite"]),
    ("ties", ["--density", "nan"], ["density"]),
    ("ties", ["--density", "inf"], ["density"]),
    ("revert", ["--row-threshold", "nan"], ["row threshold", "finite"]),
    ("revert", ["--row-threshold", "inf"], ["row threshold", "finite"]),
    ("revert", ["--row-fraction", "nan"], ["row fraction"]),
])
def test_arithmetic_that_cannot_be_right(trio: dict[str, Path], tmp_path: Path, command: str, extra: list[str],
                                         words: list[str]) -> None:
    models = {"soup": ["--model", trio["task"], "--model", trio["language"]],
              "task-arithmetic": ["--base", trio["base"], "--model", trio["task"], "--model", trio["language"]],
              "ties": ["--base", trio["base"], "--model", trio["task"], "--model", trio["language"]],
              "revert": ["--base", trio["base"], "--model", trio["task"]]}[command]
    fails([tmp_path, trio["base"]], [command, *models, "-o", tmp_path / "o", *extra], *words)


def test_api_rejects_bad_weights_too(trio: dict[str, Path], tmp_path: Path) -> None:
    import layerswap_fast as ls
    for weights in ([1e308, 1e308], [float("nan"), 1.0], ["a", 1.0]):
        with pytest.raises(ls.ConfigError, match="soup weights"):
            ls.soup([trio["task"], trio["language"]], tmp_path / "o", weights=weights)
    with pytest.raises(ls.ConfigError, match="lambda"):
        ls.ties(trio["base"], [trio["task"]], tmp_path / "o", lam=float("inf"))
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ the reader, as verify will call it


@pytest.mark.parametrize("recipe, words", [
    ({"shards": [{"file": ["a"], "size": 1}]}, ["shards[0].file must be a string, got [\"a\"]"]),
    ({"shards": [{"file": "a", "size": "1"}]}, ["shards[0].size must be an integer, got '1'"]),
    ({"shards": [{"file": "a", "size": -1}]}, ["shards[0].size must be at least 0, got -1"]),
    ({"shards": [{"size": 1}]}, ["shards[0].file is required"]),
    ({"shards": []}, ["shards must be a list of mappings"]),
    ({"shards": {"file": "a"}}, ["shards must be a list of mappings, got {\"file\": \"a\"}"]),
    ({}, ["shards is required"]),
])
def test_read_json_with_a_recipe_schema(tmp_path: Path, recipe: dict, words: list[str]) -> None:
    from layerswap_fast.errors import LayerswapError
    from layerswap_fast.safe_read import Int, List, Map, Str, read_json

    class VerifyLike(LayerswapError):
        pass

    schema = Map({"shards": List(Map({"file": Str(), "size": Int(0)}, required=("file", "size")), min_len=1)},
                 required=("shards",))
    path = tmp_path / "layerswap_recipe.json"
    path.write_text(json.dumps(recipe))
    with pytest.raises(VerifyLike) as e:
        read_json(path, schema, error=VerifyLike)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    for word in words:
        assert word in message
    good = {"shards": [{"file": "a", "size": 3, "blake3": "x"}]}
    path.write_text(json.dumps(good))
    assert read_json(path, schema, error=VerifyLike) == good


def test_a_path_with_a_newline_stays_on_one_line(trio: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "a\nb.yaml"
    config.write_text("bottom: [1]\n")
    line = fails([tmp_path], merge_args(trio, tmp_path / "o", "--config", config), "bottom must be an integer")
    assert "'" + str(config).replace("\n", "\\n") + "'" in line


def test_a_size_too_large_to_count_is_one_line(trio: dict[str, Path], tmp_path: Path) -> None:
    fails([tmp_path, trio["task"]], merge_args(trio, tmp_path / "o", "--shard-size", "1" + "0" * 400 + "GB"),
          "is too large")


def test_a_recipe_of_an_api_merge_with_a_numeric_shard_size_rebuilds(trio: dict[str, Path], tmp_path: Path) -> None:
    import layerswap_fast as ls

    ls.merge(trio["task"], trio["language"], tmp_path / "a", ls.SwapConfig(bottom=1, top=1), shard_size=30_000)
    r = CliRunner().invoke(main, ["merge", "--config", str(tmp_path / "a" / "layerswap_recipe.json"),
                                  "-o", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    for shard in (tmp_path / "a").glob("model-*.safetensors"):
        assert (tmp_path / "b" / shard.name).read_bytes() == shard.read_bytes()
