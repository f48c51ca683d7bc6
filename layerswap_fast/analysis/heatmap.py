"""The paper's Figure 2 (Bandarkar et al., arXiv 2410.01335): where fine-tuning moved the weights.

One panel per expert, side by side: y = layer (layer 0 at the bottom), x = the parameter kinds
q, k, v, o (attention) and gate, up, down (MLP), colour = the mean row MAV of ``expert - base`` in
that cell (several tensors of one kind in a layer, e.g. Mixtral's experts, are averaged), on one
colour scale shared by all panels. Drawn with matplotlib's object API on the Agg canvas: no
display is needed and the process-wide pyplot backend is left alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..plan.layers import FIGURE_KINDS

if TYPE_CHECKING:
    from .stats import DeltaStats

COLORBAR_LABEL = "mean row MAV |expert − base|"
CMAP = "viridis"
_MAX_TICKS = 40


@dataclass(frozen=True)
class HeatmapInfo:
    """What :func:`render_heatmap` drew: the file, the number of expert panels, all axes of the
    figure (panels + colorbar) and the image size in pixels."""

    path: Path
    panels: int
    axes: int
    width_px: int
    height_px: int
    vmax: float
    tick_step: int


def layer_tick_step(num_layers: int, max_ticks: int = _MAX_TICKS) -> int:
    """Every layer up to ``max_ticks`` layers, then every 2nd, 4th, 5th, 10th, ... layer."""
    for step in (1, 2, 4, 5, 10, 20, 25, 50):
        if math.ceil(num_layers / step) <= max_ticks:
            return step
    step = 100
    while math.ceil(num_layers / step) > max_ticks:
        step *= 2
    return step


def render_heatmap(stats: DeltaStats, path: str | os.PathLike[str], *,
                   experts: Sequence[str] | None = None, kinds: Sequence[str] = FIGURE_KINDS,
                   dpi: int = 100, title: str | None = None) -> HeatmapInfo:
    """Draw the Figure-2 heatmap of ``stats`` (all experts, or ``experts`` in that order) to a PNG."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    names = list(stats.experts) if experts is None else list(experts)
    if not names:
        raise ValueError("render_heatmap: no experts to draw")
    L = stats.num_layers
    matrices = [stats.kind_matrix(n, kinds) for n in names]
    finite = np.concatenate([m[np.isfinite(m)] for m in matrices]) if L else np.zeros(0)
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1e-12

    rows = max(L, 1)
    n = len(names)
    panel_w = 0.30 * len(kinds) + 0.25
    width = 1.2 + n * panel_w + 1.2
    height = max(4.0, 1.9 + 0.165 * rows)
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1, n + 1, width_ratios=[1.0] * n + [0.07])
    axes = [fig.add_subplot(grid[0, 0])]
    axes += [fig.add_subplot(grid[0, j], sharey=axes[0]) for j in range(1, n)]
    cax = fig.add_subplot(grid[0, n])
    cmap = colormaps[CMAP].with_extremes(bad="#d9d9d9")
    norm = Normalize(vmin=0.0, vmax=vmax)
    step = layer_tick_step(rows)
    label_size = 8 if rows <= 40 else 7
    split = list(kinds).index("gate") if "o" in kinds and "gate" in kinds else None  # attention | MLP
    image = None
    for j, (ax, name, matrix) in enumerate(zip(axes, names, matrices)):
        image = ax.imshow(np.ma.masked_invalid(matrix) if L else np.zeros((1, len(kinds))),
                          origin="lower", aspect="auto", interpolation="nearest", cmap=cmap, norm=norm,
                          extent=(-0.5, len(kinds) - 0.5, -0.5, rows - 0.5))
        ax.set_xticks(range(len(kinds)), list(kinds), fontsize=label_size)
        ax.set_yticks(range(0, rows, step))
        ax.tick_params(axis="y", labelsize=label_size, labelleft=j == 0)
        ax.tick_params(length=2)
        if split is not None:
            ax.axvline(split - 0.5, color="white", linewidth=1.2)
            groups = ax.secondary_xaxis("bottom")
            groups.set_xticks([(split - 1) / 2, (split + len(kinds) - 1) / 2], ["attention", "MLP"],
                              fontsize=label_size, color="0.35")
            groups.tick_params(length=0, pad=14)
            groups.spines["bottom"].set_visible(False)
        avg = stats.experts[name].average_mav
        ax.set_title(f"{name}\navg MAV {avg:.3g}", fontsize=9)
    axes[0].set_ylabel("layer")
    assert image is not None
    cbar = fig.colorbar(image, cax=cax)
    cbar.set_label(COLORBAR_LABEL)
    cbar.formatter.set_powerlimits((-2, 3))
    cbar.ax.tick_params(labelsize=label_size)
    fig.suptitle(title or "Fine-tuning deltas per layer and parameter (row MAV vs the base)", fontsize=10)
    out = Path(path)
    fig.savefig(out, dpi=dpi)
    w, h = fig.canvas.get_width_height()
    return HeatmapInfo(out, len(names), len(fig.axes), int(w), int(h), vmax, step)


__all__ = ["render_heatmap", "layer_tick_step", "HeatmapInfo", "COLORBAR_LABEL"]
