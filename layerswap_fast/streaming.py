"""Merged tensors handed to a consumer instead of written: ``iter_merged``.

The shape that ``vllm``'s ``model.load_weights(iterable)`` and transformers'
``model.load_state_dict(dict(...), assign=True)`` take: ``(name, tensor)`` pairs in output order,
one tensor made at a time (:mod:`layerswap_fast.engine.memory`), with the bytes ``merge`` would
write.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from typing import Any

from .dtypes import TORCH_NAMES
from .engine.backends import make_backend
from .engine.memory import merged_buffers
from .errors import ConfigError
from .formats.checkpoint import IO_MODES
from .methods import METHODS
from .options import check_choice
from .writing import plan_method, resolve

#: numpy's name of each safetensors dtype; BF16 and the 8-bit floats, which numpy lacks, come as
#: their raw bit patterns (uint16, uint8)
NUMPY_NAMES = {"F8_E4M3": "uint8", "F8_E5M2": "uint8", "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "F16": "float16",
               "BF16": "uint16", "I32": "int32", "U32": "uint32", "F32": "float32", "I64": "int64",
               "U64": "uint64", "F64": "float64"}
FRAMEWORKS = ("auto", "torch", "numpy")


def iter_merged(method: str, options: Mapping[str, Any], *, framework: str = "auto", device: str | None = None,
                pin_memory: bool = False, compute: str = "auto", threads: int | None = None,
                io: str = "auto") -> Iterator[tuple[str, Any]]:
    """Yield ``(name, tensor)`` for every output tensor of ``method`` with its ``options`` (as
    :func:`layerswap_fast.run` takes them), in output order, without writing anything.

    ``framework``: ``torch`` tensors (the default when torch is installed), else ``numpy`` arrays
    (BF16 as uint16 bit patterns: numpy has no bfloat16). ``device`` moves each torch tensor there
    (``cuda``, say); ``pin_memory`` puts it in page-locked memory first, for fast copies to a GPU.
    ``compute`` is where the arithmetic runs (``auto``, ``cpu``, ``cuda``), as ``--device`` for a
    merge; ``io`` how the inputs are read, as ``--io``. Memory holds the tensor being handed over
    and the op's chunk buffers; a tensor stays valid for as long as the consumer keeps it.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown merge method {method!r}: choose one of {', '.join(METHODS)}")
    torch = framework_module(framework)
    if torch is None and (device is not None or pin_memory):
        raise ConfigError("device and pin_memory need torch tensors (framework='torch')")
    if pin_memory and not torch.cuda.is_available():
        raise ConfigError("pin_memory needs a CUDA device: page-locked memory only speeds up copies to one")
    check_choice("io", io, IO_MODES)
    m = METHODS[method]
    values = resolve(m, options)
    if values.get("as_adapter"):
        raise ConfigError("iter_merged yields a full model's tensors; as_adapter writes an adapter: use run()")
    with ExitStack() as stack:
        plan, inputs = plan_method(stack, m, values, compute, threads)
        for ckpt in inputs.values():
            ckpt.set_io(io)
        backend = make_backend(compute, threads)
        stack.callback(backend.close)
        for recipe, view in merged_buffers(plan.tensors, inputs, backend, threads or 0):
            yield recipe.name, as_tensor(view, recipe.dtype, recipe.shape, torch, device, pin_memory)


def framework_module(name: str) -> Any:
    """The torch module for ``torch`` (or ``auto`` when it is installed), else None."""
    if name not in FRAMEWORKS:
        raise ConfigError(f"framework must be one of {', '.join(FRAMEWORKS)}, got {name!r}")
    if name == "numpy":
        return None
    try:
        import torch
    except ImportError:
        if name == "torch":
            raise ConfigError("framework='torch' needs torch installed") from None
        return None
    return torch


def as_tensor(view: memoryview, dtype: str, shape: tuple[int, ...], torch: Any, device: str | None = None,
              pin_memory: bool = False) -> Any:
    """The bytes as a tensor of ``torch`` (the module), or a numpy array when ``torch`` is None."""
    import numpy as np

    if torch is None:
        return np.frombuffer(view, dtype=NUMPY_NAMES[dtype]).reshape(shape)
    torch_dtype = getattr(torch, TORCH_NAMES.get(dtype) or _TORCH_OTHER[dtype])
    tensor = (torch.frombuffer(view, dtype=torch_dtype).reshape(shape) if len(view)
              else torch.empty(shape, dtype=torch_dtype))
    if pin_memory:
        tensor = tensor.pin_memory()
    return tensor if device is None else tensor.to(device, non_blocking=pin_memory)


_TORCH_OTHER = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32",
                "U32": "uint32", "I64": "int64", "U64": "uint64", "F64": "float64", "F8_E4M3": "float8_e4m3fn",
                "F8_E5M2": "float8_e5m2"}
