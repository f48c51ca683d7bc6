"""A LoRA adapter as a merge's output (``--as-adapter``): the tensors of one PEFT adapter of the
base, from a plan whose adapter terms :func:`~layerswap_fast.plan.lowrank.apply_adapters` has
already made base terms plus low-rank factors.

A tensor of the merge is ``W + Σᵢ wᵢsᵢ·BᵢAᵢ`` (``W`` the base's, ``wᵢ`` the plan's weight of
adapter i, ``sᵢ`` its scale); an adapter holds exactly that when, per module:

- one adapter updates it: its A and B, byte for byte, with scale ``w·s`` (the adapter's own scale
  where the module comes whole from it, ``w = 1``);
- several do: the concatenation ``A = [w₁s₁·A₁; w₂s₂·A₂; ...]`` (rows), ``B = [B₁, B₂, ...]``
  (columns), rank ``Σ rᵢ``, scale 1, since ``B·A = Σᵢ wᵢsᵢ·BᵢAᵢ``.

Numerics: each folded block ``wᵢsᵢ·Aᵢ`` is computed in float32 (the weight rounded to float32, times
``Aᵢ`` in float32) and rounded once into the output A's dtype; B's blocks are converted, exactly
when the output dtype is as wide as theirs. The output dtype of a factor is ``dtype`` when given,
else its inputs' dtype, or float32 where the concatenated parts' dtypes differ (float32 holds
bf16 and f16 values exactly). A copied factor in its own dtype is a byte copy.

A tensor that an adapter saves whole (``modules_to_save``, an embedding's ``base_layer``) is carried
when the merge takes it whole from one adapter; where the merge keeps the base's tensor, the
adapter holds nothing for it. Anything else has no adapter form and is a :class:`ConfigError`: a
blend of saved tensors, a base scaled by a weight other than 1, a module both saved whole and
adapted. Names only, no file: the caller has checked which saved tensors equal the base's.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..dtypes import require_float
from ..errors import ConfigError, param
from . import Factor, SpecLike, TensorRecipe, Term, describe_role
from .lowrank import LoraLike

WEIGHT = ".weight"
BASE_LAYER = ".base_layer."
#: the dtype of a concatenation whose parts differ in dtype: it holds bf16 and f16 values exactly
WIDE = "F32"


class AdapterInput(Protocol):
    """What the conversion reads of an input adapter: its LoRA table and its tensors' specs, by the
    adapter's own tensor names."""

    lora: LoraLike
    specs: Mapping[str, SpecLike]


@dataclass(frozen=True)
class OutputModule:
    """One LoRA module of the output: its name in the base model (the weight's name less
    ``.weight``), rank and scale (ΔW = scale·B·A), whether it is an embedding's
    (``lora_embedding_A/B``), and the adapter roles its factors come from."""

    name: str
    rank: int
    scale: float
    embedding: bool
    roles: tuple[str, ...]

    @property
    def concatenated(self) -> bool:
        return len(self.roles) > 1


@dataclass(frozen=True)
class AdapterPlan:
    """The output adapter: its tensors (by the adapter's names, in the base's order), its LoRA
    modules, and the modules whose tensors it saves whole (PEFT's ``modules_to_save``)."""

    tensors: tuple[TensorRecipe, ...]
    modules: tuple[OutputModule, ...]
    modules_to_save: tuple[str, ...]


def is_one(weight: float) -> bool:
    """Whether ``weight`` is 1 in float32, as a blend computes with it (so weight × x is x)."""
    try:
        return struct.unpack("f", struct.pack("f", weight))[0] == 1.0
    except OverflowError:
        return False


def adapter_plan(tensors: Sequence[TensorRecipe], adapters: Mapping[str, AdapterInput], base: str,
                 dtype: str | None = None) -> AdapterPlan:
    """The output adapter of a plan's ``tensors`` (rewritten by ``apply_adapters``: terms of the
    ``base`` role or of an adapter's saved tensors, plus factors), its factors in ``dtype`` when
    given (see the module's account of dtypes)."""
    out: list[TensorRecipe] = []
    modules: list[OutputModule] = []
    saved: list[str] = []
    for recipe in tensors:
        carried = _carried(recipe, adapters, base)
        factors = [f for f in recipe.factors if f.weight != 0.0]
        if carried is not None:
            role, stored = carried
            if (BASE_LAYER in stored) != bool(factors):
                what = ("as the base layer of its LoRA module, which this merge does not adapt" if BASE_LAYER in stored
                        else "whole (modules_to_save) and this merge also adds LoRA factors to it")
                raise ConfigError(f"{param('as_adapter')}: the {describe_role(role)} saves {recipe.name!r} {what}: "
                                  f"a PEFT adapter cannot hold that: write a full model instead")
            spec = adapters[role].specs[stored]
            out.append(_take(stored, role, spec, recipe.layer, dtype))
            if BASE_LAYER not in stored:
                saved.append(recipe.name.rpartition(".")[0])
        if factors:
            module, recipes = _factors(recipe, factors, adapters, dtype)
            modules.append(module)
            out += recipes
    return AdapterPlan(tuple(out), tuple(modules), tuple(dict.fromkeys(saved)))


def _carried(recipe: TensorRecipe, adapters: Mapping[str, AdapterInput], base: str) -> tuple[str, str] | None:
    """The (role, adapter tensor name) of the saved tensor this recipe takes whole, or None when it
    keeps the base's; a ConfigError when it is neither."""
    weights = {t.role: t.weight for t in recipe.terms if t.weight != 0.0}
    base_weight = weights.pop(base, 0.0)
    if not weights:
        if not is_one(base_weight):
            raise ConfigError(f"{param('as_adapter')}: this merge scales the base's {recipe.name!r} by "
                              f"{base_weight:g}, which an adapter (the base plus B·A) cannot express: write a "
                              f"full model instead")
        return None
    role, weight = next(iter(weights.items()))
    if len(weights) == 1 and base_weight == 0.0 and is_one(weight):
        return role, adapters[role].lora.replaced[recipe.name]
    others = [describe_role(r) for r in weights if r != role] + (["the base"] if base_weight else [])
    raise ConfigError(f"{param('as_adapter')}: the {describe_role(role)} saves {recipe.name!r} whole and this merge "
                      f"blends it with {' and '.join(others)}: an adapter can only take a saved tensor whole from one "
                      f"adapter: write a full model instead")


def _factors(recipe: TensorRecipe, factors: Sequence[Factor], adapters: Mapping[str, AdapterInput],
             dtype: str | None) -> tuple[OutputModule, list[TensorRecipe]]:
    """The module's A and B: copies of one adapter's, or the concatenation of several."""
    if not recipe.name.endswith(WEIGHT):
        raise ConfigError(f"{param('as_adapter')}: {recipe.name!r} has LoRA factors but is no module's weight")
    module = recipe.name[:-len(WEIGHT)]
    a_specs = [adapters[f.role].specs[f.a] for f in factors]
    b_specs = [adapters[f.role].specs[f.b] for f in factors]
    names = {(f.a, f.b) for f in factors}
    if len(names) > 1:  # lora_A.weight in one adapter, lora_embedding_A in another: not one module type
        raise ConfigError(f"{param('as_adapter')}: the adapters store {module!r} as different kinds of LoRA "
                          f"module ({', '.join(sorted(a for a, _ in names))})")
    a_name, b_name = names.pop()
    roles = tuple(f.role for f in factors)
    embedding = a_name.endswith("lora_embedding_A")
    rank = sum(s.shape[0] for s in a_specs)
    if len(factors) == 1:
        f = factors[0]
        return (OutputModule(module, rank, f.weight, embedding, roles),
                [_take(a_name, f.role, a_specs[0], recipe.layer, dtype),
                 _take(b_name, f.role, b_specs[0], recipe.layer, dtype)])
    for spec, name in [*zip(a_specs, [a_name] * len(a_specs)), *zip(b_specs, [b_name] * len(b_specs))]:
        require_float(spec.dtype, name)
    a_dtype, b_dtype = dtype or _common(a_specs), dtype or _common(b_specs)
    rows, cols = b_specs[0].shape[0], a_specs[0].shape[1]
    a = TensorRecipe(a_name, a_dtype, (rank, cols), recipe.layer, "stack_rows",
                     tuple(Term(f.role, f.weight) for f in factors))
    b = TensorRecipe(b_name, b_dtype, (rows, rank), recipe.layer, "join_columns",
                     tuple(Term(f.role, 1.0) for f in factors))
    return OutputModule(module, rank, 1.0, embedding, roles), [a, b]


def _take(name: str, role: str, spec: SpecLike, layer: int | None, dtype: str | None) -> TensorRecipe:
    """Tensor ``name`` of adapter ``role`` as it is: a byte copy, or converted into ``dtype``."""
    if dtype is None or dtype == spec.dtype:
        return TensorRecipe(name, spec.dtype, tuple(spec.shape), layer, "copy", (Term(role, 1.0),))
    require_float(spec.dtype, name)
    return TensorRecipe(name, dtype, tuple(spec.shape), layer, "blend", (Term(role, 1.0),))


def _common(specs: Sequence[SpecLike]) -> str:
    dtypes = Counter(s.dtype for s in specs)
    return next(iter(dtypes)) if len(dtypes) == 1 else WIDE
