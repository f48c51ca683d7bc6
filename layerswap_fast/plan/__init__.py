"""The merge plan: one recipe per output tensor, computed from names, shapes and options alone.

Every method (``layerswap_fast.methods``) plans into these types: a recipe names an op, its input
tensors with their weights, and every number the op needs, so the engine only executes. No file is
touched here, so a plan can be printed, saved as JSON and tested on its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from ..dtypes import require_float
from ..errors import MismatchError


class SpecLike(Protocol):
    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Term:
    """One input of a recipe: the tensor of the same name in the input ``role`` (``task``,
    ``model.1``, ``base`` ...), times ``weight``."""

    role: str
    weight: float
    #: the input's tensor of this name, when it is not the output's (a mergekit slice renumbers layers)
    name: str | None = None

    @property
    def expert(self) -> str:
        """The same as :attr:`role` (its name before the base and models were roles too)."""
        return self.role


@dataclass(frozen=True)
class Factor:
    """A low-rank input of a recipe: ``weight`` × B·A (or its transpose) from the factors named
    ``a`` and ``b`` of the LoRA adapter in ``role``; ``weight`` includes the adapter's scale."""

    role: str
    a: str
    b: str
    weight: float
    transposed: bool


@dataclass(frozen=True)
class LayerRow:
    """One row of the layer map: which zone a layer falls in and how it is made."""

    layer: int
    zone: str  # "language" | "lower transition" | "task" | "upper transition"
    terms: tuple[Term, ...]


#: ``copy`` and ``blend``, or another op of the engine's table (``layerswap_fast.engine.ops.OPS``)
Op = str


@dataclass(frozen=True)
class TensorRecipe:
    """How one output tensor is made from the same-named tensors of the inputs in ``terms``.

    ``copy``: the bytes of ``terms[0]``'s tensor, unchanged. ``blend``: sum of weight × float32
    value, rounded into ``dtype``. ``blend_lowrank``: the blend plus Σ weight × B·A of the LoRA
    ``factors``, in float32, rounded once. ``ties``: TIES-merging of the deltas of ``terms[1:]`` against
    the base ``terms[0]``, keeping ``keep`` deltas per model, scaled by ``lambda``. ``revert_rows``:
    rows of ``terms[1]`` go back to the base ``terms[0]`` where their row MAV against it is below
    ``threshold``, or the ``count`` rows of smallest row MAV. ``stack_rows``: the terms' matrices
    one below the other, each weight × float32 value rounded into ``dtype``; ``join_columns``: the
    same side by side (the A and B factors of a merged LoRA adapter). ``params`` holds those numbers.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    layer: int | None
    op: Op
    terms: tuple[Term, ...]
    params: tuple[tuple[str, float], ...] = ()
    factors: tuple[Factor, ...] = ()
    #: the dtype the op rounds to after each step, as torch does (the ``mk_*`` ops); None: float32
    compute_dtype: str | None = None

    def param(self, key: str) -> float:
        return dict(self.params)[key]

    def source(self, term: Term) -> str:
        """The name of the tensor ``term`` reads."""
        return term.name or self.name


@dataclass(frozen=True)
class MergePlan:
    """One recipe per output tensor; a swap adds the layer table and non-layer sources it came from."""

    num_layers: int
    config: Any
    dtype: str | None
    layers: tuple[LayerRow, ...]
    non_layer: tuple[Term, ...]
    tensors: tuple[TensorRecipe, ...] = field(repr=False)
    method: str = "layer_swap"
    #: keys of the output's config.json that differ from the side source's (a mergekit slice
    #: changes ``num_hidden_layers``)
    config_changes: tuple[tuple[str, Any], ...] = ()

    def counts(self) -> dict[str, int]:
        copies = sum(t.op == "copy" for t in self.tensors)
        return {"tensors": len(self.tensors), "copy": copies, "blend": len(self.tensors) - copies}

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "num_layers": self.num_layers,
            "config": asdict(self.config) if self.config is not None else None,
            "dtype": self.dtype,
            "layers": [{"layer": r.layer, "zone": r.zone, "sources": _terms_json(r.terms)} for r in self.layers],
            "non_layer": {
                "sources": _terms_json(self.non_layer),
                "tensors": [t.name for t in self.tensors if t.layer is None],
            },
            "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "layer": t.layer,
                         "op": t.op, "sources": _terms_json(t.terms), **dict(t.params),
                         **({"factors": [asdict(f) for f in t.factors]} if t.factors else {})}
                        for t in self.tensors],
            "counts": self.counts(),
        }


def _terms_json(terms: Sequence[Term]) -> list[dict[str, Any]]:
    return [{"expert": t.role, "weight": t.weight, **({"tensor": t.name} if t.name else {})} for t in terms]


def check_same_tensors(reference: tuple[str, Sequence[SpecLike]], other: tuple[str, Sequence[SpecLike]]) -> None:
    """Same tensor names and shapes in both checkpoints; the first difference is named."""
    (ref_role, ref), (role, specs) = reference, other
    by_name = {s.name: s for s in specs}
    for spec in ref:
        mine = by_name.get(spec.name)
        if mine is None:
            raise MismatchError(f"tensor {spec.name!r} is in the {ref_role} but not in the {role}")
        if tuple(mine.shape) != tuple(spec.shape):
            raise MismatchError(f"tensor {spec.name!r} has shape {list(spec.shape)} in the {ref_role} but "
                                f"{list(mine.shape)} in the {role}")
    ref_names = {s.name for s in ref}
    for spec in specs:
        if spec.name not in ref_names:
            raise MismatchError(f"tensor {spec.name!r} is in the {role} but not in the {ref_role}")


def describe_role(role: str) -> str:
    """``task`` → ``task expert``; ``task.1`` → ``task expert 2``; ``model.0`` → ``model 1``."""
    kind, _, index = role.partition(".")
    noun = {"task": "task expert", "language": "language expert"}.get(kind, kind)
    return f"{noun} {int(index) + 1}" if index else noun


def make_recipe(spec: SpecLike, layer: int | None, terms: Sequence[Term], out_dtype: str,
                dtypes: Mapping[str, Mapping[str, str]], op: Op | None = None,
                params: tuple[tuple[str, float], ...] = ()) -> TensorRecipe:
    """A recipe for ``spec``: a byte copy when ``terms`` is one input taken whole in the output
    dtype, else ``op`` (default ``blend``), whose inputs must all be float tensors."""
    terms = tuple(terms)
    if (op is None and len(terms) == 1 and terms[0].weight == 1.0 and terms[0].name is None
            and dtypes[terms[0].role][spec.name] == out_dtype):
        return TensorRecipe(spec.name, out_dtype, tuple(spec.shape), layer, "copy", terms)
    for term in terms:
        require_float(dtypes[term.role][spec.name], spec.name)
    require_float(out_dtype, spec.name)
    return TensorRecipe(spec.name, out_dtype, tuple(spec.shape), layer, op or "blend", terms, params)


