"""Trajectory distillation (ours): the few-step student fits the teacher's own samples, the last DiT stage.

The 4-step rCM sampler calls the student at RF times s_0 > s_1 > s_2 > s_3 (`sampling.rcm_times`), and at each
call uses its x0 prediction x - s v. For a state on the teacher's probability-flow ODE the right prediction is
where that ODE ends: the consistency function sCM learns through its tangent, fitted here on the ODE's end points
directly. The end points are drawn by the sampler the teacher's adherence is graded with, so the student is
pulled toward what the graded teacher draws.

Data (`TeacherTrajectories`): for N pooled training captions the frozen teacher samples with UniPC,
`recipe.eval_teacher_steps` steps, CFG against the negative prompt (`evaluate.generate_latents`, as
`distill.TeacherSamples`), and keeps, besides its sample x0_T:
  - the few-step sampler's first input, s_0 eps (pure scaled noise, as `rcm_sample` starts) for the teacher's
    starting noise eps;
  - the states it passes at the steps of its own schedule nearest s_1, s_2, s_3, at those steps' times.
Cached in run_dir/ode/ (bf16, STATES + 1 latents per trajectory).

Step: batch / STATES trajectories, every state of each (STATES = `recipe.eval_rcm_steps`). The target velocity
v* = (x - x0_T) / s is the one whose x0 prediction is the teacher's sample, and the loss is the SLA stage's
(teacher.SLATrainer): the MSE of the student's velocity run with SLA at `recipe.ode.topk`, plus `dense_weight`
times that of its dense-attention output (one file serves every --attention), plus `quant_weight` times that of
its quantized output. In x0 terms a state weighs 1 / s^2 (1.0 to 2.7 for the mini schedule). The student starts
from the SLA-tuned rCM student (run_dir/sla) and exports its power EMA.

On-policy (`recipe.ode.on_policy`). Fitting every state pulls the first prediction, from pure noise, toward the
mean of what the teacher could draw: session 19 measured the student's shapes blurred by it (the full stack 0.848 ->
0.727 on 256 validation prompts). And the student loses its clips late: run for 1-3 of its 4 steps, then
finished by the teacher, it grades as the teacher after its first step and a few clips under it after its third
(docs/training/mini/session19_checks/hybrid.py). So here the inputs are the states the frozen start student visits
when it samples (as the SLA stage's, teacher.SLATrainer._trajectory), drawn every step: the targets of the first
STATES - 1 are the frozen student's own outputs (those steps are kept as they are), and the last state's (or that
of the call `recipe.ode.on_policy_step`) is the teacher's completion from it: its UniPC + CFG sampler run from that
state over its schedule's later times (`evaluate.generate_latents(start=...)`; 12 of 50 steps from the mini
schedule's last state). Nothing is pooled.

Rounds (`recipe.ode_rounds`, folders `ode_dirs`): each continues the previous round's student, so the mini recipe
walks down the sampler one call at a time: round 1 completes the second call (s = 0.93, where the hybrid check sees
the student first fall behind), round 2 the third (s = 0.85) from round 1's student, whose second call keeps its
fitted outputs as targets. Measured (full stack, `turbovid eval`, H100, 256 prompts on each of four sets): the
SLA-tuned student 225 / 217 / 222 right on the first three, round 1 226 / 224 / 222 / 217, round 2 228 / 225 / 227 /
220, the teacher 235 / 233 / 232 / 233; Frechet distance lower after each round on every set. Completing the last
call blurs small shapes, from the SLA-tuned student (0.844 against 0.879 on the reported prompts) and as a third
round (217 of 256 against 225 on validation), so the ladder stops at the third call. Round 3 (session 24, shipped in
session 25) is the last call again, its rows anchored to round 2's own outputs, with the adversarial term below
(adv_weight 0.1): 225 / 225 / 227 / 219 on the four sets, Frechet distance halved on each.

Object weighting (`recipe.ode.fg_share`): each row's object, read off its target x0 (data.latent_object_estimate),
carries that share of the row's loss. Measured at 0.5 from the release's student (session 22): at the last call it
blurred the shapes as the unweighted run did (215 of 256 validation prompts against 225), and a third round at the
third call was level with the release (672 against 673 on three sets of 256), so the mini recipe does not use it.

Adversarial (`recipe.ode.adv_weight` > 0, on policy): call on_policy_step is not completed by the teacher; its rows
keep the frozen student's outputs as targets (an anchor), and the student's x0 prediction there, x - s v of its SLA
output, gets adv_weight times the hinge generator loss of a discriminator on frozen-teacher features
(train/adversarial.py), whose heads train each step against the rendered training clips of the same captions. The
aim is the last call (s = 0.61), where the regression blurs: a distribution-level signal instead of the mean.
Measured from the release's student (session 24, full stack, 256 validation prompts, H100): at the last call, weights
0.01 / 0.03 / 0.1 read 225 of 256 as the release did, with the Frechet distance to real clips 0.030 / 0.023 / 0.014
against 0.037 (at 0.1 on four sets: 896 against 900, the distance halved on each); heads at lr 1e-3 lost 4-6 clips at
the last call (weight 0.3), the second and the third. The mini recipe's round 3 is the last call at 0.1 (above).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from turbovid.config import MODELS, SampleConfig
from turbovid.sampling import flow_times, rcm_times
from turbovid.train.adversarial import Adversarial, hinge_g_loss
from turbovid.train.checkpoint import load_weights
from turbovid.train.data import latent_object_estimate, object_weights
from turbovid.train.distill import TeacherSamples
from turbovid.train.evaluate import generate_latents
from turbovid.train.inputs import LatentBatches
from turbovid.train.loop import Env, drive_rounds, round_dirs, step_generator, step_indices
from turbovid.train.recipe import Recipe
from turbovid.train.teacher import SLATrainer, dit_from_weights, frozen_dit, teacher_file


def trajectory_steps(recipe: Recipe) -> tuple[list[int], list[float]]:
    """(teacher sampler step indices, RF times) of the kept states: step 0 at the few-step sampler's first time
    s_0, then for each later few-step time the teacher step nearest it, at that step's own time."""
    few = rcm_times(recipe.eval_rcm_steps, MODELS[recipe.name].sigma_max)[:-1]
    grid = flow_times(recipe.eval_teacher_steps, SampleConfig.shift)[:-1]
    steps = [0] + [min(range(len(grid)), key=lambda k: abs(grid[k] - s)) for s in few[1:]]
    return steps, [few[0]] + [grid[k] for k in steps[1:]]


class TeacherTrajectories(TeacherSamples):
    """Pooled teacher trajectories: `get` returns latents [B, STATES + 1, 16, T, h, w], the kept states at
    `self.times` and last the teacher's sample (captions, batching and seeds are TeacherSamples')."""

    CACHE = ("ode", "trajectories")

    def __init__(self, recipe: Recipe, run_dir: Path, env: Env, teacher, count: int):
        self.steps, self.times = trajectory_steps(recipe)
        super().__init__(recipe, run_dir, env, teacher, count)

    def _pool_chunk(self, indices: list[int]) -> torch.Tensor:
        record = dict.fromkeys(self.steps)
        x0 = self._draw(indices, record)
        states = [record[k] for k in self.steps]
        states[0] = self.times[0] * states[0]      # step 0's state is the noise: the few-step start is s_0 eps
        return torch.stack([*states, x0], dim=1)


class ODETrainer(SLATrainer):
    """The SLA stage's regression (its terms and weights from recipe.ode) on teacher trajectories."""
    name = "ode"

    def __init__(self, recipe: Recipe, run_dir: Path, env: Env, teacher_weights: dict[str, torch.Tensor],
                 start_weights: dict[str, torch.Tensor], fixed_batch: bool = False,
                 inputs: TeacherTrajectories | None = None):
        cfg = recipe.ode
        self.teacher = frozen_dit(recipe, teacher_weights, env)
        student = dit_from_weights(recipe, start_weights, "sla", cfg.topk, new_proj_l=True)
        if cfg.on_policy:
            self.frozen = frozen_dit(recipe, start_weights, env)       # the start student, dense, samples the states
            inputs = inputs or LatentBatches(recipe, run_dir, env)     # captions only
        elif inputs is None:
            inputs = TeacherTrajectories(recipe, run_dir, env, self.teacher, cfg.trajectories)
        self._setup(recipe, run_dir, env, student, cfg, fixed_batch, inputs)
        self.adv = None
        if cfg.adv_weight:
            self.adv = Adversarial(recipe, self.teacher, cfg.adv_layers, cfg.adv_noise, cfg.adv_optim, env)
            self.trained["disc"] = (self.adv.ddp, self.adv.optimizer)
            self._fake = None      # what the generator pass leaves for the heads' step (_output_terms)

    def _batch(self, step: int):
        if self.cfg.on_policy:
            return self._on_policy_batch(step)
        n = len(self.inputs.times)
        data_step = 0 if self.fixed_batch else step
        paths, context, _ = self.inputs.get(step_indices(data_step, self.env, max(1, self.schedule.batch // n)))
        x = paths[:, :n].flatten(0, 1)                                  # [b n, 16, T, h, w], trajectory-major
        x0 = paths[:, n].repeat_interleave(n, dim=0)
        s = torch.tensor(self.inputs.times, dtype=torch.float32, device=x.device).repeat(paths.shape[0])
        v_target = (x - x0) / s.view(-1, *[1] * (x.dim() - 1))
        return x, 1000 * s, v_target, context.repeat_interleave(n, dim=0)

    def _call_rows(self, batch: int) -> tuple[slice, float]:
        """(rows, RF time) of sampler call on_policy_step (the recipe checks its range) in an on-policy batch of `batch`
        rows: the calls' rows follow each other, `batch / steps` clips each."""
        steps = self.recipe.eval_rcm_steps
        k, clips = self.cfg.on_policy_step % steps, batch // steps
        return slice(k * clips, (k + 1) * clips), rcm_times(steps, MODELS[self.recipe.name].sigma_max)[k]

    def _on_policy_batch(self, step: int):
        x, t_net, v_target, context = self._trajectory(step, self.frozen)
        if self.cfg.adv_weight:          # that call keeps its frozen outputs; the adversarial term acts there
            return x, t_net, v_target, context
        rows, s = self._call_rows(x.shape[0])              # the call the teacher completes
        x0 = generate_latents(self.teacher, context[rows], self.inputs.negative, tuple(x[rows].shape), self.env,
                              sampler="teacher", steps=self.recipe.eval_teacher_steps, seed=0, start=(x[rows], s))
        v_target[rows] = (x[rows] - x0) / s          # the frozen outputs' torch.cat is this step's own tensor
        return x, t_net, v_target, context

    def _output_terms(self, step, x, t_net, v, context):
        """adv_weight > 0: the generator's adversarial loss on the student's x0 at call on_policy_step, through the
        frozen teacher's features (the heads frozen in this pass). What the heads' step in `train_step` needs is kept
        in self._fake: the features detached, the caption vector (the real clips share the captions), the context, the
        noise levels and noise (the real clips get the same), and the clips' indices (the trajectory's captions)."""
        if not self.cfg.adv_weight:
            return {}
        rows, s = self._call_rows(x.shape[0])
        x0 = x[rows] - s * v[rows]
        data_step = 0 if self.fixed_batch else step
        g = step_generator(self.recipe.seed + 1, data_step, self.env.rank, self.env.device)   # not the batch's draws
        s_d, noise = self.adv.draw(x0, g)
        feats = self.adv.features(x0, context[rows], s_d, noise)
        caption = self.adv.caption(context[rows])
        fake = self.adv.generator_logits(feats, caption)
        self._fake = {"feats": [f.detach() for f in feats], "caption": caption, "context": context[rows],
                      "s": s_d, "noise": noise, "indices": step_indices(data_step, self.env, x0.shape[0])}
        return {"loss_adv": (self.cfg.adv_weight, hinge_g_loss(fake))}

    def train_step(self, step: int) -> dict[str, float]:
        logs = super().train_step(step)
        if self.adv is None:
            return logs
        fake, self._fake = self._fake, None
        real, _ = self.inputs.encode(fake["indices"])                      # the captions' own clips
        with torch.no_grad():
            real_feats = self.adv.features(real, fake["context"], fake["s"], fake["noise"])
        return {**logs, **self.adv.heads_step(real_feats, fake["feats"], fake["caption"], step, self.schedule.steps)}

    def _loss_weight(self, x, t_net, v_target):
        """fg_share > 0: the object's cells, read off each row's target x0 = x - s v* (data.latent_object_estimate:
        the teacher's sample or completion, or the frozen student's output), carry fg_share of its loss."""
        if not self.cfg.fg_share:
            return None
        x0 = x - (t_net.float() / 1000).view(-1, *[1] * (x.dim() - 1)) * v_target
        return object_weights(latent_object_estimate(x0), fg_share=self.cfg.fg_share).unsqueeze(1)


def ode_dirs(recipe: Recipe) -> list[str]:
    """Run-directory folders of the ode rounds (loop.round_dirs): `ode` holds the last one, the student `ship` reads."""
    return round_dirs("ode", len(recipe.ode_stages))


def run_ode(recipe: Recipe, run_dir: Path, env: Env, until: int | None = None) -> Path:
    """Trajectory distillation (recipe.ode, then each of recipe.ode_rounds: loop.drive_rounds) of the SLA-tuned rCM
    student against the frozen teacher; round i > 0 continues round i-1's exported student. Each round builds its
    own inputs: on policy they are captions alone, off policy the trajectories cached in run_dir/ode/. Returns the
    last round's weights path."""
    if recipe.ode is None:
        raise ValueError(f"recipe {recipe.name!r} has no ode stage")
    start = Path(run_dir) / "sla" / "final.safetensors"
    if not start.is_file():
        raise ValueError(f"{start} not found: the ode stage continues the SLA-tuned student; run `turbovid train sla` "
                         "first")
    teacher = load_weights(teacher_file(run_dir), env.device)

    def build(stage, init, _inputs):
        return ODETrainer(dataclasses.replace(recipe, ode=stage), run_dir, env, teacher, load_weights(init, env.device))
    return drive_rounds(build, list(zip(ode_dirs(recipe), recipe.ode_stages)), run_dir, env, start, until)
