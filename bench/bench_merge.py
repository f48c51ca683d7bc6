"""Time the default layer-swap merge against a plain copy of the task expert's shards.

    python bench/bench_merge.py --shape 1b [--runs 3] [--workdir bench/out] [--shard-size 5GB] [--xfs-gb N]
                                [--layers N] [--dtype BF16] [--threads N] [--keep]
                                [--methods copy,merge] [--merge-arg=--device=cpu ...]
                                [--io mmap,pread]

Makes the synthetic task and language experts if needed (``bench/make_trio.py`` does the same
with a base), then runs, interleaved, ``--runs`` rounds of

  copy   ``cp --reflink=never`` of the task expert's shard files into a fresh directory (a plain data copy);
  merge  ``layerswap-fast merge --task-expert T --language-expert L -o OUT --force`` (defaults);
         with ``--io mmap,pread``, one merge per read path in every round (``merge[mmap]``,
         ``merge[pread]``), so both are compared in the same interleaved run.

Each run is a child process preceded by a ``sync`` (so one run's dirty pages do not bill the next)
and timed by wall clock; its peak RSS comes from ``wait4``. Both experts are read once before
the first round (``--no-warm`` skips that), so the first run does not alone pay for a cold cache. Each output is deleted as soon as it
is measured (``--keep`` keeps the last round's). Prints the machine, a table (median/min/max
seconds, GB/s of output shard bytes at the median, peak RSS) and, last, a one-line JSON summary.
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

# no numpy here: this process spawns the timed children, which inherit its peak RSS (common.py)
from common import (DEFAULT_WORKDIR, drop_caches, find_cli, machine_info, memory_cgroup, parse_size, run_timed,  # noqa: E402
                    shard_bytes, sync, trio_dirname, used_bytes, xfs_mount)

HERE = Path(__file__).resolve().parent


def _copy_cmd(task: Path, out: Path) -> list[str]:
    """A plain data copy: ``cp`` of coreutils 9 would reflink on a filesystem that can."""
    shards = sorted(str(p) for p in task.glob("*.safetensors"))
    return ["cp", "--reflink=never", *shards, str(out) + "/"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1b", help="tiny, 1b, 8b or 70b-slice")
    ap.add_argument("--xfs-gb", type=int, default=0,
                    help="work on an XFS with reflink made in a loop file of this many GB under --workdir "
                         "(needs root and mkfs.xfs): copied tensors are then cloned, and new storage is measured")
    ap.add_argument("--memory-mb", type=int, default=0,
                    help="run the copy and the merge each in a memory cgroup of this many MB (page cache "
                         "included; needs root): more bytes than the page cache absorbs, without that many "
                         "bytes on disk. Each run starts with the page cache dropped; with --xfs-gb the loop "
                         "device uses direct I/O")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--shard-size", default="5GB", help="shard size of the trio and of the merge")
    ap.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    ap.add_argument("--dtype", default="BF16", choices=["BF16", "F16", "F32"], type=str.upper)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="passed to the merge")
    ap.add_argument("--methods", default="copy,merge", help="comma-separated subset of copy,merge")
    ap.add_argument("--merge-arg", action="append", default=[],
                    help="extra argument for the merge command (repeatable), e.g. --merge-arg=--device=cpu")
    ap.add_argument("--io", default=None,
                    help="comma-separated read paths of the merge (auto, mmap, pread): one merge each per round")
    ap.add_argument("--keep", action="store_true", help="keep the last round's outputs")
    ap.add_argument("--no-warm", action="store_true",
                    help="skip reading the inputs once before the timed runs")
    args = ap.parse_args(argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in ("copy", "merge") for m in methods):
        ap.error("--methods takes copy, merge or both")
    ios = [x.strip() for x in args.io.split(",") if x.strip()] if args.io else []
    if any(x not in ("auto", "mmap", "pread") for x in ios):
        ap.error("--io takes auto, mmap, pread or a comma-separated list of them")
    if ios and "merge" in methods:
        methods = [v for m in methods for v in ([m] if m != "merge" else [f"merge[{x}]" for x in ios])]
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    shard_size = parse_size(args.shard_size)
    cli = find_cli()
    if "merge" in methods and cli is None:
        print("error: no layerswap-fast executable next to this Python or on PATH "
              "(pip install -e . first, or --methods copy)", file=sys.stderr)
        return 2

    workdir = args.workdir.resolve()
    if args.xfs_gb:
        workdir.mkdir(parents=True, exist_ok=True)
        workdir = xfs_mount(workdir, args.xfs_gb, direct_io=args.memory_mb > 0)
    limited = memory_cgroup(args.memory_mb) if args.memory_mb else None
    trio_name = trio_dirname(args.shape, args.layers, args.dtype)
    info = machine_info(workdir if workdir.exists() else workdir.parent)
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))

    trio_dir = workdir / trio_name
    make = [sys.executable, str(HERE / "make_trio.py"), "--shape", args.shape, "--out", str(trio_dir),
            "--dtype", args.dtype, "--shard-size", str(shard_size), "--seed", str(args.seed), "--no-base"]
    if args.layers is not None:
        make += ["--layers", str(args.layers)]
    made = subprocess.run(make, stdout=subprocess.PIPE, text=True)
    print("trio: " + (made.stdout.strip().splitlines() or ["?"])[0])
    if made.returncode != 0:
        print(f"error: {' '.join(make)} failed", file=sys.stderr)
        return 2
    task, language = trio_dir / "task", trio_dir / "language"
    floor = run_timed(["true"]).peak_rss_mb
    print(f"RSS floor: a child of this process reports at least {floor:.1f} MB "
          "(Linux charges the spawning parent's peak to vfork+exec children)")
    input_bytes = shard_bytes(task)
    print(f"task expert: {task} ({input_bytes / 1e9:.2f} GB in "
          f"{len(list(task.glob('*.safetensors')))} shards); language expert: {language}")

    def merge_cmd(out: Path, method: str) -> list[str]:
        assert cli is not None
        cmd = [cli, "merge", "--task-expert", str(task), "--language-expert", str(language),
               "-o", str(out), "--force", "--shard-size", str(shard_size)]
        if args.threads is not None:
            cmd += ["--threads", str(args.threads)]
        if method.startswith("merge["):
            cmd += ["--io", method[len("merge["):-1]]
        return cmd + list(args.merge_arg)

    if not args.no_warm and not args.memory_mb:
        # read both experts once, so the first timed run does not alone pay for a cold cache
        files = sorted(task.glob("*.safetensors")) + sorted(language.glob("*.safetensors"))
        subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=False)

    results: dict[str, list[dict]] = {m: [] for m in methods}
    failed: list[str] = []
    for run in range(1, args.runs + 1):
        for method in methods:
            out = workdir / f"{trio_name}.out-{method.replace('[', '-').rstrip(']')}"
            shutil.rmtree(out, ignore_errors=True)
            if method == "copy":
                out.mkdir(parents=True)
                cmd = _copy_cmd(task, out)
            else:
                cmd = merge_cmd(out, method)
            if limited is not None and not drop_caches():  # a cold start, then at most --memory-mb of cache
                print("error: --memory-mb needs root (to drop the page cache)", file=sys.stderr)
                return 2
            sync()
            before = used_bytes(workdir)
            timed = run_timed(cmd, preexec=limited)
            new_bytes = used_bytes(workdir) - before
            nbytes = shard_bytes(out) if out.exists() else 0
            line = (timed.stdout.strip().splitlines() or [""])[-1]
            print(f"run {run} {method:12s}: {timed.seconds:7.2f} s  {nbytes / 1e9 / timed.seconds:6.2f} GB/s  "
                  f"new storage {new_bytes / 1e9:6.3f} GB  peak RSS {timed.peak_rss_mb:7.1f} MB  "
                  f"exit {timed.returncode}" + (f"  | {line}" if line else ""), flush=True)
            if timed.returncode != 0:
                failed.append(method)
                print(f"  {method} failed: {' '.join(cmd)}\n  " +
                      "\n  ".join((timed.stderr or timed.stdout).strip().splitlines()[-10:]), file=sys.stderr)
            else:
                results[method].append({"seconds": timed.seconds, "bytes": nbytes, "new_bytes": new_bytes,
                                        "peak_rss_mb": timed.peak_rss_mb})
            if not (args.keep and run == args.runs):
                shutil.rmtree(out, ignore_errors=True)
        if failed:
            break

    summary: dict[str, object] = {"shape": args.shape, "layers": args.layers, "dtype": args.dtype,
                                  "runs": args.runs, "input_bytes": input_bytes,
                                  "shard_size": shard_size, "rss_floor_mb": round(floor, 1),
                                  "memory_mb": args.memory_mb,
                                  "machine": info}
    print()
    print(f"{'method':12s} {'runs':>4s} {'median s':>9s} {'min s':>8s} {'max s':>8s} "
          f"{'GB/s':>7s} {'new GB':>7s} {'new %':>6s} {'peak RSS MB':>12s}")
    medians: dict[str, float] = {}
    for method, rows in results.items():
        if not rows:
            continue
        secs = [r["seconds"] for r in rows]
        med = statistics.median(secs)
        nbytes = int(statistics.median(r["bytes"] for r in rows))
        rss = max(r["peak_rss_mb"] for r in rows)
        new_bytes = int(statistics.median(r["new_bytes"] for r in rows))
        medians[method] = med
        summary[method] = {"median_s": round(med, 3), "min_s": round(min(secs), 3),
                           "max_s": round(max(secs), 3), "gb_per_s": round(nbytes / 1e9 / med, 3),
                           "peak_rss_mb": round(rss, 1), "output_bytes": nbytes, "new_bytes": new_bytes,
                           "seconds": [round(s, 3) for s in secs]}
        print(f"{method:12s} {len(rows):4d} {med:9.2f} {min(secs):8.2f} {max(secs):8.2f} "
              f"{nbytes / 1e9 / med:7.2f} {new_bytes / 1e9:7.3f} {100 * new_bytes / max(1, nbytes):6.1f} {rss:12.1f}")
    for method in medians:
        if method.startswith("merge") and "copy" in medians:
            ratio = medians[method] / medians["copy"]
            key = "ratio_merge_over_copy" + (method[5:].replace("[", "_").rstrip("]") if method != "merge" else "")
            summary[key] = round(ratio, 3)
            print(f"{method} / copy (medians): {ratio:.2f}x")
    if failed:
        summary["failed"] = sorted(set(failed))
    print(json.dumps(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
