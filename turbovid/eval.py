"""`turbovid eval`: what each acceleration costs in quality, measured on the shipped model like a user runs it.

For every configuration (the waterfall teacher -> 4-step student -> + SLA -> + SageSLA -> + W8A8 -> full stack)
the pipeline (`Pipeline.load` + `generate`, the same code as `turbovid generate`) renders one video for each of
N held-out prompts (captions whose colour-shape-direction triple never occurs in training), by default the
first N, with seed `seed + i` for prompt i, and grades it:

- prompt adherence: colour, shape and direction read back by the deterministic detector
  (turbovid.train.detect); "all" = the three right at once. Speed and size are reported too, and the colour's
  drift: the mean |hue change| in degrees of the object from frame 0 to the last quarter (detect.hue_drift).
- distribution distance: Fréchet distance between Gaussian fits of a fixed 28-number descriptor of each
  clip (`clip_features`: colour mean/std, temporal and spatial gradient energy, a 4x4 map of the mean frame's
  luminance), generated clips against the real clips of the same prompts rendered by the data module.
  `real_vs_real` (the real clips against an independent draw of real clips of the same prompts) is the
  floor that sampling noise alone gives.
- wall-clock per video on the current machine: generate() alone (text encode, DiT steps, VAE decode), median;
  and the DiT steps alone (the sampling the teacher-vs-student speed-up is about).

    turbovid eval --count 32 --out benchmarks/results/eval_mini_cpu.json
    turbovid eval --configs teacher,student --count 8
    turbovid eval --configs student_sagesla,turbo --topk 0.75     (SLA's kept key-block ratio: a trade-off)
    turbovid eval --configs turbo --sla-blocks auto              (TurboDiffusion's per-GPU SLA blocks, not mini's)
    turbovid eval --configs turbo --start 1000 --count 256 --ode --sigma-max 200

`--start` skips prompts: pick a sampler setting (`--ode`, `--sigma-max`, for the few-step rows) on prompts past
the ones you report (e.g. 1000..1255), then report the first N with the setting chosen.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from turbovid.config import SampleConfig
from turbovid.sampling import MID_ANGLES, parse_mid_angles
from turbovid.video import from_uint8_frames

# name -> (Pipeline.load keyword arguments, sampling steps, what it is)
CONFIGS: dict[str, tuple[dict, int, str]] = {
    "teacher": ({"teacher": True}, 50, "teacher, 50 steps UniPC + CFG 5, dense attention"),
    "teacher_4step": ({"teacher": True}, 4, "teacher with the 4-step rCM sampler (no distillation)"),
    "student": ({}, 4, "4-step student (the shipped dit file), dense attention"),
    "student_sla": ({"attention": "sla"}, 4, "+ SLA (the model's top-k: 0.75 for mini)"),
    "student_sagesla": ({"attention": "sagesla"}, 4, "+ SageSLA (INT8 QK, FP8 PV)"),
    "student_sagesla_w8a8": ({"attention": "sagesla", "quant": True}, 4, "+ W8A8 INT8 linears (shipped INT8 file)"),
    "turbo": ({"attention": "sagesla", "quant": True, "fuse": True}, 4, "full stack: + fused norms/quant"),
}


# ---- distribution distance -------------------------------------------------------------------------

def clip_features(video: torch.Tensor) -> torch.Tensor:
    """video [3, F, H, W] in [-1, 1] -> 28 numbers: per-channel mean (3) and std (3), per-channel mean
    |frame difference| (3, motion energy) and mean |spatial gradient| (3, sharpness), and the luminance of
    the time-averaged frame pooled to 4x4 (16, where things are)."""
    x = video.float()
    mean, std = x.mean(dim=(1, 2, 3)), x.std(dim=(1, 2, 3))
    dt = (x[:, 1:] - x[:, :-1]).abs().mean(dim=(1, 2, 3))
    ds = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean(dim=(1, 2, 3)) + (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(1, 2, 3))
    luma = torch.nn.functional.adaptive_avg_pool2d(x.mean(dim=(0, 1))[None, None], 4).flatten()
    return torch.cat([mean, std, dt, ds, luma])


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussian fits of feature sets a [N, D] and b [M, D] (float64):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"frechet_distance needs two [N>=2, D] feature sets, got {tuple(a.shape)}, {tuple(b.shape)}")
    a, b = a.double(), b.double()
    mu = (a.mean(0) - b.mean(0)).pow(2).sum()
    sa, sb = torch.cov(a.T), torch.cov(b.T)

    def sqrtm(m):
        vals, vecs = torch.linalg.eigh((m + m.T) / 2)
        return vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    root = sqrtm(sa)
    return float(mu + torch.trace(sa + sb - 2 * sqrtm(root @ sb @ root)))


def _real_features(clips, size: int, frames: int) -> torch.Tensor:
    from turbovid.train.data import render
    return torch.stack([clip_features(render(c, size, frames)) for c in clips])


# ---- one configuration -----------------------------------------------------------------------------

def evaluate_config(name: str, clips, *, model: str, device: str | None, seed: int, real: torch.Tensor,
                    log=print, topk: float | None = None, sla_blocks: tuple[int, int] | str | None = None,
                    sigma_max: float | None = None, ode: bool = False,
                    mid_angles: tuple[float, ...] | None = None) -> dict:
    """`topk` / `sla_blocks`: SLA's kept key-block ratio and (b_q, b_k) for the SLA / SageSLA configurations
    (default: the model's top-k and blocks; "auto" blocks: TurboDiffusion's per-GPU ones).
    `sigma_max` / `ode` / `mid_angles`: the rCM sampler's, for the few-step rows (the 50-step teacher row ignores
    them)."""
    from turbovid.pipeline import MAX_RCM_STEPS, Pipeline
    from turbovid.train.detect import adherence

    kwargs, steps, what = CONFIGS[name]
    pipe = Pipeline.load(model, device=device, **kwargs, topk=topk, sla_blocks=sla_blocks)
    spec = pipe.spec
    rcm = steps <= MAX_RCM_STEPS
    sample = SampleConfig(steps=steps, sigma_max=(sigma_max or spec.sigma_max) if rcm else None, ode=ode and rcm,
                          mid_angles=(mid_angles or MID_ANGLES) if rcm else None)
    videos, seconds, dit_seconds = [], [], []
    for i, clip in enumerate(clips):
        t0 = time.perf_counter()
        video = pipe.generate(clip.caption, replace(sample, seed=seed + i))
        seconds.append(time.perf_counter() - t0)
        dit_seconds.append(sum(v for k, v in video.timings.items() if k.startswith("dit_step_")))
        videos.append(from_uint8_frames(video.frames))                   # [3, F, H, W] in [-1, 1]
        log(f"[eval] {name}: {i + 1}/{len(clips)} ({seconds[-1]:.2f} s)")
    scores = adherence(videos, [c.attributes() for c in clips])
    fake = torch.stack([clip_features(v) for v in videos])
    sparse = kwargs.get("attention") in ("sla", "sagesla")     # the rows that run SLA record its top-k and blocks
    blocks = list(pipe.dit.blocks[0].self_attn.attn_op.local_attn.block_sizes(pipe.device)) if sparse else None
    return {"config": name, "what": what, "steps": steps, "topk": pipe.topk if sparse else None,
            "sla_blocks": blocks, "model": spec.name,
            "count": len(clips),
            **({"sigma_max": sample.sigma_max, "ode": sample.ode, "mid_angles": list(sample.mid_angles[:steps - 1])}
               if rcm else {}),
            **{k: scores[k] for k in ("all", "color", "shape", "direction", "speed", "size", "hue_drift")},
            "frechet": frechet_distance(fake, real), "seconds_per_video": statistics.median(seconds),
            "dit_seconds_per_video": statistics.median(dit_seconds),
            "seconds": seconds, "detections": scores["detections"]}


def run_eval(configs: list[str], *, model: str = "mini", count: int = 32, seed: int = 0, device: str | None = None,
             out: str | Path | None = None, log=print, topk: float | None = None,
             sla_blocks: tuple[int, int] | str | None = None, start: int = 0, sigma_max: float | None = None,
             ode: bool = False, mid_angles: tuple[float, ...] | None = None) -> dict:
    from turbovid.config import MODELS
    from turbovid.train.data import path_start, sample_clip

    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown eval config {unknown[0]!r}; choose from {', '.join(CONFIGS)}")
    if model not in MODELS or not MODELS[model].assets:
        raise ValueError(f"turbovid eval grades a model trained on the procedural data; {model!r} is not one (use mini)")
    if count < 2:
        raise ValueError(f"--count must be >= 2 (the distribution distance needs two clips), got {count}")
    if topk is not None and not 0 < topk <= 1:
        raise ValueError(f"--topk must be in (0, 1], got {topk}")
    if start < 0:
        raise ValueError(f"--start must be >= 0, got {start}")
    spec = MODELS[model]
    from turbovid.pipeline import check_sample, resolve_size
    check_sample(spec, SampleConfig(sigma_max=sigma_max, mid_angles=mid_angles), has_image=False)   # before any work
    width, height = resolve_size(spec, SampleConfig())
    if width != height:
        raise ValueError(f"{model}: the procedural clips are square, the model's default size is {width}x{height}")
    clips = [sample_clip(0, "heldout", start + i) for i in range(count)]
    real = _real_features(clips, width, spec.num_frames)
    # The same prompts drawn again: every attribute kept, a new start position drawn as the data module does.
    rng = np.random.default_rng(seed + 1)
    other = [replace(c, start=path_start(rng, c.radius, c.displacement)) for c in clips]
    floor = frechet_distance(_real_features(other, width, spec.num_frames), real)
    rows = []
    for name in configs:
        rows.append(evaluate_config(name, clips, model=model, device=device, seed=seed, real=real, log=log, topk=topk,
                                    sla_blocks=sla_blocks, sigma_max=sigma_max, ode=ode, mid_angles=mid_angles))
        if out is not None:
            _write(out, rows, floor, count, seed, start)
    return {"rows": rows, "real_vs_real": floor}


def _write(out, rows, floor, count, seed, start) -> None:
    import platform

    from turbovid.train.detect import VERSION

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"count": count, "start": start, "seed": seed, "split": "heldout", "detector_version": VERSION,
               "real_vs_real_frechet": floor,
               "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                           "torch": torch.__version__,
                           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
               "rows": rows}
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(out)


def print_table(result: dict) -> None:
    print(f"{'config':<22}{'steps':>6}{'top-k':>6}{'blocks':>8}{'all':>7}{'colour':>8}{'shape':>7}{'dir':>6}{'drift':>7}{'FD':>8}"
          f"{'s/video':>9}{'DiT s':>8}")
    for r in result["rows"]:
        topk = "-" if r.get("topk") is None else f"{r['topk']:g}"
        drift = "-" if r.get("hue_drift") is None else f"{r['hue_drift']:.1f}"
        blocks = "-" if r.get("sla_blocks") is None else "x".join(map(str, r["sla_blocks"]))
        print(f"{r['config']:<22}{r['steps']:>6}{topk:>6}{blocks:>8}{r['all']:>7.3f}{r['color']:>8.2f}{r['shape']:>7.2f}"
              f"{r['direction']:>6.2f}{drift:>7}{r['frechet']:>8.3f}{r['seconds_per_video']:>9.2f}"
              f"{r.get('dit_seconds_per_video', float('nan')):>8.2f}")
    print("drift: mean |hue change| (degrees) of the object from frame 0 to the last quarter (detect.hue_drift)")
    print(f"real vs real Fréchet distance (floor): {result['real_vs_real']:.3f}")


# ---- command line ----------------------------------------------------------------------------------

def add_eval_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="prompt adherence, distribution distance and speed per acceleration",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mini")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of: {', '.join(CONFIGS)}")
    p.add_argument("--count", type=int, default=32, help="held-out prompts per configuration")
    p.add_argument("--start", type=int, default=0, help="index of the first held-out prompt (default 0)")
    p.add_argument("--sigma-max", type=float, help="the rCM sampler's initial sigma for the few-step rows "
                                                   "(default: the model's)")
    p.add_argument("--ode", action="store_true", help="deterministic rCM sampling for the few-step rows")
    p.add_argument("--mid-angles", help="the rCM sampler's TrigFlow angles between sigma-max and 0 for the few-step "
                                        "rows, e.g. 1.5,1.4,1.0 (the default, rCM's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu | cuda (default: cuda if available)")
    p.add_argument("--out", help="results JSON (rewritten after each configuration)")
    p.add_argument("--sla-blocks", metavar="BQxBK", help="SLA / SageSLA block sizes for those configurations, e.g. "
                   "128x64 (default: TurboDiffusion's per GPU); each row records its blocks")
    p.add_argument("--topk", type=float, help="SLA's kept key-block ratio for the SLA / SageSLA configurations "
                                              "(default: the model's, 0.75 for mini); each row records its top-k")


def cmd_eval(args: argparse.Namespace) -> int:
    from turbovid.cli import sla_blocks_arg

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    result = run_eval(configs, model=args.model, count=args.count, seed=args.seed, device=args.device, out=args.out,
                      log=lambda msg: print(msg, file=sys.stderr, flush=True), topk=args.topk,
                      sla_blocks=sla_blocks_arg(args), start=args.start,
                      sigma_max=args.sigma_max, ode=args.ode, mid_angles=parse_mid_angles(args.mid_angles))
    print_table(result)
    if args.out:
        print(f"wrote {args.out}")
    return 0
