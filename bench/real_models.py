"""Every command on the real trio (scripts/real_models.py), and what the merges are worth.

    python bench/real_models.py [--family smollm2] [--runs 3] [--workdir bench/out/real]
                                [--save-heatmap bench/heatmap-smollm2.png]

Part 1, cost: each command's wall seconds and peak RSS (``wait4``), medians of ``--runs``
interleaved rounds, beside ``cat`` of the inputs' weights (the reading floor) in the same rounds.
Part 2, the method's own question at small scale: the held-out loss (mean next-token loss over
4096 tokens) of the base, each expert, a soup, task arithmetic, TIES and several layer swaps, on
the held-out Python text (the task expert's skill) and the held-out French text (the language
expert's). Does a swap keep both experts' gains? Prints markdown tables and one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, find_cli, machine_info, run_timed  # noqa: E402

sys.path.insert(0, str(REPO / "scripts"))
import real_models  # noqa: E402  (light: torch only inside its build and loss functions)

SCRIPT = REPO / "scripts" / "real_models.py"

#: name → arguments (less -o); {base}, {task}, {language} are the trio's directories
SWAPS = {
    "swap b5 t2 (default)": ["merge", "--task-expert", "{task}", "--language-expert", "{language}"],
    "swap b3 t1": ["merge", "--task-expert", "{task}", "--language-expert", "{language}", "--bottom", "3",
                   "--top", "1"],
    "swap b8 t4": ["merge", "--task-expert", "{task}", "--language-expert", "{language}", "--bottom", "8",
                   "--top", "4"],
    "swap b5 t2, ramp 2/2": ["merge", "--task-expert", "{task}", "--language-expert", "{language}",
                             "--lower-transition", "2", "--upper-transition", "2", "--transition-weights", "ramp"],
    "reverse swap b5 t2": ["merge", "--task-expert", "{language}", "--language-expert", "{task}"],
}
BASELINES = {
    "soup (uniform)": ["soup", "--model", "{task}", "--model", "{language}"],
    "soup (magnitude)": ["soup", "--model", "{task}", "--model", "{language}", "--weights", "magnitude",
                         "--base", "{base}"],
    "task arithmetic λ=1": ["task-arithmetic", "--base", "{base}", "--model", "{task}", "--model", "{language}"],
    "TIES d=0.2": ["ties", "--base", "{base}", "--model", "{task}", "--model", "{language}", "--density", "0.2"],
    "revert layers 0-4 of the task expert": ["revert", "--base", "{base}", "--model", "{task}", "--layers", "0-4"],
}
OTHER = {
    "plan": ["plan", "--task-expert", "{task}", "--language-expert", "{language}"],
    "analyze --suggest": ["analyze", "--base", "{base}", "--language-expert", "{language}", "--task-expert",
                          "{task}", "--suggest", "--force", "-o", "{work}/stats"],
}


def cli() -> list[str]:
    found = find_cli()
    return [found] if found else [sys.executable, "-m", "layerswap_fast.cli"]


def trio(family: str) -> dict[str, Path]:
    """Build (once per machine) in a child, so this process stays small for the RSS figures."""
    subprocess.run([sys.executable, str(SCRIPT), "--family", family], check=True, stdout=subprocess.DEVNULL)
    root = real_models.cache_root()
    return {role: root / family / role for role in ("base", "task", "language")}


def time_commands(paths: dict[str, Path], work: Path, runs: int) -> dict[str, list]:
    """Every command ``runs`` times, interleaved with ``cat`` of the three models' weights."""
    commands = {name: args for group in (OTHER, SWAPS, BASELINES) for name, args in group.items()}
    shards = [str(p) for role in ("base", "task", "language") for p in sorted(paths[role].glob("*.safetensors"))]
    figures: dict[str, list] = {"cat of base + experts": [], **{name: [] for name in commands}}
    fmt = {**{k: str(v) for k, v in paths.items()}, "work": str(work)}
    for _ in range(runs):
        cat = run_timed(["cat", *shards], capture=False)
        figures["cat of base + experts"].append((cat.seconds, cat.peak_rss_mb))
        for name, args in commands.items():
            out = ["-o", str(work / "out"), "--force"] if args[0] not in ("plan", "analyze") else []
            t = run_timed(cli() + [a.format(**fmt) for a in args] + out)
            if t.returncode != 0:
                raise SystemExit(f"{name} failed: {t.stderr.strip()[-2000:]}")
            figures[name].append((t.seconds, t.peak_rss_mb))
    return figures


def heldout(paths: dict[str, Path], work: Path) -> dict[str, dict[str, float]]:
    """Held-out losses of the inputs and of every merge, written under ``work/models``."""
    fmt = {k: str(v) for k, v in paths.items()}
    models = {"base": paths["base"], "task expert (Python)": paths["task"],
              "language expert (French)": paths["language"]}
    for i, (name, args) in enumerate({**SWAPS, **BASELINES}.items()):
        out = work / "models" / str(i)
        subprocess.run(cli() + [a.format(**fmt) for a in args] + ["-o", str(out), "--force"], check=True,
                       stdout=subprocess.DEVNULL)
        models[name] = out
    done = subprocess.run([sys.executable, str(SCRIPT), "--heldout-loss", *map(str, models.values())],
                          check=True, capture_output=True, text=True)
    losses = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {name: {"python": x["python"], "french": x["french"]} for name, x in zip(models, losses)}


def print_tables(figures: dict[str, list], losses: dict[str, dict[str, float]]) -> None:
    print("| command | wall s (median) | peak RSS MB (median) |\n|---|---:|---:|")
    for name, runs in figures.items():
        print(f"| {name} | {statistics.median(s for s, _ in runs):.2f} | {statistics.median(r for _, r in runs):.0f} |")
    base = losses["base"]
    print("\n| model | Python held-out loss | Δ vs base | French held-out loss | Δ vs base |\n|---|---:|---:|---:|---:|")
    for name, x in losses.items():
        print(f"| {name} | {x['python']:.4f} | {x['python'] - base['python']:+.4f} | {x['french']:.4f} | "
              f"{x['french'] - base['french']:+.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="smollm2")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "real")
    ap.add_argument("--save-heatmap", type=Path, help="copy the real pair's heatmap.png here")
    args = ap.parse_args()
    work = args.workdir / args.family
    work.mkdir(parents=True, exist_ok=True)
    paths = trio(args.family)
    figures = time_commands(paths, work, args.runs)
    losses = heldout(paths, work)
    if args.save_heatmap:
        shutil.copyfile(work / "stats" / "heatmap.png", args.save_heatmap)
    print(f"machine: {json.dumps(machine_info(work))}; family {args.family}; {args.runs} interleaved rounds\n")
    print_tables(figures, losses)
    print("\n" + json.dumps({"family": args.family, "timings": figures, "heldout_loss": losses}))


if __name__ == "__main__":
    main()
