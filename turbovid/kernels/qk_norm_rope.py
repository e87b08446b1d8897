"""Fused q/k RMSNorm + RoPE of the Wan self-attention (one read and one write of q or k).

Algorithm: the q (or k) projection of one token is a row of d = H * D values. Wan normalises the whole row
(RMSNorm over d, all heads at once: y = x / sqrt(mean(x^2) + eps) * w, fp32, rounded once to x's dtype),
splits it into H heads of D, and rotates every interleaved pair (y[2j], y[2j+1]) of a head by the token's
angle j (cos/sin [L, D/2], L tokens per sample): (a cos - b sin, a sin + b cos), in fp32, rounded again.
In PyTorch this is five passes with fp32 temporaries (the norm, unflatten, the float copy, the rotation,
the cast). The kernel gives each program BLOCK_M rows and walks them head by head twice: pass 1 adds up the
squares of the whole row, pass 2 reads each head again (from cache: DRAM sees one read), applies the norm and the
weight, rounds to the output dtype exactly where the module does (the squares are added in another order, so a
value may move by one unit in the last place), splits the head into its (even, odd) pairs, rotates them by the
token's cos/sin row (token = row mod L; loaded once per row, not once per head), and stores the interleaved pairs.
Every load is a contiguous run of one head (vector loads; an earlier version loaded even and odd elements as two
stride-2 tiles of the padded row: 0.34 ms per 1.3B call on an H100). x may be a view whose rows are evenly spaced
(q of a fused qkv output) without a copy.

`qk_norm_rope_ref` is the module's own code path (RMSNorm then apply_rope).
"""
from __future__ import annotations

import torch

from turbovid.kernels import autotune, interpreting, use_triton

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


def _configs():
    if interpreting():
        return [triton.Config({"BLOCK_M": 4}, num_warps=4)]
    return [triton.Config({"BLOCK_M": m}, num_warps=w) for m in (4, 8, 16) for w in (4, 8)]


if triton is not None:
    @autotune(_configs(), key=["H", "HALF_D"])
    @triton.jit
    def _qk_norm_rope_kernel(X, W, COS, SIN, Y, M, L, H, HALF_D, stride_x, inv_d, eps,
                             BLOCK_M: tl.constexpr, BLOCK_HALF: tl.constexpr):
        # X: rows of H * 2 * HALF_D values, row r at X + r * stride_x (unit stride inside a row); Y: [M, H, 2 * HALF_D]
        # contiguous; COS, SIN: [L, HALF_D] fp32; W: [H * 2 * HALF_D]. One head of BLOCK_M rows at a time, so no lane
        # is padding when 2 * HALF_D is a power of two (Wan: 128), and every load is a contiguous run of one head.
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, 2 * BLOCK_HALF)                           # element of a head
        pairs = tl.arange(0, BLOCK_HALF)                              # pair j of a head: elements 2j, 2j+1
        mask = (rows[:, None] < M) & (cols[None, :] < 2 * HALF_D)
        x_row = X + rows[:, None] * stride_x + cols[None, :]
        y_row = Y + rows[:, None] * (H * 2 * HALF_D) + cols[None, :]
        # Pass 1: the sum of squares over the whole row (all heads).
        ss = tl.zeros([BLOCK_M], dtype=tl.float32)
        for h in range(H):
            xh = tl.load(x_row + h * 2 * HALF_D, mask=mask, other=0.0).to(tl.float32)
            ss += tl.sum(xh * xh, axis=1)
        inv = 1.0 / tl.sqrt(ss * inv_d + eps)
        angle = (rows % L)[:, None] * HALF_D + pairs[None, :]
        pmask = (rows[:, None] < M) & (pairs[None, :] < HALF_D)
        c = tl.load(COS + angle, mask=pmask, other=0.0)
        s = tl.load(SIN + angle, mask=pmask, other=0.0)
        # Pass 2 (the row again, from cache): weight, round to the output dtype where the module does, rotate.
        for h in range(H):
            xh = tl.load(x_row + h * 2 * HALF_D, mask=mask, other=0.0).to(tl.float32)
            wh = tl.load(W + h * 2 * HALF_D + cols, mask=cols < 2 * HALF_D, other=0.0).to(tl.float32)
            yh = (xh * inv[:, None] * wh[None, :]).to(Y.dtype.element_ty).to(tl.float32)
            a, b = tl.split(tl.reshape(yh, [BLOCK_M, BLOCK_HALF, 2]))
            out = tl.reshape(tl.join(a * c - b * s, a * s + b * c), [BLOCK_M, 2 * BLOCK_HALF])
            tl.store(y_row + h * 2 * HALF_D, out.to(Y.dtype.element_ty), mask=mask)


@torch.library.custom_op("turbovid::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                     eps: float) -> torch.Tensor:
    """The kernel (a custom op, so torch.compile traces through it). x [B, L, d] -> [B, L, H, D]."""
    B, L, d = x.shape
    if x.stride(2) != 1 or x.stride(0) != L * x.stride(1):   # rows not evenly spaced (a view of a qkv output is)
        x = x.contiguous()
    y = torch.empty(B, L, num_heads, d // num_heads, dtype=x.dtype, device=x.device)
    M, half_d = B * L, d // num_heads // 2
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
    _qk_norm_rope_kernel[grid](x, weight.contiguous(), cos.float().contiguous(), sin.float().contiguous(), y, M, L,
                               num_heads, half_d, x.stride(1), 1.0 / d, eps, BLOCK_HALF=triton.next_power_of_2(half_d))
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
