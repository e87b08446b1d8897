"""Wan2.1 / Wan2.2 diffusion transformer (DiT) with TurboDiffusion's numerics (SPEC §1).

x [B, C, T, H, W] is cut into 1x2x2 patches -> tokens [B, L, d]; every block does
    x <- x + gate_msa * SelfAttn(RoPE; norm1(x) * (1 + scale_msa) + shift_msa)
    x <- x + CrossAttn(norm3(x), text)
    x <- x + gate_mlp * FFN(norm2(x) * (1 + scale_mlp) + shift_mlp)
with the six modulation vectors = block.modulation + time_projection(time_embedding(t)).
The head maps tokens back to patches of velocity.

Precision (what TurboDiffusion runs, and what our tests pin down):
- parameters stay in the dtype they were loaded in (bf16 for released files); the residual stream x
  runs in the patch embedding's dtype; inputs are cast to the dtype of the layer that reads them;
- the time path is fp32 whatever the parameter dtype: float64 sinusoid -> fp32 MLPs and modulation
  sums (TurboDiffusion runs it under fp32 autocast, which up-casts bf16 weights);
- norms compute statistics in fp32 and return the input dtype; the modulated norm input is formed
  in fp32 and cast once ("modulate-then-cast"); gates are cast to the residual dtype before the
  multiply, so each residual update is a bf16 product and sum;
- RoPE rotates in fp32 and casts back; the head runs in fp32 and the output is always fp32.

Names of submodules are the official TurboDiffusion/Wan state-dict keys (SPEC §1.2), so released
checkpoints load with strict=True. Self-attention is whatever `make_self_attention` returns, kept at
`blocks.N.self_attn.attn_op.local_attn` (where SLA's `proj_l` weights live in the official files).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from turbovid.attention import DenseAttention, make_self_attention
from turbovid.config import DiTConfig
from turbovid.kernels.qk_norm_rope import qk_norm_rope

ROPE_THETA = 10000.0


# ---- position and time encodings -----------------------------------------------------------------

def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] times (0..1000 scale) -> [B, dim] fp32 as [cos, sin] (cos first), computed in float64."""
    half = dim // 2
    t = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t, freqs)
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Head dims given to the (t, h, w) axes: 44/42/42 for head dim 128 (= 22/21/21 rotation pairs)."""
    dim_h = 2 * (head_dim // 6)
    return head_dim - 2 * dim_h, dim_h, dim_h


def rope_angles(head_dim: int, grid: tuple[int, int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Rotation angles [L, head_dim/2] (fp32) for a (T', H', W') token grid, tokens in (t, h, w) order.

    Each axis a with d_a dims gets frequencies theta^(-2j/d_a), j < d_a/2, times the token's integer
    position on that axis (from 0). The pairs are laid out [t pairs | h pairs | w pairs].
    """
    per_axis = []
    for axis, (n, dim) in enumerate(zip(grid, rope_split(head_dim))):
        freqs = 1.0 / ROPE_THETA ** (torch.arange(0, dim, 2, device=device)[: dim // 2].float() / dim)
        angles = torch.outer(torch.arange(n, device=device).float(), freqs)     # [n, dim/2]
        shape = [1, 1, 1, dim // 2]
        shape[axis] = n
        per_axis.append(angles.view(shape).expand(*grid, dim // 2))
    return torch.cat(per_axis, dim=-1).reshape(math.prod(grid), head_dim // 2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) of x [B, L, H, D] by the angles of cos/sin [L, D/2]."""
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)                           # [B, L, H, D/2] each
    cos, sin = cos[:, None, :], sin[:, None, :]                                   # broadcast over heads
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)


# ---- layers --------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """RMS norm over the whole width (all heads at once). Statistics and the weight multiply run in
    fp32 and the result is rounded once to the input dtype, as TurboDiffusion's fast norm does; the
    output dtype never follows the weight (released files may keep norm weights in fp32)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm.forward: fp32 statistics and weight multiply, rounded once to x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (affine weights up-cast) and returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def run_in_fp32(layers: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a Linear or a Sequential of Linears/activations in fp32 whatever the weights' dtype
    (TurboDiffusion's fp32 autocast regions: time embedding, time projection, head)."""
    x = x.float()
    for layer in layers if isinstance(layers, nn.Sequential) else [layers]:
        if isinstance(layer, nn.Linear):
            x = F.linear(x, layer.weight.float(), None if layer.bias is None else layer.bias.float())
        else:
            x = layer(x)
    return x


class AttnOp(nn.Module):
    """Holder of the attention callable `local_attn` (q, k, v [B, L, H, D] -> [B, L, H, D]).

    The extra level exists only because the official checkpoints name SLA's parameters
    `...self_attn.attn_op.local_attn.proj_l.*`; swapping attention = replacing `local_attn`."""

    def __init__(self, local_attn: nn.Module):
        super().__init__()
        self.local_attn = local_attn

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.local_attn(q, k, v)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float, local_attn: nn.Module):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.attn_op = AttnOp(local_attn)
        self.fused_qk = False   # speedups.fuse_qk_norm_rope: one kernel for RMSNorm + RoPE of q and of k

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # [B, L, d] -> [B, L, H, D]; q/k are normalised over the full width d before the split.
        v = self.v(x).unflatten(-1, (self.num_heads, -1))
        if self.fused_qk:
            q = qk_norm_rope(self.q(x), self.norm_q.weight, *rope, self.num_heads, self.norm_q.eps)
            k = qk_norm_rope(self.k(x), self.norm_k.weight, *rope, self.num_heads, self.norm_k.eps)
            return self.o(self.attn_op(q, k, v).flatten(2))
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1))
        out = self.attn_op(apply_rope(q, *rope), apply_rope(k, *rope), v)
        return self.o(out.flatten(2))


class CrossAttention(nn.Module):
    """Dense attention from video tokens to the text tokens (no RoPE, no mask: zero-padded text
    positions are attended to, as in TurboDiffusion). Wan2.1 i2v adds a second attention over the
    CLIP image tokens (k_img, v_img), summed before the output projection.

    The keys and values depend only on the prompt (and image), so they are computed apart
    (`text_kv`, `image_kv`) and handed to `forward`: a sampler's steps can then share them."""

    def __init__(self, dim: int, num_heads: int, eps: float, image: bool):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)
        if image:
            self.k_img, self.v_img = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps)
        self.attn_op = AttnOp(DenseAttention())

    def heads(self, u: torch.Tensor) -> torch.Tensor:
        return u.unflatten(-1, (self.num_heads, -1))      # [B, N, d] -> [B, N, H, D]

    def text_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedded text [B, N, d] -> (K, V) [B, N, H, D]."""
        return self.heads(self.norm_k(self.k(context))), self.heads(self.v(context))

    def image_kv(self, context_img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedded CLIP tokens [B, 257, d] -> (K_img, V_img) [B, 257, H, D] (Wan2.1 i2v)."""
        return self.heads(self.norm_k_img(self.k_img(context_img))), self.heads(self.v_img(context_img))

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                kv_img: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        q = self.heads(self.norm_q(self.q(x)))
        out = self.attn_op(q, *kv)
        if kv_img is not None:
            out = out + self.attn_op(q, *kv_img)
        return self.o(out.flatten(2))


class WanBlock(nn.Module):
    def __init__(self, cfg: DiTConfig, local_attn: nn.Module):
        super().__init__()
        d = cfg.dim
        self.norm1 = LayerNorm(d, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(d, cfg.num_heads, cfg.eps, local_attn)
        self.norm3 = LayerNorm(d, cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(d, cfg.num_heads, cfg.eps, image=cfg.image_dim is not None)
        self.norm2 = LayerNorm(d, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv: tuple[torch.Tensor, torch.Tensor], kv_img: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """x [B, L, d]; e0 [B, 6, d] fp32; rope (cos, sin) [L, D/2]; kv / kv_img: this block's cross-attention
        keys and values of the text / CLIP tokens (`WanDiT.text_kv`)."""
        # [B, 6, d] fp32 -> six [B, 1, d] vectors.
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (self.modulation.float() + e0).chunk(6, dim=1)
        y = self.self_attn((self.norm1(x).float() * (1 + scale_msa) + shift_msa).to(x.dtype), rope)
        x = x + y * gate_msa.to(x.dtype)
        x = x + self.cross_attn(self.norm3(x), kv, kv_img)
        y = self.ffn((self.norm2(x).float() * (1 + scale_mlp) + shift_mlp).to(x.dtype))
        return x + y * gate_mlp.to(x.dtype)


class Head(nn.Module):
    def __init__(self, dim: int, out_features: int, eps: float):
        super().__init__()
        self.norm = LayerNorm(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        # Modulated by the time embedding e [B, d] (not by the 6-way projection the blocks use).
        shift, scale = (self.modulation.float() + e.unsqueeze(1)).chunk(2, dim=1)
        return run_in_fp32(self.head, self.norm(x).float() * (1 + scale) + shift)


class ImageEmbedding(nn.Module):
    """Wan2.1 i2v: CLIP image tokens [B, 257, 1280] -> extra cross-attention context [B, 257, d]."""

    def __init__(self, image_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, image_dim), nn.GELU(),
                                  nn.Linear(image_dim, dim), nn.LayerNorm(dim))

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        return self.proj(clip.to(self.proj[1].weight.dtype))


# ---- the network ---------------------------------------------------------------------------------

class WanDiT(nn.Module):
    def __init__(self, cfg: DiTConfig, attention: str = "dense", topk: float = 0.1):
        super().__init__()
        if cfg.dim % cfg.num_heads or cfg.head_dim % 2:
            raise ValueError(f"dim {cfg.dim} must split into {cfg.num_heads} heads of even size")
        self.cfg = cfg
        d, patch = cfg.dim, math.prod(cfg.patch_size)
        self.patch_embedding = nn.Linear(cfg.in_dim * patch, d)   # Conv3d(k = stride = patch) as a Linear
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(
            WanBlock(cfg, make_self_attention(attention, cfg.head_dim, topk)) for _ in range(cfg.num_layers))
        self.head = Head(d, cfg.out_dim * patch, cfg.eps)
        if cfg.image_dim is not None:
            self.img_emb = ImageEmbedding(cfg.image_dim, d)

    def text_kv(self, context: torch.Tensor, clip: torch.Tensor | None = None) -> list[tuple]:
        """Per block, the cross-attention (K, V) of the text tokens and (K_img, V_img) of the CLIP tokens
        (None for t2v), each [B, N, H, D]. context [B, text_len, text_dim]; clip [B, 257, image_dim]."""
        text = self.text_embedding(context.to(self.text_embedding[0].weight.dtype))   # [B, text_len, d]
        image = self.img_emb(clip) if clip is not None else None                       # [B, 257, d]
        return [(b.cross_attn.text_kv(text), None if image is None else b.cross_attn.image_kv(image))
                for b in self.blocks]

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None, clip: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, T, H, W] noisy latent; t [B] or [B, 1] network time (0..1000); context [B, text_len,
        text_dim] text embeddings; y [B, 20, T, H, W] i2v mask + image latent; clip [B, 257, image_dim]
        (Wan2.1 i2v). Returns the velocity [B, out_dim, T, H, W] in fp32."""
        cfg = self.cfg
        dtype = self.patch_embedding.weight.dtype      # the residual stream's dtype

        # 1. Image conditioning (i2v) goes on the channels: [noise latent ; mask ; image latent].
        if y is not None:
            x = torch.cat([x.to(dtype), y.to(dtype)], dim=1)
        B, C, T, H, W = x.shape
        pt, ph, pw = cfg.patch_size
        if C != cfg.in_dim or T % pt or H % ph or W % pw:
            raise ValueError(f"DiT input (x with y) has shape {tuple(x.shape)}; expected {cfg.in_dim} channels "
                             f"and T, H, W divisible by {cfg.patch_size}")
        if (clip is None) != (cfg.image_dim is None):
            raise ValueError("clip image tokens are required by (and only by) a DiT with image_dim")
        if t.ndim == 2 and t.shape[1] == 1:
            t = t[:, 0]
        if t.shape != (B,):
            raise ValueError(f"t must have shape [B] or [B, 1] with B = {B}; got {tuple(t.shape)}")

        # 2. Patchify: [B, C, T'*pt, H'*ph, W'*pw] -> [B, T', H', W', C, pt, ph, pw] -> [B, L, C*pt*ph*pw];
        #    tokens in (t, h, w) order, features channel-major (the Conv3d weight's flattening order).
        grid = (T // pt, H // ph, W // pw)
        x = x.reshape(B, C, grid[0], pt, grid[1], ph, grid[2], pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        x = self.patch_embedding(x.reshape(B, math.prod(grid), -1).to(dtype))

        # 3. Time: fp32 embedding e [B, d] (for the head) and projection e0 [B, 6, d] (for the blocks).
        e = run_in_fp32(self.time_embedding, sinusoidal_embedding(t, cfg.freq_dim))
        e0 = run_in_fp32(self.time_projection, e).unflatten(1, (6, cfg.dim))

        # 4. Cross-attention keys/values of every block from the text (and CLIP image tokens). They depend
        #    on the prompt only, so `speedups.enable_text_kv_cache` may serve them from a per-prompt cache.
        text_kv = self.text_kv(context, clip)

        # 5. RoPE angles for this grid, shared by every block: cos/sin [L, head_dim/2] fp32.
        angles = rope_angles(cfg.head_dim, grid, x.device)
        rope = (angles.cos(), angles.sin())

        # 6. Transformer blocks.
        for block, (kv, kv_img) in zip(self.blocks, text_kv):
            x = block(x, e0, rope, kv, kv_img)

        # 7. Head (fp32) and unpatchify: [B, L, pt*ph*pw*C_out], channels fastest ->
        #    [B, T', H', W', pt, ph, pw, C_out] -> [B, C_out, T', pt, H', ph, W', pw] -> [B, C_out, T, H, W].
        out = self.head(x, e).reshape(B, *grid, pt, ph, pw, cfg.out_dim)
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, cfg.out_dim, T, H, W)
