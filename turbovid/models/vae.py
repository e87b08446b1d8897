"""Wan2.1 causal video VAE (z_dim 16, 8x spatial and 4x temporal compression), SPEC §3.

Module and parameter names are those of the official `Wan2.1_VAE.pth`, so that file loads with
`strict=True` (hence the `nn.Sequential` index names such as `residual.2`, `head.0`, `resample.1`).

Causality. Every temporal convolution sees only the current and earlier frames. Frame 0 is special:
it is encoded alone into latent frame 0 and decoded alone from it (an image is a 1-frame video).
 - Downsample (time): frame 0 passes through; a (3,1,1) conv with stride 2 and no padding runs over
   the whole sequence, frame 0 included: 1 + 2k frames -> 1 + k frames.
 - Upsample (time): frame 0 passes through untouched; a causal (3,1,1) conv doubles the channels of
   frames 1.. (zero padded in front: frame 0 is never in its window), and the two channel halves
   are interleaved in time: 1 + k frames -> 1 + 2k frames. Official code calls this the "Rep" rule.

Streaming. The official encoder runs pixel frame 0 alone and then chunks of 4 frames; the decoder runs
one latent frame at a time. Instead of one shared list walked by a running index, every temporal
layer takes its own cache and returns the new one: `layer(x, cache) -> (y, new_cache)`, with
`cache=None` meaning "x starts the sequence". Encoder3d/Decoder3d gather their layers' caches in a dict
keyed by the layer's module name ("conv1", "downsamples.3", "middle.0", "head.2", ...).
Because `cache=None` means "sequence start" in every layer, the same modules also run a whole
sequence in one pass: `encode_reference` / `decode_reference`. Both paths must agree (tested).

Precision. TurboDiffusion runs this whole VAE in bf16 (module cast to bf16, inputs cast to it, output
cast back to the input dtype) with latent mean and 1/std built in bf16; we always use those
bf16-rounded constants, also in fp32.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from turbovid.config import VAEConfig

CACHE_T = 2  # frames a causal 3-tap temporal conv needs from the previous chunk

Cache = dict[str, Any]  # Encoder3d/Decoder3d state: module name -> that layer's cache


def latent_constants(cfg: VAEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1/std), each [z_dim] bf16, built exactly as TurboDiffusion does (SPEC §3.2)."""
    mean = torch.tensor(cfg.mean, dtype=torch.bfloat16)
    inv_std = 1.0 / torch.tensor(cfg.std, dtype=torch.bfloat16)  # the division rounds to bf16 as well
    return mean, inv_std


def per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D op to every frame: [B, C, T, H, W] -> [(B T), C, H, W] -> fn -> [B, C', T, H', W']."""
    b, c, t, h, w = x.shape
    y = fn(x.transpose(1, 2).reshape(b * t, c, h, w))
    return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)


class CausalConv3d(nn.Conv3d):
    """Conv3d padded 'same' in H/W and only in front in time (kt - 1 frames), so output frame t sees
    input frames t-kt+1..t. The cache holds the last kt - 1 input frames of the previous chunk; they
    replace the zero padding, which makes chunked and whole-sequence results identical."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int | tuple[int, int, int]):
        super().__init__(in_dim, out_dim, kernel_size)  # no built-in padding: forward pads
        kt, kh, kw = self.kernel_size
        self.time_pad = kt - 1
        self.space_pad = (kw // 2, kw // 2, kh // 2, kh // 2)

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [B, C, T, H, W]; cache: [B, C, <= kt-1, H, W] frames just before x, or None at the start
        pad_t = self.time_pad
        if cache is not None:
            x = torch.cat([cache, x], dim=2)
            pad_t -= cache.shape[2]
        # clone: a view would keep the whole chunk's activation alive until the next chunk
        new_cache = x[:, :, max(x.shape[2] - self.time_pad, 0):].clone()
        x = F.pad(x, (*self.space_pad, pad_t, 0))
        return super().forward(x), new_cache


class RMSNorm(nn.Module):
    """Channels-first RMS norm: L2-normalise over C, times sqrt(C) and gamma. gamma is (C,1,1,1) for
    video input and (C,1,1) for per-frame (image) input, as in the checkpoint. The normalisation runs
    in the input dtype (bf16 under TurboDiffusion), not upcast."""

    def __init__(self, dim: int, images: bool):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """[RMSNorm, SiLU, conv 3^3, RMSNorm, SiLU, (dropout slot), conv 3^3] + (1^3 conv | identity)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # Index 5 held Dropout(0) in the original; an Identity keeps the checkpoint index names.
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3),
            RMSNorm(out_dim, images=False), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, 3))
        self.shortcut = nn.Conv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: tuple | None = None) -> tuple[torch.Tensor, tuple]:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        cache1, cache2 = cache if cache is not None else (None, None)
        h, cache1 = conv1(F.silu(norm1(x)), cache1)
        h, cache2 = conv2(F.silu(norm2(h)), cache2)
        return h + self.shortcut(x), (cache1, cache2)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (no mixing across time)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def _frame(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape                                        # n = B*T frames
        qkv = self.to_qkv(self.norm(x)).reshape(n, 1, 3 * c, h * w)  # one head
        q, k, v = qkv.transpose(2, 3).contiguous().chunk(3, dim=-1)  # each [n, 1, H*W, C]
        y = F.scaled_dot_product_attention(q, k, v)                  # [n, 1, H*W, C]
        return self.proj(y.squeeze(1).transpose(1, 2).reshape(n, c, h, w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + per_frame(self._frame, x)


class Downsample(nn.Module):
    """2x spatial (pad right/bottom by 1, 3x3 stride-2 conv per frame), then optionally 2x temporal.

    Temporal cache: the last frame of the previous chunk, where the next stride-2 window starts. This
    holds when everything seen so far has odd length (frame 0, then chunks of even length)."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None):
        x = per_frame(self.resample, x)
        if self.time_conv is None:
            return x, None
        if cache is None:  # sequence start: frame 0 passes through, the windows start at frame 0
            y = x[:, :, :1]
            if x.shape[2] >= 3:
                y = torch.cat([y, self.time_conv(x)], dim=2)
        else:
            y = self.time_conv(torch.cat([cache, x], dim=2))
        return y, x[:, :, -1:].clone()


class Upsample(nn.Module):
    """Optionally 2x temporal (the "Rep" rule in the module docstring), then 2x nearest-exact spatial
    upsample and a 3x3 conv that halves the channels, per frame.

    Temporal cache: None before frame 0 has been seen; afterwards the causal conv's cache, which holds
    no frame at all until frame 1 arrives (so frame 1's window is zero padded, never frame 0)."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                      nn.Conv2d(dim, dim // 2, 3, padding=1))
        self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None):
        if self.time_conv is not None:
            first = None
            if cache is None:  # sequence start: frame 0 is neither doubled nor seen by the conv
                first, x = x[:, :, :1], x[:, :, 1:]
                cache = x[:, :, :0]  # an empty cache: "started, zero padding in front"
            if x.shape[2] > 0:
                y, cache = self.time_conv(x, cache)
                # [B, 2C, T, H, W] -> [B, C, 2T, H, W]: channel half 0 is the earlier frame of each pair
                b, c2, t, h, w = y.shape
                x = y.reshape(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
            if first is not None:
                x = torch.cat([first, x], dim=2)
        return per_frame(self.resample, x), cache


class Encoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]  # full size: 96, 96, 192, 384, 384
        self.conv1 = CausalConv3d(3, dims[0], 3)
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for j in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(in_dim if j == 0 else out_dim, out_dim))
            if i < len(cfg.dim_mult) - 1:
                layers.append(Downsample(out_dim, temporal=cfg.temporal_downsample[i]))
        self.downsamples = nn.Sequential(*layers)
        self.middle = nn.Sequential(ResidualBlock(dims[-1], dims[-1]), AttentionBlock(dims[-1]),
                                    ResidualBlock(dims[-1], dims[-1]))
        self.head = nn.Sequential(RMSNorm(dims[-1], images=False), nn.SiLU(),
                                  CausalConv3d(dims[-1], 2 * cfg.z_dim, 3))

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> tuple[torch.Tensor, Cache]:
        # x: [B, 3, T, H, W] -> [B, 2*z_dim, T', H/8, W/8] (mu and log-variance, before `conv1`)
        old, new = cache or {}, {}
        x, new["conv1"] = self.conv1(x, old.get("conv1"))
        for i, layer in enumerate(self.downsamples):
            x, new[f"downsamples.{i}"] = layer(x, old.get(f"downsamples.{i}"))
        x, new["middle.0"] = self.middle[0](x, old.get("middle.0"))
        x = self.middle[1](x)
        x, new["middle.2"] = self.middle[2](x, old.get("middle.2"))
        x, new["head.2"] = self.head[2](F.silu(self.head[0](x)), old.get("head.2"))
        return x, new


class Decoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mults = cfg.dim_mult[::-1]
        dims = [cfg.dim * m for m in (mults[0], *mults)]  # full size: 384, 384, 384, 192, 96
        temporal = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous stage's Upsample halved the channels
            for j in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim if j == 0 else out_dim, out_dim))
            if i < len(cfg.dim_mult) - 1:
                layers.append(Upsample(out_dim, temporal=temporal[i]))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMSNorm(dims[-1], images=False), nn.SiLU(), CausalConv3d(dims[-1], 3, 3))

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> tuple[torch.Tensor, Cache]:
        # x: [B, z_dim, T, h, w] (after `conv2`) -> [B, 3, T', 8h, 8w]
        old, new = cache or {}, {}
        x, new["conv1"] = self.conv1(x, old.get("conv1"))
        x, new["middle.0"] = self.middle[0](x, old.get("middle.0"))
        x = self.middle[1](x)
        x, new["middle.2"] = self.middle[2](x, old.get("middle.2"))
        for i, layer in enumerate(self.upsamples):
            x, new[f"upsamples.{i}"] = layer(x, old.get(f"upsamples.{i}"))
        x, new["head.2"] = self.head[2](F.silu(self.head[0](x)), old.get("head.2"))
        return x, new


class WanVAE(nn.Module):
    """encode: video [B, 3, F, H, W] in [-1, 1], F = 4k + 1 -> normalised latent mean
    [B, z_dim, 1 + (F-1)/4, H/8, W/8]; decode: the inverse map. Both compute in the module's dtype and
    return the input's dtype."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        if len(cfg.temporal_downsample) != len(cfg.dim_mult) - 1:
            raise ValueError(f"VAEConfig: temporal_downsample needs {len(cfg.dim_mult) - 1} entries, "
                             f"got {len(cfg.temporal_downsample)}")
        if len(cfg.mean) != cfg.z_dim or len(cfg.std) != cfg.z_dim:
            raise ValueError(f"VAEConfig: mean/std need z_dim={cfg.z_dim} entries")
        self.cfg = cfg
        self.encoder = Encoder3d(cfg)
        self.conv1 = nn.Conv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)  # -> (mu, log-variance)
        self.conv2 = nn.Conv3d(cfg.z_dim, cfg.z_dim, 1)          # applied before the decoder
        self.decoder = Decoder3d(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    # ---- encode ------------------------------------------------------------------------------
    def _check_video(self, video: torch.Tensor) -> None:
        s, t = self.cfg.spatial_factor, self.cfg.temporal_factor
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, F, H, W], got {tuple(video.shape)}")
        f, h, w = video.shape[2:]
        if (f - 1) % t or h % s or w % s:
            raise ValueError(f"video needs F = {t}k+1 frames and H, W multiples of {s}, got F={f}, H={h}, W={w}")

    def _normalized_mean(self, features: torch.Tensor) -> torch.Tensor:
        mu = self.conv1(features)[:, : self.cfg.z_dim]  # log-variance half unused
        mean, inv_std = (c.to(mu.device, mu.dtype).view(-1, 1, 1, 1) for c in latent_constants(self.cfg))
        return (mu - mean) * inv_std

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Streaming encode: pixel frame 0 alone, then chunks of 4 frames (one latent frame each)."""
        self._check_video(video)
        x = video.to(self.dtype)
        step = self.cfg.temporal_factor
        chunks = [x[:, :, :1]] + [x[:, :, i:i + step] for i in range(1, x.shape[2], step)]
        features, cache = [], None
        for chunk in chunks:
            y, cache = self.encoder(chunk, cache)
            features.append(y)
        return self._normalized_mean(torch.cat(features, dim=2)).to(video.dtype)

    def encode_reference(self, video: torch.Tensor) -> torch.Tensor:
        """The whole clip in one pass (more memory, same result as `encode`)."""
        self._check_video(video)
        features, _ = self.encoder(video.to(self.dtype))
        return self._normalized_mean(features).to(video.dtype)

    # ---- decode ------------------------------------------------------------------------------
    def _decoder_input(self, latent: torch.Tensor) -> torch.Tensor:
        if latent.dim() != 5 or latent.shape[1] != self.cfg.z_dim:
            raise ValueError(f"latent must be [B, {self.cfg.z_dim}, T, h, w], got {tuple(latent.shape)}")
        z = latent.to(self.dtype)
        mean, inv_std = (c.to(z.device, z.dtype).view(-1, 1, 1, 1) for c in latent_constants(self.cfg))
        return self.conv2(z / inv_std + mean)

    def decode(self, latent: torch.Tensor, clamp: bool = False) -> torch.Tensor:
        """Streaming decode, one latent frame at a time: latent frame 0 -> 1 pixel frame, every later
        one -> 4. Output [B, 3, 4(T-1)+1, 8h, 8w], not clamped unless asked (TurboDiffusion clamps in
        the caller)."""
        x = self._decoder_input(latent)
        frames, cache = [], None
        for t in range(x.shape[2]):
            y, cache = self.decoder(x[:, :, t:t + 1], cache)
            frames.append(y)
        video = torch.cat(frames, dim=2).to(latent.dtype)
        return video.clamp(-1.0, 1.0) if clamp else video

    def decode_reference(self, latent: torch.Tensor, clamp: bool = False) -> torch.Tensor:
        """The whole latent sequence in one pass: same result as `decode`, more activation memory,
        far fewer (and larger) kernel launches."""
        video, _ = self.decoder(self._decoder_input(latent))
        video = video.to(latent.dtype)
        return video.clamp(-1.0, 1.0) if clamp else video
