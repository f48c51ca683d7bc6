"""Fuzzing the parsers and the core's range checks with hypothesis.

In CI each property runs a bounded number of examples (some ten seconds in all). For a long run:
``LAYERSWAP_FUZZ_EXAMPLES=200000 .venv/bin/python -m pytest tests/test_fuzz.py`` (scripts/fuzz.sh).
Every outcome must be a result or a typed error: never another exception, never a crash.

The header properties go further: a header must be accepted exactly when an oracle written here
from the format's rules accepts it, and then describe the tensors the oracle computes. A check
that only looks for crashes cannot see a bad header being *accepted* (issue 22). The headers are
mostly built valid and then given at most one small mutation, so both outcomes occur often;
``--hypothesis-show-statistics`` shows how often, and which mutations ran.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from layerswap_fast import CheckpointError, _core
from layerswap_fast.formats.checkpoint import TensorSpec, _read_index, parse_header, read_shard_header

EXAMPLES = int(os.environ.get("LAYERSWAP_FUZZ_EXAMPLES", "300"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
T = TypeVar("T")

# ------------------------------------------------------------------------------------- the oracle
# Restated from the safetensors format (8-byte little-endian header length N, N bytes of JSON,
# then the data) and the package's documented rules, deliberately without its code: a shared
# mistake would otherwise pass unseen. Python's json does the parsing; the hooks add what the
# package refuses on top of it.

#: bytes per element of every dtype name the package reads, as the safetensors format defines them
DTYPE_BYTES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
#: the longest header the core reads; unreachable with the small files here, kept for the record
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class Expected:
    """What an accepted header describes: its metadata and, per tensor, (name, dtype, shape,
    absolute offset in the file, nbytes)."""

    metadata: dict[str, str]
    tensors: list[tuple[str, str, tuple[int, ...], int, int]]


class _Refused(Exception):
    """JSON that Python's json takes but a safetensors header must not hold."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({key for key, _ in pairs}) != len(pairs):  # json alone would keep the last silently
        raise _Refused("a key given twice")
    return dict(pairs)


def _no_constant(name: str) -> Any:  # noqa: ANN401
    raise _Refused(f"{name} is not JSON")


def _finite(text: str) -> float:
    if not math.isfinite(value := float(text)):  # 1e400 would become inf
        raise _Refused(f"{text} overflows")
    return value


def _is_int(value: Any) -> bool:  # noqa: ANN401
    return type(value) is int  # JSON true and false parse to bools, which Python counts as ints


def _is_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")  # fails on a lone surrogate, which only a "\ud800" escape can make
    except UnicodeEncodeError:
        return False
    return True


def expect_header(raw: bytes, file_size: int) -> Expected | None:
    """What ``parse_header(raw, file_size, path)`` must return; None where it must refuse."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys,
                            parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, RecursionError, _Refused):  # ValueError: bad UTF-8 or JSON, > 4300 digits
        return None
    if not isinstance(header, dict):
        return None
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        return None
    # Only names and metadata need checking for surrogates, and nothing for the package's nesting
    # cap: a string or a nested value anywhere else breaks the rules below anyway.
    if not all(map(_is_unicode, [*header, *metadata, *metadata.values()])):
        return None
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or sorted(entry) != ["data_offsets", "dtype", "shape"]:
            return None
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            return None
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            return None
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_int, offsets)):
            return None
        begin, end = offsets
        if not 0 <= begin <= end or end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            return None
        spans.append((begin, end, name, dtype, tuple(shape)))
    position = 0  # in data order, each tensor starts where the one before it ended
    for begin, end, *_ in sorted(spans, key=lambda s: (s[0], s[1])):
        if begin != position:
            return None
        position = end
    data_start = 8 + len(raw)
    if data_start + position != file_size:  # the data ends exactly at the end of the file
        return None
    return Expected(metadata, [(name, dtype, shape, data_start + begin, end - begin)
                               for begin, end, name, dtype, shape in spans])


def expect_shard(blob: bytes) -> tuple[bytes, Expected] | None:
    """The header bytes of a file holding ``blob`` and what ``read_shard_header`` must find in
    it; None where it must refuse."""
    if len(blob) < 8:
        return None
    n = int.from_bytes(blob[:8], "little")
    if not 0 < n <= MAX_HEADER_BYTES or 8 + n > len(blob):
        return None
    expected = expect_header(blob[8:8 + n], len(blob))
    return None if expected is None else (blob[8:8 + n], expected)


def outcome(call: Callable[[], T]) -> T | None:
    """The call's result, or None where it raised CheckpointError; any other exception fails."""
    try:
        return call()
    except CheckpointError:
        return None


def assert_agrees(got: tuple[dict[str, str], Sequence[TensorSpec]] | None, expected: Expected | None,
                  path: Path) -> None:
    event("accepted" if expected is not None else "refused")
    if got is None or expected is None:
        assert got is None, "the header breaks the rules but was accepted"
        assert expected is None, "the header keeps the rules but was refused"
        return
    metadata, specs = got
    assert metadata == expected.metadata
    assert all(spec.file == path for spec in specs)
    found = [(s.name, s.dtype, s.shape, s.offset, s.nbytes) for s in specs]
    assert sorted(found) == sorted(expected.tensors)
    # in data order; zero-byte tensors at one offset may come in either order
    spans = [(s.offset, s.offset + s.nbytes) for s in specs]
    assert spans == sorted(spans)


# ------------------------------------------------------------------------------- headers to try

@dataclass(frozen=True)
class Raw:
    """JSON text written as is: what json.dumps never writes (NaN, 1e400, a "\\ud800" escape)."""

    text: str


class Obj:
    """A JSON object as its key/value pairs in order, so that a key can be given twice."""

    def __init__(self, pairs: Sequence[tuple[str | Raw, Any]]) -> None:
        self.pairs = list(pairs)

    def __getitem__(self, key: str) -> Any:  # noqa: ANN401
        return next(v for k, v in self.pairs if k == key)

    def __setitem__(self, key: str, value: Any) -> None:  # noqa: ANN401
        self.pairs = [(k, value if k == key else v) for k, v in self.pairs]


def to_json(value: Any, ascii_only: bool = True) -> str:  # noqa: ANN401
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Obj):
        return "{" + ", ".join(f"{to_json(k, ascii_only)}: {to_json(v, ascii_only)}" for k, v in value.pairs) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(to_json(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


@dataclass
class Case:
    """A header to try: the JSON value at its top (an Obj of tensors, normally), the text around
    it, and how many data bytes follow it in the file."""

    top: Any
    data_len: int
    order: list[Obj] = field(default_factory=list)  # the tensor entries in data order
    ascii_only: bool = True
    lead: str = ""
    tail: str = ""
    mutation: str = "none"

    def __repr__(self) -> str:
        return f"Case(raw={self.raw()!r}, data_len={self.data_len}, mutation={self.mutation!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # noqa: ANN401
        printer.text(repr(self))  # hypothesis shows a failing example's bytes, not its object tree

    def raw(self) -> bytes:
        return (self.lead + to_json(self.top, self.ascii_only) + self.tail).encode("utf-8")

    def file_size(self) -> int:
        return 8 + len(self.raw()) + self.data_len


names = st.text(max_size=6).filter(lambda s: s != "__metadata__")
shapes = st.lists(st.integers(0, 4), max_size=3)


def _shuffled(draw: st.DrawFn, items: list[T]) -> list[T]:
    """The items in a drawn order, shrinking towards the given one (st.permutations made
    hypothesis discard several times as many examples)."""
    keys = draw(st.lists(st.integers(0, len(items)), min_size=len(items), max_size=len(items)))
    return [item for _, _, item in sorted(zip(keys, range(len(items)), items))]


@st.composite
def valid_cases(draw: st.DrawFn) -> Case:
    """A header that keeps every rule: up to five tensors, laid out in an order of their own,
    fields in any order, metadata or none, padding or none."""
    tensors = draw(st.lists(st.tuples(names, st.sampled_from(sorted(DTYPE_BYTES)), shapes), max_size=5,
                            unique_by=lambda t: t[0]))
    entries: dict[str, Obj] = {}
    order, position = [], 0
    for name, dtype, shape in _shuffled(draw, tensors):  # data order need not be key order
        end = position + math.prod(shape) * DTYPE_BYTES[dtype]
        fields = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, end]}
        entries[name] = Obj(_shuffled(draw, list(fields.items())))
        order.append(entries[name])
        position = end
    pairs: list[tuple[str | Raw, Any]] = [(name, entries[name]) for name, _, _ in tensors]
    metadata = draw(st.none() | st.dictionaries(st.text(max_size=4), st.text(max_size=6), max_size=3))
    if metadata is not None:
        pairs.insert(draw(st.integers(0, len(pairs))), ("__metadata__", Obj(list(metadata.items()))))
    padding = draw(st.sampled_from(["", " ", "    "]))  # writers pad the header with spaces to align the data
    return Case(Obj(pairs), position, order, ascii_only=draw(st.booleans()), tail=padding)


Mutation = Callable[[st.DrawFn, Case], None]
MUTATIONS: dict[str, Mutation] = {}


def mutation(f: Mutation) -> Mutation:
    MUTATIONS[f.__name__] = f
    return f


def _tensor_at(draw: st.DrawFn, case: Case) -> int | None:
    """The index in the top object's pairs of a tensor, or None where there is none."""
    found = [i for i, (k, v) in enumerate(case.top.pairs) if k != "__metadata__" and isinstance(v, Obj)]
    return draw(st.sampled_from(found)) if found else None


def _entry(draw: st.DrawFn, case: Case) -> Obj | None:
    i = _tensor_at(draw, case)
    return None if i is None else case.top.pairs[i][1]


def _metadata(case: Case) -> Obj | None:
    return next((v for k, v in case.top.pairs if k == "__metadata__"), None)


#: values to put where an int belongs: all refused (NaN and 1e400 by the reading of the JSON, 4400
#: digits by json itself, 2**64 by the sizes) but for "-0", which is the int 0
ODD_VALUES = [None, "0", [], Obj([]), -1, 2**64, Raw("NaN"), Raw("-Infinity"), Raw("1e400"), Raw("-0"),
              Raw("1" * 4400)]


def _same_value_other_type(value: int) -> Any:  # noqa: ANN401
    """The int as a bool or a float: equal to it in Python, so only a type check refuses it."""
    return {0: False, 1: True}.get(value, float(value))


# First the mutations that break one rule of an otherwise consistent header: what a lax check lets
# through. They are drawn more often (see ONE_RULE below).

@mutation
def shift_tail(draw: st.DrawFn, case: Case) -> None:
    """Move the tensors from some point of the data on, and the end of the file with them: the
    one fault left is a gap (or an overlap) in the data."""
    if case.order:
        d = draw(st.sampled_from([1, -1, 2, -2]))
        # moving the first tensor back would make its offset negative, which is a fault of its own
        k = draw(st.integers(1 if d < 0 and len(case.order) > 1 else 0, len(case.order) - 1))
        for entry in case.order[k:]:
            entry["data_offsets"] = [o + d for o in entry["data_offsets"]]
        case.data_len += d


@mutation
def duplicate_tensor(draw: st.DrawFn, case: Case) -> None:
    """A tensor given twice by the same name, entry and all, in the header's text."""
    if (i := _tensor_at(draw, case)) is not None:
        case.top.pairs.insert(draw(st.integers(0, len(case.top.pairs))), case.top.pairs[i])


@mutation
def wrong_file_size(draw: st.DrawFn, case: Case) -> None:
    """Trailing bytes after the data, or data cut short."""
    case.data_len += draw(st.sampled_from([-1, 1, 7]))


@mutation
def text_around(draw: st.DrawFn, case: Case) -> None:
    """Text before or after the JSON value: whitespace is allowed, anything else is not."""
    case.lead, case.tail = draw(st.sampled_from([("", "x"), ("", "}"), ("", "\0"), ("", ","), ("", "{}"),
                                                 ("", " \t\r\n"), ("\n ", ""), ("\ufeff", "")]))


@mutation
def bool_for_int(draw: st.DrawFn, case: Case) -> None:
    """A JSON bool where an int belongs, the header otherwise valid: the first tensor's offset 0
    as false, or a dimension true (which Python takes for 1, so the size still fits)."""
    if case.order:
        if draw(st.booleans()):
            case.order[0]["data_offsets"][0] = False
        else:
            case.order[draw(st.integers(0, len(case.order) - 1))]["shape"].append(True)


@mutation
def odd_dim(draw: st.DrawFn, case: Case) -> None:
    if (entry := _entry(draw, case)) and (shape := entry["shape"]):
        i = draw(st.integers(0, len(shape) - 1))
        shape[i] = draw(st.just(_same_value_other_type(shape[i])) | st.sampled_from(ODD_VALUES))


@mutation
def odd_offset(draw: st.DrawFn, case: Case) -> None:
    if entry := _entry(draw, case):
        offsets, i = entry["data_offsets"], draw(st.integers(0, 1))
        offsets[i] = draw(st.just(_same_value_other_type(offsets[i])) | st.sampled_from(ODD_VALUES))


@mutation
def escape_in_string(draw: st.DrawFn, case: Case) -> None:
    """A \\u escape at the end of a tensor name or a metadata string: a lone surrogate must be
    refused, a surrogate pair or any other character taken."""
    escape = draw(st.sampled_from(["\\ud800", "\\udfff", "\\ud83d", "\\ud83d\\ude00", "\\u00e9", "\\u0000"]))

    def escaped(s: str) -> Raw:
        return Raw(json.dumps(s)[:-1] + escape + '"')

    metadata = _metadata(case)
    i = _tensor_at(draw, case)
    if metadata is not None and metadata.pairs and (i is None or draw(st.booleans())):
        j = draw(st.integers(0, len(metadata.pairs) - 1))
        key, value = metadata.pairs[j]
        metadata.pairs[j] = (escaped(key), value) if draw(st.booleans()) else (key, escaped(value))
    elif i is not None:
        case.top.pairs[i] = (escaped(case.top.pairs[i][0]), case.top.pairs[i][1])
    else:
        case.top.pairs.append(("__metadata__", Obj([(escaped(""), "v")])))


@mutation
def duplicate_field(draw: st.DrawFn, case: Case) -> None:
    if entry := _entry(draw, case):
        entry.pairs.insert(draw(st.integers(0, len(entry.pairs))), draw(st.sampled_from(entry.pairs)))


@mutation
def duplicate_metadata_key(draw: st.DrawFn, case: Case) -> None:
    metadata = _metadata(case)
    if metadata is None or not metadata.pairs:
        case.top.pairs.append(("__metadata__", Obj([("k", "v"), ("k", "v")])))
    else:
        metadata.pairs.insert(draw(st.integers(0, len(metadata.pairs))), draw(st.sampled_from(metadata.pairs)))


@mutation
def change_dtype(draw: st.DrawFn, case: Case) -> None:
    """Another dtype: one of the same size keeps the header valid (so does "F32" spelt with
    escapes, for a 4-byte one); unknown names and non-strings do not."""
    if entry := _entry(draw, case):
        entry["dtype"] = draw(st.sampled_from([*DTYPE_BYTES, "F4", "F8_E8M0", "C64", "f32", "float32", "F32 ",
                                               "", None, 1, True, ["F32"], Obj([]), Raw('"\\u0046\\u0033\\u0032"')]))


@mutation
def nudge_offset(draw: st.DrawFn, case: Case) -> None:
    if entry := _entry(draw, case):
        entry["data_offsets"][draw(st.integers(0, 1))] += draw(st.sampled_from([-1, 1]))


@mutation
def add_tensor(draw: st.DrawFn, case: Case) -> None:
    """One more tensor, at the end of the data (valid unless its name is taken) or elsewhere."""
    name, dtype, shape = draw(names), draw(st.sampled_from(sorted(DTYPE_BYTES))), draw(shapes)
    begin = draw(st.just(case.data_len) | st.integers(0, case.data_len + 2))
    end = begin + math.prod(shape) * DTYPE_BYTES[dtype]
    entry = Obj([("dtype", dtype), ("shape", shape), ("data_offsets", [begin, end])])
    case.top.pairs.insert(draw(st.integers(0, len(case.top.pairs))), (name, entry))
    case.data_len = max(case.data_len, end)


@mutation
def drop_tensor(draw: st.DrawFn, case: Case) -> None:
    """One tensor less, the file shortened by its size or not: a gap unless it was the last."""
    if (i := _tensor_at(draw, case)) is not None:
        begin, end = case.top.pairs.pop(i)[1]["data_offsets"]
        case.data_len -= draw(st.sampled_from([0, end - begin]))


@mutation
def named_metadata(draw: st.DrawFn, case: Case) -> None:
    """A tensor called ``__metadata__``: the name is the metadata's, so the header is invalid."""
    if (i := _tensor_at(draw, case)) is not None:
        entry = case.top.pairs[i][1]
        case.top.pairs = [("__metadata__", entry) if p[1] is entry else p for p in case.top.pairs
                          if p[0] != "__metadata__"]


@mutation
def odd_metadata(draw: st.DrawFn, case: Case) -> None:
    """Metadata that is not a map of strings to strings (but for ``{}``, which is one)."""
    odd = draw(st.sampled_from([None, [], "x", 0, Obj([]), Obj([("k", 1)]), Obj([("k", None)]),
                                Obj([("k", ["v"])]), Obj([("k", Obj([]))]), Obj([("k", Raw("NaN"))])]))
    case.top.pairs = [p for p in case.top.pairs if p[0] != "__metadata__"]
    case.top.pairs.insert(draw(st.integers(0, len(case.top.pairs))), ("__metadata__", odd))


@mutation
def reshape(draw: st.DrawFn, case: Case) -> None:
    """A dimension more or less, or no list: the header stays valid only when the size does."""
    if entry := _entry(draw, case):
        shape = entry["shape"]
        entry["shape"] = draw(st.sampled_from([[*shape, 1], [*shape, 0], [2, *shape], shape[:-1], None, 0,
                                               "[]", Obj([])]))


@mutation
def swap_offsets(draw: st.DrawFn, case: Case) -> None:
    if entry := _entry(draw, case):
        entry["data_offsets"].reverse()


@mutation
def odd_offsets_list(draw: st.DrawFn, case: Case) -> None:
    if entry := _entry(draw, case):
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = draw(st.sampled_from([[begin], [begin, end, end], [], begin, None,
                                                      Obj([("0", begin), ("1", end)])]))


@mutation
def drop_field(draw: st.DrawFn, case: Case) -> None:
    if entry := _entry(draw, case):
        entry.pairs.pop(draw(st.integers(0, len(entry.pairs) - 1)))


@mutation
def add_field(draw: st.DrawFn, case: Case) -> None:
    if entry := _entry(draw, case):
        key = draw(st.sampled_from(["extra", "Dtype", "offsets", "__metadata__"]) | st.text(max_size=2))
        entry.pairs.insert(draw(st.integers(0, len(entry.pairs))), (key, 0))


@mutation
def entry_not_object(draw: st.DrawFn, case: Case) -> None:
    if (i := _tensor_at(draw, case)) is not None:
        name, entry = case.top.pairs[i]
        case.top.pairs[i] = (name, draw(st.sampled_from([[v for _, v in entry.pairs], None, "F32", [], 0])))


@mutation
def not_an_object(draw: st.DrawFn, case: Case) -> None:
    case.top = draw(st.sampled_from([[case.top], [], None, "header", 0]))


#: half the mutations come from these: the faults that a check left out would let through unseen
ONE_RULE = ["shift_tail", "duplicate_tensor", "wrong_file_size", "text_around", "bool_for_int"]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """A valid header, given one mutation or none (which is what shrinking tends to). Hypothesis
    draws 0 more often than chance would, so "none" comes about a third of the time."""
    case = draw(valid_cases())
    if draw(st.integers(0, 7)):
        case.mutation = draw(st.sampled_from(ONE_RULE) | st.sampled_from(list(MUTATIONS)))
        MUTATIONS[case.mutation](draw, case)
    return case


ints = st.one_of(st.integers(-5, 64), st.integers(-(2**70), 2**70), st.sampled_from([2**63 - 1, 2**64 - 1, 2**64]))
dtypes = st.one_of(st.sampled_from(["F32", "BF16", "F16", "I64", "BOOL", "F8_E4M3"]), st.text(max_size=4))
entries = st.fixed_dictionaries({"dtype": dtypes, "shape": st.lists(ints, max_size=3),
                                 "data_offsets": st.lists(ints, min_size=0, max_size=3)})
json_values = st.recursive(st.none() | st.booleans() | ints | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=10)
#: arbitrary headers, rarely valid: what the mutations do not think of
headers = st.dictionaries(st.text(max_size=8), st.one_of(entries, json_values), max_size=5)
arbitrary_cases = st.builds(lambda h, n: Case(h, n, mutation="arbitrary"), headers, st.integers(0, 64))


@st.composite
def header_bytes(draw: st.DrawFn) -> tuple[bytes, int, str]:
    """(header bytes, file size, what was done): a case's header with one byte changed, added or
    removed (a broken UTF-8 sequence, a broken token, a changed name) or cut short."""
    case = draw(cases())
    raw = bytearray(case.raw())
    edit = draw(st.just("none") | st.sampled_from(["replace", "insert", "delete", "cut"]))
    if raw and edit != "none":
        i = draw(st.integers(0, len(raw) - 1))
        byte = draw(st.sampled_from(b'"\\{}[],:0 e\x80\xc3\xed\xff') | st.integers(0, 255))
        if edit == "replace":
            raw[i] = byte
        elif edit == "insert":
            raw.insert(i, byte)
        elif edit == "delete":
            del raw[i]
        else:
            del raw[i:]
    return bytes(raw), 8 + len(raw) + case.data_len, f"{case.mutation}, byte {edit}"


any_header_bytes = st.one_of(
    header_bytes(),
    st.builds(lambda raw, size: (raw, size, "random bytes"), st.binary(max_size=200), st.integers(0, 10**6)))


@st.composite
def shard_blobs(draw: st.DrawFn) -> tuple[bytes, str]:
    """(file contents, what was done): a case as a whole file, perhaps with its length field
    changed or the file cut short."""
    case = draw(cases())
    raw = case.raw()
    length = draw(st.sampled_from(["right", "changed", "cut"]))
    n = len(raw)
    if length == "changed":
        n = draw(st.sampled_from([0, n - 1, n + 1, n + case.data_len, n + case.data_len + 1, MAX_HEADER_BYTES,
                                  MAX_HEADER_BYTES + 1, 2**64 - 1]) | st.integers(0, 2**64 - 1))
    blob = struct.pack("<Q", n) + raw + bytes(max(case.data_len, 0))
    blob = blob[:len(blob) + min(case.data_len, 0)]  # a negative length: the data cut short
    if length == "cut":
        blob = blob[:draw(st.integers(0, len(blob)))]
    return blob, f"{case.mutation}, length {length}"


any_shard_blobs = st.one_of(
    shard_blobs(),
    st.builds(lambda prefix, n: (struct.pack("<Q", n) + prefix, "random bytes"), st.binary(max_size=24),
              st.one_of(st.integers(0, 64), st.integers(0, 2**64 - 1))))


def _tensor(shape: str = "[1]", offsets: str = "[0, 4]", dtype: str = "F32") -> str:
    return f'{{"dtype": "{dtype}", "shape": {shape}, "data_offsets": {offsets}}}'


A, B = _tensor(), _tensor(offsets="[4, 8]")
#: (header text, data bytes after it): faults a lax check lets through, each next to a valid header
#: like it; every header property tries these first, whatever its random draws
KNOWN_HEADERS = [
    ("{}", 0),
    (f'{{"a": {A}, "b": {B}}}', 8),
    (f'{{"a": {A}, "b": {_tensor(offsets="[5, 9]")}}}', 9),  # a gap
    (f'{{"a": {A}, "b": {_tensor(offsets="[2, 6]")}}}', 6),  # an overlap
    (f'{{"a": {A}, "a": {A}}}', 4),  # a name twice
    (f'{{"a": {A}}}', 5),  # a trailing byte
    (f'{{"a": {A}}}', 3),  # a byte short
    (f'{{"a": {A}}}   ', 4),  # padding
    (f'{{"a": {A}}} x', 4),  # not padding
    (f'{{"a": {_tensor(shape="[true]")}}}', 4),
    (f'{{"a": {_tensor(shape="[1.0]")}}}', 4),
    (f'{{"a": {_tensor(offsets="[false, 4]")}}}', 4),
    (f'{{"a": {_tensor(dtype="F4")}}}', 4),
    ('{"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}', 4),  # a dtype no dict key can be
    (f'{{"a\\ud83d\\ude00": {A}}}', 4),  # a surrogate pair
    (f'{{"a\\ud800": {A}}}', 4),  # a lone surrogate
    ('{"__metadata__": {"k": "v"}}', 0),
    ('{"__metadata__": {"k": "v", "k": "v"}}', 0),
    ('{"__metadata__": {"k": NaN}}', 0),
    (f'{{"z": {_tensor("[0]", "[0, 0]")}, "y": {_tensor("[2, 0]", "[0, 0]", "I8")}, "a": {A}}}', 4),  # empty tensors at one offset
]


def known_headers(to_case: Callable[[bytes, int], Any]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Adds each of KNOWN_HEADERS to a property as an explicit example, made by to_case(raw, data bytes)."""
    def add(test: Callable[..., None]) -> Callable[..., None]:
        for text, data_len in KNOWN_HEADERS:
            test = example(case=to_case(text.encode(), data_len))(test)
        return test
    return add


# ------------------------------------------------------------------------------------- properties

@fuzz
@known_headers(lambda raw, n: (raw, 8 + len(raw) + n, "known"))
@given(case=any_header_bytes)
def test_header_bytes(case: tuple[bytes, int, str]) -> None:
    raw, size, how = case
    event(how)
    path = Path("f.safetensors")
    assert_agrees(outcome(lambda: parse_header(raw, size, path)), expect_header(raw, size), path)


@fuzz
@known_headers(lambda raw, n: Case(Raw(raw.decode()), n, mutation="known"))
@given(case=st.one_of(cases(), arbitrary_cases))
def test_structured_headers(case: Case) -> None:
    event(case.mutation)
    raw, path = case.raw(), Path("f.safetensors")
    assert_agrees(outcome(lambda: parse_header(raw, case.file_size(), path)),
                  expect_header(raw, case.file_size()), path)


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


@pytest.fixture(scope="module")
def shard_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shard") / "x.safetensors"  # rewritten by every example


@fuzz
@known_headers(lambda raw, n: (struct.pack("<Q", len(raw)) + raw + bytes(n), "known"))
@given(case=any_shard_blobs)
def test_shard_files(shard_path: Path, case: tuple[bytes, str]) -> None:
    blob, how = case
    event(how)
    shard_path.write_bytes(blob)
    shard = outcome(lambda: read_shard_header(shard_path))
    expected = expect_shard(blob)
    assert_agrees(shard and (shard.metadata, shard.tensors), expected and expected[1], shard_path)
    if shard is not None and expected is not None:
        assert shard.path == shard_path and shard.size == len(blob)
        assert shard.header_sha256 == hashlib.sha256(expected[0]).hexdigest()


def _verdicts(strategy: st.SearchStrategy[T], accepted: Callable[[T], bool]) -> Counter[bool]:
    """How often the oracle accepts the strategy's examples, over a fixed run of 200."""
    seen: Counter[bool] = Counter()

    @settings(max_examples=200, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def record(example: T) -> None:
        seen[accepted(example)] += 1

    record()
    return seen


@pytest.mark.parametrize("strategy, accepted", [
    (any_header_bytes, lambda c: expect_header(c[0], c[1]) is not None),
    (st.one_of(cases(), arbitrary_cases), lambda c: expect_header(c.raw(), c.file_size()) is not None),
    (any_shard_blobs, lambda c: expect_shard(c[0]) is not None),
], ids=["header_bytes", "structured_headers", "shard_files"])
def test_fuzzed_headers_are_often_valid_and_often_not(strategy: st.SearchStrategy[Any],
                                                      accepted: Callable[[Any], bool]) -> None:
    """Each header property sees both outcomes many times: a generator that only made broken
    headers would leave the 'accepted' branch of its oracle untried, and the property toothless."""
    seen = _verdicts(strategy, accepted)
    assert seen[True] >= 20 and seen[False] >= 20, seen


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


# ---------------------------------------------------------------------- the mapped reader (issue 20)
# The kernels read a mapped input straight from its mapping and a pread one through buffers. Over
# random slices, chunkings, threads and a file cut at a random length after it was opened, both
# paths must agree: the same bytes (those a numpy reference computes from the file), or both a
# CoreError; a cut never crashes the process.

_KERNEL_DTYPES = {"F32": np.float32, "F16": np.float16}
_DATA_BYTES = 1 << 16


def _data_file(tmp_path_factory: pytest.TempPathFactory, seed: int) -> tuple[Path, bytes]:
    # finite values only: a NaN's payload is not part of the contract
    data = np.random.default_rng(seed).uniform(-4, 4, _DATA_BYTES // 4).astype(np.float32).tobytes()
    path = tmp_path_factory.mktemp("mapped") / "in.bin"
    path.write_bytes(data)
    return path, data


def _both_paths(path: Path, cut: int | None, run: Callable[[_core.InputFile], Any]) -> list[Any]:
    """run(file) once per read path, the file cut to ``cut`` bytes after it was opened (and whole
    again before the next): its result, or "error" for a CoreError."""
    whole = path.read_bytes()
    outcomes = []
    for io in ("mmap", "pread"):
        path.write_bytes(whole)
        with _core.InputFile(str(path), io=io) as f:
            assert f.io == io
            if cut is not None:
                os.truncate(path, cut)
            try:
                outcomes.append(run(f))
            except _core.CoreError:
                outcomes.append("error")
    path.write_bytes(whole)
    return outcomes


def _slice(data: bytes, cut: int | None, offset: int, dtype: str, numel: int) -> np.ndarray | None:
    """numel elements at offset as float32; None where the kernel must refuse: the slice runs past
    the file as opened, or a byte of it past the cut."""
    nbytes = numel * np.dtype(_KERNEL_DTYPES[dtype]).itemsize
    if offset + nbytes > len(data) or (nbytes > 0 and cut is not None and offset + nbytes > cut):
        return None
    return np.frombuffer(data, _KERNEL_DTYPES[dtype], numel, offset if numel else 0).astype(np.float32)


@fuzz
@given(seed=st.integers(0, 3), numel=st.integers(0, 3000), chunk=st.integers(1, 4000), threads=st.integers(1, 2),
       inputs=st.lists(st.tuples(st.integers(0, _DATA_BYTES), st.sampled_from(list(_KERNEL_DTYPES))), min_size=1,
                       max_size=3),
       cut=st.none() | st.integers(0, _DATA_BYTES))
def test_mapped_blend_agrees_with_pread(tmp_path_factory: pytest.TempPathFactory, seed: int, numel: int, chunk: int,
                                        threads: int, inputs: list[tuple[int, str]], cut: int | None) -> None:
    path, data = _data_file(tmp_path_factory, seed)
    weights = [0.5, -0.25, 1.0][:len(inputs)]
    out_path = path.with_name("out")

    def run(f: _core.InputFile) -> bytes:
        out_path.unlink(missing_ok=True)
        with _core.ShardWriter(str(out_path), 4 * numel) as w:
            _core.blend_file([(f, o) for o, _ in inputs], [d for _, d in inputs], weights, w, 0, "F32", numel,
                             chunk_elems=chunk, threads=threads)
            w.close(sync=False)
        return out_path.read_bytes()

    mapped, pread = _both_paths(path, cut, run)
    event(f"outcome: {'error' if pread == 'error' else 'bytes'}")
    assert mapped == pread
    xs = [_slice(data, cut, o, d, numel) for o, d in inputs]
    if any(x is None for x in xs):
        assert pread == "error"
        return
    with np.errstate(all="ignore"):  # infinities in the F16 views
        acc = np.float32(weights[0]) * xs[0]
        for wt, x in zip(weights[1:], xs[1:]):
            acc = acc + np.float32(wt) * x
    assert pread != "error"
    # F16 views of the data hold NaNs, whose payloads are not part of the contract
    assert np.array_equal(np.frombuffer(pread, np.float32), acc, equal_nan=True)


#: offsets of whole float32 values: misaligned views of the data reach float32's overflow, where
#: the kernel's float32 block sums and the float64 reference part ways
_aligned = st.integers(0, _DATA_BYTES // 4).map(lambda i: 4 * i)


@fuzz
@given(seed=st.integers(0, 3), rows=st.integers(1, 40), cols=st.integers(1, 300), chunk=st.integers(1, 2000),
       threads=st.integers(1, 2), base=_aligned, experts=st.lists(_aligned, min_size=1, max_size=2),
       cut=st.none() | st.integers(0, _DATA_BYTES))
def test_mapped_row_mav_agrees_with_pread(tmp_path_factory: pytest.TempPathFactory, seed: int, rows: int, cols: int,
                                          chunk: int, threads: int, base: int, experts: list[int],
                                          cut: int | None) -> None:
    path, data = _data_file(tmp_path_factory, seed)

    def run(f: _core.InputFile) -> bytes:
        return _core.row_mav_file([(f, o) for o in experts], ["F32"] * len(experts), (f, base), "F32", rows, cols,
                                  chunk_elems=chunk, threads=threads).tobytes()

    mapped, pread = _both_paths(path, cut, run)
    assert mapped == pread
    b = _slice(data, cut, base, "F32", rows * cols)
    es = [_slice(data, cut, o, "F32", rows * cols) for o in experts]
    if b is None or any(e is None for e in es):
        assert pread == "error"
        return
    got = np.frombuffer(pread, np.float64).reshape(len(experts), rows)
    want = np.stack([np.abs(e.astype(np.float64) - b).reshape(rows, cols).mean(axis=1) for e in es])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
