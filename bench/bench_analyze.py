"""Time ``layerswap-fast analyze`` (base + 2 experts) against ``cat`` of the same shard files.

    python bench/bench_analyze.py --shape 1b [--runs 3] [--device auto|cpu|cuda] [--threads N]
                                  [--save-heatmap bench/heatmap-1b.png] [--io mmap,pread]

The trio (with its base) is generated under ``bench/out/<shape>`` unless a complete one is there.
Runs are interleaved (cat, analyze, cat, analyze, ...) so both see the same page-cache state; with
``--io mmap,pread`` each round runs analyze once per read path (cat, analyze[mmap], analyze[pread]);
``cat`` of the base's and both experts' shards to /dev/null is the reading floor. Reports wall
seconds, GB/s of bytes read and peak RSS (``wait4``) per run, medians, the speed ratio
analyze/cat, the seconds analyze itself reports for its streaming pass (the rest is interpreter
start-up, validation and the heatmap), and one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (DEFAULT_WORKDIR, Timed, drop_caches, find_cli, machine_info, run_timed,  # noqa: E402
                    trio_dirname, trio_in_child)


def analyze_command() -> list[str]:
    cli = find_cli()
    return [cli, "analyze"] if cli else [sys.executable, "-m", "layerswap_fast.cli", "analyze"]


def shard_files(model: Path) -> list[Path]:
    return sorted(model.glob("*.safetensors"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1b", help="a shape of layerswap_fast.synthetic (make_trio.py checks it)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None, help="trio directory (default: bench/out/<shape>)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--save-heatmap", type=Path, default=None, help="copy the last run's heatmap.png here")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every timed run (root)")
    ap.add_argument("--io", default=None, help="comma-separated read paths (auto, mmap, pread): one analyze each")
    args = ap.parse_args(argv)
    ios = args.io.split(",") if args.io else []
    if any(x not in ("auto", "mmap", "pread") for x in ios):
        ap.error("--io takes auto, mmap, pread or a comma-separated list of them")
    variants = [f"analyze[{x}]" for x in ios] or ["analyze"]

    trio_dir = args.workdir or DEFAULT_WORKDIR / trio_dirname(args.shape)
    paths = trio_in_child(trio_dir, args.shape)
    files = [f for role in ("base", "language", "task") for f in shard_files(paths[role])]
    nbytes = sum(f.stat().st_size for f in files)

    base_cmd = analyze_command()
    out_root = Path(tempfile.mkdtemp(prefix="bench-analyze-", dir=trio_dir.parent))
    out = out_root / "stats"
    cmd = [*base_cmd, "--base", str(paths["base"]), "--expert", str(paths["language"]),
           "--expert", str(paths["task"]), "-o", str(out), "--force", "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]

    def cold() -> None:
        if args.cold and not drop_caches():
            sys.exit("--cold needs permission to write /proc/sys/vm/drop_caches")

    rows: list[tuple[str, Timed, float | None]] = []
    try:
        for i in range(args.runs):
            cold()
            c = run_timed(["cat", *map(str, files)], capture=False)
            if c.returncode != 0:
                raise SystemExit(f"cat failed: {c.stderr}")
            rows.append(("cat", c, None))
            for v in variants:
                cold()
                a = run_timed(cmd + (["--io", v[len("analyze["):-1]] if v != "analyze" else []))
                if a.returncode != 0:
                    raise SystemExit(f"{v} failed ({a.returncode}): {a.stderr or a.stdout}")
                m = re.search(r"read in ([0-9.]+) s", a.stdout)
                rows.append((v, a, float(m.group(1)) if m else None))
                print(f"run {i + 1}/{args.runs}: cat {c.seconds:.2f} s, {v} {a.seconds:.2f} s", flush=True)
        if args.save_heatmap:
            shutil.copyfile(out / "heatmap.png", args.save_heatmap)
        last_stdout = rows[-1][1].stdout
    finally:
        shutil.rmtree(out_root, ignore_errors=True)

    print(f"\n{args.shape} trio: base + 2 experts, {len(files)} shard files, {nbytes / 1e9:.2f} GB read per run")
    print(f"{'run':>3}  {'what':<15} {'seconds':>8} {'GB/s':>7} {'CPU s':>6} {'peak RSS MB':>12} {'pass s':>7}")
    for k, (what, t, pass_s) in enumerate(rows):
        print(f"{k // (1 + len(variants)) + 1:>3}  {what:<15} {t.seconds:>8.2f} {nbytes / t.seconds / 1e9:>7.2f} {t.cpu_s:>6.2f} "
              f"{t.peak_rss_mb:>12.0f} {'' if pass_s is None else f'{pass_s:.2f}':>7}")
    whats = ["cat", *variants]
    med = {w: statistics.median(t.seconds for x, t, _ in rows if x == w) for w in whats}
    rss = {w: max(t.peak_rss_mb for x, t, _ in rows if x == w) for w in whats}
    cpu = {w: statistics.median(t.cpu_s for x, t, _ in rows if x == w) for w in whats}
    load = os.getloadavg()[0]
    summary = {
        "bench": "analyze", "shape": args.shape, "runs": args.runs, "device": args.device,
        "threads": args.threads, "bytes": nbytes,
        "cat_s": round(med["cat"], 3), "cat_gb_s": round(nbytes / med["cat"] / 1e9, 3),
        "cat_cpu_s": round(cpu["cat"], 3), "loadavg_1m": round(load, 2),
        "command": " ".join(base_cmd),
        "machine": machine_info(trio_dir),
    }
    for v in variants:
        passes = [p for x, _, p in rows if x == v and p is not None]
        ratio = med["cat"] / med[v]
        print(f"median   cat {med['cat']:.2f} s ({nbytes / med['cat'] / 1e9:.2f} GB/s), {v} "
              f"{med[v]:.2f} s ({nbytes / med[v] / 1e9:.2f} GB/s; streaming pass "
              f"{statistics.median(passes) if passes else float('nan'):.2f} s): runs at {ratio:.0%} of "
              f"cat's speed, peak RSS {rss[v]:.0f} MB, CPU {cpu[v]:.2f} s")
        key = v.replace("[", "_").rstrip("]")  # analyze, analyze_mmap, ...
        summary.update({f"{key}_s": round(med[v], 3),
                        f"{key}_pass_s": round(statistics.median(passes), 3) if passes else None,
                        f"{key}_gb_s": round(nbytes / med[v] / 1e9, 3),
                        "ratio" if key == "analyze" else f"ratio_{key}": round(ratio, 3),
                        f"{key}_peak_rss_mb": round(rss[v], 1), f"{key}_cpu_s": round(cpu[v], 3)})
    print(f"CPU seconds (median): cat {cpu['cat']:.2f} on {os.cpu_count()} cores; "
          f"load average {load:.1f} at the end (other processes share the machine when it is above 0)")
    print("analyze output (last run):\n  " + "\n  ".join(last_stdout.strip().splitlines()))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
