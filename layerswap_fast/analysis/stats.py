"""The statistics' data model: per expert and tensor the row-MAV summary, per expert the average
MAV, and the paper's magnitude weights (∝ 1 / average MAV) derived from them.

Nothing here reads a checkpoint or a file: :mod:`.scan` fills these classes from a streaming pass,
:mod:`.files` writes them and reads them back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, LayerswapError
from ..plan.layers import FIGURE_KINDS


def check_expert_name(name: object, error: type[LayerswapError] = ConfigError, where: str = "") -> None:
    """An expert's name becomes a path component (``rows/NAME/``): one component, no line break."""
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\0\n\r"):
        raise error(f"{where + ': ' if where else ''}expert name {name!r} must be non-empty, without path "
                    f"separators or line breaks")


def sum_to_one(weights: Sequence[float]) -> list[float]:
    """``weights`` scaled to sum 1; ``math.fsum`` so that the result does not depend on their order."""
    total = math.fsum(weights)
    return [w / total for w in weights]


def magnitude_weights(average_mavs: Mapping[str, float]) -> dict[str, float]:
    """The paper's magnitude-adjusted average: each expert weighted by 1 / its average MAV,
    normalised to sum 1. ConfigError when an average MAV is zero (an expert equal to the base),
    negative or not finite (an expert without rows)."""
    for n, a in average_mavs.items():
        if not (a > 0 and math.isfinite(a)):
            raise ConfigError(f"expert {n!r} has average MAV {a} against the base "
                              f"(identical to it, or no rows): magnitude weights are undefined")
    inv = {n: 1.0 / a for n, a in average_mavs.items()}
    return dict(zip(inv, sum_to_one(list(inv.values()))))


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
    checkpoints saved from the same architecture) and a hash of bytes sampled from its data; for a
    model named by its hub id, that id and the commit it resolved to."""

    path: str | None = None
    fingerprint: str | None = None
    sample: str | None = None
    hub_id: str | None = None
    revision: str | None = None

    def to_json(self) -> dict[str, Any]:
        hub = {"hub_id": self.hub_id, "revision": self.revision} if self.hub_id is not None else {}
        return {"path": self.path, **hub, "fingerprint": self.fingerprint, "content_sample": self.sample}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> InputRef:
        return cls(d.get("path"), d.get("fingerprint"), d.get("content_sample"), d.get("hub_id"), d.get("revision"))

    @property
    def argument(self) -> str | None:
        """What names this checkpoint on a command line: ``org/name@<commit>`` or its path."""
        return f"{self.hub_id}@{self.revision}" if self.hub_id is not None else self.path


@dataclass
class ExpertStats:
    """Every analysed tensor of one expert, in the base's file order."""

    name: str
    tensors: list[TensorStat]
    source: InputRef = field(default_factory=InputRef)
    #: how many of the analysed tensors the expert stores in each dtype
    dtypes: dict[str, int] = field(default_factory=dict)
    #: for a LoRA adapter, how many analysed tensors it updates by s·B·A (``low_rank``), saves
    #: whole (``replaced``) and leaves to the base (``untouched``, row MAVs 0); None: a full model
    adapter: dict[str, int] | None = None

    @property
    def is_adapter(self) -> bool:
        return self.adapter is not None

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
    """Row-MAV statistics of one or more experts against a base (see :mod:`layerswap_fast.analysis`).

    ``_rows`` maps (expert, tensor) to the row MAVs: a dict when they were kept in memory, a view of
    the ``rows/`` files when they were saved (:class:`.files.RowFiles`), empty otherwise."""

    experts: dict[str, ExpertStats]
    num_layers: int
    base: InputRef = field(default_factory=InputRef)
    #: how many of the analysed tensors the base stores in each dtype
    base_dtypes: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    bytes_read: int = 0
    out_dir: Path | None = None
    rows_saved: bool = False
    _rows: Mapping[tuple[str, str], np.ndarray] = field(default_factory=dict, repr=False)

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

    def magnitude_weights(self, names: Sequence[str] | None = None) -> dict[str, float]:
        """Each expert (all, or ``names``) weighted by 1 / its average MAV, normalised to sum 1
        (:func:`magnitude_weights`). ConfigError when an expert equals the base."""
        names = list(self.experts) if names is None else list(names)
        return magnitude_weights({n: self.average_mav(n) for n in names})

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
        try:
            return self._rows[(expert, tensor)]
        except KeyError:
            raise KeyError(f"no row MAVs of {tensor!r} for expert {expert!r} (analyze with rows=True)") from None


__all__ = ["TensorStat", "InputRef", "ExpertStats", "DeltaStats", "magnitude_weights", "sum_to_one",
           "check_expert_name"]
