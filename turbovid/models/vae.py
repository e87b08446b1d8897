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

Decode paths (all share the modules, hence the checkpoint):
 - `decode(fast=False)`: TurboDiffusion's way, the reference modules one latent frame at a time.
 - `decode(fast=True)` (the default on CUDA): the same math rearranged for speed and memory, see
   "fast decode" below; equal to the reference within rounding (tested). Optional spatial tiles.
 - `decode_reference`: the reference modules over the whole sequence in one pass (tests, training).
H100, bf16, 480p/81 frames (random weights; rel-L1 vs an fp32 decode): fast 0.80-0.96 s, 3.3-7.1 GB
working memory depending on `chunk`, rel-L1 0.022; TurboDiffusion's frame-by-frame 1.78 s, 0.026;
diffusers' AutoencoderKLWan 2.07 s, 0.025. 720p: fast 2.0 s / 7.7 GB, tiled (48/8) 4.1 s / 2.1 GB.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from turbovid.config import VAEConfig
from turbovid.kernels.rms_norm_silu import residual_add_, rms_norm_silu

CACHE_T = 2  # frames a causal 3-tap temporal conv needs from the previous chunk
# Fast decode: latent frames per pass are chosen so that one activation at the output resolution
# (cfg.dim channels) holds at most this many elements, which also keeps every tensor under 2^31 elements
# (32-bit indexing). Peak memory grows with it, speed barely: H100, 480p/81 frames, latent frames per
# pass 1 / 2 / 3 / 5 -> 866 / 823 / 957 / 801 ms and 3.3 / 4.3 / 5.2 / 7.1 GB of working memory
# (benchmarks/results/vae_h100_2026-11-22.json). This picks 2 at 480p, 1 at 720p.
DECODE_CHUNK_ELEMENTS = 320_000_000
DEFAULT_TILE_OVERLAP = 8      # latent pixels shared by neighbouring tiles (64 output pixels of linear blend)
ATTENTION_SCORES = 1 << 26    # fast decode: at most this many (H W)^2 attention scores per SDPA call

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


# ---- fast decode ---------------------------------------------------------------------------------
# Decoder3d's math rearranged for speed and memory (same modules, same results up to rounding):
#  1. Causal padding without copies: each causal conv reads one buffer [previous frames ; x], and the
#     RMSNorm+SiLU in front of the conv writes its output straight into that buffer (the reference
#     pads with F.pad and concatenates the cache: two more copies of every activation).
#  2. Channels-last 3D activations: cuDNN's fast layout for bf16 conv3d; the RMSNorm over C is then a
#     reduction over contiguous memory, done with gamma and SiLU in one Triton pass (one read, one
#     write) where the PyTorch expression makes five passes.
#  3. Upsampling as sub-pixel convolution: a 2x nearest upsample followed by a 3x3 conv is, for each of
#     the four output phases (a, b), a 2x2 conv of the small input with summed taps: 4/9 of the FLOPs
#     and no 4x-sized upsampled tensor.
#  4. Several latent frames per pass (`chunk`): the caches carry the causal state between passes, so any
#     chunking gives the same result; larger chunks mean fewer, larger kernels and more memory.
#  4b. A residual block's convs run without bias: PyTorch adds a cuDNN conv's bias in a separate pass over
#     its output. The first conv's bias is added inside the RMSNorm+SiLU pass that follows it, the second's
#     (and the shortcut conv's) inside the residual add; the sub-pixel convs' biases inside the copy into
#     the interleaved output. Numerically the bias is then added in fp32 rather than to the rounded output.
#  5. Optional spatial tiles with overlap and a linear blend (`tile`). Unlike 1-4 this is approximate:
#     a tile sees zero padding at its border, and the middle attention block attends within the tile.


def rms_norm_silu_into(norm: RMSNorm, x: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """out <- SiLU(norm(x + bias)) for videos [B, C, T, H, W] (kernels/rms_norm_silu.py: one Triton pass when
    both are channels-last, else the module's own ops in place)."""
    rms_norm_silu(x, norm.gamma, norm.scale, out, bias)


def subpixel_weights(weight: torch.Tensor) -> torch.Tensor:
    """3x3 conv weights [O, I, 3, 3] -> 2x2 weights [2, 2, O, I, 2, 2] of the four output phases.

    After a 2x nearest upsample U[y] = X[y // 2], output row 2i (phase 0) sees U rows 2i-1, 2i, 2i+1 =
    X rows i-1, i, i (taps w0 | w1 + w2) and row 2i+1 (phase 1) sees X rows i, i, i+1 (w0 + w1 | w2);
    the same holds for columns. Taps are summed in (at least) fp32, then rounded to the weight dtype."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    r = torch.tensor([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], dtype=dtype, device=weight.device)
    return torch.einsum("aik,bjl,ockl->abocij", r, r, weight.to(dtype)).to(weight.dtype)


class FastDecoder:
    """Decoder3d.forward, fast (points 1-4 above). Built per decode call from the module's weights, so
    it never holds stale copies. `__call__(x, cache)` has Decoder3d's signature and cache layout, but
    consumes the cache dict it is given (entries are dropped as soon as they are used)."""

    def __init__(self, decoder: Decoder3d, channels_last: bool):
        self.decoder = decoder
        self.fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
        self.fmt2d = torch.channels_last if channels_last else torch.contiguous_format
        self.phases = {i: subpixel_weights(layer.resample[1].weight)
                       for i, layer in enumerate(decoder.upsamples) if isinstance(layer, Upsample)}

    def padded(self, x: torch.Tensor, cache: torch.Tensor | None, pad: int,
               norm: RMSNorm | None = None, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffer [B, C, pad + T, H, W] = [cache, zero filled in front to `pad` frames ; SiLU(norm(x + bias))
        or x], and the next cache: the buffer's last `pad` frames (zeros there stand for "before frame 0")."""
        b, c, t, h, w = x.shape
        buf = torch.empty((b, c, pad + t, h, w), dtype=x.dtype, device=x.device, memory_format=self.fmt)
        n = 0 if cache is None else cache.shape[2]
        if n < pad:
            buf[:, :, :pad - n].zero_()
        if n:
            buf[:, :, pad - n:pad].copy_(cache)
        if norm is None:
            buf[:, :, pad:].copy_(x)
        else:
            rms_norm_silu_into(norm, x, buf[:, :, pad:], bias)
        return buf, buf[:, :, t:].clone()

    @staticmethod
    def conv(conv: CausalConv3d, buf: torch.Tensor, bias: bool = True) -> torch.Tensor:
        # time is already padded in buf; H/W 'same' padding is done inside cuDNN (no copy)
        return F.conv3d(buf, conv.weight, conv.bias if bias else None, padding=(0, conv.space_pad[2], conv.space_pad[0]))

    def residual(self, block: ResidualBlock, x: torch.Tensor, cache: tuple | None):
        norm1, _, conv1, norm2, _, _, conv2 = block.residual
        cache1, cache2 = cache if cache is not None else (None, None)
        del cache  # each old cache entry goes as soon as its replacement exists
        # Peak: x (kept for the shortcut), one buffer and one conv output; each intermediate is dropped
        # as soon as the next one exists.
        buf, cache1 = self.padded(x, cache1, conv1.time_pad, norm1)
        h = self.conv(conv1, buf, bias=False)
        del buf
        buf, cache2 = self.padded(h, cache2, conv2.time_pad, norm2, conv1.bias)   # conv1's bias added here
        del h
        h = self.conv(conv2, buf, bias=False)
        del buf
        bias = conv2.bias
        if isinstance(block.shortcut, nn.Conv3d):   # 1x1x1 conv: its bias joins conv2's in the residual add
            # as a GEMM over the channel rows: a channels-last x gives a channels-last result (cuDNN / oneDNN
            # may return a 1x1x1 conv's output in NCDHW; the residual kernel needs both in one layout)
            x = F.linear(x.permute(0, 2, 3, 4, 1), block.shortcut.weight.flatten(1)).permute(0, 4, 1, 2, 3)
            bias = bias.float() + block.shortcut.bias.float()
        return residual_add_(h, x, bias), (cache1, cache2)

    def attention(self, block: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
        # Per frame as in AttentionBlock, a few frames per call: the single 384-wide head has no flash
        # kernel, and the math fallback stores (H W)^2 scores per frame.
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)  # a view for channels-last x
        out = torch.empty_like(frames)
        step = max(1, ATTENTION_SCORES // (h * w) ** 2)
        for i in range(0, b * t, step):
            f = frames[i:i + step]
            out[i:i + step] = f + block._frame(f)
        return out.reshape(b, t, c, h, w).transpose(1, 2)

    def upsample(self, index: int, layer: Upsample, x: torch.Tensor, cache: torch.Tensor | None):
        if layer.time_conv is not None:  # the "Rep" rule, exactly as Upsample.forward
            first = None
            if cache is None:
                first, x = x[:, :, :1], x[:, :, 1:]
                cache = x[:, :, :0]
            b, c, t, h, w = x.shape
            lead = 0 if first is None else 1
            out = torch.empty((b, c, lead + 2 * t, h, w), dtype=x.dtype, device=x.device, memory_format=self.fmt)
            if first is not None:
                out[:, :, :1].copy_(first)
            if t > 0:
                buf, cache = self.padded(x, cache, layer.time_conv.time_pad)
                y = self.conv(layer.time_conv, buf)  # [B, 2C, t, H, W]
                del buf
                # channel half j of frame i -> frame 2i + j: [B, 2, C, t, H, W] -> [B, C, t, 2, H, W]
                out[:, :, lead:].unflatten(2, (t, 2)).copy_(y.unflatten(1, (2, c)).permute(0, 2, 3, 1, 4, 5))
                del y
            x = out
        return self.subpixel(layer.resample[1], self.phases[index], x), cache

    def subpixel(self, conv: nn.Conv2d, phases: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # x [B, C, T, H, W] -> per frame [(B T), C, H, W] -> [(B T), O, 2H, 2W] -> [B, O, T, 2H, 2W]
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        out = torch.empty((b * t, conv.out_channels, 2 * h, 2 * w), dtype=x.dtype, device=x.device,
                          memory_format=self.fmt2d)
        grid = out.unflatten(2, (h, 2)).unflatten(4, (w, 2))  # [(B T), O, H, 2, W, 2]: phase (a, c) at [.., a, .., c]
        bias = conv.bias.view(1, -1, 1, 1)
        for a in range(2):
            for col in range(2):
                # padding 1 gives H+1 rows: output row o sees X rows o-1, o, so phase 0 is rows 0..H-1 and
                # phase 1 (X rows i, i+1) is rows 1..H
                y = F.conv2d(frames, phases[a, col], None, padding=1)
                torch.add(y[:, :, a:a + h, col:col + w], bias, out=grid[:, :, :, a, :, col])   # bias in the copy
                del y
        return out.reshape(b, t, conv.out_channels, 2 * h, 2 * w).transpose(1, 2)

    def __call__(self, x: torch.Tensor, cache: Cache | None = None) -> tuple[torch.Tensor, Cache]:
        d = self.decoder
        old, new = cache if cache is not None else {}, {}
        buf, new["conv1"] = self.padded(x.contiguous(memory_format=self.fmt), old.pop("conv1", None),
                                        d.conv1.time_pad)
        x = self.conv(d.conv1, buf)
        del buf
        x, new["middle.0"] = self.residual(d.middle[0], x, old.pop("middle.0", None))
        x = self.attention(d.middle[1], x)
        x, new["middle.2"] = self.residual(d.middle[2], x, old.pop("middle.2", None))
        for i, layer in enumerate(d.upsamples):
            key = f"upsamples.{i}"
            if isinstance(layer, ResidualBlock):
                x, new[key] = self.residual(layer, x, old.pop(key, None))
            else:
                x, new[key] = self.upsample(i, layer, x, old.pop(key, None))
        buf, new["head.2"] = self.padded(x, old.pop("head.2", None), d.head[2].time_pad, d.head[0])
        del x
        return self.conv(d.head[2], buf), new


def decode_chunk_frames(cfg: VAEConfig, h: int, w: int, max_elements: int = DECODE_CHUNK_ELEMENTS) -> int:
    """Latent frames per fast-decode pass for a latent (tile) of h x w: as many as keep one output-resolution
    activation (cfg.dim channels, temporal_factor frames per latent frame) within max_elements."""
    per_frame = cfg.dim * cfg.temporal_factor * cfg.spatial_factor ** 2 * h * w
    return max(1, max_elements // per_frame)


def tile_spans(size: int, tile: int | None, overlap: int, scale: int) -> list[tuple[int, int, torch.Tensor]]:
    """Split `size` latent pixels into tiles of `tile` with at least `overlap` shared between neighbours,
    spread evenly. Returns (start, end, blend weights over the tile's scale*tile output pixels); the
    weights ramp linearly over scale*overlap pixels at every edge shared with a neighbour."""
    if tile is None or tile >= size:
        return [(0, size, torch.ones(scale * size))]
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile={tile}), got {overlap}")
    count = math.ceil((size - overlap) / (tile - overlap))
    ramp = torch.arange(scale * overlap, dtype=torch.float32).add_(0.5).div_(max(1, scale * overlap))
    spans = []
    for i in range(count):
        start = round(i * (size - tile) / (count - 1))
        weights = torch.ones(scale * tile)
        if i > 0 and overlap:
            weights[:ramp.numel()] *= ramp
        if i < count - 1 and overlap:
            weights[weights.numel() - ramp.numel():] *= ramp.flip(0)
        spans.append((start, start + tile, weights))
    return spans


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

    def decode(self, latent: torch.Tensor, clamp: bool = False, *, fast: bool | None = None,
               chunk: int | None = None, tile: int | None = None, overlap: int = DEFAULT_TILE_OVERLAP,
               channels_last: bool | None = None) -> torch.Tensor:
        """Latent [B, z_dim, T, h, w] -> video [B, 3, 4(T-1)+1, 8h, 8w] in the latent's dtype, not clamped
        unless asked (TurboDiffusion clamps in the caller). Latent frame 0 gives 1 pixel frame, every later
        one 4.

        fast: False = TurboDiffusion's path (reference modules, one latent frame per pass); True = the fast
        decoder (see "fast decode"); None = fast on CUDA. chunk: latent frames per pass (default 1 for the
        reference path, `decode_chunk_frames` for the fast one); any chunk gives the same video.
        tile: latent pixels per square spatial tile (None: whole frames), neighbours sharing `overlap`
        latent pixels, blended linearly; approximate, bounds memory. channels_last: fast path layout
        (default: on CUDA)."""
        fast = latent.is_cuda if fast is None else fast
        if fast and torch.is_grad_enabled() and latent.requires_grad:
            raise ValueError("the fast decode has no autograd (it writes into preallocated buffers); use fast=False")
        with torch.no_grad() if fast else contextlib.nullcontext():
            return self._decode(latent, clamp, self._plan(latent, fast, chunk, tile, overlap, channels_last))

    def decode_stream(self, latent: torch.Tensor, clamp: bool = False, *, fast: bool | None = None,
                      chunk: int | None = None, tile: int | None = None, overlap: int = DEFAULT_TILE_OVERLAP,
                      channels_last: bool | None = None):
        """`decode` as consecutive pixel-frame chunks [B, 3, f, H, W] (one per decoder pass, in order), so a
        consumer such as the mp4 writer starts before the last pass; their concatenation is `decode`'s video.
        With spatial tiles the whole video comes as one chunk. Always without autograd."""
        fast = latent.is_cuda if fast is None else fast
        with torch.no_grad():   # entered per step: a `with` around a yield would leak into the caller
            plan = self._plan(latent, fast, chunk, tile, overlap, channels_last)
            passes, z, rows, cols, _ = plan
            tiled = len(rows) > 1 or len(cols) > 1
            steps = iter([(0, self._decode(latent, clamp, plan))] if tiled else passes(z))
        while True:
            with torch.no_grad():
                item = next(steps, None)
                if item is None:
                    return
                y = item[1].to(latent.dtype, copy=True)   # the fast decoder reuses its output buffers
                if clamp:
                    y.clamp_(-1.0, 1.0)
            yield y

    def _plan(self, latent, fast, chunk, tile, overlap, channels_last):
        """(passes, decoder input z, row tiles, column tiles, video shape); passes(region of z) yields
        (first pixel frame, pixels) for each pass of `chunk` latent frames."""
        z = self._decoder_input(latent)
        b, _, t, h, w = z.shape
        channels_last = z.is_cuda if channels_last is None else channels_last
        if tile is not None and tile < 1:
            raise ValueError(f"tile must be >= 1 latent pixels, got {tile}")
        rows, cols = (tile_spans(n, tile, overlap, self.cfg.spatial_factor) for n in (h, w))
        if chunk is None:
            chunk = decode_chunk_frames(self.cfg, rows[0][1] - rows[0][0], cols[0][1] - cols[0][0]) if fast else 1
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1 latent frames, got {chunk}")
        s, tf = self.cfg.spatial_factor, self.cfg.temporal_factor
        shape = (b, 3, 1 + tf * (t - 1), s * h, s * w)

        def passes(region: torch.Tensor):
            run = FastDecoder(self.decoder, channels_last) if fast else self.decoder
            cache = None
            for t0 in range(0, t, chunk):
                y, cache = run(region[:, :, t0:t0 + chunk], cache)
                yield (0 if t0 == 0 else 1 + tf * (t0 - 1)), y
                del y
        return passes, z, rows, cols, shape

    def _decode(self, latent: torch.Tensor, clamp: bool, plan) -> torch.Tensor:
        passes, z, rows, cols, shape = plan
        s = self.cfg.spatial_factor
        if len(rows) == len(cols) == 1:
            video = torch.empty(shape, dtype=latent.dtype, device=z.device)
            for p0, y in passes(z):
                video[:, :, p0:p0 + y.shape[2]] = y
        else:
            # Weighted sum of the tiles in fp32, divided by the summed weights (each tile's weight is 1
            # inside and ramps down to ~0 towards a shared edge, where a neighbour's interior takes over).
            acc = torch.zeros(shape, dtype=torch.float32, device=z.device)
            weight_sum = torch.zeros(shape[-2:], dtype=torch.float32, device=z.device)
            for r0, r1, wy in rows:
                for c0, c1, wx in cols:
                    weight = (wy[:, None] * wx[None, :]).to(z.device)
                    weight_sum[s * r0:s * r1, s * c0:s * c1] += weight
                    for p0, y in passes(z[:, :, :, r0:r1, c0:c1]):
                        acc[:, :, p0:p0 + y.shape[2], s * r0:s * r1, s * c0:s * c1] += y.float() * weight
            video = acc.div_(weight_sum).to(latent.dtype)
        return video.clamp_(-1.0, 1.0) if clamp else video  # in place: the video is ours, and large

    def decode_reference(self, latent: torch.Tensor, clamp: bool = False) -> torch.Tensor:
        """The whole latent sequence in one pass: same result as `decode`, more activation memory,
        far fewer (and larger) kernel launches."""
        video, _ = self.decoder(self._decoder_input(latent))
        video = video.to(latent.dtype)
        return video.clamp(-1.0, 1.0) if clamp else video
