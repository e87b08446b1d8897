"""Session 16 CPU check: how much of the sCM target's tangent term survives bf16 autocast (the GPU's training
precision), for the mini model.

Session 16's rCM run past the tangent warm-up (r = 1, lr 2e-5, batch 8) lost adherence (0.852 -> 0.750 by step 864),
so: is the tangent cos t sin t dF/dt that r = 1 weighs in fully computed accurately enough in bf16? For 8 training
clips (VAE-encoded on the fly) at seeded sCM angles t ~ p_G, this computes, as `distill.RCMTrainer._student_step`
does, the guided teacher's F_T (fp32), then the student's JVP twice, in fp32 and under bf16 autocast, and reports
per sample: t, the relative error of the bf16 tangent, the cosine between the normalised sCM directions g (r = 1 and
r = 0.5) of the two precisions, and the tangent's share of g's norm.

    PYTHONPATH=. python3 docs/training/mini/session16_checks/jvp_precision.py RUN_DIR STUDENT.safetensors [OUT.json]

RUN_DIR: a run directory assembled from the shipped files (docs/training/mini/device/assemble.py).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from turbovid.train.checkpoint import load_weights
from turbovid.train.distill import _renoise
from turbovid.train.inputs import LatentBatches
from turbovid.train.loop import Env
from turbovid.train.losses import _b, sample_p_g, scm_target, trigflow_velocity
from turbovid.train.recipe import RECIPES
from turbovid.train.teacher import dit_from_weights, frozen_dit
from turbovid.train.trigflow import guided_denoise, student_F_jvp


def main(run_dir: Path, student_file: Path, out: Path | None) -> None:
    torch.set_num_threads(2)
    recipe, env = RECIPES["mini"], Env(torch.device("cpu"))
    cfg = recipe.rcm
    inputs = LatentBatches(recipe, run_dir, env)                   # pool 0: rendered and encoded here
    teacher = frozen_dit(recipe, load_weights(run_dir / "teacher" / "final.safetensors"), env)
    student = dit_from_weights(recipe, load_weights(student_file)).eval()
    x0, context, _ = inputs.get(list(range(8)))
    g = torch.Generator().manual_seed(0)
    t = sample_p_g(len(x0), g, cfg.p_mean, cfg.p_std, math.sqrt(recipe.latent_shape[1]))
    x_t = _renoise(x0.float(), t, g)
    with torch.no_grad():
        F_T = trigflow_velocity(x_t, t, guided_denoise(teacher, x_t, t, context, inputs.negative, cfg.guidance).float())
    cs = torch.cos(t) * torch.sin(t)
    dx = _b(cs, x_t) * F_T
    F32, tan32 = student_F_jvp(student, x_t, t, context, dx.float(), cs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        F16, tan16 = student_F_jvp(student, x_t, t, context, dx.float(), cs)
    F32, tan32, F16, tan16 = (v.float() for v in (F32, tan32, F16, tan16))
    rows = []
    for i in range(len(x0)):
        rel = ((tan16[i] - tan32[i]).norm() / tan32[i].norm()).item()
        row = {"t": float(t[i]), "tangent_rel_err_bf16": rel,
               "tangent_norm": tan32[i].norm().item(), "xt_term_norm": (cs[i] * x_t[i]).norm().item(),
               "F_minus_FT_norm": (F32[i] - F_T[i]).norm().item()}
        for r in (1.0, 0.5):
            a = scm_target(F32[i:i + 1], F_T[i:i + 1], tan32[i:i + 1], x_t[i:i + 1], t[i:i + 1], r).flatten()
            b = scm_target(F16[i:i + 1], F_T[i:i + 1], tan16[i:i + 1], x_t[i:i + 1], t[i:i + 1], r).flatten()
            row[f"cos_g_r{r:g}"] = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" for k, v in row.items()), flush=True)
    if out is not None:
        out.write_text(json.dumps({"student": str(student_file), "rows": rows}, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__.strip().splitlines()[-3])
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) == 4 else None)
