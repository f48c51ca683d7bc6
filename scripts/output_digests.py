"""Digest every output tensor of every method on synthetic trios, to show a refactor changed no byte.

    python scripts/output_digests.py WORKDIR > digests.json      # before the change
    python scripts/output_digests.py WORKDIR --compare digests.json   # after it: exit 1 on a difference

Runs the installed ``layerswap-fast`` command, so it measures whatever code is installed. Each case
is a command line; its digest is the sha256 of every output tensor's bytes, by name, plus the plan
(``plan --json``) and the recipe's method, options and config (paths vary with WORKDIR: left out).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

from layerswap_fast.synthetic import make_trio

CLI = [sys.executable, "-m", "layerswap_fast.cli"]


def cases(t: dict[str, Path], f: dict[str, Path]) -> dict[str, list[str]]:
    """Command lines (less ``-o OUT``) over the BF16 trio ``t`` and the F32 trio ``f``."""
    swap = ["--task-expert", str(t["task"]), "--language-expert", str(t["language"])]
    two = ["--task-expert", str(t["task"]), "--task-expert", str(t["task2"]), "--language-expert", str(t["language"])]
    models = ["--model", str(t["task"]), "--model", str(t["language"])]
    base = ["--base", str(t["base"])]
    return {
        "merge default": ["merge", *swap],
        "merge ramp": ["merge", *swap, "--bottom", "3", "--top", "3", "--lower-transition", "3",
                       "--upper-transition", "2", "--transition-weights", "ramp", "--non-layer", "task"],
        "merge magnitude": ["merge", *swap, *base, "--transition-weights", "magnitude", "--non-layer", "magnitude"],
        "merge soup-then-swap": ["merge", *two, *base, "--soup-weights", "magnitude", "--non-layer", "language"],
        "merge f32 out": ["merge", *swap, "--dtype", "f32", "--shard-size", "300KB"],
        "merge f32 trio to bf16": ["merge", "--task-expert", str(f["task"]), "--language-expert",
                                   str(f["language"]), "--dtype", "bf16", "--bottom", "2", "--top", "1"],
        "soup uniform": ["soup", *models],
        "soup weights": ["soup", *models, "--weights", "0.3,0.7", "--dtype", "f16"],
        "soup magnitude": ["soup", *models, *base, "--weights", "magnitude"],
        "task-arithmetic": ["task-arithmetic", *base, *models, "--lambda", "0.7"],
        "ties": ["ties", *base, *models],
        "ties dense": ["ties", *base, *models, "--density", "0.55", "--lambda", "1.3"],
        "ties f32": ["ties", "--base", str(f["base"]), "--model", str(f["task"]), "--model", str(f["language"])],
        "revert layers": ["revert", *base, "--model", str(t["task"]), "--layers", "0-2,14"],
        "revert threshold": ["revert", *base, "--model", str(t["task"]), "--row-threshold", "0.004"],
        "revert fraction": ["revert", *base, "--model", str(t["task"]), "--row-fraction", "0.37"],
        "revert f32 fraction": ["revert", "--base", str(f["base"]), "--model", str(f["task"]), "--row-fraction", "0.5"],
    }


def tensor_digests(out: Path) -> dict[str, str]:
    digests = {}
    for shard in sorted(out.glob("*.safetensors")):
        data = shard.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        for name, entry in header.items():
            if name != "__metadata__":
                a, b = entry["data_offsets"]
                digests[name] = f'{entry["dtype"]} {entry["shape"]} ' + hashlib.sha256(data[8 + n + a:8 + n + b]).hexdigest()
    return dict(sorted(digests.items()))


def run_case(argv: list[str], out: Path) -> dict[str, object]:
    shutil.rmtree(out, ignore_errors=True)
    done = subprocess.run([*CLI, *argv, "-o", str(out), "--threads", "2"], capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip()}
    recipe = json.loads((out / "layerswap_recipe.json").read_text())
    paths = ("task_expert", "language_expert", "base", "model", "stats")
    options = {k: v for k, v in recipe["options"].items() if k not in paths}
    result: dict[str, object] = {"tensors": tensor_digests(out), "method": recipe["method"], "options": options,
                                 "config": recipe["config"]}
    if argv[0] == "merge":
        args = [a for i, a in enumerate(argv[1:]) if "--shard-size" not in argv[i:i + 2]]  # plan writes nothing
        plan = subprocess.run([*CLI, "plan", *args, "--json"], capture_output=True, text=True, check=True)
        result["plan"] = hashlib.sha256(plan.stdout.encode()).hexdigest()
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--compare", type=Path)
    args = ap.parse_args()
    w = args.workdir
    t = make_trio(w / "bf16", "tiny", shard_size="200KB", experts=("task", "task2", "language"))
    f = make_trio(w / "f32", "tiny", dtype="F32", seed=3, num_layers=6)
    results = {name: run_case(argv, w / "out") for name, argv in cases(t, f).items()}
    if args.compare is None:
        json.dump(results, sys.stdout, indent=1, sort_keys=True)
        return 0
    before = json.loads(args.compare.read_text())
    differ = [name for name in results if results[name] != before.get(name)]
    for name in results:
        n = len(results[name].get("tensors", {}))
        print(f"{'DIFFERENT' if name in differ else 'identical':<9}  {name:<24} {n:>3} tensors")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
