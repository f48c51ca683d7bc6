"""The shape of the package: layers that import only downward, and a method registry that a new
method joins with one module and one line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import layerswap_fast as ls
import layerswap_fast.kernels
from layerswap_fast.api import Method, Option
from layerswap_fast.cli import main
from layerswap_fast.cli.commands import method_command
from layerswap_fast.methods import METHODS
from support import blend_ref, load_tensors, make_llama_trio, raw_bytes

PACKAGE = "layerswap_fast"
#: bottom to top; a module may import its own layer and those below it
LAYERS = (
    ("base", ("_core", "errors", "dtypes", "units", "safe_read", "synthetic", "kernels")),
    ("plan", ("plan",)),
    ("formats", ("formats",)),
    ("methods", ("methods",)),
    ("engine", ("engine",)),
    ("analysis", ("analysis",)),
    ("api", ("api", "options", "writing", "adapter_writing", "streaming", "session", "sweeps", "sweep_spec", "sweep_build", "sweep_ray", "evaluation", "demo", "mergekit_run", "")),  # "": the package itself, the public names
    ("cli", ("cli",)),
)
RANK = {part: rank for rank, (_, parts) in enumerate(LAYERS) for part in parts}
#: what the command line may import: the public API (the package and its api module), its errors,
#: the demo, and itself
CLI_MAY_IMPORT = ("", "api", "errors", "demo", "cli")


def _sources() -> dict[str, Path]:
    """Every module of the package by dotted name; kernels/ ships as layerswap_fast.kernels."""
    roots = {PACKAGE: Path(ls.__file__).parent, f"{PACKAGE}.kernels": Path(layerswap_fast.kernels.__file__).parent}
    modules = {}
    for prefix, root in roots.items():
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            modules[".".join((prefix, *parts))] = path
    return modules


MODULES = _sources()
KNOWN = {*MODULES, f"{PACKAGE}._core"}  # the C++ extension: no Python source


def _type_only(tree: ast.AST) -> set[ast.AST]:
    """The import statements under ``if TYPE_CHECKING:``: they never run."""
    return {n for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for stmt in block.body for n in ast.walk(stmt)}


def _imports(name: str, path: Path, typing: bool = True) -> set[str]:
    """The package modules ``name`` imports, at module level or inside functions (and, unless
    ``typing`` is false, for type checking only)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = set() if typing else _type_only(tree)
    for node in ast.walk(tree):
        if node in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in KNOWN else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t == PACKAGE or t.startswith(PACKAGE + ".")}
    return found - {name}


EDGES = {name: _imports(name, path) for name, path in MODULES.items()}
RUNTIME_EDGES = {name: _imports(name, path, typing=False) for name, path in MODULES.items()}


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_every_module_has_a_layer() -> None:
    assert len(MODULES) > 30
    assert {_part(m) for m in MODULES} <= set(RANK), {_part(m) for m in MODULES} - set(RANK)


def test_nothing_imports_upward() -> None:
    upward = [(a, b) for a, targets in EDGES.items() for b in targets if RANK[_part(b)] > RANK[_part(a)]]
    assert upward == []


def test_the_cli_imports_only_the_public_api_and_its_errors() -> None:
    reached = {b for a, targets in EDGES.items() if _part(a) == "cli" for b in targets}
    assert {_part(b) for b in reached} <= set(CLI_MAY_IMPORT), reached


def test_only_the_engine_runs_the_triton_kernels() -> None:
    users = {a for a, targets in EDGES.items() for b in targets if _part(b) == "kernels" and _part(a) != "kernels"}
    assert users == {f"{PACKAGE}.engine.cuda"}


def test_no_import_cycle() -> None:
    """Among the imports that run (a type-only import of a sibling's class is no cycle)."""
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(RUNTIME_EDGES.get(module, ())):
            if state.get(target) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in MODULES:
        if module not in state:
            visit(module, [module])


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The parser above finds function-level and relative imports (else the tests above prove nothing)."""
    source = tmp_path / "mod.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..engine import ops\n"
                      "def f():\n    from ..api import merge\n    from .. import errors\n")
    assert _imports(f"{PACKAGE}.formats.mod", source) == {f"{PACKAGE}.api", f"{PACKAGE}.errors", f"{PACKAGE}.engine.ops"}
    assert _imports(f"{PACKAGE}.formats.mod", source, typing=False) == {f"{PACKAGE}.api", f"{PACKAGE}.errors"}


# ------------------------------------------------------------------ a method added in one module

def _linear(alpha_default: float = 0.5) -> Method:
    """What a new blend-only method's module holds: its options, its inputs, its planner."""
    from layerswap_fast.errors import ConfigError
    from layerswap_fast.methods.common import check_all, dtypes_of, model_role
    from layerswap_fast.plan import MergePlan, Term, make_recipe
    from layerswap_fast.plan.layers import classify

    def inputs(options):
        if len(options["model"]) != 2:
            raise ConfigError("linear takes exactly two models")
        return {model_role(i): p for i, p in enumerate(options["model"])}

    def plan(inp, options):
        first, a = check_all(inp.specs), options["alpha"]
        terms = (Term("model.0", a), Term("model.1", 1.0 - a))
        recipes = tuple(make_recipe(s, classify(s.name).layer, terms, s.dtype, dtypes_of(inp.specs)) for s in first)
        return MergePlan(0, None, None, (), (), recipes, method="linear")

    return Method(name="linear", command="linear", summary="alpha·first + (1 − alpha)·second.",
                  options=(Option("model", "paths", "A model (twice).", required=True),
                           Option("alpha", "float", "Weight of the first model.", default=alpha_default)),
                  inputs=inputs, plan=plan, counts_layers=False)


@pytest.fixture()
def linear(monkeypatch: pytest.MonkeyPatch) -> Method:
    method = _linear()
    monkeypatch.setitem(METHODS, method.name, method)  # the registry line
    monkeypatch.setitem(main.commands, method.command, method_command(method))  # what import time does
    return method


def test_a_blend_only_method_works_through_the_api_the_cli_and_config(linear: Method, tmp_path: Path) -> None:
    family = make_llama_trio(tmp_path / "in", num_layers=2, roles=("task", "language"))
    tensors = {role: load_tensors(path) for role, path in family.items()}
    expected = {n: blend_ref([tensors["task"][n], tensors["language"][n]], [0.25, 0.75], t.dtype)
                for n, t in tensors["task"].items()}
    models = [str(family["task"]), str(family["language"])]

    ls.run("linear", tmp_path / "api", {"model": models, "alpha": 0.25})
    r = CliRunner().invoke(main, ["linear", "--model", models[0], "--model", models[1], "--alpha", "0.25",
                                  "-o", str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    config = tmp_path / "linear.yaml"
    config.write_text(yaml.safe_dump({"model": models, "alpha": 0.25}))
    r = CliRunner().invoke(main, ["linear", "--config", str(config), "-o", str(tmp_path / "config")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["linear", "--config", str(tmp_path / "cli" / "layerswap_recipe.json"),
                                  "-o", str(tmp_path / "recipe")])
    assert r.exit_code == 0, r.output
    for out in ("api", "cli", "config", "recipe"):
        merged = load_tensors(tmp_path / out)
        assert set(merged) == set(expected)
        assert all(raw_bytes(merged[n]) == raw_bytes(want) for n, want in expected.items()), out

    bad = tmp_path / "bad.yaml"
    bad.write_text("alpha: high\n")
    r = CliRunner().invoke(main, ["linear", "--config", str(bad), "--model", models[0], "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "alpha must be a finite number" in r.output and not (tmp_path / "x").exists()
    with pytest.raises(ls.ConfigError, match="no option 'beta'"):
        ls.run("linear", tmp_path / "y", {"model": models, "beta": 1})


# ------------------------------------------------------------------ errors: names below, flags above

def test_errors_name_api_parameters_and_the_cli_shows_flags(tmp_path: Path) -> None:
    family = make_llama_trio(tmp_path / "in", num_layers=2, roles=("base", "task"))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ls.OutputError, match="pass force to replace it"):
        ls.task_arithmetic(family["base"], [family["task"]], out)
    with pytest.raises(ls.ConfigError, match="give row_threshold or row_fraction, not both"):
        ls.revert(family["base"], family["task"], tmp_path / "r", row_threshold=0.1, row_fraction=0.1)
    r = CliRunner().invoke(main, ["task-arithmetic", "--base", str(family["base"]), "--model", str(family["task"]),
                                  "-o", str(out)])
    assert r.exit_code == 2 and "pass --force to replace it" in r.output
    r = CliRunner().invoke(main, ["revert", "--base", str(family["base"]), "--model", str(family["task"]),
                                  "--row-threshold", "0.1", "--row-fraction", "0.1", "-o", str(tmp_path / "r")])
    assert r.exit_code == 2 and "give --row-threshold or --row-fraction, not both" in r.output
