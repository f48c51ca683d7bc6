"""mergekit 0.1.5's merges from its YAML config, planned tensor by tensor as mergekit plans them.

The plan follows mergekit's ``MergePlanner``: the tensors before the layers (embeddings) take the
first slice's sources, the layers each slice's in turn (renumbered from 0, so slices may stack more
layers than any input has), the tensors after the layers (final norm, lm_head) the last slice's.
Parameters resolve per tensor with mergekit's precedence (the source's own, the slice's, the
config's), per-model ones by the input tensor's name, shared ones by the output's; a gradient
takes ``t = i/(L−1)`` at the i-th of a slice's L layers (1 when L is 1) and 0 outside the layers.
Each recipe names one of the ``mk_*`` ops, which compute what mergekit computes in its dtype
(``dtype``, else the inputs' promoted dtype), then round into ``out_dtype``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, MismatchError
from ..formats.model_card import local_name
from ..plan import MergePlan, SpecLike, TensorRecipe, Term
from ..plan.layers import classify, renumber
from .common import BASE, model_role
from .method import Method, Option, PathLike, PlanInputs
from .mergekit_config import DTYPES, MergekitConfig, OutputSlice, Param, Source, parse_config, resolve


@dataclass(frozen=True)
class MergekitMethod:
    """One of mergekit's methods as we plan it: its op, its parameters, and for the generalized
    task arithmetic family its consensus (0 none, 1 sum) and sparsification."""

    name: str
    op: str
    params: tuple[Param, ...]
    uses_base: bool = False
    #: a base is used when the config names one (nuslerp, multislerp)
    optional_base: bool = False
    consensus: int = 0
    sparsify: str | None = None


def _task_arithmetic(name: str, consensus: int, sparsify: str | None, normalize: bool,
                     more: tuple[Param, ...] = (), rescale: bool = False) -> MergekitMethod:
    params = (Param("int8_mask", bool, "shared", False), Param("normalize", bool, "shared", normalize),
              Param("rescale", bool, "shared", rescale), Param("lambda", float, "shared", 1.0),
              Param("weight", float, "non_base", required=True), Param("density", float, "non_base", 1.0), *more)
    return MergekitMethod(name, "mk_delta", params, uses_base=True, consensus=consensus, sparsify=sparsify)


GAMMA = Param("gamma", float, "non_base", 0.01)
EPSILON = Param("epsilon", float, "non_base", 0.15)
MERGEKIT_METHODS = {m.name: m for m in (
    MergekitMethod("linear", "mk_linear", (Param("weight", float, "input", required=True),
                                           Param("normalize", bool, "shared", True))),
    MergekitMethod("passthrough", "mk_passthrough", (Param("scale", float, "input"),)),
    MergekitMethod("slerp", "mk_slerp", (Param("t", float, "shared", required=True),), uses_base=True),
    MergekitMethod("nearswap", "mk_nearswap", (Param("t", float, "shared", required=True),), uses_base=True),
    MergekitMethod("model_stock", "mk_model_stock", (Param("filter_wise", bool, "shared", False),), uses_base=True),
    MergekitMethod("sce", "mk_sce", (Param("int8_mask", bool, "shared", False),
                                     Param("select_topk", float, "shared", 1.0)), uses_base=True),
    MergekitMethod("nuslerp", "mk_nuslerp", (Param("weight", float, "non_base", required=True),
                                             Param("nuslerp_row_wise", bool, "shared", False),
                                             Param("nuslerp_flatten", bool, "shared", True)), optional_base=True),
    MergekitMethod("multislerp", "mk_multislerp", (Param("weight", float, "non_base", required=True),
                                                   Param("normalize_weights", bool, "shared", True),
                                                   Param("eps", float, "shared", 1e-8)), optional_base=True),
    MergekitMethod("ram", "mk_ram", (Param("epsilon", float, "shared", 1e-5),), uses_base=True),
    MergekitMethod("ramplus_tl", "mk_ram", (Param("r", float, "shared", 0.1), Param("alpha", float, "shared", 0.2),
                                            Param("epsilon", float, "shared", 1e-5)), uses_base=True),
    _task_arithmetic("task_arithmetic", 0, None, False),
    _task_arithmetic("ties", 1, "magnitude", True),
    _task_arithmetic("breadcrumbs", 0, "magnitude_outliers", False, (GAMMA,)),
    _task_arithmetic("breadcrumbs_ties", 1, "magnitude_outliers", False, (GAMMA,)),
    _task_arithmetic("dare_linear", 0, "random", False, rescale=True),
    _task_arithmetic("dare_ties", 1, "random", False, rescale=True),
    _task_arithmetic("della", 1, "della_magprune", True, (EPSILON,), rescale=True),
    _task_arithmetic("della_linear", 0, "della_magprune", False, (EPSILON,), rescale=True),
)}


def config_roles(config: MergekitConfig) -> dict[str, str]:
    """Each model the config names → its input role: the base ``base``, the others ``model.i``."""
    roles = {}
    for name in config.referenced():
        roles[name] = BASE if name == config.base_model else model_role(len(roles) - (BASE in roles.values()))
    return roles


def _inputs(options: Mapping[str, Any]) -> dict[str, PathLike]:
    config = parse_config(options["yaml"])
    if config.merge_method not in MERGEKIT_METHODS:
        raise ConfigError(f"merge_method {config.merge_method!r} is not supported; supported: "
                          f"{', '.join(MERGEKIT_METHODS)}")
    return {role: path for path, role in config_roles(config).items()}


def _plan(inputs: PlanInputs, options: Mapping[str, Any]) -> MergePlan:
    config = parse_config(options["yaml"])
    return MergekitPlanner(config, config_roles(config), inputs.specs, options.get("random_seed") or 0).plan()


class MergekitPlanner:
    """Turns a config and the inputs' tensor specs (by role) into a plan."""

    def __init__(self, config: MergekitConfig, roles: Mapping[str, str], specs: Mapping[str, Sequence[SpecLike]],
                 seed: int = 0):
        self.config, self.roles, self.seed = config, roles, seed
        self.method = MERGEKIT_METHODS[config.merge_method]
        self.specs = {role: {s.name: s for s in role_specs} for role, role_specs in specs.items()}
        self.recipes: list[TensorRecipe] = []

    def slices(self) -> tuple[OutputSlice, ...]:
        c = self.config
        if c.slices is not None:
            return c.slices
        assert c.models is not None
        sources = list(c.models)
        if c.base_model and all(s.model != c.base_model for s in sources):
            sources.append(Source(c.base_model, None, {}))
        return (OutputSlice(tuple(sources), None, {}),)

    def layers_of(self, model: str) -> dict[int, list[str]]:
        by_layer: dict[int, list[str]] = {}
        for name in self.specs[self.roles[model]]:
            layer = classify(name).layer
            if layer is not None:
                by_layer.setdefault(layer, []).append(name)
        return by_layer

    def plan(self) -> MergePlan:
        slices = self.slices()
        first, last = slices[0], slices[-1]
        outside = [n for n in self.specs[self.roles[first.sources[0].model]] if classify(n).layer is None]
        before = [n for n in outside if classify(n).kind == "embed"]
        for name in before:
            self.tensor(name, [(s, name) for s in first.sources], first, 0.0)
        layer = 0
        for out in slices:
            layer = self.plan_slice(out, layer)
        for name in outside:
            if name not in before:
                self.tensor(name, [(s, name) for s in last.sources], last, 0.0)
        changes = (("num_hidden_layers", layer),) if self.config.slices is not None else ()
        dtype = self.config.out_dtype or self.config.dtype
        return MergePlan(layer, self.config, dtype, (), (), tuple(self.recipes), method="mergekit",
                         config_changes=changes)

    def plan_slice(self, out: OutputSlice, layer: int) -> int:
        ranges = []
        for s in out.sources:
            have = self.layers_of(s.model)
            start, end = s.layer_range or (0, len(have))
            if end > len(have):
                raise ConfigError(f"layer_range [{start}, {end}] of {s.model} is beyond its {len(have)} layers")
            ranges.append((start, end))
        count = ranges[0][1] - ranges[0][0]
        if any(end - start != count for start, end in ranges):
            raise ConfigError("all sources of a slice must have the same number of layers")
        first_layers = self.layers_of(out.sources[0].model)
        for i in range(count):
            t = i / (count - 1) if count > 1 else 1.0
            for name in first_layers[ranges[0][0] + i]:
                inputs = [(s, renumber(name, start + i)) for s, (start, _) in zip(out.sources, ranges)]
                self.tensor(renumber(name, layer), inputs, out, t)
            layer += 1
        return layer

    def tensor(self, out_name: str, inputs: Sequence[tuple[Source, str]], out: OutputSlice, t: float) -> None:
        specs = []
        for source, name in inputs:
            spec = self.specs[self.roles[source.model]].get(name)
            if spec is None:
                raise MismatchError(f"tensor {name!r} is not in {source.model}")
            specs.append(spec)
        shapes = {tuple(s.shape) for s in specs}
        if len(shapes) > 1:
            raise MismatchError(f"tensor {out_name!r}: the inputs' shapes differ: {sorted(shapes)}")
        self.recipes.append(self.recipe(out_name, inputs, specs, out, t))

    def recipe(self, out_name: str, inputs: Sequence[tuple[Source, str]], specs: Sequence[SpecLike],
               out: OutputSlice, t: float) -> TensorRecipe:
        m, c = self.method, self.config
        compute = c.dtype or _promoted([s.dtype for s in specs])
        dtype = c.out_dtype or compute
        shape = tuple(specs[0].shape)
        layer = classify(out_name).layer
        shared = {p.name: resolve(p, [out.parameters, c.parameters], out_name, t)
                  for p in m.params if p.scope == "shared"}
        base = (out.base_model or c.base_model) if m.uses_base or m.optional_base else None
        models = [(source, name, spec) for (source, name), spec in zip(inputs, specs)]
        if m.optional_base and base is not None and all(s.model != base for s, _, _ in models):
            base = None
        if m.uses_base or base is not None:
            if base is None or all(s.model != base for s, _, _ in models):
                raise ConfigError(f"merge_method {m.name} needs a base_model among its inputs")
            models = [x for x in models if x[0].model == base][:1] + [x for x in models if x[0].model != base]
        per_model = [self.per_model(source, name, out, t, source.model == base) for source, name, _ in models]

        def term(source: Source, name: str, weight: float) -> Term:
            return Term(self.roles[source.model], weight, None if name == out_name else name)

        if m.op == "mk_passthrough":
            if len(models) != 1:
                raise ConfigError("passthrough takes exactly one input per slice")
            scale = per_model[0]["scale"]
            (source, name, spec) = models[0]
            if scale is None and spec.dtype == compute == dtype:
                return TensorRecipe(out_name, dtype, shape, layer, "copy", (term(source, name, 1.0),))
            params = (("scale", scale),) if scale is not None else ()
            return TensorRecipe(out_name, dtype, shape, layer, "mk_passthrough", (term(source, name, 1.0),), params,
                                compute_dtype=compute)
        if m.op == "mk_linear":
            terms = tuple(term(s, n, p["weight"]) for (s, n, _), p in zip(models, per_model))
            return TensorRecipe(out_name, dtype, shape, layer, "mk_linear", terms,
                                (("normalize", float(shared["normalize"])),), compute_dtype=compute)
        if m.op in ("mk_slerp", "mk_nearswap"):
            if len(models) != 2:
                raise ConfigError(f"merge_method {m.name} takes the base and exactly one other model")
            terms = tuple(term(s, n, 1.0) for s, n, _ in models)
            return TensorRecipe(out_name, dtype, shape, layer, m.op, terms, (("t", shared["t"]),),
                                compute_dtype=compute)
        if m.op == "mk_model_stock":
            if shared["filter_wise"]:
                raise ConfigError("merge_method model_stock: filter_wise: true is not supported")
            if len(models) < 3:
                raise ConfigError("merge_method model_stock needs the base and at least two other models")
            return TensorRecipe(out_name, dtype, shape, layer, m.op, tuple(term(s, n, 1.0) for s, n, _ in models),
                                compute_dtype=compute)
        if m.op == "mk_nuslerp":
            return self.nuslerp(out_name, dtype, shape, layer, compute, shared, models, per_model, base is not None,
                                term)
        if m.op == "mk_multislerp":
            others = per_model[1:] if base is not None else per_model
            terms = tuple(term(s, n, p.get("weight", 1.0)) for (s, n, _), p in zip(models, per_model))
            if len(others) == 1:  # mergekit returns the one model as it is, without the base
                source, name, _ = models[-1]
                return TensorRecipe(out_name, dtype, shape, layer, "mk_passthrough", (term(source, name, 1.0),),
                                    compute_dtype=compute)
            return TensorRecipe(out_name, dtype, shape, layer, m.op, terms,
                                (("base", float(base is not None)), ("normalize", float(shared["normalize_weights"])),
                                 ("eps", shared["eps"])), compute_dtype=compute)
        if m.op == "mk_ram":
            # ramplus_tl's per-model factor is float32, and torch promotes the result to it
            promoted = "F32" if "r" in shared else compute
            return TensorRecipe(out_name, c.out_dtype or promoted, shape, layer, m.op,
                                tuple(term(s, n, 1.0) for s, n, _ in models), tuple(shared.items()),
                                compute_dtype=compute)
        if m.op == "mk_sce":
            return TensorRecipe(out_name, dtype, shape, layer, m.op, tuple(term(s, n, 1.0) for s, n, _ in models),
                                (("select_topk", shared["select_topk"]),), compute_dtype=compute)
        random = m.sparsify in ("random", "della_magprune")
        if shared["rescale"] and not random:
            raise ConfigError(f"merge_method {m.name}: rescale: true is not supported")
        numel = 1
        for d in shape:
            numel *= d
        terms = [term(models[0][0], models[0][1], 1.0)]
        params: list[tuple[str, float]] = [("lambda", shared["lambda"]), ("normalize", float(shared["normalize"])),
                                           ("consensus", float(m.consensus))]
        if random:
            params += [("seed", float(self.seed)), ("rescale", float(shared["rescale"]))]
        for i, ((source, name, _), p) in enumerate(zip(models[1:], per_model[1:]), start=1):
            terms.append(term(source, name, p["weight"]))
            params += sparsify_params(m.sparsify, p, numel, i)
        return TensorRecipe(out_name, dtype, shape, layer, "mk_delta", tuple(terms), tuple(params),
                            compute_dtype=compute)

    def nuslerp(self, out_name: str, dtype: str, shape: tuple[int, ...], layer: int | None, compute: str,
                shared: Mapping[str, Any], models: Sequence[tuple[Source, str, SpecLike]],
                per_model: Sequence[Mapping[str, Any]], has_base: bool, term: Any) -> TensorRecipe:
        if shared["nuslerp_row_wise"] or not shared["nuslerp_flatten"]:
            raise ConfigError("merge_method nuslerp: only nuslerp_flatten: true (the default) is supported")
        others = per_model[1:] if has_base else per_model
        if len(others) != 2:
            raise ConfigError("merge_method nuslerp takes exactly two models besides the base")
        weights = [p["weight"] for p in others]
        total = sum(weights)
        t = 0.5 if abs(total) < 1e-6 else weights[1] / total
        return TensorRecipe(out_name, dtype, shape, layer, "mk_nuslerp", tuple(term(s, n, 1.0) for s, n, _ in models),
                            (("t", t), ("base", float(has_base))), compute_dtype=compute)

    def per_model(self, source: Source, name: str, out: OutputSlice, t: float, is_base: bool) -> dict[str, Any]:
        scopes = [s.parameters for s in out.sources if s.model == source.model] + [out.parameters,
                                                                                    self.config.parameters]
        return {p.name: resolve(p, scopes, name, t) for p in self.method.params
                if p.scope == "input" or (p.scope == "non_base" and not is_base)}


def sparsify_params(sparsify: str | None, p: Mapping[str, Any], numel: int, i: int) -> list[tuple[str, float]]:
    """The recipe's numbers for model ``i``'s sparsification: a rank band ``lo.i``/``hi.i``, a
    keep probability ``p.i`` (DARE) and DELLA's ``eps.i``; none when it keeps everything."""
    density = p["density"]
    if sparsify in ("random", "della_magprune") and 0 < density < 1:
        if sparsify == "random":
            return [(f"p.{i}", density)]
        eps = p["epsilon"]
        if not (0 < density - eps and density + eps < 1):
            raise ConfigError(f"epsilon {eps} must keep density ± epsilon within (0, 1) (density {density})")
        return [(f"p.{i}", density), (f"eps.{i}", eps)]
    if sparsify == "random" and density <= 0:
        return [(f"lo.{i}", 0.0), (f"hi.{i}", 0.0)]
    kept = kept_ranks("magnitude" if sparsify == "della_magprune" else sparsify, p, numel)
    return [] if kept is None else [(f"lo.{i}", float(kept[0])), (f"hi.{i}", float(kept[1]))]


def kept_ranks(sparsify: str | None, p: Mapping[str, Any], numel: int) -> tuple[int, int] | None:
    """The ranks by descending |delta| a model's delta keeps, ``[lo, hi)`` (None: all), as
    mergekit's ``magnitude`` (top ``max(1, int(density·numel))``) and ``magnitude_outliers``
    (the top ``int(gamma·numel)`` dropped, then the smallest down to ``int(density·numel)``)."""
    density = p["density"]
    if sparsify is None or density >= 1:
        return None
    if sparsify == "magnitude":
        if density <= 0 or numel == 0:
            return (0, 0)
        return (0, max(1, int(density * numel)))
    target, top = int(density * numel), int(p["gamma"] * numel)
    bottom = max(0, numel - target - top)
    end = min(numel, bottom + target)
    return (numel - end, numel - bottom)


def _promoted(dtypes: Sequence[str]) -> str:
    """torch.promote_types over the inputs' dtypes: equal ones stay, BF16 with F16 gives F32."""
    return dtypes[0] if len(set(dtypes)) == 1 else "F32"


def _describe(plan: MergePlan, shown: Mapping[str, Any]) -> str:
    """The config as given, each local model by its directory's name (a card is shared; the
    recipe keeps the paths)."""
    c = plan.config
    text = str(shown.get("yaml", ""))
    for model in sorted(c.referenced(), key=len, reverse=True):
        if os.path.isdir(model):
            text = text.replace(model, local_name(model))
    return (f"A mergekit merge (merge_method: {c.merge_method}), computed as mergekit 0.1.5 computes it, from "
            f"this config:\n\n```yaml\n{text.rstrip()}\n```")


METHOD = Method(
    name="mergekit", command="mergekit-yaml",
    summary="Run a mergekit YAML config, with mergekit 0.1.5's numbers.",
    options=(Option("yaml", "text", "The mergekit YAML config, as text.", required=True),
             Option("random_seed", "int", "Seed of the random masks (DARE, DELLA); default 0.")),
    inputs=_inputs, plan=_plan, counts_layers=False, describe=_describe,
    rebuild="layerswap-fast mergekit-yaml layerswap_recipe.json OUT")


def swap_as_mergekit(plan: MergePlan, paths: Mapping[str, PathLike]) -> dict[str, Any]:
    """A layer swap's plan as a mergekit ``linear`` config: runs of layers made the same way as
    one slice each, and empty slices (``[0, 0]``, ``[L, L]``) naming the sources of the tensors
    outside the layers. ``normalize: false`` keeps the weights as planned (they sum to 1);
    mergekit adds them with fused multiply-adds where we round each product, so the two can
    differ in the last bit of a float32 sum, rarely visible after rounding to bf16."""
    def model(path: PathLike) -> str:  # a relative directory would read to mergekit as a hub id
        return os.path.abspath(path) if os.path.isdir(path) else str(path)

    def sources(terms: Sequence[Term], start: int, end: int) -> list[dict[str, Any]]:
        return [{"model": model(paths[t.role]), "layer_range": [start, end], "parameters": {"weight": t.weight}}
                for t in terms]

    slices = [{"sources": sources(plan.non_layer, 0, 0)}]
    rows = list(plan.layers)
    start = 0
    for i, row in enumerate(rows):
        if i + 1 == len(rows) or rows[i + 1].terms != row.terms:
            slices.append({"sources": sources(row.terms, start, row.layer + 1)})
            start = row.layer + 1
    slices.append({"sources": sources(plan.non_layer, plan.num_layers, plan.num_layers)})
    config: dict[str, Any] = {"merge_method": "linear", "parameters": {"normalize": False}, "slices": slices}
    if plan.dtype:
        config["out_dtype"] = {v: k for k, v in DTYPES.items()}[plan.dtype]
    return config
