"""The model card: the ``README.md`` beside the weights that the Hugging Face Hub shows for a model.

Front matter in the Hub's model-card metadata (``base_model``, ``base_model_relation``, ``tags``,
``library_name``), then what a reader needs to trust and reuse the merge: the tool and method that
made it, its inputs, what was computed, and how to rebuild and check it. A card is meant to be
shared, so an input is named by its hub id or, for a local one, by its directory's name alone:
never by a path of the machine that made it.

Text from plain data, nothing else: the engine writes the card with the output's other small
files, the recipe records its size and checksum, and ``verify`` checks it like any other file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .checkpoint import RECIPE_NAME

CARD_NAME = "README.md"
TAGS = ("merge", "layerswap-fast")
#: what the Hub accepts as a repository id; anything else is shown, not linked
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+", re.ASCII)


@dataclass(frozen=True)
class CardInput:
    """One input as a card names it: ``role`` in the paper's terms (``task expert``, ``model 2``),
    its hub id and revision where known, else ``local_name`` (see :func:`local_name`)."""

    role: str
    local_name: str
    hub_id: str | None = None
    revision: str | None = None

    @property
    def name(self) -> str:
        return self.hub_id or self.local_name

    def line(self) -> str:
        """Its line in the card's list of inputs: a hub id (at its revision) links to the Hub."""
        if self.hub_id is None:
            return f"- {self.role}: {code(self.local_name)} (a local checkpoint)"
        shown = code(f"{self.hub_id}@{self.revision}" if self.revision else self.hub_id)
        if _HUB_ID.fullmatch(self.hub_id):
            shown = f"[{shown}](https://huggingface.co/{self.hub_id})"
        return f"- {self.role}: {shown}"


def local_name(path: str | os.PathLike[str]) -> str:
    """What a card may say of a local input: its directory's name (``.`` and ``..`` resolved
    lexically, so ``.`` is the working directory's name), never the path to it."""
    return os.path.basename(os.path.abspath(path)) or "checkpoint"


def code(text: str) -> str:
    """``text`` as inline code that Markdown cannot end early: a fence longer than any run of
    backticks inside; control characters (a newline in a directory's name) escaped."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    fence = "`" * (1 + max((len(run) for run in re.findall("`+", text)), default=0))
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def code_block(text: str) -> str:
    """``text`` as a fenced block, the fence longer than any run of backticks it holds."""
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", text)), default=0))
    return f"{fence}text\n{text}\n{fence}"


def _shown(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def options_list(options: Mapping[str, Any]) -> str:
    """The options as a Markdown list, ``name: value``; options that are not set are left out."""
    lines = [f"- {code(name)}: {code(_shown(v))}" for name, v in options.items() if v is not None]
    return "\n".join(lines) if lines else "No options beyond the defaults."


def front_matter(inputs: Sequence[CardInput], library: str = "transformers") -> str:
    """The YAML metadata the Hub reads: the inputs with hub ids as ``base_model`` (and the merge
    relation, so the Hub lists this model among their merges), the tags and the library that
    loads it (``peft`` for an adapter)."""
    import yaml  # only a merge that writes a card needs it: keep it out of start-up

    hub_ids = list(dict.fromkeys(i.hub_id for i in inputs if i.hub_id))
    meta: dict[str, Any] = {"base_model": hub_ids, "base_model_relation": "merge"} if hub_ids else {}
    meta.update(tags=list(TAGS), library_name=library)
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def render_card(method: str, command: str, version: str, inputs: Sequence[CardInput], account: str,
                library: str = "transformers", rebuild: str | None = None) -> str:
    """The whole card: front matter, title, inputs, ``account`` (Markdown: what ``method``
    computed, with its options), and how to rebuild the output (``rebuild``, by default
    ``COMMAND --config RECIPE -o OUT``) and check it."""
    names = " + ".join(dict.fromkeys(i.name for i in inputs))
    return "\n".join([
        front_matter(inputs, library),
        f"# {names}: {method.replace('_', ' ')}",
        "",
        f"Merged with layerswap-fast {version} (`layerswap-fast {command}`), method {code(method)}.",
        "",
        "## Inputs",
        "",
        *(i.line() for i in inputs),
        "",
        "## Method",
        "",
        account,
        "",
        "## Rebuild and check",
        "",
        f"`{RECIPE_NAME}`, beside the weights, records the options, the inputs (where they were read, "
        "their fingerprints) and the size and checksum of every file here, this card included. "
        "With the inputs where it says, this rebuilds the same bytes; `verify` checks a copy:",
        "",
        "```sh",
        rebuild or f"layerswap-fast {command} --config {RECIPE_NAME} -o OUT",
        "layerswap-fast verify DIR",
        "```",
        "",
    ])
