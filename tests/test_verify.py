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
    with pytest.raises(ls.VerifyError, match=f"{shard.name}: blake3 checksum differs from the recipe's"):
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
