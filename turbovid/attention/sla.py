"""SLA / SageSLA self-attention: O = O_sparse + proj_l(O_linear) (TurboDiffusion's `local_attn`).

Inputs and output are [B, L, H, D] (q, k already RoPE'd). bf16/fp16 inputs run with TurboDiffusion's
precision (everything in bf16, fp32 accumulation); fp32 inputs run in fp32 throughout (CPU training
and tests), except SageSLA, which is bf16 only. Gradients flow through the sparse branch into q, k, v
and through the linear branch and proj_l; the block selection is not differentiable.

Without gradients the fused inference paths run: kernels/sla.py `sla_forward` (bf16 SLA) and
kernels/sage_attention.py `sagesla_forward` (SageSLA: statistics, Q/K/V quantization, pooling, linear
branch and proj_l in two memory passes, then block map and the INT8/FP8 sparse kernel). With gradients the
sparse branch uses the Triton forward/backward and the linear branch plain autograd, as TurboDiffusion.
SageSLA with gradients (quantization-aware training, ours; the INT8/FP8 kernel has no backward): the sparse
branch sees q, k, v rounded as the kernel rounds them (`fake_quantize_qkv`), and the gradient passes through
the rounding unchanged (straight-through estimator).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from turbovid.kernels import sla as K


BLOCK_CHOICES = (64, 128)   # the block sizes both SLA and SageSLA kernels take (SageSLA: 64 or 128 only)


def check_blocks(blocks) -> tuple[int, int]:
    """(b_q, b_k) as a tuple of two ints, each 64 or 128; ValueError with a one-line message otherwise."""
    blocks = tuple(blocks)
    if len(blocks) != 2 or any(b not in BLOCK_CHOICES for b in blocks):
        raise ValueError(f"--sla-blocks: each block size must be 64 or 128, got {blocks}")
    return blocks


def parse_blocks(text: str) -> tuple[int, int] | str:
    """"128x64" -> (128, 64): SLA's (b_q, b_k) (check_blocks); "auto" stays "auto" (TurboDiffusion's per-device
    sizes, `default_block_sizes`); ValueError with a one-line message otherwise."""
    if text.strip().lower() == "auto":
        return "auto"
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--sla-blocks must look like 128x64 (query block x key block) or be auto, got {text!r}")
    return check_blocks(int(p) for p in parts)


SLA_BLOCKS = (128, 64)   # TurboDiffusion's SLA (b_q, b_k): training, and inference everywhere but SageSLA on sm90


def default_block_sizes(quantized: bool, device: torch.device) -> tuple[int, int]:
    """(b_q, b_k) TurboDiffusion uses at inference (SPEC §6.2, §13.12). Fixed sizes (`--sla-blocks`,
    speedups.set_sla_blocks) replace them on every device."""
    if quantized and device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0):
        return 64, 128  # SpargeAttn's sm90 kernel tiles: CTA_Q 64, CTA_K 128
    return SLA_BLOCKS


class SparseLinearAttention(nn.Module):
    def __init__(self, head_dim: int, topk: float = 0.1, quantized: bool = False,
                 block_q: int | None = None, block_k: int | None = None):
        super().__init__()
        if not 0.0 < topk <= 1.0:
            raise ValueError(f"SLA topk must be in (0, 1], got {topk}")
        self.head_dim, self.topk, self.quantized = head_dim, topk, quantized
        self.block_q, self.block_k = block_q, block_k
        # fp32 master weight, run in bf16 (TurboDiffusion runs it under bf16 autocast). Zero init makes
        # an untrained SLA exactly block-sparse attention.
        self.proj_l = nn.Linear(head_dim, head_dim, dtype=torch.float32)
        nn.init.zeros_(self.proj_l.weight)
        nn.init.zeros_(self.proj_l.bias)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, topk={self.topk}, quantized={self.quantized}"

    def block_sizes(self, device: torch.device) -> tuple[int, int]:
        bq, bk = default_block_sizes(self.quantized, device)
        return self.block_q or bq, self.block_k or bk

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, reference: bool = False) -> torch.Tensor:
        """`reference`: every step by the plain-PyTorch references of kernels/sla.py (no fused or SageSLA kernel),
        so that forward-mode AD runs through it too (the rCM student's JVP, trigflow.MathSLA)."""
        if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape or q.shape[-1] != self.head_dim:
            raise ValueError(f"SLA expects q, k, v of one shape [B, L, H, {self.head_dim}], got "
                             f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        out_dtype = q.dtype
        # SageSLA's kernels take 16-bit inputs only, so it always runs in bf16 (as TurboDiffusion).
        dtype = torch.float32 if q.dtype == torch.float32 and not self.quantized else torch.bfloat16
        bq, bk = self.block_sizes(q.device)
        # [B, L, H, D] -> [B, H, L, D] views; the kernels take strides, the references broadcast.
        qh, kh, vh = (x.to(dtype).transpose(1, 2) for x in (q, k, v))

        weight, bias = self.proj_l.weight.to(dtype), self.proj_l.bias.to(dtype)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *self.proj_l.parameters()))
        if not needs_grad and not reference:
            # Inference: fused kernels (or the references) write O = O_s + proj_l(O_l) as [B, L, H, D].
            if self.quantized:
                from turbovid.kernels.sage_attention import sagesla_forward
                return sagesla_forward(qh, kh, vh, weight, bias, self.topk, bq, bk).to(out_dtype)
            return K.sla_forward(qh, kh, vh, self.topk, bq, bk, weight, bias).to(out_dtype)

        # 1. Block map (no gradient through the selection).
        with torch.no_grad():
            lut = (K.sla_block_map_ref if reference else K.sla_block_map)(qh.detach(), kh.detach(), self.topk, bq, bk)
        # 2. Sparse branch [B, H, L, D] (Triton forward/backward or the differentiable reference).
        if reference:
            o_s = K.sla_sparse_ref(qh, kh, vh, lut, bq, bk)
        elif self.quantized:     # straight-through: the forward sees the kernel's rounding, the backward does not
            from turbovid.kernels.sage_attention import fake_quantize_qkv
            with torch.no_grad():
                rounded = fake_quantize_qkv(qh, kh, vh, bq, bk)
            qr, kr, vr = (x - x.detach() + r.to(dtype) for x, r in zip((qh, kh, vh), rounded))
            o_s = K.sla_sparse(qr, kr, vr, lut, bq, bk)
        else:
            o_s = K.sla_sparse(qh, kh, vh, lut, bq, bk)
        # 3. Linear branch over all tokens (PyTorch autograd, as TurboDiffusion), proj_l in the compute dtype.
        o_l = F.linear(K.sla_linear_ref(qh, kh, vh), weight, bias)
        return (o_s + o_l).to(out_dtype).transpose(1, 2).contiguous()
