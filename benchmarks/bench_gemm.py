"""W8A8 GEMM at the Wan linear shapes: cuBLAS bf16 vs torch._int_mm vs our fast and TD-format kernels.

Providers, side by side per shape (M tokens × K -> N):
  cublas_bf16      torch.matmul in bf16 (the baseline)
  int_mm           torch._int_mm (cuBLASLt int8 -> int32), GEMM only, no scaling
  fast_gemm        ours, per-token × per-channel, GEMM + epilogue only (activations already int8): TMA tile
                   loads + persistent grid (the default main loop)
  fast_gemm_ptr    the same with pointer loads, one program per tile (TURBOVID_GEMM=ptr)
  fast_total       ours, per-token activation quantization + GEMM (what a standalone Linear pays)
  td_gemm          ours, TurboDiffusion 128×128 block-scaled format, GEMM only
  td_total         ours, TD activation quantization + GEMM
Target: fast_total ≥ 1.5× cublas_bf16 on every shape (`speedup` column = cuBLAS ms / provider ms).
Times are per call from CUDA-graph replays (no Python launch overhead), CUDA events, median.
rel_err = ‖y − y_bf16‖ / ‖y_bf16‖ on Gaussian activations with 1% outlier channels (3×).

    PYTHONPATH=. python benchmarks/bench_gemm.py [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere

from common import print_table, time_graph, write_results  # noqa: E402

from turbovid.kernels import int8_gemm as K  # noqa: E402

MS = (32760, 75600)
KN = ((1536, 1536), (1536, 8960), (8960, 1536), (5120, 5120), (5120, 13824), (13824, 5120))


def _activations(M: int, K_: int, outlier: float = 3.0) -> torch.Tensor:
    x = torch.randn(M, K_, device="cuda")
    x[:, torch.randperm(K_, device="cuda")[: K_ // 100]] *= outlier
    return x.to(torch.bfloat16)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.vector_norm((a.float() - b.float())) / torch.linalg.vector_norm(b.float())).item()


def _loop(loop: str, fn):
    """fn run with gemm_fast's main loop set to `loop` ("tma" or "ptr", int8_gemm.GEMM_LOOP)."""
    def run():
        old, K.GEMM_LOOP = K.GEMM_LOOP, loop
        try:
            return fn()
        finally:
            K.GEMM_LOOP = old
    return run


def bench(quick: bool = False) -> list[dict]:
    rows = []
    iters = 5 if quick else 10
    for M in MS[:1] if quick else MS:
        for K_, N in KN:
            torch.manual_seed(0)
            x = _activations(M, K_)
            w = (torch.randn(N, K_, device="cuda") * K_ ** -0.5).to(torch.bfloat16)
            flops = 2.0 * M * N * K_
            y_ref = torch.matmul(x, w.T)
            qw_f, sw_f = K.quant_per_token(w)
            qw_t, sw_t = K.quant_td(w)
            qx_f, sx_f = K.quant_per_token(x)
            qx_t, sx_t = K.quant_td(x)
            providers = {
                "cublas_bf16": (lambda: torch.matmul(x, w.T), None),
                "int_mm": (lambda: torch._int_mm(qx_f, qw_f.T), None),
                "fast_gemm_ptr": (_loop("ptr", lambda: K.gemm_fast(qx_f, sx_f, qw_f, sw_f)), None),
                "fast_gemm": (_loop("tma", lambda: K.gemm_fast(qx_f, sx_f, qw_f, sw_f)), None),
                "fast_total": (lambda: K.gemm_fast(*K.quant_per_token(x), qw_f, sw_f), "fast"),
                "td_gemm": (lambda: K.gemm_td(qx_t, sx_t, qw_t, sw_t, torch.bfloat16), None),
                "td_total": (lambda: K.gemm_td(*K.quant_td(x), qw_t, sw_t, torch.bfloat16), "td"),
            }
            base_ms = None
            for name, (fn, check) in providers.items():
                try:
                    ms = time_graph(fn, replays=iters)
                except RuntimeError as e:  # e.g. _int_mm shape limits: keep the other providers
                    rows.append({"op": "gemm", "shape": f"{M}x{K_}->{N}", "provider": name, "note": str(e)[:80]})
                    continue
                base_ms = ms if name == "cublas_bf16" else base_ms
                row = {"op": "gemm", "shape": f"{M}x{K_}->{N}", "provider": name, "ms": ms,
                       "tops": flops / ms / 1e9, "speedup": base_ms / ms}
                if check is not None:
                    row["rel_err"] = _rel(fn(), y_ref)
                if name == "fast_gemm_ptr":
                    row["note"] = str(K._gemm_fast_tuned.best_config)
                if name == "fast_gemm":
                    row["note"] = str(K._gemm_fast_tma_tuned.best_config)
                if name == "td_gemm":
                    row["note"] = str(K._gemm_td_tuned.best_config)
                rows.append(row)
            del x, w, y_ref, qw_f, qw_t, qx_f, qx_t
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    rows = bench(quick=args.quick)
    print_table(rows, ["shape", "provider", "ms", "tops", "speedup", "rel_err", "note"])
    totals = [r for r in rows if r["provider"] == "fast_total" and "speedup" in r]
    summary = {"target_fast_total_speedup": 1.5, "min_fast_total_speedup": min(r["speedup"] for r in totals),
               "met_on": sum(r["speedup"] >= 1.5 for r in totals), "shapes": len(totals)}
    print(summary)
    write_results("gemm", {"rows": rows, "summary": summary}, args.out)


if __name__ == "__main__":
    main()
