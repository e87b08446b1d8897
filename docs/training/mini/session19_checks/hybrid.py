"""Session 19 check: at which of its 4 steps does the shipped student lose the clips the teacher draws right?

For N held-out prompts (the `turbovid eval` prompts, start..start+N-1) and fixed seeds this samples, all with dense
attention:
  student   the shipped 4-step student, rCM SDE sampler (sigma_max 80, angles 1.5, 1.4, 1.0);
  hybrid_k  the student's first k steps of that sampler (k = 1, 2, 3), which end in its x0 prediction re-noised to
            the k-th time s_k, then the shipped teacher from s_k to 0: UniPC with CFG 5 on the 50-step grid's times
            below s_k (the teacher's own sampler, entered late);
  teacher   the teacher alone, 50 steps UniPC + CFG 5, from the same first noise.
Every variant starts from the same noise per prompt and draws the same SDE noises, so hybrid_k shares the
student's first k steps exactly. If hybrid_3 (student for 3 steps, the teacher for the last stretch from s = 0.61)
grades as the teacher does, the student loses its clips in its last step; if hybrid_1 already grades as the student,
the first step (pure noise -> x0) decides them.

    PYTHONPATH=. python3 docs/training/mini/session19_checks/hybrid.py RUN_DIR [--count N] [--start S] [--out F]
        [--variants student,hybrid_3,...]

(The detector runs on the CPU, one video at a time: 5 variants of 512 prompts did not finish in a 10-minute command
on the H100 machine in session 22; `--variants` picks some.)

RUN_DIR: a run directory assembled from the shipped files (docs/training/mini/device/assemble.py); the student is
RUN_DIR/sla/final.safetensors, the teacher RUN_DIR/teacher/final.safetensors.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from turbovid.config import MODELS, WAN_NEGATIVE_PROMPT
from turbovid.sampling import rcm_sample, rcm_times
from turbovid.train.checkpoint import load_weights
from turbovid.train.data import sample_clip
from turbovid.train.detect import adherence, prompt_right
from turbovid.train.evaluate import generate_latents
from turbovid.train.inputs import build_text_encoder, load_trained_vae
from turbovid.train.loop import Env
from turbovid.train.recipe import RECIPES
from turbovid.train.teacher import frozen_dit

BATCH = 32


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--count", type=int, default=128)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--variants", help="comma-separated subset of student, hybrid_1, hybrid_2, hybrid_3, teacher")
    args = ap.parse_args()
    recipe = RECIPES["mini"]
    env = Env(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    run_dir = args.run_dir
    student = frozen_dit(recipe, load_weights(run_dir / "sla" / "final.safetensors", env.device), env)
    teacher_net = frozen_dit(recipe, load_weights(run_dir / "teacher" / "final.safetensors", env.device), env)
    text = build_text_encoder(recipe, run_dir, env)
    vae = load_trained_vae(recipe, run_dir, env)
    negative = text.encode([WAN_NEGATIVE_PROMPT]).float()
    clips = [sample_clip(recipe.data_seed, "heldout", i) for i in range(args.start, args.start + args.count)]
    sigma_max = MODELS[recipe.name].sigma_max
    few = rcm_times(recipe.eval_rcm_steps, sigma_max)
    variants = {"student": None, **{f"hybrid_{k}": k for k in range(1, len(few) - 1)}, "teacher": 0}
    if args.variants:
        picked = set(args.variants.split(","))
        if picked - set(variants):
            raise SystemExit(f"unknown variants {sorted(picked - set(variants))}; choose from {list(variants)}")
        variants = {name: k for name, k in variants.items() if name in picked}
    videos: dict[str, list[torch.Tensor]] = {name: [] for name in variants}
    seconds = {name: 0.0 for name in variants}

    for first in range(0, args.count, BATCH):
        batch = clips[first:first + BATCH]
        context = text.encode([c.caption for c in batch]).float()
        shape, seed = (len(batch), *recipe.latent_shape), args.start + first

        def student_v(x, t_net, step, s_cur):
            with env.autocast():
                return student(x.float(), t_net, context).float()

        def teacher(start=None):   # the graded teacher sampler, from fresh noise or entered late at start = (x, s)
            return generate_latents(teacher_net, context, negative, shape, env, sampler="teacher",
                                    steps=recipe.eval_teacher_steps, seed=seed, start=start)

        for name, k in variants.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                if k is None:
                    z = generate_latents(student, context, negative, shape, env, sampler="rcm",
                                         steps=recipe.eval_rcm_steps, seed=seed, sigma_max=sigma_max)
                elif k == 0:
                    z = teacher()
                else:    # the student's first k steps end at s_k (its x0 re-noised there), the teacher goes on
                    g = torch.Generator(env.device).manual_seed(seed)
                    noise = torch.randn(shape, generator=g, device=env.device)
                    z = teacher((rcm_sample(student_v, noise, few[:k + 1], g), few[k]))
                videos[name].append(vae.decode_reference(z.to(vae.dtype), clamp=True).float().cpu())
            if env.device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name] += time.perf_counter() - t0

    truth = [c.attributes() for c in clips]
    rows, found = {}, {}
    for name in variants:
        scores = adherence(list(torch.cat(videos[name])), truth)
        found[name] = scores["detections"]
        rows[name] = {k: v for k, v in scores.items() if k != "detections"} | {"seconds": seconds[name]}
        print(f"{name:10s} adherence {scores['all']:.3f} colour {scores['color']:.2f} shape {scores['shape']:.2f} "
              f"direction {scores['direction']:.2f} ({seconds[name]:.0f} s)", flush=True)
    right = {name: [prompt_right(d, t) for d, t in zip(found[name], truth)] for name in variants}
    ref = "teacher" if "teacher" in variants else next(iter(variants))    # the teacher, else the first variant
    versus = {name: {f"right_where_{ref}_wrong": sum(r and not t for r, t in zip(right[name], right[ref])),
                     f"wrong_where_{ref}_right": sum(t and not r for r, t in zip(right[name], right[ref]))}
              for name in variants if name != ref}
    print(json.dumps(versus))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"count": args.count, "start": args.start, "device": str(env.device),
                                        "gpu": torch.cuda.get_device_name() if env.device.type == "cuda" else None,
                                        "times_rcm": few, "rows": rows, f"versus_{ref}": versus,
                                        "clips": [{"caption": c.caption, "truth": t, **{n: found[n][i] for n in variants}}
                                                  for i, (c, t) in enumerate(zip(clips, truth))]}, indent=1))


if __name__ == "__main__":
    main()
