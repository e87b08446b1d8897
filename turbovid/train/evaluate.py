"""Prompt adherence of a trained DiT: generate the clips of held-out prompts, decode, grade with `detect`.

Samplers are the inference ones (turbovid.sampling): "teacher" = UniPC flow matching with CFG against the
negative prompt (shift 5, guidance 5, like `turbovid generate --steps 50`), "rcm" = the few-step rCM
sampler (sigma_max 80, SDE), like `turbovid generate --steps 4`. The prompts are the first `count` clips of
the held-out split (never trained on) or, with split="train", fresh clips of the training distribution
(seed data_seed + 1).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from turbovid.config import WAN_NEGATIVE_PROMPT, SampleConfig
from turbovid.sampling import cfg_velocity, flow_times, rcm_sample, rcm_times, unipc_sample
from turbovid.train.checkpoint import load_weights
from turbovid.train.data import sample_clip
from turbovid.train.detect import VERSION as DETECTOR_VERSION, adherence
from turbovid.train.inputs import build_text_encoder, load_trained_vae
from turbovid.train.loop import Env
from turbovid.train.recipe import Recipe
from turbovid.train.teacher import frozen_dit

EVAL_BATCH = 8


@torch.no_grad()
def generate_latents(net, context: torch.Tensor, negative: torch.Tensor, shape: tuple[int, ...], env: Env, *,
                     sampler: str, steps: int, seed: int, guidance: float = SampleConfig.guidance,
                     shift: float = SampleConfig.shift, sigma_max: float = 80.0,
                     record: dict[int, torch.Tensor | None] | None = None,
                     start: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """Latents [B, 16, T, h, w] fp32 for the prompts embedded in `context` [B, text_len, text_dim].
    `record` (teacher sampler): for each step index among its keys, the state x (fp32) the network is evaluated at
    in that step is stored under it (step 0: the initial noise).
    `start` = (x, s) (teacher sampler, entered late): sample from the state x at RF time s over the times of the
    `steps`-step schedule below s, instead of from fresh noise (`seed` then draws nothing)."""
    generator = torch.Generator(env.device).manual_seed(seed)
    if start is not None and sampler != "teacher":
        raise ValueError("a start state is for the teacher sampler")
    noise = torch.randn(shape, generator=generator, device=env.device, dtype=torch.float32) if start is None \
        else start[0]
    if sampler == "rcm":
        def velocity(x, t_net, step, s_cur):
            with env.autocast():
                return net(x.float(), t_net, context).float()
        return rcm_sample(velocity, noise, rcm_times(steps, sigma_max), generator)
    if sampler == "teacher":
        both = torch.cat([context, negative.expand_as(context)])

        def guided(x, t_net, step, s_cur):
            if record is not None and step in record:
                record[step] = x.float()
            with env.autocast():
                v = net(torch.cat([x, x]).float(), torch.cat([t_net, t_net]), both).float()
            v_cond, v_uncond = v.chunk(2)
            return cfg_velocity(v_cond, v_uncond, guidance)
        times = flow_times(steps, shift)
        if start is not None:
            times = [start[1]] + [s for s in times if s < start[1]]
        return unipc_sample(guided, noise, times)
    raise ValueError(f"unknown sampler {sampler!r}; choose teacher or rcm")


def evaluate(recipe: Recipe, run_dir: Path, env: Env, dit: str | Path, *, attention: str = "dense",
             sampler: str = "rcm", steps: int = 4, count: int | None = None, split: str = "heldout",
             out: str | Path | None = None, videos: str | Path | None = None, video_backend: str = "ffmpeg",
             seed: int = 0, guidance: float = SampleConfig.guidance, shift: float = SampleConfig.shift) -> dict:
    """Generate `count` clips with the DiT weights at `dit`, grade them; write the scores to `out` (JSON) and
    the first 8 clips side by side to `videos` (mp4, turbovid.video's `video_backend`) when given.
    `guidance`/`shift`: the teacher sampler's."""
    count = recipe.eval_clips if count is None else count
    data_seed = recipe.data_seed if split == "heldout" else recipe.data_seed + 1
    clips = [sample_clip(data_seed, split, i) for i in range(count)]
    vae = load_trained_vae(recipe, run_dir, env)
    text = build_text_encoder(recipe, run_dir, env)
    negative = text.encode([WAN_NEGATIVE_PROMPT]).float()
    net = frozen_dit(recipe, load_weights(dit, env.device), env, attention=attention, topk=recipe.sla.topk)
    latent = recipe.latent_shape
    decoded, t0 = [], time.perf_counter()
    for first in range(0, count, EVAL_BATCH):
        batch = clips[first:first + EVAL_BATCH]
        context = text.encode([c.caption for c in batch]).float()
        z = generate_latents(net, context, negative, (len(batch), *latent), env, sampler=sampler, steps=steps,
                             seed=seed + first, guidance=guidance, shift=shift)
        decoded.append(vae.decode_reference(z.to(vae.dtype), clamp=True).float().cpu())
    video = torch.cat(decoded)
    scores = adherence(list(video), [c.attributes() for c in clips])
    result = {"detector_version": DETECTOR_VERSION, "dit": str(dit), "attention": attention, "sampler": sampler,
              "steps": steps, "split": split,
              **({"guidance": guidance, "shift": shift} if sampler == "teacher" else {}),
              "count": count, "seconds": time.perf_counter() - t0,
              **{k: v for k, v in scores.items() if k != "detections"},
              "clips": [{"caption": c.caption, "truth": c.attributes(), "found": d}
                        for c, d in zip(clips, scores["detections"])]}
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1))
    if videos is not None:
        from turbovid.video import tile_samples, to_uint8_frames, write_video
        write_video(videos, to_uint8_frames(tile_samples(video[:8])), backend=video_backend)
    return result
