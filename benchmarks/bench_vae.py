"""Wan2.1 VAE decode at Wan shapes, and the 14B-720p W8A8 memory check of the memory plan.

Decode (full-size VAE, random weights shared by every provider; latent [1, 16, 21, 60, 104] = 480p/81 frames,
[1, 16, 21, 90, 160] = 720p): diffusers' AutoencoderKLWan bf16 (the anchor, when importable), TurboDiffusion's
frame-by-frame bf16 decode (`decode(fast=False)`), and ours (`decode(fast=True)`) with and without
channels-last, the Triton RMSNorm+SiLU, cudnn.benchmark, several chunk sizes and spatial tiles. Each row: warm
median time (CUDA events), the first call's time ("cold", includes cuDNN autotuning when benchmark is on), peak
allocated memory during warm calls (absolute, and "work" = peak minus what was allocated before the call),
the memory plan's estimate of that work, and rel_l1 against a TF32 fp32 frame-by-frame decode (480p).

Memory check (`video_memory`): the stages of one 14B 720p/81-frame W8A8 video under `plan_memory(budget)`,
each measured with its own peak: umT5-xxl encode (random weights) -> freed; the 14B DiT with int8 block
Linears (meta -> materialised on the GPU, random int8 weights) one forward with SageSLA (dense SDPA if SLA
fails) all resident, then with the plan's streamed blocks; the VAE decode with the DiT still resident. Also
the 1.3B bf16 480p forward, to check the activation estimate where the FFN is the peak.

    PYTHONPATH=. python benchmarks/bench_vae.py                  # everything, table + JSON
    PYTHONPATH=. python benchmarks/bench_vae.py --quick          # 480p decode rows only
    PYTHONPATH=. python benchmarks/bench_vae.py --budget-s 200   # skip rows once 200 s have passed
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import time
import traceback
from pathlib import Path

import torch
from common import print_table, time_cuda, write_results

from turbovid import memory as M
from turbovid.config import MODELS, VAEConfig
from turbovid.models.vae import WanVAE, decode_chunk_frames, latent_constants
from turbovid.video import tile_samples, to_uint8_frames

COLUMNS = ["case", "provider", "ms", "cold_ms", "peak_gb", "work_gb", "est_gb", "rel_l1", "note"]
LATENTS = {"480p": (1, 16, 21, 60, 104), "720p": (1, 16, 21, 90, 160)}
VIDEO = ("Wan2.1-14B", 1280, 720, 81)     # the memory check's video: model, width, height, frames
SMALL = ("Wan2.1-1.3B", 832, 480, 81)     # the FFN-bound activation check
GB = 1e9
DEVICE = "cuda"   # a dry run on CPU (tests of this script's plumbing) swaps it


class Deadline:
    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()


def _sync_free():
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def _rel_l1(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).abs().sum() / ref.abs().sum()).item()


def make_vaes(cfg: VAEConfig, with_diffusers: bool = True):
    """(diffusers AutoencoderKLWan bf16 or None, our WanVAE bf16, our WanVAE fp32), all with the same random
    weights (norm gains randomised too). diffusers builds them; loading maps its names to ours."""
    from turbovid.loading import load_vae
    torch.manual_seed(0)
    try:
        if not with_diffusers:
            raise ImportError("not asked for")
        from diffusers import AutoencoderKLWan
        ref = AutoencoderKLWan(base_dim=cfg.dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
                               num_res_blocks=cfg.num_res_blocks, temperal_downsample=list(cfg.temporal_downsample))
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if name.endswith("gamma"):
                    p.copy_(1 + 0.3 * torch.randn_like(p))
        state, note = ref.state_dict(), "diffusers 0.42.1 AutoencoderKLWan"
        ref = ref.to(DEVICE, torch.bfloat16).eval()
    except Exception as e:  # noqa: BLE001 - the anchor is optional on the device
        ref, note = None, f"diffusers not available: {type(e).__name__}: {e}"[:120]
        vae = WanVAE(cfg)
        with torch.no_grad():
            for name, p in vae.named_parameters():
                if name.endswith("gamma"):
                    p.copy_(1 + 0.3 * torch.randn_like(p))
        state = vae.state_dict()
    ours = load_vae(state, cfg, device=DEVICE, dtype=torch.bfloat16)
    ours32 = load_vae(state, cfg, device=DEVICE, dtype=torch.float32)
    return ref, ours, ours32, note


def _row(rows, out_dir, case, provider, fn, *, ref=None, est=None, cold=True, warmup=1, iters=3, note="",
         deadline=None, cost_s=10.0):
    """Time fn (cold call, then warm median), record peak memory over the warm calls and rel_l1 vs ref."""
    row = {"case": case, "provider": provider, "note": note}
    if deadline is not None and deadline.left() < cost_s:
        row["note"] = (note + "; " if note else "") + "skipped: time budget"
        rows.append(row)
        return row
    try:
        _sync_free()
        before = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        if cold:
            row["cold_ms"] = start.elapsed_time(end)
        if ref is not None:
            row["rel_l1"] = _rel_l1(out, ref)
        row["shape"] = tuple(out.shape)
        del out
        _sync_free()
        torch.cuda.reset_peak_memory_stats()
        row["ms"] = time_cuda(fn, warmup=warmup, iters=iters)
        peak = torch.cuda.max_memory_allocated()
        row["peak_gb"], row["work_gb"] = peak / GB, (peak - before) / GB
        if est is not None:
            row["est_gb"] = est / GB
    except Exception as e:  # noqa: BLE001 - a failing provider is reported, not fatal
        row["note"] = (note + "; " if note else "") + f"failed: {type(e).__name__}: {e}"[:200]
    rows.append(row)
    print(row, flush=True)
    write_results("vae", {"rows": rows}, out_dir=out_dir)
    return row


def _decode_estimate(cfg: VAEConfig, shape, chunk: int, tile: int | None = None) -> int:
    _, _, t, h, w = shape
    tiled = tile is not None and tile < max(h, w)
    return M.vae_decode_bytes(cfg, h, w, chunk=chunk, tile=tile) + M.video_elements(cfg, t, h, w) * (2 + 4 * tiled)


def _latent(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator(DEVICE).manual_seed(seed), device=DEVICE)


@torch.no_grad()
def decode_core(rows: list[dict], out_dir: Path | None, deadline: Deadline) -> None:
    """480p: ours vs TurboDiffusion's frame-by-frame vs diffusers, cudnn.benchmark off and on."""
    cfg = VAEConfig()
    ref_vae, vae, vae32, diffusers_note = make_vaes(cfg)
    shape = LATENTS["480p"]
    z = _latent(shape)
    z16 = z.bfloat16()
    torch.backends.cudnn.benchmark = False
    ref = vae32.decode(z, fast=False, clamp=True)   # TF32 convs (cuDNN default): ~1e-3, far below bf16's error
    del vae32
    case, chunk = "480p 81f latent 1x16x21x60x104", decode_chunk_frames(cfg, shape[3], shape[4])
    est = _decode_estimate(cfg, shape, chunk)
    ours = f"ours fast bf16 CL+triton chunk{chunk}"

    def fast():
        return vae.decode(z16, clamp=True, fast=True)

    _row(rows, out_dir, case, ours, fast, ref=ref, est=est, note="cudnn.benchmark off", deadline=deadline)
    _row(rows, out_dir, case, "TurboDiffusion frame-by-frame bf16", lambda: vae.decode(z16, clamp=True, fast=False),
         ref=ref, warmup=0, iters=2, note="reference modules, one latent frame per pass; cudnn.benchmark off",
         deadline=deadline, cost_s=20)
    raw = None
    if ref_vae is not None:
        mean, inv_std = (c.to(DEVICE, torch.float32).view(1, -1, 1, 1, 1) for c in latent_constants(cfg))
        raw = (z / inv_std + mean).bfloat16()   # diffusers decodes un-normalised latents (and clamps)
        _row(rows, out_dir, case, "diffusers AutoencoderKLWan bf16", lambda: ref_vae.decode(raw).sample, ref=ref,
             warmup=0, iters=2, note=diffusers_note + "; cudnn.benchmark off", deadline=deadline, cost_s=15)
    else:
        rows.append({"case": case, "provider": "diffusers AutoencoderKLWan bf16", "note": diffusers_note})
    torch.backends.cudnn.benchmark = True
    _row(rows, out_dir, case, ours, fast, ref=ref, est=est, note="cudnn.benchmark on (cold = autotuning)",
         deadline=deadline, cost_s=20)
    if ref_vae is not None:
        _row(rows, out_dir, case, "diffusers AutoencoderKLWan bf16", lambda: ref_vae.decode(raw).sample, ref=ref,
             warmup=0, iters=2, note="cudnn.benchmark on", deadline=deadline, cost_s=20)


@torch.no_grad()
def decode_extras(rows: list[dict], out_dir: Path | None, deadline: Deadline, quick: bool) -> None:
    """What each piece brings (480p, cudnn.benchmark on); 720p time and memory, whole frames and tiles."""
    cfg = VAEConfig()
    _, vae, vae32, _ = make_vaes(cfg, with_diffusers=False)
    torch.backends.cudnn.benchmark = True
    shape = LATENTS["480p"]
    z = _latent(shape)
    z16 = z.bfloat16()
    ref = vae32.decode(z, fast=False, clamp=True)
    del vae32
    case, chunk = "480p 81f latent 1x16x21x60x104", decode_chunk_frames(cfg, shape[3], shape[4])

    def fast(**kw):
        return lambda: vae.decode(z16, clamp=True, fast=True, **kw)

    os.environ["TURBOVID_KERNELS"] = "ref"
    _row(rows, out_dir, case, f"ours fast bf16 CL, PyTorch norm chunk{chunk}", fast(), ref=ref,
         note="TURBOVID_KERNELS=ref (in-place PyTorch RMSNorm+SiLU); cudnn.benchmark on", deadline=deadline, cost_s=15)
    os.environ.pop("TURBOVID_KERNELS")
    _row(rows, out_dir, case, f"ours fast bf16 NCDHW chunk{chunk}", fast(channels_last=False), ref=ref,
         note="no channels-last (hence no Triton norm); cudnn.benchmark on", deadline=deadline, cost_s=20)
    for c in (1, 2, 5):
        _row(rows, out_dir, case, f"ours fast bf16 CL+triton chunk{c}", fast(chunk=c), ref=ref,
             est=_decode_estimate(cfg, shape, c), note="cudnn.benchmark on", deadline=deadline, cost_s=15)
    _row(rows, out_dir, case, "ours fast bf16 CL+triton chunk1 tile48/8", fast(chunk=1, tile=48), ref=ref,
         est=_decode_estimate(cfg, shape, 1, 48), note="2x3 tiles, linear blend; cudnn.benchmark on",
         deadline=deadline, cost_s=15)
    del ref, z   # 480p rows done: free the reference video before the 720p ones
    _sync_free()
    if not quick:
        _decode_720p(rows, out_dir, deadline, vae)


def _decode_720p(rows: list[dict], out_dir: Path | None, deadline: Deadline, vae: WanVAE) -> None:
    cfg, shape = vae.cfg, LATENTS["720p"]
    z16 = _latent(shape).bfloat16()
    case, chunk = "720p 81f latent 1x16x21x90x160", decode_chunk_frames(cfg, shape[3], shape[4])
    for kw in (dict(), dict(chunk=1, tile=48), dict(chunk=1, tile=32)):
        c = kw.get("chunk", chunk)
        name = f"ours fast bf16 CL+triton chunk{c}" + (f" tile{kw['tile']}/8" if "tile" in kw else "")
        _row(rows, out_dir, case, name, lambda kw=kw: vae.decode(z16, clamp=True, fast=True, **kw),
             est=_decode_estimate(cfg, shape, c, kw.get("tile")), iters=2, note="cudnn.benchmark on",
             deadline=deadline, cost_s=25)
    _row(rows, out_dir, case, "TurboDiffusion frame-by-frame bf16", lambda: vae.decode(z16, clamp=True, fast=False),
         iters=1, warmup=0, note="cudnn.benchmark on", deadline=deadline, cost_s=40)


def bench(quick: bool = False, out_dir: Path | None = None, budget_s: float | None = None) -> list[dict]:
    """480p decode rows; unless quick, also the 14B 720p memory check and the 720p decode rows. In order of
    importance, so that a time budget (seconds) cuts the least useful rows."""
    rows: list[dict] = []
    deadline = Deadline(budget_s)
    parts = [lambda: decode_core(rows, out_dir, deadline)]
    if not quick:
        parts.append(lambda: video_memory(rows, out_dir, deadline=deadline))
    parts.append(lambda: decode_extras(rows, out_dir, deadline, quick))
    for part in parts:
        try:
            part()
        except Exception:  # one part failing must not lose the others' numbers
            traceback.print_exc()
            rows.append({"case": "bench_vae", "provider": "part failed", "note": traceback.format_exc()[-300:]})
        _sync_free()
    return rows


# ---- where the decode spends its time (--profile) --------------------------------------------------------

# Every 3x3x3 conv of the full Wan2.1 decoder at 480p as the fast decode runs it (chunk of 3 latent frames:
# T pixel frames per pass), with how many such convs one 81-frame decode runs: (label, Cin, Cout, T per pass,
# H, W, passes x convs). The 2D upsample convs and 1x1 convs are left out (< 5% of the FLOPs).
DECODER_CONVS = [
    ("60x104 384->384", 384, 384, 3, 60, 104, 7 * 10),
    ("120x208 192->384", 192, 384, 6, 120, 208, 7 * 1),
    ("120x208 384->384", 384, 384, 6, 120, 208, 7 * 5),
    ("240x416 192->192", 192, 192, 12, 240, 416, 7 * 6),
    ("480x832 96->96", 96, 96, 12, 480, 832, 7 * 6),
]


@torch.no_grad()
def conv_variants(rows: list[dict]) -> None:
    """Each decoder conv shape three ways (bf16, cudnn.benchmark on), as TFLOPS: F.conv3d channels-last (what
    the fast decode runs), three conv2d calls over (B T) frames, one per time tap, accumulated (cuDNN's 2D
    kernels are tuned far more than its 3D ones), and one conv2d over the three frames concatenated along
    channels (an extra copy of the input, one GEMM with K = 27 Cin)."""
    import torch.nn.functional as F
    torch.backends.cudnn.benchmark = True
    total = {}
    for label, cin, cout, t, h, w, count in DECODER_CONVS:
        g = torch.Generator(DEVICE).manual_seed(0)
        buf = torch.randn((1, cin, t + 2, h, w), generator=g, device=DEVICE, dtype=torch.bfloat16)
        buf = buf.contiguous(memory_format=torch.channels_last_3d)
        weight = torch.randn((cout, cin, 3, 3, 3), generator=g, device=DEVICE, dtype=torch.bfloat16) / (27 * cin) ** 0.5
        bias = torch.zeros(cout, device=DEVICE, dtype=torch.bfloat16)
        flop = 2 * 27 * cin * cout * t * h * w
        frames = buf.transpose(1, 2).reshape(t + 2, cin, h, w)          # [(T+2), C, H, W], channels-last view
        taps = [weight[:, :, k].contiguous(memory_format=torch.channels_last) for k in range(3)]
        stacked_w = weight.permute(0, 2, 1, 3, 4).reshape(cout, 3 * cin, 3, 3).contiguous(memory_format=torch.channels_last)

        def conv3d():
            return F.conv3d(buf, weight, bias, padding=(0, 1, 1))

        def conv3d_nobias():
            return F.conv3d(buf, weight, None, padding=(0, 1, 1))

        def taps2d():
            out = F.conv2d(frames[0:t], taps[0], bias, padding=1)
            out += F.conv2d(frames[1:t + 1], taps[1], None, padding=1)
            out += F.conv2d(frames[2:t + 2], taps[2], None, padding=1)
            return out

        def stacked2d():
            x = torch.cat([frames[k:k + t] for k in range(3)], dim=1)   # [T, 3C, H, W] channels-last
            return F.conv2d(x, stacked_w, bias, padding=1)

        ref = conv3d()[0].transpose(0, 1).float()                     # [T, Cout, H, W] like the 2D variants
        for name, fn in (("conv3d CL", conv3d), ("conv3d CL, no bias", conv3d_nobias), ("3 x conv2d taps", taps2d),
                         ("conv2d on 3C channels", stacked2d)):
            try:
                out = fn()
                out = out[0].transpose(0, 1) if out.dim() == 5 else out
                err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                del out
                ms = time_cuda(fn, warmup=3, iters=10)
                row = {"case": f"conv {label} T{t}", "provider": name, "ms": ms, "tflops": flop / ms / 1e9,
                       "decode_ms": ms * count, "note": f"{count} per decode; max err {err:.1e}"}
                total[name] = total.get(name, 0.0) + ms * count
            except Exception as e:  # noqa: BLE001 - a variant cuDNN refuses is reported
                row = {"case": f"conv {label} T{t}", "provider": name, "note": f"failed: {type(e).__name__}: {e}"[:200]}
            rows.append(row)
            print(row, flush=True)
        del buf, frames, ref
        _sync_free()
    for name, ms in total.items():
        rows.append({"case": "all 3x3x3 decoder convs, 480p 81f", "provider": name, "ms": ms})


@torch.no_grad()
def decode_profile(rows: list[dict], top: int = 16) -> None:
    """GPU time of one fast 480p decode by kernel (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile
    cfg = VAEConfig()
    _, vae, vae32, _ = make_vaes(cfg, with_diffusers=False)
    del vae32
    torch.backends.cudnn.benchmark = True
    z16 = _latent(LATENTS["480p"]).bfloat16()
    ms = time_cuda(lambda: vae.decode(z16, clamp=True, fast=True), warmup=1, iters=3)
    rows.append({"case": "480p fast decode, warm", "provider": "ours", "ms": ms,
                 "note": "PYTORCH_CUDA_ALLOC_CONF=" + os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")})
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        vae.decode(z16, clamp=True, fast=True)
        torch.cuda.synchronize()
    # Which PyTorch ops launch the GPU time (kernel names alone do not say which copy or add is which)
    ops = [e for e in prof.key_averages(group_by_input_shape=True)
           if e.device_type.name == "CPU" and e.self_device_time_total > 0 and e.key.startswith("aten::")]
    ops.sort(key=lambda e: -e.self_device_time_total)
    for e in ops[:top]:
        rows.append({"case": "profile 480p fast decode, by op", "provider": f"{e.key} {e.input_shapes}"[:160],
                     "ms": e.self_device_time_total / 1e3, "note": f"{e.count} calls"})
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in events)
    events.sort(key=lambda e: -e.self_device_time_total)
    for e in events[:top]:
        rows.append({"case": "profile 480p fast decode", "provider": e.key[:100], "ms": e.self_device_time_total / 1e3,
                     "note": f"{e.count} calls, {e.self_device_time_total / total:.1%}"})
    rows.append({"case": "profile 480p fast decode", "provider": "TOTAL", "ms": total / 1e3})
    for r in rows:
        print(r, flush=True)


# ---- the 14B 720p memory check -------------------------------------------------------------------------

def _random_dit(cfg, attention: str, quant: str | None, fused: bool = False):
    """WanDiT built on meta, block Linears swapped for empty int8 ones of format `quant` ("td" | "fast"),
    materialised on DEVICE with random weights; `fused`: the pipeline's CUDA speedups (fused norms and
    epilogues, text K/V cache)."""
    from turbovid.models.dit import WanDiT
    from turbovid.quant.int8 import swap_block_linears
    with torch.device("meta"):
        net = WanDiT(cfg, attention=attention).to(torch.bfloat16)
    if quant:
        swap_block_linears(net, quant)
    net = net.to_empty(device=DEVICE).eval().requires_grad_(False)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.dtype == torch.int8:
                t.random_(-127, 128)
            elif name.endswith("scale"):
                t.fill_(0.02 / 73)             # int8 std ~73 -> weights of std ~0.02
            elif "norm" in name and name.endswith("weight"):
                t.fill_(1.0)
            elif name.endswith("bias") or "proj_l" in name:
                t.zero_()
            else:
                t.normal_(0.0, 0.02)
    if fused:
        from turbovid.speedups import apply_speedups
        apply_speedups(net, fuse_norms=True, cache_text_kv=True)
    return net


def _dit_inputs(spec, width, height, frames):
    """(x, t, context) as the pipeline passes them; one context object for all calls (the text K/V cache
    keys on it, as the sampler's steps do)."""
    T, h, w = M.latent_grid(spec, width, height, frames)
    return (torch.randn(1, spec.dit.in_dim, T, h, w, device=DEVICE).bfloat16(), torch.tensor([500.0], device=DEVICE),
            torch.randn(1, spec.dit.text_len, spec.dit.text_dim, device=DEVICE).bfloat16())


def _forward_peak(net, inputs, label, rows, out_dir, est=None, note=""):
    _sync_free()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = net(*inputs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    row = {"case": label, "provider": "DiT forward", "ms": 1000 * (time.perf_counter() - t0), "peak_gb": peak / GB,
           "work_gb": (peak - before) / GB, "est_gb": None if est is None else est / GB,
           "note": note + f"; finite={bool(out.isfinite().all())}"}
    rows.append(row)
    print(row, flush=True)
    write_results("vae", {"rows": rows}, out_dir=out_dir)
    return row


def _decode_stage(rows, out_dir, deadline, case, vae, plan, est, shape) -> None:
    z16 = _latent(shape).bfloat16()

    def decode_and_frames():
        video = vae.decode(z16, clamp=True, fast=True, chunk=plan.vae_chunk, tile=plan.vae_tile,
                           overlap=plan.vae_overlap).float()
        to_uint8_frames(tile_samples(video))
        return video

    _row(rows, out_dir, case, f"stage vae_decode chunk{plan.vae_chunk} tile{plan.vae_tile} + uint8", decode_and_frames,
         est=est, iters=1, warmup=0, deadline=deadline, cost_s=20,
         note=("DiT offloaded" if plan.offload_dit_for_decode else "DiT resident") + "; est = whole stage")


def video_memory(rows: list[dict], out_dir: Path | None = None, budget_gb: float = 22.0,
                 deadline: Deadline | None = None) -> list[dict]:
    """The 14B 720p W8A8 video, stage by stage, under plan_memory(budget_gb); then the 1.3B check. Peaks are
    absolute (torch.cuda.max_memory_allocated): the GPU holds what the plan says the stage holds."""
    from turbovid.models.text_encoder import make_umt5
    deadline = deadline or Deadline(None)
    spec, width, height, frames = MODELS[VIDEO[0]], *VIDEO[1:]
    plan = M.plan_memory(spec, width, height, frames, quant=True, attention="sagesla", budget_gb=budget_gb)
    stages = M.stage_bytes(spec, width, height, frames, plan, quant=True, attention="sagesla")
    print(plan.summary(), flush=True)
    case = f"{spec.name} {width}x{height} W8A8 video, {budget_gb:g} GB plan"
    rows.append({"case": case, "provider": "plan_memory", "est_gb": plan.peak_gb, "note": plan.summary()})
    torch.backends.cudnn.benchmark = True
    _sync_free()
    # 1. text_encode: umT5-xxl alone on the GPU (plan "free": the DiT comes after), one prompt, then freed.
    try:
        with torch.device("meta"):
            te = make_umt5(spec.text).to(torch.bfloat16)
        te = te.to_empty(device=DEVICE).eval()
        te.encoder.embed_tokens.weight = te.shared.weight   # to_empty untied them (2.1 GB twice); loading re-ties
        _sync_free()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            for p in te.parameters():
                p.normal_(0.0, 0.02)
            ids = torch.randint(3, spec.text.vocab_size, (1, spec.text.text_len), device=DEVICE)
            te(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        torch.cuda.synchronize()
        rows.append({"case": case, "provider": f"stage text_encode ({plan.text_encoder})",
                     "peak_gb": torch.cuda.max_memory_allocated() / GB, "est_gb": stages["text_encode"] / GB,
                     "note": "umT5-xxl random weights, 512 tokens; est includes the VAE weights"})
        del te
    except Exception as e:  # noqa: BLE001
        rows.append({"case": case, "provider": "stage text_encode", "note": f"failed: {type(e).__name__}: {e}"[:200]})
    print(rows[-1], flush=True)
    write_results("vae", {"rows": rows}, out_dir=out_dir)
    _sync_free()
    # 2. denoise: the VAE stays resident; the DiT as the pipeline runs it on CUDA (SageSLA, fast W8A8, fused
    #    norms, text K/V cache), all resident, then with the plan's streamed blocks. Fallback: plain TD dense.
    vae = WanVAE(spec.vae).to(DEVICE, torch.bfloat16).eval()
    tokens = M.dit_tokens(spec, width, height, frames)
    est_act = M.dit_activation_bytes(spec.dit, tokens, quant=True)
    net = inputs = None
    for attention, fmt, fused in (("sagesla", "fast", True), ("dense", "td", False)):
        label = f"{attention}, W8A8 {fmt}{', fused norms + text K/V cache' if fused else ''}"
        try:
            net = _random_dit(spec.dit, attention, fmt, fused)
            inputs = _dit_inputs(spec, width, height, frames)
            _forward_peak(net, inputs, f"{case}: DiT all resident", rows, out_dir, est_act,
                          note=f"{label}; first call (Triton compile); est = activations only")
            break
        except Exception as e:  # noqa: BLE001 - report, then fall back to the plain model
            rows.append({"case": case, "provider": f"DiT forward ({label})", "note": f"failed: {type(e).__name__}: {e}"[:200]})
            print(rows[-1], flush=True)
            net = inputs = None
            _sync_free()
    if net is None:
        return rows
    rows.append({"case": case, "provider": f"DiT W8A8 {fmt} weights", "note": "peak_gb = sum of tensor bytes; est: TD format",
                 "est_gb": M.dit_param_bytes(spec.dit, quant=True, attention=attention) / GB,
                 "peak_gb": sum(t.nbytes for t in net.state_dict().values()) / GB})
    _forward_peak(net, inputs, f"{case}: DiT all resident", rows, out_dir, est_act,
                  note=f"{label}; warm; est = activations only")
    if plan.streamed_blocks and deadline.left() > 30:
        try:
            M.stream_blocks(net, plan.streamed_blocks, DEVICE)
            _forward_peak(net, inputs, f"{case}: stage denoise, {plan.streamed_blocks} streamed blocks", rows, out_dir,
                          stages["denoise"], note=f"{label}; est = whole stage")
        except Exception as e:  # noqa: BLE001
            rows.append({"case": case, "provider": "stage denoise (streamed)", "note": f"failed: {type(e).__name__}: {e}"[:200]})
    del inputs
    # 3. vae_decode: the DiT as the plan leaves it, the plan's chunk/tile, then Pipeline's .float() + uint8 frames
    if deadline.left() > 20:
        if plan.offload_dit_for_decode:
            M.offload(net)
        _decode_stage(rows, out_dir, deadline, case, vae, plan, stages["vae_decode"],
                      (1, spec.vae.z_dim, *M.latent_grid(spec, width, height, frames)))
    del net, vae
    _sync_free()
    # 4. the 1.3B bf16 at 480p, plain blocks: the FFN-bound case of the activation estimate
    if deadline.left() > 15:
        small, size = MODELS[SMALL[0]], SMALL[1:]
        net = _random_dit(small.dit, "dense", None)
        inputs = _dit_inputs(small, *size)
        est = M.dit_activation_bytes(small.dit, M.dit_tokens(small, *size), quant=False)
        for note in ("dense SDPA, plain blocks, first call", "dense SDPA, plain blocks"):
            _forward_peak(net, inputs, f"{SMALL[0]} {size[0]}x{size[1]} bf16 DiT", rows, out_dir, est,
                          note=note + "; est = activations")
        del net, inputs
        _sync_free()
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="480p decode rows only")
    parser.add_argument("--budget-s", type=float, default=None, help="skip rows once this many seconds have passed")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--profile", action="store_true", help="only: kernel profile of one 480p decode and "
                        "each decoder conv shape as conv3d / conv2d variants")
    args = parser.parse_args()
    if args.profile:
        results: list[dict] = []
        decode_profile(results)
        conv_variants(results)
        print()
        print_table(results, ["case", "provider", "ms", "tflops", "decode_ms", "note"])
        write_results("vae_profile", {"rows": results}, out_dir=args.out)
        raise SystemExit(0)
    results = bench(quick=args.quick, out_dir=args.out, budget_s=args.budget_s)
    print()
    print_table(results, COLUMNS)
    write_results("vae", {"rows": results}, out_dir=args.out)
