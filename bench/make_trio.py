"""Generate a synthetic base/task/language Llama trio for the benchmarks (skipped when present).

    python bench/make_trio.py --shape 1b --out bench/out/1b [--dtype BF16] [--shard-size 5GB]
                              [--layers N] [--no-base] [--seed 0] [--force]

A complete trio made with the same parameters (recorded in ``OUT/trio.json``, written last) is
left alone. Prints the seconds, bytes, GB/s and the peak RSS of the generation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (DEFAULT_WORKDIR, ensure_trio, load_synthetic, parse_size,  # noqa: E402
                    self_peak_rss_mb, trio_dirname)


def main(argv: list[str] | None = None) -> int:
    syn = load_synthetic()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1b", choices=sorted(syn.SHAPES))
    ap.add_argument("--out", type=Path, default=None,
                    help="trio directory (default: bench/out/<shape>[-<N>l][-<dtype>])")
    ap.add_argument("--dtype", default="BF16", choices=["BF16", "F16", "F32"], type=str.upper)
    ap.add_argument("--shard-size", default="5GB", help="largest shard file, e.g. 5GB, 500MB")
    ap.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    ap.add_argument("--no-base", action="store_true", help="only the two experts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="regenerate even if present")
    args = ap.parse_args(argv)

    out = args.out or DEFAULT_WORKDIR / trio_dirname(args.shape, args.layers, args.dtype)
    res = ensure_trio(out, args.shape, dtype=args.dtype, shard_size=parse_size(args.shard_size),
                      layers=args.layers, with_base=not args.no_base, seed=args.seed,
                      force=args.force)
    if not res.generated:
        print(f"trio already present in {out} (same parameters); nothing to do")
        return 0
    gbps = res.nbytes / 1e9 / res.seconds if res.seconds else float("inf")
    summary = {"shape": args.shape, "layers": args.layers, "dtype": args.dtype,
               "models": list(res.paths), "bytes": res.nbytes, "seconds": round(res.seconds, 3),
               "gb_per_s": round(gbps, 3), "peak_rss_mb": round(self_peak_rss_mb(), 1),
               "out": str(out)}
    print(f"wrote {', '.join(res.paths)} to {out}: {res.nbytes / 1e9:.2f} GB in {res.seconds:.2f} s "
          f"= {gbps:.2f} GB/s, peak RSS {summary['peak_rss_mb']:.0f} MB")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
