"""The options every writing command shares, and option files: ``--config`` in, ``--dump-config`` out.

Write options are declared like a method's (:class:`~layerswap_fast.methods.method.Option`), so the
CLI's flags and the checks of a config file follow from one declaration.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .engine.backends import DEVICES, Backend
from .errors import ConfigError, param
from .formats.checkpoint import IO_MODES
from .formats.output import LINK_MODES
from .formats.writeback import CHECKSUMS, DEFAULT_CHECKSUM
from .methods import METHODS, Option
from .safe_read import Map, Str, read_json, read_yaml, show_path
from .units import parse_size

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class WriteOptions:
    """How a model is written; none of these change its bytes except ``shard_size``."""

    shard_size: int | str = "5GB"
    threads: int | None = None
    device: str = "auto"
    force: bool = False
    dry_run: bool = False
    link: str = "auto"
    max_gpu_bytes: int | str = "256MB"
    blender: Backend | None = None
    progress: Callable[[int, int], None] | None = None
    sync: bool = False
    checksum: str = DEFAULT_CHECKSUM
    io: str = "auto"
    #: files the command read besides its checkpoints (a ``--config`` file): never written or removed
    other_inputs: Sequence[PathLike] = ()

    def check(self) -> int:
        """ConfigError for a link mode, checksum or read path that does not exist; the shard size
        in bytes."""
        for name, value, choices in (("link", self.link, LINK_MODES), ("checksum", self.checksum, CHECKSUMS),
                                     ("io", self.io, IO_MODES)):
            check_choice(name, value, choices)
        return parse_size(self.shard_size)


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    """``value``, or a ConfigError naming ``name`` and its choices."""
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


#: the options of every command that writes a model, declared once like a method's (the CLI's
#: flags and ``--config`` checks follow); only ``shard_size`` changes the bytes, so only it is recorded
WRITE_OPTIONS: tuple[Option, ...] = (
    Option("out", "path", "Output directory; it appears complete or not at all.", required=True, flag="--output",
           short="-o", recorded=False),
    Option("shard_size", "text", "Largest new output shard.", default="5GB"),
    Option("threads", "int", "Worker threads (default: all cores).", recorded=False),
    Option("device", "choice", "Where blends run: auto uses a CUDA GPU when there is one.", default="auto",
           choices=DEVICES, recorded=False),
    Option("gpu_memory", "text", "Most GPU memory the CUDA backend may use (staging buffers of all inputs).",
           default="256MB", api="max_gpu_bytes", recorded=False),
    Option("link", "choice", "How input shards the merge leaves unchanged are reused whole: auto = a copy-on-write "
           "reflink where the filesystem supports it, else a kernel-side copy (and copied tensors clone their "
           "whole blocks where the filesystem can); reflink; copy = new storage for every byte, nothing cloned; "
           "hard or symlink only when asked for: those share the input's bytes, so a later in-place change to one "
           "file changes the other.", default="auto", choices=LINK_MODES, recorded=False),
    Option("force", "flag", "Replace an existing output directory.", default=False, recorded=False),
    Option("sync", "flag", "fsync the output before publishing it (durable across a power loss).", default=False,
           recorded=False),
    Option("checksum", "choice", "Per-file checksum recorded for `verify`: blake3, sha256 at about 3x its "
           "CPU time, or none (sizes only: the bare copy speed; verify then cannot check the bytes).",
           default=DEFAULT_CHECKSUM, choices=CHECKSUMS, recorded=False),
    Option("io", "choice", "How input shards are read: mmap (straight from a read-only mapping, no copy), "
           "pread (into buffers), or auto: mmap on local filesystems, pread on network and FUSE ones.",
           default="auto", choices=IO_MODES, recorded=False),
    Option("dry_run", "flag", "Validate and plan the layout, write nothing.", default=False, recorded=False),
)
#: what only the command line may set: rebuilding a shared recipe or config must not choose where
#: the output goes or whether something is replaced
COMMAND_LINE_ONLY = ("out", "force")
PLAN_OPTIONS = (Option("as_json", "flag", "Print the plan as JSON, for tools.", default=False, flag="--json",
                       recorded=False),)


def command_options(command: str) -> tuple[Option, ...]:
    """Every option of a CLI command that plans or writes a merge, as declared."""
    if command == "plan":
        return METHODS["layer_swap"].options + PLAN_OPTIONS
    method = next((m for m in METHODS.values() if m.command == command), None)
    if method is None:
        raise ConfigError(f"no merge command {command!r}")
    return method.options + WRITE_OPTIONS


#: keys of a plain config (not a recipe) that describe it rather than set an option
_DESCRIPTIVE = ("command", "tool", "version")
_CONFIG_SCHEMA = Map({"command": Str(), "options": Map(min_len=1)})


def read_config(path: PathLike, command: str) -> dict[str, Any]:
    """Option values of ``command`` from a YAML (or JSON) mapping of option names to values, or
    from an output's ``layerswap_recipe.json`` (whose ``options`` are the values). Every value is
    checked against its option's declared type; the output and ``force`` are refused."""
    read = read_json if Path(path).suffix.lower() == ".json" else read_yaml
    data = read(path, _CONFIG_SCHEMA)
    where = show_path(path)
    if data.get("command") not in (None, command):
        raise ConfigError(f"config {where} is a recipe for '{data['command']}', not '{command}'")
    recipe = "options" in data
    given = data["options"] if recipe else {k: v for k, v in data.items() if k not in _DESCRIPTIVE}
    declared = {o.name: o for o in command_options(command)}
    aliases = {o.alias: o.name for o in declared.values()}
    for key in {*data, *given}:  # a recipe's top level too: the file may not name them anywhere
        name = _config_name(key, aliases)
        if name in COMMAND_LINE_ONLY:
            what = "the output" if name == "out" else param(name)
            raise ConfigError(f"config {where} sets {what}; only the command line may set the output and "
                              f"{param('force')}")
    values: dict[str, Any] = {}
    for key, value in given.items():
        name = _config_name(key, aliases)
        if name not in declared:
            raise ConfigError(f"config {where}: unknown option {key!r} for '{command}'")
        if name in values:
            raise ConfigError(f"config {where} sets {name} twice")
        declared[name].schema().check(value, where, f"options.{key}" if recipe else key)
        values[name] = value
    return values


def _config_name(key: str, aliases: Mapping[str, str]) -> str:
    name = key.replace("-", "_")
    return aliases.get(name, name)


def recipe_yaml(command: str, values: Mapping[str, Any]) -> str:
    """The ``--config`` file (YAML) that gives ``command`` these option values: those that are
    recorded in recipes, and set."""
    import yaml

    def plain(v: Any) -> Any:
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else str(v) if isinstance(v, os.PathLike) else v

    options = {o.name: plain(values[o.name]) for o in command_options(command)
               if o.recorded and values.get(o.name) not in (None, ()) and o.record(values[o.name]) is not None}
    return yaml.safe_dump({"command": command, "options": options}, sort_keys=False)
