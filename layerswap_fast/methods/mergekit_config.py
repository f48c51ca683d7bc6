"""mergekit 0.1.5's YAML merge configuration: its schema, checked, and its parameter rules.

A config names models (``models:``, every layer of each) or output slices (``slices:``, each a
list of sources with a ``layer_range``), a ``merge_method``, a ``base_model`` (global or per
slice), ``parameters`` (at the top, per slice, per model), ``dtype``, ``out_dtype``,
``tokenizer_source`` and ``chat_template``. A key we do not support is refused by name, never
ignored. Parameter values resolve as mergekit resolves them (:func:`evaluate`): a scalar; a
list of numbers, a gradient interpolated at ``t``; a ``{filter, value}`` or a list of them, the
first whose ``filter`` is a substring of the tensor's name winning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..safe_read import Int, List, Map, Nullable, Schema, Str, parse_yaml, show_value

Scalar = bool | int | float | str
DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (bool, int, str)) or (isinstance(v, float) and math.isfinite(v))


class _Setting(Schema):
    """A parameter's setting: a scalar, a list of scalars (a gradient), ``{value, filter}`` or a
    list of those."""

    expected = "a number, true/false, text, a list of them, or {filter, value} entries"
    conditional = Map({"value": Nullable(Schema()), "filter": Nullable(Str())}, required=("value",), closed=True)

    def accepts(self, value: Any) -> bool:
        return _is_scalar(value) or isinstance(value, (list, dict))

    def check_inside(self, value: Any, where: str, key: str, error: type) -> None:
        if _is_scalar(value) or (isinstance(value, list) and all(_is_scalar(v) for v in value)):
            return
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            at = f"{key}[{i}]" if isinstance(value, list) else key
            if not isinstance(item, dict):
                self.fail(item, where, at, error)
            self.conditional.check(item, where, at, error)
            inner = item["value"]
            if not (_is_scalar(inner) or (isinstance(inner, list) and all(_is_scalar(v) for v in inner))):
                self.fail(inner, where, at + ".value", error, "a scalar or a list of scalars")


PARAMETERS = Nullable(Map(values=_Setting()))
MODEL = Map({"model": Str(), "parameters": PARAMETERS}, required=("model",), closed=True)
SOURCE = Map({"model": Str(), "layer_range": List(Int(0), 2), "parameters": PARAMETERS},
             required=("model", "layer_range"), closed=True)
SLICE = Map({"sources": List(SOURCE, 1), "base_model": Nullable(Str()), "parameters": PARAMETERS},
            required=("sources",), closed=True)
#: keys of mergekit's schema we refuse, and why
REFUSED = {
    "modules": "multi-module configs (modules:) are not supported; use models: or slices:",
    "tokenizer": "tokenizer: (token surgery, added tokens) is not supported; use tokenizer_source: base or a model",
    "residual_weight": "residual_weight is not supported",
}
CONFIG = Map({
    "merge_method": Str(), "models": Nullable(List(MODEL, 1)), "slices": Nullable(List(SLICE, 1)),
    "base_model": Nullable(Str()), "dtype": Nullable(Str()), "out_dtype": Nullable(Str()),
    "parameters": PARAMETERS, "tokenizer_source": Nullable(Str()), "chat_template": Nullable(Str()),
}, required=("merge_method",))


@dataclass(frozen=True)
class Source:
    """One input of an output slice: a model, its layers ``[start, end)`` (None: all of them)
    and its own parameters."""

    model: str
    layer_range: tuple[int, int] | None
    parameters: Mapping[str, Any]


@dataclass(frozen=True)
class OutputSlice:
    sources: tuple[Source, ...]
    base_model: str | None
    parameters: Mapping[str, Any]


@dataclass(frozen=True)
class MergekitConfig:
    """A checked config. ``slices`` is None for the ``models:`` form (one slice of every layer,
    the base appended as a source when it is not among the models, as mergekit does)."""

    merge_method: str
    models: tuple[Source, ...] | None
    slices: tuple[OutputSlice, ...] | None
    base_model: str | None
    dtype: str | None
    out_dtype: str | None
    parameters: Mapping[str, Any]
    tokenizer_source: str | None
    chat_template: str | None

    def referenced(self) -> list[str]:
        """Every model the config names, base first, then in order of appearance."""
        names = [self.base_model] if self.base_model else []
        for s in self.models or ():
            names.append(s.model)
        for out in self.slices or ():
            names += [*([out.base_model] if out.base_model else []), *(s.model for s in out.sources)]
        return list(dict.fromkeys(names))


def parse_config(text: str, where: str = "mergekit config") -> MergekitConfig:
    """The config in ``text`` (YAML), checked: one line ``ConfigError`` for anything wrong."""
    raw = parse_yaml(text, where)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping, got {show_value(raw)}")
    _refuse(raw, where)
    CONFIG.check(raw, where)
    unknown = sorted(set(raw) - set(CONFIG.fields))
    if unknown:
        raise ConfigError(f"{where}: unsupported key {unknown[0]}")
    if (raw.get("models") is None) == (raw.get("slices") is None):
        raise ConfigError(f"{where}: give exactly one of models: or slices:")
    for key in ("dtype", "out_dtype"):
        if raw.get(key) is not None and _dtype(raw[key]) is None:
            raise ConfigError(f"{where}: {key} must be one of {', '.join(DTYPES)}, got {show_value(raw[key])}")
    source = raw.get("tokenizer_source")
    if source == "union":
        raise ConfigError(f"{where}: tokenizer_source: union (a merged vocabulary) is not supported; use base "
                          f"or a model")
    models = None if raw.get("models") is None else tuple(
        Source(_model(m["model"], where), None, m.get("parameters") or {}) for m in raw["models"])
    slices = None if raw.get("slices") is None else tuple(_slice(s, where) for s in raw["slices"])
    return MergekitConfig(raw["merge_method"], models, slices, _optional_model(raw.get("base_model"), where),
                          _dtype(raw.get("dtype")), _dtype(raw.get("out_dtype")), raw.get("parameters") or {},
                          source, raw.get("chat_template"))


def _refuse(raw: Mapping[str, Any], where: str) -> None:
    for key, why in REFUSED.items():
        if key in raw:
            raise ConfigError(f"{where}: {key}: {why}")
    for out in raw.get("slices") or ():
        if isinstance(out, dict) and "residual_weight" in out:
            raise ConfigError(f"{where}: residual_weight: {REFUSED['residual_weight']}")


def _dtype(name: str | None) -> str | None:
    if name is None:
        return None
    return DTYPES.get(name.removeprefix("torch."))


def _model(name: str, where: str) -> str:
    if "+" in name:
        raise ConfigError(f"{where}: model {show_value(name)}: a LoRA applied with '+' is not supported")
    return name


def _optional_model(name: str | None, where: str) -> str | None:
    return None if name is None else _model(name, where)


def _slice(raw: Mapping[str, Any], where: str) -> OutputSlice:
    sources = []
    for s in raw["sources"]:
        start, end = s["layer_range"]
        if end < start:  # an empty range ([0, 0]) is mergekit's way to name the embeddings' sources
            raise ConfigError(f"{where}: layer_range {[start, end]} of {show_value(s['model'])} ends before it starts")
        sources.append(Source(_model(s["model"], where), (start, end), s.get("parameters") or {}))
    lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}  # type: ignore[index]
    if len(lengths) > 1:
        raise ConfigError(f"{where}: all sources of a slice must have the same number of layers, got "
                          f"{sorted(lengths)}")
    return OutputSlice(tuple(sources), _optional_model(raw.get("base_model"), where), raw.get("parameters") or {})


# ----------------------------------------------------------------------------- parameter values

@dataclass(frozen=True)
class Param:
    """A parameter of a mergekit method: ``scope`` is ``shared`` (one per tensor, resolved with
    the output's name), ``input`` (per model) or ``non_base`` (per model but the base)."""

    name: str
    kind: type
    scope: str
    default: Any = None
    required: bool = False

    def validate(self, value: Any, where: str) -> Any:
        try:
            if self.kind is bool:
                if isinstance(value, bool):
                    return value
                raise ValueError
            if isinstance(value, bool):
                raise ValueError
            result = float(value)
            if not math.isfinite(result):
                raise ValueError
            return result
        except (TypeError, ValueError):
            noun = "true or false" if self.kind is bool else "a finite number"
            raise ConfigError(f"parameter {self.name} must be {noun}, got {show_value(value)} ({where})") from None


def evaluate(param: Param, setting: Any, tensor: str, t: float) -> Any:
    """One setting's value for ``tensor`` at gradient position ``t`` (None: no filter matched)."""
    if isinstance(setting, dict):
        setting = [setting]
    if _is_scalar(setting):
        return param.validate(setting, tensor)
    if not setting:
        return None
    if all(_is_scalar(e) for e in setting):
        values = [param.validate(e, tensor) for e in setting]
        if param.kind is bool:
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return param.validate((1 - frac) * values[i0] + frac * values[i1], tensor)
    for cond in setting:
        if cond.get("filter") in (None, "*") or (tensor and cond["filter"] in tensor):
            return evaluate(param, cond["value"], tensor, t)
    return None


def resolve(param: Param, scopes: Sequence[Mapping[str, Any]], tensor: str, t: float) -> Any:
    """The first scope (highest precedence first) whose setting gives a value, else the default."""
    for scope in scopes:
        if param.name in scope:
            value = evaluate(param, scope[param.name], tensor, t)
            if value is not None:
                return value
    if param.required:
        raise ConfigError(f"missing required parameter {param.name} for {tensor}")
    return param.default
