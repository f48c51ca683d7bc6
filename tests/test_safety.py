"""What no command may do, whatever it is handed (issue 14): harm an input, copy a file from outside
a checkpoint, lose an output to a kill, accept an edited output, or end a bad path in anything but
one `error:` line with nothing written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import layerswap_fast as ls
import layerswap_fast.engine.execute as engine
import layerswap_fast.formats.output as output
from layerswap_fast.cli import main
from support import fs_state, make_llama_trio, tmpfs


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_llama_trio(tmp_path_factory.mktemp("safety"), num_layers=12, shard="20KB")


def run(*args: str | Path, expect: int = 0):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == expect, r.output
    return r


def fails(*args: str | Path, match: str, watch: list[Path]) -> str:
    """Run a command that must fail: exit 2, one stderr line `error: ...` containing ``match``, and
    every tree in ``watch`` exactly as before (bytes, mtimes, links)."""
    before = [fs_state(w) for w in watch]
    r = run(*args, expect=2)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], r.stderr
    assert [fs_state(w) for w in watch] == before
    return lines[0]


def merge_args(trio: dict[str, Path], out: Path | str, *extra: str | Path) -> list[str | Path]:
    return ["merge", "--task-expert", trio["task"], "--language-expert", trio["language"], "-o", out, *extra]


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------- 1. inputs are never written

def test_the_base_of_a_magnitude_merge_is_never_the_output(trio: dict[str, Path]) -> None:
    fails(*merge_args(trio, trio["base"], "--base", trio["base"], "--transition-weights", "magnitude", "--force"),
          match=f"is the input {trio['base']}", watch=[trio["base"].parent])


def test_a_stats_directory_is_never_the_output(trio: dict[str, Path], tmp_path: Path) -> None:
    run("analyze", "--base", trio["base"], "--expert", trio["task"], "--expert", trio["language"], "-o",
        tmp_path / "stats", "--device", "cpu")
    fails(*merge_args(trio, tmp_path / "stats", "--base", trio["base"], "--stats", tmp_path / "stats",
                      "--transition-weights", "magnitude", "--force"),
          match="is the input", watch=[tmp_path, trio["base"].parent])


def test_a_shard_linked_into_the_output_keeps_the_output(trio: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(*merge_args(trio, out))
    lang = tmp_path / "lang"
    shutil.copytree(trio["language"], lang)
    shard = sorted(lang.glob("model-*.safetensors"))[0]
    shutil.copyfile(shard, out / "kept-elsewhere.safetensors")
    shard.unlink()
    shard.symlink_to(out / "kept-elsewhere.safetensors")  # as a cache links its blobs
    fails("merge", "--task-expert", trio["task"], "--language-expert", lang, "-o", out, "--force",
          match=f"the file {shard} of the input {lang} is inside the output", watch=[tmp_path])


def test_a_config_file_inside_the_output_keeps_the_output(trio: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(*merge_args(trio, out, "--bottom", "3"))
    fails("merge", "--config", out / "layerswap_recipe.json", "-o", out, "--force",
          match="is inside the output", watch=[tmp_path])
    run("merge", "--config", out / "layerswap_recipe.json", "-o", tmp_path / "rebuilt")


def test_an_output_that_is_a_link_to_an_input_is_refused(trio: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "alias").symlink_to(trio["task"])
    fails(*merge_args(trio, tmp_path / "alias", "--force"), match="is the input", watch=[tmp_path, trio["task"]])


def test_analyze_never_replaces_its_base(trio: dict[str, Path]) -> None:
    fails("analyze", "--base", trio["base"], "--expert", trio["task"], "-o", trio["base"], "--force",
          "--device", "cpu", match="is the input", watch=[trio["base"].parent])


def test_the_current_directory_is_never_replaced(trio: dict[str, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "mine.txt").write_text("keep")
    monkeypatch.chdir(tmp_path / "here")
    fails(*merge_args(trio, ".", "--force"), match="current directory", watch=[tmp_path])
    fails(*merge_args(trio, "..", "--force"), match="current directory", watch=[tmp_path])
    for _ in range(2):  # an output below the current directory is replaced as any other
        run(*merge_args(trio, "sub", "--force"))


# ---------------------------------------------------------------- 2. side files

@pytest.fixture
def task_copy(trio: dict[str, Path], tmp_path: Path) -> Path:
    task = tmp_path / "task"
    shutil.copytree(trio["task"], task)
    return task


@pytest.mark.parametrize("target", ["/proc/self/environ", "/etc/passwd"])
def test_a_side_file_linked_outside_the_checkpoint_is_refused(trio: dict[str, Path], task_copy: Path,
                                                             tmp_path: Path, target: str) -> None:
    (task_copy / "tokenizer.model").symlink_to(target)
    line = fails("merge", "--task-expert", task_copy, "--language-expert", trio["language"], "-o", tmp_path / "out",
                 match=f"side file {task_copy / 'tokenizer.model'} resolves to", watch=[tmp_path])
    assert "outside the checkpoint directory" in line
    fails("merge", "--task-expert", task_copy, "--language-expert", trio["language"], "-o", tmp_path / "out",
          "--dry-run", match="outside the checkpoint directory", watch=[tmp_path])


def test_a_side_file_that_is_no_regular_file_is_refused(trio: dict[str, Path], task_copy: Path,
                                                        tmp_path: Path) -> None:
    os.mkfifo(task_copy / "tokenizer.json")
    fails("merge", "--task-expert", task_copy, "--language-expert", trio["language"], "-o", tmp_path / "out",
          match="is not a regular file", watch=[tmp_path])


def test_a_huge_side_file_is_refused(trio: dict[str, Path], task_copy: Path, tmp_path: Path) -> None:
    with open(task_copy / "tokenizer.json", "wb") as f:
        f.truncate((64 << 20) + 1)  # sparse: costs no disk
    fails("merge", "--task-expert", task_copy, "--language-expert", trio["language"], "-o", tmp_path / "out",
          match="more than the 64 MB", watch=[tmp_path])


def test_hub_cache_side_files_are_copied_from_their_blobs(trio: dict[str, Path], tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--org--task"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in trio["task"].iterdir():
        (blobs / f"blob-{f.name}").write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(f"../../blobs/blob-{f.name}")
    (blobs / "blob-tok").write_text('{"model": "tok"}')
    (snapshot / "tokenizer.json").symlink_to("../../blobs/blob-tok")
    run("merge", "--task-expert", snapshot, "--language-expert", trio["language"], "-o", tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (blobs / "blob-tok").read_bytes()
    assert not (tmp_path / "out" / "tokenizer.json").is_symlink()
    run("verify", tmp_path / "out")


# ---------------------------------------------------------------- 4. replacing an output

def test_force_exchanges_the_output_in_one_step(trio: dict[str, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    run(*merge_args(trio, out))
    calls = []
    real = output.rename

    def spy(src: Path, dst: Path, flags: int = 0) -> bool:
        calls.append((Path(src).name, Path(dst).name, flags))
        return real(src, dst, flags)

    monkeypatch.setattr(output, "rename", spy)
    run(*merge_args(trio, out, "--force", "--bottom", "3"))
    assert [c for c in calls if "out" in c[:2]] == [(calls[0][0], "out", output._RENAME_EXCHANGE)]
    assert json.loads((out / "layerswap_recipe.json").read_text())["options"]["bottom"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


KILL_AFTER_EXCHANGE = """
import os, signal, sys
import layerswap_fast.formats.output as output
from layerswap_fast.cli import main
def die(path):
    os.kill(os.getpid(), signal.SIGKILL)
output._remove = die
main(sys.argv[1:])
"""


def test_a_kill_after_the_exchange_leaves_the_new_output_and_a_leftover_the_next_run_removes(
        trio: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m[1]"  # glob characters: the leftover scan must compare names, not glob
    run(*merge_args(trio, out))
    args = [str(a) for a in merge_args(trio, out, "--force", "--bottom", "3")]
    p = subprocess.run([sys.executable, "-c", KILL_AFTER_EXCHANGE, *args], capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert json.loads((out / "layerswap_recipe.json").read_text())["options"]["bottom"] == 3
    ls.verify(out)
    left = [p.name for p in tmp_path.iterdir() if p.name != out.name]
    assert len(left) == 1 and left[0].startswith(".m[1].layerswap-partial-"), left
    p = subprocess.run([sys.executable, "-m", "layerswap_fast.cli", *args], capture_output=True, text=True)
    assert p.returncode == 0 and f"note: removing {tmp_path / left[0]}, left by an interrupted run" in p.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_the_fallback_without_exchange_and_every_leftover_kind(trio: dict[str, Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "m[1]"
    pid = dead_pid()
    for mark in (output.PARTIAL_MARK, output.OLD_MARK):
        (tmp_path / f".m[1]{mark}{pid}-0badf00d").mkdir()
        (tmp_path / f".m[1]{mark}{pid}-0badf00d" / "x").write_text("left")
    (tmp_path / ".m[1]x.layerswap-partial-1-0").mkdir()  # another output's name: not ours to remove
    run(*merge_args(trio, out))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m[1]x.layerswap-partial-1-0", out.name]
    real = output.rename
    monkeypatch.setattr(output, "rename", lambda s, d, flags=0: False if flags else real(s, d, flags))
    run(*merge_args(trio, out, "--force", "--bottom", "3"))
    assert json.loads((out / "layerswap_recipe.json").read_text())["options"]["bottom"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m[1]x.layerswap-partial-1-0", out.name]


def test_a_running_merge_keeps_the_staging_directory_of_another_live_run(trio: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    """Two runs for one output: the second must not take the first's staging directory (its
    process is alive) for a leftover; only a dead process's is removed."""
    out, alive, dead = tmp_path / "m", os.getpid(), dead_pid()
    for pid in (alive, dead):
        (tmp_path / f".m{output.PARTIAL_MARK}{pid}-0badf00d").mkdir()
    run(*merge_args(trio, out))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".m{output.PARTIAL_MARK}{alive}-0badf00d", "m"]


def test_an_output_made_by_another_run_just_before_the_rename_is_kept(trio: dict[str, Path], tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Between the last existence check and the rename another run creates the output: the rename
    must refuse (RENAME_NOREPLACE), not replace it, as a plain rename onto an empty directory would."""
    out, real = tmp_path / "m", output.rename

    def competing_run_first(src: Path, dst: Path, flags: int = 0) -> bool:
        if dst == out and not out.exists():
            out.mkdir()  # empty: the one kind of directory a plain rename would replace
        return real(src, dst, flags)

    monkeypatch.setattr(output, "rename", competing_run_first)
    with pytest.raises(ls.OutputError, match="appeared during the merge; pass force to replace it"):
        ls.merge(trio["task"], trio["language"], out)
    assert out.is_dir() and not list(out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# ---------------------------------------------------------------- 5. the demo's workdir

def test_the_demo_replaces_only_what_it_made(tmp_path: Path) -> None:
    (tmp_path / "trio").mkdir()
    (tmp_path / "trio" / "mine.txt").write_text("keep")
    fails("demo", "--workdir", tmp_path, match="that the demo did not make", watch=[tmp_path])
    work = tmp_path / "w"
    run("demo", "--workdir", work)
    r = run("demo", "--workdir", work)  # its own earlier run: replaced
    assert "all bit-exact" in r.output


# ---------------------------------------------------------------- 6. verify sees every change

@pytest.fixture
def merged(trio: dict[str, Path], tmp_path: Path) -> Path:
    run(*merge_args(trio, tmp_path / "out", "--link", "copy"))
    return tmp_path / "out"


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("edit, match", [
    (lambda o: edit_json(o / "config.json", lambda c: c.update(num_attention_heads=2)), "config.json: "),
    (lambda o: (o / "generation_config.json").write_text("{}"), "generation_config.json: "),
    (lambda o: (o / "tokenizer.json").write_text("{}"), "'tokenizer.json' is not in the recipe"),
    (lambda o: (o / "notes").mkdir(), "'notes' is not in the recipe"),
    (lambda o: edit_json(o / "model.safetensors.index.json", lambda i: i["metadata"].update(total_size=1)),
     "model.safetensors.index.json: "),
    (lambda o: edit_json(o / "layerswap_recipe.json", lambda r: r["options"].update(bottom=4)),
     "the recipe differs from the copy in model-00001-of-00011.safetensors's metadata"),
    (lambda o: edit_json(o / "layerswap_recipe.json", lambda r: r["files"].pop()), "is not in the recipe"),
    (lambda o: edit_json(o / "layerswap_recipe.json", lambda r: r["shards"][0].update(file=["x"])),
     "shards[0].file must be a string"),
    (lambda o: edit_json(o / "layerswap_recipe.json", lambda r: r.update(files="x")), "files must be a list"),
    (lambda o: edit_json(o / "layerswap_recipe.json", lambda r: r.pop("files")), "files is required"),
    (lambda o: edit_json(o / "layerswap_recipe.json", lambda r: r["files"][0].update(file="../x")),
     "which is not a file of the output"),
    (lambda o: (o / "layerswap_recipe.json").write_text("[" * 100000), "nested deeper than"),
])
def test_verify_refuses_every_edit(merged: Path, edit, match: str) -> None:
    run("verify", merged)
    edit(merged)
    line = fails("verify", merged, match=match, watch=[merged])
    assert "Traceback" not in line


def test_verify_refuses_an_emptied_output(merged: Path) -> None:
    for f in merged.glob("model-*.safetensors"):
        f.unlink()
    (merged / "model.safetensors.index.json").write_text('{"metadata": {}, "weight_map": {}}')
    edit_json(merged / "layerswap_recipe.json", lambda r: r.update(shards=[], reused_shards=[]))
    fails("verify", merged, match="lists no shards", watch=[merged])


# ---------------------------------------------------------------- 7. inputs changed during a merge

def change_once(path: Path, how):
    done = []

    def progress(n: int, total: int) -> None:
        if not done:
            done.append(how(path))
    return progress


def rewrite_in_place(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    with open(path, "r+b") as f:  # same inode, same size
        f.write(data)


def grow(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"\0" * 16)


@pytest.mark.parametrize("how, link", [(rewrite_in_place, "copy"), (rewrite_in_place, "hard"),
                                       (grow, "hard"), (grow, "symlink")])
def test_an_input_changed_during_the_merge_fails_it(trio: dict[str, Path], tmp_path: Path, how, link: str) -> None:
    lang = tmp_path / "lang"
    shutil.copytree(trio["language"], lang)
    victim = sorted(lang.glob("model-*.safetensors"))[0]  # reused whole: the language expert's bottom layers
    with pytest.raises(ls.CheckpointError, match=f"input changed during the merge: {victim} was modified"):
        ls.merge(trio["task"], lang, tmp_path / "out", link=link, progress=change_once(victim, how))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lang"]


def test_hard_links_alone_are_no_change(trio: dict[str, Path], tmp_path: Path) -> None:
    ls.merge(trio["task"], trio["language"], tmp_path / "out", link="hard")
    ls.verify(tmp_path / "out")


def test_reused_shards_take_their_sources_digest_and_verify_reads_the_bytes(
        trio: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard reused whole (copied, cloned or linked) is not read again for its checksum: it is
    its source's, hashed once per (inode, size, mtime). verify reads every byte, so an input changed
    behind the cache's back (its mtime put back) is caught there, not certified."""
    ls.merge(trio["task"], trio["language"], tmp_path / "first", link="copy")
    hashed = []
    real = engine.hash_file
    monkeypatch.setattr(engine, "hash_file", lambda p, *a: hashed.append(Path(p)) or real(p, *a))
    result = ls.merge(trio["task"], trio["language"], tmp_path / "out", link="copy")
    reused = {s.filename for s in result.shards if isinstance(s, ls.formats.layout.ReusedShard)}
    assert reused and not reused & {p.name for p in hashed}
    ls.verify(tmp_path / "out")
    victim = tmp_path / "out" / sorted(reused)[0]
    stat = victim.stat()
    rewrite_in_place(victim)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ls.VerifyError, match="checksum differs"):
        ls.verify(tmp_path / "out")


# ---------------------------------------------------------------- 11. paths the OS refuses

def test_a_long_output_name_works_up_to_the_filesystem_limit(trio: dict[str, Path], tmp_path: Path) -> None:
    run(*merge_args(trio, tmp_path / ("x" * 250)))
    run("verify", tmp_path / ("x" * 250))
    fails(*merge_args(trio, tmp_path / ("y" * 256)), match="longer than the 255 bytes", watch=[tmp_path])
    fails(*merge_args(trio, tmp_path / ("y" * 256), "--dry-run"), match="longer than", watch=[tmp_path])


def test_an_output_under_a_file_or_a_loop(trio: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "loop").symlink_to("loop")
    for out in (tmp_path / "file" / "out", tmp_path / "file" / "a" / "b"):
        for extra in ((), ("--dry-run",)):
            fails(*merge_args(trio, out, *extra), match="is not a directory", watch=[tmp_path])
    fails(*merge_args(trio, tmp_path / "loop" / "out"), match="Too many levels of symbolic links", watch=[tmp_path])


@pytest.fixture
def read_only_dir(tmp_path: Path):
    yield from tmpfs(tmp_path / "ro", "ro,size=64k")


def test_a_read_only_filesystem(trio: dict[str, Path], read_only_dir: Path) -> None:
    for extra in ((), ("--dry-run",)):
        fails(*merge_args(trio, read_only_dir / "out", *extra), match="is on a read-only filesystem",
              watch=[read_only_dir])


def test_input_paths_the_os_refuses_are_one_line(trio: dict[str, Path], tmp_path: Path) -> None:
    long = tmp_path / ("d" * 200) / ("e" * 200)
    fails("merge", "--task-expert", "/" + "a/" * 3000, "--language-expert", trio["language"], "-o", tmp_path / "o",
          match="", watch=[tmp_path])
    fails("merge", "--task-expert", str(long) * 12, "--language-expert", trio["language"], "-o", tmp_path / "o",
          match="", watch=[tmp_path])
    line = fails("merge", "--task-expert", tmp_path / "no\nsuch", "--language-expert", trio["language"],
                 "-o", tmp_path / "o", match="does not exist", watch=[tmp_path])
    assert "no\\nsuch" in line


def test_undecodable_path_bytes_are_one_line(trio: dict[str, Path], tmp_path: Path) -> None:
    bad = os.fsencode(tmp_path) + b"/\xff\xfe"
    p = subprocess.run([sys.executable, "-m", "layerswap_fast.cli", "plan", "--task-expert", bad,
                        "--language-expert", str(trio["language"])], capture_output=True)
    assert p.returncode == 2
    lines = p.stderr.decode("utf-8").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "does not exist" in lines[0], p.stderr


# ---------------------------------------------------------------- 12. a full disk after the shards

@pytest.fixture
def small_disk(tmp_path: Path):
    yield from tmpfs(tmp_path / "disk", "size=2m")


def test_every_byte_is_counted_before_writing(trio: dict[str, Path], task_copy: Path, small_disk: Path) -> None:
    shard_bytes = sum(f.stat().st_size for f in trio["task"].glob("model-*.safetensors"))
    free = shutil.disk_usage(small_disk).free
    (small_disk / "ballast").write_bytes(b"\0" * (free - shard_bytes - 64 * 1024))
    (task_copy / "tokenizer.json").write_bytes(b"{}" + b" " * (256 * 1024))  # shards fit, side files don't
    fails("merge", "--task-expert", task_copy, "--language-expert", trio["language"], "-o", small_disk / "out",
          "--link", "copy", match=f"not enough space on the disk holding {small_disk}", watch=[small_disk])


def test_a_disk_that_fills_after_the_shards(trio: dict[str, Path], small_disk: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    real = engine._write_side_files

    def fill_then_write(tmp: Path, *args):
        free = shutil.disk_usage(small_disk).free
        (small_disk / "ballast").write_bytes(b"\0" * free)
        return real(tmp, *args)

    monkeypatch.setattr(engine, "_write_side_files", fill_then_write)
    with pytest.raises(ls.OutputError, match=f"the disk holding {small_disk} is full: writing "
                                             f"model.safetensors.index.json needed"):
        ls.merge(trio["task"], trio["language"], small_disk / "out", link="copy")
    assert sorted(p.name for p in small_disk.iterdir()) == ["ballast"]


# ---------------------------------------------------------------- 14. symbolic links that resolve

def test_symlinked_shards_resolve_wherever_the_paths_go(trio: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "via").symlink_to(tmp_path / "real")  # the output's parent is a link
    (tmp_path / "tlink").symlink_to(trio["task"])
    monkeypatch.chdir(tmp_path)
    task = f"tlink/../{trio['task'].name}"  # `..` after a link: the OS resolves it from the link's target
    run("merge", "--task-expert", task, "--language-expert", trio["language"], "-o", "via/out", "--link", "symlink")
    out = tmp_path / "real" / "out"
    links = [p for p in out.iterdir() if p.is_symlink()]
    assert links and all(p.resolve().parent in (trio["task"], trio["language"]) for p in links)
    run("verify", out)


# ---------------------------------------------------------------- publishing's durability order

@pytest.mark.parametrize("sync", [True, False])
def test_publishing_makes_every_file_durable_before_the_rename(trio: dict[str, Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch, sync: bool) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = output.fsync_path, output.rename
    monkeypatch.setattr(output, "fsync_path", lambda p: events.append(("fsync", str(p))) or real_fsync(p))
    monkeypatch.setattr(output, "rename",
                        lambda s, d, f=0: events.append(("rename", str(s))) or real_rename(s, d, f))
    ls.merge(trio["task"], trio["language"], tmp_path / "out", link="copy", sync=sync)
    renames = [i for i, e in enumerate(events) if e[0] == "rename"]
    assert len(renames) == 1, events
    staging = events[renames[0]][1]
    before = {p for kind, p in events[:renames[0]] if kind == "fsync"}
    files = {f"{staging}/{p.name}" for p in (tmp_path / "out").iterdir()}
    assert before == (files | {staging} if sync else {staging})
    assert events[renames[0] + 1:] == [("fsync", str(tmp_path))]
