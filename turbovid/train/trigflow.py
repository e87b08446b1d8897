"""The RF-trained Wan DiT seen as a TrigFlow denoiser (rCM's wrapper), with the exact JVP sCM needs.

    x0_hat(x_t, t) = c_skip x_t + c_out Net(c_in x_t, c_noise),  F(x_t, t) = (cos t x_t - x0_hat) / sin t
(coefficients in `losses.trigflow_coefficients`). The network receives its time as fp32 1000 s, not
rounded to bf16 as at inference: the tangent must flow through the time embedding, and bf16 rounding
would make dF/dt zero almost everywhere.

Exact JVP. `student_F_jvp` runs `torch.func.jvp` through the whole DiT. Forward-mode AD needs every op to
have a forward derivative; fused SDPA kernels (flash / memory-efficient / cuDNN) do not, so during the JVP
every DenseAttention is swapped for `MathAttention` (softmax(q k^T / sqrt(D)) v written with matmuls),
the role TurboDiffusion's JVP flash-attention kernel plays (SPEC §10.6). It materialises [B, H, L, L]
scores: fine for the mini model (L ~ 2000), not for Wan-scale sequences. A student with SLA attention
(`RCMStage.student_attention`, ours) gets `MathSLA` likewise: the references of kernels/sla.py, whose Triton
sparse kernel has no forward derivative.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F_
from torch import nn

from turbovid.attention import DenseAttention
from turbovid.attention.sla import SparseLinearAttention
from turbovid.models.dit import AttnOp
from turbovid.train.losses import _b, trigflow_coefficients, trigflow_velocity


class MathAttention(nn.Module):
    """Dense softmax attention from plain matmuls (q, k, v, out: [B, L, H, D]); softmax in fp32."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))                        # [B, H, L, D]
        scores = (q @ k.transpose(-1, -2)).float() * (1.0 / math.sqrt(q.shape[-1]))
        out = F_.softmax(scores, dim=-1).to(v.dtype) @ v
        return out.transpose(1, 2)


class MathSLA(nn.Module):
    """`sla` (a SparseLinearAttention) run by its references (`reference=True`), so that forward-mode AD runs
    through it. The block selection is taken from the primal q, k and carries no tangent, as in training."""

    def __init__(self, sla: SparseLinearAttention):
        super().__init__()
        self.sla = sla

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.sla(q, k, v, reference=True)


@contextmanager
def swap_attention(net: nn.Module, kind: type, make: Callable[[nn.Module], nn.Module]):
    """Temporarily replace every `local_attn` of type `kind` in `net` (self and cross attention) by
    `make(local_attn)`."""
    swapped = []
    for module in net.modules():
        if isinstance(module, AttnOp) and isinstance(module.local_attn, kind):
            swapped.append((module, module.local_attn))
            module.local_attn = make(module.local_attn)
    try:
        yield net
    finally:
        for module, original in swapped:
            module.local_attn = original


@contextmanager
def math_attention(net: nn.Module):
    """Every DenseAttention of `net` (self and cross) as MathAttention and every SparseLinearAttention as
    MathSLA, for the duration of a `with`."""
    with swap_attention(net, DenseAttention, lambda _: MathAttention()), \
            swap_attention(net, SparseLinearAttention, MathSLA):
        yield net


def rf_velocity(net: nn.Module, x: torch.Tensor, s: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """RF velocity (fp32) of `net` at x_s, RF time s [B] (network time 1000 s in fp32)."""
    return net(x, (1000 * s).float(), context).float()


def denoise(net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """TrigFlow x0_hat (x_t's dtype) at angle t [B] (float64)."""
    c_skip, c_out, c_in, c_noise = (_b(c, x_t) for c in trigflow_coefficients(t))
    v = net((c_in.to(x_t.dtype) * x_t), (c_noise.flatten()).float(), context).to(x_t.dtype)
    return c_skip.to(x_t.dtype) * x_t + c_out.to(x_t.dtype) * v


def guided_denoise(net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                   negative: torch.Tensor, guidance: float | torch.Tensor) -> torch.Tensor:
    """Teacher x0 with classifier-free guidance x0_u + g (x0_c - x0_u), one batched call of [cond ; uncond];
    `guidance` a number or one per sample [B]. (x0, v and F are affine in each other at fixed (x_t, t), so guiding
    any of them is the same.)"""
    x0 = denoise(net, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([context, negative.expand_as(context)]))
    x0_c, x0_u = x0.chunk(2)
    if isinstance(guidance, torch.Tensor):
        guidance = guidance.to(x0.device, x0.dtype).view(-1, *[1] * (x0.dim() - 1))
    return x0_u + guidance * (x0_c - x0_u)


def student_F_jvp(net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                  dx: torch.Tensor, dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(F(x_t, t), JVP of F along (dx, dt)) without any backward graph (the tangent is a stop-gradient
    target). dx has x_t's dtype, dt has t's dtype (float64)."""
    def F(x: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return trigflow_velocity(x, tt, denoise(net, x, tt, context))

    with torch.no_grad(), math_attention(net):
        value, tangent = torch.func.jvp(F, (x_t, t), (dx, dt))
    return value, tangent
