"""The statistics directory that ``analyze`` writes and :func:`load_stats` reads back.

``mav.csv`` (:data:`CSV_COLUMNS`, one line per expert and tensor, the layer empty for non-layer
tensors), ``heatmap.png``, ``rows/<expert>/<tensor>.npy`` (float64 row MAVs, optional) and, written
last, ``summary.json``: inputs with paths, fingerprints and the dtypes compared (and the one the
comparison computed in), for a LoRA adapter what it does to the analysed tensors, average MAVs,
magnitude weights, skipped tensors and the checksums of the other files, so that a truncated or
edited directory is refused instead of silently giving other weights.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

import numpy as np

from .._core import __version__
from ..dtypes import COMPUTE_DTYPE
from ..errors import ConfigError
from ..formats.writeback import hash_file
from ..plan.layers import MAX_LAYERS
from ..safe_read import Bool, Float, Int, List, Map, Nullable, Str, read_json, show_path, show_value
from .stats import DeltaStats, ExpertStats, InputRef, TensorStat, check_expert_name

if TYPE_CHECKING:
    from .heatmap import HeatmapFigure

PathLike = str | os.PathLike[str]

CSV_COLUMNS = ("expert", "tensor", "layer", "kind", "rows", "mean_row_mav", "max_row_mav")
MAV_CSV = "mav.csv"
SUMMARY_JSON = "summary.json"
HEATMAP_PNG = "heatmap.png"
ROWS_DIR = "rows"
FORMAT = "layerswap-fast delta stats"
FORMAT_VERSION = 1


class StatsError(ConfigError):
    """A statistics directory is missing, incomplete, or does not cover the requested experts."""


def rows_filename(tensor: str) -> str:
    # tensor names may hold characters a file name cannot; quoting keeps them one path component
    return quote(tensor, safe="._-") + ".npy"


class RowFiles(Mapping[tuple[str, str], np.ndarray]):
    """The saved row MAVs of a statistics directory, read on demand: (expert, tensor) -> array."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __getitem__(self, key: tuple[str, str]) -> np.ndarray:
        expert, tensor = key
        path = self.root / expert / rows_filename(tensor)
        if not path.is_file():
            raise KeyError(key)
        return np.load(path)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for path in sorted(self.root.glob("*/*.npy")):
            yield path.parent.name, unquote(path.name[:-len(".npy")])

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.npy"))


class NpySink:
    """Saves each tensor's row MAVs as ``root/<expert>/<tensor>.npy`` as the pass produces them."""

    def __init__(self, root: Path, experts: Sequence[str]) -> None:
        self.root = root
        for name in experts:
            (root / name).mkdir(parents=True)

    def __call__(self, expert: str, tensor: str, rows: np.ndarray) -> None:
        np.save(self.root / expert / rows_filename(tensor), rows, allow_pickle=False)


def _json_float(x: float) -> float | None:
    return x if math.isfinite(x) else None


def summary_json(stats: DeltaStats) -> dict[str, Any]:
    """``summary.json`` without the parts that describe the other files (``files``, ``csv_lines``)."""
    try:
        weights: dict[str, float] | None = stats.magnitude_weights()
    except ConfigError:
        weights = None
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool": "layerswap-fast",
        "version": __version__,
        "num_layers": stats.num_layers,
        # the dtypes compared: an expert in another dtype than the base carries rounding in its MAVs
        "computed_in": COMPUTE_DTYPE,
        "base": {**stats.base.to_json(), "dtypes": stats.base_dtypes},
        "experts": [
            {"name": e.name, **e.source.to_json(), "dtypes": e.dtypes, "adapter": e.adapter,
             "average_mav": _json_float(e.average_mav),
             "total_rows": e.total_rows, "tensors": len(e.tensors),
             "magnitude_weight": None if weights is None else weights[e.name]}
            for e in stats.experts.values()],
        "magnitude_weights": weights,
        "skipped": [{"tensor": t, "reason": r} for t, r in stats.skipped],
        "rows": stats.rows_saved,
        "seconds": round(stats.seconds, 3),
        "bytes_read": stats.bytes_read,
    }


def _csv_text(stats: DeltaStats) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for e in stats.experts.values():
        for t in e.tensors:
            w.writerow([e.name, t.tensor, "" if t.layer is None else t.layer, t.kind, t.rows,
                        repr(t.mean_row_mav), repr(t.max_row_mav)])
    return buf.getvalue()


def write_stats(stats: DeltaStats, directory: PathLike, figure: HeatmapFigure | None = None) -> None:
    """Write ``mav.csv``, ``heatmap.png`` and (last) ``summary.json`` into ``directory``;
    ``figure``: the heatmap's, made beforehand (used when it has the experts and layers of
    ``stats``)."""
    from .heatmap import render_heatmap  # matplotlib: only when a directory is written

    d = Path(directory)
    (d / MAV_CSV).write_text(_csv_text(stats), encoding="utf-8")
    if figure is not None and figure.fits(stats):
        figure.save(stats, d / HEATMAP_PNG)
    else:
        render_heatmap(stats, d / HEATMAP_PNG)
    summary = summary_json(stats)
    summary["files"] = {name: hash_file(d / name, "sha256") for name in (MAV_CSV, HEATMAP_PNG)}
    summary["csv_lines"] = sum(len(e.tensors) for e in stats.experts.values())
    (d / SUMMARY_JSON).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


_REF = {"path": Nullable(Str()), "fingerprint": Nullable(Str()), "content_sample": Nullable(Str()),
        "dtypes": Map(values=Int(0)), "hub_id": Nullable(Str()), "revision": Nullable(Str())}
#: the keys of ``summary.json`` that :func:`load_stats` reads (``format`` and its version first)
SUMMARY_SCHEMA = Map({
    "num_layers": Int(0, MAX_LAYERS), "base": Map(_REF),
    "experts": List(Map({"name": Str(), "tensors": Int(0), "adapter": Nullable(Map(values=Int(0))), **_REF},
                        required=("name", "tensors"))),
    "files": Map({MAV_CSV: Str(), HEATMAP_PNG: Str()}, required=(MAV_CSV, HEATMAP_PNG)),
    "csv_lines": Int(0), "rows": Bool(), "seconds": Float(), "bytes_read": Int(0),
    "skipped": List(Map({"tensor": Str(), "reason": Str()}, required=("tensor", "reason"))),
}, required=("num_layers", "base", "experts", "files", "csv_lines"))


def _read_summary(d: Path) -> dict[str, Any]:
    """``summary.json``, checked against :data:`SUMMARY_SCHEMA`, its expert names safe as paths."""
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
    return summary


def _check_checksums(d: Path, files: Mapping[str, str]) -> None:
    for fname in (MAV_CSV, HEATMAP_PNG):
        path = d / fname
        if not path.is_file():
            raise StatsError(f"{d}: {fname} is missing")
        if hash_file(path, "sha256") != files[fname]:
            raise StatsError(f"{path} does not match its checksum in {SUMMARY_JSON} (modified or truncated)")


def _read_csv(path: Path, order: Sequence[str]) -> dict[str, list[TensorStat]]:
    tensors: dict[str, list[TensorStat]] = {n: [] for n in order}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(header) != CSV_COLUMNS:
            raise StatsError(f"{path}: the header is {header}, expected {list(CSV_COLUMNS)}")
        for lineno, row in enumerate(reader, start=2):
            if len(row) != len(CSV_COLUMNS):
                raise StatsError(f"{path}:{lineno}: {len(row)} fields, expected {len(CSV_COLUMNS)}")
            expert, tensor, layer, kind, nrows, mean, mx = row
            if expert not in tensors:
                raise StatsError(f"{path}:{lineno}: expert {expert!r} is not in {SUMMARY_JSON}")
            tensors[expert].append(TensorStat(tensor, int(layer) if layer else None, kind, int(nrows),
                                              float(mean), float(mx)))
    return tensors


def _check_row_files(root: Path, tensors: Mapping[str, list[TensorStat]]) -> None:
    for n, ts in tensors.items():
        have = {p.name for p in (root / n).glob("*.npy")}
        want = {rows_filename(t.tensor) for t in ts}
        if not want <= have:
            missing = sorted(want - have)[0]
            raise StatsError(f"{root / n}: {len(want - have)} row files missing (e.g. {missing})")


def load_stats(out_dir: PathLike) -> DeltaStats:
    """Read an earlier ``analyze`` output back, checking that it is complete and unmodified
    (the checksums in ``summary.json``, one CSV line per expert and tensor, the row files)."""
    d = Path(out_dir)
    summary = _read_summary(d)
    try:
        _check_checksums(d, summary["files"])
        experts_json = summary["experts"]
        order = [e["name"] for e in experts_json]
        tensors = _read_csv(d / MAV_CSV, order)
        count = sum(map(len, tensors.values()))
        if count != summary["csv_lines"] or any(len(tensors[n]) != e["tensors"]
                                                 for n, e in zip(order, experts_json)):
            raise StatsError(f"{d / MAV_CSV} holds {count} lines, {SUMMARY_JSON} announces "
                             f"{summary['csv_lines']}")
        rows_saved = bool(summary.get("rows"))
        if rows_saved:
            _check_row_files(d / ROWS_DIR, tensors)
        return DeltaStats(
            experts={n: ExpertStats(n, tensors[n], InputRef.from_json(e), e.get("dtypes", {}), e.get("adapter"))
                     for n, e in zip(order, experts_json)},
            num_layers=int(summary["num_layers"]), base=InputRef.from_json(summary["base"]),
            base_dtypes=summary["base"].get("dtypes", {}),
            skipped=[(s["tensor"], s["reason"]) for s in summary.get("skipped", [])],
            seconds=float(summary.get("seconds", 0.0)), bytes_read=int(summary.get("bytes_read", 0)),
            out_dir=d, rows_saved=rows_saved, _rows=RowFiles(d / ROWS_DIR) if rows_saved else {})
    except StatsError:
        raise
    except (KeyError, TypeError, ValueError, StopIteration, OSError, csv.Error) as e:
        raise StatsError(f"{d}: malformed statistics ({type(e).__name__}: {e})") from None


__all__ = ["CSV_COLUMNS", "MAV_CSV", "SUMMARY_JSON", "HEATMAP_PNG", "ROWS_DIR", "FORMAT", "FORMAT_VERSION",
           "SUMMARY_SCHEMA", "StatsError", "RowFiles", "NpySink", "rows_filename", "summary_json",
           "write_stats", "load_stats"]
