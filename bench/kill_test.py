"""Kill merges with SIGKILL at random points; `verify` must never accept an unfinished output.

    python bench/kill_test.py --shape 1b --rounds 20

Each round starts `layerswap-fast merge` of the trio, kills it after a random delay within the
merge's measured duration, then checks: either the merge had finished (exit 0 before the kill)
and `verify` accepts the output, or no output directory exists and `verify` refuses; the next
merge reports and removes the leftover partial directory.

With `--replace`, every round's merge replaces (`--force`) a complete earlier output made with
other options: after the kill, an output must exist and `verify` must accept it, the old one or
the new one, never neither.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import trio_dirname, trio_in_child  # noqa: E402

EXE = Path(sys.executable).with_name("layerswap-fast")


def merge_cmd(trio: dict[str, Path], out: Path) -> list[str]:
    return [str(EXE), "merge", "--task-expert", str(trio["task"]), "--language-expert", str(trio["language"]),
            "-o", str(out), "--link", "copy"]


def verify_ok(out: Path) -> bool:
    return subprocess.run([str(EXE), "verify", str(out)], capture_output=True).returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--workdir", type=Path, default=HERE / "out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replace", action="store_true", help="kill merges that replace an existing output")
    args = ap.parse_args()
    # with the base, so the trio the other benches made is reused rather than regenerated
    trio = trio_in_child(args.workdir / trio_dirname(args.shape), args.shape)
    out = args.workdir / f"{args.shape}.kill-out"
    shutil.rmtree(out, ignore_errors=True)
    durations = []
    for _ in range(2):  # warm: the kills must land inside a merge of cached inputs
        start = time.perf_counter()
        subprocess.run(merge_cmd(trio, out), check=True, capture_output=True)
        durations.append(time.perf_counter() - start)
        shutil.rmtree(out)
    duration = min(durations)
    rng = random.Random(args.seed)
    results = []
    for i in range(args.rounds):
        delay = rng.uniform(0.0, duration)
        if args.replace:
            subprocess.run(merge_cmd(trio, out) + ["--bottom", "4"], check=True, capture_output=True)
        force = ["--force"] if args.replace else []
        proc = subprocess.Popen(merge_cmd(trio, out) + force, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(delay)
        finished = proc.poll() is not None
        if not finished:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        exists, accepted = out.exists(), verify_ok(out)
        if args.replace:
            ok = accepted
        else:
            ok = accepted if (finished and proc.returncode == 0) else (not exists and not accepted)
        partials = [p.name for p in args.workdir.glob(f".{out.name}.layerswap-*")]
        results.append({"round": i, "delay_s": round(delay, 3), "finished": finished, "output_exists": exists,
                        "verify_accepts": accepted, "partials_left": len(partials), "ok": ok})
        print(json.dumps(results[-1]), flush=True)
        # the next run cleans any leftover partial directory and must then produce a verified output
        p = subprocess.run(merge_cmd(trio, out) + ["--force"], capture_output=True, text=True)
        if p.returncode != 0 or not verify_ok(out) or list(args.workdir.glob(f".{out.name}.layerswap-*")):
            print(f"recovery failed in round {i}: {p.stderr.strip()}", flush=True)
            results[-1]["ok"] = False
        shutil.rmtree(out, ignore_errors=True)
    bad = [r for r in results if not r["ok"]]
    killed = sum(not r["finished"] for r in results)
    print(f"{len(results)} rounds{' replacing an output' if args.replace else ''} ({killed} killed mid-merge, "
          f"merge takes {duration:.2f} s): "
          f"{'all ok' if not bad else f'{len(bad)} FAILED'}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
