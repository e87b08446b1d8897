"""Fused LayerNorm / RMSNorm + AdaLN modulation (+ per-token INT8 emit) — KERNELS §7.2 K1.

Algorithm, per token row x ∈ R^D (a program walks ROWS·ITERS rows of one sample, ROWS whole rows at a
time in registers, padded to the next power of two and masked):
  1. fp32 statistics over the D real lanes only. LayerNorm: μ = Σx/D, σ² = Σ(x−μ)²/D with the padded
     lanes forced to 0 in (x−μ) — TurboDiffusion's kernel lets them contribute μ² each and so
     overestimates σ² whenever D is not a power of two (1536, 5120). RMSNorm: ms = Σx²/D.
  2. z = (x−μ)·rsqrt(σ²+eps) (LN) or x·rsqrt(ms+eps) (RMS); optional affine z·γ (+β) in fp32.
  3. Optional AdaLN modulation with per-sample fp32 vectors (row r belongs to sample r // L):
     y = z·(1+scale[b]) + shift[b]. By default z is first rounded to the output dtype, which is
     what the DiT's PyTorch code does (SPEC §1.3 7b: LN in fp32 → bf16, then bf16(fp32(z)·(1+m1)+m0));
     `round_norm=False` skips that intermediate rounding (one rounding, slightly more accurate).
  4. Write y in x's dtype, and/or emit INT8 for the fast W8A8 GEMM: per-token scale s = amax/127 of the
     output-dtype-rounded y, q = round_half_even(y·127/amax). The emitted (q, s) therefore equal
     `quant_per_token_ref(y)` exactly, so fusing changes nothing downstream.

Error budget vs `norm_modulate_ref` (same formula in PyTorch): only the fp32 reduction order and the
GPU's rsqrt differ, so outputs agree to ≤ 1 ulp of the output dtype (a handful of elements per
thousand flip on a rounding boundary); the INT8 emit agrees exactly given the same y.

Cost: one read of x (2 B/elt) and one write (2 B for y, 1 B + 4 B/row for the INT8 emit); the
per-channel vectors are read once per program (ROWS·ITERS rows).
Measured (H100, CUDA-graph timing, benchmarks/results/norm_h100_*.json), fraction of copy bandwidth:
LN+modulation 0.83 (D=1536) / 0.76 (D=5120); affine LN 0.88 / 0.86; the INT8 emit takes about as
long as the bf16 variant (0.10 / 0.84 ms) although it writes half the bytes — it is instruction-bound
(second row reduction, conversions), not bandwidth-bound. 12× faster than the PyTorch ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from turbovid.kernels import autotune
from turbovid.kernels.int8_gemm import _rne_bf16, quant_per_token_ref


def _broadcast_mod(v: torch.Tensor, B: int, D: int) -> torch.Tensor:
    # Accept [B, D] or the DiT's [B, 1, D]; return [B, D] fp32.
    v = v.reshape(v.shape[0], -1) if v.dim() == 3 else v
    if v.shape != (B, D):
        raise ValueError(f"modulation vectors must be [B, D] = [{B}, {D}] (or [B, 1, D]), got {tuple(v.shape)}")
    return v.float()


def norm_modulate_ref(x: torch.Tensor, kind: str = "layer", weight: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                      scale: torch.Tensor | None = None, eps: float = 1e-6, round_norm: bool = True) -> torch.Tensor:
    """PyTorch reference with the DiT's numerics. x [B, L, D]; shift/scale [B, D] fp32 -> [B, L, D] x.dtype."""
    B, L, D = x.shape
    xf = x.float()
    if kind == "layer":
        z = F.layer_norm(xf, (D,), weight.float() if weight is not None else None,
                         bias.float() if bias is not None else None, eps)
    elif kind == "rms":
        z = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        if weight is not None:
            z = z * weight.float()
    else:
        raise ValueError(f"kind must be 'layer' or 'rms', got {kind!r}")
    if shift is None and scale is None:
        return z.to(x.dtype)
    if round_norm:
        z = z.to(x.dtype).float()
    shift = _broadcast_mod(shift, B, D) if shift is not None else torch.zeros(B, D, device=x.device)
    scale = _broadcast_mod(scale, B, D) if scale is not None else torch.zeros(B, D, device=x.device)
    return (z * (1 + scale[:, None, :]) + shift[:, None, :]).to(x.dtype)


def norm_modulate_quant_ref(x: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of the INT8 emit: per-token quantization of norm_modulate_ref -> (q [B·L, D] int8, s [B·L])."""
    y = norm_modulate_ref(x, *args, **kwargs)
    return quant_per_token_ref(y.reshape(-1, y.shape[-1]))


@triton.jit
def _round_to(v, dtype: tl.constexpr):
    # Round fp32 v to `dtype`, returned as fp32.
    if dtype == tl.bfloat16:
        v = _rne_bf16(v)
    elif dtype == tl.float16:
        v = v.to(tl.float16).to(tl.float32)
    return v


@triton.jit
def _norm_modulate_kernel(x_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, y_ptr, q_ptr, s_ptr,
                          L, D, eps,
                          RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                          MODULATE: tl.constexpr, ROUND_NORM: tl.constexpr,
                          WRITE_Y: tl.constexpr, WRITE_Q: tl.constexpr,
                          ROWS: tl.constexpr, ITERS: tl.constexpr, BLOCK_D: tl.constexpr):
    # A program owns ROWS·ITERS consecutive rows of ONE sample, so the per-channel vectors (affine
    # weights, 1+scale, shift) are loaded once into registers and reused for every row: re-reading
    # 2·D fp32 modulation values per row would move 4× more bytes (L1/L2) than the bf16 row itself.
    chunks = tl.cdiv(L, ROWS * ITERS)                             # programs per sample
    sample = tl.program_id(0) // chunks
    first = (tl.program_id(0) % chunks) * (ROWS * ITERS)          # row index inside the sample
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if MODULATE:
        sc1 = 1.0 + tl.load(scale_ptr + sample * D + cols, mask=cmask, other=0.0)[None, :]
        sh = tl.load(shift_ptr + sample * D + cols, mask=cmask, other=0.0)[None, :]
    out_ty = y_ptr.dtype.element_ty
    base = sample.to(tl.int64) * L
    # Software prefetch: the next ROWS rows are requested before this iteration's reductions, so a
    # program always has a load in flight (few programs fit per SM with whole rows in registers).
    r = first + tl.arange(0, ROWS)
    x_next = tl.load(x_ptr + (base + r)[:, None] * D + cols[None, :],
                     mask=(r < L)[:, None] & cmask[None, :], other=0.0)
    for it in range(ITERS):
        r = first + it * ROWS + tl.arange(0, ROWS)
        rmask = r < L
        rows = base + r                                           # global row, [ROWS]
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None] * D + cols[None, :]                  # [ROWS, BLOCK_D]
        x = x_next.to(tl.float32)
        r_next = r + ROWS
        x_next = tl.load(x_ptr + offs + ROWS * D,
                         mask=((r_next < L) & (it + 1 < ITERS))[:, None] & cmask[None, :], other=0.0)
        if RMS:
            ms = tl.sum(x * x, axis=1) / D
            z = x * tl.math.rsqrt(ms + eps)[:, None]
        else:
            mean = tl.sum(x, axis=1) / D
            d = tl.where(mask, x - mean[:, None], 0.0)            # padded lanes must not count
            var = tl.sum(d * d, axis=1) / D
            z = d * tl.math.rsqrt(var + eps)[:, None]
        if HAS_W:
            z = z * w
        if HAS_B:
            z = z + b
        if MODULATE:
            if ROUND_NORM:
                z = _round_to(z, out_ty)
            z = z * sc1 + sh
        y = tl.where(mask, _round_to(z, out_ty), 0.0)
        if WRITE_Y:
            tl.store(y_ptr + offs, y.to(out_ty), mask=mask)
        if WRITE_Q:
            amax = tl.maximum(tl.max(tl.abs(y), axis=1), 1e-8)
            inv = tl.math.div_rn(tl.full([ROWS], 127.0, tl.float32), amax)
            q = (y * inv[:, None] + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000  # round half even
            q = tl.minimum(tl.maximum(q, -127), 127)
            tl.store(q_ptr + offs, q.to(tl.int8), mask=mask)
            tl.store(s_ptr + rows, tl.math.div_rn(amax, tl.full([ROWS], 127.0, tl.float32)), mask=rmask)


def _configs():
    return [triton.Config({"ROWS": r, "ITERS": i}, num_warps=w)
            for r, i, w in [(1, 16, 4), (1, 16, 8), (2, 8, 8), (4, 8, 8), (1, 16, 16), (2, 8, 16)]]


def _prune(configs, named_args, **kwargs):
    # Keep ≤ 16K fp32 values per row tile (≤ 64 per thread at 8 warps) so nothing spills.
    block_d = triton.next_power_of_2(named_args["D"])
    return [c for c in configs if c.kwargs["ROWS"] * block_d <= 16384] or configs[:1]


_norm_modulate_tuned = autotune(_configs(), key=["D", "MODULATE", "WRITE_Q", "RMS", "HAS_W"],
                                prune_configs_by={"early_config_prune": _prune})(_norm_modulate_kernel)


def _launch(x, kind, weight, bias, shift, scale, eps, round_norm, write_y, write_q):
    if x.dim() != 3:
        raise ValueError(f"x must be [B, L, D], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bf16/fp16/fp32, got {x.dtype}")
    if kind not in ("layer", "rms"):
        raise ValueError(f"kind must be 'layer' or 'rms', got {kind!r}")
    if kind == "rms" and bias is not None:
        raise ValueError("RMSNorm takes no bias")
    if (shift is None) != (scale is None):
        raise ValueError("give both shift and scale, or neither")
    B, L, D = x.shape
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != (D,):
            raise ValueError(f"{name} must be [{D}], got {tuple(p.shape)}")
    modulate = shift is not None
    if modulate:
        shift, scale = _broadcast_mod(shift, B, D).contiguous(), _broadcast_mod(scale, B, D).contiguous()
    x = x.contiguous()
    M = B * L
    y = torch.empty_like(x) if write_y else x.new_empty(1)
    q = torch.empty(M, D, dtype=torch.int8, device=x.device) if write_q else x.new_empty(1, dtype=torch.int8)
    s = torch.empty(M, dtype=torch.float32, device=x.device) if write_q else x.new_empty(1, dtype=torch.float32)
    dummy = s
    args = (x, weight if weight is not None else dummy, bias if bias is not None else dummy,
            shift if modulate else dummy, scale if modulate else dummy, y, q, s, L, D, eps)
    flags = dict(RMS=kind == "rms", HAS_W=weight is not None, HAS_B=bias is not None, MODULATE=modulate,
                 ROUND_NORM=round_norm, WRITE_Y=write_y, WRITE_Q=write_q, BLOCK_D=triton.next_power_of_2(D))
    if x.is_cuda:
        grid = lambda meta: (B * triton.cdiv(L, meta["ROWS"] * meta["ITERS"]),)
        _norm_modulate_tuned[grid](*args, **flags)
    else:
        # small chunks: several programs per sample, and an odd L leaves a partial last chunk
        _norm_modulate_kernel[(B * triton.cdiv(L, 4),)](*args, ROWS=2, ITERS=2, **flags)
    return y, q, s


@torch.library.custom_op("turbovid::norm_modulate", mutates_args=())
def norm_modulate(x: torch.Tensor, kind: str = "layer", weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                  scale: torch.Tensor | None = None, eps: float = 1e-6, round_norm: bool = True) -> torch.Tensor:
    """Kernel version of norm_modulate_ref. x [B, L, D] -> [B, L, D] x.dtype."""
    return _launch(x, kind, weight, bias, shift, scale, eps, round_norm, True, False)[0]


@torch.library.custom_op("turbovid::norm_modulate_quant", mutates_args=())
def norm_modulate_quant(x: torch.Tensor, kind: str = "layer", weight: torch.Tensor | None = None,
                        bias: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                        scale: torch.Tensor | None = None, eps: float = 1e-6,
                        round_norm: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Norm + modulation emitting only INT8 for FastInt8Linear: -> (q [B·L, D] int8, s [B·L] fp32)."""
    _, q, s = _launch(x, kind, weight, bias, shift, scale, eps, round_norm, False, True)
    return q, s


@norm_modulate.register_fake
def _(x, kind="layer", weight=None, bias=None, shift=None, scale=None, eps=1e-6, round_norm=True):
    return torch.empty_like(x)


@norm_modulate_quant.register_fake
def _(x, kind="layer", weight=None, bias=None, shift=None, scale=None, eps=1e-6, round_norm=True):
    M = x.shape[0] * x.shape[1]
    return x.new_empty(M, x.shape[2], dtype=torch.int8), x.new_empty(M, dtype=torch.float32)
