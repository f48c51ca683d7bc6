"""A sweep's spec and its candidates: task experts × language experts (or explicit pairs) × a
grid of swap options, each candidate a merge's options and a directory name made from them."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .formats.model_card import local_name
from .methods import METHODS
from .methods.method import as_list
from .safe_read import List, Map, Nullable, Str, read_yaml

PathLike = str | os.PathLike[str]
SWAP = METHODS["layer_swap"]
#: the swap options a grid may vary (the experts are the spec's, the base and statistics fixed)
GRID_KEYS = ("bottom", "top", "lower_transition", "upper_transition", "transition_weights", "non_layer",
             "soup_weights", "dtype")
SPEC_SCHEMA = Map({"task_experts": List(min_len=1), "language_experts": List(min_len=1),
                   "pairs": Nullable(List(List(min_len=2), min_len=1)), "base": Nullable(Str()),
                   "stats": Nullable(Str()), "shard_size": Nullable(Str()), "grid": Nullable(Map())},
                  closed=True)


@dataclass
class Candidate:
    """One merge of the sweep: its directory name and its options (a ``merge`` recipe's)."""

    name: str
    options: dict[str, Any]
    shard_size: str = "5GB"
    path: Path | None = None
    status: str = "planned"  # built | complete | failed | planned
    bytes_new: int = 0
    bytes_reused: int = 0
    seconds: float = 0.0
    computed: int = 0
    shared: int = 0
    checksum: str | None = None
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    #: the options as the candidate's recipe records them, once planned
    recorded: dict[str, Any] | None = None

    def row(self) -> dict[str, Any]:
        options = self.recorded or {**{k: v for k, v in self.options.items() if v is not None},
                                    "shard_size": self.shard_size}
        return {"name": self.name, "options": options, "path": str(self.path) if self.path else None,
                "status": self.status, "bytes_new": self.bytes_new, "bytes_reused": self.bytes_reused,
                "seconds": round(self.seconds, 4), "tensors_computed": self.computed,
                "tensors_shared": self.shared, "checksum": self.checksum, "error": self.error,
                "metrics": self.metrics}


def read_spec(path: PathLike) -> list[Candidate]:
    """The candidates of a spec file, in order: pairs first, then the grid (last key fastest)."""
    spec = read_yaml(path, SPEC_SCHEMA)
    return candidates(spec, str(path))


def candidates(spec: Mapping[str, Any], where: str = "the sweep spec") -> list[Candidate]:
    """The candidates of a parsed spec."""
    pairs = _pairs(spec, where)
    grid = _grid(spec.get("grid") or {}, where)
    fixed = {"base": spec.get("base"), "stats": spec.get("stats")}
    found, names = [], set()
    for (task, language), values in itertools.product(pairs, itertools.product(*grid.values())):
        chosen = dict(zip(grid, values))
        options = SWAP.resolve({"task_expert": task, "language_expert": language, **fixed, **chosen})
        name = _unique(_name(task, language, chosen, grid), names)
        found.append(Candidate(name, options, shard_size=spec.get("shard_size") or "5GB"))
    return found


def _pairs(spec: Mapping[str, Any], where: str) -> list[tuple[Any, Any]]:
    for key in ("task_experts", "language_experts"):
        if spec.get(key) is None and spec.get("pairs") is None:
            raise ConfigError(f"{where}: {key} is missing (list the experts, or give explicit pairs)")
        for i, entry in enumerate(spec.get(key) or ()):
            _check_expert(entry, f"{where}: {key}[{i}]")
    if spec.get("pairs") is None:
        return list(itertools.product(spec["task_experts"], spec["language_experts"]))
    pairs = []
    for i, pair in enumerate(spec["pairs"]):
        if len(pair) != 2:
            raise ConfigError(f"{where}: pairs[{i}] must be [task expert, language expert]")
        for entry in pair:
            _check_expert(entry, f"{where}: pairs[{i}]")
        pairs.append((pair[0], pair[1]))
    return pairs


def _check_expert(entry: Any, where: str) -> None:
    """An expert is a path (or hub id), or a non-empty list of them: a soup."""
    ok = isinstance(entry, str) or (isinstance(entry, list) and entry and all(isinstance(p, str) for p in entry))
    if not ok:
        raise ConfigError(f"{where} must be a path or a list of paths")


def _grid(grid: Mapping[str, Any], where: str) -> dict[str, list[Any]]:
    """Each grid key's values (a scalar is a list of one), each checked as ``merge`` checks it."""
    options = {o.name: o for o in SWAP.options}
    result = {}
    for key, values in grid.items():
        if key not in GRID_KEYS:
            raise ConfigError(f"{where}: grid.{key} is no swap option a sweep can vary "
                              f"(choose from {', '.join(GRID_KEYS)})")
        values = values if isinstance(values, list) else [values]
        if not values:
            raise ConfigError(f"{where}: grid.{key} is empty")
        for i, value in enumerate(values):
            options[key].schema().check(value, where, f"grid.{key}[{i}]")
        result[key] = values
    return result


def _name(task: Any, language: Any, chosen: Mapping[str, Any], grid: Mapping[str, list[Any]]) -> str:
    """``task__language__bottom-4_top-1``: the experts by directory name, then the grid's values
    where the grid varies them."""
    parts = [_expert_name(task), _expert_name(language)]
    varied = "_".join(f"{k}-{chosen[k]}" for k in grid if len(grid[k]) > 1)
    name = "__".join(parts + ([varied] if varied else []))
    return re.sub(r"[^A-Za-z0-9._+=-]", "-", name)


def _expert_name(entry: Any) -> str:
    return "+".join(local_name(p) if os.path.exists(p) else str(p).replace("/", "-") for p in as_list(entry))


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    taken.add(candidate)
    return candidate
