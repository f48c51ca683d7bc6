"""LoRA adapters in a plan: a method plans as if every adapter were the full model it makes
(base + ΔW), and :func:`apply_adapters` then rewrites each recipe in terms of what is on disk.

A term ``w × adapter`` becomes ``w × base`` (or ``w ×`` the adapter's own tensor where it replaces
the base's whole) plus the factor ``w·s × B·A`` where the adapter updates that tensor. Terms of one
input are summed, so a tensor no adapter touches goes back to being a byte copy of the base.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from ..errors import ConfigError
from . import Factor, MergePlan, TensorRecipe, Term, describe_role


@dataclass(frozen=True)
class Delta:
    """One module's update as an adapter stores it: ΔW = scale·B·A, or its transpose
    (embeddings, ``fan_in_fan_out`` layers)."""

    a: str
    b: str
    rank: int
    scale: float
    transposed: bool


class LoraLike(Protocol):
    deltas: Mapping[str, Delta]
    replaced: Mapping[str, str]


def apply_adapters(plan: MergePlan, adapters: Mapping[str, LoraLike], base: str,
                   dtypes: Mapping[str, Mapping[str, str]]) -> MergePlan:
    """``plan`` with every term of an adapter role (a key of ``adapters``) made of the ``base``
    role's tensors and the adapter's factors; ``dtypes`` by role and tensor name."""
    tensors = tuple(_expand(r, adapters, base, dtypes) if any(t.role in adapters for t in r.terms) else r
                    for r in plan.tensors)
    return replace(plan, tensors=tensors)


def _expand(recipe: TensorRecipe, adapters: Mapping[str, LoraLike], base: str,
            dtypes: Mapping[str, Mapping[str, str]]) -> TensorRecipe:
    if recipe.op not in ("copy", "blend"):
        role = next(t.role for t in recipe.terms if t.role in adapters)
        raise ConfigError(f"{recipe.op} needs every model's full weights, but the {describe_role(role)} is a "
                          f"LoRA adapter: merge it into its base first, or use a method that blends")
    weights: dict[str, float] = {}
    factors = []
    for term in recipe.terms:
        lora = adapters.get(term.role)
        source = term.role if lora is None or recipe.name in lora.replaced else base
        weights[source] = weights.get(source, 0.0) + term.weight
        delta = None if lora is None else lora.deltas.get(recipe.name)
        if delta is not None:
            factors.append(Factor(term.role, delta.a, delta.b, term.weight * delta.scale, delta.transposed))
    terms = tuple(Term(role, w) for role, w in weights.items())
    if factors:
        return replace(recipe, op="blend_lowrank", terms=terms, factors=tuple(factors))
    if len(terms) == 1 and _is_one(terms[0].weight) and dtypes[terms[0].role][recipe.name] == recipe.dtype:
        return replace(recipe, op="copy", terms=(Term(terms[0].role, 1.0),))
    return replace(recipe, op="blend", terms=terms)


def _is_one(weight: float) -> bool:
    """Whether the blend's float32 weight is 1, so weight × x is x and the blend a copy (halves
    of one base summed, say)."""
    try:
        return struct.unpack("f", struct.pack("f", weight))[0] == 1.0
    except OverflowError:
        return False
