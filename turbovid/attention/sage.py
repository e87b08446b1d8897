"""Dense quantized self-attention (SageAttention: INT8 QKᵀ + FP8/FP16 PV) behind the DiT's local_attn interface.

q, k, v arrive as [B, L, H, D] (q/k RoPE'd) and the output leaves as [B, L, H, D] in the input dtype. The kernel
takes [B, H, L, D] views with any strides and writes its output in q's memory layout, so the two transposes
below are free (no copies). Kernel and error budget: turbovid/kernels/sage_attention.py.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from turbovid.kernels.sage_attention import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q, PV_MODES, sage_attention


def default_pv() -> str:
    """FP8 PV where the current GPU has FP8 tensor cores (sm89 Ada, sm90 Hopper and newer), FP16 PV on sm80/86.
    Without a GPU (reference path, interpreter tests) mirror the H100 numerics."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
        return "fp16"
    return "fp8"


class SageAttention(nn.Module):
    """`pv`: "fp8" | "fp16" | None (None: chosen at construction from the current GPU, see `default_pv`)."""

    def __init__(self, pv: Optional[str] = None, block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K):
        super().__init__()
        if pv is not None and pv not in PV_MODES:
            raise ValueError(f"SageAttention: pv must be one of {PV_MODES} or None; got {pv!r}")
        # Decided once here rather than per call, so torch.compile sees a constant.
        self.pv = pv if pv is not None else default_pv()
        self.block_q, self.block_k = block_q, block_k

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # [B, L, H, D] -> [B, H, L, D] views; the output comes back in [B, L, H, D] storage.
        out = sage_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                             block_q=self.block_q, block_k=self.block_k, pv=self.pv)
        return out.transpose(1, 2)

    def extra_repr(self) -> str:
        return f"pv={self.pv}, block_q={self.block_q}, block_k={self.block_k}"
