"""The model card (README.md) in every output: Hub metadata that parses, an account of the merge
that names inputs without local paths, covered by the recipe and `verify`, absent from a dry run."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

import layerswap_fast as ls
import layerswap_fast.writing as writing
from layerswap_fast.api import render_plan, run
from layerswap_fast.formats.checkpoint import RECIPE_NAME, open_checkpoint
from layerswap_fast.formats.model_card import CARD_NAME, CardInput, code, front_matter, options_list
from layerswap_fast.formats.side_files import find_side_files
from layerswap_fast.methods import METHODS
from layerswap_fast.methods.method import describe_options
from layerswap_fast.synthetic import make_trio
from support import tensors_digest

LOCAL_META = {"tags": ["merge", "layerswap-fast"], "library_name": "transformers"}


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_trio(tmp_path_factory.mktemp("card"), "tiny", num_layers=12)


def split(card: str) -> tuple[dict[str, Any], str]:
    """The front matter, parsed, and the Markdown body."""
    assert card.startswith("---\n"), card[:40]
    head, sep, body = card[len("---\n"):].partition("\n---\n")
    assert sep, "the front matter is not closed"
    return yaml.safe_load(head), body


def card_of(out: Path) -> str:
    return (out / CARD_NAME).read_text(encoding="utf-8")


#: per method: its options over the trio, and lines its card must hold (inputs by role and name,
#: then what was computed)
CASES: dict[str, tuple[Any, list[str]]] = {
    "layer_swap": (lambda t: {"task_expert": t["task"], "language_expert": t["language"], "bottom": 2, "top": 1},
                   ["- task expert: `task` (a local checkpoint)", "- language expert: `language` (a local checkpoint)",
                    "- `bottom`: `2`", "- `top`: `1`"]),
    "soup": (lambda t: {"model": [t["task"], t["language"]], "weights": "1,3"},
             ["- model 1: `task` (a local checkpoint)", "- model 2: `language` (a local checkpoint)",
              "with the weights normalised to sum 1: model 1 0.25, model 2 0.75.", "- `weights`: `1.0,3.0`"]),
    "task_arithmetic": (lambda t: {"base": t["base"], "model": [t["task"], t["language"]], "lam": 0.3},
                        ["- base: `base` (a local checkpoint)", "- model 1: `task` (a local checkpoint)",
                         "base + λ·Σ(modelᵢ − base) with λ = 0.3", "- `lam`: `0.3`"]),
    "ties": (lambda t: {"base": t["base"], "model": [t["task"], t["language"]], "density": 0.5, "lam": 0.7},
             ["- base: `base` (a local checkpoint)", "- model 2: `language` (a local checkpoint)",
              "keeps its top 0.5 fraction by magnitude", "and λ = 0.7 times that average", "- `density`: `0.5`"]),
    "revert": (lambda t: {"base": t["base"], "model": t["task"], "layers": "0-1"},
               ["- base: `base` (a local checkpoint)", "- model 1: `task` (a local checkpoint)",
                "layers 0, 1 are the base's; everything else is the model's", "- `layers`: `0,1`"]),
}


@pytest.mark.parametrize("method", list(CASES))
def test_every_method_writes_a_card(method: str, trio: dict[str, Path], tmp_path: Path) -> None:
    options, lines = CASES[method]
    out = tmp_path / "out"
    run(method, out, options(trio))
    card = card_of(out)
    meta, body = split(card)
    assert meta == LOCAL_META  # no hub id known: no base_model, no relation
    command = METHODS[method].command
    assert body.startswith(f"\n# {' + '.join(dict.fromkeys(Path(p).name for p in _inputs(options(trio))))}: ")
    for line in [*lines, f"layerswap-fast {command} --config {RECIPE_NAME} -o OUT", "layerswap-fast verify DIR",
                 f"Merged with layerswap-fast {ls.__version__} (`layerswap-fast {command}`)"]:
        assert line in body, line
    for local in (trio["base"].parent, out.parent, Path.home()):
        assert str(local) not in card and str(local.resolve()) not in card


def _inputs(options: dict[str, Any]) -> list[Any]:
    order = ("task_expert", "language_expert", "base", "model")
    given = [options[k] for k in order if k in options]
    return [p for v in given for p in (v if isinstance(v, list) else [v])]


def test_the_swap_card_holds_the_layer_map(trio: dict[str, Path], tmp_path: Path) -> None:
    result = ls.merge(trio["task"], trio["language"], tmp_path / "out", ls.SwapConfig(bottom=2, top=1))
    layer_map = render_plan(result.plan)
    assert f"```text\n{layer_map}\n```" in card_of(tmp_path / "out")
    assert "    2  lower transition  0.5×task + 0.5×language" in layer_map


def test_other_paths_are_named_not_shown(trio: dict[str, Path], tmp_path: Path) -> None:
    """A swap with magnitude weights records its base as an option: the card names it by directory."""
    ls.merge(trio["task"], trio["language"], tmp_path / "out", ls.SwapConfig(transition_weights="magnitude"),
             base=trio["base"].resolve())
    card = card_of(tmp_path / "out")
    assert "- `base`: `base`" in card and "- `transition_weights`: `magnitude`" in card
    assert str(trio["base"].parent.resolve()) not in card


def test_the_card_is_in_the_recipe_and_verify_checks_it(trio: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    ls.merge(trio["task"], trio["language"], out, link="copy")
    recipe = json.loads((out / RECIPE_NAME).read_text())
    entry = next(e for e in recipe["files"] if e["file"] == CARD_NAME)
    assert entry == {"file": CARD_NAME, "size": (out / CARD_NAME).stat().st_size,
                     "blake3-tensors": tensors_digest((out / CARD_NAME).read_bytes())}
    ls.verify(out)
    data = bytearray((out / CARD_NAME).read_bytes())
    data[len(data) // 2] ^= 0x20
    (out / CARD_NAME).write_bytes(bytes(data))
    with pytest.raises(ls.VerifyError, match=f"{CARD_NAME}: blake3-tensors checksum differs"):
        ls.verify(out)
    (out / CARD_NAME).unlink()
    with pytest.raises(ls.VerifyError, match=f"'{CARD_NAME}', recorded in the recipe, is missing"):
        ls.verify(out)


def test_a_dry_run_writes_no_card(trio: dict[str, Path], tmp_path: Path) -> None:
    result = ls.merge(trio["task"], trio["language"], tmp_path / "out", dry_run=True)
    assert result.stats is None
    assert list(tmp_path.iterdir()) == []


def test_the_space_check_counts_the_card(trio: dict[str, Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    needed: list[int] = []
    monkeypatch.setattr(writing, "check_output", lambda out, guarded, force, n, cloned=None: needed.append(n))
    ls.merge(trio["task"], trio["language"], tmp_path / "out", dry_run=True)
    render = writing.render_card
    monkeypatch.setattr(writing, "render_card", lambda *a, **k: render(*a, **k) + "x" * 1_000_000)
    ls.merge(trio["task"], trio["language"], tmp_path / "out", dry_run=True)
    assert needed[1] - needed[0] == 1_000_000


def test_the_task_experts_readme_is_not_copied(trio: dict[str, Path], tmp_path: Path) -> None:
    task = tmp_path / "task"
    shutil.copytree(trio["task"], task)
    (task / CARD_NAME).write_text("# Some other model\n\nIts own card.\n")
    assert CARD_NAME not in {f.name for f in find_side_files(task)}
    ls.merge(task, trio["language"], tmp_path / "out")
    card = card_of(tmp_path / "out")
    assert "Some other model" not in card and "# task + language: layer swap" in card


def _with_hub_ids(monkeypatch: pytest.MonkeyPatch, ids: dict[str, tuple[str, str | None]]) -> None:
    """Inputs opened by a merge carry a hub id and revision, by directory name, as a resolved hub
    checkpoint does."""
    def opened(path: Any) -> Any:
        ckpt = open_checkpoint(path)
        if Path(path).name in ids:
            ckpt.hub_id, ckpt.revision = ids[Path(path).name]
        return ckpt
    monkeypatch.setattr(writing, "open_checkpoint", opened)


def test_hub_ids_become_base_models(trio: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _with_hub_ids(monkeypatch, {"task": ("org/math-expert", "0123abcd"), "language": ("org/swahili", None)})
    ls.merge(trio["task"], trio["language"], tmp_path / "out")
    meta, body = split(card_of(tmp_path / "out"))
    assert meta == {"base_model": ["org/math-expert", "org/swahili"], "base_model_relation": "merge", **LOCAL_META}
    assert "- task expert: [`org/math-expert@0123abcd`](https://huggingface.co/org/math-expert)" in body
    assert "- language expert: [`org/swahili`](https://huggingface.co/org/swahili)" in body
    assert body.startswith("\n# org/math-expert + org/swahili: layer swap\n")


def test_only_inputs_with_hub_ids_are_base_models(trio: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _with_hub_ids(monkeypatch, {"base": ("meta-llama/Llama-3.1-8B", "main")})
    ls.task_arithmetic(trio["base"], [trio["task"]], tmp_path / "out")
    meta, body = split(card_of(tmp_path / "out"))
    assert meta == {"base_model": ["meta-llama/Llama-3.1-8B"], "base_model_relation": "merge", **LOCAL_META}
    assert "- model 1: `task` (a local checkpoint)" in body


def test_front_matter_quotes_what_yaml_would_read_otherwise() -> None:
    odd = "org/x: #1"
    meta = yaml.safe_load(front_matter([CardInput("base", "b", odd)]).strip("-\n"))
    assert meta["base_model"] == [odd]
    assert code("a`b") == "``a`b``" and code("x\ny") == "`x\\ny`"


def test_the_default_account_is_the_options_list(trio: dict[str, Path]) -> None:
    """A method without its own ``describe`` gets its options; input paths never appear in them."""
    ties = replace(METHODS["ties"], describe=describe_options)
    recorded = {"base": str(trio["base"]), "model": [str(trio["task"])], "density": 0.4, "lam": 1.0, "dtype": None}
    shown = ties.card_options(recorded)
    assert shown == {"density": 0.4, "lam": 1.0, "dtype": None}
    assert ties.card_section(recorded, None) == options_list(shown) == "- `lam`: `1.0`\n- `density`: `0.4`"
    swap = METHODS["layer_swap"]
    shown = swap.card_options({"task_expert": ["/a/task"], "language_expert": ["/a/lang"], "base": "/a/b/llama",
                               "stats": "/a/stats/", "bottom": 5})
    assert shown["base"] == "llama" and shown["stats"] == "stats" and shown["bottom"] == 5
    assert "task_expert" not in shown and "language_expert" not in shown
