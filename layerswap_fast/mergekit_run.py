"""Run a mergekit YAML config: plan it (``methods.mergekit``) and write it like every merge.

mergekit's output takes its config.json from the base model (else the first model named), with the
layer count of its slices; its tokenizer from ``tokenizer_source`` (``base`` or a model), or, with
``copy_tokenizer``, from the same model as the config.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import replace
from typing import Any

import yaml

from .errors import ConfigError
from .formats.side_files import find_side_files
from .methods import METHODS
from .methods.mergekit import config_roles, swap_as_mergekit
from .methods.mergekit_config import parse_config
from .options import WriteOptions
from .safe_read import MAX_YAML_BYTES, decode_utf8, parse_json, read_bytes, show_path
from .writing import MergeResult, plan_method, resolve, write_plan

PathLike = str | os.PathLike[str]
#: side files that are the model's configuration; the others are the tokenizer's
CONFIG_FILES = ("config.json", "generation_config.json")
#: mergekit's named chat templates, which we do not ship
NAMED_TEMPLATES = ("auto", "alpaca", "chatml", "llama3", "mistral")


def config_text(config: PathLike | Mapping[str, Any]) -> str:
    """A config given as a mapping or a YAML file, as YAML text."""
    if isinstance(config, Mapping):
        return yaml.safe_dump(dict(config), sort_keys=False)
    return decode_utf8(read_bytes(config, cap=MAX_YAML_BYTES), show_path(config))


def from_recipe(text: str) -> tuple[int | None, str]:
    """(seed, config) of a ``layerswap_recipe.json`` that a mergekit-yaml run wrote (the recipe
    rebuilds its output); any other text is a config itself, without a seed."""
    if not text.lstrip().startswith("{"):
        return None, text
    recipe = parse_json(text, "recipe")
    options = recipe.get("options") if isinstance(recipe, dict) else None
    if not (isinstance(options, dict) and recipe.get("method") == "mergekit" and isinstance(options.get("yaml"), str)):
        return None, text
    seed = options.get("random_seed")
    return (seed if isinstance(seed, int) and not isinstance(seed, bool) else None), options["yaml"]


def run_mergekit_config(config: PathLike | Mapping[str, Any], out: PathLike, *, copy_tokenizer: bool = True,
                        random_seed: int | None = None, **write: Any) -> MergeResult:
    """Run the mergekit YAML ``config`` (a file, or its parsed mapping; or the
    ``layerswap_recipe.json`` of an earlier run, which rebuilds it) and write the model to
    ``out``, computed as mergekit 0.1.5 computes it. ``write`` takes :class:`WriteOptions`
    (``shard_size``, ``device``, ``force``, ``dry_run`` ...). ``random_seed`` keys the random
    masks of DARE and DELLA (default 0): the same seed gives the same bytes anywhere."""
    text = config_text(config)
    recorded_seed, text = from_recipe(text)
    random_seed = recorded_seed if random_seed is None else random_seed
    parsed = parse_config(text, show_path(config) if not isinstance(config, Mapping) else "mergekit config")
    texts = _chat_template(parsed.chat_template)
    method = METHODS["mergekit"]
    values = resolve(method, {"yaml": text, "random_seed": random_seed})
    settings = WriteOptions(**write)
    if not isinstance(config, Mapping):  # the config file is an input too: never written over
        settings = replace(settings, other_inputs=[*settings.other_inputs, config])
    with ExitStack() as stack:
        plan, inputs = plan_method(stack, method, values, settings.device, settings.threads)
        roles = config_roles(parsed)
        source = inputs[roles[parsed.base_model or parsed.referenced()[0]]]
        side = [f for f in find_side_files(source.directory) if f.name in CONFIG_FILES]
        tokenizer = parsed.tokenizer_source
        if tokenizer is not None or copy_tokenizer:
            name = parsed.base_model if tokenizer == "base" else tokenizer
            if tokenizer == "base" and name is None:
                raise ConfigError("tokenizer_source: base needs a base_model")
            if name is not None and name not in roles:
                raise ConfigError(f"tokenizer_source {name!r} is not one of the config's models")
            donor = source if name is None else inputs[roles[name]]
            side += [f for f in find_side_files(donor.directory) if f.name not in CONFIG_FILES
                     and not (texts and f.name.startswith("chat_template"))]
        recorded = method.recorded(values, plan)
        return write_plan(method, plan, inputs, out, recorded, settings, source, side_files=side, texts=texts)


def _chat_template(template: str | None) -> dict[str, str]:
    if template is None:
        return {}
    if template in NAMED_TEMPLATES:
        raise ConfigError(f"chat_template: {template!r} names one of mergekit's built-in templates, which are "
                          f"not supported; give the Jinja template text")
    return {"chat_template.jinja": template}




def swap_mergekit_yaml(options: Mapping[str, Any]) -> str:
    """The mergekit YAML of the layer swap with these options (by their recipe names): planned
    from the headers, nothing written."""
    swap = METHODS["layer_swap"]
    values = resolve(swap, options)
    with ExitStack() as stack:
        plan, _ = plan_method(stack, swap, values)
    return yaml.safe_dump(swap_as_mergekit(plan, swap.inputs(values)), sort_keys=False)


def parse_kmb(text: str | int) -> int:
    """A size as mergekit's ``--out-shard-size`` reads it: a count of bytes, or with a K, M or B
    suffix thousands, millions or billions (``5B`` is 5·10⁹ bytes)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    s = str(text).strip()
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}.get(s[-1:].upper(), 1)
    digits = s[:-1] if scale != 1 else s
    if not digits.isdigit() or len(digits) > 18:
        raise ConfigError(f"out_shard_size must be a number of bytes, optionally with K, M or B, got {text!r}")
    return int(digits) * scale
