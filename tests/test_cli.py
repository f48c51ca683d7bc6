"""The command line, through click's CliRunner and once as a real process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from layerswap_fast.cli import main
from support import load_tensors, make_llama_trio, raw_bytes, snapshot


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_llama_trio(tmp_path_factory.mktemp("clitrio"), num_layers=12)


def run(*args: str | Path):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_plan_prints_the_layer_map(trio: dict[str, Path]) -> None:
    r = run("plan", "--task-expert", trio["task"], "--language-expert", trio["language"])
    assert r.exit_code == 0, r.output
    assert "layer swap of a 12-layer model: bottom 5, top 2" in r.output
    assert "    5  lower transition  0.5×task + 0.5×language" in r.output
    assert "   11  language          language expert" in r.output
    assert "model.embed_tokens.weight  blend" in r.output


def test_plan_json_for_tools(trio: dict[str, Path]) -> None:
    r = run("plan", "--task-expert", trio["task"], "--language-expert", trio["language"], "--json",
            "--bottom", "3", "--top", "1", "--transition-weights", "ramp", "--upper-transition", "2")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert [row["zone"] for row in data["layers"]][:4] == ["language"] * 3 + ["lower transition"]
    assert data["layers"][9]["sources"] == [{"expert": "task", "weight": 2 / 3}, {"expert": "language", "weight": 1 - 2 / 3}]


def test_merge_writes_and_summarises(trio: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    r = run("merge", "--task-expert", trio["task"], "--language-expert", trio["language"], "-o", out,
            "--non-layer", "task", "--threads", "2", "--shard-size", "100KB")
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"wrote {out}: ") and "GB/s" in r.output and "peak RSS" in r.output
    merged, task = load_tensors(out), load_tensors(trio["task"])
    assert raw_bytes(merged["model.embed_tokens.weight"]) == raw_bytes(task["model.embed_tokens.weight"])


def test_dry_run(trio: dict[str, Path], tmp_path: Path) -> None:
    r = run("merge", "--task-expert", trio["task"], "--language-expert", trio["language"], "-o", tmp_path / "o",
            "--dry-run")
    assert r.exit_code == 0 and r.output.startswith("dry run: would write ")
    assert "input shards reused" in r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, message", [
    (["--bottom", "11"], "error: the swap needs 15 layers"),
    (["--bottom", "x"], "error: Invalid value for '--bottom': 'x' is not a valid integer"),
    (["--transition-weights", "cubic"], "error: Invalid value for '--transition-weights'"),
    (["--dtype", "q4"], "error: unsupported output dtype 'q4'"),
])
def test_user_errors_are_one_line_exit_2_nothing_written(trio: dict[str, Path], tmp_path: Path,
                                                         extra: list[str], message: str) -> None:
    before = snapshot(tmp_path)
    r = run("merge", "--task-expert", trio["task"], "--language-expert", trio["language"], "-o", tmp_path / "o", *extra)
    assert r.exit_code == 2
    assert r.output.startswith(message) and r.output.count("\n") == 1, r.output
    assert snapshot(tmp_path) == before


def test_missing_expert(tmp_path: Path, trio: dict[str, Path]) -> None:
    r = run("plan", "--task-expert", tmp_path / "nope", "--language-expert", trio["language"])
    assert r.exit_code == 2 and r.output == f"error: checkpoint {tmp_path / 'nope'} does not exist\n"


def test_real_process_has_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"\x05\0\0\0\0\0\0\0{oops")
    exe = Path(sys.executable).with_name("layerswap-fast")
    p = subprocess.run([str(exe), "merge", "--task-expert", str(tmp_path / "bad"), "--language-expert",
                        str(tmp_path / "bad"), "-o", str(tmp_path / "o")], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.startswith("error: ") and "not valid JSON" in p.stderr and "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1 and p.stdout == ""
    assert not (tmp_path / "o").exists()


def test_real_process_prints_everything_before_its_fast_exit(tmp_path: Path, trio: dict[str, Path]) -> None:
    """The console script leaves with os._exit: what it printed must still all arrive."""
    exe = Path(sys.executable).with_name("layerswap-fast")
    p = subprocess.run([str(exe), "merge", "--task-expert", str(trio["task"]), "--language-expert",
                        str(trio["language"]), "-o", str(tmp_path / "o")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"wrote {tmp_path / 'o'}: ") and p.stdout.endswith(" MB\n")
    p = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith("layerswap-fast, version ")


def test_demo(tmp_path: Path) -> None:
    r = run("demo", "--workdir", tmp_path / "demo")
    assert r.exit_code == 0, r.output
    assert "all bit-exact" in r.output
    assert (tmp_path / "demo" / "merged" / "model.safetensors.index.json").exists()


def test_help_lists_the_merge_flags() -> None:
    r = run("merge", "--help")
    for flag in ("--task-expert", "--language-expert", "--output", "--bottom", "--top", "--lower-transition",
                 "--upper-transition", "--transition-weights", "--non-layer", "--dtype", "--shard-size",
                 "--threads", "--device", "--force", "--dry-run"):
        assert flag in r.output


def test_every_flag_in_the_readme_exists() -> None:
    """The README is checked against --help, so the documentation cannot drift from the CLI."""
    import re
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    flag = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]+")
    helps = " ".join(CliRunner().invoke(main, [c, "--help"], terminal_width=200).output for c in main.commands)
    documented = set(flag.findall(readme))
    cli_only = {"--version", "--help"}
    python_or_other = {"--cold"}  # a flag of the bench scripts, mentioned beside them
    missing = sorted(documented - cli_only - python_or_other - set(flag.findall(helps)))
    assert not missing, f"README mentions flags no command has: {missing}"
