"""`verify` accepts what a merge wrote, in every link mode, and names what was changed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import layerswap_fast as ls
from layerswap_fast.cli import main
from support import make_llama_trio


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_llama_trio(tmp_path_factory.mktemp("verify"), num_layers=12, shard="20KB")


@pytest.mark.parametrize("link", ["auto", "hard", "symlink", "copy"])
def test_verify_accepts_every_link_mode(trio: dict[str, Path], tmp_path: Path, link: str) -> None:
    ls.merge(trio["task"], trio["language"], tmp_path / "out", link=link)
    report = ls.verify(tmp_path / "out")
    assert report.shards == len(json.loads((tmp_path / "out" / "layerswap_recipe.json").read_text())["shards"])
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "out")])
    assert r.exit_code == 0 and r.output.startswith(f"ok: {tmp_path / 'out'}: ")


@pytest.fixture
def merged(trio: dict[str, Path], tmp_path: Path) -> Path:
    ls.merge(trio["task"], trio["language"], tmp_path / "out", link="copy")
    return tmp_path / "out"


def test_a_flipped_byte_is_caught(merged: Path) -> None:
    shard = sorted(merged.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ls.VerifyError, match=f"{shard.name}: blake3-tensors checksum differs from the recipe's"):
        ls.verify(merged)
    r = CliRunner().invoke(main, ["verify", str(merged)])
    assert r.exit_code == 2 and r.output.startswith("error: ") and "checksum differs" in r.output


def test_sha256_on_request(trio: dict[str, Path], tmp_path: Path) -> None:
    ls.merge(trio["task"], trio["language"], tmp_path / "out", checksum="sha256", link="copy")
    recipe = json.loads((tmp_path / "out" / "layerswap_recipe.json").read_text())
    assert recipe["checksum"] == "sha256"
    for entry in recipe["shards"]:
        assert entry["sha256"] == hashlib.sha256((tmp_path / "out" / entry["file"]).read_bytes()).hexdigest()
    ls.verify(tmp_path / "out")
    shard = tmp_path / "out" / recipe["shards"][-1]["file"]
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x01")
    with pytest.raises(ls.VerifyError, match="sha256 checksum differs"):
        ls.verify(tmp_path / "out")


def test_a_truncated_shard_is_caught(merged: Path) -> None:
    shard = sorted(merged.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(ls.VerifyError, match="truncated data"):
        ls.verify(merged)


def test_missing_pieces(merged: Path, tmp_path: Path) -> None:
    sorted(merged.glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(ls.VerifyError, match="named in the index does not exist"):
        ls.verify(merged)
    (merged / "layerswap_recipe.json").unlink()
    with pytest.raises(ls.VerifyError, match="no layerswap_recipe.json; not a complete layerswap-fast output"):
        ls.verify(merged)
    with pytest.raises(ls.VerifyError, match="is not a directory"):
        ls.verify(tmp_path / "nothing")


def test_checksum_none_records_sizes_and_verify_says_so(tmp_path: Path) -> None:
    """``--checksum none``: the same bytes, a recipe with sizes and no digests; verify checks the
    structure and sizes, says no checksum was recorded, catches a size change and, by design, not
    a changed byte."""
    from layerswap_fast import synthetic

    trio = synthetic.make_trio(tmp_path / "trio", "tiny")
    hashed = ls.merge(trio["task"], trio["language"], tmp_path / "hashed")
    bare = ls.merge(trio["task"], trio["language"], tmp_path / "bare", checksum="none")
    assert hashed.stats is not None and bare.stats is not None
    recipe = json.loads((tmp_path / "bare" / "layerswap_recipe.json").read_text())
    assert recipe["checksum"] == "none"
    assert all(set(e) == {"file", "size"} for e in recipe["shards"] + recipe["files"])
    for shard in sorted((tmp_path / "hashed").glob("*.safetensors")):
        assert (tmp_path / "bare" / shard.name).read_bytes() == shard.read_bytes()
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "bare")])
    assert result.exit_code == 0 and "no checksum was recorded" in result.output
    shard = sorted((tmp_path / "bare").glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    ls.verify(tmp_path / "bare")  # a changed byte of the same size: nothing recorded can tell
    shard.write_bytes(bytes(data) + b"\0")
    with pytest.raises(ls.VerifyError, match="bytes"):
        ls.verify(tmp_path / "bare")
