"""Sweeps: many layer swaps of many expert pairs, each candidate written once, shared work done once.

A spec (YAML) lists task experts and language experts (a cross product, or explicit ``pairs``; an
entry that is a list is a soup, as in ``merge``) and a ``grid`` of swap options. Every candidate is
an ordinary merge into its own directory under the sweep's, with its own recipe; what makes the
sweep cheaper than separate merges is that a tensor computed for one candidate (same inputs, same
weights, same op and dtype) is never computed again: a later candidate copies it from the earlier
output (a kernel-side copy, or a shard-level reflink or hard link per ``link``), and input shards
that a candidate leaves whole are reused as ``merge --link`` does. A re-run skips every candidate
that is already complete and verifies. ``sweep.json`` and ``sweep.csv`` list the candidates.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError, LayerswapError
from .evaluation import Evaluator, load_evaluator
from .formats.adapter import is_adapter
from .methods.method import as_list
from .sweep_build import (OpenExperts, RecipeKey, Settings, Writeback, build_one, earlier_outputs, evaluate_candidate,
                          write_manifest)
from .sweep_spec import Candidate, candidates, read_spec

PathLike = str | os.PathLike[str]
Report = Callable[[Candidate], None]


def sweep(spec: PathLike | Mapping[str, Any], out: PathLike, *, link: str = "auto", threads: int | None = None,
          device: str = "auto", dry_run: bool = False, checksum: str | None = None, io: str = "auto",
          evaluate: str | Evaluator | None = None, in_memory: bool = False, ray: str | None = None,
          report: Report | None = None) -> list[Candidate]:
    """Build every candidate of ``spec`` (a spec file, or its parsed content) under ``out``; see
    the module's text. ``evaluate`` (a function, or ``module:function`` / ``perplexity:FILE``) is
    called with each candidate's directory, or with ``in_memory`` with a model that a
    :class:`SwapSession` keeps equal to the candidate (nothing but the manifest is written); its
    dict goes into the candidate's ``metrics``. A candidate that fails is reported (status
    ``failed``, its error) and the others go on. ``ray`` (``local``, or a cluster's address) runs
    each candidate as a Ray task on nodes that see the inputs and ``out`` at the same paths; a task
    waits for the candidates it copies tensors from, so the manifest is the local run's. Returns the
    candidates as ``sweep.json`` lists them."""
    found = read_spec(spec) if isinstance(spec, (str, os.PathLike)) else candidates(spec)
    evaluator = load_evaluator(evaluate) if isinstance(evaluate, str) else evaluate
    root = Path(out)
    if in_memory:
        if evaluator is None:
            raise ConfigError("an in-memory sweep writes no candidates: it needs an evaluator")
        return _in_memory(found, root, evaluator, threads, device, report)
    settings = Settings(link, threads, device, dry_run, checksum, evaluator, io)
    if ray is not None and not dry_run:
        from .sweep_ray import run_on_ray
        return run_on_ray(found, root, ray, settings, report)
    made: dict[RecipeKey, Path] = {}
    pair: list[Path] = []  # the candidates built from the experts opened last
    pair_inputs = None
    with earlier_outputs() as output_of, OpenExperts() as experts, Writeback() as writeback:
        for candidate in found:
            candidate.path = root / candidate.name
            build_one(candidate, made, output_of, settings, experts)
            if not dry_run:
                write_manifest(root, found)
                if experts.inputs != pair_inputs:
                    if pair:
                        writeback.release(pair)  # a later pair computes nothing an earlier one did
                    pair, pair_inputs = [], experts.inputs
                if candidate.status == "built":
                    writeback.flush(candidate.path)
                    pair.append(candidate.path)
            if report is not None:
                report(candidate)
        if pair:
            writeback.release(pair)
    return found


def _in_memory(found: list[Candidate], root: Path, evaluator: Evaluator, threads: int | None, device: str,
               report: Report | None) -> list[Candidate]:
    """Each candidate applied to one loaded model by a session per expert pair, then evaluated."""
    from .session import SwapSession
    model, session, pair = None, None, None
    for candidate in found:
        start = time.perf_counter()
        o = candidate.options
        try:
            if (o["task_expert"], o["language_expert"]) != pair:
                pair = (o["task_expert"], o["language_expert"])
                model = model or _load_model(o)
                session = SwapSession(*pair, model, dtype=o["dtype"], soup_weights=o["soup_weights"], base=o["base"],
                                      stats=o["stats"], compute=device, threads=threads)
            assert session is not None
            changed = session.apply({k: o[k] for k in _SESSION_KEYS})
            candidate.status, candidate.shared = "evaluated", 0
            candidate.computed = len(changed.changed)
            evaluate_candidate(candidate, evaluator, model)
        except LayerswapError as e:
            candidate.status, candidate.error = "failed", str(e)
        candidate.seconds = time.perf_counter() - start
        write_manifest(root, found)
        if report is not None:
            report(candidate)
    return found


_SESSION_KEYS = ("bottom", "top", "lower_transition", "upper_transition", "transition_weights", "non_layer")


def _load_model(options: Mapping[str, Any]) -> Any:
    """The model an in-memory sweep updates: loaded once from the first task expert (or, for an
    adapter, its base)."""
    import torch
    from transformers import AutoModelForCausalLM

    first = as_list(options["task_expert"])[0]
    source = options["base"] if is_adapter(first) else first
    # float32 holds every merge dtype exactly, and evaluates as a written candidate loaded in float32
    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
