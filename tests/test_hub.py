"""Hugging Face hub ids (``org/name``, ``org/name@revision``) as checkpoint paths, from the local
cache only.

The cache is built here the way huggingface_hub lays one out (``models--org--name/blobs/<hash>``,
``snapshots/<commit>/<file>`` as relative links into ``../../blobs``, ``refs/<name>`` holding a
commit), from synthetic checkpoints whose plain directories give the reference: a merge of hub ids
must write the same bytes as the same merge of those directories. Every test runs with sockets
that raise, so that a request, even one that would fail, fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import layerswap_fast as ls
from layerswap_fast import synthetic
from layerswap_fast.analysis import analyze, load_stats
from layerswap_fast.cli import main
from layerswap_fast.errors import CheckpointError
from layerswap_fast.formats.checkpoint import RECIPE_NAME, open_checkpoint
from support import add_hub_snapshot, set_hub_ref, shards_without_metadata

MAIN = "1" * 40  # refs/main of every model
OLD = "0" * 39 + "a"  # a second, older snapshot of org/task (other weights), reachable by commit or tag v0
TOKENIZER = b'{"version": "1.0", "model": {"type": "stub"}}\n'


def build_cache(cache: Path, src: dict[str, Path]) -> Path:
    add_hub_snapshot(cache, "org/base", src["base"], MAIN, ("main",))
    add_hub_snapshot(cache, "org/task", src["task"], MAIN, ("main",))
    add_hub_snapshot(cache, "org/task", src["task2"], OLD, ("v0",))
    add_hub_snapshot(cache, "org/lang", src["language"], MAIN, ("main",))
    return cache


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Plain checkpoint directories: a base, two task experts and a language expert."""
    paths = synthetic.make_trio(tmp_path_factory.mktemp("src"), "tiny", experts=("task", "language", "task2"))
    for p in paths.values():
        (p / "tokenizer.json").write_bytes(TOKENIZER)
    return paths


@pytest.fixture(scope="module")
def shared_cache(src: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_cache(tmp_path_factory.mktemp("hf") / "hub", src)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"network access attempted: {args[1:]}")

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def cache(shared_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The shared cache as the environment's; HF_HUB_OFFLINE unset, so that only our own
    ``local_files_only`` keeps huggingface_hub off the network."""
    monkeypatch.setenv("HF_HUB_CACHE", str(shared_cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return shared_cache


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def succeeds(*args: str) -> Result:
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    return r


tensors = shards_without_metadata


def recipe(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / RECIPE_NAME).read_text())
    return data


def swap_of(task: Path, language: Path, out: Path) -> dict[str, tuple[dict[str, Any], bytes]]:
    """The reference: the same layer swap of plain directories."""
    ls.merge(task, language, out)
    return tensors(out)


# ------------------------------------------------------------------------------- merging

@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE=1", "online-env"])
def test_a_merge_of_hub_ids_is_the_merge_of_their_snapshots(offline: bool, cache: Path, src: dict[str, Path],
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, when first imported, maybe by an earlier test
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    out = tmp_path / "out"
    succeeds("merge", "--task-expert", "org/task", "--language-expert", "org/lang", "-o", str(out))
    assert tensors(out) == swap_of(src["task"], src["language"], tmp_path / "ref")
    r = recipe(out)
    assert r["options"]["task_expert"] == [f"org/task@{MAIN}"]
    assert r["options"]["language_expert"] == [f"org/lang@{MAIN}"]
    assert r["inputs"]["task"]["hub_id"] == "org/task" and r["inputs"]["task"]["revision"] == MAIN
    assert r["inputs"]["task"]["path"] == str(cache.resolve() / "models--org--task" / "snapshots" / MAIN)
    assert r["inputs"]["language"]["hub_id"] == "org/lang" and r["inputs"]["language"]["revision"] == MAIN


def test_the_api_takes_hub_ids_and_checkpoints_name_them(cache: Path, src: dict[str, Path], tmp_path: Path) -> None:
    result = ls.merge("org/task", "org/lang", tmp_path / "out")
    assert tensors(tmp_path / "out") == swap_of(src["task"], src["language"], tmp_path / "ref")
    assert result.recipe["options"]["task_expert"] == [f"org/task@{MAIN}"]
    with open_checkpoint("org/task") as c:
        assert (c.hub_id, c.revision) == ("org/task", MAIN)
        assert c.path == cache.resolve() / "models--org--task" / "snapshots" / MAIN
    with open_checkpoint(src["task"]) as c:
        assert (c.hub_id, c.revision, c.path) == (None, None, src["task"])


@pytest.mark.parametrize("revision, expert", [
    (f"@{MAIN}", "task"), ("@main", "task"), ("", "task"), (f"@{OLD}", "task2"), ("@v0", "task2"),
])
def test_a_revision_selects_its_snapshot(revision: str, expert: str, cache: Path, src: dict[str, Path],
                                         tmp_path: Path) -> None:
    out = tmp_path / "out"
    succeeds("merge", "--task-expert", f"org/task{revision}", "--language-expert", "org/lang", "-o", str(out))
    assert tensors(out) == swap_of(src[expert], src["language"], tmp_path / "ref")
    commit = OLD if expert == "task2" else MAIN
    assert recipe(out)["inputs"]["task"]["revision"] == commit
    assert recipe(out)["options"]["task_expert"] == [f"org/task@{commit}"]


def test_several_experts_per_role_and_a_base_from_the_hub(cache: Path, src: dict[str, Path], tmp_path: Path) -> None:
    succeeds("merge", "--task-expert", "org/task", "--task-expert", f"org/task@{OLD}", "--language-expert",
             "org/lang", "--transition-weights", "magnitude", "--base", "org/base", "-o", str(tmp_path / "swap"))
    ls.merge([src["task"], src["task2"]], src["language"], tmp_path / "swap-ref",
             ls.SwapConfig(transition_weights="magnitude"), base=src["base"])
    assert tensors(tmp_path / "swap") == tensors(tmp_path / "swap-ref")
    assert recipe(tmp_path / "swap")["options"]["base"] == f"org/base@{MAIN}"
    succeeds("ties", "--base", "org/base", "--model", "org/task", "--model", "org/lang", "-o", str(tmp_path / "ties"))
    ls.ties(src["base"], [src["task"], src["language"]], tmp_path / "ties-ref")
    assert tensors(tmp_path / "ties") == tensors(tmp_path / "ties-ref")
    assert recipe(tmp_path / "ties")["inputs"]["base"]["hub_id"] == "org/base"


def test_the_hub_cache_follows_hf_home(shared_cache: Path, src: dict[str, Path], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "hf-home"
    home.mkdir()
    (home / "hub").symlink_to(shared_cache)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    succeeds("merge", "--task-expert", "org/task", "--language-expert", "org/lang", "-o", str(tmp_path / "out"))
    assert tensors(tmp_path / "out") == swap_of(src["task"], src["language"], tmp_path / "ref")
    r = invoke("merge", "--task-expert", "org/none", "--language-expert", "org/lang", "-o", str(tmp_path / "o2"))
    assert f"the Hugging Face cache {home / 'hub'} has no model org/none" in r.stderr


# ------------------------------------------------------------------------------- what is not there

@pytest.mark.parametrize("given, message", [
    ("org/none", "the Hugging Face cache {cache} has no model org/none; fetch it with: hf download org/none"),
    ("org/none@v2", "the Hugging Face cache {cache} has no model org/none; fetch it with: "
                    "hf download org/none --revision v2"),
    ("org/task@v2", "the Hugging Face cache {cache} has no revision v2 of org/task; fetch it with: "
                    "hf download org/task --revision v2"),
    # only full commit hashes: huggingface_hub resolves no prefixes, so this one is a ref name
    (f"org/task@{OLD[:7]}", f"the Hugging Face cache {{cache}} has no revision {OLD[:7]} of org/task; "
                            f"fetch it with: hf download org/task --revision {OLD[:7]}"),
])
def test_a_model_not_in_the_cache_is_one_line(given: str, message: str, cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    expected = f"checkpoint {given} is not a local path, and {message.format(cache=cache)}"
    r = invoke("merge", "--task-expert", given, "--language-expert", "org/lang", "-o", str(out))
    assert (r.exit_code, r.stderr, r.stdout) == (2, f"error: {expected}\n", "")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(CheckpointError) as e:
        ls.merge(given, "org/lang", out)
    assert str(e.value) == expected and not out.exists()


@pytest.mark.parametrize("given", ["org/task/extra", "nothing-here", "org--x/task", "org/task@..", "org/task@"])
def test_neither_a_path_nor_a_hub_id_is_a_missing_path(given: str, cache: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    r = invoke("merge", "--task-expert", given, "--language-expert", "org/lang", "-o", "out")
    assert (r.exit_code, r.stderr) == (2, f"error: checkpoint {Path(given)} does not exist\n")


def test_an_incomplete_snapshot_is_one_line(src: dict[str, Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupted download: the cached tree listing names a file the snapshot lacks."""
    pytest.importorskip("huggingface_hub._tree_cache")  # the listing is huggingface_hub 1.x and later
    cache = tmp_path / "hub"
    snapshot = add_hub_snapshot(cache, "org/partial", src["task"], MAIN, ("main",))
    files = {f.name: {"size": f.stat().st_size, "blob_id": "0" * 40} for f in snapshot.iterdir()}
    (cache / "models--org--partial" / "trees").mkdir()
    (cache / "models--org--partial" / "trees" / f"{MAIN}.json").write_text(
        json.dumps({"format_version": 1, "files": files}))
    next(snapshot.glob("*.safetensors")).unlink()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    r = invoke("merge", "--task-expert", "org/partial", "--language-expert", src["language"].as_posix(),
               "-o", str(tmp_path / "out"))
    assert (r.exit_code, r.stderr) == (2, f"error: checkpoint org/partial is not a local path, and its snapshot in "
                                          f"the Hugging Face cache {cache} is incomplete; fetch it with: "
                                          f"hf download org/partial\n")
    assert not (tmp_path / "out").exists()


def test_the_console_command_reports_a_missing_model(cache: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "layerswap_fast.cli", "merge", "--task-expert", "org/none@main",
                        "--language-expert", "org/lang", "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert (p.returncode, p.stdout) == (2, "")
    assert p.stderr == (f"error: checkpoint org/none@main is not a local path, and the Hugging Face cache {cache} "
                        f"has no model org/none; fetch it with: hf download org/none --revision main\n")
    assert not (tmp_path / "out").exists()


def test_a_local_directory_of_the_same_name_wins(cache: Path, src: dict[str, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copytree(src["task2"], tmp_path / "org" / "task")  # the cache's org/task holds other weights
    succeeds("merge", "--task-expert", "org/task", "--language-expert", "org/lang", "-o", "out")
    assert tensors(tmp_path / "out") == swap_of(src["task2"], src["language"], tmp_path / "ref")
    r = recipe(tmp_path / "out")
    assert r["options"]["task_expert"] == ["org/task"] and "hub_id" not in r["inputs"]["task"]
    assert r["inputs"]["task"]["path"] == str(tmp_path / "org" / "task")
    assert r["inputs"]["language"]["hub_id"] == "org/lang"


def test_hub_ids_leave_huggingface_hub_unimported_for_local_paths(src: dict[str, Path], tmp_path: Path) -> None:
    code = ("import sys; from layerswap_fast import open_checkpoint, cli\n"
            f"open_checkpoint({str(src['task'])!r}).close()\n"
            "try: open_checkpoint('no-such-dir')\nexcept Exception: pass\n"
            "print('huggingface_hub' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert (p.returncode, p.stdout) == (0, "False\n"), p.stderr


# ------------------------------------------------------------------------------- recipes, analyze, side files

def test_a_recipe_rebuilds_its_revision_after_main_moves(src: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cache = build_cache(tmp_path / "hub", src)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    first, again, rebuilt = tmp_path / "first", tmp_path / "again", tmp_path / "rebuilt"
    succeeds("merge", "--task-expert", "org/task", "--language-expert", "org/lang", "-o", str(first))
    set_hub_ref(cache, "org/task", "main", OLD)
    succeeds("merge", "--task-expert", "org/task", "--language-expert", "org/lang", "-o", str(again))
    assert tensors(again) != tensors(first)  # main has moved: the id alone now names other weights
    succeeds("merge", "--config", str(first / RECIPE_NAME), "-o", str(rebuilt))
    assert tensors(rebuilt) == tensors(first)
    assert recipe(rebuilt)["inputs"] == recipe(first)["inputs"]
    assert recipe(rebuilt)["inputs"]["task"]["revision"] == MAIN


def test_analyze_reads_hub_ids_and_records_their_revisions(cache: Path, src: dict[str, Path], tmp_path: Path) -> None:
    r = succeeds("analyze", "--base", "org/base", "--language-expert", "org/lang", "--task-expert", f"org/task@{OLD}",
                 "-o", str(tmp_path / "stats"), "--suggest", "--device", "cpu")
    stats = load_stats(tmp_path / "stats")
    ref = analyze(src["base"], {"lang": src["language"], "task": src["task2"]}, device="cpu")
    assert {n: e.average_mav for n, e in stats.experts.items()} == {n: e.average_mav for n, e in ref.experts.items()}
    assert (stats.base.hub_id, stats.base.revision) == ("org/base", MAIN)
    assert (stats.experts["task"].source.hub_id, stats.experts["task"].source.revision) == ("org/task", OLD)
    summary = json.loads((tmp_path / "stats" / "summary.json").read_text())
    assert summary["experts"][0]["hub_id"] == "org/lang" and summary["experts"][1]["revision"] == OLD
    assert f"--task-expert org/task@{OLD} --language-expert org/lang@{MAIN}" in r.output


def test_side_files_come_from_a_snapshot_of_links(cache: Path, src: dict[str, Path], tmp_path: Path) -> None:
    assert (cache / "models--org--task" / "snapshots" / MAIN / "tokenizer.json").is_symlink()
    out = tmp_path / "out"
    succeeds("merge", "--task-expert", "org/task", "--language-expert", "org/lang", "-o", str(out))
    for name in ("tokenizer.json", "config.json", "tokenizer_config.json", "generation_config.json"):
        assert not (out / name).is_symlink() and (out / name).read_bytes() == (src["task"] / name).read_bytes(), name
