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

from .dtypes import TORCH_NAMES
from .engine.backends import CpuBackend, make_backend
from .engine.memory import DeviceFiller, DirectFiller, available_memory, merged_buffers
from .formats.checkpoint import IO_MODES, Checkpoint
from .formats.layout import tensor_nbytes
from .errors import ConfigError
from .methods import METHODS
from .methods.swap import SwapConfig, swap_options
from .options import check_choice
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
    arithmetic runs. ``resident``: keep the experts' tensors in memory once read, so an ``apply``
    reads no file (True: up to half the memory available now; a number: that many bytes): in
    host memory, or, for a model on a GPU, on that GPU, where copies and blends are then made
    (the Triton blend kernel, the bytes of ``merge --device cuda``). ``io``: how the experts are
    read, as ``--io``. The other keywords are :func:`layerswap_fast.merge`'s.
    """

    def __init__(self, task_expert: Paths, language_expert: Paths, model: Any = None, *, device: str | None = None,
                 dtype: str | None = None, soup_weights: str = "uniform", base: PathLike | None = None,
                 stats: PathLike | None = None, compute: str = "auto", threads: int | None = None,
                 resident: bool | int = False, io: str = "auto") -> None:
        self._fixed = {"task_expert": task_expert, "language_expert": language_expert, "dtype": dtype,
                       "soup_weights": soup_weights, "base": base, "stats": stats}
        self._direct = DirectFiller(threads or 0, _budget(resident, available_memory))
        self._io = check_choice("io", io, IO_MODES)
        self._resident = resident
        #: made at the first tensor of a model on an accelerator, when resident layers are asked for
        self._on_device: DeviceFiller | None = None
        self._torch = framework_module("torch" if model is not None or device is not None else "auto")
        self._target = _target(model)
        self.model = model
        self.device = device
        self.compute, self.threads = compute, threads
        self.recipes: dict[str, TensorRecipe] = {}
        #: the current tensors by name, when the session holds them (model=None)
        self.tensors: dict[str, Any] = {}
        self.config: SwapConfig | None = None
        #: the experts, opened by the first apply and read as they were then until close()
        self._opened = ExitStack()
        self._inputs: dict[str, Checkpoint] | None = None

    def close(self) -> None:
        """Close the experts' files (a later ``apply`` opens them again)."""
        self._opened.close()
        self._inputs = None
        self._direct.close()

    def __enter__(self) -> SwapSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def apply(self, config: SwapConfig | Mapping[str, Any] | None = None) -> ApplyReport:
        """Make the model the swap of ``config`` (a :class:`SwapConfig` or its fields by name),
        rewriting only the tensors whose recipe differs from the current one."""
        config = _config(config)
        start = time.perf_counter()
        swap = METHODS["layer_swap"]
        options = swap_options(config=config, **self._fixed)
        with ExitStack() as stack:
            plan, inputs = plan_method(self._opened, swap, resolve(swap, options), self.compute, self.threads,
                                       opened=self._inputs)
            if self._inputs is None:
                for ckpt in inputs.values():
                    ckpt.set_io(self._io)
            self._inputs = inputs
            changed = [r for r in plan.tensors if self.recipes.get(r.name) != r]
            backend = make_backend(self.compute, self.threads)
            stack.callback(backend.close)
            on_cpu = isinstance(backend, CpuBackend)
            rest = []
            for recipe in changed:
                if self._fill_on_device(recipe, inputs):
                    continue
                if on_cpu and self._direct.can_fill(recipe):
                    self._fill(recipe, inputs)
                else:
                    rest.append(recipe)
            for recipe, view in merged_buffers(rest, inputs, backend, self.threads or 0):
                self._place(recipe.name, as_tensor(view, recipe.dtype, recipe.shape, self._torch))
                self.recipes[recipe.name] = recipe
        self.config = config
        return ApplyReport(tuple(r.name for r in changed), sum(tensor_nbytes(r) for r in changed),
                           time.perf_counter() - start)

    def _fill(self, recipe: TensorRecipe, inputs: Mapping[str, Checkpoint]) -> None:
        """A copy or a CPU blend made straight into the model's parameter where it holds the
        recipe's dtype in contiguous host memory, else into a buffer of its own."""
        parameter = None if self._target is None else self._target.get(recipe.name)
        view = _host_bytes(parameter, recipe, self._torch)
        if view is not None:
            self._direct.fill(recipe, inputs, view)
        else:
            import numpy as np  # not on import: a merge never needs it

            data = np.empty(tensor_nbytes(recipe), dtype=np.uint8)
            self._direct.fill(recipe, inputs, data)
            self._place(recipe.name, as_tensor(memoryview(data), recipe.dtype, recipe.shape, self._torch))
        self.recipes[recipe.name] = recipe

    def _fill_on_device(self, recipe: TensorRecipe, inputs: Mapping[str, Checkpoint]) -> bool:
        """With resident layers asked for, a copy or blend into a parameter on an accelerator is
        made there, from the experts' tensors kept on it; False where it cannot be."""
        parameter = None if self._target is None or not self._resident else self._target.get(recipe.name)
        if parameter is None or not _on_accelerator(parameter) or not _matches(parameter, recipe, self._torch):
            return False
        if not DeviceFiller.can_fill(recipe, [inputs[t.role].specs[recipe.source(t)] for t in recipe.terms]):
            return False
        if self._on_device is None:
            self._on_device = DeviceFiller(parameter.device, _budget(self._resident, lambda: _free_on(parameter.device)))
        with self._torch.no_grad():
            self._on_device.fill(recipe, inputs, parameter)
        self.recipes[recipe.name] = recipe
        return True

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


def _host_bytes(parameter: Any, recipe: TensorRecipe, torch: Any) -> Any:
    """The parameter's own bytes as a writable uint8 array, when it is contiguous in host memory,
    has the recipe's dtype and shape, and autograd does not need to see the write; else None."""
    if parameter is None or parameter.device.type != "cpu" or not _matches(parameter, recipe, torch):
        return None
    return parameter.detach().reshape(-1).view(torch.uint8).numpy()


def _matches(parameter: Any, recipe: TensorRecipe, torch: Any) -> bool:
    """Whether the parameter can take the recipe's bytes as they are: contiguous, of its dtype and
    shape, and not empty."""
    return (torch is not None and recipe.dtype in TORCH_NAMES and tensor_nbytes(recipe) > 0
            and parameter.is_contiguous() and parameter.dtype == getattr(torch, TORCH_NAMES[recipe.dtype])
            and tuple(parameter.shape) == tuple(recipe.shape))


def _on_accelerator(parameter: Any) -> bool:
    return parameter.device.type not in ("cpu", "meta")


def _budget(resident: bool | int, free: Callable[[], int]) -> int:
    """Bytes of the experts' tensors to keep: a number as given; True, half of what ``free`` says
    is free now; False, none."""
    if resident is True:
        return free() // 2
    if resident is False or resident is None:
        return 0
    if isinstance(resident, bool) or not isinstance(resident, int) or resident < 0:
        raise ConfigError(f"resident must be True, False or a number of bytes, got {resident!r}")
    return resident


def _free_on(device: Any) -> int:
    """Bytes free on a torch device now (a CPU tensor's: the host's)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_memory()


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
