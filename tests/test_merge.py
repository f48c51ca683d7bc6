"""End-to-end merges of real (tiny) Llama checkpoints, each tensor checked against plain torch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import blake3
import pytest
import torch
from safetensors import safe_open

import layerswap_fast as ls
from support import (assert_merged, assert_same_shards, expected_weights, layer_of, load_tensors,
                     make_llama_trio, snapshot)

L = 12


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
    assert recipe["checksum"] == "blake3"
    for entry in recipe["shards"]:  # every shard's checksum, for `verify`
        data = (out / entry["file"]).read_bytes()
        assert entry["size"] == len(data) and entry["blake3"] == blake3.blake3(data).hexdigest()
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


def test_page_phase_follows_the_most_copied_bytes() -> None:
    from layerswap_fast.layout import PlacedTensor, page_phase
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
        self.check(trio, tmp_path, ls.OutputError, "already exists; pass --force", out=tmp_path / "out")
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
    """Large tensors stream in pieces (engine._PIECE_BYTES); force 100-byte pieces so every path splits."""
    import layerswap_fast.engine as engine
    ls.merge(trio["task"], trio["language"], tmp_path / "whole", link="copy", dtype=dtype)
    monkeypatch.setattr(engine, "_PIECE_BYTES", 100)
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
    real_open = ls.api.open_checkpoint

    def open_then_replace(path):
        opened = real_open(path)
        if Path(path) == trio["task"]:
            os.replace(impostor, shard)
        return opened

    monkeypatch.setattr(ls.api, "open_checkpoint", open_then_replace)
    with pytest.raises(ls.CheckpointError, match=f"input changed during the merge: .*{shard.name}.* was replaced"):
        ls.merge(trio["task"], trio["language"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))
