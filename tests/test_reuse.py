"""Whole input shards that a merge leaves unchanged are reused: reflinked, linked or copied."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import layerswap_fast as ls
from support import tensors_digest, assert_merged, assert_same_shards, load_tensors, make_llama_trio, raw_bytes

L = 12


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # shards small enough that several hold nothing but middle (task-expert) layers
    return make_llama_trio(tmp_path_factory.mktemp("reuse"), num_layers=L, shard="20KB")


def reused_of(out: Path) -> list[dict]:
    return json.loads((out / "layerswap_recipe.json").read_text())["reused_shards"]


def test_pure_task_shards_are_found_and_hard_linked(trio: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = ls.merge(trio["task"], trio["language"], out, link="hard")
    reused = reused_of(out)
    assert len(reused) >= 2
    assert {e["expert"] for e in reused} == {"task", "language"}  # middle layers, and bottom/top ones
    sources = {"task": load_tensors(trio["task"]), "language": load_tensors(trio["language"])}
    for entry in reused:
        src, dst = Path(entry["from"]), out / entry["shard"]
        assert os.stat(src).st_ino == os.stat(dst).st_ino
        assert entry["blake3-tensors"] == tensors_digest(src.read_bytes())
        from safetensors import safe_open
        with safe_open(str(dst), framework="pt") as f:  # every tensor in it is a kept layer of its expert
            for name in f.keys():
                layer = int(name.split(".")[2])
                assert (6 <= layer <= 8) if entry["expert"] == "task" else (layer < 5 or layer >= 10)
                assert raw_bytes(f.get_tensor(name)) == raw_bytes(sources[entry["expert"]][name])
    assert result.stats is not None and result.stats.reused == {"hard link": len(reused)}
    assert "reused" in result.stats.summary()
    assert_merged(out, trio)


def test_copy_shares_no_inode_and_gives_the_same_bytes(trio: dict[str, Path], tmp_path: Path) -> None:
    ls.merge(trio["task"], trio["language"], tmp_path / "hard", link="hard")
    ls.merge(trio["task"], trio["language"], tmp_path / "copy", link="copy")
    for entry in reused_of(tmp_path / "copy"):
        dst = tmp_path / "copy" / entry["shard"]
        assert os.stat(entry["from"]).st_ino != os.stat(dst).st_ino
        assert dst.read_bytes() == Path(entry["from"]).read_bytes()
    assert_same_shards(tmp_path / "copy", tmp_path / "hard")
    assert_merged(tmp_path / "copy", trio)


def test_symlinks_are_relative(trio: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    ls.merge(trio["task"], trio["language"], out, link="symlink")
    for entry in reused_of(out):
        link = out / entry["shard"]
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        assert link.resolve() == Path(entry["from"]).resolve()
    assert_merged(out, trio)


def test_transformers_loads_a_linked_output(trio: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM
    ls.merge(trio["task"], trio["language"], tmp_path / "out", link="symlink")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert torch.isfinite(model(torch.tensor([[3, 4, 5]])).logits).all()


def _mount_xfs(tmp_path: Path, *options: str):
    """A small XFS filesystem with reflink, loop-mounted (needs root and mkfs.xfs)."""
    import shutil
    import subprocess
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs is not installed (xfsprogs): reflink cannot be tested here")
    image, mnt = tmp_path / "xfs.img", tmp_path / "xfs"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(400 << 20)
    made = subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", *options, str(image)], capture_output=True)
    if made.returncode or subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True).returncode:
        pytest.skip(f"cannot make and loop-mount an XFS filesystem {' '.join(options)} here (needs root, and a "
                    f"kernel for blocks larger than a page): reflink untested")
    return mnt


@pytest.fixture
def xfs(tmp_path: Path):
    mnt = _mount_xfs(tmp_path)
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


@pytest.fixture
def xfs16k(tmp_path: Path):
    """The same with 16 KiB blocks (Linux 6.12 and later mount blocks larger than a page)."""
    mnt = _mount_xfs(tmp_path, "-b", "size=16384")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_reflink_clones_reused_shards(trio: dict[str, Path], xfs: Path) -> None:
    import shutil
    task, lang = xfs / "task", xfs / "language"
    shutil.copytree(trio["task"], task)
    shutil.copytree(trio["language"], lang)
    free_before = shutil.disk_usage(xfs).free
    result = ls.merge(task, lang, xfs / "out", link="reflink")
    assert result.stats is not None and set(result.stats.reused or {}) == {"reflink"}
    for entry in reused_of(xfs / "out"):  # a clone: same bytes, its own inode
        dst = xfs / "out" / entry["shard"]
        assert dst.read_bytes() == Path(entry["from"]).read_bytes()
        assert os.stat(dst).st_ino != os.stat(entry["from"]).st_ino
    assert free_before - shutil.disk_usage(xfs).free < result.stats.bytes_written + result.stats.bytes_reused
    assert_merged(xfs / "out", {"task": task, "language": lang})
    ls.verify(xfs / "out")
    auto = ls.merge(task, lang, xfs / "auto")  # auto prefers a reflink where it can
    assert auto.stats is not None and set(auto.stats.reused or {}) == {"reflink"}


def test_reflink_refused_where_the_filesystem_cannot(trio: dict[str, Path], tmp_path: Path) -> None:
    if _reflink_supported(tmp_path):
        pytest.skip("the test directory's filesystem supports reflinks; the refusal is untested here")
    with pytest.raises(ls.OutputError, match="does not support copy-on-write clones"):
        ls.merge(trio["task"], trio["language"], tmp_path / "out", link="reflink")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    result = ls.merge(trio["task"], trio["language"], tmp_path / "auto")  # auto falls back to a copy
    assert result.stats is not None and set(result.stats.reused or {}) == {"copy"}


def _reflink_supported(directory: Path) -> bool:
    import fcntl
    a, b = directory / ".probe-a", directory / ".probe-b"
    a.write_bytes(b"x" * 4096)
    try:
        with open(a, "rb") as src, open(b, "wb") as dst:
            fcntl.ioctl(dst.fileno(), 0x40049409, src.fileno())
        return True
    except OSError:
        return False
    finally:
        a.unlink()
        b.unlink(missing_ok=True)


def test_no_reuse_when_every_shard_needs_work(trio: dict[str, Path], tmp_path: Path) -> None:
    ls.merge(trio["task"], trio["language"], tmp_path / "out", dtype="f32")
    assert reused_of(tmp_path / "out") == []


def _shared_bytes(files: list[Path]) -> int:
    """Bytes of the files' extents that the filesystem marks shared (``filefrag -v``)."""
    import re
    import shutil
    import subprocess
    if shutil.which("filefrag") is None:
        pytest.skip("filefrag is not installed (e2fsprogs): shared extents cannot be measured")
    shared = 0
    for f in files:
        out = subprocess.run(["filefrag", "-v", "-b4096", str(f)], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            m = re.match(r"\s*\d+:\s+\d+\.\.\s*\d+:\s+\d+\.\.\s*\d+:\s+(\d+):", line)
            if m and "shared" in line:
                shared += int(m[1]) * 4096
    return shared


def test_copied_tensors_share_extents_with_their_inputs(xfs: Path) -> None:
    """Inside a new shard (one that mixes copied and computed tensors), every whole block of a
    copied tensor is a clone of its input's: a copy starts with the bytes up to the input's next
    block boundary, so the rest starts on one in both files."""
    paths = make_llama_trio(xfs, num_layers=L, hidden=256, shard="100MB")
    result = ls.merge(paths["task"], paths["language"], xfs / "out")
    assert result.stats is not None and not result.stats.reused  # one shard: nothing reused whole
    assert_merged(xfs / "out", paths)
    ls.verify(xfs / "out")
    copied = [t for t in result.plan.tensors if t.op == "copy"]
    copied_bytes = sum(math.prod(t.shape) * 2 for t in copied)  # bf16
    shared = _shared_bytes(sorted((xfs / "out").glob("*.safetensors")))
    # whole blocks only: at most a block at each end of each run of adjacent copies is copied
    assert copied_bytes - 2 * 4096 * len(copied) <= shared <= copied_bytes + 4096


def test_copied_tensors_of_inputs_with_other_header_lengths_are_cloned_too(xfs: Path) -> None:
    """Experts whose headers differ in length put their tensors at different offsets within a
    block; one shard cannot keep both at their sources' offsets, so the layout starts a new shard
    where the source's offset changes, and every large copied tensor is still cloned."""
    from safetensors.torch import load_file, save_file
    paths = make_llama_trio(xfs, num_layers=L, hidden=256, shard="100MB")
    starts = []
    for role, note in (("task", ""), ("language", "x" * 1000)):
        for f in paths[role].glob("*.safetensors"):
            save_file(load_file(f), f, metadata={"format": "pt", "note": note})
            starts.append(8 + int.from_bytes(f.read_bytes()[:8], "little"))
    assert len({s % 4096 for s in starts}) == 2  # the two experts' tensors sit differently in a block
    result = ls.merge(paths["task"], paths["language"], xfs / "out")
    made = json.loads((xfs / "out" / "layerswap_recipe.json").read_text())["bytes"]
    large = [t for t in result.plan.tensors if t.op == "copy" and math.prod(t.shape) * 2 >= 16 * 4096]
    assert {t.terms[0].role for t in large} == {"task", "language"}
    # every large copied tensor is cloned but for at most a block at either end
    assert made["cloned"] >= sum(math.prod(t.shape) * 2 for t in large) - 2 * 4096 * len(large)
    assert_merged(xfs / "out", paths)
    ls.verify(xfs / "out")


def test_on_larger_blocks_copied_tensors_keep_their_offset_within_a_block_and_clone(xfs16k: Path) -> None:
    """The layout aligns copied tensors to the output filesystem's block (here 16 KiB), not to a
    page: on 4 KiB alignment alone most of them would not clone."""
    from layerswap_fast.formats.output import layout_block
    assert layout_block(xfs16k / "out") == 16384
    paths = make_llama_trio(xfs16k, num_layers=L, hidden=256, shard="100MB")
    result = ls.merge(paths["task"], paths["language"], xfs16k / "out")
    made = json.loads((xfs16k / "out" / "layerswap_recipe.json").read_text())["bytes"]
    large = [t for t in result.plan.tensors if t.op == "copy" and math.prod(t.shape) * 2 >= 16 * 16384]
    assert large
    assert made["cloned"] >= sum(math.prod(t.shape) * 2 for t in large) - 2 * 16384 * len(large)
    assert_merged(xfs16k / "out", paths)
    ls.verify(xfs16k / "out")


def test_a_merge_that_fits_only_as_clones_is_not_refused(xfs: Path) -> None:
    """The space check counts what the filesystem would share with the inputs: on a filesystem
    with room for the computed tensors but not for a whole copy, the merge runs (and its dry
    run, which probes nothing, refuses in one line)."""
    paths = make_llama_trio(xfs, num_layers=L, hidden=256, shard="100MB")
    first = ls.merge(paths["task"], paths["language"], xfs / "first")
    made = json.loads((xfs / "first" / "layerswap_recipe.json").read_text())["bytes"]
    whole = sum(f.stat().st_size for f in (xfs / "first").iterdir())
    shutil.rmtree(xfs / "first")
    assert made["cloned"] > whole // 2 and first.stats is not None
    with open(xfs / "filler", "wb") as f:  # leave room for the computed bytes and half the rest
        os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(xfs).free - (whole + made["computed"]) // 2)
    with pytest.raises(ls.OutputError, match="not enough space"):
        ls.merge(paths["task"], paths["language"], xfs / "dry", dry_run=True)
    ls.merge(paths["task"], paths["language"], xfs / "out")
    assert_merged(xfs / "out", paths)
    ls.verify(xfs / "out")


def test_a_merge_whose_reused_shards_fit_only_as_reflinks_is_not_refused(xfs: Path) -> None:
    """Input shards reused whole are reflinked by ``--link auto`` where the filesystem clones: the
    space check counts them as shared too (a sweep's later candidates are mostly such shards)."""
    paths = make_llama_trio(xfs, num_layers=L, hidden=256, shard="2MB")
    first = ls.merge(paths["task"], paths["language"], xfs / "first")
    made = json.loads((xfs / "first" / "layerswap_recipe.json").read_text())["bytes"]
    whole = sum(f.stat().st_size for f in (xfs / "first").iterdir())
    shutil.rmtree(xfs / "first")
    assert made["reused"] > 0 and first.stats is not None
    stored = whole - made["reused"] - made["cloned"]
    with open(xfs / "filler", "wb") as f:  # room for what is stored anew and half the reused shards
        os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(xfs).free - stored - made["reused"] // 2)
    ls.merge(paths["task"], paths["language"], xfs / "out")
    assert_merged(xfs / "out", paths)
    ls.verify(xfs / "out")


def _new_shards(out: Path) -> list[Path]:
    reused = {r["shard"] for r in reused_of(out)}
    return [f for f in sorted(out.glob("*.safetensors")) if f.name not in reused]


def _tensor_bytes(result, op_is_copy: bool) -> int:
    reused = {n for s in result.shards if isinstance(s, ls.formats.layout.ReusedShard) for n in s.names}
    return sum(math.prod(t.shape) * 2 for t in result.plan.tensors
               if (t.op == "copy") == op_is_copy and t.name not in reused)


def test_the_recipe_and_summary_account_computed_copied_and_cloned_bytes(xfs: Path) -> None:
    """On a filesystem that clones, the recipe's ``bytes`` say what was computed (the plan's
    computed tensors), cloned (what filefrag finds shared in the new shards) and copied (the rest
    of the copied tensors); the summary line says so and that clones were on."""
    paths = make_llama_trio(xfs, num_layers=L, hidden=256, shard="2MB")
    result = ls.merge(paths["task"], paths["language"], xfs / "out")
    made = json.loads((xfs / "out" / "layerswap_recipe.json").read_text())["bytes"]
    assert made["computed"] == _tensor_bytes(result, False) > 0
    assert made["copied"] + made["cloned"] == _tensor_bytes(result, True)
    assert made["reused"] == sum(s.data_size for s in result.shards if isinstance(s, ls.formats.layout.ReusedShard))
    # filefrag counts whole blocks: a clone that ends at an input's end shares its partial last block
    inputs = len(list(paths["task"].glob("*.safetensors"))) + len(list(paths["language"].glob("*.safetensors")))
    assert 0 <= _shared_bytes(_new_shards(xfs / "out")) - made["cloned"] < 4096 * inputs and made["cloned"] > 0
    assert "cloned (clones on)" in result.stats.summary()
    ls.verify(xfs / "out")


def test_link_copy_shares_nothing_and_gives_the_same_bytes(xfs: Path) -> None:
    paths = make_llama_trio(xfs, num_layers=L, hidden=256, shard="2MB")
    result = ls.merge(paths["task"], paths["language"], xfs / "copy", link="copy")
    ls.merge(paths["task"], paths["language"], xfs / "auto")
    assert _shared_bytes(sorted((xfs / "copy").glob("*.safetensors"))) == 0
    made = json.loads((xfs / "copy" / "layerswap_recipe.json").read_text())["bytes"]
    assert made["cloned"] == 0 and made["copied"] == _tensor_bytes(result, True)
    assert "clones off" in result.stats.summary()
    assert_same_shards(xfs / "copy", xfs / "auto")
    ls.verify(xfs / "copy")


def test_where_nothing_can_be_cloned_everything_copied_is_copied(trio: dict[str, Path], tmp_path: Path) -> None:
    """On a filesystem without clones (or from another one), the same bytes, nothing counted cloned."""
    if _reflink_supported(tmp_path):
        pytest.skip("the temporary directory's filesystem clones: this is the fallback's test")
    result = ls.merge(trio["task"], trio["language"], tmp_path / "out")
    made = json.loads((tmp_path / "out" / "layerswap_recipe.json").read_text())["bytes"]
    assert made["cloned"] == 0 and made["copied"] == _tensor_bytes(result, True)
    assert "clones off" in result.stats.summary()
    assert_merged(tmp_path / "out", trio)


def test_inputs_on_another_filesystem_are_copied_onto_one_that_clones(trio: dict[str, Path], xfs: Path,
                                                                       tmp_path: Path) -> None:
    """The output's filesystem clones, but the inputs are elsewhere: every copied byte is copied
    (clones are probed on, nothing counted cloned or shared), and the bytes are the same."""
    if os.stat(tmp_path).st_dev == os.stat(xfs).st_dev:
        pytest.skip("the inputs are on the XFS itself")
    result = ls.merge(trio["task"], trio["language"], xfs / "out")
    made = json.loads((xfs / "out" / "layerswap_recipe.json").read_text())["bytes"]
    assert made["cloned"] == 0 and made["copied"] == _tensor_bytes(result, True) > 0
    assert _shared_bytes(sorted((xfs / "out").glob("*.safetensors"))) == 0
    assert "cloned (clones on)" in result.stats.summary()
    assert_merged(xfs / "out", trio)
    ls.verify(xfs / "out")


def test_an_input_changed_during_a_cloning_merge_fails_it(xfs: Path) -> None:
    """Clones are taken of the input as it is when cloned: a change of the input during the merge
    is still caught at the end, and nothing is published."""
    paths = make_llama_trio(xfs, num_layers=L, hidden=256, shard="2MB")
    victim = sorted(paths["task"].glob("*.safetensors"))[-1]
    done = []

    def change(n: int, total: int) -> None:
        if not done:
            data = bytearray(victim.read_bytes())
            data[-1] ^= 0xFF
            with open(victim, "r+b") as f:
                f.write(data)
            done.append(True)

    with pytest.raises(ls.CheckpointError, match="input changed during the merge"):
        ls.merge(paths["task"], paths["language"], xfs / "out", progress=change)
    assert not (xfs / "out").exists()


@pytest.mark.parametrize("src, dst, n, pieces", [
    (4096, 8192, 10, [(0, 10)]),                              # aligned: one piece
    (100, 4196, 5000, [(0, 3996), (3996, 1004)]),             # same phase: up to the block boundary first
    (100, 4200, 5000, [(0, 5000)]),                           # different phases: no clone possible
    (4000, 4000, 50, [(0, 50)]),                              # inside one block
])
def test_copy_pieces_start_on_block_boundaries(src, dst, n, pieces) -> None:
    from layerswap_fast.engine.execute import copy_pieces
    assert list(copy_pieces(src, dst, n)) == pieces
