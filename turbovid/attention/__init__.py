"""Self-attention policy: dense | sage | sla | sagesla, chosen in `make_self_attention`.

Every attention callable takes q, k, v as [B, L, H, D] (bf16, q/k already RoPE'd) and returns
[B, L, H, D] in the input dtype — TurboDiffusion's `local_attn` interface (SPEC §6.1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_KINDS = ("dense", "sage", "sla", "sagesla")


class DenseAttention(nn.Module):
    """Full softmax attention through PyTorch SDPA (cuDNN / flash on GPU, math on CPU)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # [B, L, H, D] -> [B, H, L, D] for SDPA and back.
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)


def make_self_attention(kind: str, head_dim: int, topk: float = 0.1) -> nn.Module:
    if kind == "dense":
        return DenseAttention()
    if kind == "sage":
        from turbovid.attention.sage import SageAttention
        return SageAttention()
    if kind in ("sla", "sagesla"):
        from turbovid.attention.sla import SparseLinearAttention
        return SparseLinearAttention(head_dim=head_dim, topk=topk, quantized=(kind == "sagesla"))
    raise ValueError(f"unknown attention {kind!r}; choose one of {', '.join(ATTENTION_KINDS)}")
