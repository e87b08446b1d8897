"""Session 18 CPU check of the data `train rcm --teacher-data` distilled on (`distill.TeacherSamples`).

On the GPU (session18.sh t1) the sCM student learnt from 2048 of the shipped teacher's samples of training captions
lost colour (`train eval` dense, 128 held-out prompts: 0.69 at step 750, colour 0.79, hue drift 18 degrees, against
0.85 / 0.96 / 6 for session 14's student distilled on encoded clips). Are the samples what they should be? For the
first N pooled training clips this builds the same TeacherSamples pool on this CPU (fp32 instead of the GPU's bf16
autocast), decodes it with the shipped VAE and grades it with the detector against the captions it was drawn for,
and compares the latents with the encodings of the clips themselves (per-channel mean and std, overall RMS).

    PYTHONPATH=. python3 docs/training/mini/session18_checks/teacher_data_check.py RUN_DIR [N] [OUT.json]

RUN_DIR: a run directory assembled from the shipped files (docs/training/mini/device/assemble.py); the pool is
cached in RUN_DIR/rcm/.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from turbovid.train.checkpoint import load_weights
from turbovid.train.detect import adherence
from turbovid.train.distill import TeacherSamples
from turbovid.train.inputs import encode_videos, load_trained_vae
from turbovid.train.loop import Env
from turbovid.train.recipe import RECIPES
from turbovid.train.teacher import frozen_dit


def main(run_dir: Path, n: int, out: Path | None) -> None:
    torch.set_num_threads(2)
    recipe, env = RECIPES["mini"], Env(torch.device("cpu"))
    teacher = frozen_dit(recipe, load_weights(run_dir / "teacher" / "final.safetensors"), env)
    data = TeacherSamples(recipe, run_dir, env, teacher, n)
    clips = [data.data.clip(i) for i in data.pool_indices]
    sampled = data.pool_latents.float()
    vae = load_trained_vae(recipe, run_dir, env)
    with torch.no_grad():
        videos = [vae.decode_reference(z[None], clamp=True).float()[0] for z in sampled]
        real_videos, _ = data.data.batch(data.pool_indices, env.device)
        encoded = encode_videos(data.vae, real_videos)
    scores = adherence(videos, [c.attributes() for c in clips])
    real_scores = adherence(list(real_videos), [c.attributes() for c in clips])

    def stats(z):
        return {"channel_mean": z.mean(dim=(0, 2, 3, 4)).tolist(), "channel_std": z.std(dim=(0, 2, 3, 4)).tolist(),
                "rms": z.pow(2).mean().sqrt().item()}
    result = {"clips": n, "teacher_samples": {k: v for k, v in scores.items() if k != "detections"},
              "data_clips": {k: v for k, v in real_scores.items() if k != "detections"},
              "latents_teacher": stats(sampled), "latents_encoded": stats(encoded),
              "per_clip": [{"caption": c.caption, "truth": c.attributes(), "found": d}
                           for c, d in zip(clips, scores["detections"])]}
    print(f"teacher samples: adherence {scores['all']:.3f} colour {scores['color']:.2f} shape {scores['shape']:.2f} "
          f"direction {scores['direction']:.2f} hue drift {scores['hue_drift']}")
    print(f"their clips:     adherence {real_scores['all']:.3f} colour {real_scores['color']:.2f}")
    print(f"latent RMS: teacher samples {result['latents_teacher']['rms']:.3f}, "
          f"encoded clips {result['latents_encoded']['rms']:.3f}")
    if out is not None:
        out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 16,
         Path(sys.argv[3]) if len(sys.argv) > 3 else None)
