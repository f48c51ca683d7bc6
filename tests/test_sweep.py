"""``sweep``: every candidate equals its own ``merge`` and verifies; a tensor computed for one
candidate is copied, not computed, for the next; a re-run skips what is complete; bad specs are
one line with nothing written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

import layerswap_fast as lf
from support import make_llama_trio, run_cli, shards_without_metadata, snapshot

NUM_LAYERS = 10


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sweep")
    return make_llama_trio(root, num_layers=NUM_LAYERS, roles=("base", "math-1", "math-2", "swh-1", "swh-2"))


def _spec(experts, tmp_path: Path, **extra) -> Path:
    spec = {"task_experts": [str(experts["math-1"]), str(experts["math-2"])],
            "language_experts": [str(experts["swh-1"]), str(experts["swh-2"])],
            "grid": {"bottom": [3, 4], "transition_weights": ["uniform", "ramp"]}, **extra}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_every_candidate_is_its_own_merge(experts, tmp_path):
    out = tmp_path / "sweep"
    found = lf.sweep(_spec(experts, tmp_path), out)
    assert len(found) == 2 * 2 * 2 * 2 and all(c.status == "built" for c in found)
    manifest = json.loads((out / "sweep.json").read_text())["candidates"]
    assert [c["name"] for c in manifest] == [c.name for c in found]
    assert manifest[0]["name"] == "math-1__swh-1__bottom-3_transition_weights-uniform"
    for row in manifest:
        options = row["options"]
        lf.verify(row["path"])
        reference = tmp_path / "ref" / row["name"]
        lf.merge(options["task_expert"], options["language_expert"], reference,
                 lf.SwapConfig(bottom=options["bottom"], transition_weights=options["transition_weights"]))
        assert shards_without_metadata(Path(row["path"])) == shards_without_metadata(reference), row["name"]
        recipe = json.loads((Path(row["path"]) / "layerswap_recipe.json").read_text())
        assert recipe["options"] == options
        # its inputs are the experts, as its own merge's, not the earlier candidates it copied from
        assert recipe["inputs"] == json.loads((reference / "layerswap_recipe.json").read_text())["inputs"]


def test_each_distinct_tensor_is_computed_once(experts, tmp_path):
    """Across the sweep, the tensors computed equal the distinct computed recipes (a transition
    layer of one pair under one weighting is made once, whatever else varies)."""
    found = lf.sweep(_spec(experts, tmp_path), tmp_path / "sweep")
    distinct = set()
    for c in found:
        plan = lf.plan_merge(c.options["task_expert"], c.options["language_expert"],
                             lf.SwapConfig(bottom=c.options["bottom"],
                                           transition_weights=c.options["transition_weights"]))
        distinct |= {(c.options["task_expert"], c.options["language_expert"], t.name, t.terms)
                     for t in plan.tensors if t.op != "copy"}
    assert sum(c.computed for c in found) == len(distinct)
    assert sum(c.shared for c in found) > 0
    # the second weighting of the first pair shares the non-layer averages with the first
    assert found[1].shared > 0 and found[0].shared == 0


def test_a_shard_an_earlier_candidate_wrote_is_reused_whole(experts, tmp_path):
    """With a shard per tensor, a candidate that differs from the one before in a few layers takes
    every other shard whole from that candidate's output (its recipe says from where), and still
    equals its own merge tensor for tensor and verifies."""
    spec = _spec(experts, tmp_path, grid={"bottom": [3, 4]}, shard_size="1KB",
                 pairs=[[str(experts["math-1"]), str(experts["swh-1"])]])
    out = tmp_path / "sweep"
    first, second = lf.sweep(spec, out)
    recipe = json.loads((second.path / "layerswap_recipe.json").read_text())
    from_first = [r for r in recipe["reused_shards"] if Path(r["from"]).parent == first.path]
    own = lf.plan_merge(experts["math-1"], experts["swh-1"], lf.SwapConfig(bottom=4))
    earlier = lf.plan_merge(experts["math-1"], experts["swh-1"], lf.SwapConfig(bottom=3))
    same = {t.name for t, e in zip(own.tensors, earlier.tensors) if t == e and t.op != "copy"}
    assert same and len(from_first) >= len(same)
    assert second.bytes_reused > first.bytes_reused
    lf.verify(second.path)
    # a dry run counts the same shards as reused (their sizes differ by the headers: a reused shard
    # keeps its source's, which records the earlier candidate's options)
    planned = lf.sweep(spec, tmp_path / "dry", dry_run=True)
    assert planned[0].bytes_reused == first.bytes_reused
    reused = len(recipe["reused_shards"])
    assert abs(planned[1].bytes_reused - second.bytes_reused) <= 1024 * reused
    assert abs(planned[1].bytes_new - second.bytes_new) <= 1024 * reused
    lf.merge(experts["math-1"], experts["swh-1"], tmp_path / "ref", lf.SwapConfig(bottom=4), shard_size="1KB")
    assert shards_without_metadata(second.path) == shards_without_metadata(tmp_path / "ref")


def test_hard_links_across_candidates_are_no_change_of_their_inputs(experts, tmp_path):
    """With --link hard, a candidate's shard may be a hard link of an input's shard that a later
    candidate links again: the change time that moves is not taken for a change of the bytes."""
    spec = _spec(experts, tmp_path, grid={"bottom": [3, 4], "top": [1, 2]}, shard_size="1KB",
                 pairs=[[str(experts["math-1"]), str(experts["swh-1"])]])
    found = lf.sweep(spec, tmp_path / "sweep", link="hard")
    assert [c.status for c in found] == ["built"] * 4, [c.error for c in found]
    for c in found:
        lf.verify(c.path)


def test_a_rerun_skips_complete_candidates_and_rebuilds_a_damaged_one(experts, tmp_path):
    spec, out = _spec(experts, tmp_path), tmp_path / "sweep"
    first = lf.sweep(spec, out)
    damaged = out / first[2].name
    shard = sorted(damaged.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    again = lf.sweep(spec, out)
    assert [c.status for c in again] == ["complete", "complete", "built"] + ["complete"] * (len(again) - 3)
    lf.verify(damaged)
    assert shards_without_metadata(damaged) == shards_without_metadata(out / first[2].name)


def test_explicit_pairs_soups_and_a_single_value_grid(experts, tmp_path):
    spec = _spec(experts, tmp_path, pairs=[[[str(experts["math-1"]), str(experts["math-2"])], str(experts["swh-2"])]],
                 grid={"bottom": 4, "top": [1, 2]})
    found = lf.sweep(spec, tmp_path / "sweep")
    assert [c.name for c in found] == ["math-1+math-2__swh-2__top-1", "math-1+math-2__swh-2__top-2"]
    lf.merge([experts["math-1"], experts["math-2"]], experts["swh-2"], tmp_path / "ref", lf.SwapConfig(bottom=4, top=2))
    assert shards_without_metadata(tmp_path / "sweep" / found[1].name) == shards_without_metadata(tmp_path / "ref")


def test_pairs_alone_need_no_expert_lists(experts, tmp_path):
    """A spec of explicit pairs only (the README's alternative to the cross product) lists them."""
    spec = tmp_path / "pairs.yaml"
    spec.write_text(yaml.safe_dump({"pairs": [[str(experts["math-2"]), str(experts["swh-1"])]],
                                    "grid": {"bottom": [3, 4]}}))
    found = lf.sweep(spec, tmp_path / "sweep", dry_run=True)
    assert [c.name for c in found] == ["math-2__swh-1__bottom-3", "math-2__swh-1__bottom-4"]
    assert not (tmp_path / "sweep").exists()


def test_a_spec_without_experts_or_pairs_is_one_line(experts, tmp_path):
    spec = tmp_path / "empty.yaml"
    spec.write_text(yaml.safe_dump({"grid": {"bottom": [3]}}))
    before = snapshot(tmp_path)
    result = run_cli("sweep", spec, "-o", tmp_path / "sweep")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {spec}: task_experts is missing (list the experts, or give explicit pairs)"], result.stderr
    assert snapshot(tmp_path) == before


def test_the_command_and_its_csv(experts, tmp_path):
    out = tmp_path / "sweep"
    result = run_cli("sweep", _spec(experts, tmp_path), "-o", out)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 16 and result.stdout.startswith("built")
    rows = list(csv.DictReader((out / "sweep.csv").read_text().splitlines()))
    assert len(rows) == 16 and {"name", "status", "bytes_new", "bottom", "transition_weights"} <= set(rows[0])
    assert run_cli("verify", out / rows[5]["name"]).returncode == 0


def test_the_read_path_and_checksum_are_choices_that_keep_the_bytes(experts, tmp_path):
    """--io and --checksum reach every candidate: the tensors are the default sweep's, each
    candidate records the checksum asked for, and a bad choice is one line."""
    spec = _spec(experts, tmp_path)
    result = run_cli("sweep", spec, "-o", tmp_path / "mmap", "--io", "mmap", "--checksum", "sha256")
    assert result.returncode == 0, result.stderr
    lf.sweep(spec, tmp_path / "default")
    for row in json.loads((tmp_path / "default" / "sweep.json").read_text())["candidates"]:
        mapped = tmp_path / "mmap" / row["name"]
        assert shards_without_metadata(mapped) == shards_without_metadata(Path(row["path"])), row["name"]
        assert json.loads((mapped / "layerswap_recipe.json").read_text())["checksum"] == "sha256"
        lf.verify(mapped)
    bad = run_cli("sweep", spec, "-o", tmp_path / "bad", "--io", "disk")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "'disk'" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_a_dry_run_writes_nothing(experts, tmp_path):
    spec = _spec(experts, tmp_path)
    before = snapshot(tmp_path)
    result = run_cli("sweep", spec, "-o", tmp_path / "sweep", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 16 and result.stdout.startswith("planned")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("change, needle", [
    ({"grid": {"bottm": [3]}}, "grid.bottm is no swap option a sweep can vary"),
    ({"grid": {"bottom": ["three"]}}, "grid.bottom[0] must be an integer"),
    ({"grid": {"bottom": []}}, "grid.bottom is empty"),
    ({"task_experts": []}, "task_experts must be a list"),
    ({"pairs": [["a"]]}, "pairs[0] must be a list"),
    ({"surprise": 1}, "unknown key surprise"),
    ({"task_experts": [3]}, "task_experts[0] must be a path or a list of paths"),
])
def test_bad_specs_are_one_line(experts, tmp_path, change, needle):
    spec = _spec(experts, tmp_path, **change)
    before = snapshot(tmp_path)
    result = run_cli("sweep", spec, "-o", tmp_path / "sweep")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert snapshot(tmp_path) == before


def test_a_failed_candidate_is_reported_and_the_others_finish(experts, tmp_path):
    spec = _spec(experts, tmp_path, grid={"bottom": [3, 9]})
    result = run_cli("sweep", spec, "-o", tmp_path / "sweep")
    assert result.returncode == 2
    assert "4 of 8 candidates failed" in result.stderr and "the swap needs" in result.stderr
    manifest = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["candidates"]
    assert [c["status"] for c in manifest] == ["built", "failed"] * 4
    assert all("the swap needs" in c["error"] for c in manifest if c["status"] == "failed")


def test_an_expert_pairs_outputs_are_released_once_the_sweep_moves_on(experts, tmp_path, monkeypatch):
    """Each pair's candidates are handed to ``release`` when the next pair starts (and the last
    pair's at the end), after their flushes; no later candidate reads them."""
    from layerswap_fast import sweep_build
    calls: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(sweep_build.Writeback, "flush", lambda self, d: calls.append(("flush", [d.name])))
    monkeypatch.setattr(sweep_build.Writeback, "release",
                        lambda self, ds: calls.append(("release", [d.name for d in ds])))
    found = lf.sweep(_spec(experts, tmp_path, grid={"bottom": [3, 4]}), tmp_path / "sweep")
    names = [c.name for c in found]
    expected = []
    for pair in range(4):
        mine = names[2 * pair:2 * pair + 2]
        expected += [("flush", [mine[0]]), ("flush", [mine[1]]), ("release", mine)]
    assert calls == expected


def _resident_pages(path: Path) -> list[bool]:
    """Which of ``path``'s pages the page cache holds (``mincore`` over a read-only mapping)."""
    import ctypes
    import mmap
    import os
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert address not in (None, ctypes.c_void_p(-1).value)
        vector = ctypes.create_string_buffer(pages)
        try:
            assert libc.mincore(address, size, vector) == 0, ctypes.get_errno()
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)
    return [bool(b & 1) for b in vector.raw[:pages]]


def test_a_released_shard_leaves_the_page_cache_but_its_header(tmp_path):
    """``_drop_cached``: the shard's pages after its header leave the page cache; the header's
    (which opening the shard reads) stay. The cache may hold a file in folios of up to 2 MiB,
    which leave whole: past the first 2 MiB nothing may stay."""
    import os
    from layerswap_fast.sweep_build import _drop_cached
    probe = tmp_path / "probe"
    probe.write_bytes(b"x" * (4 << 20))
    with open(probe, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if any(_resident_pages(probe)):
        pytest.skip("this filesystem keeps its pages whatever the advice (tmpfs)")
    data = bytes(range(256)) * (6 << 12)
    header = b'{"t":{"dtype":"U8","shape":[%d],"data_offsets":[0,%d]}}' % (len(data), len(data))
    header += b" " * (5000 - len(header))  # with its length, it ends on the second page
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    path.read_bytes()
    assert all(_resident_pages(path))
    _drop_cached(path)
    resident = _resident_pages(path)
    assert resident[:2] == [True, True] and not any(resident[512:]), resident.count(True)


# ------------------------------------------------------------------------------- evaluation

def _char_tokenizer(directory: Path) -> None:
    """A character-level tokenizer saved beside a model (the tiny Llamas have a 96-token vocabulary)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    vocab = {chr(32 + i): i for i in range(95)} | {"[UNK]": 95}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]")),
                                        unk_token="[UNK]")
    tokenizer.save_pretrained(directory)


@pytest.fixture(scope="module")
def talking(experts, tmp_path_factory):
    """The experts with a tokenizer, and a held-out text."""
    for name in ("math-1", "swh-1", "swh-2"):
        _char_tokenizer(experts[name])
    text = tmp_path_factory.mktemp("text") / "heldout.txt"
    text.write_text("def merge(a, b):\n    return a + b\n" * 40)
    return text


def test_perplexity_in_memory_equals_perplexity_of_the_written_candidates(experts, talking, tmp_path):
    spec = _spec(experts, tmp_path, task_experts=[str(experts["math-1"])], grid={"bottom": [3, 4]})
    written = lf.sweep(spec, tmp_path / "disk", evaluate=f"perplexity:{talking}")
    memory = lf.sweep(spec, tmp_path / "memory", evaluate=f"perplexity:{talking}", in_memory=True)
    assert [c.status for c in written] == ["built"] * 4 and [c.status for c in memory] == ["evaluated"] * 4
    for a, b in zip(written, memory):
        assert a.metrics == b.metrics and a.metrics["loss"] > 0, a.name
    assert len({c.metrics["loss"] for c in written}) == 4  # the candidates differ
    assert sorted(p.name for p in (tmp_path / "memory").iterdir()) == ["sweep.csv", "sweep.json"]
    # the built-in loss against a plain transformers computation over the same windows
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(written[0].path)
    ids = tokenizer(talking.read_text(), add_special_tokens=False)["input_ids"]
    rows = torch.tensor(ids[:len(ids) // 128 * 128]).view(-1, 128)[:32]
    model = AutoModelForCausalLM.from_pretrained(written[0].path, dtype=torch.float32)
    with torch.no_grad():
        losses = [float(model(input_ids=rows[i:i + 1], labels=rows[i:i + 1]).loss) for i in range(len(rows))]
    assert written[0].metrics["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_a_user_function_and_a_failing_one(experts, tmp_path, monkeypatch):
    (tmp_path / "myeval.py").write_text(
        "from pathlib import Path\n"
        "def size(path):\n    return {'files': len(list(Path(path).iterdir()))}\n"
        "def broken(path):\n    raise RuntimeError('no metric today')\n")
    monkeypatch.chdir(tmp_path)
    spec = _spec(experts, tmp_path, task_experts=[str(experts["math-1"])], language_experts=[str(experts["swh-1"])],
                 grid={"bottom": [3, 4]})
    result = run_cli("sweep", spec, "-o", tmp_path / "a", "--eval", "myeval:size")
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "a" / "sweep.json").read_text())["candidates"]
    assert all(r["metrics"]["files"] == len(list(Path(r["path"]).iterdir())) for r in rows)
    result = run_cli("sweep", spec, "-o", tmp_path / "b", "--eval", "myeval:broken")
    assert result.returncode == 2 and "evaluation: RuntimeError: no metric today" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = run_cli("sweep", spec, "-o", tmp_path / "c", "--eval", "myeval:missing")
    assert result.returncode == 2 and "myeval has no function 'missing'" in result.stderr
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------- Ray

@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance for these tests only: two CPUs, loopback, stopped afterwards."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()


def _without_timings(manifest: dict) -> list[dict]:
    return [{k: v for k, v in c.items() if k != "seconds"} for c in manifest["candidates"]]


def test_a_ray_run_gives_the_local_manifest(experts, tmp_path, local_ray):
    spec = _spec(experts, tmp_path, grid={"bottom": [3, 4, 9]})  # bottom 9 fails: reported, the others finish
    out = tmp_path / "sweep"
    lf.sweep(spec, out)
    local = json.loads((out / "sweep.json").read_text())
    out.rename(tmp_path / "local")
    found = lf.sweep(spec, out, ray="local")
    assert _without_timings(json.loads((out / "sweep.json").read_text())) == _without_timings(local)
    assert [c.status for c in found].count("failed") == 4 and sum(c.shared for c in found) > 0
    for c in found:
        if c.status == "built":
            lf.verify(c.path)
