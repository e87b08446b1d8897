"""Fused q/k RMSNorm + RoPE of the Wan self-attention (one read and one write of q or k).

Algorithm: the q (or k) projection of one token is a row of d = H * D values. Wan normalises the whole row
(RMSNorm over d, all heads at once: y = x / sqrt(mean(x^2) + eps) * w, fp32, rounded once to x's dtype),
splits it into H heads of D, and rotates every interleaved pair (y[2j], y[2j+1]) of a head by the token's
angle j (cos/sin [L, D/2], L tokens per sample): (a cos - b sin, a sin + b cos), in fp32, rounded again.
In PyTorch this is five passes with fp32 temporaries (the norm, unflatten, the float copy, the rotation,
the cast). The kernel gives each program BLOCK_M rows; it loads the even and the odd elements of each row
as two [BLOCK_M, d/2] tiles, reduces the sum of squares, applies the weight, rounds to the output dtype
exactly where the module does (so the result is bit-identical to the module's), rotates the pairs with the
cos/sin row of the token (row mod L), and stores the interleaved pairs back.

`qk_norm_rope_ref` is the module's own code path (RMSNorm then apply_rope).
"""
from __future__ import annotations

import torch

from turbovid.kernels import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def qk_norm_rope_ref(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     num_heads: int, eps: float) -> torch.Tensor:
    """x [B, L, d] -> [B, L, H, D]: RMSNorm over d (fp32, rounded to x's dtype), then RoPE of each head."""
    from turbovid.models.dit import apply_rope, rms_norm   # models.dit imports this module

    return apply_rope(rms_norm(x, weight, eps).unflatten(-1, (num_heads, -1)), cos, sin)


if triton is not None:
    @triton.jit
    def _qk_norm_rope_kernel(X, W, COS, SIN, Y, M, L, HALF_D, HALF_ROW, inv_d, eps,
                             BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr):
        # X, Y: [M, 2 * HALF_ROW] row-major; COS, SIN: [L, HALF_D] fp32; W: [2 * HALF_ROW].
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        pairs = tl.arange(0, BLOCK_P)                                   # pair j of the row: elements 2j, 2j+1
        mask = (rows[:, None] < M) & (pairs[None, :] < HALF_ROW)
        even = rows[:, None] * (2 * HALF_ROW) + 2 * pairs[None, :]
        a = tl.load(X + even, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(X + even + 1, mask=mask, other=0.0).to(tl.float32)
        inv = 1.0 / tl.sqrt((tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)) * inv_d + eps)
        wa = tl.load(W + 2 * pairs, mask=pairs < HALF_ROW, other=0.0).to(tl.float32)
        wb = tl.load(W + 2 * pairs + 1, mask=pairs < HALF_ROW, other=0.0).to(tl.float32)
        # the module rounds the normalised row to the input dtype before the rotation
        a = (a * inv[:, None] * wa[None, :]).to(Y.dtype.element_ty).to(tl.float32)
        b = (b * inv[:, None] * wb[None, :]).to(Y.dtype.element_ty).to(tl.float32)
        angle = (rows % L)[:, None] * HALF_D + (pairs % HALF_D)[None, :]
        c = tl.load(COS + angle, mask=mask, other=0.0)
        s = tl.load(SIN + angle, mask=mask, other=0.0)
        tl.store(Y + even, (a * c - b * s).to(Y.dtype.element_ty), mask=mask)
        tl.store(Y + even + 1, (a * s + b * c).to(Y.dtype.element_ty), mask=mask)


@torch.library.custom_op("turbovid::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                     eps: float) -> torch.Tensor:
    """The kernel (a custom op, so torch.compile traces through it). x [B, L, d] -> [B, L, H, D]."""
    B, L, d = x.shape
    x2 = x.reshape(B * L, d).contiguous()
    y = torch.empty(B, L, num_heads, d // num_heads, dtype=x.dtype, device=x.device)
    M = B * L
    block_p = triton.next_power_of_2(d // 2)
    block_m = max(1, min(16, 4096 // block_p))
    _qk_norm_rope_kernel[(triton.cdiv(M, block_m),)](
        x2, weight.contiguous(), cos.float().contiguous(), sin.float().contiguous(), y, M, L, d // num_heads // 2,
        d // 2, 1.0 / d, eps, BLOCK_M=block_m, BLOCK_P=block_p, num_warps=4 if block_p <= 1024 else 8)
    return y


@_qk_norm_rope_op.register_fake
def _(x, weight, cos, sin, num_heads, eps):
    B, L, d = x.shape
    return x.new_empty(B, L, num_heads, d // num_heads)


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 num_heads: int, eps: float) -> torch.Tensor:
    """Fused RMSNorm + RoPE: x [B, L, d] (bf16/fp16/fp32), weight [d], cos/sin [L, D/2] fp32 -> [B, L, H, D]
    in x's dtype, equal to `qk_norm_rope_ref`."""
    if x.dim() != 3:
        raise ValueError(f"qk_norm_rope expects x [B, L, d], got {tuple(x.shape)}")
    B, L, d = x.shape
    if num_heads < 1 or d % num_heads or (d // num_heads) % 2:
        raise ValueError(f"width {d} must split into {num_heads} heads of an even size")
    half_d = d // num_heads // 2
    if cos.shape != (L, half_d) or sin.shape != (L, half_d):
        raise ValueError(f"cos/sin must be [{L}, {half_d}], got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if weight.shape != (d,):
        raise ValueError(f"norm weight must be [{d}], got {tuple(weight.shape)}")
    if triton is None or not use_triton(x) or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return qk_norm_rope_ref(x, weight, cos, sin, num_heads, eps)
    return _qk_norm_rope_op(x, weight, cos, sin, num_heads, eps)
