"""One reader for every JSON and YAML file the package reads: configs, indexes, recipes, summaries.

Every such file may come from someone else (a downloaded checkpoint, a shared recipe), so reading
one must cost bounded time and memory and end, when the file is bad, in one line naming the file:

- only regular files are read (a FIFO would block, ``/dev/zero`` never ends); symbolic links are
  followed (the Hugging Face cache links everything) but their target must be a regular file;
- at most :data:`MAX_BYTES` are read (:data:`MAX_YAML_BYTES` of YAML);
- nesting deeper than :data:`MAX_DEPTH` is refused, checked without recursion;
- text must be UTF-8, and every string valid Unicode (JSON's ``"\\ud800"`` is a lone surrogate,
  which no writer can encode); JSON ``NaN``/``Infinity`` and numbers that overflow are refused;
- YAML anchors and aliases are refused (an alias bomb then costs nothing), YAML errors are one line;
- a :class:`Schema` checks the parsed value: the message names the file, the key path and the
  expected type, e.g. ``config.json: num_hidden_layers must be an integer, got 2.7``.

The message of every failure is raised as the caller's error class (a ``LayerswapError``).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, LayerswapError

MAX_BYTES = 64 << 20
#: YAML is parsed in pure Python (about 1 MB/s): a YAML config is hand-written and small, and a
#: cap far below MAX_BYTES keeps a hostile one from costing minutes
MAX_YAML_BYTES = 1 << 20
MAX_DEPTH = 64
#: digits of the longest YAML integer read (2**64 has 20); JSON's parser stops at 4300 itself
MAX_INT_DIGITS = 100
PathLike = str | os.PathLike[str]
Error = type[LayerswapError]


def show_path(path: PathLike) -> str:
    """The path as text for a one-line message: as is, or quoted when it holds a control
    character (a newline in a name must not break the line)."""
    s = os.fsdecode(path)
    return s if s.isprintable() else repr(s)


def show_value(value: Any, limit: int = 60) -> str:
    """A parsed value as the file would spell it, shortened: ``null``, ``true``, ``2.7``, ``'x'``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        text = repr(value)
    else:
        try:  # the value was depth-checked, so this recursion is bounded
            text = json.dumps(value, ensure_ascii=True, default=repr)
        except (TypeError, ValueError, RecursionError):
            text = type(value).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ------------------------------------------------------------------------------------- bytes

def read_bytes(path: PathLike, *, cap: int = MAX_BYTES, error: Error = ConfigError) -> bytes:
    """The bytes of a regular file of at most ``cap`` bytes (``cap + 1`` at most are read)."""
    where = show_path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise error(f"cannot read {where}: {getattr(e, 'strerror', None) or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{where} is not a regular file")
        chunks, left = [], cap + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as e:
        raise error(f"cannot read {where}: {e.strerror}") from None
    finally:
        os.close(fd)
    if left <= 0:
        raise error(f"{where} is larger than {_size(cap)}; refusing to read it")
    return b"".join(chunks)


def _size(n: int) -> str:
    return f"{n >> 20} MB" if n >= 1 << 20 else f"{n} bytes"


def decode_utf8(raw: bytes, where: str, error: Error = ConfigError) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{where} is not valid UTF-8 ({e.reason} at byte {e.start})") from None


# ------------------------------------------------------------------------------------- shape

def check_tree(value: Any, where: str, error: Error = ConfigError, *, strings: bool = True,
               max_depth: int = MAX_DEPTH) -> None:
    """Depth at most ``max_depth`` and, with ``strings``, every string (keys too) valid Unicode.
    Iterative: only containers go on the stack, so a header of many tensors stays cheap."""
    if isinstance(value, str) and strings:
        _check_unicode(value, where, error)
    stack: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise error(f"{where} is nested deeper than {max_depth} levels")
        if isinstance(node, dict):
            if strings:
                for k in node:
                    if isinstance(k, str) and not k.isascii():
                        _check_unicode(k, where, error)
            node = node.values()
        for v in node:
            if isinstance(v, (dict, list)):
                stack.append((v, depth + 1))
            elif strings and isinstance(v, str) and not v.isascii():
                _check_unicode(v, where, error)


def _check_unicode(s: str, where: str, error: Error) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"{where}: the string {show_value(s)} is not valid Unicode (a lone surrogate)") from None


# ------------------------------------------------------------------------------------- JSON

class _Reject(Exception):
    """A JSON literal refused by a parse hook (NaN, Infinity, an overflowing number)."""


class _Duplicate(Exception):
    """A key given twice in one JSON object."""


def _reject_constant(name: str) -> Any:
    raise _Reject(f"{name} is not a number JSON allows")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Reject(f"the number {text[:40]} is out of range")
    return value


def parse_json(text: str | bytes, where: str, *, allow_duplicates: bool = False,
               error: Error = ConfigError) -> Any:
    """Parse JSON text (bytes must be UTF-8), then :func:`check_tree`. A key given twice in one
    object is refused (``json`` would silently take the last) unless ``allow_duplicates``."""
    if isinstance(text, bytes):
        text = decode_utf8(text, where, error)

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise _Duplicate(f"duplicate key {show_value(key)}")
            out[key] = value
        return out

    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_parse_float,
                           object_pairs_hook=None if allow_duplicates else pairs)
    except _Duplicate as e:
        raise error(f"{where}: {e}") from None
    except _Reject as e:
        raise error(f"{where} is not valid JSON ({e})") from None
    except RecursionError:
        raise error(f"{where} is nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:  # json.JSONDecodeError is one
        raise error(f"{where} is not valid JSON ({_one_line(str(e))})") from None
    # UTF-8 decoding refuses encoded surrogates: only a \\uD800-\\uDFFF escape can make one
    check_tree(value, where, error, strings=_SURROGATE_ESCAPE.search(text) is not None)
    return value


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ------------------------------------------------------------------------------------- YAML

def _yaml_loader() -> type:
    import yaml
    from yaml.events import AliasEvent, CollectionStartEvent

    class Loader(yaml.SafeLoader):
        """SafeLoader without anchors or aliases, with a nesting limit and unique keys."""

        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: ANN401
            event = self.peek_event()
            if isinstance(event, AliasEvent) or getattr(event, "anchor", None) is not None:
                raise yaml.composer.ComposerError(None, None, "anchors and aliases are not allowed",
                                                  event.start_mark)
            nested = isinstance(event, CollectionStartEvent)
            if nested:
                self.depth += 1
                if self.depth > MAX_DEPTH:
                    raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                                      event.start_mark)
            try:
                return super().compose_node(parent, index)
            finally:
                if nested:
                    self.depth -= 1

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:  # noqa: ANN401
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise yaml.constructor.ConstructorError(None, None, f"duplicate key {show_value(key)}",
                                                                key_node.start_mark)
                    seen.add(key)
                except TypeError:  # an unhashable key: the base class reports it
                    pass
            return super().construct_mapping(node, deep)

    Loader.add_constructor("tag:yaml.org,2002:int", _yaml_int)
    return Loader


def _yaml_int(loader: Any, node: Any) -> int:  # noqa: ANN401
    import yaml
    text = loader.construct_scalar(node)
    if len(text) > MAX_INT_DIGITS:
        raise yaml.constructor.ConstructorError(None, None, f"an integer of {len(text)} digits", node.start_mark)
    return yaml.SafeLoader.construct_yaml_int(loader, node)


_LOADER: type | None = None


def parse_yaml(text: str | bytes, where: str, *, error: Error = ConfigError) -> Any:
    """Parse YAML text (bytes must be UTF-8), then :func:`check_tree`; errors are one line
    ``WHERE: line L, column C: problem``."""
    global _LOADER
    import yaml

    if isinstance(text, bytes):
        text = decode_utf8(text, where, error)
    if _LOADER is None:
        _LOADER = _yaml_loader()
    try:
        loader = _LOADER(text)  # its reader already refuses characters YAML does not allow
        try:
            value = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "invalid YAML"
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise error(f"{where}: {at}{_one_line(problem)}") from None
    except yaml.reader.ReaderError as e:
        char = f"U+{e.character:04X}" if isinstance(e.character, int) else show_value(e.character)
        raise error(f"{where}: character {e.position + 1}: unacceptable character {char}: {e.reason}") from None
    except yaml.YAMLError as e:
        raise error(f"{where} is not valid YAML ({_one_line(str(e))})") from None
    except (ValueError, TypeError, OverflowError) as e:  # a constructor choking on a value
        raise error(f"{where} is not valid YAML ({_one_line(str(e))})") from None
    except RecursionError:
        raise error(f"{where} is nested deeper than {MAX_DEPTH} levels") from None
    check_tree(value, where, error)
    return value


# ------------------------------------------------------------------------------------- schemas

class Schema:
    """A declarative type: :meth:`check` raises ``error`` naming the key path and the expected type."""

    expected = "a value"

    def accepts(self, value: Any) -> bool:
        return True

    def check(self, value: Any, where: str, key: str = "", error: Error = ConfigError) -> None:
        if not self.accepts(value):
            self.fail(value, where, key, error)
        self.check_inside(value, where, key, error)

    def check_inside(self, value: Any, where: str, key: str, error: Error) -> None:
        pass

    def fail(self, value: Any, where: str, key: str, error: Error, expected: str | None = None) -> None:
        subject = f"{where}: {key}" if key else f"{where}: the top level"
        raise error(f"{subject} must be {expected or self.expected}, got {show_value(value)}")


class AnyValue(Schema):
    pass


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class Int(Schema):
    lo: int | None = None
    hi: int | None = None
    expected = "an integer"

    def accepts(self, value: Any) -> bool:
        return _is_int(value)

    def check_inside(self, value: Any, where: str, key: str, error: Error) -> None:
        if self.lo is not None and value < self.lo:
            self.fail(value, where, key, error, f"at least {self.lo}")
        if self.hi is not None and value > self.hi:
            self.fail(value, where, key, error, f"at most {self.hi}")


@dataclass(frozen=True)
class Float(Schema):
    """A finite number (an integer is fine), within [lo, hi] when given."""

    lo: float | None = None
    hi: float | None = None
    expected = "a finite number"

    def accepts(self, value: Any) -> bool:
        return (_is_int(value) and abs(value) < 1e308) or (isinstance(value, float) and math.isfinite(value))

    def check_inside(self, value: Any, where: str, key: str, error: Error) -> None:
        if self.lo is not None and value < self.lo:
            self.fail(value, where, key, error, f"at least {self.lo}")
        if self.hi is not None and value > self.hi:
            self.fail(value, where, key, error, f"at most {self.hi}")


class Str(Schema):
    expected = "a string"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str)


class Bool(Schema):
    expected = "true or false"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)


@dataclass(frozen=True)
class Choice(Schema):
    choices: tuple[str, ...]

    @property
    def expected(self) -> str:  # type: ignore[override]
        return "one of " + ", ".join(self.choices)

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and value in self.choices


@dataclass(frozen=True)
class Nullable(Schema):
    """``null``, or a value of ``inner``."""

    inner: Schema

    @property
    def expected(self) -> str:  # type: ignore[override]
        return f"{self.inner.expected} or null"

    def check(self, value: Any, where: str, key: str = "", error: Error = ConfigError) -> None:
        if value is not None:
            self.inner.check(value, where, key, error)


@dataclass(frozen=True)
class List(Schema):
    item: Schema = field(default_factory=AnyValue)
    min_len: int = 0

    @property
    def expected(self) -> str:  # type: ignore[override]
        noun = self.item.expected
        for article in ("an ", "a "):
            if noun.startswith(article):
                noun = noun[len(article):] + "s"
        return "a list" if isinstance(self.item, AnyValue) else f"a list of {noun}"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, list) and len(value) >= self.min_len

    def check_inside(self, value: Any, where: str, key: str, error: Error) -> None:
        for i, item in enumerate(value):
            self.item.check(item, where, f"{key}[{i}]", error)


@dataclass(frozen=True)
class Map(Schema):
    """A mapping with string keys. ``fields`` types the keys it names (``required`` must be
    there); other keys take ``values`` (any value by default) or, with ``closed``, are refused."""

    fields: Mapping[str, Schema] = field(default_factory=dict)
    required: Sequence[str] = ()
    values: Schema = field(default_factory=AnyValue)
    closed: bool = False
    min_len: int = 0

    @property
    def expected(self) -> str:  # type: ignore[override]
        return "a non-empty mapping" if self.min_len else "a mapping"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, dict) and len(value) >= self.min_len

    def check_inside(self, value: Any, where: str, key: str, error: Error) -> None:
        prefix = f"{key}." if key else ""
        for name in self.required:
            if name not in value:
                raise error(f"{where}: {prefix}{name} is required")
        for k, v in value.items():
            if not isinstance(k, str):
                raise error(f"{where}: {'keys of ' + key if key else 'keys'} must be strings, got {show_value(k)}")
            schema = self.fields.get(k)
            if schema is None and self.closed:
                raise error(f"{where}: unknown key {prefix}{k}")
            (schema or self.values).check(v, where, prefix + k, error)


# ------------------------------------------------------------------------------------- files

def read_json(path: PathLike, schema: Schema | None = None, *, allow_duplicates: bool = False,
              cap: int = MAX_BYTES, error: Error = ConfigError) -> Any:
    """Read and check a JSON file: regular, at most ``cap`` bytes, UTF-8, not too deep, valid
    Unicode, of ``schema`` (when given). Every failure is one line, raised as ``error``."""
    where = show_path(path)
    value = parse_json(read_bytes(path, cap=cap, error=error), where, allow_duplicates=allow_duplicates,
                       error=error)
    if schema is not None:
        schema.check(value, where, "", error)
    return value


def read_yaml(path: PathLike, schema: Schema | None = None, *, cap: int = MAX_YAML_BYTES,
              error: Error = ConfigError) -> Any:
    """As :func:`read_json`, for YAML (anchors and aliases refused, keys unique)."""
    where = show_path(path)
    value = parse_yaml(read_bytes(path, cap=cap, error=error), where, error=error)
    if schema is not None:
        schema.check(value, where, "", error)
    return value


__all__ = ["read_json", "read_yaml", "read_bytes", "parse_json", "parse_yaml", "check_tree", "show_path",
           "show_value", "Schema", "AnyValue", "Int", "Float", "Str", "Bool", "Choice", "Nullable", "List", "Map",
           "MAX_BYTES", "MAX_DEPTH", "Path"]
