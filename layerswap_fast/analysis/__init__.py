"""Where did fine-tuning move the weights? Row-MAV statistics of experts against their base.

For every 1-D or 2-D parameter ``W`` (a tensor of more dimensions counts as ``shape[0]`` rows of
``prod(shape[1:])`` columns) and every expert, the **row MAV** is the mean absolute value of
``expert - base`` over each row; a 1-D parameter is one row (Section 3.2 of Bandarkar et al.,
arXiv 2410.01335). Per expert and tensor we keep the number of rows, the mean and the maximum of
its row MAVs; per expert the **average MAV**, the mean of the row MAVs over all rows of all
parameters (``sum over tensors of sum-of-row-MAVs / sum of rows``). The paper's
magnitude-adjusted average weights each expert by ``1 / average MAV``, normalised to sum 1
(:meth:`DeltaStats.magnitude_weights`).

The analysis is one streaming pass: per tensor, one ``row_mav_file`` call reads the base once and
every expert once, in chunks (the C++ core, or the GPU backend), so memory does not grow with the
model. Everything is validated before any data is read or anything written: every expert has the
base's tensor names and shapes and layer count. 0-element tensors and tensors of non-float dtypes
are skipped and listed in :attr:`DeltaStats.skipped`.

Output directory (:func:`analyze` with ``out_dir``; built beside it and renamed into place, so it
appears complete or not at all): ``mav.csv`` (``expert,tensor,layer,kind,rows,mean_row_mav,
max_row_mav``, one line per expert and tensor, the layer empty for non-layer tensors),
``summary.json`` (inputs with paths and fingerprints, average MAVs, magnitude weights, skipped
tensors, checksums of the other files), ``heatmap.png`` (the paper's Figure 2, see
:mod:`layerswap_fast.heatmap`) and, with ``rows=True``, ``rows/<expert>/<tensor>.npy`` (float64
row MAVs). :func:`load_stats` reads it back and checks that it is complete.

Suggesting a swap (:func:`suggest_swap`)
----------------------------------------

The rule reads the heatmap row by row. A layer's *delta profile* for one expert is the average,
over the seven Figure-2 parameter kinds (q, k, v, o, gate, up, down), of the kind's mean row MAV
in that layer; dividing by the expert's average profile over all layers makes it scale-free
(1.0 = a typical layer of that expert), so an expert trained harder does not win by scale alone.
A layer is *language-dominated* when the language expert's relative profile is at least 1.2
(the layer stands out within the language expert) and above the task expert's relative profile.
``bottom`` is the run of language-dominated layers starting at layer 0, ``top`` the run ending at
the last layer; each non-empty block gets a one-layer transition zone where there is room, and
the blocks are shrunk (the larger first) so that the task expert keeps at least half the layers
unblended in the middle.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shlex
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from .. import _core
from .._core import __version__
from ..formats.writeback import hash_file
from ..formats.checkpoint import Checkpoint, open_checkpoint
from ..dtypes import FLOAT_DTYPES
from ..errors import CheckpointError, ConfigError, LayerswapError, MismatchError
from ..plan.layers import FIGURE_KINDS, MAX_LAYERS, classify, count_layers
from ..safe_read import Bool, Float, Int, List, Map, Nullable, Str, read_json, show_path, show_value
from ..engine.backends import DEVICES, make_backend
from ..formats.output import guarded_paths
from ..formats.output import check_output, output_location, publish, staging_directory

PathLike = str | os.PathLike[str]
Progress = Callable[[int, int], None]  # (bytes just read, total bytes to read)

CSV_COLUMNS = ("expert", "tensor", "layer", "kind", "rows", "mean_row_mav", "max_row_mav")
MAV_CSV = "mav.csv"
SUMMARY_JSON = "summary.json"
HEATMAP_PNG = "heatmap.png"
ROWS_DIR = "rows"
FORMAT = "layerswap-fast delta stats"
FORMAT_VERSION = 1
#: a layer "stands out" in an expert when its delta profile is this many times the expert's mean
STANDOUT = 1.2


# ----------------------------------------------------------------------------------------------
# the statistics

@dataclass(frozen=True)
class TensorStat:
    """One expert's row-MAV summary of one tensor."""

    tensor: str
    layer: int | None
    kind: str
    rows: int
    mean_row_mav: float
    max_row_mav: float

    @property
    def sum_row_mav(self) -> float:
        return self.mean_row_mav * self.rows


@dataclass(frozen=True)
class InputRef:
    """Where a checkpoint was and how to recognise it again: the header fingerprint (identical for
    checkpoints saved from the same architecture) and a hash of bytes sampled from its data."""

    path: str | None = None
    fingerprint: str | None = None
    sample: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "fingerprint": self.fingerprint, "content_sample": self.sample}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> InputRef:
        return cls(d.get("path"), d.get("fingerprint"), d.get("content_sample"))


@dataclass
class ExpertStats:
    """Every analysed tensor of one expert, in the base's file order."""

    name: str
    tensors: list[TensorStat]
    source: InputRef = field(default_factory=InputRef)

    @property
    def total_rows(self) -> int:
        return sum(t.rows for t in self.tensors)

    @property
    def average_mav(self) -> float:
        """Mean of the row MAVs over all rows of all analysed parameters (NaN without rows)."""
        rows = self.total_rows
        return math.fsum(t.sum_row_mav for t in self.tensors) / rows if rows else math.nan


@dataclass
class DeltaStats:
    """Row-MAV statistics of one or more experts against a base. See the module docstring."""

    experts: dict[str, ExpertStats]
    num_layers: int
    base: InputRef = field(default_factory=InputRef)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    bytes_read: int = 0
    out_dir: Path | None = None
    rows_saved: bool = False
    _rows: dict[tuple[str, str], np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def names(self) -> list[str]:
        return list(self.experts)

    def expert(self, name: str) -> ExpertStats:
        try:
            return self.experts[name]
        except KeyError:
            raise ConfigError(f"no expert named {name!r} in these statistics "
                              f"(they have {', '.join(map(repr, self.experts))})") from None

    def average_mav(self, name: str) -> float:
        return self.expert(name).average_mav

    def average_mavs(self) -> dict[str, float]:
        return {n: e.average_mav for n, e in self.experts.items()}

    def magnitude_weights(self, names: Sequence[str] | None = None) -> dict[str, float]:
        """Each expert (all, or ``names``) weighted by 1 / its average MAV, normalised to sum 1
        (the paper's magnitude-adjusted average). ConfigError when an expert equals the base."""
        names = list(self.experts) if names is None else list(names)
        avgs = {n: self.average_mav(n) for n in names}
        for n, a in avgs.items():
            if not (a > 0 and math.isfinite(a)):
                raise ConfigError(f"expert {n!r} has average MAV {a} against the base "
                                  f"(identical to it, or no rows): magnitude weights are undefined")
        inv = {n: 1.0 / a for n, a in avgs.items()}
        total = math.fsum(inv.values())
        return {n: v / total for n, v in inv.items()}

    def kind_matrix(self, name: str, kinds: Sequence[str] = FIGURE_KINDS) -> np.ndarray:
        """(num_layers, len(kinds)) mean row MAV per layer and kind, the heatmap's cells; several
        tensors of one kind in a layer (e.g. Mixtral's experts) are averaged; NaN where absent."""
        col = {k: j for j, k in enumerate(kinds)}
        total = np.zeros((self.num_layers, len(kinds)))
        count = np.zeros((self.num_layers, len(kinds)))
        for t in self.expert(name).tensors:
            if t.layer is not None and t.kind in col and 0 <= t.layer < self.num_layers:
                total[t.layer, col[t.kind]] += t.mean_row_mav
                count[t.layer, col[t.kind]] += 1
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    def layer_profile(self, name: str) -> np.ndarray:
        """(num_layers,) per layer: the mean over the Figure-2 kinds present of the heatmap cells;
        for layers without any of those kinds (fused projections), the mean of the layer's
        non-norm tensors' mean row MAVs (of all its tensors if it has only norms)."""
        matrix = self.kind_matrix(name)
        profile = np.full(self.num_layers, np.nan)
        present = ~np.isnan(matrix)
        for layer in range(self.num_layers):
            if present[layer].any():
                profile[layer] = matrix[layer, present[layer]].mean()
        missing = np.flatnonzero(np.isnan(profile))
        if missing.size:
            by_layer: dict[int, list[TensorStat]] = {}
            for t in self.expert(name).tensors:
                if t.layer is not None:
                    by_layer.setdefault(t.layer, []).append(t)
            for layer in missing:
                ts = by_layer.get(int(layer), [])
                chosen = [t for t in ts if t.kind != "norm"] or ts
                if chosen:
                    profile[layer] = float(np.mean([t.mean_row_mav for t in chosen]))
        return profile

    def row_mavs(self, expert: str, tensor: str) -> np.ndarray:
        """The row MAVs of one tensor (only when the analysis ran with ``rows=True``)."""
        self.expert(expert)
        key = (expert, tensor)
        if key in self._rows:
            return self._rows[key]
        if self.rows_saved and self.out_dir is not None:
            path = self.out_dir / ROWS_DIR / expert / _rows_filename(tensor)
            if path.is_file():
                return np.load(path)
        raise KeyError(f"no row MAVs of {tensor!r} for expert {expert!r} (analyze with rows=True)")

    def summary_json(self) -> dict[str, Any]:
        try:
            weights: dict[str, float] | None = self.magnitude_weights()
        except ConfigError:
            weights = None
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tool": "layerswap-fast",
            "version": __version__,
            "num_layers": self.num_layers,
            "base": self.base.to_json(),
            "experts": [
                {"name": e.name, **e.source.to_json(), "average_mav": _json_float(e.average_mav),
                 "total_rows": e.total_rows, "tensors": len(e.tensors),
                 "magnitude_weight": None if weights is None else weights[e.name]}
                for e in self.experts.values()],
            "magnitude_weights": weights,
            "skipped": [{"tensor": t, "reason": r} for t, r in self.skipped],
            "rows": self.rows_saved,
            "seconds": round(self.seconds, 3),
            "bytes_read": self.bytes_read,
        }


def _json_float(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _rows_filename(tensor: str) -> str:
    return quote(tensor, safe="._-") + ".npy"


# ----------------------------------------------------------------------------------------------
# inputs

def _ref(ckpt: Checkpoint) -> InputRef:
    return InputRef(str(Path(ckpt.path).resolve()), ckpt.fingerprint(), ckpt.content_sample())


def _default_name(path: Path) -> str:
    p = Path(os.path.abspath(path))
    if p.is_file() or p.suffix == ".safetensors":
        p = p.parent
    # a Hugging Face cache snapshot (models--org--name/snapshots/<hash>): the model's name
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        return p.parent.parent.name.split("--")[-1] or "expert"
    return p.name or "expert"


def check_expert_name(name: object, error: type[LayerswapError] = ConfigError, where: str = "") -> None:
    """An expert's name becomes a path component (``rows/NAME/``): one component, no line break."""
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\0\n\r"):
        raise error(f"{where + ': ' if where else ''}expert name {name!r} must be non-empty, without path "
                    f"separators or line breaks")


def expert_names(experts: Sequence[PathLike] | Mapping[str, PathLike]) -> list[tuple[str, Path]]:
    """(name, path) per expert: the mapping's keys, else the directory names made unique
    (``task``, ``task-2``, ...)."""
    if isinstance(experts, (str, os.PathLike)):
        experts = [experts]
    if isinstance(experts, Mapping):
        out = []
        for name, path in experts.items():
            check_expert_name(name)
            out.append((name, Path(path)))
        return out
    paths = [Path(p) for p in experts]
    used: set[str] = set()
    out = []
    for p in paths:
        stem = _default_name(p)
        name, k = stem, 2
        while name in used:
            name, k = f"{stem}-{k}", k + 1
        used.add(name)
        out.append((name, p))
    return out


def _validate(base: Checkpoint, experts: Mapping[str, Checkpoint]) -> int:
    """Names, shapes and layer counts agree with the base; returns the layer count."""
    num_layers = count_layers(base.names, base.config, f"base {base.path}")
    base_names = base.specs
    for name, ckpt in experts.items():
        where = f"expert {name!r} ({ckpt.path})"
        for tensor, spec in base_names.items():
            other = ckpt.specs.get(tensor)
            if other is None:
                raise MismatchError(f"{where} has no tensor {tensor!r}, which the base has")
            if other.shape != spec.shape:
                raise MismatchError(f"tensor {tensor!r} has shape {list(other.shape)} in {where} "
                                    f"but {list(spec.shape)} in the base")
        for tensor in ckpt.specs:
            if tensor not in base_names:
                raise MismatchError(f"{where} has tensor {tensor!r}, which the base lacks")
        n = count_layers(ckpt.names, ckpt.config, where)
        if n != num_layers:
            raise MismatchError(f"{where} has {n} layers but the base has {num_layers}")
    return num_layers


# ----------------------------------------------------------------------------------------------
# backends

# ----------------------------------------------------------------------------------------------
# the analysis

class StatsError(ConfigError):
    """A statistics directory is missing, incomplete, or does not cover the requested experts."""


RowSink = Callable[[str, str, np.ndarray], None]  # (expert, tensor, row MAVs)


def analyze(
    base: PathLike,
    experts: Sequence[PathLike] | Mapping[str, PathLike],
    out_dir: PathLike | None = None,
    *,
    rows: bool = False,
    device: str = "auto",
    threads: int | None = None,
    force: bool = False,
    progress: Progress | None = None,
    backend: Any = None,
) -> DeltaStats:
    """Row-MAV statistics of ``experts`` against ``base``, in one streaming pass.

    ``experts``: paths (named after their directories, made unique: ``task``, ``task-2``) or a
    mapping name → path. Everything is validated (names, shapes, layer counts, the output
    location) before any tensor data is read. With ``out_dir``, writes ``mav.csv``,
    ``summary.json``, ``heatmap.png`` (and ``rows/`` when ``rows``) into a staging directory that
    is renamed into place at the end, so ``out_dir`` appears complete or not at all; an existing
    ``out_dir`` is replaced only with ``force``. Without ``out_dir``, ``rows`` keeps the row MAVs
    in memory (:meth:`DeltaStats.row_mavs`). ``device``: ``auto`` (a CUDA GPU when present),
    ``cpu`` (the C++ core, ``threads`` workers, default all cores) or ``cuda``.
    ``progress(n, total)`` is called after each tensor with the bytes it read. ``backend`` (for
    tests) replaces the device's row-MAV backend: any object with a ``row_mav_file`` method of
    :class:`layerswap_fast.gpu.CudaBackend`'s signature.
    """
    named = expert_names(experts)
    if not named:
        raise ConfigError("analyze needs at least one expert")
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    opened: list[Checkpoint] = []
    try:
        base_ckpt = open_checkpoint(base)
        opened.append(base_ckpt)
        ckpts: dict[str, Checkpoint] = {}
        for name, path in named:
            ckpts[name] = open_checkpoint(path)
            opened.append(ckpts[name])
        num_layers = _validate(base_ckpt, ckpts)
        out_path = output_location(out_dir) if out_dir is not None else None
        if out_path is not None:
            check_output(out_path, guarded_paths(opened, []), force, 0)
        if out_path is not None:
            # the heatmap needs matplotlib (~1 s to import): import it while the pass runs
            threading.Thread(target=_preload_matplotlib, name="lsf-preload", daemon=True).start()
        owned = backend is None
        engine = make_backend(device, threads) if owned else backend
        try:
            if out_path is None:
                kept: dict[tuple[str, str], np.ndarray] = {}
                stats = _run(base_ckpt, ckpts, num_layers, engine,
                             (lambda e, t, r: kept.__setitem__((e, t), r)) if rows else None, progress)
                stats._rows = kept
                return stats
            with staging_directory(out_path) as tmp:
                sink = _NpySink(tmp / ROWS_DIR, list(ckpts)) if rows else None
                stats = _run(base_ckpt, ckpts, num_layers, engine, sink, progress)
                stats.rows_saved = rows
                write_stats(stats, tmp)
                publish(tmp, out_path, force)
            stats.out_dir = out_path
            return stats
        finally:
            if owned:
                engine.close()
    finally:
        for c in opened:
            c.close()


def _preload_matplotlib() -> None:
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except Exception:  # noqa: BLE001 - the real import in render_heatmap reports any problem
        pass


class _NpySink:
    def __init__(self, root: Path, experts: Sequence[str]) -> None:
        self.root = root
        for name in experts:
            (root / name).mkdir(parents=True)

    def __call__(self, expert: str, tensor: str, rows: np.ndarray) -> None:
        np.save(self.root / expert / _rows_filename(tensor), rows, allow_pickle=False)


@dataclass
class _Item:
    tensor: str
    rows: int
    cols: int
    nbytes: int


def _plan(base: Checkpoint, experts: Mapping[str, Checkpoint]) -> tuple[list[_Item], list[tuple[str, str]]]:
    todo, skipped = [], []
    for name, spec in base.specs.items():
        dtypes = [spec.dtype] + [c.specs[name].dtype for c in experts.values()]
        bad = [d for d in dtypes if d not in FLOAT_DTYPES]
        if bad:
            skipped.append((name, f"dtype {bad[0]} (row MAV reads {', '.join(FLOAT_DTYPES)})"))
            continue
        if spec.numel == 0:
            skipped.append((name, f"no elements (shape {list(spec.shape)})"))
            continue
        rows = spec.shape[0] if len(spec.shape) >= 2 else 1
        todo.append(_Item(name, rows, spec.numel // rows,
                          spec.nbytes + sum(c.specs[name].nbytes for c in experts.values())))
    return todo, skipped


def _run(base: Checkpoint, experts: Mapping[str, Checkpoint], num_layers: int, engine: Any,
         sink: RowSink | None, progress: Progress | None) -> DeltaStats:
    start = time.perf_counter()
    todo, skipped = _plan(base, experts)
    total = sum(item.nbytes for item in todo)
    names = list(experts)
    per_expert: dict[str, list[TensorStat]] = {n: [] for n in names}
    for item in todo:
        bspec = base.specs[item.tensor]
        especs = [experts[n].specs[item.tensor] for n in names]
        try:
            result = engine.row_mav_file(
                [(experts[n].input_file(s.file), s.offset) for n, s in zip(names, especs)],
                [s.dtype for s in especs],
                (base.input_file(bspec.file), bspec.offset), bspec.dtype, item.rows, item.cols)
        except _core.CoreError as e:
            raise CheckpointError(f"reading tensor {item.tensor!r}: {e}") from None
        result = np.asarray(result, dtype=np.float64).reshape(len(names), item.rows)
        info = classify(item.tensor)
        for i, n in enumerate(names):
            r = result[i]
            per_expert[n].append(TensorStat(item.tensor, info.layer, info.kind, item.rows,
                                            float(r.mean()), float(r.max())))
            if sink is not None:
                sink(n, item.tensor, r.copy())
        if progress is not None:
            progress(item.nbytes, total)
    for ckpt in [base, *experts.values()]:
        ckpt.check_unchanged("analysis")
    return DeltaStats(
        experts={n: ExpertStats(n, per_expert[n], _ref(experts[n])) for n in names},
        num_layers=num_layers, base=_ref(base), skipped=skipped,
        seconds=time.perf_counter() - start, bytes_read=total)


# ----------------------------------------------------------------------------------------------
# files

def _csv_text(stats: DeltaStats) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for e in stats.experts.values():
        for t in e.tensors:
            w.writerow([e.name, t.tensor, "" if t.layer is None else t.layer, t.kind, t.rows,
                        repr(t.mean_row_mav), repr(t.max_row_mav)])
    return buf.getvalue()


def write_stats(stats: DeltaStats, directory: PathLike) -> None:
    """Write ``mav.csv``, ``heatmap.png`` and (last) ``summary.json`` into ``directory``."""
    from .heatmap import render_heatmap

    d = Path(directory)
    (d / MAV_CSV).write_text(_csv_text(stats), encoding="utf-8")
    render_heatmap(stats, d / HEATMAP_PNG)
    summary = stats.summary_json()
    summary["files"] = {name: hash_file(d / name, "sha256") for name in (MAV_CSV, HEATMAP_PNG)}
    summary["csv_lines"] = sum(len(e.tensors) for e in stats.experts.values())
    (d / SUMMARY_JSON).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


_REF = {"path": Nullable(Str()), "fingerprint": Nullable(Str()), "content_sample": Nullable(Str())}
#: the keys of ``summary.json`` that :func:`load_stats` reads (``format`` and its version first)
SUMMARY_SCHEMA = Map({
    "num_layers": Int(0, MAX_LAYERS), "base": Map(_REF),
    "experts": List(Map({"name": Str(), "tensors": Int(0), **_REF}, required=("name", "tensors"))),
    "files": Map({MAV_CSV: Str(), HEATMAP_PNG: Str()}, required=(MAV_CSV, HEATMAP_PNG)),
    "csv_lines": Int(0), "rows": Bool(), "seconds": Float(), "bytes_read": Int(0),
    "skipped": List(Map({"tensor": Str(), "reason": Str()}, required=("tensor", "reason"))),
}, required=("num_layers", "base", "experts", "files", "csv_lines"))


def load_stats(out_dir: PathLike) -> DeltaStats:
    """Read an earlier :func:`analyze` output back, checking that it is complete and unmodified
    (the checksums in ``summary.json``, one CSV line per expert and tensor, the row files)."""
    d = Path(out_dir)
    if not d.is_dir():
        raise StatsError(f"statistics directory {d} does not exist (run `layerswap-fast analyze` first)")
    if not os.path.lexists(d / SUMMARY_JSON):
        raise StatsError(f"{d}: no {SUMMARY_JSON}; not an analyze output, or an incomplete one")
    summary = read_json(d / SUMMARY_JSON, Map(), error=StatsError)
    if summary.get("format") != FORMAT:
        raise StatsError(f"{d / SUMMARY_JSON} is not a layerswap-fast statistics summary")
    if summary.get("format_version") != FORMAT_VERSION:
        raise StatsError(f"{d / SUMMARY_JSON}: format version {show_value(summary.get('format_version'))} "
                         f"(this version reads {FORMAT_VERSION}); analyze again")
    SUMMARY_SCHEMA.check(summary, show_path(d / SUMMARY_JSON), error=StatsError)
    for expert in summary["experts"]:  # names become paths below d (rows/NAME/)
        check_expert_name(expert["name"], StatsError, show_path(d / SUMMARY_JSON))
    try:
        files = summary["files"]
        for fname in (MAV_CSV, HEATMAP_PNG):
            path = d / fname
            if not path.is_file():
                raise StatsError(f"{d}: {fname} is missing")
            if hash_file(path, "sha256") != files[fname]:
                raise StatsError(f"{path} does not match its checksum in {SUMMARY_JSON} (modified or truncated)")
        experts_json = summary["experts"]
        order = [e["name"] for e in experts_json]
        tensors: dict[str, list[TensorStat]] = {n: [] for n in order}
        with open(d / MAV_CSV, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or tuple(header) != CSV_COLUMNS:
                raise StatsError(f"{d / MAV_CSV}: the header is {header}, expected {list(CSV_COLUMNS)}")
            for lineno, row in enumerate(reader, start=2):
                if len(row) != len(CSV_COLUMNS):
                    raise StatsError(f"{d / MAV_CSV}:{lineno}: {len(row)} fields, expected {len(CSV_COLUMNS)}")
                expert, tensor, layer, kind, nrows, mean, mx = row
                if expert not in tensors:
                    raise StatsError(f"{d / MAV_CSV}:{lineno}: expert {expert!r} is not in {SUMMARY_JSON}")
                tensors[expert].append(TensorStat(tensor, int(layer) if layer else None, kind, int(nrows),
                                                  float(mean), float(mx)))
        count = sum(map(len, tensors.values()))
        if count != summary["csv_lines"] or any(len(tensors[n]) != e["tensors"]
                                                 for n, e in zip(order, experts_json)):
            raise StatsError(f"{d / MAV_CSV} holds {count} lines, {SUMMARY_JSON} announces "
                             f"{summary['csv_lines']}")
        rows_saved = bool(summary.get("rows"))
        if rows_saved:
            for n in order:
                have = {p.name for p in (d / ROWS_DIR / n).glob("*.npy")}
                want = {_rows_filename(t.tensor) for t in tensors[n]}
                if not want <= have:
                    missing = sorted(want - have)[0]
                    raise StatsError(f"{d / ROWS_DIR / n}: {len(want - have)} row files missing "
                                     f"(e.g. {missing})")
        return DeltaStats(
            experts={n: ExpertStats(n, tensors[n], InputRef.from_json(e)) for n, e in zip(order, experts_json)},
            num_layers=int(summary["num_layers"]), base=InputRef.from_json(summary["base"]),
            skipped=[(s["tensor"], s["reason"]) for s in summary.get("skipped", [])],
            seconds=float(summary.get("seconds", 0.0)), bytes_read=int(summary.get("bytes_read", 0)),
            out_dir=d, rows_saved=rows_saved)
    except StatsError:
        raise
    except (KeyError, TypeError, ValueError, StopIteration, OSError, csv.Error) as e:
        raise StatsError(f"{d}: malformed statistics ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------
# magnitude weights for a merge

def _match(ref: InputRef, stats: DeltaStats, what: str) -> str:
    """The expert of ``stats`` that is the checkpoint ``ref``: by path (then its content must be
    unchanged), else by content (fingerprint and sampled bytes), which must be unambiguous."""
    same_content = [n for n, e in stats.experts.items()
                    if e.source.fingerprint == ref.fingerprint and e.source.sample == ref.sample]
    by_path = [n for n, e in stats.experts.items() if e.source.path == ref.path]
    for n in by_path:
        if n in same_content:
            return n
    if by_path:
        raise StatsError(f"{what} {ref.path} changed since it was analysed in {stats.out_dir} "
                         f"(as {by_path[0]!r}); analyze again")
    if len(same_content) == 1:
        return same_content[0]
    if len(same_content) > 1:
        raise StatsError(f"{what} {ref.path} matches several experts of {stats.out_dir} "
                         f"({', '.join(same_content)}); pass the paths that were analysed")
    raise StatsError(f"the statistics in {stats.out_dir} do not cover {what} {ref.path} "
                     f"(they have {', '.join(repr(e.source.path) for e in stats.experts.values())}); "
                     f"analyze it first")


def magnitude_weights_for(base: PathLike | None, experts: Sequence[PathLike],
                          stats_dir: PathLike | None = None, *, device: str = "auto",
                          threads: int | None = None) -> list[float]:
    """The paper's magnitude weights (∝ 1 / average MAV, summing to 1) of ``experts``, in order.

    From ``stats_dir`` (an :func:`analyze` output) when given: each expert is found there by its
    path (and must be unchanged) or by its content; ``base``, when given, must be the analysed
    base. Otherwise they are computed (``base`` required). StatsError when the statistics do not
    cover an expert."""
    paths = [experts] if isinstance(experts, (str, os.PathLike)) else list(experts)
    if not paths:
        raise ConfigError("magnitude weights need at least one expert")
    if stats_dir is None:
        if base is None:
            raise ConfigError("magnitude weights need the base model (or a statistics directory)")
        stats = analyze(base, paths, device=device, threads=threads)
        return list(stats.magnitude_weights().values())
    stats = load_stats(stats_dir)
    if base is not None:
        with open_checkpoint(base) as b:
            ref = _ref(b)
        if (ref.fingerprint, ref.sample) != (stats.base.fingerprint, stats.base.sample):
            raise StatsError(f"the statistics in {stats_dir} were computed against the base "
                             f"{stats.base.path}, not {base}")
    names = []
    for p in paths:
        with open_checkpoint(p) as c:
            names.append(_match(_ref(c), stats, "expert"))
    by_name = stats.magnitude_weights(list(dict.fromkeys(names)))  # ConfigError for a zero MAV
    # the same expert given twice counts twice, as in the computed case
    inv = [by_name[n] for n in names]
    total = math.fsum(inv)
    return [v / total for v in inv]


# ----------------------------------------------------------------------------------------------
# suggesting a swap

@dataclass(frozen=True)
class Suggestion:
    """A layer-swap configuration read off the statistics (the rule: module docstring)."""

    bottom: int
    top: int
    lower_transition: int
    upper_transition: int
    num_layers: int
    reasons: tuple[str, str]
    language_expert: str
    task_expert: str
    language_path: str | None = None
    task_path: str | None = None
    language_profile: tuple[float, ...] = ()
    task_profile: tuple[float, ...] = ()

    @property
    def kept(self) -> range:
        """The task expert's unblended middle layers."""
        return range(self.bottom + self.lower_transition,
                     self.num_layers - self.top - self.upper_transition)

    def options(self) -> list[str]:
        return ["--bottom", str(self.bottom), "--top", str(self.top),
                "--lower-transition", str(self.lower_transition),
                "--upper-transition", str(self.upper_transition)]

    def command(self, out: PathLike = "merged", *, task_path: PathLike | None = None,
                language_path: PathLike | None = None) -> str:
        """The ``layerswap-fast merge ...`` command line (shell-quoted) that applies it."""
        task = str(task_path or self.task_path or self.task_expert)
        language = str(language_path or self.language_path or self.language_expert)
        argv = ["layerswap-fast", "merge", "--task-expert", task, "--language-expert", language,
                "-o", str(out), *self.options()]
        return shlex.join(argv)

    def to_json(self) -> dict[str, Any]:
        return {"bottom": self.bottom, "top": self.top, "lower_transition": self.lower_transition,
                "upper_transition": self.upper_transition, "num_layers": self.num_layers,
                "language_expert": self.language_expert, "task_expert": self.task_expert,
                "reasons": list(self.reasons)}


def _relative(profile: np.ndarray) -> np.ndarray:
    p = np.nan_to_num(np.asarray(profile, dtype=np.float64), nan=0.0)
    mean = p.mean() if p.size else 0.0
    return p / mean if mean > 0 else np.zeros_like(p)


def _span(a: int, b: int) -> str:
    return f"layer {a}" if a == b else f"layers {a}-{b}"


def _stand(a: int, b: int) -> str:
    return f"{_span(a, b)} {'stands' if a == b else 'stand'} out"


def _why_not(layer: int, rl: np.ndarray, rt: np.ndarray) -> str:
    if rl[layer] < STANDOUT:
        return (f"layer {layer} does not stand out in the language expert "
                f"({rl[layer]:.2f}x its average layer)")
    return f"layer {layer} moved relatively more in the task expert ({rt[layer]:.2f}x vs {rl[layer]:.2f}x)"


def _range_x(values: np.ndarray) -> str:
    lo, hi = float(values.min()), float(values.max())
    return f"{lo:.2f}x" if abs(hi - lo) < 0.005 else f"{lo:.2f}-{hi:.2f}x"


def suggest_swap(stats: DeltaStats, language_expert_name: str, task_expert_name: str,
                 num_layers: int | None = None) -> Suggestion:
    """Suggest ``bottom``, ``top`` and transition sizes from where each expert's deltas sit.

    The rule (also in the module docstring): per layer, each expert's delta profile (the mean of
    the heatmap row) divided by its mean over all layers; a layer is language-dominated when the
    language expert's value is at least :data:`STANDOUT` (1.2) and above the task expert's.
    ``bottom``/``top`` are the runs of language-dominated layers from layer 0 / from the last
    layer; one transition layer beside each non-empty block where there is room; blocks shrink
    (the larger first) so that the task expert keeps at least ``ceil(L/2)`` layers unblended.
    """
    L = stats.num_layers if num_layers is None else int(num_layers)
    if L != stats.num_layers:
        raise ConfigError(f"the statistics are of a {stats.num_layers}-layer model, not {L} layers")
    if language_expert_name == task_expert_name:
        raise ConfigError("the language expert and the task expert must be different experts")
    lang, task = stats.expert(language_expert_name), stats.expert(task_expert_name)
    if L < 1:
        raise ConfigError("the model has no layers to swap")
    pl, pt = stats.layer_profile(lang.name), stats.layer_profile(task.name)
    rl, rt = _relative(pl), _relative(pt)
    dominated = (rl >= STANDOUT) & (rl > rt)
    bottom = 0
    while bottom < L and dominated[bottom]:
        bottom += 1
    top = 0
    while top < L - bottom and dominated[L - 1 - top]:
        top += 1
    found_bottom, found_top = bottom, top
    min_keep = math.ceil(L / 2)
    budget = L - min_keep
    while bottom + top > budget:
        if bottom > top:
            bottom -= 1
        else:
            top -= 1
    lower = 1 if bottom > 0 and bottom + top + 1 <= budget else 0
    upper = 1 if top > 0 and bottom + top + lower + 1 <= budget else 0

    def clamp_note(found: int, got: int) -> str:
        return (f" (shortened from {found} so that the task expert keeps at least {min_keep} of {L} layers)"
                if got < found else "")

    if not np.any(rl > 0):
        line1 = "bottom 0: the language expert does not differ from the base in any layer"
        line2 = "top 0: nothing to swap in; the task expert is kept whole"
    else:
        if bottom:
            line1 = (f"bottom {bottom}: {_stand(0, bottom - 1)} in the language expert "
                     f"({_range_x(rl[:bottom])} its average layer) more than in the task expert "
                     f"({_range_x(rt[:bottom])})")
            if found_bottom < L and found_bottom == bottom:
                line1 += f"; {_why_not(found_bottom, rl, rt)}"
        else:
            line1 = f"bottom 0: {_why_not(0, rl, rt)}"
        line1 += clamp_note(found_bottom, bottom)
        line1 += f"; lower transition {lower}."
        if top:
            line2 = (f"top {top}: {_stand(L - top, L - 1)} in the language expert "
                     f"({_range_x(rl[L - top:])}) more than in the task expert ({_range_x(rt[L - top:])})")
            nxt = L - 1 - found_top
            if found_top == top and nxt >= found_bottom:
                line2 += f"; {_why_not(nxt, rl, rt)}"
        else:
            line2 = f"top 0: {_why_not(L - 1, rl, rt)}"
        line2 += clamp_note(found_top, top)
        line2 += f"; upper transition {upper}."
        kept = range(bottom + lower, L - top - upper)
        line2 += (f" The task expert keeps {_span(kept.start, kept.stop - 1)} ({len(kept)} of {L})."
                  if len(kept) else "")
    return Suggestion(bottom, top, lower, upper, L, (line1, line2), lang.name, task.name,
                      lang.source.path, task.source.path,
                      tuple(map(float, pl)), tuple(map(float, pt)))


__all__ = [
    "analyze", "load_stats", "write_stats", "magnitude_weights_for", "suggest_swap", "DeltaStats",
    "ExpertStats", "TensorStat", "InputRef", "Suggestion", "StatsError",
    "expert_names", "CSV_COLUMNS",
]
