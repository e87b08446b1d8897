"""All kernel benchmarks side by side in one run (H100): attention, SLA/SageSLA, W8A8 GEMM, fused norm.

Each per-op file (bench_attention.py, bench_sla.py, bench_gemm.py, bench_norm.py) times every
provider at the Wan shapes with CUDA events (median after warm-up); this script runs them in one
process, prints one table per op and writes benchmarks/results/kernels_<gpu>_<date>.json.

    python benchmarks/kernels.py [--quick] [--only attention,sla,gemm,norm] [--out DIR]
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere

from common import print_table, write_results  # noqa: E402

OPS = ("attention", "sla", "gemm", "norm")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer shapes/iterations")
    parser.add_argument("--only", default=",".join(OPS))
    parser.add_argument("--out", help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    results, failures = {}, {}
    for op in args.only.split(","):
        t0 = time.time()
        try:
            rows = importlib.import_module(f"bench_{op}").bench(quick=args.quick)
        except Exception as e:  # one op failing must not lose the others' numbers
            failures[op] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            continue
        results[op] = rows
        print(f"\n== {op} ({time.time() - t0:.0f} s)")
        columns = [c for c in ("op", "shape", "provider", "topk", "ms", "ms_graph", "tops", "tflops", "speedup",
                               "gbps", "of_copy", "cos", "rel_l1", "rel_err", "note") if any(c in r for r in rows)]
        print_table(rows, columns)
        # Written after every op, so a run stopped at its time limit keeps what it measured.
        write_results("kernels", {"results": results, "failures": failures, "complete": False}, args.out)
    write_results("kernels", {"results": results, "failures": failures, "complete": True}, args.out)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
