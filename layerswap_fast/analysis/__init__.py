"""Where did fine-tuning move the weights? Row-MAV statistics of experts against their base.

For every 1-D or 2-D parameter ``W`` (a tensor of more dimensions counts as ``shape[0]`` rows of
``prod(shape[1:])`` columns) and every expert, the **row MAV** is the mean absolute value of
``expert - base`` over each row; a 1-D parameter is one row (Section 3.2 of Bandarkar et al.,
arXiv 2410.01335). Per expert and tensor we keep the number of rows, the mean and the maximum of
its row MAVs; per expert the **average MAV**, the mean of the row MAVs over all rows of all
parameters (``sum over tensors of sum-of-row-MAVs / sum of rows``). The paper's
magnitude-adjusted average weights each expert by ``1 / average MAV``, normalised to sum 1
(:func:`magnitude_weights`).

One module per job: :mod:`.stats` (the data model and the magnitude weights), :mod:`.scan`
(validating the inputs and the streaming pass, :func:`analyze`), :mod:`.files` (the output
directory, :func:`write_stats` / :func:`load_stats`), :mod:`.weights` (magnitude weights of
experts given by path, for a merge), :mod:`.suggest` (a layer-swap configuration read off the
statistics) and :mod:`.heatmap` (the paper's Figure 2).
"""

from __future__ import annotations

from .files import CSV_COLUMNS, SUMMARY_SCHEMA, StatsError, load_stats, write_stats
from .scan import analyze, expert_names
from .stats import DeltaStats, ExpertStats, InputRef, TensorStat, check_expert_name, magnitude_weights
from .suggest import Suggestion, suggest_swap
from .weights import magnitude_weights_for

__all__ = [
    "analyze", "load_stats", "write_stats", "magnitude_weights_for", "magnitude_weights", "suggest_swap",
    "DeltaStats", "ExpertStats", "TensorStat", "InputRef", "Suggestion", "StatsError",
    "expert_names", "check_expert_name", "CSV_COLUMNS", "SUMMARY_SCHEMA",
]
