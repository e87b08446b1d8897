"""Fused RMSNorm (the VAE's channel-wise L2 form) + SiLU over channels-last videos.

Algorithm: for every voxel (b, t, h, w) of a video [B, C, T, H, W] stored channels-last, the C values
form one contiguous row. y = SiLU(x / max(||x||_2, 1e-12) * sqrt(C) * gamma), computed in fp32 and
rounded once to the output dtype. One program normalises BLOCK_M rows: one read and one write, where
the PyTorch expression makes five passes. The output may be a strided view (the causal-conv buffer
after its cache frames), as long as each sample is a dense block of rows.

`rms_norm_silu_ref` runs the module's own ops in its order (F.normalize, * sqrt(C), * gamma, SiLU),
in place, so it equals the plain PyTorch norm up to the last bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from turbovid.kernels import use_triton

try:  # the fast VAE decode runs without Triton too, through the reference
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def rms_norm_silu_ref(x: torch.Tensor, gamma: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """out <- SiLU(x / ||x||_C * scale * gamma), in place: no full-size temporaries."""
    torch.div(x, torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12), out=out)
    F.silu(out.mul_(scale).mul_(gamma), inplace=True)


if triton is not None:
    @triton.jit
    def _rms_norm_silu_kernel(X, G, Y, M, C, scale, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        # X, Y: [M, C] row-major (one row per voxel of a channels-last video); BLOCK_M rows per program.
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < M) & (cols[None, :] < C)
        offs = rows[:, None] * C + cols[None, :]  # int64: M*C passes 2^31 from 480p on
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        inv = scale / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)  # F.normalize's eps
        g = tl.load(G + cols, mask=cols < C, other=0.0).to(tl.float32)
        y = x * inv[:, None] * g[None, :]
        y = y / (1.0 + tl.exp(-y))  # SiLU
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


def _voxel_rows(t: torch.Tensor) -> bool:
    """Is t [C, T, H, W] stored as back-to-back rows of C contiguous values (channels-last, dense)?"""
    expected = 1
    for dim in (0, 3, 2, 1):  # C fastest, then W, H, T
        if t.shape[dim] > 1 and t.stride(dim) != expected:
            return False
        expected *= t.shape[dim]
    return True


def rms_norm_silu(x: torch.Tensor, gamma: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """out <- SiLU(RMSNorm(x)) for x, out [B, C, T, H, W]; gamma [C, 1, 1, 1]. The Triton kernel runs when
    both are channels-last (use_triton decides the device), the reference otherwise."""
    if x.shape != out.shape or x.shape[1] != gamma.numel():
        raise ValueError(f"rms_norm_silu: x {tuple(x.shape)}, out {tuple(out.shape)}, gamma {tuple(gamma.shape)} disagree")
    b, c = x.shape[:2]
    if (triton is not None and use_triton(x) and x[0].numel() > 0
            and all(_voxel_rows(t[i]) for t in (x, out) for i in range(b))):
        m = x[0].numel() // c
        block_c = triton.next_power_of_2(c)
        block_m = max(1, 8192 // block_c)
        for i in range(b):  # one launch per sample: each is one dense [M, C] block
            _rms_norm_silu_kernel[(triton.cdiv(m, block_m),)](x[i], gamma, out[i], m, c, scale,
                                                             BLOCK_M=block_m, BLOCK_C=block_c, num_warps=8)
    else:
        rms_norm_silu_ref(x, gamma, scale, out)
