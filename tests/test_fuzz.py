"""Fuzzing the parsers and the core's range checks with hypothesis.

In CI each property runs a bounded number of examples (about half a minute in all). For a long run:
``LAYERSWAP_FUZZ_EXAMPLES=200000 .venv/bin/python -m pytest tests/test_fuzz.py`` (scripts/fuzz.sh).
Every outcome must be a result or a typed error: never another exception, never a crash.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerswap_fast import CheckpointError, _core
from layerswap_fast.checkpoint import _read_index, parse_header, read_shard_header

EXAMPLES = int(os.environ.get("LAYERSWAP_FUZZ_EXAMPLES", "300"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

ints = st.one_of(st.integers(-5, 64), st.integers(-(2**70), 2**70), st.sampled_from([2**63 - 1, 2**64 - 1, 2**64]))
dtypes = st.one_of(st.sampled_from(["F32", "BF16", "F16", "I64", "BOOL", "F8_E4M3"]), st.text(max_size=4))
entries = st.fixed_dictionaries({"dtype": dtypes, "shape": st.lists(ints, max_size=3),
                                 "data_offsets": st.lists(ints, min_size=0, max_size=3)})
json_values = st.recursive(st.none() | st.booleans() | ints | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=10)
headers = st.dictionaries(st.text(max_size=8), st.one_of(entries, json_values), max_size=5)


@fuzz
@given(raw=st.binary(max_size=200), size=st.integers(0, 10**6))
def test_header_bytes(raw: bytes, size: int) -> None:
    try:
        parse_header(raw, size, Path("f.safetensors"))
    except CheckpointError:
        pass


@fuzz
@given(header=headers, extra=st.integers(0, 64))
def test_structured_headers(header: dict, extra: int) -> None:
    raw = json.dumps(header).encode()
    try:
        _, specs = parse_header(raw, 8 + len(raw) + extra, Path("f.safetensors"))
    except CheckpointError:
        return
    position = 8 + len(raw)  # accepted: the tensors tile the data buffer exactly
    for spec in specs:
        assert spec.offset == position
        position += spec.nbytes
    assert position == 8 + len(raw) + extra


@fuzz
@given(body=st.one_of(st.binary(max_size=100), headers.map(lambda h: json.dumps({"weight_map": h}).encode()),
                      st.dictionaries(st.text(max_size=6), st.text(max_size=12), max_size=4).map(
                          lambda m: json.dumps({"weight_map": m}).encode())))
def test_index_files(tmp_path_factory: pytest.TempPathFactory, body: bytes) -> None:
    path = tmp_path_factory.mktemp("idx") / "model.safetensors.index.json"
    path.write_bytes(body)
    try:
        weight_map = _read_index(path)
    except CheckpointError:
        return
    assert all(not os.path.isabs(v) and ".." not in Path(v).parts for v in weight_map.values())


@fuzz
@given(prefix=st.binary(min_size=0, max_size=24), length=st.one_of(st.integers(0, 64), st.integers(0, 2**64 - 1)))
def test_shard_files(tmp_path_factory: pytest.TempPathFactory, prefix: bytes, length: int) -> None:
    path = tmp_path_factory.mktemp("shard") / "x.safetensors"
    path.write_bytes(struct.pack("<Q", length) + prefix)
    try:
        read_shard_header(path)
    except CheckpointError:
        pass


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "blob"
    path.write_bytes(bytes(range(256)) * 16)
    return path


@fuzz
@given(offset=ints, nbytes=ints)
def test_core_reads_are_range_checked(data_file: Path, offset: int, nbytes: int) -> None:
    with _core.InputFile(str(data_file)) as f:
        try:
            data = f.read(offset, nbytes)
        except (_core.CoreError, TypeError, OverflowError, ValueError):
            return
        assert 0 <= offset and offset + nbytes <= 4096 and data == data_file.read_bytes()[offset:offset + nbytes]


@fuzz
@given(size=st.integers(0, 64), offset=ints, data=st.binary(max_size=80), src_offset=ints, nbytes=ints)
def test_core_writes_are_range_checked(tmp_path_factory: pytest.TempPathFactory, data_file: Path, size: int,
                                       offset: int, data: bytes, src_offset: int, nbytes: int) -> None:
    path = tmp_path_factory.mktemp("w") / "out"
    with _core.InputFile(str(data_file)) as src, _core.ShardWriter(str(path), size) as w:
        for op in (lambda: w.write(offset, data), lambda: w.copy_range(src, src_offset, offset, nbytes)):
            try:
                op()
            except (_core.CoreError, TypeError, OverflowError, ValueError):
                pass
        w.close(sync=False)
    assert path.stat().st_size == size


@fuzz
@given(lengths=st.lists(st.integers(0, 40), min_size=0, max_size=4), out_len=st.integers(0, 40),
       dtypes=st.lists(st.sampled_from(["F32", "BF16", "F16", "I8", "X"]), min_size=0, max_size=5),
       weights=st.lists(st.floats(allow_nan=True), max_size=5), out_dtype=st.sampled_from(["F32", "BF16", "F16", "U8"]))
def test_core_blend_checks_its_arguments(lengths: list[int], out_len: int, dtypes: list[str], weights: list[float],
                                          out_dtype: str) -> None:
    inputs = [bytes(n) for n in lengths]
    out = bytearray(out_len)
    try:
        _core.blend_buffers(inputs, dtypes, weights, out, out_dtype)
    except (_core.CoreError, TypeError, ValueError):
        pass
