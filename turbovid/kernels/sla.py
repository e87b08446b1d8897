"""Sparse-Linear Attention (SLA, TurboDiffusion's variant): block map, sparse branch, linear branch.

Algorithm (SPEC §6), for q, k, v of shape [B, H, L, D] and block sizes (b_q, b_k):

1. Block map. Smooth K by subtracting its per-(b, h) token mean (bf16), mean-pool q over groups of
   b_q tokens and smoothed k over groups of b_k tokens (fp32 sums divided by the true count, so the
   last partial block is a true mean; stored in the input dtype), score every (query block, key
   block) pair by the dot product of the pooled vectors (no scale, no softmax) and keep the
   K_sel = min(N, int(topk * N)) best key blocks per query block. The result is a LUT
   [B, H, M, K_sel] int32 of key-block indices sorted ascending (M = ceil(L/b_q), N = ceil(L/b_k)).
   Kernels: one launch pools q and smoothed k (the k mean comes from the statistics pass of 3.); the
   tiny [M, D] x [D, N] score matmul stays a torch call (the very call the reference makes, so both
   rank identical numbers); a radix-select kernel picks and compacts the top K_sel per row.
2. Sparse branch. Exact softmax attention of every query row over the keys of its selected blocks
   only (scale 1/sqrt(D); keys past L masked). The kernel is FlashAttention-2 over the LUT: one
   program per (query block, b*h), online softmax in base 2, fp32 accumulation; it also stores the
   per-row log-sum-exp (base 2) for the backward. Backward: delta = rowsum(O * dO); dQ per query
   block over its LUT (against k - mean(k): rows of dS sum to zero, and this keeps the bf16 error of
   delta from being multiplied by the keys' channel bias); dK/dV per key block over the query blocks
   that selected it (a transposed LUT built once per call).
3. Linear branch over ALL tokens: phi = softmax over the head dim, O_l = phi(q) (phi(k)^T v) /
   (1e-5 + phi(q) . sum_tokens phi(k)). The kernels split it into a statistics pass over k and v
   (S = phi(k)^T v [D, D], z = sum phi(k) [D]) and an apply step that also runs proj_l and adds the
   sparse output, O = O_s + proj_l(O_l), written straight into [B, L, H, D]: in the epilogue of the
   bf16 sparse kernel, or as its own pass after a sparse branch computed elsewhere (`sla_forward`'s
   sparse_fn). SageSLA has its own fused path (kernels/sage_attention.py section 3), which reuses the
   top-k kernel (`topk_lut`) and the linear-branch helpers below.

Error budget: bf16 kernels vs an fp32/fp64 reference are at most 2x as wrong as the same computation
in plain bf16 PyTorch (tests/test_sla.py, on DiT-like outlier inputs at the Wan2.1-1.3B shape on GPU).
Speed: benchmarks/bench_sla.py (H100 results in benchmarks/results/sla_h100_*.json).

Every op has a plain-PyTorch `<op>_ref`; `use_triton(x)` picks kernel or reference. Tie behaviour:
the Triton top-k keeps, among key blocks whose pooled score equals the K_sel-th largest exactly, the
lowest indices; torch.topk's choice among exact ties is unspecified, so LUTs agree only up to ties.
K_sel is clamped to >= 1 (TurboDiffusion would divide by zero and return NaN for tiny L).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from turbovid.kernels import interpreting, use_triton

# Reference chunking: how many score elements the sparse reference materialises at once.
_REF_CHUNK_ELEMENTS = 1 << 27


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def sla_topk_count(topk: float, n_kblocks: int) -> int:
    """K_sel: TurboDiffusion's min(N, int(topk * N)) (a Python int of a float product), at least 1."""
    return max(1, min(n_kblocks, int(topk * n_kblocks)))


# ---------------------------------------------------------------------------------------------
# References (plain PyTorch; differentiable where it matters)
# ---------------------------------------------------------------------------------------------


def _mean_pool_ref(x: torch.Tensor, block: int) -> torch.Tensor:
    # [B, H, L, D] -> [B, H, ceil(L/block), D]: fp32 sums over the zero-padded blocks divided by
    # the true token count of each block, rounded to the input dtype.
    B, H, L, D = x.shape
    nb = cdiv(L, block)
    xp = F.pad(x.float(), (0, 0, 0, nb * block - L)).view(B, H, nb, block, D)
    counts = (L - torch.arange(nb, device=x.device) * block).clamp(max=block).float()
    return (xp.sum(3) / counts[:, None]).to(x.dtype)


def sla_block_scores_ref(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """Pooled block scores [B, H, M, N] in the input dtype (SPEC §6.2 steps 1-3)."""
    k_smooth = k - k.mean(dim=-2, keepdim=True)
    return _mean_pool_ref(q, block_q) @ _mean_pool_ref(k_smooth, block_k).transpose(-1, -2)


def sla_block_map_ref(q: torch.Tensor, k: torch.Tensor, topk: float, block_q: int, block_k: int) -> torch.Tensor:
    """LUT [B, H, M, K_sel] int32 of the best key blocks per query block, sorted ascending."""
    scores = sla_block_scores_ref(q, k, block_q, block_k)
    ksel = sla_topk_count(topk, scores.shape[-1])
    idx = torch.topk(scores, ksel, dim=-1, sorted=False).indices
    return idx.sort(dim=-1).values.to(torch.int32)


def sla_sparse_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lut: torch.Tensor,
                   block_q: int, block_k: int) -> torch.Tensor:
    """Block-sparse softmax attention [B, H, L, D] in q's dtype; matmuls in the input dtype, softmax fp32.

    Gathers the selected key blocks per query block, so memory is bounded by chunking over query
    blocks (not by an L x L mask). Differentiable in q, k, v.
    """
    B, H, L, D = q.shape
    M, N, ksel = cdiv(L, block_q), cdiv(L, block_k), lut.shape[-1]
    scale = 1.0 / math.sqrt(D)
    qp = F.pad(q, (0, 0, 0, M * block_q - L)).view(B, H, M, block_q, D)
    kp = F.pad(k, (0, 0, 0, N * block_k - L)).view(B, H, N, block_k, D)
    vp = F.pad(v, (0, 0, 0, N * block_k - L)).view(B, H, N, block_k, D)
    key_valid = (torch.arange(N * block_k, device=q.device) < L).view(N, block_k)
    bi = torch.arange(B, device=q.device)[:, None, None, None]
    hi = torch.arange(H, device=q.device)[None, :, None, None]
    chunk = max(1, _REF_CHUNK_ELEMENTS // (B * H * block_q * ksel * block_k))
    outs = []
    for m0 in range(0, M, chunk):
        idx = lut[:, :, m0:m0 + chunk].long()  # [B, H, c, K_sel]
        c = idx.shape[2]
        kg = kp[bi, hi, idx].reshape(B, H, c, ksel * block_k, D)
        vg = vp[bi, hi, idx].reshape(B, H, c, ksel * block_k, D)
        s = (qp[:, :, m0:m0 + c] @ kg.transpose(-1, -2)).float() * scale  # [B, H, c, b_q, K_sel*b_k]
        s = s.masked_fill(~key_valid[idx].reshape(B, H, c, 1, ksel * block_k), float("-inf"))
        outs.append(torch.softmax(s, dim=-1).to(v.dtype) @ vg)
    return torch.cat(outs, dim=2).reshape(B, H, M * block_q, D)[:, :, :L]


def sla_linear_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Linear branch [B, H, L, D] with TurboDiffusion's precision: every op in the input dtype."""
    phi_q, phi_k = torch.softmax(q, dim=-1), torch.softmax(k, dim=-1)
    kv = phi_k.transpose(-1, -2) @ v  # [B, H, D, D]
    ksum = phi_k.sum(dim=-2, keepdim=True)  # [B, H, 1, D]
    return (phi_q @ kv) / (1e-5 + (phi_q * ksum).sum(dim=-1, keepdim=True))



def sla_linear_stats_ref(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """S = phi(k)^T v [B, H, D, D] and z = sum_tokens phi(k) [B, H, D], in the input dtype."""
    phi_k = torch.softmax(k, dim=-1)
    return phi_k.transpose(-1, -2) @ v, phi_k.sum(dim=-2)


def sla_linear_apply_ref(q: torch.Tensor, o_s: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
                         weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """O = O_s + proj_l(phi(q) S / (1e-5 + phi(q) . z)) as [B, L, H, D]; inputs [B, H, L, D]."""
    phi_q = torch.softmax(q, dim=-1)
    o_l = (phi_q @ s) / (1e-5 + (phi_q * z[:, :, None, :]).sum(dim=-1, keepdim=True))
    return (o_s + F.linear(o_l, weight.to(q.dtype), bias.to(q.dtype))).transpose(1, 2).contiguous()


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton run the references (use_triton says so)
    triton = None

if triton is not None:

    # PREC: "ieee" (fp32 inputs), "tf32" (16-bit inputs on a GPU; ignored by 16-bit dots) or "interp"
    # (16-bit inputs under TRITON_INTERPRET=1). Triton 3.9's interpreter multiplies bf16 tiles as their raw
    # uint16 bits and truncates fp32 -> bf16 casts; with "interp" the two helpers below upcast dot operands
    # (exact) and round to nearest even by hand, so CPU tests see the numerics of the GPU.

    @triton.jit
    def _dot(a, b, acc, PREC: tl.constexpr):
        if PREC == "interp":
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc, input_precision=PREC)

    @triton.jit
    def _rnd(x, dt: tl.constexpr, PREC: tl.constexpr):
        if PREC == "interp":
            if dt == tl.bfloat16:
                bits = x.to(tl.float32).to(tl.int32, bitcast=True)
                # Round to nearest even, clear the low bits (the interpreter's cast of what is left must be exact:
                # it mishandles fp32 subnormals such as the 0x7FFF that 0.0 would otherwise become).
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
                return bits.to(tl.float32, bitcast=True).to(dt)
            else:
                return x.to(dt)
        else:
            return x.to(dt)

    @triton.jit
    def _sla_stats_kernel(K, V, KSUM, S, Z, skb, skh, skl, svb, svh, svl, H, L, TOKENS_PER_SPLIT, SPLIT,
                          D: tl.constexpr, BLOCK: tl.constexpr, LINEAR: tl.constexpr,
                          PREC: tl.constexpr):
        # One program per (b*h, split of the tokens): fp32 partial sums of k (for the smooth-K mean)
        # and, with LINEAR, of phi(k)^T v and phi(k); the launcher adds the SPLIT partials.
        bh, split = tl.program_id(0), tl.program_id(1)
        b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)  # int64: offsets of big tensors
        offs_d, offs_t = tl.arange(0, D), tl.arange(0, BLOCK)
        k_base, v_base = K + b * skb + h * skh, V + b * svb + h * svh
        ksum = tl.zeros([D], tl.float32)
        zsum = tl.zeros([D], tl.float32)
        acc = tl.zeros([D, D], tl.float32)
        start = split * TOKENS_PER_SPLIT
        end = tl.minimum(start + TOKENS_PER_SPLIT, L)
        # Software prefetch: the next tile's loads are issued before this tile's math, so a memory-bound
        # pass with one program per SM (the [D, D] accumulator fills the registers) keeps loads in flight.
        rows = start + offs_t
        valid = rows < end
        k = tl.load(k_base + rows[:, None] * skl + offs_d[None, :], mask=valid[:, None], other=0.0)
        if LINEAR:
            v = tl.load(v_base + rows[:, None] * svl + offs_d[None, :], mask=valid[:, None], other=0.0)
        for t0 in range(start, end, BLOCK):
            rows_n = t0 + BLOCK + offs_t
            valid_n = rows_n < end
            k_n = tl.load(k_base + rows_n[:, None] * skl + offs_d[None, :], mask=valid_n[:, None], other=0.0)
            ksum += tl.sum(k.to(tl.float32), 0)
            if LINEAR:
                v_n = tl.load(v_base + rows_n[:, None] * svl + offs_d[None, :], mask=valid_n[:, None], other=0.0)
                # phi(k) = softmax over the head dim in fp32, rounded to the input dtype (as torch does).
                x = k.to(tl.float32)
                e = tl.exp(x - tl.max(x, 1)[:, None])
                phi = _rnd(tl.where(valid[:, None], e / tl.sum(e, 1)[:, None], 0.0), k.dtype, PREC)
                acc = _dot(tl.trans(phi), v, acc, PREC)
                zsum += tl.sum(phi.to(tl.float32), 0)
                v = v_n
            k, valid = k_n, valid_n
        part = bh * SPLIT + split
        tl.store(KSUM + part * D + offs_d, ksum)
        if LINEAR:
            tl.store(S + part * D * D + offs_d[:, None] * D + offs_d[None, :], acc)
            tl.store(Z + part * D + offs_d, zsum)

    @triton.jit
    def _sla_phi_kernel(K, PHI, KSUM, Z, skb, skh, skl, H, L, NT, D: tl.constexpr, BLOCK: tl.constexpr,
                        PREC: tl.constexpr):
        # Program (b*h, tile of BLOCK tokens): phi(k) = softmax over D into PHI [B*H, L, D] (for a
        # cuBLAS phi(k)^T v) and the tile's column sums of k and phi(k) (partials [B*H, NT, D]).
        bh, t = tl.program_id(0), tl.program_id(1)
        b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
        offs_d = tl.arange(0, D)
        rows = t * BLOCK + tl.arange(0, BLOCK)
        valid = rows < L
        k = tl.load(K + b * skb + h * skh + rows[:, None] * skl + offs_d[None, :], mask=valid[:, None], other=0.0)
        x = k.to(tl.float32)
        e = tl.exp(x - tl.max(x, 1)[:, None])
        phi = _rnd(tl.where(valid[:, None], e / tl.sum(e, 1)[:, None], 0.0), k.dtype, PREC)
        tl.store(PHI + (bh.to(tl.int64) * L + rows[:, None]) * D + offs_d[None, :], phi, mask=valid[:, None])
        part = (bh.to(tl.int64) * NT + t) * D + offs_d
        tl.store(KSUM + part, tl.sum(x, 0))
        tl.store(Z + part, tl.sum(phi.to(tl.float32), 0))

    @triton.jit
    def _sla_pool_kernel(Q, K, KMEAN, QP, KP, sqb, sqh, sql, skb, skh, skl, H, L, M, N,
                         D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, SUB: tl.constexpr, PREC: tl.constexpr):
        # One launch pools both tensors: program (b*h, j) with j < M averages query block j, otherwise
        # smoothed key block j - M, SUB rows at a time (small tiles keep several programs per SM, which
        # a memory-bound pass needs).
        bh, j = tl.program_id(0), tl.program_id(1)
        b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
        offs_d, offs_s = tl.arange(0, D), tl.arange(0, SUB)
        acc = tl.zeros([D], tl.float32)
        if j < M:
            for r0 in range(0, BQ, SUB):
                rows = j * BQ + r0 + offs_s
                x = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sql + offs_d[None, :], mask=(rows < L)[:, None],
                            other=0.0)
                acc += tl.sum(x.to(tl.float32), 0)
            count = tl.minimum(L - j * BQ, BQ).to(tl.float32)  # true token count of the (last) block
            tl.store(QP + (bh.to(tl.int64) * M + j) * D + offs_d, _rnd(acc / count, QP.dtype.element_ty, PREC))
        else:
            jk = j - M
            mean = tl.load(KMEAN + bh * D + offs_d).to(tl.float32)
            for r0 in range(0, BK, SUB):
                rows = jk * BK + r0 + offs_s
                valid = (rows < L)[:, None]
                x = tl.load(K + b * skb + h * skh + rows[:, None] * skl + offs_d[None, :], mask=valid, other=0.0)
                # Smooth K in the input dtype (k - mean rounded), then drop the padding rows.
                ks = _rnd(x.to(tl.float32) - mean[None, :], x.dtype, PREC).to(tl.float32)
                acc += tl.sum(tl.where(valid, ks, 0.0), 0)
            count = tl.minimum(L - jk * BK, BK).to(tl.float32)
            tl.store(KP + (bh.to(tl.int64) * N + jk) * D + offs_d, _rnd(acc / count, KP.dtype.element_ty, PREC))

    @triton.jit
    def _sla_topk_kernel(SCORES, LUT, ROWS, N, KSEL, N_PAD: tl.constexpr, R: tl.constexpr, SHIFT: tl.constexpr):
        # R rows (b, h, query block) per program: radix-select the KSEL-th largest score of each row by
        # bisection on order-preserving integer keys ("how many keys are >= mid?"; 32 - SHIFT rounds,
        # SHIFT = 16 for bf16 scores whose low 16 bits are zero), then compact the winners in index
        # order, which leaves every LUT row sorted ascending. Exact ties at the threshold keep the
        # lowest block indices.
        rows = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
        offs = tl.arange(0, N_PAD)
        valid = (rows < ROWS)[:, None] & (offs < N)[None, :]
        x = tl.load(SCORES + rows[:, None] * N + offs[None, :], mask=valid, other=0.0).to(tl.float32)
        bits = x.to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF) >> SHIFT  # signed-int order == float order
        key = tl.where(valid, key, -(1 << (31 - SHIFT)))  # padding below every real key
        if SHIFT > 0:  # 16-bit scores: keys, bounds and midpoints fit in int32 (half the work of int64)
            lo = tl.full([R], -(1 << (31 - SHIFT)), tl.int32)  # invariant: count(key >= lo) >= KSEL
            hi = tl.full([R], (1 << (31 - SHIFT)) - 1, tl.int32)
        else:  # fp32 scores: lo + hi + 1 would overflow int32
            key = key.to(tl.int64)
            lo = tl.full([R], -(1 << (31 - SHIFT)), tl.int64)
            hi = tl.full([R], (1 << (31 - SHIFT)) - 1, tl.int64)
        for _ in tl.static_range(32 - SHIFT):
            mid = (lo + hi + 1) >> 1
            ok = tl.sum((key >= mid[:, None]).to(tl.int32), 1) >= KSEL
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        gt = key > lo[:, None]
        eq = key == lo[:, None]
        need = KSEL - tl.sum(gt.to(tl.int32), 1)
        sel = gt | (eq & (tl.cumsum(eq.to(tl.int32), 1) <= need[:, None]))
        pos = tl.cumsum(sel.to(tl.int32), 1) - 1
        tl.store(LUT + rows[:, None] * KSEL + pos, (offs[None, :] + 0 * pos).to(tl.int32),
                 mask=sel & (rows < ROWS)[:, None])

    @triton.jit
    def _linear_branch(q, S_ptr, Z_ptr, W_ptr, B_ptr, D: tl.constexpr, PREC: tl.constexpr, DC: tl.constexpr = 32):
        # proj_l(phi(q) S / (1e-5 + phi(q) . z)) for a [rows, D] tile of q, rounding where torch's bf16
        # ops round (softmax output, matmul output, product, row sum, +eps, quotient, linear output).
        # The two D x D products go DC output columns of S (= DC input columns of proj_l) at a time, so
        # S and W arrive in small slices instead of two [D, D] register tiles.
        dt = q.dtype
        offs_d, offs_c = tl.arange(0, D), tl.arange(0, DC)
        x = q.to(tl.float32)
        e = tl.exp(x - tl.max(x, 1)[:, None])
        phi = _rnd(e / tl.sum(e, 1)[:, None], dt, PREC)
        z = tl.load(Z_ptr + offs_d).to(tl.float32)
        den = _rnd(tl.sum(_rnd(phi.to(tl.float32) * z[None, :], dt, PREC).to(tl.float32), 1), dt, PREC)
        den = _rnd(den.to(tl.float32) + 1e-5, dt, PREC).to(tl.float32)
        out = tl.zeros_like(x)
        for c in range(0, D, DC):
            s_c = tl.load(S_ptr + offs_d[:, None] * D + c + offs_c[None, :])  # S[:, c:c+DC]
            o_l = _rnd(_rnd(_dot(phi, s_c, None, PREC), dt, PREC).to(tl.float32) / den[:, None], dt, PREC)
            w_c = tl.load(W_ptr + offs_d[:, None] * D + c + offs_c[None, :])  # W[:, c:c+DC], W is [out, in]
            out = _dot(o_l, tl.trans(w_c), out, PREC)
        bias = tl.load(B_ptr + offs_d).to(tl.float32)
        return _rnd(out + bias[None, :], dt, PREC)

    @triton.jit
    def _sla_fwd_kernel(Q, K, V, LUT, O, LSE, S, Z, W, Bias,
                        sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
                        H, L, M, KSEL, qk_scale,
                        D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, LINEAR: tl.constexpr,
                        PREC: tl.constexpr):
        # FlashAttention-2 over the LUT: program (query block, b*h); base-2 online softmax with
        # qk_scale = log2(e)/sqrt(D); fp32 accumulators; stores O (+ proj_l(O_l) with LINEAR) and
        # the base-2 LSE of every row for the backward.
        m_blk, bh = tl.program_id(0), tl.program_id(1)
        b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
        offs_d, offs_n = tl.arange(0, D), tl.arange(0, BK)
        rows = m_blk * BQ + tl.arange(0, BQ)
        rmask = rows < L
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sql + offs_d[None, :], mask=rmask[:, None], other=0.0)
        k_base, v_base = K + b * skb + h * skh, V + b * svb + h * svh
        m_i = tl.full([BQ], float("-inf"), tl.float32)
        l_i = tl.zeros([BQ], tl.float32)
        acc = tl.zeros([BQ, D], tl.float32)
        lut = LUT + (bh.to(tl.int64) * M + m_blk) * KSEL
        for j in range(KSEL):
            cols = tl.load(lut + j) * BK + offs_n
            cmask = cols < L
            k = tl.load(k_base + cols[:, None] * skl + offs_d[None, :], mask=cmask[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * svl + offs_d[None, :], mask=cmask[:, None], other=0.0)
            s = _dot(q, tl.trans(k), None, PREC) * qk_scale
            s = tl.where(cmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = _dot(_rnd(p, v.dtype, PREC), v, acc * alpha[:, None], PREC)
            m_i = m_new
        tl.store(LSE + bh.to(tl.int64) * L + rows, m_i + tl.math.log2(l_i), mask=rmask)
        o = _rnd(acc / l_i[:, None], q.dtype, PREC)
        if LINEAR:
            o_l = _linear_branch(q, S + bh * D * D, Z + bh * D, W, Bias, D, PREC)
            o = _rnd(o.to(tl.float32) + o_l.to(tl.float32), q.dtype, PREC)
        tl.store(O + b * sob + h * soh + rows[:, None] * sol + offs_d[None, :], o, mask=rmask[:, None])

    @triton.jit
    def _sla_linear_apply_kernel(Q, OS, S, Z, W, Bias, O, sqb, sqh, sql, ssb, ssh, ssl, sob, soh, sol, H, L,
                                 D: tl.constexpr, BQ: tl.constexpr, PREC: tl.constexpr):
        # O = O_s + proj_l(O_l) for a sparse output computed elsewhere (SageSLA).
        m_blk, bh = tl.program_id(0), tl.program_id(1)
        b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
        offs_d = tl.arange(0, D)
        rows = m_blk * BQ + tl.arange(0, BQ)
        rmask = rows[:, None] < L
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sql + offs_d[None, :], mask=rmask, other=0.0)
        o_s = tl.load(OS + b * ssb + h * ssh + rows[:, None] * ssl + offs_d[None, :], mask=rmask, other=0.0)
        o_l = _linear_branch(q, S + bh * D * D, Z + bh * D, W, Bias, D, PREC)
        o = _rnd(o_s.to(tl.float32) + o_l.to(tl.float32), q.dtype, PREC)
        tl.store(O + b * sob + h * soh + rows[:, None] * sol + offs_d[None, :], o, mask=rmask)

    @triton.jit
    def _sla_bwd_dq_kernel(Q, K, V, O, DO, LSE, DELTA, DQ, LUT, KMEAN,
                           sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol, sdb, sdh, sdl, sgb, sgh, sgl,
                           H, L, M, KSEL, qk_scale, sm_scale,
                           D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
        # Program (query block, b*h): delta = rowsum(O * dO) (stored for the dK/dV kernel), then
        # dQ = sum over the LUT of dS K with P recomputed from the stored LSE, dS = P (dO V^T - delta).
        # Every row of dS sums to zero, so dQ = dS (K - c) for any constant c; with c = mean(k) the bf16
        # rounding error of delta (from the bf16 O) is not multiplied by the large channel bias DiT keys carry.
        m_blk, bh = tl.program_id(0), tl.program_id(1)
        b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
        offs_d, offs_n = tl.arange(0, D), tl.arange(0, BK)
        rows = m_blk * BQ + tl.arange(0, BQ)
        rmask = rows < L
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sql + offs_d[None, :], mask=rmask[:, None], other=0.0)
        o = tl.load(O + b * sob + h * soh + rows[:, None] * sol + offs_d[None, :], mask=rmask[:, None], other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdl + offs_d[None, :], mask=rmask[:, None], other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + bh.to(tl.int64) * L + rows, delta, mask=rmask)
        lse = tl.load(LSE + bh.to(tl.int64) * L + rows, mask=rmask, other=float("inf"))
        k_base, v_base = K + b * skb + h * skh, V + b * svb + h * svh
        kmean = tl.load(KMEAN + bh * D + offs_d)
        dq = tl.zeros([BQ, D], tl.float32)
        lut = LUT + (bh.to(tl.int64) * M + m_blk) * KSEL
        for j in range(KSEL):
            cols = tl.load(lut + j) * BK + offs_n
            cmask = cols < L
            k = tl.load(k_base + cols[:, None] * skl + offs_d[None, :], mask=cmask[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * svl + offs_d[None, :], mask=cmask[:, None], other=0.0)
            s = _dot(q, tl.trans(k), None, PREC) * qk_scale
            p = tl.where(cmask[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
            dp = _dot(do, tl.trans(v), None, PREC)
            ds = p * (dp - delta[:, None])
            k_c = _rnd(k.to(tl.float32) - kmean[None, :], k.dtype, PREC)
            dq = _dot(_rnd(ds, k.dtype, PREC), k_c, dq, PREC)
        tl.store(DQ + b * sgb + h * sgh + rows[:, None] * sgl + offs_d[None, :], _rnd(dq * sm_scale, q.dtype, PREC),
                 mask=rmask[:, None])

    @triton.jit
    def _sla_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, TQ, TOFF,
                             sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl, sgb, sgh, sgl,
                             H, L, N, qk_scale, sm_scale,
                             D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, BQ2: tl.constexpr,
                             PREC: tl.constexpr):
        # Program (key block, b*h): walk the query blocks that selected this key block (transposed
        # LUT TQ, segment TOFF[bh*N + n] .. TOFF[bh*N + n + 1]) in sub-tiles of BQ2 rows;
        # dV += P^T dO, dK += dS^T Q. dK and dV share the strides (sgb, sgh, sgl).
        n_blk, bh = tl.program_id(0), tl.program_id(1)
        b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
        offs_d = tl.arange(0, D)
        cols = n_blk * BK + tl.arange(0, BK)
        cmask = cols < L
        k = tl.load(K + b * skb + h * skh + cols[:, None] * skl + offs_d[None, :], mask=cmask[:, None], other=0.0)
        v = tl.load(V + b * svb + h * svh + cols[:, None] * svl + offs_d[None, :], mask=cmask[:, None], other=0.0)
        dk = tl.zeros([BK, D], tl.float32)
        dv = tl.zeros([BK, D], tl.float32)
        seg = bh.to(tl.int64) * N + n_blk
        for i in range(tl.load(TOFF + seg), tl.load(TOFF + seg + 1)):
            m_blk = tl.load(TQ + i)
            for sub in range(BQ // BQ2):  # a loop, not unrolled: registers
                rows = m_blk * BQ + sub * BQ2 + tl.arange(0, BQ2)
                rmask = rows < L
                q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sql + offs_d[None, :], mask=rmask[:, None], other=0.0)
                do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdl + offs_d[None, :], mask=rmask[:, None], other=0.0)
                lse = tl.load(LSE + bh.to(tl.int64) * L + rows, mask=rmask, other=float("inf"))
                delta = tl.load(DELTA + bh.to(tl.int64) * L + rows, mask=rmask, other=0.0)
                s_t = _dot(k, tl.trans(q), None, PREC) * qk_scale  # [BK, BQ2]
                p_t = tl.where(cmask[:, None], tl.math.exp2(s_t - lse[None, :]), 0.0)
                dv = _dot(_rnd(p_t, do.dtype, PREC), do, dv, PREC)
                dp_t = _dot(v, tl.trans(do), None, PREC)
                ds_t = p_t * (dp_t - delta[None, :])
                dk = _dot(_rnd(ds_t, q.dtype, PREC), q, dk, PREC)
        g_ptrs = b * sgb + h * sgh + cols[:, None] * sgl + offs_d[None, :]
        tl.store(DK + g_ptrs, _rnd(dk * sm_scale, k.dtype, PREC), mask=cmask[:, None])
        tl.store(DV + g_ptrs, _rnd(dv, v.dtype, PREC), mask=cmask[:, None])


# ---------------------------------------------------------------------------------------------
# Launchers (check inputs, allocate, launch) registered as torch.library custom ops
# ---------------------------------------------------------------------------------------------

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_qkv(*xs: torch.Tensor) -> list[torch.Tensor]:
    x0 = xs[0]
    for x in xs:
        if x.dim() != 4 or x.shape != x0.shape or x.dtype != x0.dtype or x.device != x0.device:
            raise ValueError(f"SLA: q, k, v must be [B, H, L, D] tensors of one shape, dtype and device, got "
                             f"{[(tuple(t.shape), t.dtype, str(t.device)) for t in xs]}")
    if x0.dtype not in _DTYPES:
        raise ValueError(f"SLA: dtype must be bf16, fp16 or fp32, got {x0.dtype}")
    if x0.shape[-1] not in (16, 32, 64, 128, 256):
        raise ValueError(f"SLA: head dim must be a power of two in [16, 256], got {x0.shape[-1]}")
    # The kernels take any batch/head/token strides but need unit stride along D.
    return [x if x.stride(-1) == 1 else x.contiguous() for x in xs]


def _check_blocks(block_q: int, block_k: int) -> None:
    for b in (block_q, block_k):
        if b not in (16, 32, 64, 128, 256):
            raise ValueError(f"SLA: block sizes must be powers of two in [16, 256], got ({block_q}, {block_k})")


def _check_lut(lut: torch.Tensor, q: torch.Tensor, block_q: int) -> None:
    B, H, L, _ = q.shape
    if lut.dtype != torch.int32 or lut.dim() != 4 or tuple(lut.shape[:3]) != (B, H, cdiv(L, block_q)) \
            or not lut.is_contiguous() or lut.device != q.device:
        raise ValueError(f"SLA: lut must be contiguous int32 [{B}, {H}, {cdiv(L, block_q)}, K_sel] on {q.device}, "
                         f"got {lut.dtype} {tuple(lut.shape)}")


def _dot_prec(x: torch.Tensor) -> str:
    if x.dtype == torch.float32:
        return "ieee"
    return "interp" if interpreting() and not x.is_cuda else "tf32"  # tf32 is ignored for 16-bit operands


def _bhld_empty(x: torch.Tensor) -> torch.Tensor:
    # [B, H, L, D] view of a [B, L, H, D] allocation: outputs land in the DiT's layout for free.
    B, H, L, D = x.shape
    return torch.empty(B, L, H, D, dtype=x.dtype, device=x.device).transpose(1, 2)


def _num_sms(x: torch.Tensor) -> int:
    return torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4


def _warps(rows: int, d: int) -> int:
    # 8 warps once a [rows, D] fp32 tile would take 128 registers per thread at 4 (ptxas, sm90: spills).
    return 8 if rows * d >= 128 * 128 else 4


def _stats_fused(k: torch.Tensor, v: torch.Tensor, linear: bool, block: int = 64, warps: int = 8):
    # One Triton pass: per-split partial sums of k, phi(k)^T v and phi(k), added up here.
    B, H, L, D = k.shape
    # Enough programs to fill the GPU, each with at least 256 tokens.
    split = max(1, min(cdiv(L, 256), cdiv(4 * _num_sms(k), B * H)))
    per_split = cdiv(cdiv(L, split), block) * block
    split = cdiv(L, per_split)
    ksum = torch.empty(B * H, split, D, dtype=torch.float32, device=k.device)
    s = torch.empty(B * H, split if linear else 0, D, D, dtype=torch.float32, device=k.device)
    z = torch.empty(B * H, split if linear else 0, D, dtype=torch.float32, device=k.device)
    _sla_stats_kernel[(B * H, split)](k, v, ksum, s, z, *k.stride()[:3], *v.stride()[:3], H, L, per_split, split,
                                      D=D, BLOCK=block, LINEAR=linear, PREC=_dot_prec(k), num_warps=warps)
    if not linear:
        return ksum.sum(1), s.new_empty(0).to(k.dtype), z.new_empty(0).to(k.dtype)
    return ksum.sum(1), s.sum(1).to(k.dtype).view(B, H, D, D), z.sum(1).to(k.dtype).view(B, H, D)


def _stats_two_pass(k: torch.Tensor, v: torch.Tensor, block: int = 32, warps: int = 4):
    # phi(k) into a bf16 buffer (Triton, with k and phi(k) column sums), then phi(k)^T v by cuBLAS.
    B, H, L, D = k.shape
    nt = cdiv(L, block)
    phi = torch.empty(B, H, L, D, dtype=k.dtype, device=k.device)
    ksum = torch.empty(B * H, nt, D, dtype=torch.float32, device=k.device)
    z = torch.empty(B * H, nt, D, dtype=torch.float32, device=k.device)
    _sla_phi_kernel[(B * H, nt)](k, phi, ksum, z, *k.stride()[:3], H, L, nt, D=D, BLOCK=block, PREC=_dot_prec(k),
                                 num_warps=warps)
    s = phi.transpose(-1, -2) @ v  # [B, H, D, D], fp32 accumulation, rounded once (as TurboDiffusion)
    return ksum.sum(1), s, z.sum(1).to(k.dtype).view(B, H, D)


# Statistics pass used by the op: ("fused", tokens per tile, warps) or ("two-pass", tile, warps).
# benchmarks/bench_sla.py times the candidates on the GPU at hand and reports which it ran; on the
# H100 (2026-11-22) two-pass won: 0.248 vs 0.258 ms (1.3B shape), 1.61 vs 1.82 ms (14B shape).
# The fused pass holds a [D, D] fp32 accumulator, so one program fills an SM and loads stall.
STATS_CONFIG = ("two-pass", 32, 4)


@torch.library.custom_op("turbovid::sla_linear_stats", mutates_args=())
def sla_linear_stats(k: torch.Tensor, v: torch.Tensor, linear: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k token sums [B*H, D] fp32, S = phi(k)^T v [B, H, D, D], z = sum phi(k) [B, H, D]) in k's dtype.

    With linear=False only the k sums are computed (one pass over k; S and z come back empty).
    """
    k, v = _check_qkv(k, v)
    kind, block, warps = STATS_CONFIG
    if linear and kind == "two-pass":
        return _stats_two_pass(k, v, block, warps)
    return _stats_fused(k, v, linear, block if kind == "fused" else 64, warps if kind == "fused" else 8)


@sla_linear_stats.register_fake
def _(k, v, linear=True):
    B, H, L, D = k.shape
    return (k.new_empty(B * H, D, dtype=torch.float32), k.new_empty((B, H, D, D) if linear else (0,)),
            k.new_empty((B, H, D) if linear else (0,)))


@torch.library.custom_op("turbovid::sla_block_map", mutates_args=())
def sla_block_map_triton(q: torch.Tensor, k: torch.Tensor, k_sum: Optional[torch.Tensor], topk: float,
                         block_q: int, block_k: int) -> torch.Tensor:
    """LUT [B, H, M, K_sel] int32 sorted ascending; k_sum [B*H, D] fp32 from sla_linear_stats saves a pass."""
    q, k = _check_qkv(q, k)
    _check_blocks(block_q, block_k)
    B, H, L, D = q.shape
    M, N = cdiv(L, block_q), cdiv(L, block_k)
    if k_sum is None:
        k_sum = sla_linear_stats(k, k, False)[0]
    kmean = (k_sum / L).to(k.dtype)  # [B*H, D], rounded like torch's mean in the input dtype
    qp = q.new_empty(B, H, M, D)
    kp = q.new_empty(B, H, N, D)
    _sla_pool_kernel[(B * H, M + N)](q, k, kmean, qp, kp, *q.stride()[:3], *k.stride()[:3], H, L, M, N,
                                     D=D, BQ=block_q, BK=block_k, SUB=min(32, block_q, block_k), PREC=_dot_prec(q),
                                     num_warps=4)
    # The pooled scores are one small batched matmul [M, D] x [D, N]: the same call the reference
    # makes, so both rank identical numbers.
    return topk_lut((qp @ kp.transpose(-1, -2)).contiguous(), sla_topk_count(topk, N))


# Top-k launch: scores per program (rows = elements / padded row length) and warps. H100, 64x128 blocks at the
# 1.3B shape, pooled-score matmul + top-k: 4096/4 warps 0.0149 ms, 2048/4 0.0176, 8192/8 0.0189.
TOPK_CONFIG = dict(elements=4096, num_warps=4)


def topk_lut(scores: torch.Tensor, ksel: int) -> torch.Tensor:
    """Contiguous pooled scores [B, H, M, N] -> LUT [B, H, M, ksel] int32 of the best blocks, ascending."""
    B, H, M, N = scores.shape
    lut = torch.empty(B, H, M, ksel, dtype=torch.int32, device=scores.device)
    n_pad = max(16, triton.next_power_of_2(N))
    rows = max(1, TOPK_CONFIG["elements"] // n_pad)
    shift = {torch.bfloat16: 16, torch.float16: 13}.get(scores.dtype, 0)  # zero low bits of the fp32 key
    _sla_topk_kernel[(cdiv(B * H * M, rows),)](scores, lut, B * H * M, N, ksel, N_PAD=n_pad, R=rows, SHIFT=shift,
                                              num_warps=TOPK_CONFIG["num_warps"])
    return lut


@sla_block_map_triton.register_fake
def _(q, k, k_sum, topk, block_q, block_k):
    B, H, L, D = q.shape
    return q.new_empty(B, H, cdiv(L, block_q), sla_topk_count(topk, cdiv(L, block_k)), dtype=torch.int32)


@torch.library.custom_op("turbovid::sla_sparse_fwd", mutates_args=())
def sla_sparse_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lut: torch.Tensor, block_q: int, block_k: int,
                   s: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                   bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(O [B, H, L, D] as a view of [B, L, H, D], LSE [B*H, L] fp32 base 2).

    With s, z, weight, bias (the linear-branch statistics and proj_l) O = O_s + proj_l(O_l).
    """
    q, k, v = _check_qkv(q, k, v)
    _check_blocks(block_q, block_k)
    _check_lut(lut, q, block_q)
    B, H, L, D = q.shape
    M = cdiv(L, block_q)
    linear = s is not None
    if linear:
        s, z = s.contiguous(), z.contiguous()
        weight, bias = weight.to(q.dtype).contiguous(), bias.to(q.dtype).contiguous()
    o = _bhld_empty(q)
    lse = torch.empty(B * H, L, dtype=torch.float32, device=q.device)
    _sla_fwd_kernel[(M, B * H)](q, k, v, lut, o, lse, *((s, z, weight, bias) if linear else (q,) * 4),
                                *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
                                H, L, M, lut.shape[-1], math.log2(math.e) / math.sqrt(D),
                                D=D, BQ=block_q, BK=block_k, LINEAR=linear, PREC=_dot_prec(q),
                                num_warps=8 if linear else max(_warps(block_q, D), _warps(block_k, D)), num_stages=3)
    return o, lse


@sla_sparse_fwd.register_fake
def _(q, k, v, lut, block_q, block_k, s=None, z=None, weight=None, bias=None):
    B, H, L, D = q.shape
    return _bhld_empty(q), q.new_empty(B * H, L, dtype=torch.float32)


@torch.library.custom_op("turbovid::sla_sparse_bwd", mutates_args=())
def sla_sparse_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                   do: torch.Tensor, lut: torch.Tensor, block_q: int, block_k: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) of the sparse branch, each [B, H, L, D] as a view of [B, L, H, D]."""
    q, k, v, o, do = _check_qkv(q, k, v, o, do)
    _check_lut(lut, q, block_q)
    B, H, L, D = q.shape
    M, N, ksel = cdiv(L, block_q), cdiv(L, block_k), lut.shape[-1]
    dq, dk, dv = _bhld_empty(q), _bhld_empty(k), _bhld_empty(v)
    delta = torch.empty_like(lse)
    qk_scale, sm_scale = math.log2(math.e) / math.sqrt(D), 1.0 / math.sqrt(D)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    kmean = k.mean(dim=2, dtype=torch.float32)  # [B, H, D]
    _sla_bwd_dq_kernel[(M, B * H)](q, k, v, o, do, lse, delta, dq, lut, kmean, *strides, *o.stride()[:3],
                                   *do.stride()[:3], *dq.stride()[:3], H, L, M, ksel, qk_scale, sm_scale,
                                   D=D, BQ=block_q, BK=block_k, PREC=_dot_prec(q),
                                   num_warps=8 if D >= 128 else 4, num_stages=2)
    # Transposed LUT: for every (b*h, key block) the query blocks that selected it, ascending.
    # Entries of lut are ordered (b*h, m, j), so a stable sort by (b*h, key block) keeps m ascending.
    key = (torch.arange(B * H, device=q.device)[:, None] * N + lut.view(B * H, M * ksel)).flatten()
    order = torch.argsort(key, stable=True)
    tq = (order // ksel % M).to(torch.int32)
    counts = torch.zeros(B * H * N, dtype=torch.int32, device=q.device).scatter_add_(
        0, key, torch.ones_like(key, dtype=torch.int32))  # bincount would sync the host (no CUDA graphs)
    toff = torch.zeros(B * H * N + 1, dtype=torch.int32, device=q.device)
    toff[1:] = torch.cumsum(counts, 0)
    _sla_bwd_dkdv_kernel[(N, B * H)](q, k, v, do, lse, delta, dk, dv, tq, toff, *strides, *do.stride()[:3],
                                     *dk.stride()[:3], H, L, N, qk_scale, sm_scale,
                                     D=D, BQ=block_q, BK=block_k, BQ2=min(block_q, 64), PREC=_dot_prec(q),
                                     num_warps=8 if D >= 128 else 4, num_stages=2)
    return dq, dk, dv


@sla_sparse_bwd.register_fake
def _(q, k, v, o, lse, do, lut, block_q, block_k):
    return _bhld_empty(q), _bhld_empty(k), _bhld_empty(v)


def _linear_apply(q, o_s, s, z, weight, bias, block: int = 64, warps: int = 4) -> torch.Tensor:
    B, H, L, D = q.shape
    o = _bhld_empty(q)
    _sla_linear_apply_kernel[(cdiv(L, block), B * H)](
        q, o_s, s.contiguous(), z.contiguous(), weight.to(q.dtype).contiguous(), bias.to(q.dtype).contiguous(), o,
        *q.stride()[:3], *o_s.stride()[:3], *o.stride()[:3], H, L, D=D, BQ=block, PREC=_dot_prec(q),
        num_warps=warps)
    return o


@torch.library.custom_op("turbovid::sla_linear_apply", mutates_args=())
def sla_linear_apply(q: torch.Tensor, o_s: torch.Tensor, s: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor) -> torch.Tensor:
    """O = O_s + proj_l(O_l) as [B, H, L, D] (a view of [B, L, H, D]); o_s is any [B, H, L, D] view."""
    q, o_s = _check_qkv(q, o_s)
    return _linear_apply(q, o_s, s, z, weight, bias, block=64, warps=4)


@sla_linear_apply.register_fake
def _(q, o_s, s, z, weight, bias):
    return _bhld_empty(q)


class SparseAttention(torch.autograd.Function):
    """Sparse branch with the Triton forward and backward (no gradient to the LUT)."""

    @staticmethod
    def forward(ctx, q, k, v, lut, block_q: int, block_k: int):
        o, lse = sla_sparse_fwd(q, k, v, lut, block_q, block_k)
        ctx.save_for_backward(q, k, v, o, lse, lut)
        ctx.blocks = (block_q, block_k)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, lut = ctx.saved_tensors
        dq, dk, dv = sla_sparse_bwd(q, k, v, o, lse, do, lut, *ctx.blocks)
        return dq, dk, dv, None, None, None


# ---------------------------------------------------------------------------------------------
# Public entry points: kernel when use_triton(x), else the reference
# ---------------------------------------------------------------------------------------------


def sla_block_map(q: torch.Tensor, k: torch.Tensor, topk: float, block_q: int, block_k: int) -> torch.Tensor:
    if use_triton(q):
        return sla_block_map_triton(q, k, None, topk, block_q, block_k)
    return sla_block_map_ref(q, k, topk, block_q, block_k)


def sla_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lut: torch.Tensor,
               block_q: int, block_k: int) -> torch.Tensor:
    if use_triton(q):
        return SparseAttention.apply(q, k, v, lut, block_q, block_k)
    return sla_sparse_ref(q, k, v, lut, block_q, block_k)


def sla_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: float, block_q: int, block_k: int,
                weight: torch.Tensor, bias: torch.Tensor, sparse_fn=None, fuse_linear: bool = True) -> torch.Tensor:
    """Whole SLA forward without autograd: q, k, v [B, H, L, D] -> O [B, L, H, D] contiguous.

    Kernels: one statistics pass over k, v (smooth-K sums, phi(k)^T v, sum phi(k)), the pooling and
    top-k kernels, then the sparse kernel with the linear branch and proj_l in its epilogue. With
    `sparse_fn(q, k, v, lut) -> O_s` (SageSLA) the sparse branch is computed there and a separate
    pass adds proj_l(O_l) (also with fuse_linear=False, for the benchmark). Falls back to the references
    when use_triton(q) is False.
    """
    if not use_triton(q):
        lut = sla_block_map_ref(q, k, topk, block_q, block_k)
        o_s = sparse_fn(q, k, v, lut) if sparse_fn is not None else sla_sparse_ref(q, k, v, lut, block_q, block_k)
        s, z = sla_linear_stats_ref(k, v)
        return sla_linear_apply_ref(q, o_s, s, z, weight, bias)
    k_sum, s, z = sla_linear_stats(k, v)
    lut = sla_block_map_triton(q, k, k_sum, topk, block_q, block_k)
    if sparse_fn is None and fuse_linear:
        o = sla_sparse_fwd(q, k, v, lut, block_q, block_k, s, z, weight, bias)[0]
    elif sparse_fn is None:
        o = sla_linear_apply(q, sla_sparse_fwd(q, k, v, lut, block_q, block_k)[0], s, z, weight, bias)
    else:
        o = sla_linear_apply(q, sparse_fn(q, k, v, lut), s, z, weight, bias)
    return o.transpose(1, 2)
