"""The tiny diffusers WanTransformer3DModel that the loader and quantize tests write in each checkpoint format."""
import torch
from diffusers import WanTransformer3DModel

from turbovid.config import MODELS


def tiny_diffusers_dit(seed: int = 0) -> WanTransformer3DModel:
    """diffusers' Wan DiT at the `tiny` config (2 heads of 64, 2 blocks), fp32, every parameter perturbed by
    0.1 N(0, 1) so that no weight keeps its structured init (zero biases, unit norms)."""
    cfg = MODELS["tiny"].dit
    torch.manual_seed(seed)
    ref = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=64, in_channels=16, out_channels=16,
                                text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
                                num_layers=cfg.num_layers)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return ref
