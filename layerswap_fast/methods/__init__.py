"""The merge methods, by name: one module each, declaring its options once and planning its merge.

A new method is a module with a ``METHOD`` (:class:`~layerswap_fast.methods.method.Method`) and one
line below; the CLI command, the API's ``run(name, ...)``, ``--config`` files and recipes follow.
"""

from __future__ import annotations

from . import mergekit, revert, soup, swap, task_arithmetic, ties
from .method import Method, Option, PlanInputs

METHODS: dict[str, Method] = {m.name: m for m in (
    swap.METHOD,
    soup.METHOD,
    task_arithmetic.METHOD,
    ties.METHOD,
    revert.METHOD,
    mergekit.METHOD,
)}

__all__ = ["METHODS", "Method", "Option", "PlanInputs"]
