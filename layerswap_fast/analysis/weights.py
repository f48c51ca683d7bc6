"""Magnitude weights for a merge: the experts given by path, their weights from a statistics
directory (matched by path or content) or from a fresh analysis against the base."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..errors import ConfigError
from .files import StatsError, load_stats
from .scan import PathLike, analyze, input_ref, open_base, open_expert
from .stats import DeltaStats, InputRef, sum_to_one


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
    """The paper's magnitude weights (∝ 1 / average MAV, summing to 1) of ``experts``, in order;
    an expert may be a LoRA adapter of ``base`` (its average MAV is that of s·B·A).

    From ``stats_dir`` (an ``analyze`` output) when given: each expert is found there by its
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
        with open_base(base) as b:
            ref = input_ref(b)
        if (ref.fingerprint, ref.sample) != (stats.base.fingerprint, stats.base.sample):
            raise StatsError(f"the statistics in {stats_dir} were computed against the base "
                             f"{stats.base.path}, not {base}")
    names = []
    for p in paths:
        with open_expert(p) as c:
            names.append(_match(input_ref(c), stats, "expert"))
    by_name = stats.magnitude_weights(list(dict.fromkeys(names)))  # ConfigError for a zero MAV
    # the same expert given twice counts twice, as in the computed case
    return sum_to_one([by_name[n] for n in names])


__all__ = ["magnitude_weights_for"]
