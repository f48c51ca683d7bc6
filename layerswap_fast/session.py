"""A layer swap kept current in a loaded model: ``SwapSession.apply(config)`` rewrites only the
tensors whose recipe changes.

A configuration is a plan (one recipe per tensor); two plans of one pair of experts differ only
where a layer changes zone or weights, so moving ``bottom`` from 5 to 4 rewrites two layers. Each
changed tensor is made exactly as ``merge`` makes it (:mod:`layerswap_fast.engine.memory`) and
copied into the model's parameter in place, so the model's state after any sequence of ``apply``
calls is the on-disk merge of the last configuration.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, fields
from typing import Any

from .engine.backends import make_backend
from .engine.memory import merged_buffers
from .errors import ConfigError
from .methods import METHODS
from .methods.swap import SwapConfig, swap_options
from .plan import TensorRecipe
from .streaming import as_tensor, framework_module
from .writing import plan_method, resolve

PathLike = str | os.PathLike[str]
Paths = PathLike | Sequence[PathLike]
#: what ``apply`` hands each changed tensor to when the model is no transformers module
LoadWeights = Callable[[Iterable[tuple[str, Any]]], Any]


@dataclass(frozen=True)
class ApplyReport:
    """What one ``apply`` did: the tensors it rewrote (in output order), their bytes, its seconds."""

    changed: tuple[str, ...]
    bytes: int
    seconds: float

    def summary(self) -> str:
        return f"rewrote {len(self.changed)} tensors ({self.bytes / 1e6:.1f} MB) in {self.seconds:.3f} s"


class SwapSession:
    """Layer swaps of one task expert (or soup) and one language expert (or soup), applied to
    ``model`` in place: a ``torch.nn.Module`` whose state-dict names are the checkpoint's (a
    transformers model), an object with ``load_weights(iterable of (name, tensor))`` (vLLM's
    model), or None, when the session keeps the tensors itself (:attr:`tensors`).

    ``device`` is where the session's own tensors live (model=None); ``compute`` where the
    arithmetic runs. The other keywords are :func:`layerswap_fast.merge`'s.
    """

    def __init__(self, task_expert: Paths, language_expert: Paths, model: Any = None, *, device: str | None = None,
                 dtype: str | None = None, soup_weights: str = "uniform", base: PathLike | None = None,
                 stats: PathLike | None = None, compute: str = "auto", threads: int | None = None) -> None:
        self._fixed = {"task_expert": task_expert, "language_expert": language_expert, "dtype": dtype,
                       "soup_weights": soup_weights, "base": base, "stats": stats}
        self._torch = framework_module("torch" if model is not None or device is not None else "auto")
        self._target = _target(model)
        self.model = model
        self.device = device
        self.compute, self.threads = compute, threads
        self.recipes: dict[str, TensorRecipe] = {}
        #: the current tensors by name, when the session holds them (model=None)
        self.tensors: dict[str, Any] = {}
        self.config: SwapConfig | None = None

    def apply(self, config: SwapConfig | Mapping[str, Any] | None = None) -> ApplyReport:
        """Make the model the swap of ``config`` (a :class:`SwapConfig` or its fields by name),
        rewriting only the tensors whose recipe differs from the current one."""
        config = _config(config)
        start = time.perf_counter()
        swap = METHODS["layer_swap"]
        options = swap_options(config=config, **self._fixed)
        with ExitStack() as stack:
            plan, inputs = plan_method(stack, swap, resolve(swap, options), self.compute, self.threads)
            changed = [r for r in plan.tensors if self.recipes.get(r.name) != r]
            backend = make_backend(self.compute, self.threads)
            stack.callback(backend.close)
            nbytes = 0
            for recipe, view in merged_buffers(changed, inputs, backend, self.threads or 0):
                self._place(recipe.name, as_tensor(view, recipe.dtype, recipe.shape, self._torch))
                self.recipes[recipe.name] = recipe
                nbytes += len(view)
        self.config = config
        return ApplyReport(tuple(r.name for r in changed), nbytes, time.perf_counter() - start)

    def _place(self, name: str, tensor: Any) -> None:
        if self._target is not None:
            parameter = self._target.get(name)
            if parameter is None:
                raise ConfigError(f"the model has no parameter or buffer {name!r} to take the merged tensor")
            if tuple(parameter.shape) != tuple(tensor.shape):
                raise ConfigError(f"the model's {name!r} has shape {list(parameter.shape)}, the merge's "
                                  f"{list(tensor.shape)}")
            with self._torch.no_grad():
                parameter.copy_(tensor)
        elif self.model is not None:
            self.model.load_weights([(name, tensor)])
        else:
            self.tensors[name] = tensor if self.device is None else tensor.to(self.device)


def _target(model: Any) -> dict[str, Any] | None:
    """A module's parameters and buffers by name (tied ones under every name), for ``copy_``;
    None for an object that takes weights through ``load_weights`` (vLLM's models), or no model."""
    if model is None or hasattr(model, "load_weights"):
        return None
    if hasattr(model, "state_dict"):
        return dict(model.state_dict(keep_vars=True))
    raise ConfigError("the model must be a torch module or have a load_weights(weights) method")


def _config(config: SwapConfig | Mapping[str, Any] | None) -> SwapConfig:
    if config is None or isinstance(config, SwapConfig):
        return config or SwapConfig()
    known = {f.name for f in fields(SwapConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ConfigError(f"unknown swap option {unknown[0]!r}: choose from {', '.join(sorted(known))}")
    return SwapConfig(**config)
