"""Hostile checkpoints, one case each: a clear `error:` line, exit 2, nothing written, input untouched.

Each case is a language expert that is damaged in one way; the task expert is a good checkpoint.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from layerswap_fast.cli import main
from support import snapshot, write_safetensors_raw

GOOD = {"model.layers.0.w.weight": torch.ones(2, 2), "model.norm.weight": torch.ones(2)}


def header_file(d: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> None:
    """``write_safetensors_raw`` into ``d / "model.safetensors"``."""
    write_safetensors_raw(d / "model.safetensors", header, data, length)


def entry(dtype: str = "F32", shape: list = [2], offsets: list = [0, 8]) -> dict:  # noqa: B006
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def sharded(d: Path, weight_map: dict[str, str]) -> None:
    save_file({"model.layers.0.w.weight": torch.ones(2, 2)}, str(d / "a.safetensors"))
    save_file({"model.norm.weight": torch.ones(2)}, str(d / "b.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


CASES = {
    "random header bytes": (lambda d: header_file(d, random.Random(7).randbytes(64)), "header is not valid"),
    "header length 0": (lambda d: header_file(d, b"", b"{}", length=0), "header length"),
    "header length past the file": (lambda d: header_file(d, b"{}", length=4096), "header length"),
    "header length above 100 MB": (lambda d: header_file(d, b"{}", length=100_000_001), "header length"),
    "header length 2**64-1": (lambda d: header_file(d, b"{}", length=2**64 - 1), "header length"),
    "non-UTF-8 header": (lambda d: header_file(d, b'{"\xc3\x28": 1}'), "not valid UTF-8"),
    "invalid JSON": (lambda d: header_file(d, b'{"a": [1, 2'), "not valid JSON"),
    "deeply nested JSON": (lambda d: header_file(d, b"[" * 100_000 + b"]" * 100_000), "nested deeper than 64 levels"),
    "offsets overflowing": (lambda d: header_file(d, {"x": entry(offsets=[2**64, 2**64 + 8])}, b"\0" * 8),
                            "offset 18446744073709551616 leaves a gap"),
    "negative offsets": (lambda d: header_file(d, {"x": entry(offsets=[-8, 0])}, b"\0" * 8), "invalid data_offsets"),
    "overlapping tensors": (lambda d: header_file(d, {"x": entry(), "y": entry(offsets=[4, 12])}, b"\0" * 12), "overlaps"),
    "a gap between tensors": (lambda d: header_file(d, {"x": entry(), "y": entry(offsets=[12, 20])}, b"\0" * 20),
                              "leaves a gap"),
    "offsets past the end": (lambda d: header_file(d, {"x": entry(offsets=[0, 8])}, b"\0" * 4), "truncated data"),
    "size not shape × dtype": (lambda d: header_file(d, {"x": entry(shape=[3])}, b"\0" * 8), "needs 12"),
    "huge shape": (lambda d: header_file(d, {"x": entry(shape=[2**40, 2**40])}, b"\0" * 8), "needs"),
    "unknown dtype": (lambda d: header_file(d, {"x": entry(dtype="F128")}, b"\0" * 8), "unknown dtype 'F128'"),
    "duplicate names": (lambda d: header_file(d, b'{"x": ' + json.dumps(entry()).encode() + b', "x": '
                                              + json.dumps(entry()).encode() + b"}", b"\0" * 8), "duplicate key 'x'"),
    "trailing bytes": (lambda d: header_file(d, {"x": entry()}, b"\0" * 9), "trailing bytes"),
    "index names a missing shard": (lambda d: sharded(d, {"model.layers.0.w.weight": "a.safetensors",
                                                          "model.norm.weight": "gone.safetensors"}), "does not exist"),
    "index puts a tensor in a shard that lacks it": (
        lambda d: sharded(d, {"model.layers.0.w.weight": "a.safetensors", "model.norm.weight": "a.safetensors"}),
        "'model.norm.weight' is not in its shard a.safetensors"),
    "index path ../x": (lambda d: sharded(d, {"model.layers.0.w.weight": "a.safetensors",
                                              "model.norm.weight": "../b.safetensors"}), "outside the checkpoint"),
    "index absolute path": (lambda d: sharded(d, {"model.layers.0.w.weight": "a.safetensors",
                                                  "model.norm.weight": str(d / "b.safetensors")}), "outside the checkpoint"),
    "pickle checkpoint": (lambda d: (d / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n."),
                          "never unpickled; convert it to safetensors"),
}


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("task")
    save_file(GOOD, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_language_expert(case: str, task: Path, tmp_path: Path) -> None:
    make, message = CASES[case]
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    make(hostile)
    before = snapshot(tmp_path)
    r = CliRunner().invoke(main, ["merge", "--task-expert", str(task), "--language-expert", str(hostile),
                                  "-o", str(tmp_path / "out"), "--bottom", "0", "--top", "0",
                                  "--lower-transition", "0", "--upper-transition", "0"])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and r.output.count("\n") == 1, r.output
    assert message in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert snapshot(tmp_path) == before  # nothing written, the input untouched


def test_symlinked_shard_still_works(task: Path, tmp_path: Path) -> None:
    blobs, snap = tmp_path / "blobs", tmp_path / "snap"
    blobs.mkdir()
    snap.mkdir()
    save_file(GOOD, str(blobs / "0123abcd"), metadata={"format": "pt"})
    os.symlink("../blobs/0123abcd", snap / "model.safetensors")
    r = CliRunner().invoke(main, ["merge", "--task-expert", str(task), "--language-expert", str(snap), "-o",
                                  str(tmp_path / "out"), "--bottom", "1", "--top", "0",
                                  "--lower-transition", "0", "--upper-transition", "0"])
    assert r.exit_code == 0, r.output
