"""The paper's Figure 2 (Bandarkar et al., arXiv 2410.01335): where fine-tuning moved the weights.

One panel per expert, side by side: y = layer (layer 0 at the bottom), x = the parameter kinds
q, k, v, o (attention) and gate, up, down (MLP), colour = the mean row MAV of ``expert - base`` in
that cell (several tensors of one kind in a layer, e.g. Mixtral's experts, are averaged), on one
colour scale shared by all panels. Drawn with matplotlib's object API on the Agg canvas: no
display is needed and the process-wide pyplot backend is left alone. The figure is laid out and
drawn before the data is known (:class:`HeatmapFigure`), so that ``analyze`` can do that while
its pass runs.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    names = list(stats.experts) if experts is None else list(experts)
    return HeatmapFigure(names, stats.num_layers, kinds, dpi, title).save(stats, path)


class HeatmapFigure:
    """:func:`render_heatmap`'s figure before its data: the panels of ``names`` over ``num_layers``
    layers with their ticks and labels, and the colorbar, drawn once so that setting the data and
    drawing what it changes over that is all that is left (the PNG is the one a full drawing
    gives). ``analyze`` builds it while its pass runs
    (:func:`prepare_in_background`)."""

    def __init__(self, names: Sequence[str], num_layers: int, kinds: Sequence[str] = FIGURE_KINDS,
                 dpi: int = 100, title: str | None = None) -> None:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import Normalize
        from matplotlib.figure import Figure

        if not names:
            raise ValueError("render_heatmap: no experts to draw")
        self.names, self.num_layers, self.kinds, self.dpi = list(names), num_layers, list(kinds), dpi
        rows, n = max(num_layers, 1), len(self.names)
        self.fig = Figure(figsize=_figure_size(n, rows, len(kinds)), dpi=dpi)
        FigureCanvasAgg(self.fig)
        panels, cax = _layout(self.fig, n, len(kinds))
        self.norm = Normalize(vmin=0.0, vmax=1.0)
        cmap = colormaps[CMAP].with_extremes(bad="#d9d9d9")
        self.step = layer_tick_step(rows)
        label_size = 8 if rows <= 40 else 7
        split = self.kinds.index("gate") if "o" in kinds and "gate" in kinds else None  # attention | MLP
        self.axes, self.images = panels, []
        for j, ax in enumerate(panels):
            self.images.append(ax.imshow(np.zeros((rows, len(kinds))), origin="lower", aspect="auto",
                                         interpolation="nearest", cmap=cmap, norm=self.norm,
                                         extent=(-0.5, len(kinds) - 0.5, -0.5, rows - 0.5)))
            ax.set_xticks(range(len(kinds)), self.kinds, fontsize=label_size)
            ax.set_yticks(range(0, rows, self.step))
            ax.tick_params(axis="y", labelsize=label_size, labelleft=j == 0)
            ax.tick_params(length=2)
            if split is not None:
                ax.axvline(split - 0.5, color="white", linewidth=1.2)
                groups = ax.secondary_xaxis("bottom")
                groups.set_xticks([(split - 1) / 2, (split + len(kinds) - 1) / 2], ["attention", "MLP"],
                                  fontsize=label_size, color="0.35")
                groups.tick_params(length=0, pad=14)
                groups.spines["bottom"].set_visible(False)
        panels[0].set_ylabel("layer")
        cbar = self.fig.colorbar(self.images[-1], cax=cax)
        cbar.set_label(COLORBAR_LABEL)
        cbar.formatter.set_powerlimits((-2, 3))
        cbar.ax.tick_params(labelsize=label_size)
        self.fig.suptitle(title or "Fine-tuning deltas per layer and parameter (row MAV vs the base)", fontsize=10,
                          y=1 - 0.1 / self.fig.get_size_inches()[1], va="top")
        self._cbar = cbar
        self._draw_background()

    def _draw_background(self) -> None:
        """Draw all that the data does not change; what it changes (the images and what lies on
        them, the titles, the colorbar) is marked animated, left out here and drawn by save."""
        self._on_top: list[Any] = []
        for ax, image in zip(self.axes, self.images):
            self._on_top += _in_drawing_order([image, *ax.lines, *ax.spines.values(), ax.title])
        for artist in self._on_top + self._colorbar_parts():
            artist.set_animated(True)
        self.fig.canvas.draw()
        self._background = self.fig.canvas.copy_from_bbox(self.fig.bbox)

    def _colorbar_parts(self) -> list[Any]:
        """What a new scale redraws in the colorbar: its solids (made anew at every change), the
        dividers, the outline and the long axis's ticks, labels and offset."""
        cbar = self._cbar
        return _in_drawing_order([cbar.solids, cbar.dividers, *cbar.ax.spines.values(), cbar.ax.yaxis])

    def fits(self, stats: DeltaStats) -> bool:
        """Whether this figure has the panels and layers of ``stats``."""
        return self.names == list(stats.experts) and self.num_layers == stats.num_layers

    def save(self, stats: DeltaStats, path: str | os.PathLike[str]) -> HeatmapInfo:
        """Draw ``stats`` (which has this figure's experts and layers) into it and save it as a PNG."""
        from matplotlib.image import imsave

        L = stats.num_layers
        matrices = [stats.kind_matrix(n, self.kinds) for n in self.names]
        finite = np.concatenate([m[np.isfinite(m)] for m in matrices]) if L else np.zeros(0)
        vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1e-12
        for ax, image, name, matrix in zip(self.axes, self.images, self.names, matrices):
            if L:
                image.set_data(np.ma.masked_invalid(matrix))
            ax.set_title(f"{name}\navg MAV {stats.experts[name].average_mav:.3g}", fontsize=9)
        self.norm.vmax = vmax
        out = Path(path)
        canvas = self.fig.canvas
        canvas.restore_region(self._background)
        renderer = canvas.get_renderer()
        for artist in self._on_top + self._colorbar_parts():
            artist.draw(renderer)
        imsave(out, canvas.buffer_rgba(), format="png", origin="upper", dpi=self.dpi)
        w, h = self.fig.canvas.get_width_height()
        return HeatmapInfo(out, len(self.names), len(self.fig.axes), int(w), int(h), vmax, self.step)


def _in_drawing_order(artists: list[Any]) -> list[Any]:
    """The artists of one axes in the order its full drawing has (by zorder, stable)."""
    return sorted(artists, key=lambda a: a.get_zorder())


def prepare_in_background(names: Sequence[str], num_layers: int) -> Callable[[], HeatmapFigure | None]:
    """Build a :class:`HeatmapFigure` on a daemon thread; the function returned waits for it
    (None when building failed: drawing from scratch then reports why)."""
    built: list[HeatmapFigure] = []

    def build() -> None:
        try:
            with _yielding_gil():
                built.append(HeatmapFigure(names, num_layers))
        except Exception:  # noqa: BLE001 - see the docstring
            pass

    thread = threading.Thread(target=build, name="lsf-heatmap", daemon=True)
    thread.start()

    def result() -> HeatmapFigure | None:
        thread.join()
        return built[0] if built else None
    return result


_GIL_SWITCH_S = 1e-4
_yielders = 0
_saved_interval = 0.0
_yielders_lock = threading.Lock()


@contextmanager
def _yielding_gil() -> Iterator[None]:
    """Run the block with a short GIL switch interval (restored when the last such block ends).
    Importing matplotlib and drawing hold the GIL almost throughout; the pass beside them needs it
    for a moment after every tensor, and at the default interval it waits up to 5 ms each time
    with the core's workers idle."""
    global _yielders, _saved_interval
    with _yielders_lock:
        if _yielders == 0:
            _saved_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(_saved_interval, _GIL_SWITCH_S))
        _yielders += 1
    try:
        yield
    finally:
        with _yielders_lock:
            _yielders -= 1
            if _yielders == 0:
                sys.setswitchinterval(_saved_interval)


# Fixed margins in inches (a layout engine costs more than the drawing): the layer labels on the
# left, the titles above, the kind and group labels below, the colorbar's ticks and label right.
_LEFT, _GAP, _TOP, _BOTTOM, _BAR_GAP, _RIGHT = 0.62, 0.12, 0.78, 0.5, 0.15, 0.95


def _figure_size(panels: int, rows: int, kinds: int) -> tuple[float, float]:
    panel_w = 0.30 * kinds + 0.25
    return 1.2 + panels * panel_w + 1.2, max(4.0, 1.9 + 0.165 * rows)


def _layout(fig: Any, n: int, kinds: int) -> tuple[list[Any], Any]:
    """The panels, side by side and sharing y, and the colorbar's axes right of them."""
    width, height = fig.get_size_inches()
    bar = 0.07 * (0.30 * kinds + 0.25)
    panel = (width - _LEFT - _RIGHT - (n - 1) * _GAP - _BAR_GAP - bar) / n
    y0, h = _BOTTOM / height, (height - _TOP - _BOTTOM) / height
    axes: list[Any] = []
    for j in range(n):
        x = _LEFT + j * (panel + _GAP)
        axes.append(fig.add_axes((x / width, y0, panel / width, h), sharey=axes[0] if axes else None))
    cax = fig.add_axes(((_LEFT + n * panel + (n - 1) * _GAP + _BAR_GAP) / width, y0, bar / width, h))
    return axes, cax


__all__ = ["render_heatmap", "HeatmapFigure", "prepare_in_background", "layer_tick_step", "HeatmapInfo",
           "COLORBAR_LABEL"]
