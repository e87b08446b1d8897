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

3. SageSLA (`sagesla_forward`): the whole SLA module (block map, linear branch, proj_l) around this kernel, fused
   into six launches; see the section 3 comment below for the data flow.
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


def quantize_qkv_ref(q, k, v, block_q: int, block_k: int, pv: str, stats=None, q_multiplier: float | None = None):
    """(q8, q_scale, k8, k_scale, V^T, v_scale, v_mean); `stats` = (k_mean, v_mean, v_scale), default kv_stats;
    Q is scaled by `q_multiplier` first (default the kernel's sm_scale·log2(e))."""
    k_mean, v_mean, v_scale = stats if stats is not None else kv_stats(k, v, pv)
    multiplier = _q_multiplier(q.shape[-1]) if q_multiplier is None else q_multiplier
    q8, qs = quantize_int8_ref(q, block_q, multiplier=multiplier)
    k8, ks = quantize_int8_ref(k, block_k, mean=k_mean)
    return q8, qs, k8, ks, quantize_v_ref(v, block_k, v_mean, v_scale), v_scale, v_mean


def dequantize_qkv_ref(quantized, length: int, block_q: int, block_k: int):
    """`quantize_qkv_ref`'s output -> the fp32 q, k, v [B, H, L, D] the kernel multiplies: Q as scaled before
    quantization, K minus its smoothing mean, V with smooth-V undone (FP8) or as given (FP16)."""
    q8, qs, k8, ks, vt, vs, vm = quantized
    qd = (q8.float() * qs.repeat_interleave(block_q, dim=-1)[..., None])[:, :, :length]
    kd = (k8.float() * ks.repeat_interleave(block_k, dim=-1)[..., None])[:, :, :length]
    vd = vt.float().transpose(2, 3)[:, :, :length]
    if vs is not None:
        vd = vd * vs[:, :, None, :] + vm[:, :, None, :]
    return qd, kd, vd


def fake_quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int, block_k: int):
    """The q, k, v that the FP8-PV kernel multiplies, dequantized, in the inputs' units ([B, H, L, D] fp32 each):
    Q through its per-block INT8 (unscaled), K through smooth-K and INT8 (the mean added back, which changes no
    softmax), V through smooth-V and per-channel e4m3. For quantization-aware training (attention/sla.py); the
    kernel's e4m3 rounding of P is not modelled (it happens inside the fused softmax)."""
    stats = kv_stats(k, v, "fp8")
    quantized = quantize_qkv_ref(q, k, v, block_q, block_k, "fp8", stats, q_multiplier=1.0)
    qd, kd, vd = dequantize_qkv_ref(quantized, q.shape[2], block_q, block_k)
    return qd, kd + stats[0][:, :, None, :], vd


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
def _round(x, dt: tl.constexpr, SOFT_ROUND: tl.constexpr):
    """fp32 -> dt, round to nearest even. SOFT_ROUND (interpreter only): the interpreter truncates fp32 -> bf16
    casts, so round the bits by hand first (the GPU cast is RNE)."""
    if SOFT_ROUND:
        if dt == tl.bfloat16:
            bits = x.to(tl.int32, bitcast=True)
            x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return x.to(dt)


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
    qd, kd, vd = dequantize_qkv_ref(quantize_qkv_ref(q, k, v, block_q, block_k, pv), q.shape[2], block_q, block_k)
    # qd·kd are base-2 logits (sm_scale·log2 e is folded into Q), so the natural-log softmax scale is ln 2.
    return attention_ref(qd, kd, vd, lut, block_q, block_k, scale=math.log(2)).to(q.dtype)


# ------------------------------------------------------------------------------------------------------------
# 2. Attention: Triton
# ------------------------------------------------------------------------------------------------------------

@triton.jit
def _attend_block(acc, l_i, m_i, q, qk_scale, K8, KS, VT, kb, L, Lk_pad, offs_n, offs_d,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
                  FP8_PV: tl.constexpr, MAGIC: tl.constexpr, SOFT_ROUND: tl.constexpr, PROMOTE: tl.constexpr):
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
    if FP8_PV and PROMOTE:
        # Two-level accumulation: this block's BLOCK_N-key product in a fresh accumulator, then a true fp32 add.
        acc = tl.dot(_to_e4m3(p, SOFT_ROUND), v, acc, max_num_imprecise_acc=BLOCK_N)
    elif FP8_PV:
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
                      SOFT_ROUND: tl.constexpr, ADD_OUT: tl.constexpr = False, PROMOTE: tl.constexpr = False):
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
                                      HEAD_DIM, BLOCK_N, False, FP8_PV, MAGIC, SOFT_ROUND, PROMOTE)
    if SPARSE:
        kb = tl.load(LUT + n_iter - 1)
    else:
        kb = n_iter - 1
    acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, qk_scale, K8, KS, VT, kb, L, Lk_pad, offs_n, offs_d,
                                  HEAD_DIM, BLOCK_N, TAIL, FP8_PV, MAGIC, SOFT_ROUND, PROMOTE)

    out = acc * (1.0 / l_i)[:, None]
    if FP8_PV:
        # Undo the V scale and add back the smooth-V mean (rows of the softmax sum to 1).
        out = out * tl.load(VS + bh * HEAD_DIM + offs_d)[None, :] + tl.load(VM + bh * HEAD_DIM + offs_d)[None, :]
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_ol + offs_d[None, :]
    if ADD_OUT:
        # SageSLA: Out already holds proj_l(O_l) (written by the prep pass); O = round(round(O_s) + proj_l(O_l)),
        # the two roundings TurboDiffusion's bf16 `o_s + proj_l(o_l)` makes.
        prev = tl.load(o_ptrs, mask=(offs_m < L)[:, None], other=0.0).to(tl.float32)
        out = _round(_round(out, Out.dtype.element_ty, SOFT_ROUND).to(tl.float32) + prev, Out.dtype.element_ty,
                     SOFT_ROUND)
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


# FP8 P·V accumulation. Hopper's FP8 MMA keeps fewer bits than fp32 in its accumulator (Triton's default on sm90
# leaves the whole key loop in it); `promote` adds each key block's product into a true fp32 accumulator instead
# (SageAttention2's "fp32+fp32", Triton's max_num_imprecise_acc = BLOCK_N). Off by default: on the H100
# (benchmarks/results/attention_h100_2026-11-24.json, 1.3B shape) it costs 8.32 -> 11.22 ms dense and 1.06 -> 1.12 ms
# at 10% for an unchanged error (rel-L1 0.00708 dense, 0.01316 sparse), and on the mini model's SageSLA calls it
# moves rel-L1 against exact SLA from 0.0074 to 0.0065 without changing the full stack's grade (229 against 231 of
# 256; docs/training/mini/session29_checks/). `promote=None` in the launcher: this default.
FP8_PV_PROMOTE = False


def _empty_output(q: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] output with q's memory layout: [B, L, H, D] storage when q is such a view, else contiguous."""
    b, h, length, d = q.shape
    if q.stride(1) < q.stride(2):
        return torch.empty(b, length, h, d, device=q.device, dtype=q.dtype).transpose(1, 2)
    return torch.empty(b, h, length, d, device=q.device, dtype=q.dtype)


def sage_attention_quantized(q8, qs, k8, ks, vt, vs, vm, out, lut, block_q: int, block_k: int, pv: str, *,
                             num_warps: Optional[int] = None, num_stages: Optional[int] = None,
                             magic: Optional[bool] = None, add_out: bool = False, promote: Optional[bool] = None):
    """Launch the attention kernel on already-quantized inputs (from `quantize_qkv`), writing `out` [B, H, L, D]
    (D contiguous); returns Triton's compiled-kernel handle (register/spill counts for the benchmark sweep).
    Separate from `sage_attention` so benchmarks can time the kernel alone and sweep launch settings.
    `add_out`: add the attention output to what `out` holds (rounding each to out's dtype first; SageSLA)."""
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
        ADD_OUT=add_out, PROMOTE=FP8_PV_PROMOTE if promote is None else promote,
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


# ------------------------------------------------------------------------------------------------------------
# 3. SageSLA: the whole SLA module around this kernel, fused into six launches
# ------------------------------------------------------------------------------------------------------------
#
# O = O_s + proj_l(O_l) (SPEC §6; kernels/sla.py holds the bf16 SLA kernels and the references). At 10% of the
# key blocks the sparse kernel is short, so every extra pass over q, k, v or the output is a visible share of
# the module's time. Data flow (KERNELS §7.2 K3-K5):
#   A. statistics pass over k, v; grid (b·h, token splits), fp32 partials: Σk, Σv, min v, max v per channel,
#      and the linear-branch statistics φ(k)ᵀv [D, D] and Σφ(k) (φ = softmax over the head dim);
#   F. finalize; grid (b·h, row slices of S): adds the partials -> smooth-K mean, smooth-V mean, FP8 V scale,
#      and S = φ(k)ᵀv, z = Σφ(k) rounded to the input dtype (where TurboDiffusion's bf16 ops round);
#   B. prep pass over q, k, v; one program per query block, key block or value block:
#      query block -> INT8 Q + scale, pooled q, and the whole linear branch proj_l(φ(q)S / (1e-5 + φ(q)·z))
#                     written into the output buffer (two D×D products per block: free in a memory-bound pass);
#      key block   -> INT8 (k - mean) + scale, pooled smoothed k;  value block -> FP8 (v - mean)/scale, V^T;
#   C. block map: pooled scores q̄·k̄ᵀ (the torch matmul the reference makes, so both rank the same numbers) and
#      the radix top-k kernel of kernels/sla.py (LUT sorted ascending, as the tail handling needs);
#   D. the sparse kernel of section 2, whose epilogue adds O_s to the linear branch already in the output.
# HBM traffic: k, v read twice, q once, the 8-bit copies written and read once, the output written, re-read and
# written (the linear branch goes through it). The means are only centres (any constant vector keeps attention
# exact, see 1.), but the FP8 V scale needs the true per-channel range — that reduction is why pass A exists,
# and A carries the linear statistics so that B can finish the linear branch.
# Measured on H100 at the Wan2.1-1.3B shape, top-k 0.1 (CUDA graphs): A+F 0.19 ms, B 0.48, C 0.02, D 1.04; the
# whole module 1.74 ms (eager 1.92). B is far from its memory floor (~0.2 ms for its bytes): its query programs
# run the linear branch (two D×D products on 64-row tiles, S and W sliced from L2) with 2 programs per SM.

from turbovid.kernels import sla as _sla  # noqa: E402  (kernels/sla.py imports nothing from this file)
from turbovid.kernels.sla import _dot as _sla_dot  # noqa: E402  (jit helpers shared with the bf16 SLA kernels)
from turbovid.kernels.sla import _linear_branch as _sla_linear_branch  # noqa: E402
from turbovid.kernels.sla import _rnd as _sla_rnd  # noqa: E402


@triton.jit
def _sagesla_stats_kernel(K, V, PART, PART_S, skb, skh, skl, svb, svh, svl, H, L, PER_SPLIT, SPLIT,
                          D: tl.constexpr, BLOCK: tl.constexpr, PREC: tl.constexpr):
    # Program (b·h, split) sums tokens [split·PER_SPLIT, +PER_SPLIT): PART[bh, split] = (Σk, Σv, min v, max v,
    # Σφ(k)) [5, D] and PART_S[bh, split] = φ(k)ᵀv [D, D], all fp32.
    # The loop body has no reduction over tokens: those would cost a cross-warp exchange and barrier per tile in
    # a kernel whose [D, D] accumulator leaves room for one program per SM. Token sums come from the tensor cores
    # (xᵀ·1 with a [BLOCK, 16] block of ones: 16 equal columns), min/max are kept per element and reduced once.
    bh, split = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_d, offs_t = tl.arange(0, D), tl.arange(0, BLOCK)
    k_base, v_base = K + b * skb + h * skh, V + b * svb + h * svh
    ones = tl.full([BLOCK, 16], 1.0, K.dtype.element_ty)
    acc = tl.zeros([D, D], tl.float32)
    kacc = tl.zeros([D, 16], tl.float32)
    vacc = tl.zeros([D, 16], tl.float32)
    zacc = tl.zeros([D, 16], tl.float32)
    vmin = tl.full([BLOCK, D], float("inf"), tl.float32)
    vmax = tl.full([BLOCK, D], float("-inf"), tl.float32)
    start = split * PER_SPLIT
    end = tl.minimum(start + PER_SPLIT, L)
    for t0 in range(start, end, BLOCK):
        rows = t0 + offs_t
        valid = (rows < end)[:, None]
        k = tl.load(k_base + rows[:, None].to(tl.int64) * skl + offs_d[None, :], mask=valid, other=0.0)
        v = tl.load(v_base + rows[:, None].to(tl.int64) * svl + offs_d[None, :], mask=valid, other=0.0)
        # φ(k) in fp32, rounded to the input dtype as torch's bf16 softmax does; padded rows -> 0.
        x = k.to(tl.float32)
        e = tl.exp(x - tl.max(x, 1)[:, None])
        phi_t = tl.trans(_sla_rnd(tl.where(valid, e / tl.sum(e, 1)[:, None], 0.0), k.dtype, PREC))
        acc = _sla_dot(phi_t, v, acc, PREC)
        zacc = _sla_dot(phi_t, ones, zacc, PREC)
        kacc = _sla_dot(tl.trans(k), ones, kacc, PREC)
        vacc = _sla_dot(tl.trans(v), ones, vacc, PREC)
        vf = v.to(tl.float32)
        vmin = tl.minimum(vmin, tl.where(valid, vf, float("inf")))
        vmax = tl.maximum(vmax, tl.where(valid, vf, float("-inf")))
    part = (bh * SPLIT + split).to(tl.int64)
    tl.store(PART + (part * 5 + 0) * D + offs_d, tl.max(kacc, 1))
    tl.store(PART + (part * 5 + 1) * D + offs_d, tl.max(vacc, 1))
    tl.store(PART + (part * 5 + 2) * D + offs_d, tl.min(vmin, 0))
    tl.store(PART + (part * 5 + 3) * D + offs_d, tl.max(vmax, 0))
    tl.store(PART + (part * 5 + 4) * D + offs_d, tl.max(zacc, 1))
    tl.store(PART_S + part * D * D + offs_d[:, None] * D + offs_d[None, :], acc)


@triton.jit
def _sagesla_finalize_kernel(PART, PART_S, VEC, VEC_LP, S_LP, L, SPLIT, BH,
                             D: tl.constexpr, R: tl.constexpr, CH: tl.constexpr, PREC: tl.constexpr):
    # Program (b·h, slice of R rows of S) adds the SPLIT partials. Outputs: VEC [3, BH, D] fp32 = (k mean, v mean,
    # FP8 v scale), VEC_LP [2, BH, D] = (k mean, z) and S_LP [BH, D, D] in the input dtype.
    bh, r = tl.program_id(0), tl.program_id(1)
    bh64 = bh.to(tl.int64)
    offs_d, offs_r = tl.arange(0, D), r * R + tl.arange(0, R)
    # CH partials per step: independent loads in flight instead of one latency per partial.
    dt = S_LP.dtype.element_ty
    offs_c = tl.arange(0, CH)
    s = tl.zeros([R, D], tl.float32)
    for sp in range(0, SPLIT, CH):
        parts = sp + offs_c
        ptrs = PART_S + ((bh64 * SPLIT + parts[:, None, None]) * D + offs_r[None, :, None]) * D + offs_d[None, None, :]
        s += tl.sum(tl.load(ptrs, mask=(parts < SPLIT)[:, None, None], other=0.0), 0)
    tl.store(S_LP + (bh64 * D + offs_r[:, None]) * D + offs_d[None, :], _sla_rnd(s, dt, PREC))
    if r == 0:
        ksum = tl.zeros([D], tl.float32)
        vsum = tl.zeros([D], tl.float32)
        zsum = tl.zeros([D], tl.float32)
        vmin = tl.full([D], float("inf"), tl.float32)
        vmax = tl.full([D], float("-inf"), tl.float32)
        for sp in range(0, SPLIT, CH):
            parts = sp + offs_c
            ok = (parts < SPLIT)[:, None]
            base = PART + (bh64 * SPLIT + parts[:, None]) * 5 * D + offs_d[None, :]
            ksum += tl.sum(tl.load(base, mask=ok, other=0.0), 0)
            vsum += tl.sum(tl.load(base + D, mask=ok, other=0.0), 0)
            vmin = tl.minimum(vmin, tl.min(tl.load(base + 2 * D, mask=ok, other=float("inf")), 0))
            vmax = tl.maximum(vmax, tl.max(tl.load(base + 3 * D, mask=ok, other=float("-inf")), 0))
            zsum += tl.sum(tl.load(base + 4 * D, mask=ok, other=0.0), 0)
        n = tl.zeros([D], tl.float32) + L  # (not L.to(): Triton passes L == 1 as a constexpr)
        kmean = tl.math.div_rn(ksum, n)
        vmean = tl.math.div_rn(vsum, n)
        # As `kv_stats`: amax |v - mean| / 448, floored so a constant channel stays finite.
        vscale = tl.math.div_rn(tl.maximum(tl.maximum(vmax - vmean, vmean - vmin), 1e-6), 448.0)
        tl.store(VEC + bh64 * D + offs_d, kmean)
        tl.store(VEC + (BH + bh64) * D + offs_d, vmean)
        tl.store(VEC + (2 * BH + bh64) * D + offs_d, vscale)
        tl.store(VEC_LP + bh64 * D + offs_d, _sla_rnd(kmean, dt, PREC))
        tl.store(VEC_LP + (BH + bh64) * D + offs_d, _sla_rnd(zsum, dt, PREC))


@triton.jit
def _sagesla_prep_kernel(Q, K, V, VEC, VEC_LP, S_LP, W, Bias, Q8, QS, K8, KS, VT, QP, KP, O,
                         sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
                         H, L, M, N, BH, multiplier,
                         D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                         SOFT_ROUND: tl.constexpr, PREC: tl.constexpr):
    # Program (j, b·h): j < M query block j; M <= j < M + N key block j - M; else value block j - M - N.
    # Quantization is bit-identical to `_quant_int8_kernel` / `_quant_v_kernel`, pooling to `_sla_pool_kernel`.
    # (Each branch has its own names: Triton merges variables assigned in both arms of an `if`.)
    j, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    bh64 = bh.to(tl.int64)
    offs_d = tl.arange(0, D)
    if j < M:
        q_rows = j * BQ + tl.arange(0, BQ)
        q_valid = (q_rows < L)[:, None]
        q = tl.load(Q + b * sqb + h * sqh + q_rows[:, None].to(tl.int64) * sql + offs_d[None, :], mask=q_valid,
                    other=0.0)
        qf = q.to(tl.float32)
        q_count = tl.minimum(L - j * BQ, BQ).to(tl.float32)  # true token count of the (last) block
        tl.store(QP + (bh64 * M + j) * D + offs_d,
                 _sla_rnd(tl.math.div_rn(tl.sum(qf, 0), q_count), QP.dtype.element_ty, PREC))
        qf = qf * multiplier  # sm_scale·log2(e): base-2 logits
        q_scale = tl.math.div_rn(tl.max(tl.max(tl.abs(qf), axis=1), axis=0), 127.0) + 1e-7
        qy = tl.math.div_rn(qf, q_scale)
        tl.store(Q8 + (bh64 * M * BQ + q_rows[:, None]) * D + offs_d[None, :],
                 tl.where(qy >= 0, qy + 0.5, qy - 0.5).to(tl.int8))  # padded rows are 0
        tl.store(QS + bh64 * M + j, q_scale)
        o_l = _sla_linear_branch(q, S_LP + bh64 * D * D, VEC_LP + (BH + bh64) * D, W, Bias, D, PREC)
        tl.store(O + b * sob + h * soh + q_rows[:, None].to(tl.int64) * sol + offs_d[None, :], o_l, mask=q_valid)
    elif j < M + N:
        jk = j - M
        k_rows = jk * BK + tl.arange(0, BK)
        k_valid = (k_rows < L)[:, None]
        k = tl.load(K + b * skb + h * skh + k_rows[:, None].to(tl.int64) * skl + offs_d[None, :], mask=k_valid,
                    other=0.0)
        kf = k.to(tl.float32)
        k_mu = tl.load(VEC + bh64 * D + offs_d)
        kc = tl.where(k_valid, kf - k_mu[None, :], 0.0)
        k_scale = tl.math.div_rn(tl.max(tl.max(tl.abs(kc), axis=1), axis=0), 127.0) + 1e-7
        ky = tl.math.div_rn(kc, k_scale)
        tl.store(K8 + (bh64 * N * BK + k_rows[:, None]) * D + offs_d[None, :],
                 tl.where(ky >= 0, ky + 0.5, ky - 0.5).to(tl.int8))
        tl.store(KS + bh64 * N + jk, k_scale)
        # Block map input: k smoothed in the input dtype (k - mean, rounded), pooled in fp32.
        k_mu_lp = tl.load(VEC_LP + bh64 * D + offs_d).to(tl.float32)
        ks = tl.where(k_valid, _sla_rnd(kf - k_mu_lp[None, :], k.dtype, PREC).to(tl.float32), 0.0)
        k_count = tl.minimum(L - jk * BK, BK).to(tl.float32)
        tl.store(KP + (bh64 * N + jk) * D + offs_d,
                 _sla_rnd(tl.math.div_rn(tl.sum(ks, 0), k_count), KP.dtype.element_ty, PREC))
    else:
        jv = j - M - N
        v_rows = jv * BK + tl.arange(0, BK)
        v_valid = (v_rows < L)[:, None]
        v = tl.load(V + b * svb + h * svh + v_rows[:, None].to(tl.int64) * svl + offs_d[None, :], mask=v_valid,
                    other=0.0)
        v_mu = tl.load(VEC + (BH + bh64) * D + offs_d)
        v_sc = tl.load(VEC + (2 * BH + bh64) * D + offs_d)
        vc = tl.where(v_valid, v.to(tl.float32) - v_mu[None, :], 0.0)
        v8 = _to_e4m3(tl.math.div_rn(vc, v_sc[None, :]), SOFT_ROUND)
        # Transposed store: V^T[bh, d, l], tokens contiguous.
        tl.store(VT + bh64 * D * N * BK + offs_d[None, :] * (N * BK) + v_rows[:, None], v8)


# Launch settings of passes A and B (benchmarks/bench_sla.py --sweep times the alternatives). Pass A: `tokens`
# per program (a multiple of `block`). Each program holds a [D, D] fp32 accumulator (64 registers per thread at
# 8 warps), so only a few fit per SM: many short programs keep the scheduler busy without a half-empty last
# wave, at the price of more [D, D] partials to write and add up (64 KB per program).
# H100 (benchmarks/results/sla_h100_2026-11-22.json, 1.3B shape, A+F): block 32 / 3 stages / 1024 tokens 0.189 ms;
# 512 tokens 0.259, block 64 0.208, 4 stages 0.217. Pass B at 4 warps spills (ptxas, Triton 3.6).
SAGESLA_STATS = dict(block=32, num_warps=8, num_stages=3, tokens=1024)
SAGESLA_PREP = dict(num_warps=8)


def sagesla_stats(k: torch.Tensor, v: torch.Tensor):
    """Passes A + F: (vec [3, B·H, D] fp32 = (k mean, v mean, FP8 v scale), vec_lp [2, B·H, D] = (k mean, z),
    S [B·H, D, D]), the last two in k's dtype. k, v: [B, H, L, D] views with unit stride along D."""
    B, H, L, D = k.shape
    bh = B * H
    cfg = SAGESLA_STATS
    prec = "interp" if interpreting() and not k.is_cuda else "tf32"
    per_split = _cdiv(cfg["tokens"], cfg["block"]) * cfg["block"]
    split = _cdiv(L, per_split)  # every split holds at least one token
    part = torch.empty(bh, split, 5, D, device=k.device, dtype=torch.float32)
    part_s = torch.empty(bh, split, D, D, device=k.device, dtype=torch.float32)
    _sagesla_stats_kernel[(bh, split)](k, v, part, part_s, *k.stride()[:3], *v.stride()[:3], H, L, per_split, split,
                                       D=D, BLOCK=cfg["block"], PREC=prec, num_warps=cfg["num_warps"],
                                       num_stages=cfg["num_stages"])
    vec = torch.empty(3, bh, D, device=k.device, dtype=torch.float32)
    vec_lp = torch.empty(2, bh, D, device=k.device, dtype=k.dtype)
    s = torch.empty(bh, D, D, device=k.device, dtype=k.dtype)
    rows = 8  # rows of S per finalize program: B·H·D/8 programs
    _sagesla_finalize_kernel[(bh, D // rows)](part, part_s, vec, vec_lp, s, L, split, bh, D=D, R=rows, CH=8,
                                              PREC=prec, num_warps=4)
    return vec, vec_lp, s


def sagesla_prep(q, k, v, stats, weight, bias, block_q: int, block_k: int):
    """Pass B. Returns ((q8, q_scale, k8, k_scale, V^T, v_scale, v_mean) as `quantize_qkv`, pooled q [B, H, M, D],
    pooled smoothed k [B, H, N, D], out [B, L, H, D] holding proj_l(O_l))."""
    B, H, L, D = q.shape
    bh, M, N = B * H, _cdiv(L, block_q), _cdiv(L, block_k)
    vec, vec_lp, s = stats
    dev, dt = q.device, q.dtype
    q8 = torch.empty(B, H, M * block_q, D, device=dev, dtype=torch.int8)
    qs = torch.empty(B, H, M, device=dev, dtype=torch.float32)
    k8 = torch.empty(B, H, N * block_k, D, device=dev, dtype=torch.int8)
    ks = torch.empty(B, H, N, device=dev, dtype=torch.float32)
    vt = torch.empty(B, H, D, N * block_k, device=dev, dtype=torch.float8_e4m3fn)
    qp = torch.empty(B, H, M, D, device=dev, dtype=dt)
    kp = torch.empty(B, H, N, D, device=dev, dtype=dt)
    out = torch.empty(B, L, H, D, device=dev, dtype=dt)
    o = out.transpose(1, 2)  # [B, H, L, D] view
    _sagesla_prep_kernel[(M + 2 * N, bh)](
        q, k, v, vec, vec_lp, s, weight.to(dt).contiguous(), bias.to(dt).contiguous(), q8, qs, k8, ks, vt, qp, kp,
        o, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], H, L, M, N, bh, _q_multiplier(D),
        D=D, BQ=block_q, BK=block_k, SOFT_ROUND=interpreting(),
        PREC="interp" if interpreting() and not q.is_cuda else "tf32", num_warps=SAGESLA_PREP["num_warps"])
    v_scale, v_mean = vec[2].view(B, H, D), vec[1].view(B, H, D)
    return (q8, qs, k8, ks, vt, v_scale, v_mean), qp, kp, out


def _sagesla_fused(q, k, v, weight, bias, topk: float, block_q: int, block_k: int) -> torch.Tensor:
    stats = sagesla_stats(k, v)                                                       # A + F
    quantized, qp, kp, out = sagesla_prep(q, k, v, stats, weight, bias, block_q, block_k)  # B
    scores = torch.matmul(qp, kp.transpose(-1, -2))                                   # C: [B, H, M, N]
    lut = _sla.topk_lut(scores, _sla.sla_topk_count(topk, kp.shape[2]))
    sage_attention_quantized(*quantized, out.transpose(1, 2), lut, block_q, block_k, "fp8", add_out=True)  # D
    return out


def sagesla_forward_ref(q, k, v, weight, bias, topk: float, block_q: int, block_k: int, pv: str = "fp8"):
    """What `sagesla_forward` computes, composed from the references: O [B, L, H, D] in q's dtype."""
    lut = _sla.sla_block_map_ref(q, k, topk, block_q, block_k)
    o_s = sage_attention_ref(q, k, v, lut=lut, block_q=block_q, block_k=block_k, pv=pv)
    s, z = _sla.sla_linear_stats_ref(k, v)
    return _sla.sla_linear_apply_ref(q, o_s, s, z, weight, bias)


@torch.library.custom_op("turbovid::sagesla_forward", mutates_args=())
def _sagesla_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                topk: float, block_q: int, block_k: int) -> torch.Tensor:
    if use_triton(q, _MIN_CAPABILITY["fp8"]):
        return _sagesla_fused(q, k, v, weight, bias, topk, block_q, block_k)
    if use_triton(q):  # sm80/86: Triton SLA parts around the FP16-PV sparse kernel (TurboDiffusion's Ampere path)
        def sparse(q_, k_, v_, lut):
            return sage_attention(q_, k_, v_, lut=lut, block_q=block_q, block_k=block_k, pv="fp16")
        return _sla.sla_forward(q, k, v, topk, block_q, block_k, weight, bias, sparse).contiguous()
    return sagesla_forward_ref(q, k, v, weight, bias, topk, block_q, block_k)


@_sagesla_op.register_fake
def _(q, k, v, weight, bias, topk, block_q, block_k):
    b, h, length, d = q.shape
    return q.new_empty(b, length, h, d)


def sagesla_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    topk: float, block_q: int, block_k: int) -> torch.Tensor:
    """SageSLA inference (no autograd): q, k, v [B, H, L, D] (any strides, unit stride along D), bf16/fp16,
    D ∈ {64, 128}; proj_l `weight` [D, D], `bias` [D]. Returns O = O_s + proj_l(O_l) as [B, L, H, D] contiguous,
    O_s the INT8/FP8 sparse attention over the SLA block map with top-k ratio `topk` (blocks block_q × block_k)."""
    _check(q, k, v, None, block_q, block_k, "fp8")
    d = q.shape[-1]
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("sagesla_forward: q, k, v need unit stride along the head dim")
    if tuple(weight.shape) != (d, d) or tuple(bias.shape) != (d,):
        raise ValueError(f"sagesla_forward: proj_l weight must be [{d}, {d}] and bias [{d}]; got "
                         f"{tuple(weight.shape)}, {tuple(bias.shape)}")
    if not 0.0 < topk <= 1.0:
        raise ValueError(f"sagesla_forward: topk must be in (0, 1], got {topk}")
    return torch.ops.turbovid.sagesla_forward(q, k, v, weight, bias, float(topk), block_q, block_k)
