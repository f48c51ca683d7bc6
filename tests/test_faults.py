"""Faults during a merge: full disks, signals, kills, inputs changing underneath. The output
directory must never appear incomplete, and temporary files must not outlive the failure."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import layerswap_fast as ls
from support import make_llama_trio, tmpfs


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_llama_trio(tmp_path_factory.mktemp("faults"), num_layers=12, shard="20KB")


@pytest.fixture
def small_disk(tmp_path: Path):
    yield from tmpfs(tmp_path / "disk", "size=400k")


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_output_that_cannot_fit_is_refused_before_writing(trio: dict[str, Path], small_disk: Path) -> None:
    (small_disk / "ballast").write_bytes(b"\0" * 300_000)
    with pytest.raises(ls.OutputError, match=f"not enough space on the disk holding {small_disk}: the output needs"):
        ls.merge(trio["task"], trio["language"], small_disk / "out", link="copy")
    assert leftovers(small_disk) == ["ballast"]


def test_disk_full_mid_merge_names_the_disk_and_cleans_up(trio: dict[str, Path], small_disk: Path) -> None:
    def fill_disk(n: int, total: int) -> None:  # another process fills the disk once we have started
        ballast = small_disk / "ballast"
        if not ballast.exists():
            free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
            ballast.write_bytes(b"\0" * max(free - 4096, 0))

    with pytest.raises(ls.OutputError, match=f"the disk holding {small_disk} is full: writing model-000"):
        ls.merge(trio["task"], trio["language"], small_disk / "out", link="copy", progress=fill_disk)
    assert leftovers(small_disk) == ["ballast"]


SCRIPT = """
import os, signal, sys
import layerswap_fast.engine.execute as engine
from layerswap_fast.cli import main
real = engine._ShardFiller._flush_copy
calls = []
def flush_then_signal(self, *args):
    real(self, *args)
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.{sig})
engine._ShardFiller._flush_copy = flush_then_signal
sys.argv = ["layerswap-fast", "merge", "--task-expert", {task!r}, "--language-expert", {lang!r}, "-o", {out!r},
            "--link", "copy"]
main()
"""


def run_signalled(trio: dict[str, Path], out: Path, sig: str) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(SCRIPT).format(sig=sig, task=str(trio["task"]), lang=str(trio["language"]), out=str(out))
    # SIGINT as on a terminal: a run started in the background inherits it ignored, and Python
    # then installs no KeyboardInterrupt handler, so the signal would do nothing
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupted_merge_leaves_nothing(trio: dict[str, Path], tmp_path: Path, sig: str) -> None:
    p = run_signalled(trio, tmp_path / "out", sig)
    assert p.returncode == 130, p.stderr
    assert p.stderr == "error: interrupted; nothing was written\n"
    assert leftovers(tmp_path) == []


def test_killed_merge_leaves_a_named_partial_that_the_next_run_cleans(trio: dict[str, Path], tmp_path: Path) -> None:
    p = run_signalled(trio, tmp_path / "out", "SIGKILL")
    assert p.returncode == -signal.SIGKILL
    partial = leftovers(tmp_path)
    assert len(partial) == 1 and partial[0].startswith(".out.layerswap-partial-")
    with pytest.raises(ls.VerifyError):
        ls.verify(tmp_path / "out")
    exe = Path(sys.executable).with_name("layerswap-fast")
    p = subprocess.run([str(exe), "merge", "--task-expert", str(trio["task"]), "--language-expert",
                        str(trio["language"]), "-o", str(tmp_path / "out")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert f"note: removing {tmp_path / partial[0]}, left by an interrupted run" in p.stderr
    assert leftovers(tmp_path) == ["out"]
    ls.verify(tmp_path / "out")


def test_input_truncated_mid_merge_is_an_error_not_a_crash(trio: dict[str, Path], tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    subprocess.run(["cp", "-r", str(trio["language"]), str(victim)], check=True)
    shards = sorted(victim.glob("model-*.safetensors"))

    def truncate_inputs(n: int, total: int) -> None:
        for shard in shards:
            os.truncate(shard, 64)

    with pytest.raises((ls.OutputError, ls.CheckpointError), match="truncated|changed"):
        ls.merge(trio["task"], victim, tmp_path / "out", link="copy", progress=truncate_inputs)
    assert leftovers(tmp_path) == ["victim"]
