"""SLA / SageSLA at Wan shapes: the official SLA Triton module (thu-ml/SLA) vs ours, forward and backward.

Providers, all on the same inputs (`outlier_qkv`, B = 1, head dim 128):
- official-sla-64x64 / -128x64: `sparse_linear_attention.SparseLinearAttention` from thu-ml/SLA (its default
  blocks; 128x64 is what TurboDiffusion runs for `--attention_type sla`), given contiguous [B, H, L, D].
- ours-sla-64x64 / -128x64: our module, bf16, fused inference path (block map, sparse kernel with the linear
  branch and proj_l in its epilogue) from the DiT's [B, L, H, D] layout.
- ours-sagesla: the whole SageSLA module, fused (kernels/sage_attention.py section 3: statistics pass + finalize,
  prep pass with quantization, pooling, linear branch and proj_l, pooled-score matmul + top-k, INT8/FP8 sparse
  kernel adding the linear branch in its epilogue), blocks 64x128 on sm90. `ours-sagesla-unfused`: the
  previous composition (Triton stats, block map, sage_attention with its own quantization, separate apply).
- parts of ours-sagesla, and fwd+bwd of the training path against the official module (1.3B shape).
Every output is compared (cosine) with our PyTorch bf16 reference of the same block sizes and top-k.
proj_l gets the same small random weights everywhere so the linear branch is exercised. Times: `ms` = eager
call (CUDA events, median), `ms_graph` = the same call replayed from a CUDA graph (no Python launch path).

The official sources are not vendored: fetch thu-ml/SLA's `sparse_linear_attention/*.py` into
`.ext/SLA/sparse_linear_attention/` (git-ignored).

    PYTHONPATH=. python benchmarks/bench_sla.py [--quick] [--sweep] [--out DIR]
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from common import print_table, time_cuda, time_graph, write_results

from turbovid.attention.sla import SparseLinearAttention
from turbovid.kernels import sage_attention as SA
from turbovid.kernels import sla as K
from turbovid.kernels.sage_attention import outlier_qkv, sage_attention

SHAPES = {"wan2.1-1.3b-480p": (12, 32760), "wan2.1-14b-720p": (40, 75600)}
TARGETS_MS = {"wan2.1-1.3b-480p": 1.5, "wan2.1-14b-720p": 20.0}  # SageSLA full module at top-k 0.1
EXT = Path(__file__).resolve().parents[1] / ".ext" / "SLA"
COLUMNS = ["op", "shape", "provider", "topk", "ms", "ms_graph", "cos", "note"]


def _official():
    if not (EXT / "sparse_linear_attention" / "core.py").exists():
        return None
    sys.path.insert(0, str(EXT))  # the official package, outside ours on purpose
    return importlib.import_module("sparse_linear_attention")


def _reference(q, k, v, topk, bq, bk, w, b):
    # Our PyTorch references (bf16, TurboDiffusion's precision): O [B, L, H, D].
    lut = K.sla_block_map_ref(q, k, topk, bq, bk)
    s, z = K.sla_linear_stats_ref(k, v)
    return K.sla_linear_apply_ref(q, K.sla_sparse_ref(q, k, v, lut, bq, bk), s, z, w, b)


def _graph_ms(fn, calls: int = 3) -> float | None:
    # GPU time without Python dispatch (common.time_graph), or None where a provider is not capturable.
    try:
        return time_graph(fn, calls=calls, replays=10)
    except Exception as e:  # report and go on
        print(f"graph capture failed: {e!r}")
        return None


def _cos(a, b) -> float:
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def _unfused_sagesla(q, k, v, topk, bq, bk, w, b):
    # The pre-fusion composition: Triton stats + block map, sage_attention (own stats and quantization passes),
    # separate linear-branch apply pass.
    def sparse(q_, k_, v_, lut):
        return sage_attention(q_, k_, v_, lut=lut, block_q=bq, block_k=bk)
    return K.sla_forward(q, k, v, topk, bq, bk, w, b, sparse)


def _fused_parts(q, k, v, topk, bq, bk, w, b):
    # The launches of the fused SageSLA, as separately timeable closures (same buffers each call).
    stats = SA.sagesla_stats(k, v)
    quantized, qp, kp, out = SA.sagesla_prep(q, k, v, stats, w, b, bq, bk)
    ksel = K.sla_topk_count(topk, kp.shape[2])
    lut = K.topk_lut(torch.matmul(qp, kp.transpose(-1, -2)), ksel)
    o = out.transpose(1, 2)
    return {
        "part: A+F stats (k/v sums, V range, phi(k)^T v)": lambda: SA.sagesla_stats(k, v),
        "part: B prep (quant, pooling, linear branch)": lambda: SA.sagesla_prep(q, k, v, stats, w, b, bq, bk),
        "part: C block map (scores matmul + top-k)": lambda: K.topk_lut(torch.matmul(qp, kp.transpose(-1, -2)), ksel),
        "part: D sparse kernel + epilogue add": lambda: SA.sage_attention_quantized(*quantized, o, lut, bq, bk, "fp8",
                                                                                  add_out=True),
    }, (quantized, lut, o)


# Launch settings the benchmark tries on the GPU at hand before timing (CUDA-graph times; the winner is applied
# to the module and reported; set the defaults in the kernel files to what wins on the target GPU).
# pass A: (block, warps, stages, tokens); top-k: (scores per program, warps)
STATS_CANDIDATES = ((32, 8, 3, 1024), (32, 8, 3, 512), (64, 8, 3, 1024), (32, 8, 4, 1024))
TOPK_CANDIDATES = ((4096, 4), (2048, 4), (8192, 8))


def _pick_configs(q, k, v, bq, bk, w, b, shape) -> list[dict]:
    rows = []
    timings = {}
    for block, warps, stages, tokens in STATS_CANDIDATES:
        SA.SAGESLA_STATS.update(block=block, num_warps=warps, num_stages=stages, tokens=tokens)
        timings[(block, warps, stages, tokens)] = _graph_ms(lambda: SA.sagesla_stats(k, v)) or float("inf")
    best = min(timings, key=timings.get)
    SA.SAGESLA_STATS.update(zip(("block", "num_warps", "num_stages", "tokens"), best))
    rows.append({"op": "pick", "shape": shape, "provider": f"A+F stats (block, warps, stages, tokens) = {best}",
                 "ms_graph": timings[best], "note": "; ".join(f"{c}: {t:.4f}" for c, t in timings.items())})
    parts, _ = _fused_parts(q, k, v, 0.1, bq, bk, w, b)
    timings = {}
    for elements, warps in TOPK_CANDIDATES:
        K.TOPK_CONFIG.update(elements=elements, num_warps=warps)
        timings[(elements, warps)] = _graph_ms(parts["part: C block map (scores matmul + top-k)"]) or float("inf")
    best = min(timings, key=timings.get)
    K.TOPK_CONFIG.update(zip(("elements", "num_warps"), best))
    rows.append({"op": "pick", "shape": shape, "provider": f"C block map (top-k scores/program, warps) = {best}",
                 "ms_graph": timings[best], "note": "; ".join(f"{c}: {t:.4f}" for c, t in timings.items())})
    for r in rows:
        print(r, flush=True)
    return rows


def bench(quick: bool = False, save=None) -> list[dict]:
    """`save(rows)` is called after each shape, so a run cut short still leaves its results."""
    torch.manual_seed(0)
    official = _official()
    rows = []
    shapes = list(SHAPES)[:1] if quick else list(SHAPES)
    sage_blocks = SparseLinearAttention(128, quantized=True).block_sizes(torch.device("cuda"))
    for shape in shapes:
        h, length = SHAPES[shape]
        q, k, v = outlier_qkv(1, h, length, 128, device="cuda", dit_layout=True)  # [B, H, L, D] views
        q_bl, k_bl, v_bl = (x.transpose(1, 2) for x in (q, k, v))  # [B, L, H, D], the DiT's layout
        q_c, k_c, v_c = (x.contiguous() for x in (q, k, v))  # what the official module wants
        w, b = 0.05 * torch.randn(128, 128, device="cuda"), 0.05 * torch.randn(128, device="cuda")
        wb, bb = w.bfloat16(), b.bfloat16()

        def row(provider, topk, fn, ref, note="", op="forward", graph=True):
            ms = time_cuda(fn)
            with torch.no_grad():
                c = _cos(fn(), ref) if ref is not None else None
            rows.append({"op": op, "shape": shape, "provider": provider, "topk": topk, "ms": ms,
                         "ms_graph": _graph_ms(fn) if graph else None, "cos": c, "note": note})
            print(rows[-1], flush=True)
            return rows[-1]

        if shape == "wan2.1-1.3b-480p":  # picked once, kept for the 14B shape
            rows += _pick_configs(q, k, v, *sage_blocks, wb, bb, shape)
            row("sdpa-cudnn-dense", 1.0, lambda: F.scaled_dot_product_attention(q, k, v), None, "context: dense bf16",
                graph=False)
        for topk in (0.1,) if quick else (0.1, 0.05):
            with torch.no_grad():
                blocks = {sage_blocks} if topk != 0.1 else {(64, 64), (128, 64), sage_blocks}
                refs = {(bq, bk): _reference(q, k, v, topk, bq, bk, w, b) for bq, bk in blocks}
                for bq, bk in ((64, 64), (128, 64)) if topk == 0.1 else ():
                    if official is not None:
                        m = official.SparseLinearAttention(128, topk, BLKQ=bq, BLKK=bk).cuda()
                        m.proj_l.weight.data.copy_(w)
                        m.proj_l.bias.data.copy_(b)
                        row(f"official-sla-{bq}x{bk}", topk, lambda: m(q_c, k_c, v_c).transpose(1, 2),
                            refs[(bq, bk)], "thu-ml/SLA Triton module, bf16")
                    ours = SparseLinearAttention(128, topk, block_q=bq, block_k=bk).cuda()
                    ours.proj_l.weight.data.copy_(w)
                    ours.proj_l.bias.data.copy_(b)
                    row(f"ours-sla-{bq}x{bk}", topk, lambda: ours(q_bl, k_bl, v_bl), refs[(bq, bk)],
                        "bf16, fused linear epilogue")
                sage = SparseLinearAttention(128, topk, quantized=True).cuda()
                sage.proj_l.weight.data.copy_(w)
                sage.proj_l.bias.data.copy_(b)
                bq, bk = sage_blocks
                r = row("ours-sagesla", topk, lambda: sage(q_bl, k_bl, v_bl), refs[sage_blocks],
                        f"whole module, fused, blocks {bq}x{bk}")
                if topk == 0.1:
                    for key in ("ms", "ms_graph"):
                        if r[key] is not None:
                            ratio = r[key] / TARGETS_MS[shape]
                            r["note"] += (f"; {key} vs target {TARGETS_MS[shape]} ms: "
                                          f"{'met' if ratio <= 1 else 'missed'} ({ratio:.2f}x)")
                    row("ours-sagesla-unfused", topk, lambda: _unfused_sagesla(q, k, v, topk, bq, bk, wb, bb),
                        refs[sage_blocks], "previous composition: 4 passes + sage_attention's own quantization")
                    # Where the fused module's time goes.
                    parts, _ = _fused_parts(q, k, v, topk, bq, bk, wb, bb)
                    for name, fn in parts.items():
                        row(name, topk, fn, None, op="component")
                del refs
        # Training: forward + backward at TurboDiffusion's training blocks (64x64), top-k 0.1 (1.3B shape only).
        if shape == "wan2.1-1.3b-480p":
            do = torch.randn_like(q_bl)
            xs = [x.detach().clone().requires_grad_() for x in (q_bl, k_bl, v_bl)]
            xs_c = [x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q_bl, k_bl, v_bl)]
            ours = SparseLinearAttention(128, 0.1, block_q=64, block_k=64).cuda()
            row("ours-sla-64x64", 0.1, lambda: ours(*xs).backward(do), None, "module fwd+bwd", op="fwd+bwd",
                graph=False)
            if official is not None:
                m = official.SparseLinearAttention(128, 0.1).cuda()
                do_c = do.transpose(1, 2).contiguous()
                row("official-sla-64x64", 0.1, lambda: m(*xs_c).backward(do_c), None, "module fwd+bwd",
                    op="fwd+bwd", graph=False)
            lut = K.sla_block_map_triton(q, k, None, 0.1, 64, 64)
            o, lse = K.sla_sparse_fwd(q, k, v, lut, 64, 64)
            do_h = do.transpose(1, 2)
            row("ours-sparse-bwd-64x64", 0.1, lambda: K.sla_sparse_bwd(q, k, v, o, lse, do_h, lut, 64, 64), None,
                "dQ + dK/dV kernels + transposed LUT", op="backward", graph=False)
            del xs, xs_c, do
        del q, k, v, q_c, k_c, v_c, q_bl, k_bl, v_bl
        torch.cuda.empty_cache()
        if save is not None:
            save(rows)
    return rows


def _compiled(kernel) -> list[str]:
    # Register/spill counts of every compiled variant of a Triton kernel (Triton 3.x JIT caches).
    out = []
    for cache in getattr(kernel, "device_caches", {}).values():
        for ck in cache[0].values():
            out.append(f"{kernel.fn.__name__ if hasattr(kernel, 'fn') else ''} regs={getattr(ck, 'n_regs', '?')} "
                       f"spills={getattr(ck, 'n_spills', '?')} warps={ck.metadata.num_warps} "
                       f"stages={ck.metadata.num_stages} smem={ck.metadata.shared}")
    return out


def sweep() -> list[dict]:
    """Launch settings of the fused SageSLA launches (CUDA-graph times), the k-sum-only pass as the memory
    floor of pass A, and the whole module (graph and eager) with the settings that won."""
    rows = []
    bq, bk = SparseLinearAttention(128, quantized=True).block_sizes(torch.device("cuda"))
    stats_default, prep_default = dict(SA.SAGESLA_STATS), dict(SA.SAGESLA_PREP)
    for shape, (h, length) in SHAPES.items():
        q, k, v = outlier_qkv(1, h, length, 128, device="cuda", dit_layout=True)
        q_bl, k_bl, v_bl = (x.transpose(1, 2) for x in (q, k, v))
        w = (0.05 * torch.randn(128, 128, device="cuda")).bfloat16()
        b = (0.05 * torch.randn(128, device="cuda")).bfloat16()

        def row(provider, fn, note=""):
            rows.append({"op": "sweep", "shape": shape, "provider": provider, "topk": 0.1, "ms": None,
                         "ms_graph": _graph_ms(fn), "note": note})
            print(rows[-1], flush=True)
            return rows[-1]["ms_graph"] or float("inf")

        row("k sums only (memory floor of one pass over k)", lambda: K.sla_linear_stats(k, v, False))
        best = (float("inf"), None)
        # 8 warps: the [D, D] fp32 accumulator alone is 64 registers per thread.
        for block, warps, stages, tokens in ((64, 8, 3, 512), (64, 8, 3, 1024), (64, 8, 2, 2048), (32, 8, 3, 256),
                                             (64, 8, 4, 512)):
            SA.SAGESLA_STATS.update(block=block, num_warps=warps, num_stages=stages, tokens=tokens)
            ms = row(f"A+F stats b{block} w{warps} s{stages} tokens{tokens}", lambda: SA.sagesla_stats(k, v))
            best = min(best, (ms, (block, warps, stages, tokens)))
        SA.SAGESLA_STATS.update(zip(("block", "num_warps", "num_stages", "tokens"), best[1]))
        stats = SA.sagesla_stats(k, v)
        for warps in (4, 8):
            SA.SAGESLA_PREP.update(num_warps=warps)
            row(f"B prep w{warps}", lambda: SA.sagesla_prep(q, k, v, stats, w, b, bq, bk))
        SA.SAGESLA_PREP.update(prep_default)
        parts, (quantized, lut, o) = _fused_parts(q, k, v, 0.1, bq, bk, w, b)
        topk_default, best_topk = dict(K.TOPK_CONFIG), (float("inf"), None)
        for elements, warps in ((4096, 4), (8192, 4), (16384, 8), (32768, 8)):
            K.TOPK_CONFIG.update(elements=elements, num_warps=warps)
            ms = row(f"C block map, top-k {elements} scores/program w{warps}",
                     parts["part: C block map (scores matmul + top-k)"])
            best_topk = min(best_topk, (ms, (elements, warps)))
        K.TOPK_CONFIG.update(zip(("elements", "num_warps"), best_topk[1]))
        for warps, stages, magic in ((4, 3, True), (4, 3, False), (4, 4, True), (4, 2, True), (8, 3, False)):
            row(f"D sparse kernel {bq}x{bk} w{warps} s{stages} magic={magic}",
                lambda: SA.sage_attention_quantized(*quantized, o, lut, bq, bk, "fp8", num_warps=warps,
                                                    num_stages=stages, magic=magic))
        m = SparseLinearAttention(128, 0.1, quantized=True).cuda()
        with torch.no_grad():
            row(f"ours-sagesla module, stats {best[1]}, top-k {best_topk[1]}", lambda: m(q_bl, k_bl, v_bl))
            rows[-1]["ms"] = time_cuda(lambda: m(q_bl, k_bl, v_bl))
        SA.SAGESLA_STATS.update(stats_default)
        K.TOPK_CONFIG.update(topk_default)
        del q, k, v, q_bl, k_bl, v_bl
        torch.cuda.empty_cache()
    for kern in (SA._sagesla_stats_kernel, SA._sagesla_finalize_kernel, SA._sagesla_prep_kernel, SA._sage_attn_kernel,
                 K._sla_topk_kernel):
        for line in _compiled(kern):
            print(line)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="launch-setting sweep of the fused SageSLA (CUDA graphs)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    commit = (EXT / "COMMIT").read_text().strip() if (EXT / "COMMIT").exists() else None

    def save(rows):
        write_results("sla_sweep" if args.sweep else "sla",
                      {"rows": rows, "official_sla_commit": commit, "sagesla_stats": SA.SAGESLA_STATS,
                       "topk": K.TOPK_CONFIG}, out_dir=args.out)
    results = sweep() if args.sweep else bench(quick=args.quick, save=save)
    print()
    print_table(results, COLUMNS)
    save(results)
