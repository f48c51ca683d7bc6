"""layerswap-fast beside a plain copy and mergekit, interleaved, on a synthetic trio.

    python bench/compare.py --shape 1b --runs 3 [--cold] [--mergekit bench/.venv-mergekit/bin/mergekit-yaml]

Per round, in turn: (A) `cp` of the task expert's shard files, (B) `layerswap-fast merge` with
the defaults, (C) mergekit on the equivalent linear config generated from our recipe (slices for
the swapped and transition layers, zero-length slices at both ends so embeddings, final norm and
lm_head are averaged). Prints medians with min/max of seconds, GB/s and peak RSS, the ratios, and
whether every output tensor is byte-identical between the two mergers. `--cold` drops the page
cache before every timed run (needs root); the `8b` trio is larger than RAM anyway.

mergekit lives in its own environment (it pins versions of its own):
    python3 -m venv bench/.venv-mergekit && bench/.venv-mergekit/bin/pip install torch==2.13.0 mergekit
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import (drop_caches, find_cli, machine_info, round_order, run_timed, shard_bytes, sync,  # noqa: E402
                    trio_dirname, trio_in_child)

DEFAULT_MERGEKIT = HERE / ".venv-mergekit" / "bin" / "mergekit-yaml"


def mergekit_config(task: Path, language: Path, num_layers: int, bottom: int = 5, top: int = 2,
                    lower: int = 1, upper: int = 1) -> str:
    """The default layer swap as a mergekit linear merge over slices."""
    def src(model: Path, a: int, b: int, w: float) -> str:
        return f"      - model: {model}\n        layer_range: [{a}, {b}]\n        parameters: {{weight: {w}}}\n"

    def piece(*sources: str) -> str:
        return "  - sources:\n" + "".join(sources)

    L = num_layers
    slices = [
        piece(src(task, 0, 0, 0.5), src(language, 0, 0, 0.5)),         # embeddings averaged
        piece(src(language, 0, bottom, 1.0)),
        piece(src(task, bottom, bottom + lower, 0.5), src(language, bottom, bottom + lower, 0.5)),
        piece(src(task, bottom + lower, L - top - upper, 1.0)),
        piece(src(task, L - top - upper, L - top, 0.5), src(language, L - top - upper, L - top, 0.5)),
        piece(src(language, L - top, L, 1.0)),
        piece(src(task, L, L, 0.5), src(language, L, L, 0.5)),          # final norm, lm_head averaged
    ]
    return "merge_method: linear\ndtype: bfloat16\nparameters: {normalize: true}\nslices:\n" + "".join(slices)


class DirtySampler:
    """Peak of /proc/meminfo Dirty+Writeback while a command runs."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> int:
        total = 0
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(("Dirty:", "Writeback:")):
                total += int(line.split()[1]) * 1024
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read())
            time.sleep(0.05)

    def __enter__(self) -> DirtySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def identical_tensors(a: Path, b: Path) -> tuple[int, list[str]]:
    """Compare every tensor's bytes between two checkpoints, streaming, in a child process."""
    code = f"""
import json, sys
from layerswap_fast import open_checkpoint
with open_checkpoint({str(a)!r}) as x, open_checkpoint({str(b)!r}) as y:
    bad = sorted(set(x.specs) ^ set(y.specs))
    for name, s in x.specs.items():
        if name in y.specs and (s.dtype != y.specs[name].dtype or s.shape != y.specs[name].shape
                                or any(p != q for p, q in zip(x.iter_chunks(name), y.iter_chunks(name)))):
            bad.append(name)
    print(json.dumps([len(x.specs), bad]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    n, bad = json.loads(out)
    return n, bad


def summarize(name: str, runs: list[dict], nbytes: int) -> dict:
    secs = [r["seconds"] for r in runs]
    rss = [r["peak_rss_mb"] for r in runs]
    med = statistics.median(secs)
    return {"method": name, "runs": len(runs), "median_s": round(med, 3), "min_s": round(min(secs), 3),
            "max_s": round(max(secs), 3), "gb_per_s": round(nbytes / med / 1e9, 3),
            "peak_rss_mb": round(statistics.median(rss), 1), "peak_rss_max_mb": round(max(rss), 1),
            "dirty_peak_mb": round(max(r.get("dirty_mb", 0) for r in runs), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--layers", type=int, default=None, help="layer count (for the 70b-slice shape)")
    ap.add_argument("--shard-size", default="5GB", help="shard size of the generated trio")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-base", action="store_true", help="the trio has (or gets) no base model: saves disk")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every timed run")
    ap.add_argument("--methods", default="copy,merge,mergekit")
    ap.add_argument("--merge-arg", action="append", default=[], help="extra flag for layerswap-fast merge")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                    help="an extra merge method with these flags, e.g. hard='--link hard' (repeat)")
    ap.add_argument("--mergekit", type=Path, default=DEFAULT_MERGEKIT)
    ap.add_argument("--workdir", type=Path, default=HERE / "out")
    args = ap.parse_args()
    methods = args.methods.split(",")
    variants = dict(v.split("=", 1) for v in args.variant)
    methods += [f"merge-{name}" for name in variants]
    if "mergekit" in methods and not args.mergekit.exists():
        sys.exit(f"mergekit not found at {args.mergekit}; see this script's docstring, or pass --methods copy,merge")

    trio_dir = args.workdir / trio_dirname(args.shape, args.layers)
    trio = trio_in_child(trio_dir, args.shape, shard_size=args.shard_size, layers=args.layers,
                         with_base=not args.no_base)
    num_layers = json.loads((trio["task"] / "config.json").read_text())["num_hidden_layers"]
    nbytes = shard_bytes(trio["task"])
    out = {m: args.workdir / f"{trio_dir.name}.compare-{m}" for m in methods}
    for p in out.values():
        shutil.rmtree(p, ignore_errors=True)
    config = args.workdir / f"{trio_dir.name}.mergekit.yml"
    config.write_text(mergekit_config(trio["task"], trio["language"], num_layers))
    cli = find_cli()
    commands = {
        "copy": lambda o: ["bash", "-c", f'mkdir -p "{o}" && cp "{trio["task"]}"/*.safetensors "{o}"/'],
        "merge": lambda o: [cli, "merge", "--task-expert", str(trio["task"]), "--language-expert",
                            str(trio["language"]), "-o", str(o), *args.merge_arg],
        "mergekit": lambda o: [str(args.mergekit), str(config), str(o), "--quiet", "--no-copy-tokenizer"],
    }
    for name, flags in variants.items():
        commands[f"merge-{name}"] = (lambda f: lambda o: commands["merge"](o) + f.split())(flags)
    if not args.cold:  # warm: read every input once so no method pays for the first read
        subprocess.run(["bash", "-c", f'cat "{trio["task"]}"/*.safetensors "{trio["language"]}"/*.safetensors > /dev/null'])
    results: dict[str, list[dict]] = {m: [] for m in methods}
    identity: tuple[int, list[str]] | None = None
    for round_ in range(args.runs):
        # each output is deleted as soon as it is measured (and compared), for the reason the
        # order alternates: see common.round_order
        for m in round_order(methods, round_):
            shutil.rmtree(out[m], ignore_errors=True)
            if args.cold and not drop_caches():
                sys.exit("--cold needs permission to write /proc/sys/vm/drop_caches")
            sync()
            with DirtySampler() as dirty:
                t = run_timed(commands[m](out[m]))
            if t.returncode != 0:
                sys.exit(f"{m} failed: {t.stderr.strip()[-2000:]}")
            results[m].append({"seconds": t.seconds, "peak_rss_mb": t.peak_rss_mb, "dirty_mb": dirty.peak / 1e6})
            print(f"round {round_ + 1} {m:9s} {t.seconds:7.2f} s  {t.peak_rss_mb:7.1f} MB RSS  "
                  f"dirty peak {dirty.peak / 1e6:7.1f} MB", flush=True)
            pair = ("merge", "mergekit")
            if identity is None and m in pair and set(pair) <= set(methods):
                if not all(out[x].exists() for x in pair):
                    continue  # kept until the other one of the pair exists, once
                identity = identical_tensors(*(out[x] for x in pair))
                for x in pair:
                    shutil.rmtree(out[x], ignore_errors=True)
            shutil.rmtree(out[m], ignore_errors=True)
    for p in out.values():
        shutil.rmtree(p, ignore_errors=True)
    table = [summarize(m, results[m], nbytes) for m in methods]
    print(f"\n{args.shape} trio ({nbytes / 1e9:.2f} GB per expert), {'cold' if args.cold else 'warm'} cache, "
          f"{args.runs} interleaved rounds")
    print(f"{'method':9s} {'median s':>9s} {'min s':>7s} {'max s':>7s} {'GB/s':>6s} {'RSS MB':>7s} {'dirty MB':>9s}")
    for row in table:
        print(f"{row['method']:9s} {row['median_s']:9.2f} {row['min_s']:7.2f} {row['max_s']:7.2f} "
              f"{row['gb_per_s']:6.2f} {row['peak_rss_mb']:7.1f} {row['dirty_peak_mb']:9.1f}")
    by = {row["method"]: row for row in table}
    ratios = {}
    for m in by:
        if m.startswith("merge") and "copy" in by:
            ratios[f"{m}/copy"] = round(by[m]["median_s"] / by["copy"]["median_s"], 3)
    if "mergekit" in by and "merge" in by:
        ratios["mergekit/merge"] = round(by["mergekit"]["median_s"] / by["merge"]["median_s"], 2)
        ratios["merge_rss/mergekit_rss"] = round(by["merge"]["peak_rss_mb"] / by["mergekit"]["peak_rss_mb"], 3)
    if "mergekit" in by and "copy" in by:
        ratios["mergekit/copy"] = round(by["mergekit"]["median_s"] / by["copy"]["median_s"], 2)
    for k, v in ratios.items():
        print(f"{k}: {v}")
    if identity is not None:
        n, bad = identity
        print(f"byte-identical tensors (merge vs mergekit): {n - len(bad)}/{n}" + (f"; differ: {bad[:5]}" if bad else ""))
    print(json.dumps({"shape": args.shape, "layers": num_layers, "cache": "cold" if args.cold else "warm",
                      "results": table, "ratios": ratios,
                      "identical": None if identity is None else {"tensors": identity[0], "differ": identity[1]},
                      "machine": machine_info(args.workdir)}))


if __name__ == "__main__":
    main()
