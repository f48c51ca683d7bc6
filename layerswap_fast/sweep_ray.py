"""A sweep's candidates as Ray tasks, on an existing cluster or a local instance.

Each task builds (and evaluates) one candidate on a node that sees the inputs and the sweep's
directory at the same paths (a shared filesystem: the one assumption). A candidate that copies
tensors from earlier candidates waits for their tasks, so every candidate shares exactly what it
shares in a local run and the manifest is the same. ``ray`` is an optional dependency
(``pip install layerswap-fast[ray]``), imported only here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConfigError, LayerswapError
from .sweep_build import RecipeKey, Settings, build_one, earlier_outputs, recipe_keys, write_manifest
from .sweep_spec import Candidate

Report = Callable[[Candidate], None]


def run_on_ray(found: list[Candidate], root: Path, address: str, settings: Settings,
               report: Report | None) -> list[Candidate]:
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs ray: pip install 'layerswap-fast[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, log_to_driver=False)
    task = ray.remote(_task)
    provider: dict[RecipeKey, int] = {}
    refs: list[Any] = []
    for i, candidate in enumerate(found):
        candidate.path = root / candidate.name
        try:
            keys = recipe_keys(candidate, settings.device)
        except LayerswapError:  # it cannot be planned: its task fails the same way, and shares nothing
            keys = []
        deps = sorted({provider[k] for k in keys if k in provider})
        for k in keys:
            provider.setdefault(k, i)
        made = {k: found[j].path for k, j in provider.items() if j in deps}
        refs.append(task.remote(candidate, made, settings, *[refs[j] for j in deps]))
    for i, ref in enumerate(refs):
        found[i] = ray.get(ref)
        write_manifest(root, found)
        if report is not None:
            report(found[i])
    return found


def _task(candidate: Candidate, made: dict[RecipeKey, Path], settings: Settings, *earlier: Candidate) -> Candidate:
    """One candidate, on whichever node runs it; tensors come only from earlier candidates that
    were built (a failed one leaves its tensors to be computed here)."""
    ok = {c.path for c in earlier if c.status in ("built", "complete")}
    with earlier_outputs() as output_of:
        return build_one(candidate, {k: p for k, p in made.items() if p in ok}, output_of, settings)

