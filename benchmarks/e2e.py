"""One Wan2.1-1.3B 480p/81-frame video end to end on one GPU, and the waterfall of DiT accelerations.

Random weights at the real shapes (no checkpoint download); everything below runs in one process:

Stages of the turbo video (CUDA-synchronised wall time, peak GPU memory of each stage):
  text_encode   umT5-xxl encoder (5.68 B parameters, random bf16), one prompt padded to 512 tokens
  dit           4 rCM steps on the latent [1, 16, 21, 60, 104] (L = 21*30*52 = 32760 tokens), per step
  vae_decode    turbovid.models.vae.WanVAE.decode, full-size random weights, bf16
  mp4_write     uint8 conversion + file write (H.264 through imageio-ffmpeg, x264 preset veryfast; OpenCV mp4v
                where imageio-ffmpeg is missing). Random weights decode to noise-like frames, an encoder's worst
                case, so mp4_write_procedural_* also time a procedural training clip at 832 x 480 (not in sums)
  vae_decode_and_mp4  the two above as `turbovid generate` runs them: each decoder pass's frames go to the
                encoder thread at once (turbovid.video.VideoWriter), so encoding overlaps decoding
End to end = text_encode + dit (best row) + vae_decode_and_mp4; the sequential sum is reported beside it.

Waterfall (DiT time of one video; quality = final latent vs ours bf16 dense at the same steps and seed,
rel-L2 and cosine; random weights make sparse attention look worse than on trained, peaked attention):
  1 diffusers WanTransformer3DModel bf16, 50 steps + CFG  EXTRAPOLATED: 50 x one batch-2 (cond+uncond) forward
  2 ours bf16 dense, 50 steps + CFG                        EXTRAPOLATED likewise (same weights as row 1)
  3 ours, rCM 4 steps                                      measured: one whole 4-step video
  4 + SageSLA top-k 0.1                                    measured
  5 + W8A8 (fast format; activation quantization as a separate pass)
  6 + fused norms (norm -> INT8 straight into the GEMMs, gated residuals in the GEMM epilogues) + text K/V cache
  7 + fused q/k RMSNorm + RoPE (kernels/qk_norm_rope.py)
  8 + torch.compile of the blocks
Rows 1-2 report the one-forward velocity error against ours instead (no 50-step latent is computed).

Wan2.1-14B 720p (latent [1, 16, 21, 90, 160], L = 75600; the full run ends with its DiT rows, --only-14b times one
14B video alone). diffusers' WanTransformer3DModel is built on the meta device and materialised in bf16 on the GPU with
random weights; ours is loaded from the same tensors (load_dit). DiT rows (dit_14b):
  diffusers bf16, 50 steps + CFG    EXTRAPOLATED: 50 x one batch-2 (cond+uncond) forward, no warm-up (a 50-step CFG
                                    14B run does not fit a 10-minute command); velocity error against ours
  ours bf16 dense, 50 steps + CFG   EXTRAPOLATED likewise (same weights)
  ours bf16 dense                   one batch-1 forward (no warm-up), x4 for 4 steps
  turbo: SageSLA 0.1 + W8A8 fast + fused norms + fused q/k + text K/V cache (no compile), applied in place once the
         diffusers model is freed: one whole 4-step video after an autotune forward
--only-14b also times that video's stages: text_encode (umT5-xxl as above; its context feeds the DiT), dit_4_steps
(the turbo video), then, the DiT freed, vae_decode (full-size random WanVAE, its final latent at 1280 x 720) and
vae_decode_and_mp4 (decode streamed into the mp4 writer; no separate mp4_write at 720p), and
end_to_end = text_encode + dit_4_steps + vae_decode_and_mp4; targets dit_4step_14b_s and e2e_14b_s.

    PYTHONPATH=. python benchmarks/e2e.py [--quick] [--out DIR] [--deadline SECONDS] [--no-14b | --only-14b]
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere

from common import print_table, time_cuda, write_results  # noqa: E402

from turbovid.config import DEFAULT_PRESET, MODELS, TextEncoderConfig, VAEConfig  # noqa: E402
from turbovid.loading import load_dit  # noqa: E402
from turbovid.models.dit import WanDiT  # noqa: E402
from turbovid.models.text_encoder import TextEncoder, make_umt5  # noqa: E402
from turbovid.models.vae import WanVAE  # noqa: E402
from turbovid.pipeline import byte_tokenizer, decode_to_frames  # noqa: E402
from turbovid.sampling import rcm_sample, rcm_times  # noqa: E402
from turbovid.speedups import (compile_blocks, enable_text_kv_cache, fuse_block_norms, fuse_qk_norm_rope,  # noqa: E402
                               quantize, set_attention)
from turbovid.video import VideoWriter, tile_samples, to_uint8_frames, write_video  # noqa: E402

# What runs (module constants, so a CPU smoke run can shrink them).
DEVICE = "cuda"
DIT_1P3B, DIT_14B = MODELS["Wan2.1-1.3B"].dit, MODELS["Wan2.1-14B"].dit
TEXT, VAE = TextEncoderConfig(), VAEConfig()
LATENT_480P = (1, 16, 21, 60, 104)
LATENT_720P = (1, 16, 21, 90, 160)
PROMPT = "A red fox trots through fresh snow at dawn, its breath steaming, the camera tracking low beside it."
TARGETS = {"dit_4step_1.3b_s": 0.45, "vae_decode_s": 0.5, "e2e_s": 1.2, "dit_4step_14b_s": 9.0, "e2e_14b_s": 12.0}
BASELINES = ("diffusers WanTransformer3DModel bf16, 50 steps + CFG", "ours bf16 dense (SDPA), 50 steps + CFG")
START = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - START


def sync() -> None:
    torch.cuda.synchronize()


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9


def quality(out: torch.Tensor, ref: torch.Tensor) -> dict:
    o, r = out.double().flatten(), ref.double().flatten()
    return {"rel_l2": ((o - r).norm() / r.norm()).item(), "cos": F.cosine_similarity(o, r, dim=0).item()}


def random_init_(model: torch.nn.Module, dim: int, seed: int = 0) -> torch.nn.Module:
    """In-place init of a DiT (ours or diffusers') materialised with to_empty: weights U(±fan_in^-0.5) (PyTorch's
    default scale; fan_in = `dim` for biases), norms 1/0, modulation tables (`scale_shift_table`) N(0, 1/d)."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith(("modulation", "scale_shift_table")):
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=g)
            else:
                fan_in = math.prod(p.shape[1:]) if p.dim() >= 2 else dim
                p.uniform_(-fan_in ** -0.5, fan_in ** -0.5, generator=g)
    return model


def verdict(measured: dict) -> dict:
    return {k: {"target": TARGETS[k], "measured": v, "ratio": None if v is None else v / TARGETS[k],
                "met": None if v is None else v <= TARGETS[k]} for k, v in measured.items()}


def video_dit(net, noise: torch.Tensor, context: torch.Tensor, steps: int = 4, seed: int = 0):
    """One rCM video (SDE, sigma_max 80): (final latent fp32, per-step seconds, whole-loop seconds)."""
    step_s = []

    def velocity(x, t_net, i, s_cur):
        sync()
        t0 = time.perf_counter()
        v = net(x.to(torch.bfloat16), t_net, context)
        sync()
        step_s.append(time.perf_counter() - t0)
        return v
    generator = torch.Generator(DEVICE).manual_seed(seed)
    torch.randn(noise.shape, device=DEVICE, generator=generator)     # the draw that made `noise` (RNG order)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        latent = rcm_sample(velocity, noise, rcm_times(steps, 80.0), generator)
    sync()
    return latent, step_s, time.perf_counter() - t0


def diffusers_dit(cfg, meta: bool = False):
    """diffusers' WanTransformer3DModel of `cfg`, bf16 on the GPU: built there in fp32 with diffusers' init, or with
    meta=True (a 14B model never exists in fp32) built on the meta device, materialised in bf16 and given random_init_
    weights; to_empty leaves its RoPE tables (buffers, not in the state dict) uninitialised, so they are rebuilt."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta" if meta else DEVICE):
        torch.manual_seed(0)
        ref = WanTransformer3DModel(num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                                    ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, text_dim=cfg.text_dim,
                                    freq_dim=cfg.freq_dim)
    ref = ref.to(torch.bfloat16)
    if meta:
        rope = ref.rope
        ref = random_init_(ref.to_empty(device=DEVICE), cfg.dim)
        ref.rope = type(rope)(rope.attention_head_dim, rope.patch_size, rope.max_seq_len).to(DEVICE, torch.bfloat16)
    return ref.eval().requires_grad_(False)


def baseline_forwards(ref, ours, noise: torch.Tensor, context: torch.Tensor, iters: int) -> list[dict]:
    """The BASELINES rows (diffusers' model `ref` and `ours` on the same weights, 50 steps + CFG) extrapolated from
    batch-2 forwards (cond + uncond in one batch, as our pipeline): the median of `iters` after two warm-up forwards,
    or with iters=0 the first forward itself (a 14B one takes ~25 s). Peak memory of each model's forwards; the
    diffusers row carries its velocity error against ours."""
    x2 = noise.repeat(2, 1, 1, 1, 1).to(torch.bfloat16) * 0.9
    t2 = torch.tensor([900.0, 900.0], device=DEVICE)
    ctx2 = torch.cat([context, torch.zeros_like(context)])
    forwards = (lambda: ref(hidden_states=x2, timestep=t2, encoder_hidden_states=ctx2, return_dict=False)[0],
                lambda: ours(x2, t2, ctx2))
    how = f"median of {iters} batch-2 forwards" if iters else "one batch-2 forward, no warm-up"
    rows, velocities = [], []
    for name, fn in zip(BASELINES, forwards):
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            sync()
            t0 = time.perf_counter()
            velocities.append(fn())
            sync()
            ms = time_cuda(fn, warmup=1, iters=iters) if iters else 1e3 * (time.perf_counter() - t0)
        rows.append({"config": name, "steps": 50, "dit_s": 50 * ms / 1e3, "step_ms": ms, "peak_gb": peak_gb(),
                     "measured": f"extrapolated: 50 x {ms:.0f} ms ({how})"})
    rows[0].update(quality(*velocities), quality_of="one batch-2 velocity vs ours (same weights)")
    rows[1]["quality_of"] = "reference of the 50-step rows"
    return rows


# ---- stages -----------------------------------------------------------------------------------------

def text_encode_stage(iters: int) -> tuple[dict, torch.Tensor]:
    torch.cuda.reset_peak_memory_stats()
    with torch.device("meta"):
        model = make_umt5(TEXT)
    model = model.to(torch.bfloat16).to_empty(device=DEVICE)
    g = torch.Generator(DEVICE).manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.fill_(1.0)
            else:   # T5-style scale: embeddings ~1, projections ~fan_in^-0.5
                p.normal_(0.0, 1.0 if p.dim() == 1 or "embed" in name or "shared" in name else p.shape[1] ** -0.5,
                          generator=g)
    model.encoder.embed_tokens.weight = model.shared.weight
    encoder = TextEncoder(model, byte_tokenizer(), TEXT.text_len)
    context = encoder.encode([PROMPT])
    ms = time_cuda(lambda: encoder.encode([PROMPT]), warmup=1, iters=iters)
    row = {"stage": "text_encode", "s": ms / 1e3, "peak_gb": peak_gb(),
           "note": f"umT5-xxl {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params bf16, 512 tokens"}
    encoder.free()
    torch.cuda.empty_cache()
    return row, context.to(torch.bfloat16)


def waterfall_1p3b(context: torch.Tensor, quick: bool, deadline: float, results: dict, save) -> tuple:
    """Rows 1-7; returns (final latent, row) of the fastest 4-step configuration."""
    cfg = DIT_1P3B
    rows = results.setdefault("waterfall", [])
    noise = torch.randn(LATENT_480P, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    iters = 1 if quick else 2

    # 1-2: the 50-step CFG baselines, from timed batch-2 forwards.
    ref = diffusers_dit(cfg)
    ours = load_dit(ref.state_dict(), cfg, device=DEVICE).eval().requires_grad_(False)   # the same tensors
    rows += [{"row": i + 1, **r} for i, r in enumerate(baseline_forwards(ref, ours, noise, context, iters))]
    ref = None       # free the diffusers model (ours keeps the shared weights)
    torch.cuda.empty_cache()

    # 3-7: one model, accelerated step by step; each row times a whole 4-step video after a warm-up forward.
    def row(name: str, net, reference=None):
        with torch.no_grad():
            net(noise.to(torch.bfloat16), torch.tensor([988.0], device=DEVICE), context)     # compile/autotune
        cache = net.__dict__.get("text_kv")
        if cache is not None:
            cache.clear()                      # the timed video pays for its one text K/V computation
        torch.cuda.reset_peak_memory_stats()
        latent, step_s, total = video_dit(net, noise, context)
        r = {"row": len(rows) + 1, "config": name, "steps": 4, "dit_s": total,
             "step_ms": 1e3 * statistics.median(step_s), "steps_ms": [round(1e3 * s, 2) for s in step_s],
             "peak_gb": peak_gb(), "measured": "one 4-step video"}
        r.update(quality(latent, reference if reference is not None else latent))
        rows.append(r)
        print_table([r], ["row", "config", "dit_s", "step_ms", "rel_l2", "cos", "peak_gb"])
        return latent, r

    steps = [("ours, rCM 4 steps (bf16 dense)", None),
             ("+ SageSLA top-k 0.1", lambda m: set_attention(m, "sagesla", 0.1)),
             ("+ W8A8 (fast format)", lambda m: quantize(m, "fast")),
             ("+ fused norms/int8 emit/epilogues + text K/V cache",
              lambda m: enable_text_kv_cache(fuse_block_norms(m))),
             ("+ fused q/k RMSNorm + RoPE", fuse_qk_norm_rope),
             ("+ torch.compile of the blocks", compile_blocks)]
    reference, ran = None, []
    budget = [15, 20, 20, 25, 20, 40]        # seconds a row needs at least (Triton compiles not included)
    for (name, apply), need in zip(steps, budget):
        print(f"[{elapsed():.0f} s] {name}", flush=True)
        if time.perf_counter() - START > deadline - need:
            rows.append({"row": len(rows) + 1, "config": name, "measured": "skipped: time limit"})
            continue
        try:
            if apply is not None:
                apply(ours)
            ran.append(row(name, ours, reference))
            reference = ran[0][0] if reference is None else reference
        except Exception as e:  # keep the rows measured so far
            traceback.print_exc()
            rows.append({"row": len(rows) + 1, "config": name, "measured": f"failed: {type(e).__name__}: {e}"[:300]})
        save()
    if ran and time.perf_counter() - START < deadline - 20:
        try:
            results["profile_1p3b"] = profile_forward(ours, noise, context)
        except Exception as e:
            results["profile_1p3b"] = [{"kernel": f"profiler failed: {type(e).__name__}: {e}"[:200]}]
    ours = None
    torch.cuda.empty_cache()
    return min(ran, key=lambda r: r[1]["dit_s"]) if ran else (None, None)   # the fastest configuration


def profile_forward(net, noise, context, top: int = 14) -> list[dict]:
    """Where one DiT forward of the final configuration spends GPU time: the largest kernels by total time."""
    from torch.profiler import ProfilerActivity, profile
    x, t = noise.to(torch.bfloat16), torch.tensor([988.0], device=DEVICE)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        net(x, t, context)
        sync()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in events)
    events.sort(key=lambda e: -e.self_device_time_total)
    rows = [{"kernel": e.key[:90], "ms": e.self_device_time_total / 1e3, "calls": e.count,
             "share": e.self_device_time_total / total} for e in events[:top]]
    return rows + [{"kernel": "TOTAL", "ms": total / 1e3}]


def w8a8_layers(dim: int, ffn: int, tokens: int) -> list[dict]:
    """Each block Linear of one DiT forward as the fused path runs it, against cuBLAS bf16 (F.linear alone):
    int8 'standalone' = per-token quantization pass + GEMM (FastInt8Linear.forward); 'fused' = GEMM on the INT8
    activations the norm kernel already emitted, with its epilogue (GELU or gated residual). CUDA-graph timing."""
    from bench_gemm import time_graph

    from turbovid.kernels import int8_gemm as IG
    g = torch.Generator(DEVICE).manual_seed(3)
    rows = []
    # (layer, K, N, epilogue, calls per block): q/k/v/cross-q plain, o/cross-o gated, ffn.0 GELU, ffn.2 gated
    for name, k, n, epi, calls in (("q,k,v,cross-q", dim, dim, "", 4), ("o,cross-o", dim, dim, "gated", 2),
                                   ("ffn.0", dim, ffn, "gelu", 1), ("ffn.2", ffn, dim, "gated", 1)):
        x = torch.randn(tokens, k, device=DEVICE, generator=g).to(torch.bfloat16)
        w = (torch.randn(n, k, device=DEVICE, generator=g) * k ** -0.5).to(torch.bfloat16)
        b = torch.zeros(n, device=DEVICE, dtype=torch.bfloat16)
        res = torch.randn(tokens, n, device=DEVICE, generator=g).to(torch.bfloat16)
        gate = torch.rand(1, n, device=DEVICE, generator=g)
        qw, sw = IG.quant_per_token(w)
        qx, sx = IG.quant_per_token(x)
        kw = dict(gelu=epi == "gelu", residual=res if epi == "gated" else None, gate=gate if epi == "gated" else None,
                  tokens_per_sample=tokens if epi == "gated" else None)
        bf16 = time_graph(lambda: F.linear(x, w, b))
        standalone = time_graph(lambda: IG.gemm_fast(*IG.quant_per_token(x), qw, sw, b, **kw))
        fused = time_graph(lambda: IG.gemm_fast(qx, sx, qw, sw, b, **kw))
        rows.append({"layer": name, "shape": f"{tokens}x{k}->{n}", "epilogue": epi or "bias", "calls": calls,
                     "bf16_ms": bf16, "int8_standalone_ms": standalone, "int8_fused_ms": fused,
                     "fused_tops": 2 * tokens * k * n / fused / 1e9, "speedup_fused": bf16 / fused,
                     "speedup_standalone": bf16 / standalone})
        x = w = res = qx = qw = None
    total = {key: sum(r[key] * r["calls"] for r in rows) for key in ("bf16_ms", "int8_standalone_ms", "int8_fused_ms")}
    rows.append({"layer": "per block", "shape": f"{dim}/{ffn}", **total,
                 "speedup_fused": total["bf16_ms"] / total["int8_fused_ms"],
                 "speedup_standalone": total["bf16_ms"] / total["int8_standalone_ms"]})
    return rows


def vae_stage(latent: torch.Tensor, iters: int) -> tuple[dict, torch.Tensor, WanVAE]:
    torch.manual_seed(1)
    with torch.device(DEVICE):
        vae = WanVAE(VAE).to(torch.bfloat16).eval().requires_grad_(False)
    z = latent.to(torch.bfloat16)
    with torch.no_grad():
        vae.decode(z, clamp=True)                                  # warm-up (cuDNN plans, kernel compiles)
        torch.cuda.reset_peak_memory_stats()
        times, video = [], None
        for _ in range(iters):
            sync()
            t0 = time.perf_counter()
            video = vae.decode(z, clamp=True)
            sync()
            times.append(time.perf_counter() - t0)
    return {"stage": "vae_decode", "s": statistics.median(times), "peak_gb": peak_gb(),
            "note": f"WanVAE.decode -> {tuple(video.shape)}, median of {iters}"}, video, vae


def video_backend() -> tuple[str, str]:
    if importlib.util.find_spec("imageio_ffmpeg") is not None:
        return "ffmpeg", "imageio-ffmpeg libx264"
    return "opencv", "OpenCV mp4v (imageio-ffmpeg missing on this machine)"


def write_mp4_bytes(frames, backend: str, preset: str = DEFAULT_PRESET) -> int:
    """Write uint8 frames to a throw-away mp4 (as `turbovid generate` would); its size in bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        return write_video(Path(tmp) / "video.mp4", frames, backend=backend, preset=preset).stat().st_size


def mp4_stage(video: torch.Tensor) -> dict:
    backend, how = video_backend()
    sync()
    t0 = time.perf_counter()
    frames = to_uint8_frames(tile_samples(video))                 # [F, H, W, 3] uint8 on the CPU
    size = write_mp4_bytes(frames, backend)
    how += f" preset {DEFAULT_PRESET}" if backend == "ffmpeg" else ""
    return {"stage": "mp4_write", "s": time.perf_counter() - t0, "peak_gb": None,
            "note": f"{frames.shape[0]} frames {frames.shape[2]}x{frames.shape[1]} of the random-weight video, {how}, "
                    f"{size / 1e6:.1f} MB"}


def mp4_content_rows() -> list[dict]:
    """The encoder's cost depends on the content, and a random-weight VAE draws noise-like frames (the worst case
    for any encoder). So also: 81 frames of a procedural clip of the training data (a shape moving over a
    background, rendered at 832 x 832, the middle 480 rows kept), per x264 preset; uint8 frames in, file out."""
    backend, how = video_backend()
    if backend != "ffmpeg":
        return []
    from turbovid.train.data import render, sample_clip

    clip = render(sample_clip(0, "train", 3), 832, 81)[:, :, 176:656]       # [3, 81, 480, 832] in [-1, 1]
    frames = to_uint8_frames(clip)
    rows = []
    for preset in (DEFAULT_PRESET, "medium"):
        t0 = time.perf_counter()
        size = write_mp4_bytes(frames, backend, preset)
        rows.append({"stage": f"mp4_write_procedural_{preset}", "s": time.perf_counter() - t0, "peak_gb": None,
                     "note": f"81 frames 832x480 of a procedural training clip, {how} preset {preset}, "
                             f"{size / 1e6:.2f} MB; not in the sums"})
    return rows


def decode_write_stage(vae: WanVAE, latent: torch.Tensor) -> dict:
    """What `turbovid generate` does after the DiT: the VAE decodes pass by pass and every pass's frames go to the
    mp4 encoder thread at once (pipeline.decode_to_frames + VideoWriter), so the two overlap. Until the file is closed."""
    backend, how = video_backend()
    z = latent.to(torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        sync()
        t0 = time.perf_counter()
        with VideoWriter(Path(tmp) / "video.mp4", backend=backend) as writer:
            decode_to_frames(vae, z, writer)
        seconds = time.perf_counter() - t0
    return {"stage": "vae_decode_and_mp4", "s": seconds, "peak_gb": peak_gb(),
            "note": f"decode passes streamed into the mp4 encoder thread ({how}); replaces the two rows above"}


def end_to_end_row(stages: list[dict]) -> dict:
    """text_encode + dit_4_steps + vae_decode_and_mp4 of `stages`: one video as `turbovid generate` makes it."""
    s = {r["stage"]: r["s"] for r in stages}
    return {"stage": "end_to_end", "s": s["text_encode"] + s["dit_4_steps"] + s["vae_decode_and_mp4"],
            "note": "text + DiT + (VAE decode overlapped with the mp4 write), as turbovid generate"}


def random_dit(cfg) -> WanDiT:
    """A bf16 WanDiT of `cfg` with random weights, built on the meta device and materialised on the GPU."""
    with torch.device("meta"):
        net = WanDiT(cfg).to(torch.bfloat16)
    return random_init_(net.to_empty(device=DEVICE), cfg.dim).eval().requires_grad_(False)


def turbo_14b_(net: WanDiT) -> WanDiT:
    """The 14B turbo row's accelerations, in place: SageSLA top-k 0.1, W8A8 fast, fused norms, text K/V cache,
    fused q/k RMSNorm + RoPE (no compile)."""
    set_attention(net, "sagesla", 0.1)
    quantize(net, "fast")
    return fuse_qk_norm_rope(enable_text_kv_cache(fuse_block_norms(net)))


TURBO_14B = "14B 720p SageSLA 0.1 + W8A8 fast + fused norms + fused q/k + text K/V (no compile)"


def turbo_row(results: dict) -> dict | None:
    return next((r for r in results.get("dit_14b", []) if r.get("config") == TURBO_14B and "dit_4step_s" in r), None)


def dit_14b(context: torch.Tensor, deadline: float, results: dict, save) -> torch.Tensor | None:
    """The 14B rows into results["dit_14b"] (saved after each): the 50-step CFG baselines (one batch-2 forward of
    diffusers' model and one of ours, same weights), ours bf16 dense (one batch-1 forward), then the turbo 4-step
    video. Returns that video's final latent (None when skipped)."""
    print(f"[{elapsed():.0f} s] Wan2.1-14B 720p", flush=True)
    cfg = DIT_14B
    rows = results.setdefault("dit_14b", [])
    latent = None
    noise = torch.randn(LATENT_720P, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    x, t = noise.to(torch.bfloat16), torch.tensor([988.0], device=DEVICE)

    def left(need: float, *configs: str) -> bool:   # False, with a "skipped" row per config, when time is short
        if time.perf_counter() - START < deadline - need:
            return True
        rows.extend({"config": c, "measured": "skipped: time limit"} for c in configs)
        return False

    ref = diffusers_dit(cfg, meta=True)
    net = load_dit(ref.state_dict(), cfg, device=DEVICE).eval().requires_grad_(False)   # the same tensors
    if left(120, *(f"14B 720p {c}" for c in BASELINES)):       # two ~25 s forwards, then the rows below
        rows += [{**r, "config": f"14B 720p {r['config']}", "forward_s": r["step_ms"] / 1e3}
                 for r in baseline_forwards(ref, net, noise, context, iters=0)]
        save()
    ref = None              # before turbo_14b_ replaces ours' bf16 weights: the shared tensors must go with them
    torch.cuda.empty_cache()
    if left(60, "14B 720p bf16 dense (SDPA)"):
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            sync()
            t0 = time.perf_counter()
            net(x, t, context)
            sync()
        s = time.perf_counter() - t0
        rows.append({"config": "14B 720p bf16 dense (SDPA)", "forward_s": s, "dit_4step_s": 4 * s,
                     "peak_gb": peak_gb(), "measured": "one forward (no warm-up), x4 for 4 steps"})
        save()
    if left(45, TURBO_14B):
        turbo_14b_(net)
        torch.cuda.empty_cache()
        with torch.no_grad():
            net(x, t, context)                                   # autotune at the 14B shapes
        net.text_kv.clear()
        torch.cuda.reset_peak_memory_stats()
        latent, step_s, total = video_dit(net, noise, context)
        rows.append({"config": TURBO_14B, "forward_s": statistics.median(step_s), "dit_4step_s": total,
                     "peak_gb": peak_gb(), "measured": "one 4-step video",
                     "steps_ms": [round(1e3 * v, 1) for v in step_s]})
        save()
    net = None
    torch.cuda.empty_cache()
    return latent


def video_14b(args, results: dict, save, iters: int) -> None:
    """--only-14b: one Wan2.1-14B 720p video's stages (text encode, the turbo DiT, VAE decode + mp4) and the 14B DiT
    rows; the verdict of the 14B targets."""
    stages = results["stages"]
    row, context = text_encode_stage(iters)
    stages.append(row)
    save()
    latent = dit_14b(context, args.deadline - 30, results, save)        # 30 s kept for the VAE and the mp4
    turbo = turbo_row(results)
    stages.append({"stage": "dit_4_steps", "s": turbo["dit_4step_s"], "peak_gb": turbo["peak_gb"],
                   "note": f"{turbo['config']}; steps ms {turbo['steps_ms']}"} if turbo else
                  {"stage": "dit_4_steps", "s": None, "note": "skipped: time limit"})
    save()
    if latent is None or elapsed() > args.deadline - 20:
        stages.append({"stage": "vae_decode_and_mp4", "s": None, "note": "skipped: time limit"})
    else:
        print(f"[{elapsed():.0f} s] VAE decode 720p", flush=True)
        row, video, vae = vae_stage(latent, iters=1)
        del video                      # 81 frames of 720p: no mp4_stage here, the streamed row below writes them
        torch.cuda.empty_cache()
        stages.append(row)
        save()
        stages.append(decode_write_stage(vae, latent))
        vae = None
        torch.cuda.empty_cache()
        stages.append(end_to_end_row(stages))
    e2e = next((r["s"] for r in stages if r["stage"] == "end_to_end"), None)
    results["verdict"] = verdict({"dit_4step_14b_s": turbo["dit_4step_s"] if turbo else None, "e2e_14b_s": e2e})
    save()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--out", help="results folder (default benchmarks/results)")
    parser.add_argument("--deadline", type=float, default=560.0, help="seconds; later sections are skipped")
    parser.add_argument("--reserve", type=float, default=110.0,
                        help="seconds before the deadline kept for the VAE, the mp4 and the 14B section")
    parser.add_argument("--no-14b", action="store_true", help="skip the Wan2.1-14B section")
    parser.add_argument("--only-14b", action="store_true", help="only the Wan2.1-14B section")
    args = parser.parse_args()
    iters = 1 if args.quick else 3
    results = {"shapes": {"latent_480p": LATENT_480P, "tokens_480p": 32760,
                                            "latent_720p": LATENT_720P, "tokens_720p": 75600},
               "targets": TARGETS, "stages": []}

    def save():   # the 14B-only run has its own name (a 1.3B run may follow it in the same folder)
        write_results("e2e_14b" if args.only_14b else "e2e", results, args.out)

    if args.only_14b:
        video_14b(args, results, save, iters)
        report(results)
        return
    row, context = text_encode_stage(iters)
    results["stages"].append(row)
    latent, best = waterfall_1p3b(context, args.quick, args.deadline - args.reserve, results, save)
    if latent is None:
        save()
        raise SystemExit("no 4-step DiT configuration ran; see the errors above")
    results["stages"].append({"stage": "dit_4_steps", "s": best["dit_s"], "peak_gb": best["peak_gb"],
                              "note": f"best row: {best['config']}; steps ms {best.get('steps_ms')}"})
    save()
    if elapsed() < args.deadline - 90:
        print(f"[{elapsed():.0f} s] W8A8 layers", flush=True)
        results["w8a8_layers_1p3b"] = w8a8_layers(DIT_1P3B.dim, DIT_1P3B.ffn_dim, math.prod(LATENT_480P[2:]) // 4)
    print(f"[{elapsed():.0f} s] VAE decode", flush=True)
    row, video, vae = vae_stage(latent, iters=1 if args.quick else 2)
    results["stages"].append(row)
    results["stages"].append(mp4_stage(video))
    video = None
    torch.cuda.empty_cache()
    sequential = sum(r["s"] for r in results["stages"])
    results["stages"] += mp4_content_rows()
    results["stages"].append(decode_write_stage(vae, latent))
    vae = None
    torch.cuda.empty_cache()
    results["stages"].append({"stage": "end_to_end_sequential", "s": sequential,
                              "note": "text + DiT + VAE decode + mp4 write, one after the other"})
    results["stages"].append(end_to_end_row(results["stages"]))
    save()
    if not args.no_14b:
        try:
            dit_14b(context, args.deadline, results, save)       # its final latent is not decoded here
        except Exception as e:
            traceback.print_exc()
            results.setdefault("dit_14b", []).append(
                {"config": "14B", "measured": f"failed: {type(e).__name__}: {e}"[:300]})
    turbo = turbo_row(results)
    stage_s = {r["stage"]: r["s"] for r in results["stages"]}
    results["verdict"] = verdict({"dit_4step_1.3b_s": best["dit_s"], "vae_decode_s": stage_s["vae_decode"],
                                  "e2e_s": stage_s["end_to_end"], "dit_4step_14b_s": turbo["dit_4step_s"] if turbo else None,
                                  "e2e_14b_s": None})         # measured by --only-14b
    save()
    report(results)


def report(results: dict) -> None:
    """The tables of whatever this run measured."""
    if results.get("waterfall"):
        print("\nwaterfall (Wan2.1-1.3B, 480p, 81 frames, DiT only)")
        print_table(results["waterfall"], ["row", "config", "steps", "dit_s", "step_ms", "rel_l2", "cos", "peak_gb",
                                           "measured"])
    print("\nstages of the turbo video")
    print_table(results["stages"], ["stage", "s", "peak_gb", "note"])
    if results.get("profile_1p3b"):
        print("\none forward of the last configuration, GPU time by kernel")
        print_table(results["profile_1p3b"], ["kernel", "ms", "calls", "share"])
    if results.get("w8a8_layers_1p3b"):
        print("\nW8A8 linears of one 1.3B block (ms per call; per-block row weighted by calls)")
        print_table(results["w8a8_layers_1p3b"], ["layer", "shape", "epilogue", "calls", "bf16_ms",
                                                  "int8_standalone_ms", "int8_fused_ms", "fused_tops",
                                                  "speedup_standalone", "speedup_fused"])
    if results.get("dit_14b"):
        print("\nWan2.1-14B 720p, DiT")
        print_table(results["dit_14b"], ["config", "forward_s", "dit_s", "dit_4step_s", "rel_l2", "cos", "peak_gb",
                                         "measured"])
    print("\ntargets")
    print_table([{"what": k, **v} for k, v in results["verdict"].items()],
                ["what", "target", "measured", "ratio", "met"])


if __name__ == "__main__":
    main()
