"""The baselines on the 1b shape: time and peak RSS of every command beside a plain copy.

    python bench/bench_baselines.py [--runs 3]
    python bench/bench_baselines.py --runs 7 --only ties,ties-exact   # the one-pass TIES bracket on/off
    python bench/bench_baselines.py --only copy,soup,ties --io mmap,pread   # both read paths, same rounds
    python bench/bench_baselines.py --only copy,soup-2 --checksum default,none   # with and without the checksum

Uses the `1b` trio (base, task, language; ``--shape`` for another) and one more expert of the same
base (`task2`), so the multi-expert commands have three experts (``soup-2``: the task and language experts only, as
issue 20's soup of two). With ``--io`` (or ``--checksum``), every command but
the copy runs once per read path (or checksum) in each round (``ties[pread]``, ``soup-2[none]``, ...). Interleaved rounds, warm cache; each output is deleted
right after it is measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import find_cli, machine_info, round_order, run_timed, shard_bytes, sync, trio_in_child  # noqa: E402


# The CLI with every ties_file call on the exact passes (record_budget=0: no one-pass bracket), to
# measure what the bracket buys end to end.
EXACT_TIES_CLI = ("import functools, sys; from layerswap_fast import _core; "
                  "_core.ties_file = functools.partial(_core.ties_file, record_budget=0); "
                  "from layerswap_fast.cli import run; sys.exit(run())")


def ensure_extra_expert(workdir: Path, shape: str) -> Path:
    path = workdir / f"{shape}-extra" / "task2"
    if not (path / "model.safetensors.index.json").exists():
        # in a child: this process must stay small, its peak RSS is inherited by the timed children
        subprocess.run([sys.executable, "-c", "from layerswap_fast.synthetic import write_model; "
                        f"write_model({str(path)!r}, {shape!r}, role='task2')"], check=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=HERE / "out")
    ap.add_argument("--only", default=None, help="comma-separated subset of the methods")
    ap.add_argument("--shape", default="1b", help="a shape of layerswap_fast.synthetic (tiny for a smoke run)")
    ap.add_argument("--io", default=None,
                    help="comma-separated read paths (auto, mmap, pread): every command but copy runs once each")
    ap.add_argument("--checksum", default=None,
                    help="comma-separated checksums (default, none, ...): every command but copy runs once each")
    args = ap.parse_args()
    trio = trio_in_child(args.workdir / args.shape, args.shape)
    base, task, lang, task2 = (trio["base"], trio["task"], trio["language"],
                               ensure_extra_expert(args.workdir, args.shape))
    experts = [task, lang, task2]
    cli = find_cli()
    models = [a for e in experts for a in ("--model", str(e))]
    commands = {
        "copy": lambda o: ["bash", "-c", f'mkdir -p "{o}" && cp "{task}"/*.safetensors "{o}"/'],
        "soup": lambda o: [cli, "soup", *models, "-o", str(o)],
        "soup-2": lambda o: [cli, "soup", "--model", str(task), "--model", str(lang), "-o", str(o)],
        "soup-then-swap": lambda o: [cli, "merge", "--task-expert", str(task), "--task-expert", str(task2),
                                     "--language-expert", str(lang), "-o", str(o)],
        "task-arithmetic": lambda o: [cli, "task-arithmetic", "--base", str(base), *models, "--lambda", "0.5",
                                      "-o", str(o)],
        "ties": lambda o: [cli, "ties", "--base", str(base), *models, "--density", "0.2", "-o", str(o)],
        "ties-exact": lambda o: [sys.executable, "-c", EXACT_TIES_CLI, "ties", "--base", str(base), *models,
                                 "--density", "0.2", "-o", str(o)],
        "revert-layers": lambda o: [cli, "revert", "--base", str(base), "--model", str(task), "--layers", "0-4",
                                    "-o", str(o)],
        "revert-rows": lambda o: [cli, "revert", "--base", str(base), "--model", str(task), "--row-fraction", "0.2",
                                  "-o", str(o)],
    }
    methods = args.only.split(",") if args.only else [m for m in commands if m != "ties-exact"]
    ios = args.io.split(",") if args.io else []
    if any(x not in ("auto", "mmap", "pread") for x in ios):
        sys.exit("--io takes auto, mmap, pread or a comma-separated list of them")
    checksums = args.checksum.split(",") if args.checksum else []
    # each variant: its label and the options it adds to every command but the copy
    variants = [(x, ["--io", x]) for x in ios] + [(c, [] if c == "default" else ["--checksum", c]) for c in checksums]
    if variants:
        for m in [m for m in methods if m != "copy"]:
            for label, extra in variants:
                commands[f"{m}[{label}]"] = (lambda c, extra: lambda o: [*c(o), *extra])(commands[m], extra)
        methods = [v for m in methods for v in ([m] if m == "copy" else [f"{m}[{label}]" for label, _ in variants])]
    subprocess.run(["bash", "-c", "cat " + " ".join(f'"{p}"/*.safetensors' for p in (base, *experts)) + " > /dev/null"])
    nbytes = shard_bytes(task)
    results: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
    for round_ in range(args.runs):
        for m in round_order(methods, round_):
            out = args.workdir / f"{args.shape}.baseline-{m.replace('[', '-').rstrip(']')}"
            shutil.rmtree(out, ignore_errors=True)
            sync()
            t = run_timed(commands[m](out))
            if t.returncode != 0:
                sys.exit(f"{m} failed: {t.stderr.strip()[-2000:]}")
            results[m].append((t.seconds, t.peak_rss_mb))
            print(f"round {round_ + 1} {m:22s} {t.seconds:7.2f} s  {t.peak_rss_mb:7.1f} MB", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    copy_median = statistics.median(s for s, _ in results["copy"]) if "copy" in results else None
    print(f"\n{args.shape}, 3 experts ({nbytes / 1e9:.2f} GB each), warm cache, {args.runs} interleaved rounds")
    print(f"{'method':22s} {'median s':>9s} {'min s':>7s} {'max s':>7s} {'RSS MB':>7s} {'x copy':>7s}")
    table = []
    for m in methods:
        secs = [s for s, _ in results[m]]
        rss = max(r for _, r in results[m])
        med = statistics.median(secs)
        ratio = med / copy_median if copy_median else float("nan")
        table.append({"method": m, "median_s": round(med, 3), "min_s": round(min(secs), 3),
                      "max_s": round(max(secs), 3), "peak_rss_mb": round(rss, 1), "x_copy": round(ratio, 2)})
        print(f"{m:22s} {med:9.2f} {min(secs):7.2f} {max(secs):7.2f} {rss:7.1f} {ratio:7.2f}")
    print(json.dumps({"shape": args.shape, "results": table, "machine": machine_info(args.workdir)}))


if __name__ == "__main__":
    main()
