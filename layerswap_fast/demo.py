"""The demo: a synthetic trio, its plan, the merge, and a check of every output tensor."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from .api import merge
from .formats.checkpoint import open_checkpoint
from .errors import OutputError
from .plan.layers import classify
from .methods.swap import render_plan
from .synthetic import bfloat16_to_float32, float32_to_bfloat16

_NP = {"F32": np.float32, "F16": np.float16}


def to_float32(raw: bytes, dtype: str) -> np.ndarray:
    """Decode BF16/F16/F32 bytes to float32 (bf16 is the top half of a float32)."""
    if dtype == "BF16":
        return bfloat16_to_float32(np.frombuffer(raw, dtype=np.uint16))
    return np.frombuffer(raw, dtype=_NP[dtype]).astype(np.float32)


def from_float32(values: np.ndarray, dtype: str) -> bytes:
    """Round float32 to ``dtype`` to nearest even (numpy does this for F16; BF16 by bit arithmetic)."""
    if dtype == "BF16":
        return float32_to_bfloat16(values).tobytes()
    return values.astype(_NP[dtype]).tobytes()


def check_merge(out: Path, experts: dict[str, Path]) -> tuple[int, int]:
    """Compare every tensor of ``out`` with the weighted sum its recipe names, computed in numpy.
    Returns (tensors checked, tensors that differ)."""
    recipe = json.loads((out / "layerswap_recipe.json").read_text())
    layers = {row["layer"]: row["sources"] for row in recipe["layers"]}
    checked = differ = 0
    with ExitStack() as stack:
        merged = stack.enter_context(open_checkpoint(out))
        opened = {role: stack.enter_context(open_checkpoint(p)) for role, p in experts.items()}
        for name, spec in merged.specs.items():
            layer = classify(name).layer
            sources = recipe["non_layer"] if layer is None else layers[layer]
            acc = None
            for role, weight in sources.items():
                src = opened[role].specs[name]
                term = np.float32(weight) * to_float32(opened[role].read(name), src.dtype)
                acc = term if acc is None else acc + term
            assert acc is not None
            checked += 1
            differ += from_float32(acc, spec.dtype) != merged.read(name)
    return checked, differ


MARKER = ".layerswap-demo"  # in a workdir whose trio/ and merged/ the demo made, and may replace


def _claim(workdir: Path) -> tuple[Path, Path]:
    """The demo's two directories in ``workdir``; OutputError where either exists and the demo
    did not make it (no marker): a user's directory is never replaced."""
    made = workdir / "trio", workdir / "merged"
    if any(os.path.lexists(p) for p in made) and not (workdir / MARKER).is_file():
        raise OutputError(f"{workdir} already holds a trio/ or merged/ that the demo did not make; "
                          f"choose another --workdir")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / MARKER).write_text("made by layerswap-fast demo: trio/ and merged/ may be replaced\n")
    except OSError as e:
        raise OutputError(f"cannot use {workdir} for the demo: {e.strerror}") from None
    return made


def run_demo(workdir: Path, echo: Callable[[str], object] = print) -> None:
    from .synthetic import make_trio
    trio_dir, out = _claim(workdir)
    if trio_dir.is_symlink() or not trio_dir.is_dir():
        trio_dir.unlink(missing_ok=True)
    else:
        shutil.rmtree(trio_dir)
    trio = make_trio(trio_dir, "tiny")
    echo(f"synthetic trio (tiny Llama, bf16) in {trio_dir}: base, task expert, language expert")
    result = merge(trio["task"], trio["language"], out, force=True)
    echo(render_plan(result.plan))
    assert result.stats is not None
    echo(result.stats.summary())
    checked, differ = check_merge(out, {"task": trio["task"], "language": trio["language"]})
    verdict = "all bit-exact" if differ == 0 else f"{differ} DIFFER"
    echo(f"check: {checked} tensors compared with a numpy reference of their recipe: {verdict}")
    echo(f"try: layerswap-fast plan --task-expert {trio['task']} --language-expert {trio['language']} --bottom 4 --top 1")
    if differ:
        raise SystemExit(1)
