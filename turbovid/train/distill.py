"""Stage 3: rCM distillation = sCM (continuous-time consistency, exact JVP) + DMD (fake score), SPEC §10.3.

Three networks, all starting from the teacher: the student (trained, full attention), the frozen teacher
(queried with CFG against the negative prompt), and the fake-score network (trained to denoise the
student's samples). Ours: the student may start from other weights (`--init`, e.g. an SLA-tuned rCM student)
and distil with SLA attention (`RCMStage.student_attention = "sla"`): its samples, sCM target and DMD
gradient are then those of the sparse network that ships, while teacher and fake score stay dense.
Step n is a student step during the tangent warm-up and then every `student_update_freq`-th step; the
others are fake-score (critic) steps (`losses.rcm_phase`). With `RCMStage.dmd` off (ours) every step is a
student step and the stage is sCM alone, its tangent at full weight after the warm-up; the fake-score network is
then not built. With `RCMStage.scm` off (ours) the stage is DMD alone, for a student distilled already (`--init`):
the warm-up's steps are critic steps (the fake score, which starts as the teacher, learns the start student's
samples), then one student step every `student_update_freq`, whose loss is step 4's sample's DMD term alone, plus
with `RCMStage.anchor_weight` that weight times the sample's summed squared distance to the frozen start student's x0
from the same state (an anchor against the colour drift DMD brought in session 25); with `RCMStage.anchor_pool` k > 1
only the distance's k x k spatial block averages count (`losses.anchor_distance`), the outlines left to DMD, and
`RCMStage.anchor_size_scale` scales it per sample by the object size its caption states; with `RCMStage.adv_weight`
(after DMD2) the student's sample also gets a discriminator's generator loss (train/adversarial.py: heads on the
frozen teacher's features, trained at every critic step on the batch's data latents, the captions' own clips, against
the student's samples); with `RCMStage.oversample` the clips with the attribute values it names (their captions and
latents) come that many times per pass of the latent pool; with `RCMStage.dmd_shift` the DMD term's and the critic's
t_D are drawn at that shift instead of shift_d (the simulation's re-noising keeps shift_d). `run_dmd` runs a recipe's
`dmd_round` (such a stage) from the ode stage's student, the mini release's last stage.

Student step, batch of data latents x0 with captions (with `RCMStage.teacher_data`, as in rCM: latents the
teacher sampled for those captions, `TeacherSamples`):
 1. t ~ p_G (t = atan(sigma sqrt(T_lat)), sigma log-normal), x_t = cos t x0 + sin t eps.
 2. F_T = teacher TrigFlow velocity with CFG (no grad).
 3. JVP of the student's F along (cos t sin t F_T, cos t sin t) -> cos t sin t dF/dt (exact, no grad).
 4. After the warm-up, backward simulation: from pure noise at t = pi/2, (n_eff mod 4) no-grad student
    steps (x0_hat, re-noise at a fresh non-increasing angle from p_D), then one student call with grad
    -> G_x0; it shares one batched forward with the sCM call at (x_t, t), as in rCM.
 5. sCM loss with the warm-up ratio r = min(1, n / warmup) (`losses.scm_target`, `scm_loss`; with
    `RCMStage.fg_share` > 0, ours, the object's latent cells carry that share of each sample's), plus
    after the warm-up the DMD loss at x_D = cos t_D G_x0 + sin t_D eps, t_D ~ p_D, from the fake score
    and the guided teacher (`losses.dmd_loss`). Per-sample losses are summed, then averaged over the batch.
Critic step: G_x0 by a no-grad backward simulation of ((n_fake mod 4) + 1) student calls, re-noised at
t_D ~ p_D; loss = sum (G_x0 - x0_fake)^2 / sin^2 t_D.
The power EMA of the student (updated on student steps with the student's effective iteration) is the
exported model.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from turbovid.train.adversarial import Adversarial
from turbovid.train.checkpoint import load_weights
from turbovid.train.data import SIZES, latent_object_mask, object_weights
from turbovid.train.ema import PowerEMA
from turbovid.train.inputs import LatentBatches
from turbovid.train.loop import (Env, TrainedNetworks, drive, make_optimizer, optimizer_step, step_generator,
                                 step_indices, wrap_ddp)
from turbovid.train.losses import (_b, anchor_distance, dmd_loss, fake_score_loss, rcm_phase, sample_p_d, sample_p_g,
                                   scm_loss, scm_target, trigflow_velocity)
from turbovid.train.recipe import Recipe
from turbovid.train.teacher import dit_from_weights, frozen_dit, teacher_file
from turbovid.train.trigflow import denoise, guided_denoise, student_F_jvp


def _renoise(x0: torch.Tensor, t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    eps = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
    return _b(torch.cos(t), x0).to(x0.dtype) * x0 + _b(torch.sin(t), x0).to(x0.dtype) * eps


class TeacherSamples(LatentBatches):
    """rCM's training data (SPEC §5.2: its student learns from latents its teacher family generated, not from
    encoded videos): the pool's latents are the frozen teacher's own samples of the pooled clips' captions, drawn
    by the sampler its adherence is graded with (`evaluate.generate_latents`: UniPC, `recipe.eval_teacher_steps`,
    CFG against the negative prompt, shift 5). Captions, clips and batching are LatentBatches'. The samples
    depend on the teacher, so they are cached beside the stage's checkpoints, run_dir/rcm/teacher_data_*."""

    POOL_CHUNK = 64
    CACHE = ("rcm", "teacher_data")    # the cache's folder in the run directory and its file names' start

    def __init__(self, recipe: Recipe, run_dir: Path, env: Env, teacher, count: int,
                 oversample: tuple[tuple[str, int], ...] = ()):
        self.teacher = teacher
        super().__init__(recipe, run_dir, env, pool=count, oversample=oversample)

    def _pool_file(self, split: str, pool: int) -> Path:
        env, (folder, name) = self.env, self.CACHE
        return self.run_dir / folder / f"{name}_{split}_{pool}_rank{env.rank}of{env.world}.safetensors"

    def _pool_chunk(self, indices: list[int]) -> torch.Tensor:
        return self._draw(indices)

    def _draw(self, indices: list[int], record: dict | None = None) -> torch.Tensor:
        """The teacher's samples of the captions of the clips at `indices`, seeded by the first index
        (`record`: generate_latents')."""
        from turbovid.train.evaluate import generate_latents

        context, _ = self.captions(indices)
        return generate_latents(self.teacher, context, self.negative, (len(indices), *self.recipe.latent_shape),
                                self.env, sampler="teacher", steps=self.recipe.eval_teacher_steps,
                                seed=self.recipe.seed * 1_000_003 + indices[0], record=record)


def _per_size(scale: tuple[float, float, float], clips, device) -> torch.Tensor:
    """[B] fp32: each clip's factor of `scale` (small, medium, large) for the object size its caption states."""
    factor = dict(zip(SIZES, scale))
    return torch.tensor([factor[c.size] for c in clips], dtype=torch.float32, device=device)


class RCMTrainer(TrainedNetworks):
    name = "rcm"

    def __init__(self, recipe: Recipe, run_dir: Path, env: Env, teacher_weights: dict[str, torch.Tensor],
                 fixed_batch: bool = False, inputs: LatentBatches | None = None,
                 student_weights: dict[str, torch.Tensor] | None = None):
        """`student_weights`: the student's start (default: the teacher's weights; an SLA student without
        proj_l starts it at zero)."""
        self.recipe, self.env, self.cfg = recipe, env, recipe.rcm
        self.schedule, self.fixed_batch = self.cfg.run, fixed_batch
        self.teacher = frozen_dit(recipe, teacher_weights, env)
        if inputs is None and self.cfg.teacher_data:
            inputs = TeacherSamples(recipe, run_dir, env, self.teacher, self.cfg.teacher_data, self.cfg.oversample)
        self.inputs = inputs or LatentBatches(recipe, run_dir, env, pool=recipe.pool_clips,
                                              oversample=self.cfg.oversample)
        self.student = dit_from_weights(recipe, teacher_weights if student_weights is None else student_weights,
                                        self.cfg.student_attention, recipe.sla.topk, new_proj_l=True)
        self.student.to(env.device).train()
        self.student_ddp = wrap_ddp(self.student, env)
        self.ema = PowerEMA(self.student, self.cfg.ema_sigma_rel)
        self.opt_student = make_optimizer(self.student.parameters(), self.cfg.optim, env)
        self.trained = {"student": (self.student_ddp, self.opt_student)}   # name -> (network, its optimizer)
        if self.cfg.dmd:         # the fake score exists for DMD only
            self.fake = dit_from_weights(recipe, teacher_weights)
            self.fake.to(env.device).train()
            self.fake_ddp = wrap_ddp(self.fake, env)
            self.opt_fake = make_optimizer(self.fake.parameters(), self.cfg.fake_optim, env)
            self.trained["fake"] = (self.fake_ddp, self.opt_fake)
        self.adv = None          # DMD alone with the adversarial term: heads on the frozen teacher's features
        if self.cfg.adv_weight:
            self.adv = Adversarial(recipe, self.teacher, self.cfg.adv_layers, self.cfg.adv_noise, self.cfg.adv_optim,
                                   env)
            self.trained["disc"] = (self.adv.ddp, self.adv.optimizer)
        self.anchor = None       # DMD alone with an anchor: the frozen start student
        if self.cfg.anchor_weight:
            self.anchor = frozen_dit(recipe, teacher_weights if student_weights is None else student_weights, env,
                                     self.cfg.student_attention, recipe.sla.topk, new_proj_l=True)
        self.noise_multiplier = math.sqrt(recipe.latent_shape[1])   # rCM's adjust_video_noise: sigma * sqrt(state_t)

    # -- pieces ------------------------------------------------------------------------------------

    def _simulate(self, x0_like: torch.Tensor, context: torch.Tensor, steps: int, g: torch.Generator):
        """No-grad backward simulation with the student from pure noise at t = pi/2: `steps` student denoising
        steps, each followed by re-noising at min(t_prev, t ~ p_D). Returns (x_t, t) of the last state."""
        B, dev = x0_like.shape[0], x0_like.device
        t = torch.full((B,), math.pi / 2, dtype=torch.float64, device=dev)
        x = torch.randn(x0_like.shape, generator=g, device=dev)
        for _ in range(steps):
            with torch.no_grad(), self.env.autocast():
                x0 = denoise(self.student, x, t, context)
            t = torch.minimum(sample_p_d(B, g, self.cfg.shift_d, dev), t)
            x = _renoise(x0, t, g)
        return x, t

    def _guided_teacher(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor, clips) -> torch.Tensor:
        """The teacher's CFG x0, at `guidance` times `guidance_size_scale`'s factor for each sample's object size."""
        guidance = self.cfg.guidance
        if tuple(self.cfg.guidance_size_scale) != (1.0, 1.0, 1.0):
            guidance = guidance * _per_size(self.cfg.guidance_size_scale, clips, x_t.device)
        with torch.no_grad(), self.env.autocast():
            return guided_denoise(self.teacher, x_t, t, context, self.inputs.negative, guidance)

    def _t_D(self, B: int, g: torch.Generator, device) -> torch.Tensor:
        """The DMD term's and the critic's noise angles: p_D at dmd_shift when set, else at shift_d."""
        return sample_p_d(B, g, self.cfg.dmd_shift or self.cfg.shift_d, device)

    # -- steps -------------------------------------------------------------------------------------

    def _dmd_term(self, G_x0: torch.Tensor, context: torch.Tensor, g: torch.Generator, clips) -> torch.Tensor:
        """Per-sample DMD loss of the student's sample G_x0 (with grad) at x_D = cos t_D G_x0 + sin t_D eps,
        t_D ~ p_D, from the fake score and the guided teacher."""
        cfg = self.cfg
        t_D = self._t_D(G_x0.shape[0], g, G_x0.device)
        x_D = _renoise(G_x0.float(), t_D, g)
        with torch.no_grad(), self.env.autocast():
            x0_fake = denoise(self.fake, x_D.detach(), t_D, context)
        x0_real = self._guided_teacher(x_D.detach(), t_D, context, clips)
        return dmd_loss(G_x0.float(), x0_fake.float(), x0_real.float(), cfg.loss_scale_dmd)

    def _student_step(self, step: int, n_eff: int, x0, context, g, clips) -> dict[str, float]:
        cfg = self.cfg
        loss, logs = self._dmd_alone_loss(n_eff, x0, context, g, clips) if not cfg.scm else \
            self._scm_loss(step, n_eff, x0, context, g, clips)
        loss = loss.mean()
        loss.backward()
        lr, norm = optimizer_step(self.opt_student, cfg.optim, n_eff, self.schedule.steps)
        self.ema.update(self.student, n_eff)
        return {"loss": loss.item(), **logs, "lr": lr, "grad_norm": norm}

    def _dmd_alone_loss(self, n_eff: int, x0, context, g, clips) -> tuple[torch.Tensor, dict[str, float]]:
        """RCMStage.scm off: the DMD term of a backward simulation's sample, plus with `anchor_weight` its summed
        squared distance to the frozen start student's x0 from the same state (`anchor_pool`: of the block averages),
        times `anchor_size_scale`'s factor for the object size each sample's caption states."""
        G_x, G_t = self._simulate(x0, context, n_eff % self.cfg.max_simulation_steps, g)
        with self.env.autocast():
            G_x0 = denoise(self.student_ddp, G_x, G_t, context)
        loss_dmd = self._dmd_term(G_x0, context, g, clips)
        logs = {"loss_dmd": loss_dmd.mean().item()}
        if self.adv is not None:
            # the hinge generator loss per sample, times the sample's latent elements (the DMD term is a sum over
            # them), through the frozen teacher's features with the heads frozen
            s_d, noise = self.adv.draw(G_x0, g)
            logits = self.adv.generator_logits(self.adv.features(G_x0.float(), context, s_d, noise),
                                               self.adv.caption(context))
            loss_adv = -logits.mean(1)
            logs["loss_adv"] = loss_adv.mean().item()
            loss_dmd = loss_dmd + self.cfg.adv_weight * G_x0[0].numel() * loss_adv
        if self.anchor is None:
            return loss_dmd, logs
        with torch.no_grad(), self.env.autocast():
            x0_start = denoise(self.anchor, G_x, G_t, context)
        scale = _per_size(self.cfg.anchor_size_scale, clips, G_x0.device)
        loss_anchor = scale * anchor_distance(G_x0, x0_start, self.cfg.anchor_pool)
        logs["loss_anchor"] = loss_anchor.mean().item()
        return loss_dmd + self.cfg.anchor_weight * loss_anchor, logs

    def _scm_loss(self, step: int, n_eff: int, x0, context, g, clips) -> tuple[torch.Tensor, dict[str, float]]:
        """The sCM loss, plus the DMD term after the warm-up (rCM)."""
        cfg, B, dev = self.cfg, x0.shape[0], x0.device
        t = sample_p_g(B, g, cfg.p_mean, cfg.p_std, self.noise_multiplier, dev)
        x_t = _renoise(x0, t, g)
        F_teacher = trigflow_velocity(x_t, t, self._guided_teacher(x_t, t, context, clips))
        cs = torch.cos(t) * torch.sin(t)
        with self.env.autocast():
            _, tangent = student_F_jvp(self.student, x_t, t, context, (_b(cs, x_t) * F_teacher).to(x_t.dtype), cs)
        dmd = cfg.dmd and step >= cfg.tangent_warmup
        if dmd:
            G_x, G_t = self._simulate(x0, context, n_eff % cfg.max_simulation_steps, g)
            with self.env.autocast():
                x0_all = denoise(self.student_ddp, torch.cat([x_t, G_x]), torch.cat([t, G_t]),
                                 torch.cat([context, context]))
            x0_theta, G_x0 = x0_all.chunk(2)
        else:
            with self.env.autocast():
                x0_theta = denoise(self.student_ddp, x_t, t, context)
        F_theta = trigflow_velocity(x_t, t, x0_theta.float())
        r = min(1.0, step / cfg.tangent_warmup) if cfg.tangent_warmup > 0 else 1.0
        g_dir = scm_target(F_theta.detach(), F_teacher, tangent.float(), x_t, t, r)
        weight = None
        if cfg.fg_share > 0:     # the object's cells carry fg_share of each sample's loss, [B, 1, T, h, w]
            mask = latent_object_mask(clips, self.recipe.frames, tuple(x0.shape[2:]), self.recipe.vae.temporal_factor)
            weight = object_weights(mask, fg_share=cfg.fg_share).unsqueeze(1).to(dev)
        loss = scm_loss(F_theta, g_dir, cfg.loss_scale, weight)
        logs = {"loss_scm": loss.mean().item(), "warmup_ratio": r}
        if dmd:
            loss_dmd = self._dmd_term(G_x0, context, g, clips)
            loss = loss + loss_dmd
            logs["loss_dmd"] = loss_dmd.mean().item()
        return loss, logs

    def _critic_step(self, n_fake: int, x0, context, g) -> dict[str, float]:
        cfg, B, dev = self.cfg, x0.shape[0], x0.device
        G_x, G_t = self._simulate(x0, context, n_fake % cfg.max_simulation_steps, g)
        with torch.no_grad(), self.env.autocast():
            G_x0 = denoise(self.student, G_x, G_t, context).float()
        t_D = self._t_D(B, g, dev)
        x_D = _renoise(G_x0, t_D, g)
        with self.env.autocast():
            x0_fake = denoise(self.fake_ddp, x_D, t_D, context)
        loss = fake_score_loss(G_x0, x0_fake.float(), t_D).mean()
        loss.backward()
        # rCM's fake iteration count is -1 at the first critic step when warm-up % freq != 0
        lr, norm = optimizer_step(self.opt_fake, cfg.fake_optim, max(n_fake, 0), self.schedule.steps)
        logs = {"loss_fake": loss.item(), "lr_fake": lr, "grad_norm_fake": norm}
        if self.adv is not None:    # the heads: the batch's data latents (its captions' clips) against these samples
            s_d, noise = self.adv.draw(G_x0, g)
            with torch.no_grad():
                real = self.adv.features(x0.float(), context, s_d, noise)
                fake = self.adv.features(G_x0, context, s_d, noise)
            logs.update(self.adv.heads_step(real, fake, self.adv.caption(context), max(n_fake, 0),
                                            self.schedule.steps))
        return logs

    def train_step(self, step: int) -> dict[str, float]:
        data_step = 0 if self.fixed_batch else step
        x0, context, clips = self.inputs.get(step_indices(data_step, self.env, self.schedule.batch))
        g = step_generator(self.recipe.seed, data_step, self.env.rank, self.env.device)
        # without DMD there is no critic: a student step every step (update frequency 1)
        phase, n = rcm_phase(step, self.cfg.tangent_warmup, self.cfg.student_update_freq if self.cfg.dmd else 1,
                             critic_first=not self.cfg.scm)
        if phase == "student":
            return {"student": 1.0, **self._student_step(step, n, x0, context, g, clips)}
        return {"student": 0.0, **self._critic_step(n, x0, context, g)}

    # -- checkpoint interface ----------------------------------------------------------------------

    def load_weights(self, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        if "fake" in self.trained and "fake" not in weights:
            raise ValueError("this rcm checkpoint has no fake-score network (a --no-dmd run): resume it with --no-dmd")
        super().load_weights(weights)


def run_rcm(recipe: Recipe, run_dir: Path, env: Env, until: int | None = None,
            init: str | Path | None = None, folder: str = "rcm") -> Path:
    """The rCM stage (recipe.rcm) into run_dir/<folder>; `init`: the student's start weights (default: the
    teacher)."""
    out = Path(run_dir) / folder
    teacher, student = teacher_file(run_dir), None
    if init is not None:
        if not Path(init).is_file():
            raise ValueError(f"--init {init}: no such file")
        student = load_weights(init)
    drive(RCMTrainer(recipe, run_dir, env, load_weights(teacher, env.device), student_weights=student), out, env,
          until=until, init=teacher if init is None else init)
    return out / "final.safetensors"


def run_dmd(recipe: Recipe, run_dir: Path, env: Env, until: int | None = None) -> Path:
    """recipe.dmd_round into run_dir/dmd: DMD alone (an rCM stage with sCM off, its record in the weights history
    "rcm") from the ode stage's last round's student, that student and its anchor with SLA at the top-k the round
    trained at."""
    if recipe.dmd_round is None:
        raise ValueError(f"recipe {recipe.name!r} has no DMD round")
    init = Path(run_dir) / "ode" / "final.safetensors"     # the last round's folder (loop.round_dirs)
    if not init.is_file():
        raise ValueError(f"the DMD round continues the ode stage's student; missing {init}")
    stage = dataclasses.replace(recipe, rcm=recipe.dmd_round,
                                sla=dataclasses.replace(recipe.sla, topk=recipe.ode_stages[-1].topk))
    return run_rcm(stage, run_dir, env, until=until, init=init, folder="dmd")
