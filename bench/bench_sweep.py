"""The paper's search at scale: a sweep against separate merges, and a SwapSession against a reload.

    python bench/bench_sweep.py [--shape 1b] [--layers N] [--tasks 3] [--languages 3]
                                [--separate 6] [--shard-size 500MB] [--workdir DIR] [--xfs-gb 0]
                                [--direct-io] [--rounds 1] [--parts sweep,session] [--link auto]
                                [--mergekit PATH] [--mergekit-runs 2]

Part 1: ``layerswap-fast sweep`` over T task × L language experts (synthetic) × 6 swap
configurations (bottom 4/5/6 × top 1/2), beside ``--separate`` of the same candidates built by
separate ``merge`` runs (``--separate 54``: all of them), their time and bytes extrapolated to all
candidates (said so in the output); the sweep and the separate merges each start with an empty
checksum cache, so neither takes the other's remembered digests: wall seconds, peak RSS, bytes the
filesystem gave out (``statvfs`` before and after, so reflinked extents count as shared).
Each phase starts after a ``sync`` (untimed), and each command's output is written back (``sync``,
timed apart) before anything deletes it: the figures come with and without that writeback, so
neither side's deferred writes land in the other's time, and a deleted output's dirty pages are
not dropped unwritten for free. ``--rounds N`` repeats both, interleaved (their order
alternating), and reports medians. With
``--xfs-gb N`` everything lives on an XFS filesystem with reflink made in a loop file of N GB
(needs root and mkfs.xfs): whole shards are then reflinked; ``--direct-io`` makes the loop device
bypass the page cache of its file, so that the XFS's pages are the only copy in memory, as on a
disk (else the experts are cached twice and a 3 × 3 grid no longer fits this machine's memory).
Where a ``mergekit-yaml`` is found (``--mergekit``, next to this Python, or in
``bench/.venv-mergekit``), it builds the first ``--mergekit-runs`` candidates as the equivalent
linear merge over slices, timed and extrapolated.

Part 2: ``SwapSession.apply`` between neighbouring configurations (bottom 5 -> 4 -> 5 ...) on a
transformers model, beside loading the merged model from disk with ``from_pretrained`` and reading
every page of its weights (transformers may map the file lazily; warm page cache): once reading
the changed tensors from the experts' files, once with the experts' tensors resident in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import DEFAULT_WORKDIR, find_cli, machine_info, run_timed, used_bytes, xfs_mount  # noqa: E402

GRID = {"bottom": [4, 5, 6], "top": [1, 2]}


def make_experts(root: Path, shape: str, layers: int | None, tasks: int, languages: int, shard_size: str) -> None:
    """The base and experts, generated in a child (the timing parent stays small)."""
    names = [f"task-{i + 1}" for i in range(tasks)] + [f"lang-{i + 1}" for i in range(languages)]
    if all((root / n / "model.safetensors.index.json").exists() for n in ["base", *names]):
        return
    code = ("import sys; from layerswap_fast import synthetic; "
            f"synthetic.make_trio({str(root)!r}, {shape!r}, shard_size={shard_size!r}, num_layers={layers!r}, "
            f"experts={tuple(names)!r})")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def part_mergekit(mergekit: Path, root: Path, rows: list[dict], runs: int) -> dict:
    """mergekit-yaml on the first ``runs`` candidates, each as the equivalent linear merge over
    slices (``compare.mergekit_config``), extrapolated to every candidate."""
    from compare import mergekit_config
    seconds, rss = [], 0.0
    num_layers = json.loads((root / "task-1" / "config.json").read_text())["num_hidden_layers"]
    for row in rows[:runs]:
        o = row["options"]
        config = root / "mergekit.yml"
        config.write_text(mergekit_config(Path(o["task_expert"][0]), Path(o["language_expert"][0]), num_layers,
                                          o["bottom"], o["top"]))
        out = root / "mergekit-out"
        shutil.rmtree(out, ignore_errors=True)
        t = run_timed([str(mergekit), str(config), str(out), "--no-copy-tokenizer"])
        if t.returncode:
            sys.exit(t.stderr)
        seconds.append(t.seconds)
        rss = max(rss, t.peak_rss_mb)
        shutil.rmtree(out, ignore_errors=True)
    return {"mergekit_timed": len(seconds), "mergekit_s_each": seconds,
            "mergekit_s_extrapolated": sum(seconds) * len(rows) / len(seconds), "mergekit_rss_mb": rss}


def part_sweep(cli: str, root: Path, tasks: int, languages: int, separate: int, shard_size: str,
               link: str = "auto", rounds: int = 1) -> dict:
    """``rounds`` interleaved rounds, each a sweep and the separate merges (their order alternating
    from round to round), medians reported beside every round's figures."""
    spec = {"task_experts": [str(root / f"task-{i + 1}") for i in range(tasks)],
            "language_experts": [str(root / f"lang-{i + 1}") for i in range(languages)],
            "grid": GRID, "shard_size": shard_size}
    (root / "spec.json").write_text(json.dumps(spec))  # JSON is YAML
    out = root / "sweep"
    each: list[dict] = []
    for r in range(rounds):
        swept: dict = {}
        for phase in (["sweep", "separate"] if r % 2 == 0 else ["separate", "sweep"]):
            os.sync()  # untimed: no phase pays for the writeback of what came before it
            if phase == "sweep":
                swept.update(_one_sweep(cli, root, out, link))
            else:
                swept.update(_separate(cli, root, separate, shard_size, link, _candidates(root)))
        if r + 1 < rounds:  # the last round's candidates stay to be looked at, as a single run's did
            shutil.rmtree(out, ignore_errors=True)
        print(f"round {r + 1}: sweep {swept['sweep_s']:.1f} s, separate {swept['separate_s_extrapolated']:.1f} s, "
              f"ratio {swept['sweep_s'] / swept['separate_s_extrapolated']:.2f}; written back too: sweep "
              f"{swept['sweep_s'] + swept['sweep_wb_s']:.1f} s, separate "
              f"{swept['separate_s_extrapolated'] + swept['separate_wb_s_extrapolated']:.1f} s, ratio "
              f"{_written_back_ratio(swept):.2f}", flush=True)
        each.append(swept)
    os.environ.pop("XDG_CACHE_HOME", None)
    s = dict(each[-1])
    for key in ("sweep_s", "sweep_bytes", "separate_s_extrapolated", "separate_bytes_extrapolated", "sweep_rss_mb",
                "sweep_wb_s", "separate_wb_s_extrapolated"):
        s[key] = statistics.median(e[key] for e in each)
    s["rounds"] = [{k: e[k] for k in ("sweep_s", "separate_s_extrapolated", "sweep_wb_s", "separate_wb_s_extrapolated")}
                   for e in each]
    return s


def _one_sweep(cli: str, root: Path, out: Path, link: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    before = used_bytes(root)
    fresh_checksum_cache(root / "cache-sweep")
    timed = run_timed([cli, "sweep", str(root / "spec.json"), "-o", str(out), "--link", link])
    if timed.returncode:
        sys.exit(timed.stderr)
    writeback = _sync_seconds()
    rows = json.loads((out / "sweep.json").read_text())["candidates"]
    return {"rows": rows, "candidates": len(rows), "sweep_s": timed.seconds, "sweep_wb_s": writeback,
            "sweep_rss_mb": timed.peak_rss_mb, "sweep_bytes": used_bytes(root) - before, "computed": sum(r["tensors_computed"] for r in rows),
            "shared": sum(r["tensors_shared"] for r in rows)}


def _candidates(root: Path) -> list[dict]:
    """The candidates' names and options, from the spec (the separate merges may come before the sweep)."""
    from layerswap_fast.sweep_spec import read_spec
    return [{"name": c.name, "options": c.options} for c in read_spec(root / "spec.json")]


def _first(value: str | list[str]) -> str:
    return value if isinstance(value, str) else value[0]


def _separate(cli: str, root: Path, separate: int, shard_size: str, link: str, rows: list[dict]) -> dict:
    picks = [rows[round(i * (len(rows) - 1) / max(1, separate - 1))] for i in range(separate)]
    seconds, written, writeback = [], 0, 0.0
    fresh_checksum_cache(root / "cache-separate")  # the first merge of each pair hashes its copies
    for row in picks:
        o, dest = row["options"], root / "separate" / row["name"]
        shutil.rmtree(dest, ignore_errors=True)
        before = used_bytes(root)
        cmd = [cli, "merge", "--task-expert", _first(o["task_expert"]), "--language-expert", _first(o["language_expert"]),
               "--bottom", str(o["bottom"]), "--top", str(o["top"]), "--shard-size", shard_size, "-o", str(dest),
               "--link", link]
        t = run_timed(cmd)
        if t.returncode:
            sys.exit(t.stderr)
        seconds.append(t.seconds)
        writeback += _sync_seconds()  # before the delete below, which would drop the dirty pages unwritten
        written += used_bytes(root) - before
        shutil.rmtree(dest)  # measured: room for the next (all 54 would not fit beside the sweep)
    shutil.rmtree(root / "separate", ignore_errors=True)
    scale = len(rows) / len(picks)
    return {"separate_timed": len(picks), "separate_s_extrapolated": sum(seconds) * scale,
            "separate_wb_s_extrapolated": writeback * scale,
            "separate_bytes_extrapolated": written * scale}


def _written_back_ratio(s: dict) -> float:
    """The sweep's time over the separate merges', each with its writeback."""
    return (s["sweep_s"] + s["sweep_wb_s"]) / (s["separate_s_extrapolated"] + s["separate_wb_s_extrapolated"])


def _sync_seconds() -> float:
    """How long writing back what is still dirty takes (``sync``): the part of a phase's cost that
    the kernel defers, and that a later phase would pay unless it is counted here."""
    t0 = time.perf_counter()
    os.sync()
    return time.perf_counter() - t0


def fresh_checksum_cache(directory: Path) -> None:
    """The children that follow remember checksums under an empty ``directory``: a phase of the
    bench does not inherit the digests an earlier one remembered (the experts are new to both)."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ["XDG_CACHE_HOME"] = str(directory)


SESSION_CODE = r"""
import json, sys, time, statistics, torch
import layerswap_fast as ls
from transformers import AutoModelForCausalLM
task, lang, merged, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
loads = []
for _ in range(rounds):
    t = time.perf_counter(); model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16)
    # transformers may map the file lazily: touch one element per 4 KiB page so every weight is read
    touched = sum(float(p.detach().reshape(-1)[::2048].float().sum()) for p in model.parameters())
    loads.append(time.perf_counter() - t)
result = {"load_s": statistics.median(loads)}
for resident in (False, True):
    session = ls.SwapSession(task, lang, model, resident=resident)
    session.apply({"bottom": 5})
    applies = []
    for i in range(rounds * 2):
        report = session.apply({"bottom": 4 if i % 2 == 0 else 5})
        applies.append(report.seconds)
    result["apply_resident_s" if resident else "apply_s"] = statistics.median(applies)
    result["noop_apply_s"] = session.apply({"bottom": 5}).seconds
print(json.dumps({**result, "apply_tensors": len(report.changed), "apply_mb": report.bytes / 1e6}))
"""


def part_session(root: Path, rounds: int) -> dict:
    merged = root / "merged-b5"
    if not (merged / "layerswap_recipe.json").exists():
        subprocess.run([find_cli() or "layerswap-fast", "merge", "--task-expert", str(root / "task-1"),
                        "--language-expert", str(root / "lang-1"), "-o", str(merged), "--force"], check=True)
    # not from the repository: its top-level kernels/ would shadow the `kernels` package transformers imports
    out = subprocess.run([sys.executable, "-c", SESSION_CODE, str(root / "task-1"), str(root / "lang-1"), str(merged),
                          str(rounds)], capture_output=True, text=True, cwd=root)
    if out.returncode:
        sys.exit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--languages", type=int, default=3)
    ap.add_argument("--separate", type=int, default=6)
    ap.add_argument("--shard-size", default="500MB")
    ap.add_argument("--session-rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR / "sweep")
    ap.add_argument("--xfs-gb", type=int, default=0)
    ap.add_argument("--direct-io", action="store_true",
                    help="the loop XFS reads and writes its file with O_DIRECT: one page cache, as on a real disk")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds of the sweep and the separate merges")
    ap.add_argument("--parts", default="sweep,session", help="which parts to run: sweep, session or both")
    ap.add_argument("--link", default="auto", help="--link of the sweep and of the separate merges")
    ap.add_argument("--mergekit", type=Path, default=None,
                    help="mergekit-yaml to time beside the sweep (default: the one next to this Python, if any)")
    ap.add_argument("--mergekit-runs", type=int, default=2, help="candidates mergekit builds (extrapolated)")
    args = ap.parse_args()
    parts = args.parts.split(",")
    args.workdir = args.workdir.resolve()  # the session's child runs elsewhere
    cli = find_cli()
    if cli is None:
        sys.exit("layerswap-fast is not installed")
    args.workdir.mkdir(parents=True, exist_ok=True)
    root = xfs_mount(args.workdir, args.xfs_gb, args.direct_io) if args.xfs_gb else args.workdir
    root = root / (args.shape if args.layers is None else f"{args.shape}-{args.layers}l")
    root.mkdir(exist_ok=True)
    make_experts(root, args.shape, args.layers, args.tasks, args.languages, args.shard_size)
    print("machine:", json.dumps(machine_info(root)))
    s: dict = {}
    if "sweep" in parts:
        s = part_sweep(cli, root, args.tasks, args.languages, args.separate, args.shard_size, args.link, args.rounds)
        print(f"\n{s['candidates']} candidates ({args.tasks} task × {args.languages} language experts × 6 configs, "
              f"{args.shape}{'' if args.layers is None else f' with {args.layers} layers'}, shards {args.shard_size}); "
              f"separate merges: {s['separate_timed']} timed, extrapolated to {s['candidates']}\n")
        print("| | seconds | GB written | peak RSS MB |\n|---|---:|---:|---:|")
        print(f"| sweep | {s['sweep_s']:.1f} | {s['sweep_bytes'] / 1e9:.2f} | {s['sweep_rss_mb']:.0f} |")
        print(f"| {s['candidates']} separate merges (extrapolated) | {s['separate_s_extrapolated']:.1f} | "
              f"{s['separate_bytes_extrapolated'] / 1e9:.2f} | |")
        mergekit = args.mergekit or next((m for m in (Path(sys.executable).parent / "mergekit-yaml",
                                                      HERE / ".venv-mergekit" / "bin" / "mergekit-yaml")
                                          if m.exists()), None)
        if mergekit is not None and args.mergekit_runs > 0:
            s.update(part_mergekit(mergekit, root, s["rows"], args.mergekit_runs))
            print(f"| {s['candidates']} mergekit-yaml runs ({s['mergekit_timed']} timed, extrapolated) | "
                  f"{s['mergekit_s_extrapolated']:.1f} | | {s['mergekit_rss_mb']:.0f} |")
        print(f"\nratios: time {s['sweep_s'] / s['separate_s_extrapolated']:.2f} (written back too: "
              f"{_written_back_ratio(s):.2f}), bytes "
              f"{s['sweep_bytes'] / max(1, s['separate_bytes_extrapolated']):.2f}; tensors computed {s['computed']}, "
              f"shared {s['shared']}")
        s.pop("rows")
    p: dict = {}
    if "session" in parts:
        p = part_session(root, args.session_rounds)
        print(f"\nSwapSession.apply bottom 5 <-> 4 ({p['apply_tensors']} tensors, {p['apply_mb']:.0f} MB): "
              f"{p['apply_s']:.3f} s from the files, {p['apply_resident_s']:.3f} s with resident expert layers "
              f"(an apply that changes nothing: {p['noop_apply_s']:.3f} s); from_pretrained of the merge, every page "
              f"read: {p['load_s']:.3f} s; ratios {p['apply_s'] / p['load_s']:.3f} and "
              f"{p['apply_resident_s'] / p['load_s']:.3f}")
    print(json.dumps({"sweep": s, "session": p, "args": {k: str(v) for k, v in vars(args).items()}}))


if __name__ == "__main__":
    main()
