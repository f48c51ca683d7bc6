"""mergekit-yaml against mergekit 0.1.5 on a synthetic trio: per method, tensors identical / within
1 ulp / different, the wall time and peak RSS of both, and ours over a plain copy of one expert
(``cp --reflink=never``, timed before each method).

    python bench/vs_mergekit.py --shape 1b [--layers 4] [--methods linear,ties] [--workdir DIR]
                                [--ours-only [--rounds N]]

``--ours-only`` leaves mergekit out; with ``--rounds N`` every method runs N times, interleaved,
each command after a sync, and the medians are printed as a table. Each tool runs as its own
process (mergekit's time includes importing torch and mergekit, about 6 s here); the inputs are
read once before the first run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_WORKDIR, find_cli, run_timed, trio_dirname, trio_in_child  # noqa: E402

#: the configs, by method: the task and language experts merged against the base, in bf16
CONFIGS = {
    "linear": {"models": [{"model": "task", "parameters": {"weight": 0.5}},
                          {"model": "language", "parameters": {"weight": 0.5}}], "merge_method": "linear"},
    "task_arithmetic": {"models": [{"model": "task", "parameters": {"weight": 0.5}},
                                   {"model": "language", "parameters": {"weight": 0.5}}],
                        "base_model": "base", "merge_method": "task_arithmetic"},
    "ties": {"models": [{"model": "task", "parameters": {"weight": 0.5, "density": 0.5}},
                        {"model": "language", "parameters": {"weight": 0.5, "density": 0.5}}],
             "base_model": "base", "merge_method": "ties"},
    "slerp": {"models": [{"model": "task"}, {"model": "language"}], "base_model": "task",
              "merge_method": "slerp", "parameters": {"t": 0.5}},
    "model_stock": {"models": [{"model": "task"}, {"model": "language"}, {"model": "base"}], "base_model": "base",
                    "merge_method": "model_stock"},
    "breadcrumbs_ties": {"models": [{"model": "task", "parameters": {"weight": 0.5, "density": 0.8}},
                                    {"model": "language", "parameters": {"weight": 0.5, "density": 0.8}}],
                         "base_model": "base", "merge_method": "breadcrumbs_ties", "parameters": {"gamma": 0.05}},
    "dare_ties": {"models": [{"model": "task", "parameters": {"weight": 0.5, "density": 0.5}},
                             {"model": "language", "parameters": {"weight": 0.5, "density": 0.5}}],
                  "base_model": "base", "merge_method": "dare_ties"},
    "della": {"models": [{"model": "task", "parameters": {"weight": 0.5, "density": 0.5, "epsilon": 0.1}},
                         {"model": "language", "parameters": {"weight": 0.5, "density": 0.5, "epsilon": 0.1}}],
              "base_model": "base", "merge_method": "della"},
    "sce": {"models": [{"model": "task"}, {"model": "language"}], "base_model": "base", "merge_method": "sce",
            "parameters": {"select_topk": 0.5}},
    "nuslerp": {"models": [{"model": "task", "parameters": {"weight": 0.5}},
                           {"model": "language", "parameters": {"weight": 0.5}}],
                "base_model": "base", "merge_method": "nuslerp"},
    "nearswap": {"models": [{"model": "task"}, {"model": "language"}], "base_model": "task",
                 "merge_method": "nearswap", "parameters": {"t": 0.001}},
    "passthrough": {"models": [{"model": "task"}], "merge_method": "passthrough"},
    "multislerp": {"models": [{"model": "task", "parameters": {"weight": 0.5}},
                              {"model": "language", "parameters": {"weight": 0.5}}],
                   "base_model": "base", "merge_method": "multislerp"},
    "ram": {"models": [{"model": "task"}, {"model": "language"}], "base_model": "base", "merge_method": "ram"},
    "ramplus_tl": {"models": [{"model": "task"}, {"model": "language"}], "base_model": "base",
                   "merge_method": "ramplus_tl"},
    "breadcrumbs": {"models": [{"model": "task", "parameters": {"weight": 0.5, "density": 0.8}},
                               {"model": "language", "parameters": {"weight": 0.5, "density": 0.8}}],
                    "base_model": "base", "merge_method": "breadcrumbs", "parameters": {"gamma": 0.05}},
    "dare_linear": {"models": [{"model": "task", "parameters": {"weight": 0.5, "density": 0.5}},
                               {"model": "language", "parameters": {"weight": 0.5, "density": 0.5}}],
                    "base_model": "base", "merge_method": "dare_linear"},
    "della_linear": {"models": [{"model": "task", "parameters": {"weight": 0.5, "density": 0.5, "epsilon": 0.1}},
                                {"model": "language", "parameters": {"weight": 0.5, "density": 0.5, "epsilon": 0.1}}],
                     "base_model": "base", "merge_method": "della_linear"},
}
#: the methods run when --methods is not given
DEFAULT_METHODS = ["linear", "task_arithmetic", "ties", "slerp", "model_stock"]

MERGEKIT = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
run_merge(MergeConfiguration.model_validate(yaml.safe_load(open(sys.argv[1]))), sys.argv[2],
          options=MergeOptions(copy_tokenizer=False))
"""

COMPARE = """
import json, sys
import torch
from safetensors import safe_open
from pathlib import Path

def tensors(d):
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({n: h.get_tensor(n) for n in h.keys()})
    return out

ours, ref = tensors(sys.argv[1]), tensors(sys.argv[2])
counts = {"identical": 0, "within 1 ulp": 0, "different": 0}
elements = differing = 0
for name, want in ref.items():
    got = ours[name]
    bits = torch.int16 if want.element_size() == 2 else torch.int32
    gaps = (got.view(bits).long() - want.view(bits).long()).abs()
    gap = gaps.max() if got.numel() else 0
    counts["identical" if gap == 0 else "within 1 ulp" if gap == 1 else "different"] += 1
    elements, differing = elements + got.numel(), differing + int((gaps != 0).sum())
counts["elements differing"] = f"{differing} of {elements} ({100 * differing / max(elements, 1):.3g}%)"
print(json.dumps(counts))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"any of {', '.join(CONFIGS)}")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--trio", type=Path, default=None, help="an existing trio directory (default: made in workdir)")
    ap.add_argument("--shard-size", default="5GB",
                    help="shard size of the trio (one made with another is made again): bench_merge.py's trios "
                         "use --shard-size too")
    ap.add_argument("--ours-only", action="store_true",
                    help="skip mergekit (an 8b slice: its RAM and time); time and peak RSS of ours and the copy")
    ap.add_argument("--rounds", type=int, default=1,
                    help="with --ours-only: rounds over all the methods, each command after a sync; medians")
    args = ap.parse_args(argv)
    args.workdir = args.workdir.resolve()  # the configs' paths must hold inside it, where the children run
    args.trio = args.trio.resolve() if args.trio else None
    trio = trio_in_child(args.trio or args.workdir / trio_dirname(args.shape, args.layers), args.shape,
                         shard_size=args.shard_size, layers=args.layers)
    cli = find_cli()
    if cli is None:
        sys.exit("layerswap-fast is not installed")
    work = args.workdir / "vs_mergekit"
    for role in trio.values():
        subprocess.run(["cat", *map(str, role.glob("*.safetensors"))], stdout=subprocess.DEVNULL, check=True)
    methods = args.methods.split(",")
    if args.ours_only:
        return ours_only(cli, trio, work, methods, args.rounds)
    for method in methods:
        path = write_config(work, trio, method)
        ours, ref = work / f"ours-{method}", work / f"mergekit-{method}"
        for d in (ours, ref):
            shutil.rmtree(d, ignore_errors=True)
        copy_dir = work / "copy"
        shutil.rmtree(copy_dir, ignore_errors=True)
        copy = run_timed(["cp", "-r", "--reflink=never", str(trio["task"]), str(copy_dir)])
        shutil.rmtree(copy_dir, ignore_errors=True)
        mine = run_timed([cli, "mergekit-yaml", str(path), str(ours), "--no-copy-tokenizer"])
        # -c children run in the work directory: from the repository, its top-level kernels/ would
        # shadow the `kernels` package that transformers imports
        theirs = run_timed([sys.executable, "-c", MERGEKIT, str(path), str(ref)], cwd=work)
        if mine.returncode or theirs.returncode:
            print(f"{method}: failed\n{mine.stderr[-2000:]}\n{theirs.stderr[-2000:]}")
            continue
        counts = subprocess.run([sys.executable, "-c", COMPARE, str(ours), str(ref)], capture_output=True, cwd=work,
                                text=True, check=True).stdout.strip()
        for d in (ours, ref):  # a method's two outputs at a time: every method's would not fit every disk
            shutil.rmtree(d, ignore_errors=True)
        print(f"{method}: ours {mine.seconds:.1f} s {mine.peak_rss_mb:.0f} MB, mergekit {theirs.seconds:.1f} s "
              f"{theirs.peak_rss_mb:.0f} MB ({theirs.seconds / mine.seconds:.1f}x), copy {copy.seconds:.2f} s "
              f"(ours {mine.seconds / copy.seconds:.1f}x); tensors {counts}", flush=True)
    return 0


def write_config(work: Path, trio: dict[str, Path], method: str) -> Path:
    """The method's config over the trio, in bf16, as a file."""
    config = json.loads(json.dumps(CONFIGS[method]))
    for m in config["models"]:
        m["model"] = str(trio[m["model"]])
    if "base_model" in config:
        config["base_model"] = str(trio[config["base_model"]])
    config["dtype"] = "bfloat16"
    path = work / f"{method}.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return path


def ours_only(cli: str, trio: dict[str, Path], work: Path, methods: list[str], rounds: int) -> int:
    """Each round: per method a copy of one expert, then ours, each after an untimed sync (so that
    neither pays for the writeback of what came before it); the medians of the rounds."""
    seen: dict[str, list[tuple[float, float, float, float]]] = {m: [] for m in methods}
    for r in range(rounds):
        for method in methods:
            path, ours, copy_dir = write_config(work, trio, method), work / f"ours-{method}", work / "copy"
            for d in (ours, copy_dir):
                shutil.rmtree(d, ignore_errors=True)
            os.sync()
            copy = run_timed(["cp", "-r", "--reflink=never", str(trio["task"]), str(copy_dir)])
            shutil.rmtree(copy_dir)  # an 8b copy and output together would not fit every disk
            os.sync()
            mine = run_timed([cli, "mergekit-yaml", str(path), str(ours), "--no-copy-tokenizer"])
            if mine.returncode:
                sys.exit(f"{method}: failed {mine.stderr[-500:]}")
            os.sync()
            shutil.rmtree(ours, ignore_errors=True)
            seen[method].append((mine.seconds, mine.cpu_s, mine.peak_rss_mb, copy.seconds))
            print(f"round {r + 1} {method}: ours {mine.seconds:.1f} s (CPU {mine.cpu_s:.1f} s) {mine.peak_rss_mb:.0f} MB, "
                  f"copy {copy.seconds:.2f} s (ours {mine.seconds / copy.seconds:.1f}x)", flush=True)
    print("\n| method | ours s | CPU s | peak RSS MB | copy s | × copy (median of the rounds' ratios) |")
    print("|---|---:|---:|---:|---:|---:|")
    for method, runs in seen.items():
        med = [statistics.median(x[i] for x in runs) for i in range(4)]
        ratio = statistics.median(x[0] / x[3] for x in runs)
        print(f"| {method} | {med[0]:.2f} | {med[1]:.1f} | {med[2]:.0f} | {med[3]:.2f} | {ratio:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
