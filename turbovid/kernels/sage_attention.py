"""Quantized attention (SageAttention-style): INT8 QKᵀ + FP8 (or FP16) PV, dense or LUT block-sparse.

The algorithm (SageAttention v1/v2 on H100, and the sparse loop of SpargeAttn/SageSLA; KERNELS.md §1, §3,
§7.2 K3/K5; SPEC §6.3). Inputs q, k, v are [B, H, L, D] (any strides), bf16 or fp16, self-attention.

1. Quantize (memory-bound, one pass per tensor; `quantize_qkv`):
   * Q -> INT8, one scale per (b, h, block of BLOCK_Q tokens). Q is first multiplied by sm_scale·log2(e), so
     the dequantized logits are already base-2 and the softmax uses exp2 directly.
   * K -> subtract the per-(b, h) token mean mu ("smooth-K"): q·(k_j - mu) = q·k_j - q·mu, and the second term
     is the same for every key of a query row, so softmax does not change, but INT8 no longer has to cover
     the channel bias that DiT keys carry. Then INT8 per (b, h, block of BLOCK_K tokens).
     INT8: scale = amax/127 + 1e-7 (the epsilon keeps an all-zero block finite), round half away from zero.
   * V -> subtract the per-(b, h) channel mean ("smooth-V", added back in the epilogue: every softmax row sums
     to 1), then FP8 e4m3 with one scale per (b, h, channel) = amax|v - mean| / 448 (the e4m3 maximum), stored
     transposed [B, H, D, L_pad]: the PV product reduces over tokens, and Hopper's 8-bit wgmma wants the
     reduction axis contiguous (KERNELS §6.2 item 1). Smooth-V matters because the row sum l is accumulated
     from the fp32 probabilities while the numerator uses their e4m3 rounding: with V centred, that mismatch
     multiplies (v - mean) instead of v, so a V offset (common in DiTs) no longer turns into output error.
     The FP16-PV variant (GPUs without FP8 tensor cores, sm80/86) keeps V unscaled in fp16, same layout.
   Q and K buffers are zero-padded to whole blocks, so the attention loop loads without masks.
2. Attention (compute-bound; one program per (query block, b·h)):
   the INT8 Q tile stays in registers; for each key block — all of them (dense) or the K_sel entries of the
   program's LUT row (sparse) — S = int8 dot (int32) -> fp32 × q_scale·k_scale, online softmax in base 2
   (running max m, running sum l, rescale factor 2^(m_old - m_new)), P -> e4m3 (or fp16), acc += P·V in fp32.
   * P is computed as 2^(s - m + 8.8) ∈ [0, 445.7] instead of [0, 1]: e4m3 then keeps 3 mantissa bits down to
     tiny probabilities instead of flushing them to subnormals; l carries the same factor, so it cancels.
   * The softmax side is the bottleneck at D = 128 (H100: exp2 and the type conversions run at 16/clk/SM, the
     rate at which the 8-bit tensor cores produce scores): int32 -> fp32 of the scores can use the exact "magic
     number" trick (|s| ≤ 127²·128 < 2²²: an integer add and a bitcast instead of a conversion instruction, the
     offset folded into the FMA that feeds exp2) where it does not cost registers (per config, measured).
   * Tails: keys past L in the last key block get logit -inf (sageattention 1.0.6 leaves them at logit 0
     and leaks them into the softmax); only the last loop iteration is masked. In sparse mode that is the
     last LUT entry, which is why the LUT must be sorted ascending. Padded query rows are not stored.
   * Epilogue: O = acc / l × v_scale + v_mean (per channel), stored in q's dtype.
   Sparse mode normalises over the selected keys only (SPEC §6.3).

Error budget (vs exact fp32 attention, on inputs with DiT-like outliers, `outlier_qkv`): at the Wan shapes
cosine ≥ 0.999 and relative L1 ≤ 0.04 (measured on H100: cos 0.9999, rel-L1 0.0071 FP8 PV / 0.0068 FP16 PV at
1.3B-480p, 0.013 with a random 10% LUT; sageattention 1.0.6: 0.0067); on tiny, peaky problems (L ≈ 100) the
INT8 Q/K rounding gives ~0.03. Against `sage_attention_ref` (same quantization, exact softmax) the FP16-PV kernel
agrees to accumulation order and bf16 output rounding, the FP8-PV kernel also to the e4m3 rounding of P.

Layouts: the output has q's memory layout — if q is a [B, L, H, D] tensor viewed as [B, H, L, D] (the DiT's
case), the output is written straight into [B, L, H, D] storage and returned as the same kind of view, so no
transpose copy is needed on either side.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from turbovid.kernels import interpreting, use_triton

LOG2E = 1.4426950408889634
FP8_MAX = 448.0
DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 128
PV_MODES = ("fp8", "fp16")
_MIN_CAPABILITY = {"fp8": (8, 9), "fp16": (8, 0)}  # FP8 tensor cores arrive with Ada/Hopper


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _q_multiplier(head_dim: int) -> float:
    # sm_scale·log2(e), rounded to fp32 once so the kernel and the reference multiply by the same number.
    return float(torch.tensor(head_dim ** -0.5 * LOG2E, dtype=torch.float32))


def kv_stats(k: torch.Tensor, v: torch.Tensor, pv: str):
    """Smooth-K mean, smooth-V mean and FP8 V scale, each fp32 [B, H, D] (V ones None for FP16 PV).
    Shared by the kernel path and the reference. Plain PyTorch reductions: measured faster on H100 than a
    one-pass Triton version (0.23 vs 0.33 ms at the Wan-1.3B shape)."""
    k_mean = k.mean(dim=2, dtype=torch.float32)
    if pv == "fp16":
        return k_mean, None, None
    v_mean = v.mean(dim=2, dtype=torch.float32)
    lo, hi = torch.aminmax(v, dim=2)
    # FP8 scale from the centred range: amax |v - mean| / 448, floored so a constant channel stays finite.
    return k_mean, v_mean, torch.maximum(hi.float() - v_mean, v_mean - lo.float()).clamp_min(1e-6) / FP8_MAX


def outlier_qkv(b: int, h: int, length: int, d: int, *, dtype=torch.bfloat16, device="cpu", seed: int = 0,
                dit_layout: bool = False):
    """Random q, k, v [B, H, L, D] with the structure that makes low-bit attention hard in DiTs (not only randn):
    a few Q/K channels ×10 / ×5, per-token Q offsets, a large channel bias shared by all keys (what smooth-K
    removes), and V with a mean offset and loud channels. `dit_layout`: return [B, H, L, D] views of
    [B, L, H, D] storage, as the DiT produces them. Used by the tests and the benchmark."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (b, length, h, d)  # generated in the DiT's [B, L, H, D] order
    q = torch.randn(shape, generator=g, device=device)
    k = torch.randn(shape, generator=g, device=device)
    v = torch.randn(shape, generator=g, device=device)
    ch = torch.randperm(d, generator=g, device=device)
    every = torch.arange(d, device=device)
    q[..., ch[:4]] *= 10.0
    q += 0.5 * torch.randn(b, length, h, 1, generator=g, device=device)
    k[..., ch[4:8]] *= 5.0
    k += 4.0 * torch.randn(1, 1, h, d, generator=g, device=device) + torch.where(every % 16 == 0, 8.0, 0.0)
    v = v * torch.where(every % 32 == 1, 4.0, 1.0) + 1.0
    out = []
    for t in (q, k, v):
        t = t.to(dtype).transpose(1, 2)  # [B, H, L, D] view of [B, L, H, D] storage
        out.append(t if dit_layout else t.contiguous())
    return tuple(out)


# ------------------------------------------------------------------------------------------------------------
# 1. Quantization: references (statistics are inputs, so kernel and reference can be fed the same ones)
# ------------------------------------------------------------------------------------------------------------

def quantize_int8_ref(x: torch.Tensor, block: int, multiplier: float = 1.0,
                      mean: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, L, D] -> (int8 [B, H, L_pad, D] zero-padded, fp32 scale [B, H, L_pad/block]) of (x - mean)·mult."""
    b, h, length, d = x.shape
    n = _cdiv(length, block)
    xf = x.float()
    if mean is not None:
        xf = xf - mean[:, :, None, :]
    if multiplier != 1.0:
        xf = xf * multiplier
    xf = F.pad(xf, (0, 0, 0, n * block - length)).view(b, h, n, block, d)
    amax = xf.abs().amax(dim=(3, 4))
    # Tensor divisor on purpose: CUDA PyTorch turns division by a Python scalar into a multiplication by its
    # reciprocal (1 ulp off true division), while the kernel divides exactly (div_rn).
    scale = amax / torch.full_like(amax, 127.0) + 1e-7
    y = xf / scale[..., None, None]
    q8 = torch.where(y >= 0, y + 0.5, y - 0.5).trunc().to(torch.int8)  # round half away from zero
    return q8.view(b, h, n * block, d), scale


def quantize_v_ref(v: torch.Tensor, block: int, mean: Optional[torch.Tensor] = None,
                   scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """v [B, H, L, D] -> V^T [B, H, D, L_pad], zero-padded: e4m3 of (v - mean)/scale (mean, scale fp32 [B, H, D]),
    or plain fp16 V when no scale is given (FP16 PV)."""
    length = v.shape[2]
    pad = _cdiv(length, block) * block - length
    if scale is None:
        return F.pad(v.to(torch.float16), (0, 0, 0, pad)).transpose(2, 3).contiguous()
    v8 = ((v.float() - mean[:, :, None, :]) / scale[:, :, None, :]).to(torch.float8_e4m3fn)
    v8 = F.pad(v8.view(torch.uint8), (0, 0, 0, pad)).view(torch.float8_e4m3fn)  # F.pad has no fp8 kernel
    return v8.transpose(2, 3).contiguous()


def quantize_qkv_ref(q, k, v, block_q: int, block_k: int, pv: str, stats=None):
    """(q8, q_scale, k8, k_scale, V^T, v_scale, v_mean); `stats` = (k_mean, v_mean, v_scale), default kv_stats."""
    k_mean, v_mean, v_scale = stats if stats is not None else kv_stats(k, v, pv)
    q8, qs = quantize_int8_ref(q, block_q, multiplier=_q_multiplier(q.shape[-1]))
    k8, ks = quantize_int8_ref(k, block_k, mean=k_mean)
    return q8, qs, k8, ks, quantize_v_ref(v, block_k, v_mean, v_scale), v_scale, v_mean


# ------------------------------------------------------------------------------------------------------------
# 1. Quantization: Triton
# ------------------------------------------------------------------------------------------------------------

@triton.jit
def _quant_int8_kernel(X, Mean, Out, Scale, multiplier, H, L, n_blk,
                       stride_b, stride_h, stride_l, stride_d,
                       HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                       HAS_MEAN: tl.constexpr, HAS_MULT: tl.constexpr):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_l = blk * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    valid = (offs_l < L)[:, None]
    x = tl.load(X + b * stride_b + h * stride_h + offs_l[:, None].to(tl.int64) * stride_l + offs_d[None, :] * stride_d,
                mask=valid, other=0.0).to(tl.float32)
    if HAS_MEAN:
        mu = tl.load(Mean + bh * HEAD_DIM + offs_d)
        x = tl.where(valid, x - mu[None, :], 0.0)  # padded rows stay exactly 0
    if HAS_MULT:
        x = x * multiplier
    # IEEE division (div_rn) so the GPU result equals the PyTorch reference bit for bit.
    scale = tl.math.div_rn(tl.max(tl.max(tl.abs(x), axis=1), axis=0), 127.0) + 1e-7
    y = tl.math.div_rn(x, scale)
    q8 = tl.where(y >= 0, y + 0.5, y - 0.5).to(tl.int8)  # float->int truncates: round half away from zero
    tl.store(Out + bh.to(tl.int64) * n_blk * BLOCK * HEAD_DIM + offs_l[:, None] * HEAD_DIM + offs_d[None, :], q8)
    tl.store(Scale + bh * n_blk + blk, scale)


@triton.jit
def _to_e4m3(x, SOFT_ROUND: tl.constexpr):
    """fp32 -> e4m3. SOFT_ROUND (interpreter only): first round to the e4m3 grid (nearest even) in fp32/int32
    arithmetic, because the Triton interpreter's fp8 cast loses the carry when rounding up across a power of two
    (e.g. 126.6 -> 64); the cast of a value already on the grid is exact. The GPU cast is a correct RNE."""
    if SOFT_ROUND:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # keep 3 mantissa bits, ties to even
        normal = bits.to(tl.float32, bitcast=True)
        subnormal = ((x * 512.0 + 12582912.0) - 12582912.0) / 512.0  # below 2^-6 the grid step is 2^-9
        x = tl.where(tl.abs(x) < 0.015625, subnormal, normal)
    return x.to(tl.float8e4nv)


@triton.jit
def _quant_v_kernel(V, Mean, Scale, Out, H, L, L_pad,
                    stride_b, stride_h, stride_l, stride_d,
                    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, FP8: tl.constexpr, SOFT_ROUND: tl.constexpr):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_l = blk * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    x = tl.load(V + b * stride_b + h * stride_h + offs_l[:, None].to(tl.int64) * stride_l + offs_d[None, :] * stride_d,
                mask=(offs_l < L)[:, None], other=0.0)
    if FP8:
        mu = tl.load(Mean + bh * HEAD_DIM + offs_d)
        scale = tl.load(Scale + bh * HEAD_DIM + offs_d)
        x = tl.where((offs_l < L)[:, None], x.to(tl.float32) - mu[None, :], 0.0)
        x = _to_e4m3(tl.math.div_rn(x, scale[None, :]), SOFT_ROUND)
    else:
        x = x.to(tl.float16)
    # Transposed store: V^T[bh, d, l], tokens contiguous.
    tl.store(Out + bh.to(tl.int64) * HEAD_DIM * L_pad + offs_d[None, :] * L_pad + offs_l[:, None], x)


def quantize_int8(x: torch.Tensor, block: int, multiplier: float = 1.0,
                  mean: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `quantize_int8_ref` (bit-exact)."""
    b, h, length, d = x.shape
    n = _cdiv(length, block)
    out = torch.empty(b, h, n * block, d, device=x.device, dtype=torch.int8)
    scale = torch.empty(b, h, n, device=x.device, dtype=torch.float32)
    _quant_int8_kernel[(n, b * h)](x, mean if mean is not None else scale, out, scale, multiplier, h, length, n,
                                   *x.stride(), HEAD_DIM=d, BLOCK=block, HAS_MEAN=mean is not None,
                                   HAS_MULT=multiplier != 1.0, num_warps=4)
    return out, scale


def quantize_v(v: torch.Tensor, block: int, mean: Optional[torch.Tensor] = None,
               scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triton version of `quantize_v_ref` (bit-exact)."""
    b, h, length, d = v.shape
    n = _cdiv(length, block)
    fp8 = scale is not None
    out = torch.empty(b, h, d, n * block, device=v.device, dtype=torch.float8_e4m3fn if fp8 else torch.float16)
    _quant_v_kernel[(n, b * h)](v, mean if fp8 else out, scale if fp8 else out, out, h, length, n * block,
                                *v.stride(), HEAD_DIM=d, BLOCK=block, FP8=fp8, SOFT_ROUND=interpreting(),
                                num_warps=4)
    return out


def quantize_qkv(q, k, v, block_q: int, block_k: int, pv: str, stats=None):
    """`quantize_qkv_ref` through the Triton kernels (bit-exact)."""
    k_mean, v_mean, v_scale = stats if stats is not None else kv_stats(k, v, pv)
    q8, qs = quantize_int8(q, block_q, multiplier=_q_multiplier(q.shape[-1]))
    k8, ks = quantize_int8(k, block_k, mean=k_mean)
    return q8, qs, k8, ks, quantize_v(v, block_k, v_mean, v_scale), v_scale, v_mean


# ------------------------------------------------------------------------------------------------------------
# 2. Attention: references
# ------------------------------------------------------------------------------------------------------------

def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lut: Optional[torch.Tensor] = None,
                  block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K, scale: Optional[float] = None,
                  chunk: Optional[int] = None) -> torch.Tensor:
    """Exact fp32 softmax attention, q [B, H, Lq, D] against k, v [B, H, L, D] -> fp32 [B, H, Lq, D].

    With `lut` [B, H, ceil(Lq/block_q), K_sel], query block i sees only the keys of key blocks lut[..., i, :]
    (softmax over those keys only). Queries are processed `chunk` rows at a time (default: a multiple of block_q
    keeping each fp32 score chunk near 1 GiB) so a Wan-size problem fits in memory; Lq may be a prefix of the
    queries (accuracy checks on a subset).
    """
    b, h, lq, d = q.shape
    length = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    kf, vf = k.float(), v.float()
    out = torch.empty(b, h, lq, d, device=q.device, dtype=torch.float32)
    if chunk is None:
        chunk = 2 ** 28 // (b * h * length)
    chunk = max(block_q, chunk // block_q * block_q)
    key_block = torch.arange(length, device=q.device) // block_k
    for start in range(0, lq, chunk):
        stop = min(start + chunk, lq)
        s = torch.matmul(q[:, :, start:stop].float(), kf.transpose(2, 3)) * scale  # [B, H, c, L]
        if lut is not None:
            rows = lut[:, :, torch.arange(start, stop, device=q.device) // block_q].long()  # [B, H, c, K_sel]
            allowed = torch.zeros(*rows.shape[:3], _cdiv(length, block_k), dtype=torch.bool, device=q.device)
            allowed.scatter_(-1, rows, True)
            s = s.masked_fill(~allowed[..., key_block], float("-inf"))  # [B, H, c, L]
        out[:, :, start:stop] = torch.matmul(torch.softmax(s, dim=-1), vf)
    return out


def sage_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, lut: Optional[torch.Tensor] = None,
                       block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K, pv: str = "fp8") -> torch.Tensor:
    """What the kernel computes, in PyTorch: the same quantization, dequantized, then exact fp32 softmax.

    Differs from the kernel only by accumulation order, the rounding of the smoothing means, and (FP8 PV) the
    e4m3 rounding of P. Returns q's dtype.
    """
    length = q.shape[2]
    q8, qs, k8, ks, vt, vs, vm = quantize_qkv_ref(q, k, v, block_q, block_k, pv)
    qd = (q8.float() * qs.repeat_interleave(block_q, dim=-1)[..., None])[:, :, :length]
    kd = (k8.float() * ks.repeat_interleave(block_k, dim=-1)[..., None])[:, :, :length]
    vd = vt.float().transpose(2, 3)[:, :, :length]
    if vs is not None:
        vd = vd * vs[:, :, None, :] + vm[:, :, None, :]
    # qd·kd are base-2 logits (sm_scale·log2 e is folded into Q), so the natural-log softmax scale is ln 2.
    return attention_ref(qd, kd, vd, lut, block_q, block_k, scale=math.log(2)).to(q.dtype)


# ------------------------------------------------------------------------------------------------------------
# 2. Attention: Triton
# ------------------------------------------------------------------------------------------------------------

@triton.jit
def _attend_block(acc, l_i, m_i, q, qk_scale, K8, KS, VT, kb, L, Lk_pad, offs_n, offs_d,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
                  FP8_PV: tl.constexpr, MAGIC: tl.constexpr, SOFT_ROUND: tl.constexpr):
    cols = kb * BLOCK_N + offs_n
    k = tl.load(K8 + cols[None, :] * HEAD_DIM + offs_d[:, None])  # [D, BLOCK_N], D contiguous (K-major)
    scale = qk_scale * tl.load(KS + kb)
    s = tl.dot(q, k)  # int32 [BLOCK_M, BLOCK_N]
    if MAGIC:
        # 0x4B400000 is the bit pattern of 1.5·2^23, a float whose ulp is 1: adding s to the bits gives exactly
        # the float 1.5·2^23 + s (|s| < 2^22); the offset x0 is removed inside the FMA below.
        x = (s + 0x4B400000).to(tl.float32, bitcast=True)
        x0 = 12582912.0
    else:
        x = s.to(tl.float32)
        x0 = 0.0
    if MASK:
        x = tl.where((cols < L)[None, :], x, float("-inf"))
    m_new = tl.maximum(m_i, (tl.max(x, 1) - x0) * scale)
    alpha = tl.math.exp2(m_i - m_new)
    # One FMA per score: (x - x0)·scale - m + offset = x·scale - (x0·scale + m - offset).
    if FP8_PV:  # P ∈ [0, 2^8.8 = 445.7]: the e4m3 range (max 448) with margin
        bias = x0 * scale + m_new - 8.8
    else:
        bias = x0 * scale + m_new
    p = tl.math.exp2(x * scale - bias[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(VT + offs_d[None, :] * Lk_pad + cols[:, None])  # [BLOCK_N, D] from V^T: tokens contiguous
    acc = acc * alpha[:, None]
    if FP8_PV:
        acc = tl.dot(_to_e4m3(p, SOFT_ROUND), v, acc)
    else:
        acc = tl.dot(p.to(tl.float16), v, acc)
    return acc, l_i, m_new


@triton.jit
def _sage_attn_kernel(Q8, QS, K8, KS, VT, VS, VM, LUT, Out,
                      stride_ob, stride_oh, stride_ol,
                      H, L, n_qblk, n_kblk, n_iter,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      SPARSE: tl.constexpr, TAIL: tl.constexpr, FP8_PV: tl.constexpr, MAGIC: tl.constexpr,
                      SOFT_ROUND: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    bh64 = bh.to(tl.int64)
    Lk_pad = n_kblk * BLOCK_N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q = tl.load(Q8 + bh64 * n_qblk * BLOCK_M * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
    qk_scale = tl.load(QS + bh * n_qblk + pid_m)
    K8 += bh64 * Lk_pad * HEAD_DIM
    KS += bh * n_kblk
    VT += bh64 * HEAD_DIM * Lk_pad
    LUT += (bh64 * n_qblk + pid_m) * n_iter

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # All iterations but the last are unmasked; the last one holds the tail key block if there is one
    # (dense: it is the last block; sparse: the LUT is sorted ascending).
    for it in range(0, n_iter - 1):
        if SPARSE:
            kb = tl.load(LUT + it)
        else:
            kb = it
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, qk_scale, K8, KS, VT, kb, L, Lk_pad, offs_n, offs_d,
                                      HEAD_DIM, BLOCK_N, False, FP8_PV, MAGIC, SOFT_ROUND)
    if SPARSE:
        kb = tl.load(LUT + n_iter - 1)
    else:
        kb = n_iter - 1
    acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, qk_scale, K8, KS, VT, kb, L, Lk_pad, offs_n, offs_d,
                                  HEAD_DIM, BLOCK_N, TAIL, FP8_PV, MAGIC, SOFT_ROUND)

    out = acc * (1.0 / l_i)[:, None]
    if FP8_PV:
        # Undo the V scale and add back the smooth-V mean (rows of the softmax sum to 1).
        out = out * tl.load(VS + bh * HEAD_DIM + offs_d)[None, :] + tl.load(VM + bh * HEAD_DIM + offs_d)[None, :]
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_ol + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m < L)[:, None])


# Launch settings per (block_q, block_k, head_dim, pv), measured on H100 at the Wan-1.3B shape, kernel only
# (benchmarks/bench_attention.py --sweep -> benchmarks/results/attention_sweep_h100_2026-11-22.json). The magic
# int->float trick helps where registers allow (64x128: 9.15 -> 8.80 ms) and makes 128x128 / 4 warps spill
# (8.47 -> 12.5 ms). Also measured and dropped: TMA descriptor loads of K / V^T (more registers: +2% at 64x128,
# spills at 128x128) and the bare ftz exp2 through inline PTX (+4% at 64x128, spills at 128x128).
# Anything missing (e.g. head dim 64): 4 warps, 3 stages, magic.
_CONFIGS = {
    (128, 128, 128, "fp8"): dict(num_warps=4, num_stages=3, magic=False),   # 8.47 ms dense; 1.03 ms at 10%
    (64, 128, 128, "fp8"): dict(num_warps=4, num_stages=3, magic=True),     # 8.80 ms dense; 1.04 ms at 10%
    (128, 64, 128, "fp8"): dict(num_warps=4, num_stages=3, magic=True),     # 9.42 ms dense
    (128, 128, 128, "fp16"): dict(num_warps=8, num_stages=3, magic=True),   # 12.1 ms dense
    (128, 64, 128, "fp16"): dict(num_warps=8, num_stages=3, magic=True),    # 13.3 ms dense
}


def _empty_output(q: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] output with q's memory layout: [B, L, H, D] storage when q is such a view, else contiguous."""
    b, h, length, d = q.shape
    if q.stride(1) < q.stride(2):
        return torch.empty(b, length, h, d, device=q.device, dtype=q.dtype).transpose(1, 2)
    return torch.empty(b, h, length, d, device=q.device, dtype=q.dtype)


def sage_attention_quantized(q8, qs, k8, ks, vt, vs, vm, out, lut, block_q: int, block_k: int, pv: str, *,
                             num_warps: Optional[int] = None, num_stages: Optional[int] = None,
                             magic: Optional[bool] = None):
    """Launch the attention kernel on already-quantized inputs (from `quantize_qkv`), writing `out` [B, H, L, D]
    (D contiguous); returns Triton's compiled-kernel handle (register/spill counts for the benchmark sweep).
    Separate from `sage_attention` so benchmarks can time the kernel alone and sweep launch settings."""
    b, h, length, d = out.shape
    n_qblk, n_kblk = _cdiv(length, block_q), _cdiv(length, block_k)
    cfg = _CONFIGS.get((block_q, block_k, d, pv), dict(num_warps=4, num_stages=3, magic=True))
    n_iter = lut.shape[-1] if lut is not None else n_kblk
    return _sage_attn_kernel[(n_qblk, b * h)](
        q8, qs, k8, ks, vt, vs if vs is not None else qs, vm if vm is not None else qs,
        lut if lut is not None else qs, out, out.stride(0), out.stride(1), out.stride(2),
        h, length, n_qblk, n_kblk, n_iter,
        HEAD_DIM=d, BLOCK_M=block_q, BLOCK_N=block_k, SPARSE=lut is not None, TAIL=length % block_k != 0,
        FP8_PV=pv == "fp8", MAGIC=cfg["magic"] if magic is None else magic, SOFT_ROUND=interpreting(),
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"])


@torch.library.custom_op("turbovid::sage_attention", mutates_args=())
def _sage_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lut: Optional[torch.Tensor],
                       block_q: int, block_k: int, pv: str) -> torch.Tensor:
    out = _empty_output(q)
    if use_triton(q, _MIN_CAPABILITY[pv]):
        quantized = quantize_qkv(q, k, v, block_q, block_k, pv)
        lut = lut.contiguous() if lut is not None else None
        sage_attention_quantized(*quantized, out, lut, block_q, block_k, pv)
        return out
    return out.copy_(sage_attention_ref(q, k, v, lut=lut, block_q=block_q, block_k=block_k, pv=pv))


@_sage_attention_op.register_fake
def _(q, k, v, lut, block_q, block_k, pv):
    return _empty_output(q)


def _check(q, k, v, lut, block_q, block_k, pv) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"sage_attention: q, k, v must be [B, H, L, D] of one shape (self-attention); "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"sage_attention: q, k, v must all be bf16 or all fp16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"sage_attention: q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    b, h, length, d = q.shape
    if d not in (64, 128) or min(b, h, length) < 1:
        raise ValueError(f"sage_attention: need head dim 64 or 128 and non-empty B, H, L; got shape {tuple(q.shape)}")
    if block_q not in (64, 128) or block_k not in (64, 128):
        raise ValueError(f"sage_attention: block_q and block_k must be 64 or 128; got {block_q}, {block_k}")
    if pv not in PV_MODES:
        raise ValueError(f"sage_attention: pv must be one of {PV_MODES}; got {pv!r}")
    if lut is not None:
        n_q, n_k = _cdiv(length, block_q), _cdiv(length, block_k)
        if (lut.dtype != torch.int32 or lut.dim() != 4 or tuple(lut.shape[:3]) != (b, h, n_q)
                or not 1 <= lut.shape[3] <= n_k or lut.device != q.device):
            raise ValueError(f"sage_attention: lut must be int32 [{b}, {h}, {n_q}, K_sel] with 1 <= K_sel <= {n_k} "
                             f"on {q.device}; got {lut.dtype} {tuple(lut.shape)} on {lut.device}")


def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, lut: Optional[torch.Tensor] = None,
                   block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K, pv: str = "fp8") -> torch.Tensor:
    """Quantized softmax attention (scale D^-0.5, non-causal). q, k, v: [B, H, L, D], any strides, bf16/fp16,
    D ∈ {64, 128}. `lut`: optional int32 [B, H, ceil(L/block_q), K_sel] of key-block indices (blocks of block_k
    tokens, each < ceil(L/block_k)), sorted ascending, no duplicates: query block i attends to exactly those
    K_sel blocks (not checked on the device: that would need a host sync).
    `pv`: "fp8" (sm89/sm90+) or "fp16" (any sm80+). Returns [B, H, L, D] in q's dtype and memory layout.
    Runs the Triton kernels on supported GPUs (and under TRITON_INTERPRET=1), else `sage_attention_ref`."""
    _check(q, k, v, lut, block_q, block_k, pv)
    return torch.ops.turbovid.sage_attention(q, k, v, lut, block_q, block_k, pv)
