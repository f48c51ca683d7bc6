"""Sweeps: many layer swaps of many expert pairs, each candidate written once, shared work done once.

A spec (YAML) lists task experts and language experts (a cross product, or explicit ``pairs``; an
entry that is a list is a soup, as in ``merge``) and a ``grid`` of swap options. Every candidate is
an ordinary merge into its own directory under the sweep's, with its own recipe; what makes the
sweep cheaper than separate merges is that a tensor computed for one candidate (same inputs, same
weights, same op and dtype) is never computed again: a later candidate copies it from the earlier
output (a kernel-side copy, or a shard-level reflink or hard link per ``link``), and input shards
that a candidate leaves whole are reused as ``merge --link`` does. A re-run skips every candidate
that is already complete and verifies. ``sweep.json`` and ``sweep.csv`` list the candidates.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError, LayerswapError
from .evaluation import Evaluator, load_evaluator
from .formats.adapter import is_adapter
from .formats.checkpoint import RECIPE_NAME, Checkpoint, open_checkpoint
from .formats.model_card import local_name
from .formats.layout import ReusedShard
from .formats.verify import verify
from .methods import METHODS
from .methods.method import as_list
from .options import WriteOptions
from .plan import MergePlan, TensorRecipe, Term
from .safe_read import List, Map, Nullable, Str, read_yaml
from .writing import MergeResult, plan_method, resolve, side_source, write_plan

PathLike = str | os.PathLike[str]
SWAP = METHODS["layer_swap"]
#: the swap options a grid may vary (the experts are the spec's, the base and statistics fixed)
GRID_KEYS = ("bottom", "top", "lower_transition", "upper_transition", "transition_weights", "non_layer",
             "soup_weights", "dtype")
SPEC_SCHEMA = Map({"task_experts": List(min_len=1), "language_experts": List(min_len=1),
                   "pairs": Nullable(List(List(min_len=2), min_len=1)), "base": Nullable(Str()),
                   "stats": Nullable(Str()), "shard_size": Nullable(Str()), "grid": Nullable(Map())},
                  closed=True)
MANIFEST_JSON, MANIFEST_CSV = "sweep.json", "sweep.csv"


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
        for i, entry in enumerate(spec[key]):
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


# ------------------------------------------------------------------------------- running

#: a computed tensor's identity across candidates: its name, dtype, shape, op, numbers, and each
#: input by the file it comes from
RecipeKey = tuple[Any, ...]
Report = Callable[[Candidate], None]


def sweep(spec: PathLike | Mapping[str, Any], out: PathLike, *, link: str = "auto", threads: int | None = None,
          device: str = "auto", dry_run: bool = False, checksum: str | None = None,
          evaluate: str | Evaluator | None = None, in_memory: bool = False,
          report: Report | None = None) -> list[Candidate]:
    """Build every candidate of ``spec`` (a spec file, or its parsed content) under ``out``; see
    the module's text. ``evaluate`` (a function, or ``module:function`` / ``perplexity:FILE``) is
    called with each candidate's directory, or with ``in_memory`` with a model that a
    :class:`SwapSession` keeps equal to the candidate (nothing but the manifest is written); its
    dict goes into the candidate's ``metrics``. A candidate that fails is reported (status
    ``failed``, its error) and the others go on. Returns the candidates as ``sweep.json`` lists them."""
    found = read_spec(spec) if isinstance(spec, (str, os.PathLike)) else candidates(spec)
    evaluator = load_evaluator(evaluate) if isinstance(evaluate, str) else evaluate
    root = Path(out)
    if in_memory:
        if evaluator is None:
            raise ConfigError("an in-memory sweep writes no candidates: it needs an evaluator")
        return _in_memory(found, root, evaluator, threads, device, report)
    made: dict[RecipeKey, Path] = {}
    with ExitStack() as earlier:
        opened: dict[Path, Checkpoint] = {}

        def output_of(path: Path) -> Checkpoint:
            if path not in opened:
                opened[path] = earlier.enter_context(open_checkpoint(path))
            return opened[path]

        for candidate in found:
            candidate.path = root / candidate.name
            try:
                _build(candidate, made, output_of, link, threads, device, dry_run, checksum)
                if evaluator is not None and not dry_run:
                    _evaluate(candidate, evaluator, candidate.path)
            except LayerswapError as e:
                candidate.status, candidate.error = "failed", str(e)
            if not dry_run:
                write_manifest(root, found)
            if report is not None:
                report(candidate)
    return found


def _build(candidate: Candidate, made: dict[RecipeKey, Path], output_of: Callable[[Path], Checkpoint], link: str,
           threads: int | None, device: str, dry_run: bool, checksum: str | None) -> None:
    """Plan the candidate; unless it is complete from an earlier run, write it (or, in a dry run,
    lay it out), taking what earlier candidates computed from their outputs."""
    assert candidate.path is not None
    start = time.perf_counter()
    with ExitStack() as stack:
        values = resolve(SWAP, candidate.options)
        plan, inputs = plan_method(stack, SWAP, values, device, threads)
        keys = {r.name: _key(r, inputs) for r in plan.tensors if r.op != "copy"}
        shared = sum(1 for key in keys.values() if key in made)
        recorded = SWAP.recorded(values, plan)
        candidate.recorded = {k: v for k, v in {**recorded, "shard_size": candidate.shard_size}.items()
                              if v is not None}
        complete = not dry_run and _complete(candidate.path, candidate.recorded)
        if not complete:
            plan_now, sources = (plan, {}) if dry_run else _share(plan, keys, made, output_of)
            settings = WriteOptions(candidate.shard_size, threads, device, force=_ours(candidate.path),
                                    dry_run=dry_run, link=link, **({"checksum": checksum} if checksum else {}))
            result = write_plan(SWAP, plan_now, {**inputs, **sources}, candidate.path, recorded, settings,
                                side_source(inputs), SWAP.extra(plan), [values["base"], values["stats"]])
            _account(candidate, result, shared, len(keys))
        for key in keys.values():
            made.setdefault(key, candidate.path)
    candidate.status = "planned" if dry_run else ("complete" if complete else "built")
    candidate.seconds = time.perf_counter() - start
    if not dry_run:
        candidate.checksum = hashlib.sha256((candidate.path / RECIPE_NAME).read_bytes()).hexdigest()


def _evaluate(candidate: Candidate, evaluator: Evaluator, target: Any) -> None:
    """The evaluator's metrics into the candidate; whatever it raises fails this candidate only."""
    try:
        candidate.metrics = dict(evaluator(target))
    except Exception as e:  # noqa: BLE001  (a user's function: any failure is its candidate's)
        candidate.status, candidate.error = "failed", f"evaluation: {type(e).__name__}: {e}"


def _in_memory(found: list[Candidate], root: Path, evaluator: Evaluator, threads: int | None, device: str,
               report: Report | None) -> list[Candidate]:
    """Each candidate applied to one loaded model by a session per expert pair, then evaluated."""
    from .session import SwapSession
    model, session, pair = None, None, None
    for candidate in found:
        start = time.perf_counter()
        o = candidate.options
        try:
            if (o["task_expert"], o["language_expert"]) != pair:
                pair = (o["task_expert"], o["language_expert"])
                model = model or _load_model(o)
                session = SwapSession(*pair, model, dtype=o["dtype"], soup_weights=o["soup_weights"], base=o["base"],
                                      stats=o["stats"], compute=device, threads=threads)
            assert session is not None
            changed = session.apply({k: o[k] for k in _SESSION_KEYS})
            candidate.status, candidate.shared = "evaluated", 0
            candidate.computed = len(changed.changed)
            _evaluate(candidate, evaluator, model)
        except LayerswapError as e:
            candidate.status, candidate.error = "failed", str(e)
        candidate.seconds = time.perf_counter() - start
        write_manifest(root, found)
        if report is not None:
            report(candidate)
    return found


_SESSION_KEYS = ("bottom", "top", "lower_transition", "upper_transition", "transition_weights", "non_layer")


def _load_model(options: Mapping[str, Any]) -> Any:
    """The model an in-memory sweep updates: loaded once from the first task expert (or, for an
    adapter, its base)."""
    import torch
    from transformers import AutoModelForCausalLM

    first = as_list(options["task_expert"])[0]
    source = options["base"] if is_adapter(first) else first
    # float32 holds every merge dtype exactly, and evaluates as a written candidate loaded in float32
    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()


def _key(recipe: TensorRecipe, inputs: Mapping[str, Checkpoint]) -> RecipeKey:
    source = {role: str(Path(c.path).resolve()) for role, c in inputs.items()}
    return (recipe.name, recipe.dtype, recipe.shape, recipe.op, recipe.params,
            tuple((source[t.role], t.weight) for t in recipe.terms),
            tuple((source[f.role], f.a, f.b, f.weight, f.transposed) for f in recipe.factors))


def _share(plan: MergePlan, keys: Mapping[str, RecipeKey], made: Mapping[RecipeKey, Path],
           output_of: Callable[[Path], Checkpoint]) -> tuple[MergePlan, dict[str, Checkpoint]]:
    """``plan`` with every tensor an earlier candidate computed turned into a copy from its output."""
    roles: dict[Path, str] = {}
    tensors = []
    for recipe in plan.tensors:
        earlier = made.get(keys[recipe.name]) if recipe.name in keys else None
        if earlier is None:
            tensors.append(recipe)
            continue
        role = roles.setdefault(earlier, f"sweep.{len(roles)}")
        tensors.append(replace(recipe, op="copy", terms=(Term(role, 1.0),), params=(), factors=()))
    return replace(plan, tensors=tuple(tensors)), {role: output_of(path) for path, role in roles.items()}


def _account(candidate: Candidate, result: MergeResult, shared: int, computed: int) -> None:
    candidate.bytes_new = sum(s.file_size for s in result.shards if not isinstance(s, ReusedShard))
    candidate.bytes_reused = sum(s.file_size for s in result.shards if isinstance(s, ReusedShard))
    candidate.shared, candidate.computed = shared, computed - shared


def _complete(path: Path, options: Mapping[str, Any]) -> bool:
    """Whether a candidate's directory is there from an earlier run, made with these options,
    and verifies."""
    try:
        recipe = json.loads((path / RECIPE_NAME).read_text(encoding="utf-8"))
        if not isinstance(recipe, dict) or recipe.get("options") != json.loads(json.dumps(options)):
            return False
        verify(path)
    except (OSError, ValueError, LayerswapError):
        return False
    return True


def _ours(path: Path) -> bool:
    """An existing candidate directory that an earlier run wrote (it has a recipe) may be replaced;
    anything else in its place is left for the output check to refuse."""
    return (path / RECIPE_NAME).is_file()


# ------------------------------------------------------------------------------- the manifest

CSV_COLUMNS = ("name", "status", "path", "bytes_new", "bytes_reused", "seconds", "tensors_computed",
               "tensors_shared", "checksum", "error")


def write_manifest(root: Path, found: Sequence[Candidate]) -> None:
    """``sweep.json`` (every candidate with its options and metrics) and ``sweep.csv`` (one row
    each, options and metrics flattened), each replaced atomically."""
    root.mkdir(parents=True, exist_ok=True)
    rows = [c.row() for c in found]
    _replace(root / MANIFEST_JSON, json.dumps({"candidates": rows}, indent=2) + "\n")
    option_keys = sorted({k for r in rows for k in r["options"]})
    metric_keys = sorted({k for r in rows for k in r["metrics"]})
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow([*CSV_COLUMNS, *option_keys, *metric_keys])
    for r in rows:
        writer.writerow([r[c] for c in CSV_COLUMNS] + [_cell(r["options"].get(k)) for k in option_keys]
                        + [_cell(r["metrics"].get(k)) for k in metric_keys])
    _replace(root / MANIFEST_CSV, text.getvalue())


def _cell(value: Any) -> Any:
    return "+".join(map(str, value)) if isinstance(value, list) else value


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
