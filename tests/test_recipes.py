"""Recipes rebuild the same model with every option that shapes it set away from its default.

Every writing command records ``layerswap_recipe.json`` so that ``layerswap-fast COMMAND --config
OUT/layerswap_recipe.json -o OUT2`` rebuilds the model. An option left out of the recipe is read
back at its default, so a rebuild only proves the option was recorded when that option is set away
from its default *and* that setting changes the model. Each case below therefore sets every
byte-changing option of its command to a non-default value, and a second test drops the options
one at a time to show each of them changes the model (or, for ``--base`` of magnitude weights,
cannot be left out): a recipe missing any of them rebuilds something else, which the byte
comparison catches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner, Result

import layerswap_fast as ls
from layerswap_fast.analysis import analyze
from layerswap_fast.cli import main
from layerswap_fast.formats.checkpoint import RECIPE_NAME
from support import assert_same_shards, make_adapter, make_llama_trio, shards_without_metadata

L = 12  # enough layers for every swap below and the same swap with any one count at its default
ROLES = ("base", "task", "language", "task2", "language2")
WRITERS = ("merge", "soup", "task-arithmetic", "ties", "revert")

#: click parameters a recipe deliberately leaves out, with why none of them changes the model's bytes
NOT_RECORDED: dict[str, str] = {
    "out": "where the model goes: each rebuild names its own, and a config may not set it",
    "force": "whether an existing output may be replaced; a config may not set it",
    "dry_run": "writes nothing at all",
    "threads": "the blends are deterministic whatever the thread count",
    "device": "the CPU and CUDA backends write bit-identical blends",
    "gpu_memory": "the CUDA backend's staging memory: how the work is batched, not what it computes",
    "link": "how unchanged input shards are reused (reflink, copy, hard or symbolic link): the same bytes",
    "sync": "fsync before publishing: durability, not content",
    "checksum": "the algorithm of the checksums in the recipe file itself; the shards do not carry it",
    "io": "how the kernels read the inputs (mapped or pread): the same bytes either way",
    "config": "the recipe being read: its options are recorded in its place",
    "dump_config": "prints the recipe and writes no model",
}
#: options of one command that print something else and write no model
PRINTS_ONLY: dict[tuple[str, str], str] = {
    ("merge", "dump_mergekit"): "prints the swap as a mergekit config and writes no model",
}
#: options a command declares only to refuse them in one line, so none of its recipes records them
REFUSED: dict[tuple[str, str], str] = {
    ("ties", "as_adapter"): "TIES needs every model's full delta, which no LoRA adapter holds",
}


@dataclass(frozen=True)
class Case:
    """One command line. ``inputs`` are rebuilt from the recipe but need not change the model when
    left out (the checkpoints themselves, a statistics cache equal to what ``--base`` gives);
    every flag of ``options`` is set away from its default and changes the model. Values ``@NAME``
    are paths from the ``paths`` fixture. ``needed``: flags of ``options`` that cannot be left out
    (the command then fails, so a recipe missing them could not rebuild either)."""

    id: str
    command: str
    inputs: tuple[tuple[str, str], ...]
    options: tuple[tuple[str, str | None], ...]
    needed: frozenset[str] = frozenset()

    def argv(self, paths: dict[str, Path], out: Path, drop: str | None = None) -> list[str]:
        """The command line writing to ``out``, without the flag ``drop`` (so at its default)."""
        args = [self.command]
        for flag, value in self.inputs + self.options:
            if flag != drop:
                args += [flag] if value is None else [flag, str(paths[value[1:]]) if value.startswith("@") else value]
        return [*args, "-o", str(out)]

    def flags(self) -> list[str]:
        """The flags of ``options``, once each (in the order given)."""
        return list(dict.fromkeys(flag for flag, _ in self.options))


CASES = [
    # ramp only differs from uniform with two or more transition layers; f32 from the bf16 inputs;
    # two experts per group so that --soup-weights has something to weigh (magnitude needs --base)
    Case("merge-ramp", "merge",
         (("--task-expert", "@task"), ("--task-expert", "@task2"),
          ("--language-expert", "@language"), ("--language-expert", "@language2")),
         (("--bottom", "2"), ("--top", "1"), ("--lower-transition", "2"), ("--upper-transition", "3"),
          ("--transition-weights", "ramp"), ("--non-layer", "language"), ("--soup-weights", "magnitude"),
          ("--base", "@base"), ("--dtype", "f32"), ("--shard-size", "20KB")),
         needed=frozenset({"--base"})),
    # magnitude weights from a statistics directory: the rebuild must find the same one
    Case("merge-magnitude", "merge",
         (("--task-expert", "@task"), ("--language-expert", "@language"), ("--stats", "@stats")),
         (("--transition-weights", "magnitude"), ("--non-layer", "magnitude"), ("--base", "@base"),
          ("--dtype", "f16"), ("--shard-size", "30KB")),
         needed=frozenset({"--base"})),
    # the recipe records numbers given as text ("1,3,2") as floats ("1.0,3.0,2.0"): both must read back
    Case("soup-numbers", "soup",
         (("--model", "@task"), ("--model", "@language"), ("--model", "@task2")),
         (("--weights", "1,3,2"), ("--dtype", "f32"), ("--shard-size", "20KB"))),
    Case("soup-magnitude", "soup",
         (("--model", "@task"), ("--model", "@language"), ("--stats", "@stats")),
         (("--weights", "magnitude"), ("--base", "@base"), ("--dtype", "f16"), ("--shard-size", "20KB")),
         needed=frozenset({"--base"})),
    Case("task-arithmetic", "task-arithmetic",
         (("--base", "@base"), ("--model", "@task"), ("--model", "@language")),
         (("--lambda", "0.5"), ("--dtype", "f32"), ("--shard-size", "20KB"))),
    Case("ties", "ties",
         (("--base", "@base"), ("--model", "@task"), ("--model", "@language")),
         (("--density", "0.5"), ("--lambda", "0.7"), ("--dtype", "f16"), ("--shard-size", "20KB"))),
    # whole layers together with rows: either one left out changes which rows go back to the base
    # (a row MAV of this family is about 0.008, so the threshold splits the rows)
    Case("revert-threshold", "revert",
         (("--base", "@base"), ("--model", "@task")),
         (("--layers", "0-1,5"), ("--row-threshold", "0.008"), ("--shard-size", "20KB"))),
    Case("revert-fraction", "revert",
         (("--base", "@base"), ("--model", "@task")),
         (("--layers", "3"), ("--row-fraction", "0.25"), ("--shard-size", "20KB"))),
    # LoRA adapters merged into an adapter (--as-adapter, a flag: no value); an adapter is one file
    # whatever --shard-size says, so these cases leave it out
    Case("merge-as-adapter", "merge",
         (("--task-expert", "@task_lora"), ("--language-expert", "@language_lora"), ("--base", "@base")),
         (("--bottom", "2"), ("--top", "1"), ("--lower-transition", "2"), ("--transition-weights", "ramp"),
          ("--dtype", "bf16"), ("--as-adapter", None))),
    Case("soup-as-adapter", "soup",
         (("--model", "@task_lora"), ("--model", "@language_lora"), ("--base", "@base")),
         (("--weights", "1,3"), ("--dtype", "bf16"), ("--as-adapter", None))),
    Case("task-arithmetic-as-adapter", "task-arithmetic",
         (("--base", "@base"), ("--model", "@task_lora"), ("--model", "@language_lora")),
         (("--lambda", "0.5"), ("--dtype", "bf16"), ("--as-adapter", None))),
    Case("revert-as-adapter", "revert",
         (("--base", "@base"), ("--model", "@task_lora")),
         (("--layers", "0-1,5"), ("--as-adapter", None)), needed=frozenset({"--layers"})),
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base, four experts fine-tuned from it, and an ``analyze`` output of the experts."""
    root = tmp_path_factory.mktemp("recipes")
    family = make_llama_trio(root, num_layers=L, hidden=16, roles=ROLES)
    analyze(family["base"], [family[r] for r in ROLES[1:]], root / "stats", device="cpu")
    adapters = {  # up_proj in both: transition layers, soups and sums concatenate its factors
        "task_lora": make_adapter(family["base"], root / "task_lora", 1, r=2, lora_alpha=4,
                                  target_modules=["q_proj", "up_proj"]),
        "language_lora": make_adapter(family["base"], root / "language_lora", 2, r=4, lora_alpha=4,
                                      target_modules=["v_proj", "up_proj"])}
    return {**family, **adapters, "stats": root / "stats"}


def invoke(args: list[str]) -> Result:
    return CliRunner().invoke(main, args)


def succeeds(args: list[str]) -> None:
    r = invoke(args)
    assert r.exit_code == 0, (args, r.output)


model = shards_without_metadata


def recorded_options(out: Path) -> dict[str, Any]:
    options: dict[str, Any] = json.loads((out / RECIPE_NAME).read_text())["options"]
    return options


def param_name(command: str, flag: str) -> str:
    """The Python name of ``command``'s option ``flag`` (the name a recipe records it under)."""
    names = [p.name for p in main.commands[command].params if flag in p.opts]
    assert len(names) == 1 and names[0] is not None, (command, flag)
    return names[0]


def recordable(command: str) -> set[str]:
    params: list[click.Parameter] = main.commands[command].params
    refused = {name for (refusing, name) in (*REFUSED, *PRINTS_ONLY) if refusing == command}
    return {p.name for p in params if p.name is not None} - set(NOT_RECORDED) - refused


# ------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_a_recipe_rebuilds_the_same_model(case: Case, paths: dict[str, Path], tmp_path: Path) -> None:
    direct, rebuilt = tmp_path / "direct", tmp_path / "rebuilt"
    succeeds(case.argv(paths, direct))
    if "--shard-size" in case.flags():
        assert len(list(direct.glob("*.safetensors"))) > 1  # so that a lost --shard-size shows
    succeeds([case.command, "--config", str(direct / RECIPE_NAME), "-o", str(rebuilt)])
    assert_same_shards(direct, rebuilt)
    # every other file too: the index, config.json (which carries --dtype as torch_dtype) and the
    # recipe itself, so that a rebuild of the rebuild is the same model again
    files = sorted(p.name for p in direct.iterdir())
    assert sorted(p.name for p in rebuilt.iterdir()) == files
    for name in files:
        assert (direct / name).read_bytes() == (rebuilt / name).read_bytes(), name
    ls.verify(rebuilt)


@pytest.mark.parametrize("case, flag", [(c, f) for c in CASES for f in c.flags()],
                         ids=[f"{c.id}:{f.lstrip('-')}" for c in CASES for f in c.flags()])
def test_each_option_changes_the_model(case: Case, flag: str, paths: dict[str, Path], tmp_path: Path) -> None:
    """The case with ``flag`` left at its default writes another model (or none at all): so a
    recipe that lost ``flag`` cannot rebuild the case's model."""
    succeeds(case.argv(paths, tmp_path / "set"))
    r = invoke(case.argv(paths, tmp_path / "default", drop=flag))
    if flag in case.needed:
        assert r.exit_code == 2 and r.output.startswith("error:"), r.output
        assert not (tmp_path / "default").exists()
    else:
        assert r.exit_code == 0, r.output
        assert model(tmp_path / "set") != model(tmp_path / "default")


def test_every_writing_command_has_cases() -> None:
    """A command that writes a model (it takes --shard-size) and has no case here would go
    unchecked: adding one must add its cases."""
    writers = {name for name, cmd in main.commands.items() if any(p.name == "shard_size" for p in cmd.params)}
    assert writers == set(WRITERS) == {c.command for c in CASES}


@pytest.mark.parametrize("command", WRITERS)
def test_the_cases_set_every_recorded_option(command: str) -> None:
    """Every option a recipe records is given in some case of its command, so the rebuild test
    sees it read back (and, unless it is an input, set away from its default)."""
    given = {param_name(command, flag) for c in CASES if c.command == command for flag, _ in c.inputs + c.options}
    assert given == recordable(command)


@pytest.mark.parametrize("command", WRITERS)
def test_a_recipe_records_every_option_but_the_listed_ones(command: str, paths: dict[str, Path],
                                                           tmp_path: Path) -> None:
    """The recipe's option names are the command's parameters less ``NOT_RECORDED``: an option
    added to the command but not to the recipe fails here, and so does a stale entry of the list.
    ``--dump-config`` (a second way to get a recipe, built from the parsed parameters rather
    than by the API) must name the same options. Options at None are not recorded (None is their
    default), so the keys are collected over all the command's cases, which set them all."""
    params = {p.name for p in main.commands[command].params}
    assert set(NOT_RECORDED) <= params, set(NOT_RECORDED) - params
    recorded: set[str] = set()
    for i, case in enumerate(c for c in CASES if c.command == command):
        out = tmp_path / str(i)
        succeeds(case.argv(paths, out))
        keys = set(recorded_options(out))
        r = invoke([*case.argv(paths, tmp_path / "unused"), "--dump-config"])
        assert r.exit_code == 0, r.output
        assert set(yaml.safe_load(r.output)["options"]) == keys
        recorded |= keys
    assert recorded == recordable(command)
