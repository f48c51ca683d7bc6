"""End-to-end merges of real (tiny) Llama checkpoints, each tensor checked against plain torch."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import layerswap_fast as ls
import layerswap_fast._core
from support import (assert_merged, tensors_digest, assert_same_shards, expected_weights, layer_of, load_tensors,
                     make_llama_trio, snapshot)

L = 12


@pytest.fixture
def short_io() -> Iterator[None]:
    """The core's reads and writes come back short (see each test); the default afterwards."""
    try:
        yield
    finally:
        layerswap_fast._core._set_max_io_bytes(0)


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_llama_trio(tmp_path_factory.mktemp("trio"), num_layers=L)


def test_default_merge_equals_the_torch_reference(trio: dict[str, Path], tmp_path: Path) -> None:
    result = ls.merge(trio["task"], trio["language"], tmp_path / "out")
    assert_merged(tmp_path / "out", trio)
    assert result.stats is not None and result.stats.bytes_written > 0
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "config.json" in files and "generation_config.json" in files and "layerswap_recipe.json" in files
    assert (tmp_path / "out" / "config.json").read_bytes() == (trio["task"] / "config.json").read_bytes()
    assert not list(tmp_path.glob(".out*")), "no temporary directory may remain"


def test_output_is_sharded_indexed_and_carries_its_recipe(trio: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    ls.merge(trio["task"], trio["language"], out, shard_size="30KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    recipe = json.loads((out / "layerswap_recipe.json").read_text())
    reused = {r["shard"] for r in recipe["reused_shards"]}  # whole input files keep their own header
    total = 0
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as f:
            meta = f.metadata()
            names = list(f.keys())
            sizes = [f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in names]
        assert meta["format"] == "pt"
        if shard not in reused:
            assert json.loads(meta["layerswap_fast"])["config"]["bottom"] == 5
        assert sum(sizes) <= 30_000 or len(names) == 1 or shard in reused  # reused files keep their size
        assert all(index["weight_map"][n] == shard for n in names)
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    assert recipe["inputs"]["task"]["path"] == str(trio["task"].resolve())
    assert [entry["file"] for entry in recipe["shards"]] == shards
    assert recipe["checksum"] == "blake3-tensors"
    for entry in recipe["shards"]:  # every shard's checksum, for `verify`
        data = (out / entry["file"]).read_bytes()
        assert entry["size"] == len(data) and entry["blake3-tensors"] == tensors_digest(data)
    assert_merged(out, trio)


def _file_offsets(path: Path) -> tuple[bytes, dict[str, int]]:
    """The raw header and each tensor's absolute byte offset, read by hand from the format."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    return data[8:8 + n], {k: 8 + n + v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def test_copied_tensors_keep_their_place_within_a_page(tmp_path: Path) -> None:
    """The header is padded so a copied tensor starts at the same offset within a page as in its
    input (the kernel then copies whole pages); the padding is trailing spaces, as the format allows."""
    trio = make_llama_trio(tmp_path, num_layers=L, shard="10MB", hidden=64)  # one file per model
    ls.merge(trio["task"], trio["language"], tmp_path / "out")
    [shard] = (tmp_path / "out").glob("*.safetensors")
    header, out = _file_offsets(shard)
    assert header.rstrip(b" ").endswith(b"}") and len(header) - len(header.rstrip(b" ")) < 4096
    copied = 0
    for role in ("task", "language"):
        [source] = trio[role].glob("*.safetensors")
        _, src = _file_offsets(source)
        for name, offset in src.items():
            w_t, w_l = expected_weights(layer_of(name), L)
            if (w_t, w_l) == ((1.0, 0.0) if role == "task" else (0.0, 1.0)):
                assert out[name] % 4096 == offset % 4096, name
                copied += 1
    assert copied > 0


def test_large_copies_from_sources_at_other_block_offsets_start_a_new_shard() -> None:
    """A shard keeps its large copied tensors at one offset within a block relative to their
    sources (so that all of them can be cloned): one whose source sits elsewhere starts a new
    shard; small tensors, computed ones and the shard size rule are as before."""
    from layerswap_fast.formats.layout import group_into_shards
    from layerswap_fast.plan import TensorRecipe, Term

    def recipe(name: str, nbytes: int, op: str = "copy") -> TensorRecipe:
        return TensorRecipe(name, "BF16", (nbytes // 2,), None, op, (Term("task", 1.0),))

    big, small = 16 * 4096, 4096
    plan = [recipe("a", big), recipe("b", big), recipe("x", big, "blend"), recipe("c", big), recipe("s", small),
            recipe("d", big), recipe("e", big)]
    sources = {"a": 8, "b": 8 + big, "c": 8 + 3 * big, "s": 5000, "d": 16, "e": 16 + big}

    def names(groups: list[list[TensorRecipe]]) -> list[list[str]]:
        return [[r.name for r in g] for g in groups]

    # a, b, c keep their offsets within a block (the blend's bytes sit between b and c in the
    # source too); s is small; d's source is 8 bytes further on: a new shard
    assert names(group_into_shards(plan, 1 << 30, lambda r: sources.get(r.name))) == [
        ["a", "b", "x", "c", "s"], ["d", "e"]]
    assert names(group_into_shards(plan, 1 << 30)) == [["a", "b", "x", "c", "s", "d", "e"]]  # no sources given
    assert names(group_into_shards(plan, 2 * big, lambda r: sources.get(r.name))) == [
        ["a", "b"], ["x", "c"], ["s", "d"], ["e"]]  # the size rule first; d then sets the new shard's phase


def test_page_phase_follows_the_most_copied_bytes() -> None:
    from layerswap_fast.formats.layout import PlacedTensor, page_phase
    from layerswap_fast.plan import TensorRecipe, Term

    def placed(name: str, begin: int, nbytes: int) -> PlacedTensor:
        return PlacedTensor(TensorRecipe(name, "BF16", (nbytes // 2,), None, "copy", (Term("task", 1.0),)), begin, nbytes)

    tensors = [placed("a", 0, 4096), placed("b", 4096, 8192), placed("c", 12288, 64)]
    sources = {"a": 1000, "b": 4096 + 40, "c": None}
    assert page_phase(tensors, lambda r: sources[r.name]) == 40  # b's 8192 bytes outweigh a's 4096
    assert page_phase(tensors, lambda r: {"a": 1000, "b": 4096 + 43}.get(r.name)) == 1000  # 43: not 8-aligned
    assert page_phase(tensors, lambda r: None) is None
    assert page_phase(tensors, None) is None


def test_transformers_loads_the_merged_model(trio: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM
    out = tmp_path / "out"
    ls.merge(trio["task"], trio["language"], out, shard_size="50KB")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    logits = model(torch.tensor([[1, 5, 9, 3]])).logits
    assert logits.shape == (1, 4, 96) and torch.isfinite(logits).all()
    task = load_tensors(trio["task"])
    loaded = model.state_dict()["model.layers.7.mlp.up_proj.weight"]
    assert torch.equal(loaded, task["model.layers.7.mlp.up_proj.weight"].float())


def test_tied_embeddings(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM
    trio = make_llama_trio(tmp_path / "tied", num_layers=L, tie=True)
    assert "lm_head.weight" not in load_tensors(trio["task"])
    ls.merge(trio["task"], trio["language"], tmp_path / "out")
    assert_merged(tmp_path / "out", trio)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert model(torch.tensor([[1, 2]])).logits.shape == (1, 2, 96)


def test_custom_swap_with_ramp_and_one_sided_non_layer(trio: dict[str, Path], tmp_path: Path) -> None:
    cfg = ls.SwapConfig(bottom=2, top=1, lower_transition=3, upper_transition=2,
                        transition_weights="ramp", non_layer="language")
    ls.merge(trio["task"], trio["language"], tmp_path / "out", cfg, threads=2)
    assert_merged(tmp_path / "out", trio, bottom=2, top=1, lt=3, ut=2, ramp=True, non_layer="language")


def test_dtype_override_converts_every_tensor(trio: dict[str, Path], tmp_path: Path) -> None:
    ls.merge(trio["task"], trio["language"], tmp_path / "out", dtype="f32")
    assert_merged(tmp_path / "out", trio, dtype=torch.float32)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float32"


def test_mixed_dtype_experts_give_the_task_experts_dtype(tmp_path: Path) -> None:
    bf16 = make_llama_trio(tmp_path / "a", num_layers=L, dtype=torch.bfloat16)
    f16 = make_llama_trio(tmp_path / "b", num_layers=L, dtype=torch.float16, seed=1)
    trio = {"task": bf16["task"], "language": f16["language"]}
    ls.merge(trio["task"], trio["language"], tmp_path / "out")
    assert_merged(tmp_path / "out", trio)


def test_thread_count_does_not_change_a_byte(trio: dict[str, Path], tmp_path: Path) -> None:
    for threads in (1, 2, 3):
        ls.merge(trio["task"], trio["language"], tmp_path / f"t{threads}", threads=threads)
    assert_same_shards(tmp_path / "t1", tmp_path / "t2", tmp_path / "t3")


def test_the_api_call_from_the_issue(trio: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    os.symlink(trio["task"], "math")
    os.symlink(trio["language"], "swh")
    ls.merge(task_expert="math", language_expert="swh", out="m2", config=ls.SwapConfig(bottom=4, top=1))
    assert_merged(tmp_path / "m2", trio, bottom=4, top=1)


def test_dry_run_writes_nothing(trio: dict[str, Path], tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    result = ls.merge(trio["task"], trio["language"], tmp_path / "out", dry_run=True)
    assert result.stats is None and result.shards
    assert snapshot(tmp_path) == before


class TestErrorsWriteNothing:
    def check(self, trio: dict[str, Path], root: Path, error: type, message: str, **kwargs) -> None:
        before_root, before_inputs = snapshot(root), snapshot(trio["task"].parent)
        with pytest.raises(error, match=message):
            ls.merge(trio["task"], trio["language"], **kwargs)
        assert snapshot(root) == before_root
        assert snapshot(trio["task"].parent) == before_inputs

    def test_existing_output_needs_force(self, trio: dict[str, Path], tmp_path: Path) -> None:
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
        self.check(trio, tmp_path, ls.OutputError, "already exists; pass force", out=tmp_path / "out")
        ls.merge(trio["task"], trio["language"], tmp_path / "out", force=True)
        assert not (tmp_path / "out" / "keep.txt").exists()
        assert_merged(tmp_path / "out", trio)

    def test_output_inside_an_input_is_refused(self, trio: dict[str, Path], tmp_path: Path) -> None:
        self.check(trio, tmp_path, ls.OutputError, "is inside the input", out=trio["task"] / "merged")

    def test_input_inside_the_output_is_refused(self, trio: dict[str, Path], tmp_path: Path) -> None:
        self.check(trio, tmp_path, ls.OutputError, "is inside the output", out=trio["task"].parent, force=True)

    def test_impossible_plan(self, trio: dict[str, Path], tmp_path: Path) -> None:
        self.check(trio, tmp_path, ls.ConfigError, "needs 13 layers", out=tmp_path / "out",
                   config=ls.SwapConfig(bottom=10, top=1))

    def test_mismatched_experts(self, trio: dict[str, Path], tmp_path: Path) -> None:
        other = make_llama_trio(tmp_path / "other", num_layers=L, hidden=48)
        before = snapshot(tmp_path)
        # transformers saves lm_head first: the first offending tensor in the task expert's order
        with pytest.raises(ls.MismatchError, match="'lm_head.weight' has shape \\[96, 32\\] in the task "
                                                   "expert but \\[96, 48\\] in the language expert"):
            ls.merge(trio["task"], other["language"], tmp_path / "out")
        assert snapshot(tmp_path) == before

    def test_layer_count_mismatch(self, trio: dict[str, Path], tmp_path: Path) -> None:
        other = make_llama_trio(tmp_path / "other", num_layers=L + 1)
        with pytest.raises(ls.MismatchError, match="task expert has 12 layers but the language expert has 13"):
            ls.merge(trio["task"], other["language"], tmp_path / "out")
        assert not (tmp_path / "out").exists()

    def test_bad_shard_size_and_dtype(self, trio: dict[str, Path], tmp_path: Path) -> None:
        self.check(trio, tmp_path, ls.ConfigError, "cannot read size 'big'", out=tmp_path / "o", shard_size="big")
        self.check(trio, tmp_path, ls.UnsupportedDtypeError, "unsupported output dtype 'int8'",
                   out=tmp_path / "o", dtype="int8")


@pytest.mark.parametrize("dtype", [None, "f32"])  # the experts' own dtype copies tensors; f32 blends all
def test_blends_and_copies_in_small_pieces_give_the_same_bytes(trio: dict[str, Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                dtype: str | None) -> None:
    """Large tensors stream in pieces (engine.ops.PIECE_BYTES); force 100-byte pieces so every path splits."""
    import layerswap_fast.engine.execute as engine
    import layerswap_fast.engine.ops as ops
    ls.merge(trio["task"], trio["language"], tmp_path / "whole", link="copy", dtype=dtype)
    monkeypatch.setattr(ops, "PIECE_BYTES", 100)
    copy_runs: list[int] = []
    real_flush = engine._ShardFiller._flush_copy

    def spy(self, writer, src, run):
        if run is not None:
            copy_runs.append(run[2])
        return real_flush(self, writer, src, run)

    monkeypatch.setattr(engine._ShardFiller, "_flush_copy", spy)
    ls.merge(trio["task"], trio["language"], tmp_path / "pieces", link="copy", dtype=dtype)
    if dtype is None:
        assert copy_runs and max(copy_runs) > 100  # byte copies went in pieces too
    assert_same_shards(tmp_path / "whole", tmp_path / "pieces")
    assert_merged(tmp_path / "pieces", trio, dtype=torch.float32 if dtype else None)


def test_a_shard_replaced_after_its_header_was_read_is_caught(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The header and the data come from one open file: a same-size file renamed into a shard's
    place right after the checkpoint was opened must not feed the merge (the header would describe
    bytes it never saw)."""
    trio = make_llama_trio(tmp_path / "in", num_layers=L)
    shard = sorted(trio["task"].glob("*.safetensors"))[0]
    impostor = tmp_path / "impostor"
    impostor.write_bytes(shard.read_bytes()[::-1])
    import layerswap_fast.writing as writing  # where a merge opens its inputs
    real_open = writing.open_checkpoint

    def open_then_replace(path):
        opened = real_open(path)
        if Path(path) == trio["task"]:
            os.replace(impostor, shard)
        return opened

    monkeypatch.setattr(writing, "open_checkpoint", open_then_replace)
    with pytest.raises(ls.CheckpointError, match=f"input changed during the merge: .*{shard.name}.* was replaced"):
        ls.merge(trio["task"], trio["language"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


# ------------------------------------------------------------------------ layout of new shards

def _tensor_sizes(path: Path) -> list[list[int]]:
    """Per shard (in file order), the byte sizes of its tensors."""
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    sizes: dict[str, list[int]] = {}
    for name, shard in index.items():
        with safe_open(str(path / shard), framework="pt") as f:
            t = f.get_tensor(name)
        sizes.setdefault(shard, []).append(t.numel() * t.element_size())
    return [sizes[s] for s in sorted(sizes)]


def test_shards_are_packed_greedily_up_to_the_exact_limit(tmp_path: Path) -> None:
    """Equal tensors and a limit of exactly three of them: every shard holds three (a tensor that
    exactly fills a shard still belongs in it), the last the remainder."""
    names = [f"model.layers.0.w{i}.weight" for i in range(8)]
    for role, value in (("a", 1.0), ("b", 3.0)):
        (tmp_path / role).mkdir()
        save_file({n: torch.full((250,), value) for n in names}, str(tmp_path / role / "model.safetensors"))
    ls.soup([tmp_path / "a", tmp_path / "b"], tmp_path / "out", shard_size=3000)
    assert _tensor_sizes(tmp_path / "out") == [[1000] * 3, [1000] * 3, [1000] * 2]
    ls.soup([tmp_path / "a", tmp_path / "b"], tmp_path / "out2", shard_size=2999)
    assert _tensor_sizes(tmp_path / "out2") == [[1000] * 2] * 4


def _data_starts(path: Path) -> dict[str, int]:
    """Where each new shard's data buffer starts (8 + header length), reused input files left out."""
    reused = {r["shard"] for r in json.loads((path / "layerswap_recipe.json").read_text())["reused_shards"]}
    return {p.name: 8 + int.from_bytes(p.read_bytes()[:8], "little")
            for p in sorted(path.glob("*.safetensors")) if p.name not in reused}


@pytest.mark.parametrize("command", ["merge", "merge f32", "soup", "ties", "revert rows"])
def test_every_new_shard_keeps_its_data_8_byte_aligned(trio: dict[str, Path], tmp_path: Path, command: str) -> None:
    """Shards with copied tensors start their data at the copies' page phase, shards of computed
    tensors alone at the next multiple of 8: either way aligned for any dtype, as safetensors asks."""
    out = tmp_path / "out"
    run = {"merge": lambda: ls.merge(trio["task"], trio["language"], out, shard_size="30KB", link="copy"),
           "merge f32": lambda: ls.merge(trio["task"], trio["language"], out, shard_size="30KB", dtype="f32"),
           "soup": lambda: ls.soup([trio["task"], trio["language"]], out, shard_size="30KB"),
           "ties": lambda: ls.ties(trio["base"], [trio["task"], trio["language"]], out, shard_size="30KB"),
           "revert rows": lambda: ls.revert(trio["base"], trio["task"], out, row_fraction=0.5, shard_size="30KB")}
    run[command]()
    starts = _data_starts(out)
    assert len(starts) > 1 and all(s % 8 == 0 for s in starts.values()), starts
    ls.verify(out)


def test_merges_with_short_reads_and_writes_give_the_same_bytes(trio: dict[str, Path], tmp_path: Path,
                                                                 short_io: None) -> None:
    """Every read, write and kernel-side copy comes back after at most 1000 bytes (a core hook), so
    every retry loop runs: the output must not change."""
    ls.merge(trio["task"], trio["language"], tmp_path / "whole", link="copy")
    ls.ties(trio["base"], [trio["task"], trio["language"]], tmp_path / "ties-whole")
    layerswap_fast._core._set_max_io_bytes(1000)
    ls.merge(trio["task"], trio["language"], tmp_path / "short", link="copy")
    ls.ties(trio["base"], [trio["task"], trio["language"]], tmp_path / "ties-short")
    layerswap_fast._core._set_copy_file_range_enabled(False)
    try:
        ls.merge(trio["task"], trio["language"], tmp_path / "short-fallback", link="copy")
    finally:
        layerswap_fast._core._set_copy_file_range_enabled(True)
    assert_same_shards(tmp_path / "whole", tmp_path / "short", tmp_path / "short-fallback")
    assert_same_shards(tmp_path / "ties-whole", tmp_path / "ties-short")
    assert_merged(tmp_path / "short", trio)


def test_copies_from_odd_input_offsets_never_unalign_the_data(tmp_path: Path) -> None:
    """The language expert stores its tensors in another order, so its big copied tensor sits 2
    bytes off the 8-byte grid of the output: the data buffer must still start 8-aligned (the page
    phase is chosen among aligned ones only), and every tensor must still be right."""
    a, b, c = (f"model.layers.{n}" for n in ("0.a.weight", "0.b.weight", "1.c.weight"))
    gen = torch.Generator().manual_seed(11)
    tensors = {role: {a: torch.randn(3, generator=gen).to(torch.bfloat16),
                      b: torch.randn(1000, generator=gen).to(torch.bfloat16),
                      c: torch.randn(5, generator=gen).to(torch.bfloat16)} for role in ("task", "language")}
    for role in tensors:
        (tmp_path / role).mkdir()
        (tmp_path / role / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    save_file(tensors["task"], str(tmp_path / "task" / "model.safetensors"))  # by name: a, b, c
    order, header, data = [b, a, c], {}, b""
    for name in order:
        header[name] = {"dtype": "BF16", "shape": list(tensors["language"][name].shape),
                        "data_offsets": [len(data), len(data) + tensors["language"][name].numel() * 2]}
        data += tensors["language"][name].view(torch.int16).numpy().tobytes()
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (tmp_path / "language" / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    config = ls.SwapConfig(bottom=1, top=0, lower_transition=0, upper_transition=0)
    ls.merge(tmp_path / "task", tmp_path / "language", tmp_path / "out", config, link="copy")
    assert all(s % 8 == 0 for s in _data_starts(tmp_path / "out").values())
    out = load_tensors(tmp_path / "out")
    want = {a: tensors["language"][a], b: tensors["language"][b], c: tensors["task"][c]}
    assert {n: t.view(torch.int16).tolist() for n, t in out.items()} == \
        {n: t.view(torch.int16).tolist() for n, t in want.items()}
    ls.verify(tmp_path / "out")
