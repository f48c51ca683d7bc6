#!/usr/bin/env python
"""Bandwidth of the Triton kernels on a CUDA GPU, next to a device-to-device copy.

    python bench/bench_kernels.py            # the table below (about a minute on an H100)
    python bench/bench_kernels.py --sweep    # also try other BLOCK / num_warps settings

For every size (bytes of ONE input tensor, bf16: 1 MB ... 1 GB in powers of 4) it reports:

- blend, N=2:         out = 0.5*a + 0.5*b          bytes = 2 reads + 1 write
- row_mav:            mean |e - b| per row          bytes = 2 reads (+ rows x 4 written)
- row_mav_many, K=3:  3 experts against one base    bytes = 4 reads (+ 3 x rows x 4 written)

with rows of 4096 columns, as GB/s = (bytes read + bytes written) / median time (CUDA events,
after warmup), and the bandwidth of ``dst.copy_(src)`` moving the same number of bytes
(read + write) measured in the same run; ``ratio`` = kernel GB/s / copy GB/s. A memory-bound
kernel should reach ~0.9 of the copy.

Needs a CUDA device (do not run it in CI; it exits with a message otherwise).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

COLS = 4096
SIZES_MB = [1, 4, 16, 64, 256, 1024]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions per measurement (median)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--max-mb", type=int, default=1024, help="largest input size in MB")
    ap.add_argument("--sweep", action="store_true", help="also time other BLOCK/num_warps settings")
    args = ap.parse_args()

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench_kernels: TRITON_INTERPRET is set; unset it to benchmark on the GPU", file=sys.stderr)
        return 2
    try:
        import torch
    except ImportError:
        print("bench_kernels: torch is not installed", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device found; this benchmark needs an NVIDIA GPU (not for CI)",
              file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import triton

    from layerswap_fast.kernels import blend, row_mav, row_mav_many

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    print(f"GPU: {props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs), "
          f"torch {torch.__version__}, triton {triton.__version__}")
    print(f"bf16, rows of {COLS} columns; GB/s = (bytes read + written) / median of {args.reps} reps\n")

    def timeit(fn) -> float:
        for _ in range(args.warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    copy_cache: dict[int, float] = {}

    def copy_gbps(moved: int) -> float:
        """dst.copy_(src) with src + dst = ``moved`` bytes."""
        if moved not in copy_cache:
            n = moved // 2
            src = torch.empty(n, dtype=torch.uint8, device=dev).random_(0, 255)
            dst = torch.empty_like(src)
            copy_cache[moved] = 2 * n / timeit(lambda: dst.copy_(src)) / 1e9
            del src, dst
        return copy_cache[moved]

    header = f"{'kernel':<22}{'size/input':>12}{'bytes moved':>14}{'time us':>11}{'GB/s':>9}{'copy GB/s':>11}{'ratio':>7}"
    print(header)
    print("-" * len(header))

    def report(name: str, size_mb: int, moved: int, seconds: float) -> None:
        gbps = moved / seconds / 1e9
        cp = copy_gbps(moved)
        print(f"{name:<22}{size_mb:>9} MB{moved / 2**20:>11.0f} MB{seconds * 1e6:>11.1f}{gbps:>9.0f}{cp:>11.0f}"
              f"{gbps / cp:>7.2f}", flush=True)

    free = torch.cuda.mem_get_info()[0]
    for size_mb in [s for s in SIZES_MB if s <= args.max_mb]:
        numel = size_mb * 2**20 // 2
        rows = numel // COLS
        if 6 * size_mb * 2**20 > free * 0.8:
            print(f"(skipping {size_mb} MB: not enough free GPU memory)")
            continue
        a = torch.randn(rows, COLS, device=dev, dtype=torch.bfloat16)
        b = torch.randn(rows, COLS, device=dev, dtype=torch.bfloat16)
        out = torch.empty_like(a)
        nbytes = a.numel() * a.element_size()

        t = timeit(lambda: blend([a, b], [0.5, 0.5], out))
        report("blend N=2", size_mb, 3 * nbytes, t)

        t = timeit(lambda: row_mav(a, b))
        report("row_mav", size_mb, 2 * nbytes + rows * 4, t)

        c, d = torch.randn_like(a), torch.randn_like(a)
        t = timeit(lambda: row_mav_many([a, c, d], b))
        report("row_mav_many K=3", size_mb, 4 * nbytes + 3 * rows * 4, t)

        if args.sweep:
            for block, warps in [(1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 8), (8192, 16)]:
                t = timeit(lambda: blend([a, b], [0.5, 0.5], out, block=block, num_warps=warps))
                report(f"  blend B{block}/w{warps}", size_mb, 3 * nbytes, t)
            for bc, br, warps in [(512, 4, 4), (1024, 2, 4), (1024, 4, 8), (2048, 2, 8), (4096, 1, 8), (1024, 8, 8)]:
                t = timeit(lambda: row_mav(a, b, block_c=bc, block_r=br, num_warps=warps))
                report(f"  row_mav {br}x{bc}/w{warps}", size_mb, 2 * nbytes + rows * 4, t)
                t = timeit(lambda: row_mav_many([a, c, d], b, block_c=bc, block_r=br, num_warps=warps))
                report(f"  many {br}x{bc}/w{warps}", size_mb, 4 * nbytes + 3 * rows * 4, t)
        del a, b, c, d, out
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
