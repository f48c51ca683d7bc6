"""Building one sweep candidate: an ordinary merge whose tensors computed by earlier candidates
are copied from their outputs; and the manifest (``sweep.json``, ``sweep.csv``)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import mmap
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import LayerswapError
from .evaluation import Evaluator
from .formats.checkpoint import RECIPE_NAME, Checkpoint, open_checkpoint
from .formats.layout import ReusedShard, ShardLayout
from .formats.verify import verify
from .options import WriteOptions
from .plan import MergePlan, TensorRecipe, Term
from .sweep_spec import SWAP, Candidate
from .units import parse_size
from .writing import MergeResult, open_all, plan_layout, plan_method, resolve, side_source, write_plan

#: a computed tensor's identity across candidates: its name, dtype, shape, op, numbers, and each
#: input by the file it comes from
RecipeKey = tuple[Any, ...]
MANIFEST_JSON, MANIFEST_CSV = "sweep.json", "sweep.csv"


@dataclass(frozen=True)
class Settings:
    """How every candidate of a sweep is written and evaluated."""

    link: str
    threads: int | None
    device: str
    dry_run: bool
    checksum: str | None
    evaluator: Evaluator | None
    io: str = "auto"


class OpenExperts:
    """``experts(paths)``: the checkpoints of ``paths`` (role -> path), kept open while successive
    candidates use the same ones (a grid's configurations of one pair), closed when they change."""

    def __init__(self) -> None:
        self._key: list[tuple[str, str]] | None = None
        self._opened: dict[str, Checkpoint] = {}
        self._stack = ExitStack()

    def __call__(self, paths: Mapping[str, Any]) -> dict[str, Checkpoint]:
        key = sorted((role, str(path)) for role, path in paths.items())
        if key != self._key:
            self.close()
            self._key, self._opened = key, open_all(self._stack, paths)
        return self._opened

    @property
    def inputs(self) -> tuple[tuple[str, str], ...] | None:
        """What is open now, as (role, path) pairs; None when nothing is."""
        return None if self._key is None else tuple(self._key)

    def close(self) -> None:
        self._stack.close()
        self._key, self._opened = None, {}

    def __enter__(self) -> OpenExperts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Writeback:
    """A sweep's outputs on their way to the disk, on a thread of their own.

    ``flush(directory)``: the candidate's shards are written back while the next candidates are
    built; a later candidate that clones one of them would otherwise wait for that writeback in
    its clone call. ``release(directories)``: shards that no later candidate reads (an expert
    pair's, once the sweep has moved on to the next pair) leave the page cache once written
    back, headers aside, so that a sweep's growing output does not push the experts it is still
    reading out of memory. At the end only the work under way is waited for; the kernel writes
    the rest in its own time."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="layerswap-flush")

    def flush(self, directory: Path) -> None:
        for path in sorted(directory.glob("*.safetensors")):
            self._pool.submit(_data_sync, path)

    def release(self, directories: Sequence[Path]) -> None:
        for directory in directories:
            for path in sorted(directory.glob("*.safetensors")):
                self._pool.submit(_drop_cached, path)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Writeback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _data_sync(path: Path) -> None:
    _with_file(path, os.fdatasync)


def _drop_cached(path: Path) -> None:
    """``path`` written back, then out of the page cache from the page after the one its header
    ends in (a later open reads the header) to the end. Advice: the kernel may keep some."""
    def drop(fd: int) -> None:
        os.fdatasync(fd)
        header = 8 + int.from_bytes(os.pread(fd, 8, 0), "little")
        os.posix_fadvise(fd, header - header % mmap.PAGESIZE + mmap.PAGESIZE, 0, os.POSIX_FADV_DONTNEED)
    _with_file(path, drop)


def _with_file(path: Path, work: Callable[[int], None]) -> None:
    """``work(fd)`` on ``path`` opened read-only; quietly nothing if it is gone or refuses: what
    this thread does is for speed, not durability (a later clone flushes for itself)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # replaced meanwhile (a re-run): nothing of ours to flush
    try:
        work(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def earlier_outputs() -> Iterator[Callable[[Path], Checkpoint]]:
    """``output_of(path)``: an earlier candidate's output, opened once, closed at the end."""
    with ExitStack() as stack:
        opened: dict[Path, Checkpoint] = {}

        def output_of(path: Path) -> Checkpoint:
            if path not in opened:
                opened[path] = stack.enter_context(open_checkpoint(path))
            return opened[path]

        yield output_of


def build_one(candidate: Candidate, made: dict[RecipeKey, Path], output_of: Callable[[Path], Checkpoint],
              settings: Settings, experts: OpenExperts | None = None) -> Candidate:
    """Build (and evaluate) one candidate; its failure is its own, recorded in it. ``experts``
    (:class:`OpenExperts`) keeps the experts open from one candidate to the next."""
    try:
        _build(candidate, made, output_of, settings, experts)
        if settings.evaluator is not None and not settings.dry_run:
            evaluate_candidate(candidate, settings.evaluator, candidate.path)
    except LayerswapError as e:
        candidate.status, candidate.error = "failed", str(e)
    return candidate


def recipe_keys(candidate: Candidate, device: str = "auto") -> list[RecipeKey]:
    """The keys of the tensors the candidate computes and of the shards it writes (headers only)."""
    with ExitStack() as stack:
        plan, inputs = plan_method(stack, SWAP, resolve(SWAP, candidate.options), device)
        keys = _keys(plan, inputs)
        return [*_computed(plan, keys).values(), *(k for _, k in _shard_keys(plan, inputs, keys, candidate))]


def _build(candidate: Candidate, made: dict[RecipeKey, Path], output_of: Callable[[Path], Checkpoint],
           settings: Settings, experts: OpenExperts | None) -> None:
    """Plan the candidate; unless it is complete from an earlier run, write it (or, in a dry run,
    lay it out), taking what earlier candidates computed from their outputs."""
    assert candidate.path is not None
    start = time.perf_counter()
    with ExitStack() as stack:
        values = resolve(SWAP, candidate.options)
        opened = experts(SWAP.inputs(values)) if experts is not None else None
        plan, inputs = plan_method(stack, SWAP, values, settings.device, settings.threads, opened=opened)
        keys = _keys(plan, inputs)
        computed = _computed(plan, keys)
        shards = _shard_keys(plan, inputs, keys, candidate)
        shared = sum(1 for key in computed.values() if key in made)
        recorded = SWAP.recorded(values, plan)
        candidate.recorded = {k: v for k, v in {**recorded, "shard_size": candidate.shard_size}.items()
                              if v is not None}
        complete = not settings.dry_run and _complete(candidate.path, candidate.recorded)
        if not complete:
            plan_now, sources = (plan, {}) if settings.dry_run else _share(plan, computed, shards, made, output_of)
            write = WriteOptions(candidate.shard_size, settings.threads, settings.device, force=_ours(candidate.path),
                                 dry_run=settings.dry_run, link=settings.link, io=settings.io,
                                 **({"checksum": settings.checksum} if settings.checksum else {}))
            result = write_plan(SWAP, plan_now, inputs, candidate.path, recorded, write, side_source(inputs),
                                SWAP.extra(plan), [values["base"], values["stats"]], sources=sources)
            earlier = {names for names, key in shards if key in made} if settings.dry_run else set()
            _account(candidate, result, shared, len(computed), earlier)
        for key in [*computed.values(), *(k for _, k in shards)]:
            made.setdefault(key, candidate.path)
    candidate.status = "planned" if settings.dry_run else ("complete" if complete else "built")
    candidate.seconds = time.perf_counter() - start
    if not settings.dry_run:
        candidate.checksum = hashlib.sha256((candidate.path / RECIPE_NAME).read_bytes()).hexdigest()


def evaluate_candidate(candidate: Candidate, evaluator: Evaluator, target: Any) -> None:
    """The evaluator's metrics into the candidate; whatever it raises fails this candidate only."""
    try:
        candidate.metrics = dict(evaluator(target))
    except Exception as e:  # noqa: BLE001  (a user's function: any failure is its candidate's)
        candidate.status, candidate.error = "failed", f"evaluation: {type(e).__name__}: {e}"


def _keys(plan: MergePlan, inputs: Mapping[str, Checkpoint]) -> dict[str, RecipeKey]:
    """The key of every tensor of the plan, by name."""
    source = {role: str(Path(c.path).resolve()) for role, c in inputs.items()}
    return {r.name: _key(r, source) for r in plan.tensors}


def _computed(plan: MergePlan, keys: Mapping[str, RecipeKey]) -> dict[str, RecipeKey]:
    """The keys of the tensors the plan computes (not copies), by name."""
    return {r.name: keys[r.name] for r in plan.tensors if r.op != "copy"}


def _shard_keys(plan: MergePlan, inputs: Mapping[str, Checkpoint], keys: Mapping[str, RecipeKey],
                candidate: Candidate) -> list[tuple[tuple[str, ...], RecipeKey]]:
    """Each new shard the candidate writes, as its tensors' names and a key: the keys of its
    tensors in order. Two candidates' shards with one key hold the same tensor bytes at the same
    offsets (the layout depends on the tensors alone), so one can be the other's file."""
    result = []
    assert candidate.path is not None
    for shard in plan_layout(plan, inputs, parse_size(candidate.shard_size), {}, candidate.path):
        if isinstance(shard, ShardLayout) and shard.tensors:
            names = tuple(t.recipe.name for t in shard.tensors)
            result.append((names, ("shard", *(keys[n] for n in names))))
    return result


def _key(recipe: TensorRecipe, source: Mapping[str, str]) -> RecipeKey:
    return (recipe.name, recipe.dtype, recipe.shape, recipe.op, recipe.params,
            tuple((source[t.role], t.weight) for t in recipe.terms),
            tuple((source[f.role], f.a, f.b, f.weight, f.transposed) for f in recipe.factors))


def _share(plan: MergePlan, computed: Mapping[str, RecipeKey], shards: Sequence[tuple[tuple[str, ...], RecipeKey]],
           made: Mapping[RecipeKey, Path], output_of: Callable[[Path], Checkpoint]
           ) -> tuple[MergePlan, dict[str, Checkpoint]]:
    """``plan`` with every tensor an earlier candidate computed, and every tensor of a shard an
    earlier candidate wrote, turned into a copy from that candidate's output: a shard whose every
    tensor is copied from one output is then that output's file, reused whole as an input's is."""
    source: dict[str, Path] = {}
    for names, key in shards:
        earlier = made.get(key)
        if earlier is not None and any(tuple(t.name for t in sh.tensors) == names for sh in output_of(earlier).shards):
            source.update(dict.fromkeys(names, earlier))
    for name, key in computed.items():
        if name not in source and key in made:
            source[name] = made[key]
    roles: dict[Path, str] = {}
    tensors = []
    for recipe in plan.tensors:
        earlier = source.get(recipe.name)
        if earlier is None:
            tensors.append(recipe)
            continue
        role = roles.setdefault(earlier, f"sweep.{len(roles)}")
        tensors.append(replace(recipe, op="copy", terms=(Term(role, 1.0),), params=(), factors=()))
    return replace(plan, tensors=tuple(tensors)), {role: output_of(path) for path, role in roles.items()}


def _account(candidate: Candidate, result: MergeResult, shared: int, computed: int,
             earlier: set[tuple[str, ...]]) -> None:
    """Bytes new and reused; in a dry run, a shard an earlier candidate would write (``earlier``,
    by its tensors' names) counts as reused, as the run would reuse it."""
    def reused(s: Any) -> bool:
        return isinstance(s, ReusedShard) or tuple(t.recipe.name for t in s.tensors) in earlier
    candidate.bytes_new = sum(s.file_size for s in result.shards if not reused(s))
    candidate.bytes_reused = sum(s.file_size for s in result.shards if reused(s))
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
    # one candidate per line: readable, and encoded by json's C encoder (an indented dump is
    # encoded in Python, and the manifest is rewritten after every candidate)
    _replace(root / MANIFEST_JSON, '{"candidates": [\n' + ",\n".join(map(json.dumps, rows)) + "\n]}\n")
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
