"""Training and sampling throughput of a recipe's stages (what sizes the schedules in train/recipe.py).

For the recipe's shapes (default `mini`: 240x240x33 clips, 2025 DiT tokens) this times, on one GPU:
clip rendering, VAE encode (pool building), one optimiser step of every stage (VAE, teacher, SLA, rCM
student step before and after the tangent warm-up, critic step) and the two evaluation samplers (4-step rCM,
50-step UniPC + CFG, each including the VAE decode). Weights are random (a random VAE, a random DiT as
the teacher): step times do not depend on the values. Each row is the median of `iters` wall-clock
intervals, each closed by torch.cuda.synchronize(), after `warmup` untimed calls: training steps contain
.item() host syncs and data rendering, so CUDA events around a step would time the same thing.

    PYTHONPATH=. python benchmarks/train_speed.py [--recipe mini] [--iters 10]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, write_results  # noqa: E402
from turbovid.models.vae import WanVAE  # noqa: E402
from turbovid.train.checkpoint import save_weights  # noqa: E402
from turbovid.train.data import ProceduralVideos  # noqa: E402
from turbovid.train.distill import RCMTrainer  # noqa: E402
from turbovid.train.evaluate import generate_latents  # noqa: E402
from turbovid.train.inputs import LatentBatches, encode_videos  # noqa: E402
from turbovid.train.loop import Env  # noqa: E402
from turbovid.train.recipe import RECIPES  # noqa: E402
from turbovid.train.teacher import SLATrainer, TeacherTrainer, new_dit  # noqa: E402
from turbovid.train.vae import VAETrainer  # noqa: E402


def wall(fn, warmup: int, iters: int) -> float:
    """Median seconds of fn() (each interval closed by a device sync)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile(fn, steps: int = 5) -> None:
    """Print the CUDA kernels of `steps` calls of fn, busiest first, and the GPU-busy share of the wall time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    wall_s = time.perf_counter() - t0
    events = prof.key_averages()
    busy_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    print(events.table(sort_by="self_cuda_time_total", row_limit=30), flush=True)
    print(f"profile: {steps} steps in {wall_s * 1e3:.1f} ms wall (with profiler), GPU kernels busy "
          f"{busy_us / 1e3:.1f} ms ({100 * busy_us / 1e6 / wall_s:.0f}%)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="mini", choices=sorted(RECIPES))
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", help="results folder (default benchmarks/results)")
    ap.add_argument("--rows", default="all", help="all | dit: only the teacher and SLA steps, eager and compiled")
    ap.add_argument("--batches", default="", help="dit rows: comma-separated per-GPU batches to time the teacher "
                    "step at besides the recipe's (e.g. 64,128)")
    ap.add_argument("--profile", action="store_true", help="dit rows: print the CUDA kernels of 5 eager teacher "
                    "steps, busiest first (torch.profiler)")
    args = ap.parse_args()
    recipe = RECIPES[args.recipe]
    env = Env(torch.device("cuda" if torch.cuda.is_available() else "cpu"))   # CPU: a smoke run (tiny recipe)
    rows = []

    def add(name: str, seconds: float, batch: int, unit: str = "step") -> None:
        rows.append({"row": name, "ms": 1e3 * seconds, "batch": batch, "per_s": 1 / seconds, "unit": unit})
        print(f"{name:28s} {1e3 * seconds:9.1f} ms  (batch {batch})", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        (run_dir / "vae").mkdir()
        torch.manual_seed(0)
        save_weights(run_dir / "vae" / "final.safetensors", WanVAE(recipe.vae).state_dict())
        z = recipe.vae.z_dim
        (run_dir / "vae" / "latent_stats.json").write_text(json.dumps({"mean": [0.0] * z, "std": [1.0] * z}))

        data = ProceduralVideos("train", recipe.size, recipe.frames, recipe.data_seed)
        step = iter(range(10**6))
        full = args.rows == "all"
        if full:
            it = iter(range(10**6))
            add("render clips", wall(lambda: data.batch([next(it) for _ in range(32)], env.device), 1, args.iters),
                32, "batch")
            vae_t = VAETrainer(recipe, env)
            add("vae train step", wall(lambda: vae_t.train_step(next(step)), 2, args.iters), recipe.vae_stage.run.batch)
            del vae_t

        # The DiT stages train on pre-encoded latents (recipe.pool_clips): time them on a small pool so that
        # no VAE encode is inside the step (the full rows also time the on-the-fly path the pool replaces).
        inputs = LatentBatches(recipe, run_dir, env, pool=0 if full else 256)
        if full:
            videos, _ = data.batch(list(range(32)), env.device)
            add("vae encode (pool)", wall(lambda: encode_videos(inputs.vae, videos), 1, args.iters), 32, "batch")

        compiled = (False,) if full else (False, True)
        for comp in compiled:
            tag = " (compiled)" if comp else ""
            r = dataclasses.replace(recipe, teacher=dataclasses.replace(recipe.teacher, compile=comp),
                                    sla=dataclasses.replace(recipe.sla, compile=comp))
            teacher = TeacherTrainer(r, run_dir, env, inputs=inputs)
            add("teacher step" + tag, wall(lambda: teacher.train_step(next(step)), 3, args.iters), r.teacher.run.batch)
            if args.profile and not comp and env.device.type == "cuda":
                profile(lambda: teacher.train_step(next(step)))
            for batch in (int(b) for b in args.batches.split(",") if b):
                teacher.schedule = dataclasses.replace(teacher.schedule, batch=batch)
                add(f"teacher step b{batch}" + tag, wall(lambda: teacher.train_step(next(step)), 3, args.iters), batch)
            weights = {k: v.detach().clone() for k, v in teacher.net.state_dict().items()}
            del teacher
            sla = SLATrainer(r, run_dir, env, weights, inputs=inputs)
            add("sla step" + tag, wall(lambda: sla.train_step(next(step)), 3, args.iters), r.sla.run.batch)
            del sla

        if full:
            rcm = RCMTrainer(recipe, run_dir, env, weights, inputs=inputs)
            warm = recipe.rcm.tangent_warmup
            add("rcm student step (warm-up)", wall(lambda: rcm.train_step(min(next(step), warm - 1)), 2, args.iters),
                recipe.rcm.run.batch)
            freq = recipe.rcm.student_update_freq
            after = iter(range(warm, 10**6))
            add("rcm step after warm-up (mix)", wall(lambda: rcm.train_step(next(after)), freq, 2 * freq),
                recipe.rcm.run.batch)
            del rcm

            net = new_dit(recipe).to(env.device).eval().requires_grad_(False)
            shape = (8, *recipe.latent_shape)
            context = inputs.text.encode(["a red circle moves to the left on a black background"] * 8).float()

            def sample(sampler, steps):
                lat = generate_latents(net, context, inputs.negative, shape, env, sampler=sampler, steps=steps, seed=0)
                inputs.vae.decode_reference(lat.to(inputs.vae.dtype), clamp=True)
            add("sample rcm 4 steps + decode", wall(lambda: sample("rcm", 4), 1, 3), 8, "8 videos")
            add("sample 50 steps CFG + decode", wall(lambda: sample("teacher", recipe.eval_teacher_steps), 1, 3), 8,
                "8 videos")

    print_table(rows, ["row", "ms", "batch", "unit"])
    write_results(f"train_speed_{args.recipe}" + ("" if args.rows == "all" else f"_{args.rows}"), {
        "recipe": args.recipe, "size": recipe.size, "frames": recipe.frames, "tokens": recipe.latent_tokens,
        "dit": dataclasses.asdict(recipe.dit), "vae": dataclasses.asdict(recipe.vae),
        "dit_params": sum(p.numel() for p in new_dit(recipe).parameters()), "rows": rows,
        "timing": "median wall-clock seconds per call, each closed by torch.cuda.synchronize()"}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
