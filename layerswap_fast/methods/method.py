"""What a merge method declares: its options once, which inputs it reads, how it plans.

From one :class:`Method`, the API checks a call's options, the CLI builds the command and its
flags, ``--config`` checks a file's values, and the recipe records what rebuilds the output. A
method is a planner: it turns tensor specs and options into a :class:`~layerswap_fast.plan.MergePlan`
and never touches a file; the numbers it needs from the data (magnitude weights) come through the
:class:`PlanInputs` it is given.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import ConfigError
from ..formats.model_card import local_name, options_list
from ..plan import MergePlan, SpecLike
from ..safe_read import Bool, Choice, Float, Int, List, Nullable, Schema, Str

Kind = Literal["path", "paths", "int", "float", "choice", "text", "flag"]
PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class Option:
    """One option: its name in recipes and configs, its type, default and help.

    ``flag`` is the command-line flag when it is not ``--name`` with dashes (``short`` a one-letter
    one besides); ``api`` the keyword of the public API when it differs (``models`` for
    ``--model``). ``recorded``: whether the recipe keeps it, i.e. whether it can change the output's
    bytes. ``path`` and ``paths`` options name files the output must never touch."""

    name: str
    kind: Kind
    help: str
    default: Any = None
    required: bool = False
    choices: tuple[str, ...] = ()
    flag: str | None = None
    api: str | None = None
    short: str | None = None
    recorded: bool = True

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def api_name(self) -> str:
        return self.api or self.name

    @property
    def alias(self) -> str:
        """The flag's own name as a config key may spell it (``lambda`` for ``lam``)."""
        return self.cli_flag.lstrip("-").replace("-", "_")

    def schema(self) -> Schema:
        """The type a config value must have: an ``int`` option takes an integer (not 2.7, not
        true), a ``float`` one a finite number, a ``choice`` one of its choices, a flag true or
        false, ``paths`` a list of text; null only where the default is None."""
        base: Schema = {"flag": Bool(), "int": Int(), "float": Float(), "choice": Choice(self.choices)}.get(
            self.kind, Str())
        if self.kind == "paths":
            base = List(Str())
        return Nullable(base) if self.default is None and not self.required and self.kind != "flag" else base

    def record(self, value: Any) -> Any:
        """The value as a recipe stores it: paths as text; a flag only when it is set (a recipe
        then says what was asked for, and an unset flag adds nothing to recipes made before it)."""
        if value is None or (self.kind == "flag" and not value):
            return None
        if self.kind == "path":
            return str(value)
        if self.kind == "paths":
            return [str(p) for p in as_list(value)]
        return value


def as_list(paths: PathLike | Sequence[PathLike]) -> list[PathLike]:
    """One path or several, as a list."""
    return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)


#: per-role weights of the magnitude-adjusted average (∝ 1 / average row MAV against the base)
MagnitudeWeights = Callable[[Sequence[str]], list[float]]


@dataclass(frozen=True)
class PlanInputs:
    """What a planner sees of its inputs: tensor specs by role, the layer count they agree on, and
    the magnitude weights of any roles (computed against the base only when asked for)."""

    specs: Mapping[str, Sequence[SpecLike]]
    num_layers: int
    magnitude: MagnitudeWeights


#: a method's account of a merge for its model card (Markdown), from the plan and the options as
#: the card shows them (:meth:`Method.card_options`)
Describe = Callable[[MergePlan, Mapping[str, Any]], str]


def describe_options(plan: MergePlan, shown: Mapping[str, Any]) -> str:
    """The account a method gives unless it says more: its options."""
    return options_list(shown)


@dataclass(frozen=True)
class Method:
    """A merge method: ``name`` is the recipe's method, ``command`` the CLI command.

    ``inputs(options)`` maps roles to checkpoint paths (in output order: the first role's side
    files go with the output); ``plan(inputs, options)`` builds the plan; ``record(options,
    plan)`` adds to or replaces the recipe's recorded options where the plan resolved them
    (``layers="0-2"`` → ``"0,1,2"``); ``extra(plan)`` adds method-specific recipe entries;
    ``describe(plan, shown)`` is the model card's account of what was computed (the layer map, the
    soup's weights), by default the options alone."""

    name: str
    command: str
    summary: str
    options: tuple[Option, ...]
    inputs: Callable[[Mapping[str, Any]], dict[str, PathLike]]
    plan: Callable[[PlanInputs, Mapping[str, Any]], MergePlan]
    record: Callable[[Mapping[str, Any], MergePlan], Mapping[str, Any]] = field(default=lambda options, plan: {})
    extra: Callable[[MergePlan], Mapping[str, Any]] = field(default=lambda plan: {})
    #: inputs whose layer counts must agree (a soup of any models needs none)
    counts_layers: bool = True
    describe: Describe = describe_options
    #: the command line that rebuilds an output from its recipe, when it is not
    #: ``layerswap-fast COMMAND --config layerswap_recipe.json -o OUT``
    rebuild: str | None = None

    def resolve(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Every option's value: given, else its default; an unknown one is an error. (Whether the
        inputs are enough is the planner's to say, in its own words.)"""
        known = {o.name for o in self.options}
        for name in given:
            if name not in known:
                raise ConfigError(f"{self.command} has no option {name!r}")
        return {o.name: given.get(o.name, o.default) for o in self.options}

    def recorded(self, values: Mapping[str, Any], plan: MergePlan) -> dict[str, Any]:
        """The options that rebuild the output, as the recipe stores them."""
        record = {o.name: o.record(values[o.name]) for o in self.options if o.recorded}
        return {**record, **self.record(values, plan)}

    def card_options(self, recorded: Mapping[str, Any]) -> dict[str, Any]:
        """The recorded options as a card shows them: without the inputs (required paths, which
        the card lists by role), any other path (statistics, a base for weights) by name alone."""
        shown = {}
        for o in self.options:
            value = recorded.get(o.name)
            if o.kind == "flag" and not value:  # a flag not given (recipes leave it out)
                continue
            if o.kind in ("path", "paths") and value is not None:
                if o.required:
                    continue
                value = [local_name(p) for p in as_list(value)] if o.kind == "paths" else local_name(value)
            shown[o.name] = value
        return shown

    def card_section(self, recorded: Mapping[str, Any], plan: MergePlan) -> str:
        """The model card's account of the merge (:attr:`describe`)."""
        return self.describe(plan, self.card_options(recorded))
