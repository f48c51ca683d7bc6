"""Suggesting a layer swap from where each expert's fine-tuning deltas sit.

The rule reads the heatmap row by row. A layer's *delta profile* for one expert is the average,
over the seven Figure-2 parameter kinds (q, k, v, o, gate, up, down), of the kind's mean row MAV
in that layer; dividing by the expert's average profile over all layers makes it scale-free
(1.0 = a typical layer of that expert), so an expert trained harder does not win by scale alone.
A layer is *language-dominated* when the language expert's relative profile is at least
:data:`STANDOUT` (the layer stands out within the language expert) and above the task expert's.
``bottom`` is the run of language-dominated layers starting at layer 0, ``top`` the run ending at
the last layer; each non-empty block gets a one-layer transition zone where there is room, and
the blocks are shrunk (the larger first) so that the task expert keeps at least half the layers
unblended in the middle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..errors import ConfigError
from ..methods.swap import SwapConfig
from .stats import DeltaStats

#: a layer "stands out" in an expert when its delta profile is this many times the expert's mean
STANDOUT = 1.2


class Suggestion(NamedTuple):
    """A layer swap read off the statistics, and the two lines of reasoning behind it."""

    config: SwapConfig
    reasons: tuple[str, str]


@dataclass(frozen=True)
class _Blocks:
    """The language-dominated runs as found, and the swap they become after the clamp."""

    num_layers: int
    found_bottom: int
    found_top: int
    bottom: int
    top: int
    lower: int
    upper: int
    min_keep: int


def _relative(profile: np.ndarray) -> np.ndarray:
    p = np.nan_to_num(np.asarray(profile, dtype=np.float64), nan=0.0)
    mean = p.mean() if p.size else 0.0
    return p / mean if mean > 0 else np.zeros_like(p)


def _blocks(dominated: np.ndarray, L: int) -> _Blocks:
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
    return _Blocks(L, found_bottom, found_top, bottom, top, lower, upper, min_keep)


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


def _clamp_note(b: _Blocks, found: int, got: int) -> str:
    return (f" (shortened from {found} so that the task expert keeps at least {b.min_keep} of "
            f"{b.num_layers} layers)" if got < found else "")


def _bottom_reason(b: _Blocks, rl: np.ndarray, rt: np.ndarray) -> str:
    if b.bottom:
        line = (f"bottom {b.bottom}: {_stand(0, b.bottom - 1)} in the language expert "
                f"({_range_x(rl[:b.bottom])} its average layer) more than in the task expert "
                f"({_range_x(rt[:b.bottom])})")
        if b.found_bottom < b.num_layers and b.found_bottom == b.bottom:
            line += f"; {_why_not(b.found_bottom, rl, rt)}"
    else:
        line = f"bottom 0: {_why_not(0, rl, rt)}"
    return line + _clamp_note(b, b.found_bottom, b.bottom) + f"; lower transition {b.lower}."


def _top_reason(b: _Blocks, rl: np.ndarray, rt: np.ndarray) -> str:
    L, top = b.num_layers, b.top
    if top:
        line = (f"top {top}: {_stand(L - top, L - 1)} in the language expert "
                f"({_range_x(rl[L - top:])}) more than in the task expert ({_range_x(rt[L - top:])})")
        nxt = L - 1 - b.found_top
        if b.found_top == top and nxt >= b.found_bottom:
            line += f"; {_why_not(nxt, rl, rt)}"
    else:
        line = f"top 0: {_why_not(L - 1, rl, rt)}"
    line += _clamp_note(b, b.found_top, top) + f"; upper transition {b.upper}."
    kept = range(b.bottom + b.lower, L - top - b.upper)
    return line + (f" The task expert keeps {_span(kept.start, kept.stop - 1)} ({len(kept)} of {L})."
                   if len(kept) else "")


def _reasons(b: _Blocks, rl: np.ndarray, rt: np.ndarray) -> tuple[str, str]:
    if not np.any(rl > 0):
        return ("bottom 0: the language expert does not differ from the base in any layer",
                "top 0: nothing to swap in; the task expert is kept whole")
    return _bottom_reason(b, rl, rt), _top_reason(b, rl, rt)


def suggest_swap(stats: DeltaStats, language_expert_name: str, task_expert_name: str,
                 num_layers: int | None = None) -> Suggestion:
    """The layer-swap configuration (``bottom``, ``top``, transition sizes; the other settings
    left at their defaults) that the statistics suggest, and its two lines of reasoning.

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
    rl, rt = _relative(stats.layer_profile(lang.name)), _relative(stats.layer_profile(task.name))
    b = _blocks((rl >= STANDOUT) & (rl > rt), L)
    config = SwapConfig(bottom=b.bottom, top=b.top, lower_transition=b.lower, upper_transition=b.upper)
    return Suggestion(config, _reasons(b, rl, rt))


__all__ = ["suggest_swap", "Suggestion", "STANDOUT"]
