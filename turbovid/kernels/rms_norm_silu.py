"""Channels-last video ops of the fast VAE decode: fused RMSNorm (the VAE's channel-wise L2 form) + SiLU,
and the residual add. Both take the bias of the convolution that produced their input, because cuDNN's
conv3d in PyTorch adds its bias in a separate full pass over the output (13% of the 480p decode on an H100,
benchmarks/results/vae_profile_h100_2026-11-22.json): the decode runs its 3x3x3 convs without bias and
adds it here, inside a pass that reads the tensor anyway.

rms_norm_silu. For every voxel (b, t, h, w) of a video [B, C, T, H, W] stored channels-last, the C values
form one contiguous row. v = x + bias, y = SiLU(v / max(||v||_2, 1e-12) * sqrt(C) * gamma), computed in
fp32 and rounded once to the output dtype. One program normalises BLOCK_M rows: one read and one write,
where the PyTorch expression makes five passes (six with the bias). The output may be a strided view (the
causal-conv buffer after its cache frames), as long as each sample is a dense block of rows.

residual_add_. h <- h + x + bias (h: the residual branch's last conv output, x: the block input or its
shortcut conv's output, bias: the two convs' biases summed), in fp32, rounded once: one pass where
PyTorch makes two.

The `_ref` functions run the module's own ops in its order (bias add, F.normalize, * sqrt(C), * gamma,
SiLU), in place, so they equal the plain PyTorch modules up to the last bit.
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


def _channel(bias: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return bias.to(like.dtype).view(1, -1, *([1] * (like.dim() - 2)))


def rms_norm_silu_ref(x: torch.Tensor, gamma: torch.Tensor, scale: float, out: torch.Tensor,
                      bias: torch.Tensor | None = None) -> None:
    """out <- SiLU((x + bias) / ||x + bias||_C * scale * gamma), in place: no full-size temporaries."""
    if bias is not None:
        x = torch.add(x, _channel(bias, x), out=out)   # the conv's own bias add, now into out
    torch.div(x, torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12), out=out)
    F.silu(out.mul_(scale).mul_(gamma), inplace=True)


def residual_add_ref(h: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """h <- h + bias + x (the conv's bias add, then the residual add: PyTorch's order)."""
    if bias is not None:
        h.add_(_channel(bias, h))
    h.add_(x)


if triton is not None:
    @triton.jit
    def _rms_norm_silu_kernel(X, Y, G, BIAS, M, C, scale, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_C: tl.constexpr):
        # X, Y: [M, C] row-major (one row per voxel of a channels-last video); BLOCK_M rows per program.
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < M) & (cols[None, :] < C)
        offs = rows[:, None] * C + cols[None, :]  # int64: M*C passes 2^31 from 480p on
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:  # padded columns stay 0, so they add nothing to the norm
            x += tl.load(BIAS + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
        inv = scale / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)  # F.normalize's eps
        g = tl.load(G + cols, mask=cols < C, other=0.0).to(tl.float32)
        y = x * inv[:, None] * g[None, :]
        y = y / (1.0 + tl.exp(-y))  # SiLU
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _residual_add_kernel(H, X, BIAS, M, C, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        # H, X: [M, C] row-major; H <- H + X + BIAS in fp32
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < M) & (cols[None, :] < C)
        offs = rows[:, None] * C + cols[None, :]
        h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32) + tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            h += tl.load(BIAS + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
        tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)


def _voxel_rows(t: torch.Tensor) -> bool:
    """Is t [C, T, H, W] stored as back-to-back rows of C contiguous values (channels-last, dense)?"""
    expected = 1
    for dim in (0, 3, 2, 1):  # C fastest, then W, H, T
        if t.shape[dim] > 1 and t.stride(dim) != expected:
            return False
        expected *= t.shape[dim]
    return True


def _kernel_layout(tensors: tuple[torch.Tensor, ...]) -> bool:
    """Can the Triton kernels run on these [B, C, T, H, W] videos: each sample a dense channels-last block?"""
    x = tensors[0]
    return (triton is not None and use_triton(x) and x[0].numel() > 0
            and all(_voxel_rows(t[i]) for t in tensors for i in range(x.shape[0])))


def _launch(kernel, videos: tuple[torch.Tensor, ...], weights: tuple, bias: torch.Tensor | None, *scalars) -> None:
    """One launch per sample of the videos [B, C, ...], each sample a dense [M, C] block of rows:
    kernel(sample of each video..., weights..., BIAS, M, C, scalars..., HAS_BIAS, BLOCK_M, BLOCK_C)."""
    b, c = videos[0].shape[:2]
    m = videos[0][0].numel() // c
    block_c = triton.next_power_of_2(c)
    block_m = max(1, 8192 // block_c)
    for i in range(b):
        kernel[(triton.cdiv(m, block_m),)](*(v[i] for v in videos), *weights, videos[0] if bias is None else bias,
                                           m, c, *scalars, HAS_BIAS=bias is not None, BLOCK_M=block_m,
                                           BLOCK_C=block_c, num_warps=8)


def _check_bias(name: str, bias: torch.Tensor | None, c: int) -> None:
    if bias is not None and (bias.numel() != c or not bias.is_contiguous()):
        raise ValueError(f"{name}: bias must be a contiguous vector of {c} channels, got {tuple(bias.shape)}")


def rms_norm_silu(x: torch.Tensor, gamma: torch.Tensor, scale: float, out: torch.Tensor,
                  bias: torch.Tensor | None = None) -> None:
    """out <- SiLU(RMSNorm(x + bias)) for x, out [B, C, T, H, W]; gamma [C, 1, 1, 1]; bias [C] or None. The
    Triton kernel runs when both are channels-last (use_triton decides the device), the reference otherwise."""
    if x.shape != out.shape or x.shape[1] != gamma.numel():
        raise ValueError(f"rms_norm_silu: x {tuple(x.shape)}, out {tuple(out.shape)}, gamma {tuple(gamma.shape)} disagree")
    c = x.shape[1]
    _check_bias("rms_norm_silu", bias, c)
    if _kernel_layout((x, out)):
        _launch(_rms_norm_silu_kernel, (x, out), (gamma,), bias, scale)
    else:
        rms_norm_silu_ref(x, gamma, scale, out, bias)


def residual_add_(h: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """h <- h + x + bias for h, x [B, C, T, H, W], bias [C] or None; returns h. Triton when both are
    channels-last, the reference otherwise."""
    if h.shape != x.shape or h.dtype != x.dtype:
        raise ValueError(f"residual_add_: h {tuple(h.shape)} {h.dtype} and x {tuple(x.shape)} {x.dtype} disagree")
    c = h.shape[1]
    _check_bias("residual_add_", bias, c)
    if _kernel_layout((h, x)):
        _launch(_residual_add_kernel, (h, x), (), bias)
    else:
        residual_add_ref(h, x, bias)
    return h
