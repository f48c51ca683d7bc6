"""The default checksum, ``blake3-tensors``: its definition against a by-hand reference, the
digests a merge takes from its cache instead of reading, and the whole-file choice."""

from __future__ import annotations

import json
import os
from pathlib import Path

import blake3
import pytest

import layerswap_fast as ls
from layerswap_fast.formats import digest, writeback
from layerswap_fast.formats.checkpoint import RECIPE_NAME
from layerswap_fast.synthetic import make_trio

from support import tensors_digest, write_safetensors_raw


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trio")
    make_trio(root, "tiny", shard_size="200KB")
    return {"task": root / "task", "language": root / "language"}


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home


def test_the_digest_of_a_safetensors_file_is_its_header_and_tensors(trio: dict[str, Path]) -> None:
    shard = sorted(trio["task"].glob("*.safetensors"))[0]
    data = shard.read_bytes()
    assert digest.file_digest(shard) == tensors_digest(data)
    assert tensors_digest(data) != blake3.blake3(data).hexdigest()


def test_any_other_file_is_one_piece(tmp_path: Path) -> None:
    text = tmp_path / "config.json"
    text.write_text('{"a": 1}')
    gap = write_safetensors_raw(tmp_path / "gap.safetensors",
                                {"x": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, b"abcd")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    for path in (text, gap, empty):
        assert digest.file_digest(path) == tensors_digest(path.read_bytes())
    assert digest.file_digest(gap) != digest.file_digest(text)


def test_a_merge_records_it_and_a_second_merge_reads_no_copied_tensor(
        trio: dict[str, Path], tmp_path: Path, cache_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hashed: list[tuple[str, int, int]] = []  # ranges of the inputs read to hash them
    real = writeback.hash_range
    inputs = {str(p.resolve()) for p in trio.values()}

    def counting(fd: int, start: int, end: int, *args: object) -> bytes:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if str(Path(path).parent) in inputs:
            hashed.append((path, start, end))
        return real(fd, start, end, *args)

    monkeypatch.setattr(writeback, "hash_range", counting)  # tensors the merge copies
    monkeypatch.setattr(digest, "hash_range", counting)  # input shards it reuses whole
    first = tmp_path / "first"
    ls.merge(trio["task"], trio["language"], first, link="copy")
    assert hashed, "the first merge hashes the copied tensors from the inputs"
    hashed.clear()
    second = tmp_path / "second"
    ls.merge(trio["task"], trio["language"], second, link="copy")
    assert hashed == []  # every copied tensor's digest came from the cache
    for out in (first, second):
        recipe = json.loads((out / RECIPE_NAME).read_text())
        assert recipe["checksum"] == "blake3-tensors"
        for entry in recipe["shards"] + recipe["files"]:
            assert entry["blake3-tensors"] == tensors_digest((out / entry["file"]).read_bytes())
        ls.verify(out)


def test_a_changed_input_is_hashed_again(trio: dict[str, Path], tmp_path: Path, cache_home: Path) -> None:
    shard = sorted(trio["task"].glob("*.safetensors"))[0]
    copy = tmp_path / shard.name
    copy.write_bytes(shard.read_bytes())
    cache = writeback.digest_cache()
    assert writeback.cached_hash(copy, "blake3-tensors", cache=cache) == tensors_digest(copy.read_bytes())
    cache.save()
    data = bytearray(copy.read_bytes())
    data[-1] ^= 1  # same size; a new mtime makes a new key
    copy.write_bytes(bytes(data))
    os.utime(copy, ns=(os.stat(copy).st_atime_ns, os.stat(copy).st_mtime_ns + 1_000_000))
    fresh = writeback.digest_cache()
    assert writeback.cached_hash(copy, "blake3-tensors", cache=fresh) == tensors_digest(bytes(data))


def test_whole_file_blake3_stays_a_choice(trio: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    ls.merge(trio["task"], trio["language"], out, checksum="blake3")
    recipe = json.loads((out / RECIPE_NAME).read_text())
    assert recipe["checksum"] == "blake3"
    for entry in recipe["shards"]:
        assert entry["blake3"] == blake3.blake3((out / entry["file"]).read_bytes()).hexdigest()
    ls.verify(out)


def test_the_cache_stays_bounded(tmp_path: Path) -> None:
    """Beyond its limit the cache drops its oldest entries, down to half the limit."""
    for i in range(10):
        entry = tmp_path / f"blake3-{i}"
        entry.write_text("0" * 64)
        os.utime(entry, ns=(i * 10**9, i * 10**9))
    digest.prune(tmp_path, keep=10)
    assert len(list(tmp_path.iterdir())) == 10  # at the limit: nothing goes
    (tmp_path / "blake3-new").write_text("0" * 64)
    digest.prune(tmp_path, keep=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blake3-6", "blake3-7", "blake3-8", "blake3-9", "blake3-new"]
