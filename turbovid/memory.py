"""GPU memory plan: estimate each pipeline stage's peak from the configs, and choose where models live.

Estimates are pure functions of the configs (bytes; GB below means 10^9 bytes, as torch reports bytes):

    stage         resident weights                                 + working memory
    text_encode   umT5 (unless encoded on the CPU), VAE, DiT*      + umT5 activations
    image_encode  VAE, DiT*, umT5 if kept                           + streaming VAE encode (i2v only)
    denoise       DiT experts (minus streamed blocks), VAE, umT5?   + one DiT forward at L tokens
    vae_decode    VAE, DiT unless offloaded, umT5 if kept           + fast VAE decode (per chunk / tile)

    (* the DiT is brought in after the text encoder is freed when the plan says "free")

`plan_memory` starts from "everything resident" and, only while some stage is over the budget, takes the
next step that helps that stage: free the text encoder after encoding (or encode on the CPU); swap the
Wan2.2 experts (only the active one on the GPU); stream DiT blocks from pinned CPU memory through the GPU
one at a time (denoise); then for the decode fewer latent frames per VAE pass, the DiT moved to the CPU,
and last spatial tiles (the one approximate step).

The helpers at the end apply a plan to a `Pipeline` (duck-typed: .text_encoder, .dit, .dit_low, .vae,
.device): `prepare_stage`, `activate_expert`, `offload`, `swap_in`, `stream_blocks`, `track_peak`.

Limits: activation estimates model *our* code (dit.py and speedups.FusedWanBlock as written: RoPE in
fp32 is the peak; the fast VAE decode). Checked on the H100 (benchmarks/results/vae_h100_2026-11-22.json):
14B 720p W8A8 forward activations est. 9.8 / measured 9.0 GB, 1.3B 480p bf16 1.76 / 1.71 GB, VAE decode
working memory within -2 %..+9 % (480p, 720p, chunks 1-5, tiles). Whole 14B 720p W8A8 video at a 22 GB
budget (encoder freed, 11 streamed blocks, 1-frame untiled decode): stage peaks 21.0 GB (denoise) and
19.4 GB (decode), estimated 21.2 / 19.0 (measured before STREAM_KEEP existed; with the cross-attention K/V
projections resident the plan streams 12 blocks). The CUDA context (~0.5 GB) and the caching allocator's reserve
come on top of what is planned: give a budget ~1-2 GB below the card's memory.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from turbovid.config import DiTConfig, ModelSpec, TextEncoderConfig, VAEConfig
from turbovid.models.vae import ATTENTION_SCORES, DEFAULT_TILE_OVERLAP, WanVAE, decode_chunk_frames

GB = 1e9
BF16 = 2
RESERVE = int(0.5 * GB)        # allocator rounding, cuBLAS/cuDNN workspaces, small tensors: kept free
VAE_TILES = (64, 48, 32, 24, 16)  # latent pixels per tile side, tried in this order
STAGES = ("text_encode", "image_encode", "denoise", "vae_decode")
POSTPROCESS_BYTES = 16   # per video element: Pipeline.decode's .float() + video.to_uint8_frames' fp32 temporaries


@dataclass(frozen=True)
class MemoryPlan:
    budget_gb: float
    text_encoder: str = "gpu"           # "gpu": resident | "free": on GPU to encode, then freed | "cpu"
    experts: str = "resident"           # "resident" (all on GPU) | "swap": only the active Wan2.2 expert
    offload_dit_for_decode: bool = False
    streamed_blocks: int = 0            # last N DiT blocks live in pinned CPU memory, copied in per use
    vae_chunk: int = 1                  # latent frames per fast-decode pass
    vae_tile: int | None = None         # latent pixels per decode tile side; None = whole frames
    vae_overlap: int = DEFAULT_TILE_OVERLAP
    stages_gb: tuple[tuple[str, float], ...] = ()   # (stage, estimated peak GB), filled by plan_memory

    @property
    def peak_gb(self) -> float:
        return max(gb for _, gb in self.stages_gb)

    def summary(self) -> str:
        tile = f"tile {self.vae_tile}" if self.vae_tile else "no tiling"
        stages = ", ".join(f"{s} {gb:.1f}" for s, gb in self.stages_gb)
        return (f"memory plan for {self.budget_gb:.1f} GB: text encoder {self.text_encoder}, experts {self.experts}, "
                f"DiT {'offloaded' if self.offload_dit_for_decode else 'kept'} during decode, "
                f"{self.streamed_blocks} streamed blocks, VAE chunk {self.vae_chunk} {tile}; est. GB: {stages}")


# ---- parameters ----------------------------------------------------------------------------------

def _block_linears(cfg: DiTConfig) -> list[tuple[int, int]]:
    """(in, out) of every nn.Linear in one WanBlock: the layers W8A8 replaces (SPEC §7.1)."""
    d, f = cfg.dim, cfg.ffn_dim
    n_attn = 8 + (2 if cfg.image_dim is not None else 0)    # self q,k,v,o; cross q,k,v,o (+ k_img, v_img)
    return [(d, d)] * n_attn + [(d, f), (f, d)]


def _sla(attention: str) -> bool:
    return attention in ("sla", "sagesla")


def _linear_bytes(k: int, n: int, quant: bool, dtype_bytes: int) -> int:
    if quant:   # int8 weight, fp32 scale per 128x128 tile (TD format), bias
        return n * k + 4 * math.ceil(n / 128) * math.ceil(k / 128) + dtype_bytes * n
    return dtype_bytes * (n * k + n)


def dit_block_bytes(cfg: DiTConfig, *, quant: bool, attention: str, dtype_bytes: int = BF16) -> int:
    """Bytes of one WanBlock: Linears (int8 weight + fp32 128x128-tile scales + bias, or plain), norms,
    modulation, SLA's proj_l. (The "fast" int8 format keeps one fp32 scale per output channel instead:
    ~0.1 MB more per 14B block.)"""
    d = cfg.dim
    linears = sum(_linear_bytes(k, n, quant, dtype_bytes) for k, n in _block_linears(cfg))
    norms = 2 * d + 2 * d + (d if cfg.image_dim is not None else 0) + 2 * d   # q/k norms (x2), norm3 w+b
    other = norms + 6 * d + (cfg.head_dim ** 2 + cfg.head_dim if _sla(attention) else 0)
    return linears + dtype_bytes * other


def dit_block_streamed_bytes(cfg: DiTConfig, *, quant: bool, attention: str, dtype_bytes: int = BF16) -> int:
    """What streaming one block moves off the GPU: the block minus the parts that stay resident
    (STREAM_KEEP: the cross-attention K/V projections, which WanDiT.text_kv runs outside the blocks)."""
    kv = 2 + (2 if cfg.image_dim is not None else 0)
    kept = kv * _linear_bytes(cfg.dim, cfg.dim, quant, dtype_bytes) + dtype_bytes * cfg.dim * kv // 2
    return dit_block_bytes(cfg, quant=quant, attention=attention, dtype_bytes=dtype_bytes) - kept


def dit_param_bytes(cfg: DiTConfig, *, quant: bool, attention: str = "dense", dtype_bytes: int = BF16) -> int:
    """Bytes of a WanDiT as the pipeline holds it (bf16; block Linears int8 with `quant`)."""
    d, patch = cfg.dim, math.prod(cfg.patch_size)
    outer = ((cfg.in_dim * patch + 1) * d                               # patch embedding
             + (cfg.text_dim + 1) * d + (d + 1) * d                      # text embedding
             + (cfg.freq_dim + 1) * d + (d + 1) * d                      # time embedding
             + (d + 1) * 6 * d                                           # time projection
             + (d + 1) * cfg.out_dim * patch + 2 * d)                    # head + its modulation
    if cfg.image_dim is not None:
        i = cfg.image_dim
        outer += 2 * i + (i + 1) * i + (i + 1) * d + 2 * d              # img_emb: LN, Linear, GELU, Linear, LN
    return dtype_bytes * outer + cfg.num_layers * dit_block_bytes(cfg, quant=quant, attention=attention,
                                                                  dtype_bytes=dtype_bytes)


def text_encoder_param_bytes(cfg: TextEncoderConfig, dtype_bytes: int = BF16) -> int:
    """umT5 encoder: tied token embedding, per layer q/k/v/o, relative position bias, two norms, gated FFN."""
    inner = cfg.num_heads * cfg.d_kv
    layer = 4 * cfg.d_model * inner + cfg.relative_attention_num_buckets * cfg.num_heads + 2 * cfg.d_model \
        + 3 * cfg.d_model * cfg.d_ff
    return dtype_bytes * (cfg.vocab_size * cfg.d_model + cfg.num_layers * layer + cfg.d_model)


@functools.cache
def vae_param_bytes(cfg: VAEConfig, dtype_bytes: int = BF16) -> int:
    with torch.device("meta"):   # counted from the module itself: 126,892,531 parameters at full size
        return dtype_bytes * sum(p.numel() for p in WanVAE(cfg).parameters())


# ---- working memory ------------------------------------------------------------------------------

def latent_grid(spec: ModelSpec, width: int, height: int, frames: int) -> tuple[int, int, int]:
    """(T, h, w) of the latent."""
    s, t = spec.vae.spatial_factor, spec.vae.temporal_factor
    return 1 + (frames - 1) // t, height // s, width // s


def dit_tokens(spec: ModelSpec, width: int, height: int, frames: int) -> int:
    t, h, w = latent_grid(spec, width, height, frames)
    pt, ph, pw = spec.dit.patch_size
    return (t // pt) * (h // ph) * (w // pw)


def dit_activation_bytes(cfg: DiTConfig, tokens: int, batch: int = 1, *, quant: bool,
                         dtype_bytes: int = BF16) -> int:
    """Peak working memory of one WanDiT forward, X = one [B, L, d] tensor, F = one [B, L, ffn] tensor.
    Plain blocks (models/dit.py):
    - self-attention: the block input, the modulated input, q, k, v and q after RoPE are live while RoPE
      of k runs in fp32 (x.float() 2X, two half-size fp32 products, their stack 2X): 12X. The attention
      itself (dense SDPA output, or SageSLA's int8/fp8 copies of q, k, v and its two outputs) stays below.
    - FFN: the block input (the caller's reference), the current residual stream, the self-attention
      output (still bound to `y`), the FFN input, the hidden and its GELU: 4X + 2F (W8A8: 5X + 1.5F, less).
    Fused blocks (speedups.FusedWanBlock, the pipeline's default on CUDA): RoPE as above over the int8
    norm output and q, k, v (~11.5X); in the FFN the self-attention's k, v, output and int8 input are
    still bound, next to the GELU'd hidden, its int8 copy and the output: 7.5X + 1.5F. We take the max
    of both layouts.
    Around the blocks: every block's text K/V (2 x layers x [B, text_len, d]), the RoPE tables (fp32
    angles, cos, sin: 6 bytes x L x head_dim); before them, the time projection's weight up-cast to fp32
    (24 d^2 bytes, the peak only at short L).
    Checked on CPU against live-tensor bytes (tests/test_memory.py) and on the H100 (bench_vae.py)."""
    x = batch * tokens * cfg.dim * dtype_bytes
    f = batch * tokens * cfg.ffn_dim * dtype_bytes
    blocks = max(12 * x, 4 * x + 2 * f, 5 * x + 3 * f // 2 if quant else 0, 15 * x // 2 + 3 * f // 2)
    outer = 6 * tokens * cfg.head_dim + (2 * cfg.num_layers + 4) * batch * cfg.text_len * cfg.dim * dtype_bytes
    return max(blocks + outer, 24 * cfg.dim ** 2)


def text_encoder_activation_bytes(cfg: TextEncoderConfig, prompts: int = 1) -> int:
    """One umT5 forward: per layer the [heads, L, L] scores (bf16 logits, fp32 softmax, bf16 probs, the
    position bias), the gated FFN's three [L, d_ff] tensors and a few [L, d] states."""
    L = cfg.text_len
    return prompts * (cfg.num_heads * L * L * (2 + 4 + 2 + 4) + 3 * L * cfg.d_ff * BF16 + 8 * L * cfg.d_model * BF16)


def _decoder_levels(cfg: VAEConfig) -> Iterator[tuple[str, int, int, int, int]]:
    """Decoder3d walk: ("res" | "up", in channels, out channels, time multiplier, area multiplier) of every
    residual block and temporal upsample, in order, relative to the latent grid."""
    mults = cfg.dim_mult[::-1]
    dims = [cfg.dim * m for m in (mults[0], *mults)]
    temporal = cfg.temporal_downsample[::-1]
    yield from [("res", dims[0], dims[0], 1, 1)] * 2                          # middle
    tm, am = 1, 1
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        if i > 0:
            cin //= 2
        for j in range(cfg.num_res_blocks + 1):
            yield "res", cin if j == 0 else cout, cout, tm, am
        if i < len(mults) - 1:
            if temporal[i]:
                yield "up", cout, 2 * cout, tm, am
            tm, am = tm * (2 if temporal[i] else 1), am * 4


def vae_decode_bytes(cfg: VAEConfig, h: int, w: int, *, chunk: int, tile: int | None = None,
                     batch: int = 1, dtype_bytes: int = BF16) -> int:
    """Peak working memory of `WanVAE.decode(fast=True)` over a latent [batch, z, T, h, w], output excluded:
    - the largest residual block of one pass over one tile: its input (kept for the shortcut), one
      time-padded buffer (2 extra frames) and one conv output (+ the shortcut conv's output);
    - the caches: every causal conv keeps its last 2 input frames (old entries are dropped as the new
      ones are made, so about one set is live);
    - the middle attention's scores for the frames of one SDPA call; the previous pass's pixels."""
    th, tw = (h, w) if tile is None else (min(tile, h), min(tile, w))
    block = caches = 0
    for kind, cin, cout, tm, am in _decoder_levels(cfg):
        f, area = chunk * tm, th * tw * am
        if kind == "res":   # x stays; then [buffer, conv out] twice; then the shortcut conv's output
            phases = (cin * (f + 2) + cout * f, cout * f + cout * (f + 2), 2 * cout * f if cin != cout else 0)
            block = max(block, (cin * f + max(phases)) * area)
            caches += 2 * (cin + cout) * area
        else:
            caches += 2 * cin * area
    last_c, f, area = cfg.dim, chunk * cfg.temporal_factor, th * tw * cfg.spatial_factor ** 2
    head = (last_c * (2 * f + 2) + 3 * f) * area
    caches += 2 * cfg.z_dim * th * tw + 2 * last_c * area   # decoder conv1 (latent grid), head
    scores = min(ATTENTION_SCORES, chunk * (th * tw) ** 2) * 4
    return batch * (max(block, head) + caches + 3 * f * area) * dtype_bytes + scores


def video_elements(cfg: VAEConfig, frames: int, h: int, w: int, batch: int = 1) -> int:
    """Elements of the decoded video [batch, 3, 4(T-1)+1, 8h, 8w] (multiply by bytes per element)."""
    return batch * 3 * (1 + cfg.temporal_factor * (frames - 1)) * h * w * cfg.spatial_factor ** 2


def vae_encode_bytes(cfg: VAEConfig, frames: int, height: int, width: int, batch: int = 1,
                     dtype_bytes: int = BF16) -> int:
    """Streaming encode (reference modules, 4 frames per pass) of the i2v conditioning clip: ~6
    full-resolution activations of a pass (norm, SiLU, cat and pad copies), the full-resolution
    caches, the input clip and the latent. A rough bound (the encode is not on the critical path)."""
    act = cfg.dim * cfg.temporal_factor * height * width
    caches = 2 * cfg.dim * height * width * (2 * cfg.num_res_blocks + 1)
    clip = 3 * frames * height * width
    return batch * (6 * act + caches + clip) * dtype_bytes


# ---- the plan ------------------------------------------------------------------------------------

def stage_bytes(spec: ModelSpec, width: int, height: int, frames: int, plan: MemoryPlan, *, quant: bool,
                attention: str, num_samples: int = 1, cfg: bool = False) -> dict[str, int]:
    """Estimated peak bytes of every stage under `plan` (image_encode only for i2v)."""
    dit = dit_param_bytes(spec.dit, quant=quant, attention=attention)
    block = dit_block_streamed_bytes(spec.dit, quant=quant, attention=attention)
    experts = 2 if spec.two_experts else 1
    # With streaming, the streamed blocks sit in CPU memory and one at a time is copied in.
    dit_gpu = dit - plan.streamed_blocks * block + (block if plan.streamed_blocks else 0)
    dit_all = dit_gpu * (1 if plan.experts == "swap" else experts)
    vae = vae_param_bytes(spec.vae)
    te = text_encoder_param_bytes(spec.text)
    te_kept = te if plan.text_encoder == "gpu" else 0
    dit_early = 0 if plan.text_encoder == "free" else dit_all     # "free": the DiT comes in after encoding
    T, h, w = latent_grid(spec, width, height, frames)
    batch = num_samples * (2 if cfg else 1)
    latents = 6 * num_samples * spec.vae.z_dim * T * h * w * 4    # noise, x, x0, new noise (fp32), cond
    out = {"text_encode": vae + dit_early + (te + text_encoder_activation_bytes(spec.text, 1 + cfg)
                                             if plan.text_encoder != "cpu" else 0)}
    if spec.task == "i2v":
        out["image_encode"] = vae + dit_early + te_kept + vae_encode_bytes(spec.vae, frames, height, width)
    out["denoise"] = (vae + te_kept + dit_all + latents
                      + dit_activation_bytes(spec.dit, dit_tokens(spec, width, height, frames), batch, quant=quant))
    # Decode: working memory next to the bf16 video (+ the fp32 tile accumulator); afterwards the
    # pipeline's .float() and uint8 conversion (video.py) hold ~16 bytes per video element at once.
    video = video_elements(spec.vae, T, h, w, num_samples)
    tiled = plan.vae_tile is not None and plan.vae_tile < max(h, w)
    decode = vae_decode_bytes(spec.vae, h, w, chunk=plan.vae_chunk, tile=plan.vae_tile, batch=num_samples)
    out["vae_decode"] = (vae + te_kept + (0 if plan.offload_dit_for_decode else dit_all) + latents
                         + max(decode + video * (BF16 + (4 if tiled else 0)), video * POSTPROCESS_BYTES))
    return out


def _candidates(spec: ModelSpec, plan: MemoryPlan, over, reuse_text_encoder: bool, grid) -> Iterator[MemoryPlan]:
    """Ever more frugal plans, each step taken only while `over(plan)` names a stage it can help. The
    denoise steps come before the decode steps because fewer resident DiT weights help the decode too."""
    T, h, w = grid
    yield plan
    if over(plan):
        # The text encoder first: freeing it costs nothing in a one-shot run.
        plan = replace(plan, text_encoder="cpu" if reuse_text_encoder else "free")
        yield plan
        if "text_encode" in over(plan):
            plan = replace(plan, text_encoder="cpu")
            yield plan
    if spec.two_experts and over(plan) - {"text_encode"}:
        plan = replace(plan, experts="swap")
        yield plan
    while over(plan) & {"denoise", "text_encode", "image_encode"} and plan.streamed_blocks < spec.dit.num_layers:
        # one streamed block saves nothing (its GPU copy takes the same room): start at two
        plan = replace(plan, streamed_blocks=max(2, plan.streamed_blocks + 1))
        yield plan
    while "vae_decode" in over(plan) and plan.vae_chunk > 1:
        plan = replace(plan, vae_chunk=max(1, plan.vae_chunk // 2))
        yield plan
    if "vae_decode" in over(plan):
        plan = replace(plan, offload_dit_for_decode=True)
        yield plan
    for tile in VAE_TILES:
        if "vae_decode" not in over(plan):
            break
        if tile < max(h, w):
            plan = replace(plan, vae_tile=tile)
            yield plan


def plan_memory(spec: ModelSpec, width: int, height: int, frames: int, *, quant: bool, attention: str,
                budget_gb: float, num_samples: int = 1, cfg: bool = False,
                reuse_text_encoder: bool = False) -> MemoryPlan:
    """The fastest plan whose estimated stage peaks all fit in budget_gb (minus a 0.5 GB reserve).

    cfg: the teacher sampler's classifier-free guidance (DiT batch x2). reuse_text_encoder: the text
    encoder must survive the call (server): it is kept on the GPU or moved to the CPU, never freed.
    Raises ValueError (one line) when no plan fits."""
    if budget_gb <= 0:
        raise ValueError(f"--max-memory must be positive, got {budget_gb} GB")
    grid = latent_grid(spec, width, height, frames)
    limit = budget_gb * GB - RESERVE

    def estimate(plan: MemoryPlan) -> dict[str, int]:
        return stage_bytes(spec, width, height, frames, plan, quant=quant, attention=attention,
                           num_samples=num_samples, cfg=cfg)

    def over(plan: MemoryPlan) -> set[str]:
        return {stage for stage, b in estimate(plan).items() if b > limit}

    start = MemoryPlan(budget_gb, vae_chunk=decode_chunk_frames(spec.vae, grid[1], grid[2]))
    best = None
    for plan in _candidates(spec, start, over, reuse_text_encoder, grid):
        best = plan
        if not over(plan):
            break
    stages = estimate(best)
    if over(best):
        need = math.ceil((max(stages.values()) + RESERVE) / GB * 10) / 10   # rounded up: that budget fits
        mode = " with --quant" if quant else " in bf16 (--quant needs less)"
        raise ValueError(f"{spec.name} {width}x{height} {frames} frames needs at least {need:.1f} GB{mode}; "
                         f"budget is {budget_gb:.1f} GB")
    return replace(best, stages_gb=tuple((s, round(b / GB, 2)) for s, b in stages.items()))


# ---- applying a plan -----------------------------------------------------------------------------
# Weights move by replacing each module's parameter/buffer slot (a new Parameter around the moved
# tensor), so the modules and their hooks stay. The pinned CPU copy made by the first offload is kept
# and reused: inference weights do not change, and re-pinning 14 GB costs seconds. Change weights only
# while the module is on the CPU (or call `offload(module, refresh=True)`).

def _slots(module: nn.Module, skip: set[int] = frozenset()) -> Iterator[tuple[nn.Module, str, bool]]:
    for m in module.modules():
        if id(m) in skip:
            continue
        for name, p in m._parameters.items():
            if p is not None:
                yield m, name, True
        for name, b in m._buffers.items():
            if b is not None:
                yield m, name, False


def _get(m: nn.Module, name: str, is_param: bool) -> torch.Tensor:
    return m._parameters[name].detach() if is_param else m._buffers[name]


def _set(m: nn.Module, name: str, is_param: bool, t: torch.Tensor) -> None:
    if is_param:
        m._parameters[name] = nn.Parameter(t, requires_grad=m._parameters[name].requires_grad)
    else:
        m._buffers[name] = t


def _host_copy(m: nn.Module, name: str, is_param: bool, refresh: bool = False) -> torch.Tensor:
    store = m.__dict__.setdefault("_turbovid_host", {})
    if refresh or name not in store:
        t = _get(m, name, is_param)
        if torch.cuda.is_available():   # pinned: copies to the GPU can run asynchronously
            store[name] = torch.empty_like(t, device="cpu", pin_memory=True).copy_(t)
        else:
            store[name] = t.detach().to("cpu")
    return store[name]


def _streamed(module: nn.Module) -> set[int]:
    """ids of the modules inside streamed blocks whose weights stay on the CPU between uses."""
    return {id(sub) for m in module.modules() if getattr(m, "_turbovid_streamed", False)
            for sub in m.modules() if id(sub) not in m._turbovid_keep}


def offload(module: nn.Module, refresh: bool = False, skip: set[int] = frozenset()) -> nn.Module:
    """Point every weight (outside the modules in `skip`) at its pinned CPU copy, freeing the GPU memory."""
    for m, name, is_param in _slots(module, skip):
        _set(m, name, is_param, _host_copy(m, name, is_param, refresh))
    return module


def swap_in(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Copy every weight to `device` (asynchronous from pinned memory), except streamed blocks."""
    for m, name, is_param in _slots(module, _streamed(module)):
        t = _get(m, name, is_param)
        if t.device != torch.device(device):
            _set(m, name, is_param, _host_copy(m, name, is_param).to(device, non_blocking=True))
    return module


# Parts of a WanBlock used outside its forward: WanDiT.text_kv runs every block's cross-attention K/V
# projections up front (once per prompt with the text K/V cache), so these stay on the GPU when streaming.
STREAM_KEEP = ("cross_attn.k", "cross_attn.v", "cross_attn.norm_k", "cross_attn.k_img", "cross_attn.v_img",
               "cross_attn.norm_k_img")


class StreamedBlocks:
    """Keeps `blocks` (but their STREAM_KEEP parts) in pinned CPU memory; a block's weights are copied to
    `device` by a forward pre-hook and dropped by a forward hook, so one streamed block at a time occupies
    the GPU. Costs one host-to-device copy per block per forward: measured on the H100, 11 streamed 14B
    W8A8 blocks added 48 ms to a 3.84 s forward at 720p (the copies are asynchronous from pinned memory)."""

    def __init__(self, blocks: list[nn.Module], device: torch.device | str):
        self.blocks, self.device, self.handles = blocks, torch.device(device), []
        for block in blocks:
            block._turbovid_keep = {id(sub) for name, m in block.named_modules() if name in STREAM_KEEP
                                    for sub in m.modules()}
            offload(block, skip=block._turbovid_keep)
            block._turbovid_streamed = True
            self.handles.append(block.register_forward_pre_hook(self._load))
            self.handles.append(block.register_forward_hook(self._unload))

    def _load(self, block: nn.Module, args) -> None:
        for m, name, is_param in _slots(block, block._turbovid_keep):
            _set(m, name, is_param, _host_copy(m, name, is_param).to(self.device, non_blocking=True))

    @staticmethod
    def _unload(block: nn.Module, args, output) -> None:
        offload(block, skip=block._turbovid_keep)

    def remove(self) -> None:
        """Stop streaming; the blocks go back to `device`."""
        for h in self.handles:
            h.remove()
        for block in self.blocks:
            block._turbovid_streamed = False
            swap_in(block, self.device)


def stream_blocks(dit: nn.Module, count: int, device: torch.device | str) -> StreamedBlocks | None:
    """Stream the last `count` of dit.blocks (idempotent: a DiT already streaming keeps its setup)."""
    if count <= 0:
        return None
    existing = dit.__dict__.get("_turbovid_streamer")
    if existing is not None:
        return existing
    dit._turbovid_streamer = StreamedBlocks(list(dit.blocks)[-count:], device)
    return dit._turbovid_streamer


def prepare_stage(pipe, plan: MemoryPlan, stage: str) -> None:
    """Move the pipeline's models where `plan` wants them before `stage` runs (one of STAGES). Idempotent."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    dev = pipe.device
    swap_in(pipe.vae, dev)   # small (0.25 GB), needed by image_encode and vae_decode: always resident
    experts = [pipe.dit] + ([pipe.dit_low] if pipe.dit_low is not None else [])
    for net in experts:
        stream_blocks(net, plan.streamed_blocks, dev)
    encoder = pipe.text_encoder
    if stage == "text_encode":
        if plan.text_encoder == "free":          # the DiT comes in after the encoder is gone
            for net in experts:
                offload(net)
        elif plan.experts == "swap" and pipe.dit_low is not None:
            offload(pipe.dit_low)
        if encoder.model is not None:
            encoder.model.to("cpu" if plan.text_encoder == "cpu" else dev)   # no-op when already there
        return
    if plan.text_encoder == "free" and encoder.model is not None:
        encoder.free()
    if stage == "denoise":
        if plan.experts == "swap" and pipe.dit_low is not None:
            offload(pipe.dit_low)
        for net in experts if plan.experts != "swap" else experts[:1]:   # the high-noise expert runs first
            swap_in(net, dev)
    elif stage == "vae_decode" and plan.offload_dit_for_decode:
        for net in experts:
            offload(net)


def activate_expert(pipe, plan: MemoryPlan, net: nn.Module) -> nn.Module:
    """Before a denoising step: with plan.experts == "swap", offload the other expert, then load `net`."""
    if plan.experts == "swap" and pipe.dit_low is not None:
        other = pipe.dit_low if net is pipe.dit else pipe.dit
        offload(other)
        swap_in(net, pipe.device)
    return net


@contextmanager
def track_peak(peaks: dict[str, float], stage: str, device: torch.device | str):
    """Record the stage's peak allocated GPU memory (GB) in peaks[stage]; nothing off CUDA."""
    dev = torch.device(device)
    if dev.type != "cuda":
        yield
        return
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    try:
        yield
    finally:
        torch.cuda.synchronize(dev)
        peaks[stage] = round(torch.cuda.max_memory_allocated(dev) / GB, 3)
