"""Fused norm + AdaLN modulation (+ INT8 emit) vs the PyTorch ops and vs device copy bandwidth.

Shapes [1, 32760, 1536] (1.3B 480p) and [1, 75600, 5120] (14B 720p). Variants:
  ln_mod        LayerNorm (no affine) + x̂·(1+scale)+shift, bf16 out       (norm1/norm2 in the DiT)
  ln_mod_int8   same, emitting INT8 + per-token scale only (for FastInt8Linear)
  ln_affine     affine LayerNorm, bf16 out                               (norm3)
  qk_norm_rope  RMSNorm over the width + RoPE of each head, bf16 in/out   (q and k of the self-attention;
                torch = models.dit.rms_norm + apply_rope, ours = kernels/qk_norm_rope.py)
Providers: torch (the reference ops, eager), ours (Triton), copy (torch copy of the same bytes).
gbps counts bytes read + written (x once, the output once); `of_copy` = gbps / copy gbps, target ≥ 0.85.
Times are per call from CUDA-graph replays (see common.time_graph).

    PYTHONPATH=. python benchmarks/bench_norm.py [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, time_graph, write_results  # noqa: E402

from turbovid.kernels.fused_norm import (norm_modulate, norm_modulate_quant, norm_modulate_quant_ref,  # noqa: E402
                                         norm_modulate_ref)
from turbovid.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_ref  # noqa: E402
from turbovid.models.dit import rope_angles  # noqa: E402

SHAPES = ((1, 32760, 1536), (1, 75600, 5120))
QK = {(1, 32760, 1536): (12, (21, 30, 52)), (1, 75600, 5120): (40, (21, 45, 80))}   # heads, token grid


def bench(quick: bool = False) -> list[dict]:
    rows = []
    iters = 10 if quick else 30
    for B, L, D in SHAPES:
        torch.manual_seed(0)
        x = (torch.randn(B, L, D, device="cuda") + 1).to(torch.bfloat16)
        shift, scale = torch.randn(B, D, device="cuda"), 0.5 * torch.randn(B, D, device="cuda")
        w, b = torch.randn(D, device="cuda"), torch.randn(D, device="cuda")
        n = B * L * D
        bf16_bytes, int8_bytes = 4 * n, 3 * n + 4 * B * L   # read 2 B; write 2 B, or 1 B + a scale per row
        # Copy bandwidth measured on the same byte count (a bf16 clone reads and writes 2 B each).
        copy_ms = time_graph(lambda: x.clone(), calls=10, replays=iters)
        copy_gbps = bf16_bytes / copy_ms / 1e6
        rows.append({"op": "norm", "shape": f"{B}x{L}x{D}", "provider": "copy", "ms": copy_ms, "gbps": copy_gbps})
        mod = dict(shift=shift, scale=scale)
        cases = {
            "ln_mod": (bf16_bytes, lambda: norm_modulate_ref(x, "layer", **mod), lambda: norm_modulate(x, "layer", **mod)),
            "ln_mod_int8": (int8_bytes, lambda: norm_modulate_quant_ref(x, "layer", **mod),
                            lambda: norm_modulate_quant(x, "layer", **mod)),
            "ln_affine": (bf16_bytes, lambda: norm_modulate_ref(x, "layer", weight=w, bias=b),
                          lambda: norm_modulate(x, "layer", weight=w, bias=b)),
        }
        heads, grid = QK[(B, L, D)]
        angles = rope_angles(D // heads, grid, "cuda")
        cos, sin = angles.cos(), angles.sin()
        qk = (qk_norm_rope_ref(x, w, cos, sin, heads, 1e-6), qk_norm_rope(x, w, cos, sin, heads, 1e-6))
        qk_err = float((qk[1].float() - qk[0].float()).abs().max())
        del qk
        cases["qk_norm_rope"] = (bf16_bytes, lambda: qk_norm_rope_ref(x, w, cos, sin, heads, 1e-6),
                                 lambda: qk_norm_rope(x, w, cos, sin, heads, 1e-6))
        for variant, (nbytes, ref_fn, ours_fn) in cases.items():
            for provider, fn in (("torch", ref_fn), ("ours", ours_fn)):
                ms = time_graph(fn, calls=10, replays=iters)
                gbps = nbytes / ms / 1e6
                rows.append({"op": "norm", "shape": f"{B}x{L}x{D}", "provider": f"{provider}:{variant}", "ms": ms,
                             "gbps": gbps, "of_copy": gbps / copy_gbps,
                             **({"max_abs_err": qk_err} if variant == "qk_norm_rope" and provider == "ours" else {})})
        del x
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    rows = bench(quick=args.quick)
    print_table(rows, ["shape", "provider", "ms", "gbps", "of_copy", "max_abs_err"])
    write_results("norm", {"rows": rows, "target_of_copy": 0.85}, args.out)


if __name__ == "__main__":
    main()
