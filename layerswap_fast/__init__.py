"""layerswap-fast: streaming, low-memory layer swapping of safetensors LLM checkpoints.

Layer swapping (Bandarkar et al., ICLR 2025, arXiv 2410.01335) keeps the middle transformer layers
of a task expert, swaps in the bottom and top layers of a language expert, blends the transition
zones between them and averages the non-layer parameters.

    import layerswap_fast as ls
    ls.merge(task_expert="math", language_expert="swh", out="merged",
             config=ls.SwapConfig(bottom=4, top=1))
    stats = ls.analyze(base="llama", experts=["math", "swh"], out_dir="stats")
"""

from ._core import __version__
from .api import MergeResult, merge, plan_merge, revert, run, run_mergekit_config, soup, task_arithmetic, ties
from .formats.checkpoint import Checkpoint, TensorSpec, open_checkpoint
from .errors import (CheckpointError, ConfigError, LayerswapError, MismatchError, OutputError,
                     UnsupportedDtypeError)
from .methods.swap import SwapConfig, render_plan
from .plan import MergePlan, TensorRecipe, Term
from .session import ApplyReport, SwapSession
from .streaming import iter_merged
from .sweeps import Candidate, sweep
from .formats.verify import VerifyError, VerifyReport, verify

__all__ = [
    "__version__", "run", "run_mergekit_config", "iter_merged", "SwapSession", "ApplyReport", "sweep", "Candidate", "merge", "soup", "task_arithmetic", "ties", "revert", "plan_merge", "MergeResult", "SwapConfig",
    "MergePlan", "TensorRecipe", "Term", "render_plan", "open_checkpoint", "Checkpoint",
    "TensorSpec", "LayerswapError", "CheckpointError", "ConfigError", "MismatchError",
    "OutputError", "UnsupportedDtypeError", "verify", "VerifyError", "VerifyReport",
    "analyze", "load_stats", "suggest_swap", "DeltaStats",
]

_ANALYSIS = ("analyze", "load_stats", "suggest_swap", "DeltaStats")


def __getattr__(name: str) -> object:
    # the analysis needs numpy and matplotlib: loaded on first use, so `merge` starts fast
    if name in _ANALYSIS:
        from . import analysis
        return getattr(analysis, name)
    raise AttributeError(f"module 'layerswap_fast' has no attribute {name!r}")
