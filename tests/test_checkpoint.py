"""Checkpoint reading: the three layouts, specs that match the safetensors library, strict headers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from layerswap_fast import CheckpointError, open_checkpoint
from layerswap_fast.formats.checkpoint import parse_header
from support import load_tensors, raw_bytes, write_safetensors_raw


def two_tensors(tmp_path: Path) -> dict[str, torch.Tensor]:
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
               "b": torch.arange(5, dtype=torch.bfloat16), "c": torch.zeros(0, 4, dtype=torch.float16)}
    return tensors


def test_single_file_specs_point_at_the_bytes(tmp_path: Path) -> None:
    tensors = two_tensors(tmp_path)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    for path in (tmp_path, tmp_path / "model.safetensors"):
        with open_checkpoint(path) as ckpt:
            assert set(ckpt.specs) == {"a", "b", "c"}
            assert ckpt.specs["a"].dtype == "F32" and ckpt.specs["a"].shape == (2, 3)
            assert ckpt.specs["b"].dtype == "BF16" and ckpt.specs["c"].nbytes == 0
            for name, t in tensors.items():
                assert ckpt.read(name) == raw_bytes(t)
            assert b"".join(ckpt.iter_chunks("a", 5)) == raw_bytes(tensors["a"])
            assert ckpt.read("a", 4, 8) == raw_bytes(tensors["a"])[4:12]


def test_sharded_checkpoint_from_transformers(tmp_path: Path) -> None:
    from support import make_llama_trio
    trio = make_llama_trio(tmp_path, num_layers=2, shard="20KB")
    reference = load_tensors(trio["task"])
    with open_checkpoint(trio["task"]) as ckpt:
        assert len(ckpt.shards) > 1
        assert set(ckpt.specs) == set(reference)
        for name, t in reference.items():
            assert ckpt.read(name) == raw_bytes(t), name
        assert ckpt.config["num_hidden_layers"] == 2
        assert len(ckpt.fingerprint()) == 64


GOOD = {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


@pytest.mark.parametrize("header, data, message", [
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, "trailing bytes"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated data"),
    ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "spans 8 bytes but shape [3] of F32 needs 12"),
    ({"x": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype 'Q4'"),
    ({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "invalid shape"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "invalid data_offsets"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "'y' at offset 4 overlaps"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "'x' at offset 4 leaves a gap"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "extra": 1}}, b"\0" * 8, "must have exactly"),
    ({"__metadata__": {"format": 1}, **GOOD}, b"\0" * 8, "__metadata__ must map strings to strings"),
    (b'{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "x": {"dtype": "F32", "shape": [2], '
     b'"data_offsets": [0, 8]}}', b"\0" * 8, "duplicate key 'x'"),
    (b"[1, 2]", b"", "not a JSON object"),
    (b"{not json", b"", "not valid JSON"),
    (b'{"\xff": 1}', b"", "not valid UTF-8"),
])
def test_malformed_headers_are_rejected(tmp_path: Path, header: dict | bytes, data: bytes, message: str) -> None:
    path = write_safetensors_raw(tmp_path / "model.safetensors", header, data)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
        open_checkpoint(tmp_path)
    assert path.read_bytes() == before


def test_parse_header_accepts_zero_sized_tensors_sharing_an_offset() -> None:
    header = {"e": {"dtype": "F16", "shape": [0], "data_offsets": [0, 0]},
              "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    raw = json.dumps(header).encode()
    _, specs = parse_header(raw, 8 + len(raw) + 4, Path("m.safetensors"))
    assert [s.name for s in specs] == ["e", "x"]
    assert specs[1].offset == 8 + len(raw)


def _sharded(tmp_path: Path, weight_map: dict[str, str]) -> Path:
    save_file({"a": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    save_file({"b": torch.ones(3)}, str(tmp_path / "s2.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tmp_path


@pytest.mark.parametrize("weight_map, message", [
    ({"a": "s1.safetensors", "b": "missing.safetensors"}, "missing.safetensors named in the index does not exist"),
    ({"a": "s1.safetensors", "b": "s1.safetensors"}, "tensor 'b' is not in its shard s1.safetensors"),
    ({"a": "s1.safetensors", "b": "../s2.safetensors"}, "outside the checkpoint directory"),
    ({"a": "s1.safetensors", "b": "/etc/passwd"}, "outside the checkpoint directory"),
])
def test_index_errors(tmp_path: Path, weight_map: dict[str, str], message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(_sharded(tmp_path, weight_map))


def test_index_must_list_every_tensor_of_its_shards(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2), "c": torch.ones(1)}, str(tmp_path / "s1.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors"}}))
    with pytest.raises(CheckpointError, match="shard s1.safetensors holds 'c', which the index does not list"):
        open_checkpoint(tmp_path)


def test_a_tensor_in_two_shards_is_refused_whatever_the_index_says(tmp_path: Path) -> None:
    # shard a holds x and y, shard b holds x too; the index maps x to b and y to a, so every
    # index entry is present in its shard, and only the duplicate itself can be the error
    save_file({"x": torch.ones(2), "y": torch.zeros(3)}, str(tmp_path / "a.safetensors"))
    save_file({"x": torch.full((2,), 7.0)}, str(tmp_path / "b.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"y": "a.safetensors", "x": "b.safetensors"}}))
    with pytest.raises(CheckpointError, match="tensor 'x' appears in both a.safetensors and b.safetensors"):
        open_checkpoint(tmp_path)


def test_symlinked_shards_work_like_the_hf_cache(tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    save_file({"a": torch.ones(2)}, str(blobs / "abc123"))
    snap = tmp_path / "snapshot"
    snap.mkdir()
    (snap / "model.safetensors").symlink_to("../blobs/abc123")
    with open_checkpoint(snap) as ckpt:
        assert ckpt.read("a") == raw_bytes(torch.ones(2))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.bin"])
def test_pickle_checkpoints_are_refused_with_a_pointer(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="never unpickled; convert it to safetensors"):
        open_checkpoint(tmp_path)


def test_missing_and_empty_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no safetensors weights found"):
        open_checkpoint(tmp_path)


def test_header_length_beyond_the_file(tmp_path: Path) -> None:
    write_safetensors_raw(tmp_path / "model.safetensors", b"{}", length=1000)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        open_checkpoint(tmp_path)
    # 8 bytes past the end: the length field itself is part of the file, not of the header
    write_safetensors_raw(tmp_path / "model.safetensors", b"{}   ", length=13)
    with pytest.raises(CheckpointError, match="header length 13 runs past the end of the file \\(13 bytes\\)"):
        open_checkpoint(tmp_path)
