"""W8A8 INT8 GEMMs: TurboDiffusion's block-scaled format and our faster per-token/per-channel format.

Two formats, both computing Y = X·Wᵀ (+ bias) with X [M, K] activations and W [N, K] weights:

TD format (SPEC §7, bit-exact with TurboDiffusion's `-quant` checkpoints):
  * quantization of X and of W alike: one fp32 scale per 128×128 tile of the (rows, K) matrix;
    amax = max(1e-8, max|x| over the tile), q = saturate_int8(round_half_even(x · (128/amax))),
    stored scale s = amax/128. The multiplier is 128, not 127: the tile's positive max maps to 128
    and saturates to 127, negatives reach −128. Out-of-range elements of partial tiles count as 0.
    Activation rows are tokens of the flattened batch, so a tile straddles two samples whenever
    L % 128 ≠ 0, and the result of one sample depends on its batch neighbours.
  * GEMM: for each 128-wide K block b, an exact int32 partial product P_b = q_X,b · q_W,bᵀ, then
    Y_fp32 += float(P_b) · (s_X[I, b] · s_W[J, b]); finally round Y to the output dtype and add the
    bias in that dtype (TD adds it outside its kernel; rounding first keeps us bit-identical).
    The kernel uses 128-row/column tiles aligned with the scale tiles, so each scale product is
    one scalar per (tile, K block). FMA contraction is switched off (`enable_fp_fusion=False`) so the
    kernel rounds exactly like the PyTorch reference (multiply, then add). K need not be a multiple
    of 128 here: the K tail is masked to zero, which changes neither an amax nor a dot product
    (TD's CUDA kernel silently returns zeros in that case).

Fast format (KERNELS §7.2 K2, our own):
  * activations: one scale per token (row), s = amax/127, q = round_half_even(x·(127/amax)) ∈ [−127, 127];
  * weights: one scale per output channel (row of W), same rule;
  * GEMM "NT": int32 accumulation over the whole K on the tensor cores, and everything else in the
    epilogue: y = acc · s_tok[:, None] · s_ch[None, :] + bias, then optionally tanh-GELU, then
    optionally a gated residual out = residual + gate[sample] · y with a per-sample fp32 gate
    (sample = row // tokens_per_sample), one rounding to the output dtype at the end.
    No rescaling inside the main loop — that is what makes it faster than cuBLAS bf16 (KERNELS §4.4).

Exactness: the int32 products are exact in the kernels and in the references (the TD per-block sums
are < 2^21 so an fp32 matmul of int8 values is exact; the fast whole-K sums can reach 2^28, so the
reference uses fp64). Rounding to the nearest even integer is done with the 1.5·2^23 trick
(exact for |v| < 2^22), which needs no libdevice and so also runs under TRITON_INTERPRET=1.

Main loop (fast format, CUDA): tiles come in through TMA tensor descriptors (`desc.load`, out-of-range rows
and the K tail read as zeros) and a persistent grid of one program per SM walks the tiles in grouped order;
the pointer-load loop (one program per tile) remains for K % 16 != 0 and as TURBOVID_GEMM=ptr. The loop over
tiles is flattened (`tl.range(..., flatten=True)`), so one tile's epilogue can overlap the next tile's loads:
in the 1.3B DiT the GEMM kernels went from 104.8 to 100.0 ms per forward (GELU epilogue 1.23 -> 1.12 ms).

Measured (H100, Triton 3.6, CUDA-graph timing, benchmarks/results/gemm_h100_*.json): fast GEMM alone with
TMA 904–1227 TOPS = 1.19–1.77× cuBLAS bf16 at M = 32760 (the pointer loop 1.12–1.56× in the same run, _run2);
earlier pointer-loop run 822–1151 TOPS = 1.08–1.64× (best 128×256×128 / 256×128×128, 8 warps, 3 stages); with the
standalone per-token quantization pass 0.83–1.45× (the pass is memory-bound: 3 B/element). The TD
block-scaled kernel runs 590–754 TOPS (≈ cuBLAS bf16), as KERNELS §4.4 predicts for in-loop promotion.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from turbovid.kernels import autotune

TD_TILE = 128          # TD scale granularity (rows and K)
TD_QMAX = 128.0        # TD's multiplier (saturates to 127)
FAST_QMAX = 127.0      # symmetric per-token / per-channel
AMAX_FLOOR = 1e-8


# ----------------------------------------------------------------------------------------------
# References (plain PyTorch; any device)
# ----------------------------------------------------------------------------------------------

def quant_td_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TD 128×128-tile quantizer. x [M, K] -> (q int8 [M, K], s fp32 [ceil(M/128), ceil(K/128)])."""
    M, K = x.shape
    mt, kt = math.ceil(M / TD_TILE), math.ceil(K / TD_TILE)
    xp = F.pad(x.float(), (0, kt * TD_TILE - K, 0, mt * TD_TILE - M))  # zeros: no effect on amax
    tiles = xp.view(mt, TD_TILE, kt, TD_TILE)                          # [mt, 128, kt, 128]
    amax = tiles.abs().amax(dim=(1, 3)).clamp_min(AMAX_FLOOR)          # [mt, kt]
    # tensor/tensor is an IEEE division; `scalar / tensor` would be reciprocal()·scalar, 1 ulp off.
    inv = torch.full_like(amax, TD_QMAX) / amax
    q = torch.round(tiles * inv[:, None, :, None]).clamp_(-128, 127)   # round half to even
    q = q.to(torch.int8).view(mt * TD_TILE, kt * TD_TILE)[:M, :K].contiguous()
    return q, amax / torch.full_like(amax, TD_QMAX)  # tensor/tensor: IEEE on CPU and CUDA alike


def dequant_td_ref(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Inverse of quant_td_ref up to rounding: q [R, K] int8, s [ceil(R/128), ceil(K/128)] -> fp32 [R, K]."""
    R, K = q.shape
    s_full = s.repeat_interleave(TD_TILE, 0).repeat_interleave(TD_TILE, 1)[:R, :K]
    return q.float() * s_full


def gemm_td_ref(qx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
                out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """TD block-scaled GEMM. qx [M, K], qw [N, K] int8; sx, sw tile scales -> [M, N] out_dtype."""
    M, K = qx.shape
    N = qw.shape[0]
    sx_rows = sx.repeat_interleave(TD_TILE, 0)[:M]  # [M, kt]: scale of each row's tile
    sw_rows = sw.repeat_interleave(TD_TILE, 0)[:N]  # [N, kt]
    y = torch.zeros(M, N, dtype=torch.float32, device=qx.device)
    for b in range(math.ceil(K / TD_TILE)):
        ks = slice(b * TD_TILE, min((b + 1) * TD_TILE, K))
        # |partial| <= 128·128·128 = 2^21 < 2^24: an fp32 (even tf32) matmul of int8 values is exact.
        part = qx[:, ks].float() @ qw[:, ks].float().T
        y = y + part * (sx_rows[:, b, None] * sw_rows[None, :, b])
    y = y.to(out_dtype)
    if bias is not None:
        y = y + bias.to(out_dtype)
    return y


def quant_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric quantizer. x [M, K] -> (q int8 [M, K] in [-127, 127], s fp32 [M] = amax/127)."""
    xf = x.float()
    amax = xf.abs().amax(dim=1).clamp_min(AMAX_FLOOR)
    inv = torch.full_like(amax, FAST_QMAX) / amax  # IEEE division (see quant_td_ref)
    q = torch.round(xf * inv[:, None]).clamp_(-127, 127).to(torch.int8)
    # tensor/tensor: CUDA turns `tensor / python scalar` into a multiply by the reciprocal
    return q, amax / torch.full_like(amax, FAST_QMAX)


def gemm_fast_ref(qx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
                  bias: torch.Tensor | None = None, gelu: bool = False,
                  residual: torch.Tensor | None = None, gate: torch.Tensor | None = None,
                  tokens_per_sample: int | None = None,
                  out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Per-token × per-channel W8A8 GEMM with a fused epilogue.

    qx [M, K], qw [N, K] int8; sx [M], sw [N] fp32; bias [N]; residual [M, N]; gate [B, N] fp32 with
    M = B·tokens_per_sample. Returns [M, N] out_dtype (one rounding at the end).
    """
    # Whole-K int32 sums reach 127²·K ≈ 2^28: fp64 holds them exactly, fp32 would not.
    acc = (qx.double() @ qw.double().T).float()
    y = acc * sx.float()[:, None] * sw.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    if gelu:
        y = F.gelu(y, approximate="tanh")
    if gate is not None:
        g = gate.float().repeat_interleave(tokens_per_sample, 0)  # [B, N] -> [M, N]
        y = residual.float() + g * y
    return y.to(out_dtype)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _round_half_even(v):
    # v + 1.5·2^23 lands in [2^23, 2^24) where the fp32 spacing is 1, so the add rounds v to the
    # nearest even integer; the low mantissa bits are then that integer (|v| < 2^22).
    return (v + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000


@triton.jit
def _rne_bf16(v):
    # fp32 -> nearest-even bf16 value, kept in fp32. Done on the bits because the Triton interpreter's
    # own fp32->bf16 cast does not round to nearest even; on the GPU this equals cvt.rn.bf16.f32.
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _to_out(v, dtype: tl.constexpr):
    if dtype == tl.bfloat16:
        v = _rne_bf16(v)
    return v.to(dtype)


@triton.jit
def _quant_td_kernel(x_ptr, q_ptr, s_ptr, M, K, KT, TILE: tl.constexpr):
    # One program per 128×128 tile: one read of x, one write of q, one scale.
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * TILE + tl.arange(0, TILE)
    cols = pid_k * TILE + tl.arange(0, TILE)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), 1e-8)
    inv = tl.math.div_rn(128.0, amax)
    q = _round_half_even(x * inv)
    q = tl.minimum(tl.maximum(q, -128), 127)
    tl.store(q_ptr + offs, q.to(tl.int8), mask=mask)
    tl.store(s_ptr + pid_m * KT + pid_k, amax * 0.0078125)  # amax/128, exact


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
                       SINGLE: tl.constexpr):
    # ROWS rows per program. The rows stay in registers when K fits one block (SINGLE); otherwise a
    # first sweep finds the amax and a second (L1/L2-resident) sweep quantizes.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    base = rows.to(tl.int64)[:, None] * K
    cols = tl.arange(0, BLOCK_K)[None, :]
    if SINGLE:
        mask = rmask[:, None] & (cols < K)
        x = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-8)
        inv = tl.math.div_rn(tl.full([ROWS], 127.0, tl.float32), amax)
        q = tl.minimum(tl.maximum(_round_half_even(x * inv[:, None]), -127), 127)
        tl.store(q_ptr + base + cols, q.to(tl.int8), mask=mask)
    else:
        amax_v = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask = rmask[:, None] & (k0 + cols < K)
            x = tl.load(x_ptr + base + k0 + cols, mask=mask, other=0.0).to(tl.float32)
            amax_v = tl.maximum(amax_v, tl.abs(x))
        amax = tl.maximum(tl.max(amax_v, axis=1), 1e-8)
        inv = tl.math.div_rn(tl.full([ROWS], 127.0, tl.float32), amax)
        for k0 in range(0, K, BLOCK_K):
            mask = rmask[:, None] & (k0 + cols < K)
            x = tl.load(x_ptr + base + k0 + cols, mask=mask, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(_round_half_even(x * inv[:, None]), -127), 127)
            tl.store(q_ptr + base + k0 + cols, q.to(tl.int8), mask=mask)
    tl.store(s_ptr + rows, tl.math.div_rn(amax, tl.full([ROWS], 127.0, tl.float32)), mask=rmask)


@triton.jit
def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped rasterisation: GROUP_M row-tiles share each weight column-tile while it is in L2.
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    return pid_m, pid_n


@triton.jit
def _gemm_td_kernel(x_ptr, w_ptr, sx_ptr, sw_ptr, bias_ptr, out_ptr, M, N, K, KT,
                    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    GROUP_M: tl.constexpr):
    BLOCK_K: tl.constexpr = 128  # = the scale tile: one scale product per (tile, K block)
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M).to(tl.int64)
    rn = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + rm[:, None] * K + rk[None, :]   # [BM, BK]
    b_ptrs = w_ptr + rn[None, :] * K + rk[:, None]   # [BK, BN], K contiguous (K-major)
    sx_row = sx_ptr + ((pid_m * BLOCK_M) // 128) * KT
    sw_row = sw_ptr + ((pid_n * BLOCK_N) // 128) * KT
    y = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, KT):
        kmask = kb * BLOCK_K + rk < K
        a = tl.load(a_ptrs, mask=kmask[None, :], other=0)
        b = tl.load(b_ptrs, mask=kmask[:, None], other=0)
        part = tl.dot(a, b, out_dtype=tl.int32)  # fresh int32 tile, exact
        s = tl.load(sx_row + kb) * tl.load(sw_row + kb)
        y = y + part.to(tl.float32) * s
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    out = _to_out(y, out_ptr.dtype.element_ty)
    if HAS_BIAS:
        # bias rounded to the output dtype first, then one bf16/fp16 add: what `y + bias.to(y.dtype)` does.
        b = _to_out(tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32), out_ptr.dtype.element_ty)
        out = _to_out(out.to(tl.float32) + b.to(tl.float32)[None, :], out_ptr.dtype.element_ty)
    omask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], out, mask=omask)


@triton.jit
def _gemm_fast_kernel(x_ptr, w_ptr, sx_ptr, sw_ptr, bias_ptr, res_ptr, gate_ptr, out_ptr,
                      M, N, K, L,
                      HAS_BIAS: tl.constexpr, GELU: tl.constexpr, GATED: tl.constexpr, GATE2: tl.constexpr,
                      EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrapped indices keep every load in bounds without masks; the store is masked.
    rm = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M).to(tl.int64)
    rn = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + rm[:, None] * K + rk[None, :]   # [BM, BK]
    b_ptrs = w_ptr + rn[None, :] * K + rk[:, None]   # [BK, BN], K-major as int8 wgmma requires
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            kmask = k * BLOCK_K + rk < K
            a = tl.load(a_ptrs, mask=kmask[None, :], other=0)
            b = tl.load(b_ptrs, mask=kmask[:, None], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    _fast_epilogue(acc, pid_m * BLOCK_M, pid_n * BLOCK_N, sx_ptr, sw_ptr, bias_ptr, res_ptr, gate_ptr, out_ptr,
                   M, N, L, HAS_BIAS, GELU, GATED, GATE2, BLOCK_M, BLOCK_N)


@triton.jit
def _fast_epilogue(acc, off_m, off_n, sx_ptr, sw_ptr, bias_ptr, res_ptr, gate_ptr, out_ptr, M, N, L,
                   HAS_BIAS: tl.constexpr, GELU: tl.constexpr, GATED: tl.constexpr, GATE2: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, out_desc=None, OUT_TMA: tl.constexpr = False):
    """Dequantize, bias, GELU, gated residual; one rounding. Row/column indices wrap, so loads need no mask.
    GATE2 (tokens per sample L >= BLOCK_M): a tile's rows span at most two samples, so the gate is two [BLOCK_N]
    vectors and a select instead of a [BLOCK_M, BLOCK_N] gather.
    OUT_TMA: the tile leaves through a TMA store (rows past M are clipped by the hardware)."""
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    sx = tl.load(sx_ptr + rm)
    sw = tl.load(sw_ptr + rn)
    y = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    if GELU:
        # tanh(u) = 1 − 2/(exp(2u)+1): exact limits at ±inf, no libdevice needed.
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = 0.5 * y * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
    offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    omask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if GATED:
        if GATE2:
            first = off_m // L                       # sample of the tile's first row (unwrapped index)
            g0 = tl.load(gate_ptr + first * N + rn)
            g1 = tl.load(gate_ptr + tl.minimum(first + 1, M // L - 1) * N + rn)
            g = tl.where((offs_m < (first + 1) * L)[:, None], g0[None, :], g1[None, :])
        else:
            g = tl.load(gate_ptr + (rm // L)[:, None] * N + rn[None, :])
        r = tl.load(res_ptr + offs, mask=omask, other=0.0).to(tl.float32)
        y = r + g * y
    if OUT_TMA:
        out_desc.store([off_m, off_n], _to_out(y, out_ptr.dtype.element_ty))
    else:
        tl.store(out_ptr + offs, _to_out(y, out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _gemm_fast_tma_kernel(x_desc, w_desc, sx_ptr, sw_ptr, bias_ptr, res_ptr, gate_ptr, out_ptr, out_desc,
                          M, N, K, L,
                          HAS_BIAS: tl.constexpr, GELU: tl.constexpr, GATED: tl.constexpr, GATE2: tl.constexpr,
                          OUT_ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr,
                          OUT_TMA: tl.constexpr = False, WS: tl.constexpr = False):
    """The same GEMM as _gemm_fast_kernel with TMA tile loads (tensor descriptors; out-of-range rows and the
    K tail read as zeros) and a persistent grid: NUM_SMS programs walk the tiles in grouped order. The tile
    loop is either flattened (one tile's epilogue overlaps the next tile's loads) or warp-specialised (WS:
    producer warps issue the loads, consumer warps run the MMAs and the epilogue); OUT_TMA stores through
    `out_desc` when the output rows are 16-byte aligned (OUT_ALIGNED). Which wins depends on the epilogue
    (an A/B of the variants on an H100 put WS first for the K = 8960 / 13824 gated GEMMs and the TMA store first
    for the 1.3B o-projection); the autotuner picks per shape. With the two-vector gate, e2e_h100_..._run7 ->
    _run8: 1.3B o-projection 0.316 -> 0.237 ms, ffn.2 1.011 -> 0.968 ms, all GEMMs 99.7 -> 93.0 ms per forward;
    14B 4-step DiT 13.05 -> 12.27 s."""
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=not WS, warp_specialize=WS):
        pid_m, pid_n = _tile_ids(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for kk in range(k_tiles):
            a = x_desc.load([off_m, kk * BLOCK_K])            # [BM, BK]
            b = w_desc.load([off_n, kk * BLOCK_K])            # [BN, BK], K-major as int8 wgmma requires
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        _fast_epilogue(acc, off_m, off_n, sx_ptr, sw_ptr, bias_ptr, res_ptr, gate_ptr, out_ptr, M, N, L,
                       HAS_BIAS, GELU, GATED, GATE2, BLOCK_M, BLOCK_N, out_desc, OUT_TMA and OUT_ALIGNED)


def _fast_configs():
    # KERNELS §4.4 / §7.2 K2: 128×256×128 or 256×128×128, 8 warps, 3 stages measured best.
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in [(128, 256, 128, 8, 3), (256, 128, 128, 8, 3),
                                     (128, 128, 128, 8, 4), (128, 256, 64, 8, 4)]]


def _td_configs():
    # The promotion needs one scale per (tile, K block), so tiles are 128×128 (KERNELS §4.4: best
    # block-scaled config 128×128×128, 8 warps, 4 stages; 128×256 spills).
    return [triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=8, num_stages=s)
            for s in (3, 4)]


def _tma_block_shapes(nargs):
    """Autotune pre-hook: the descriptors' block shapes follow the config being tried."""
    nargs["x_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]
    if nargs["out_desc"] is not None:
        nargs["out_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_N"]]


def _tma_configs():
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, TMA store, warp-specialised)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "OUT_TMA": o, "WS": ws},
                          num_warps=w, num_stages=s, pre_hook=_tma_block_shapes)
            for bm, bn, bk, w, s, o, ws in [
                (128, 256, 128, 8, 3, False, False), (256, 128, 128, 8, 3, False, False),
                (128, 256, 128, 8, 4, False, False), (128, 128, 128, 8, 4, False, False),
                (128, 256, 64, 8, 4, False, False), (128, 128, 128, 8, 4, True, False),
                (128, 256, 128, 8, 3, False, True), (128, 256, 128, 8, 4, False, True),
                (256, 128, 128, 8, 3, False, True)]]


# The two-vector gate (GATE2) needs every tile to span at most two samples: tokens per sample >= the largest BLOCK_M.
MAX_BLOCK_M = max(c.kwargs["BLOCK_M"] for c in _fast_configs() + _tma_configs())

_gemm_fast_tuned = autotune(_fast_configs(), key=["M", "N", "K", "GELU", "GATED"])(_gemm_fast_kernel)
_gemm_fast_tma_tuned = autotune(_tma_configs(), key=["M", "N", "K", "GELU", "GATED"])(_gemm_fast_tma_kernel)

# Which main loop gemm_fast runs on a GPU: "tma" (tensor-descriptor loads, persistent grid) or "ptr" (pointer
# loads, one program per tile). TURBOVID_GEMM overrides; TMA needs K % 16 == 0 (16-byte row strides).
GEMM_LOOP = os.environ.get("TURBOVID_GEMM", "tma")
_gemm_td_tuned = autotune(_td_configs(), key=["M", "N", "K"])(_gemm_td_kernel)


# ----------------------------------------------------------------------------------------------
# Launchers (check inputs, allocate, launch)
# ----------------------------------------------------------------------------------------------

def _check_2d(name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")


@torch.library.custom_op("turbovid::quant_td", mutates_args=())
def quant_td(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel version of quant_td_ref (bit-exact)."""
    _check_2d("x", x)
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bf16/fp16/fp32, got {x.dtype}")
    x = x.contiguous()
    M, K = x.shape
    mt, kt = triton.cdiv(M, TD_TILE), triton.cdiv(K, TD_TILE)
    q = torch.empty(M, K, dtype=torch.int8, device=x.device)
    s = torch.empty(mt, kt, dtype=torch.float32, device=x.device)
    _quant_td_kernel[(mt, kt)](x, q, s, M, K, kt, TILE=TD_TILE, num_warps=8, enable_fp_fusion=False)
    return q, s


@torch.library.custom_op("turbovid::quant_per_token", mutates_args=())
def quant_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel version of quant_per_token_ref (bit-exact)."""
    _check_2d("x", x)
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bf16/fp16/fp32, got {x.dtype}")
    x = x.contiguous()
    M, K = x.shape
    block = min(triton.next_power_of_2(K), 4096)
    # GPU: ~4K values per program (1 row of 4096, 2 of 2048, ...); interpreter: many rows per program
    # because its cost is per program.
    rows = max(1, 4096 // block) if x.is_cuda else 16
    q = torch.empty(M, K, dtype=torch.int8, device=x.device)
    s = torch.empty(M, dtype=torch.float32, device=x.device)
    _quant_rows_kernel[(triton.cdiv(M, rows),)](x, q, s, M, K, ROWS=rows, BLOCK_K=block, SINGLE=K <= block,
                                                num_warps=8, enable_fp_fusion=False)
    return q, s


@torch.library.custom_op("turbovid::gemm_td", mutates_args=())
def gemm_td(qx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
            out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Kernel version of gemm_td_ref (bit-exact)."""
    _check_2d("qx", qx, torch.int8)
    _check_2d("qw", qw, torch.int8)
    M, K = qx.shape
    N = qw.shape[0]
    kt = triton.cdiv(K, TD_TILE)
    if qw.shape[1] != K:
        raise ValueError(f"K mismatch: x has {K}, weight has {qw.shape[1]}")
    if tuple(sx.shape) != (triton.cdiv(M, TD_TILE), kt) or tuple(sw.shape) != (triton.cdiv(N, TD_TILE), kt):
        raise ValueError(f"scale shapes {tuple(sx.shape)}, {tuple(sw.shape)} do not match 128×128 tiles of "
                         f"x {tuple(qx.shape)} and w {tuple(qw.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    qx, qw = qx.contiguous(), qw.contiguous()
    sx, sw = sx.float().contiguous(), sw.float().contiguous()
    out = torch.empty(M, N, dtype=out_dtype, device=qx.device)
    bias_arg = bias.contiguous() if bias is not None else sx  # dummy pointer when unused
    if qx.is_cuda:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _gemm_td_tuned[grid](qx, qw, sx, sw, bias_arg, out, M, N, K, kt, HAS_BIAS=bias is not None,
                             enable_fp_fusion=False)
    else:
        grid = (triton.cdiv(M, 128) * triton.cdiv(N, 128),)
        _gemm_td_kernel[grid](qx, qw, sx, sw, bias_arg, out, M, N, K, kt, HAS_BIAS=bias is not None,
                              BLOCK_M=128, BLOCK_N=128, GROUP_M=8)
    return out


@torch.library.custom_op("turbovid::gemm_fast", mutates_args=())
def gemm_fast(qx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
              bias: torch.Tensor | None = None, gelu: bool = False,
              residual: torch.Tensor | None = None, gate: torch.Tensor | None = None,
              tokens_per_sample: int | None = None,
              out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Kernel version of gemm_fast_ref (int32 part exact, epilogue within fp32 rounding)."""
    _check_2d("qx", qx, torch.int8)
    _check_2d("qw", qw, torch.int8)
    M, K = qx.shape
    N = qw.shape[0]
    if qw.shape[1] != K:
        raise ValueError(f"K mismatch: x has {K}, weight has {qw.shape[1]}")
    if sx.shape != (M,) or sw.shape != (N,):
        raise ValueError(f"scales must be [M]=[{M}] and [N]=[{N}], got {tuple(sx.shape)} and {tuple(sw.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    gated = gate is not None
    if gated:
        if residual is None or tokens_per_sample is None:
            raise ValueError("a gate needs residual and tokens_per_sample")
        if residual.shape != (M, N) or M % tokens_per_sample or gate.shape != (M // tokens_per_sample, N):
            raise ValueError(f"residual must be [{M}, {N}] and gate [B, {N}] with B·tokens_per_sample = {M}; got "
                             f"{tuple(residual.shape)}, {tuple(gate.shape)}, tokens_per_sample={tokens_per_sample}")
    qx, qw = qx.contiguous(), qw.contiguous()
    sx, sw = sx.float().contiguous(), sw.float().contiguous()
    out = torch.empty(M, N, dtype=out_dtype, device=qx.device)
    dummy = sx
    args = (qx, qw, sx, sw, bias.contiguous() if bias is not None else dummy,
            residual.contiguous() if gated else dummy, gate.float().contiguous() if gated else dummy, out,
            M, N, K, tokens_per_sample if gated else 1)
    flags = dict(HAS_BIAS=bias is not None, GELU=gelu, GATED=gated, GATE2=gated and tokens_per_sample >= MAX_BLOCK_M)
    tma = GEMM_LOOP == "tma" and K % 16 == 0
    out_aligned = (N * out.element_size()) % 16 == 0   # TMA store: 16-byte row stride
    if qx.is_cuda and tma:
        sms = torch.cuda.get_device_properties(qx.device).multi_processor_count
        descs = (TensorDescriptor.from_tensor(qx, [1, 16]), TensorDescriptor.from_tensor(qw, [1, 16]))  # pre-hook sets
        out_desc = TensorDescriptor.from_tensor(out, [1, 16]) if out_aligned else None
        grid = lambda meta: (min(sms, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)
        _gemm_fast_tma_tuned[grid](*descs, *args[2:8], out_desc, *args[8:], NUM_SMS=sms, OUT_ALIGNED=out_aligned,
                                   **flags)
    elif qx.is_cuda:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _gemm_fast_tuned[grid](*args, EVEN_K=K % 128 == 0, **flags)
    elif tma:   # interpreter: small tiles, 3 "SMs" so that programs walk several tiles; TMA store when aligned
        descs = (TensorDescriptor.from_tensor(qx, [64, 64]), TensorDescriptor.from_tensor(qw, [64, 64]))
        out_desc = TensorDescriptor.from_tensor(out, [64, 64]) if out_aligned else None
        _gemm_fast_tma_kernel[(3,)](*descs, *args[2:8], out_desc, *args[8:], BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=4,
                                    NUM_SMS=3, OUT_ALIGNED=out_aligned, OUT_TMA=out_aligned, **flags)
    else:
        bk = 64  # small tiles keep the interpreter quick; BLOCK_K < K exercises the K loop
        grid = (triton.cdiv(M, 64) * triton.cdiv(N, 64),)
        _gemm_fast_kernel[grid](*args, EVEN_K=K % bk == 0, BLOCK_M=64, BLOCK_N=64, BLOCK_K=bk, GROUP_M=4, **flags)
    return out


# Shapes-only versions for torch.compile tracing.
@quant_td.register_fake
def _(x):
    M, K = x.shape
    return (x.new_empty(M, K, dtype=torch.int8),
            x.new_empty(triton.cdiv(M, TD_TILE), triton.cdiv(K, TD_TILE), dtype=torch.float32))


@quant_per_token.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[0], dtype=torch.float32)


@gemm_td.register_fake
def _(qx, sx, qw, sw, out_dtype, bias=None):
    return qx.new_empty(qx.shape[0], qw.shape[0], dtype=out_dtype)


@gemm_fast.register_fake
def _(qx, sx, qw, sw, bias=None, gelu=False, residual=None, gate=None, tokens_per_sample=None,
      out_dtype=torch.bfloat16):
    return qx.new_empty(qx.shape[0], qw.shape[0], dtype=out_dtype)


__all__ = ["quant_td_ref", "dequant_td_ref", "gemm_td_ref", "quant_per_token_ref", "gemm_fast_ref",
           "quant_td", "quant_per_token", "gemm_td", "gemm_fast"]
