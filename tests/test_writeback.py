"""The write-behind path of large outputs: hashed, written back and dropped as they go, with the
same bytes and checksums as the default path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import blake3
import pytest

import layerswap_fast as ls
import layerswap_fast.formats.writeback as writeback
from support import assert_same_shards, make_llama_trio


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_llama_trio(tmp_path_factory.mktemp("wb"), num_layers=12, shard="60KB")


def test_throttled_output_equals_the_default_output(trio: dict[str, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    ls.merge(trio["task"], trio["language"], tmp_path / "plain", link="copy")
    calls: list[tuple[int, int, bool, bool]] = []
    real = writeback.ShardFinisher.__init__

    def small_window(self, *args, **kwargs) -> None:  # a 4 kB dirty window: many write-backs
        real(self, *args, **{**kwargs, "max_dirty": 4096})
        inner = self.writer

        class Spy:
            path = inner.path

            def writeback(self, off: int, n: int, wait: bool, drop: bool) -> None:
                calls.append((off, n, wait, drop))
                inner.writeback(off, n, wait, drop)
        self.writer = Spy()

    monkeypatch.setattr(writeback, "needs_throttle", lambda n: True)
    monkeypatch.setattr("layerswap_fast.engine.execute.needs_throttle", lambda n: True)
    monkeypatch.setattr(writeback.ShardFinisher, "__init__", small_window)
    ls.merge(trio["task"], trio["language"], tmp_path / "throttled", link="copy")
    assert any(wait and drop for _, _, wait, drop in calls) and any(not wait for _, _, wait, _ in calls)
    assert_same_shards(tmp_path / "plain", tmp_path / "throttled")
    a = json.loads((tmp_path / "plain" / "layerswap_recipe.json").read_text())["shards"]
    b = json.loads((tmp_path / "throttled" / "layerswap_recipe.json").read_text())["shards"]
    assert a == b
    ls.verify(tmp_path / "throttled")


def test_small_outputs_are_left_to_the_kernel() -> None:
    assert not writeback.needs_throttle(1 << 20)
    assert writeback.needs_throttle(1 << 50)


def test_input_checksums_are_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "blob"
    f.write_bytes(b"abc" * 1000)
    first = writeback.cached_hash(f, "blake3")
    assert first == writeback.hash_file(f, "blake3") == blake3.blake3(b"abc" * 1000).hexdigest()
    assert list((Path(os.environ["XDG_CACHE_HOME"]) / "layerswap-fast" / "checksums").glob("blake3-*"))

    def no_hashing(*args: object, **kwargs: object) -> str:
        raise AssertionError("an unchanged input was hashed again")

    with monkeypatch.context() as m:
        m.setattr(writeback, "hash_file", no_hashing)
        assert writeback.cached_hash(f, "blake3") == first  # served from the cache
    f.write_bytes(b"abd" * 1001)  # a changed file (new size, mtime, contents) is hashed again
    assert writeback.cached_hash(f, "blake3") == writeback.hash_file(f, "blake3") != first
