"""Stages 1 and 2: the flow-matching teacher, and SLA white-box fine-tuning of it.

Teacher (rectified flow, as Wan): x_s = (1-s) x0 + s eps, target v = eps - x0, MSE on the predicted
velocity. Times s = shift u / (1 + (shift-1) u), u = sigmoid(N(0, 1)) (logit-normal, shifted toward
noise as resolution-aware Wan/SD3 schedules do). Caption dropout: 10% of the samples see the Wan
negative-prompt embedding instead of their caption, which is exactly the unconditional branch that CFG
(teacher sampling, rCM's teacher) evaluates. The exported teacher is the power-EMA of the weights.

SLA fine-tuning (SPEC §10.2): student = the teacher's weights with every self-attention replaced by SLA
(topk 0.1; `proj_l` starts at zero so the student starts as block-sparse attention), all parameters
trainable; loss = MSE between student and frozen full-attention teacher velocities at the same x_s,
s = sigma / (1 + sigma), sigma ~ LogNormal(1.5, 1.6), caption-conditioned only.

With `recipe.sla.base == "rcm"` (ours, not TurboDiffusion's) the frozen full-attention network is the rCM
student instead, and the inputs are the states that student visits when it samples: each step runs the
frozen student's own few-step rCM sampler (SDE, sigma_max of the model) from fresh noise for batch / steps
captions, and every (x, time) it is called with is one training input, its output the target. Same loss.
The 1-3-step schedules use a prefix of the 4-step times, so the 4-step trajectory covers them.
`recipe.sla.dense_weight` > 0 (ours) adds that weight times the same loss for the student run with dense
attention: the one released file serves every --attention, and SLA tuning alone moves its dense output away.
`recipe.sla.proj_l_only` (ours) trains SLA's linear-branch projections alone, so the dense output cannot move.
`recipe.sla.quant_weight` > 0 (ours, quantization-aware) adds that weight times the same loss for the student
as the turbo path runs it: SageSLA (its Q/K/V rounding, its block sizes on this GPU) and W8A8 block Linears,
both straight-through (`quantization_aware`), so the shipped INT8 file loses less to its rounding.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from turbovid.attention import DenseAttention
from turbovid.attention.sla import SparseLinearAttention
from turbovid.config import MODELS
from turbovid.models.dit import WanDiT
from turbovid.quant.int8 import fake_quantized_linears
from turbovid.sampling import rcm_sample, rcm_times
from turbovid.speedups import compile_blocks
from turbovid.train.checkpoint import load_weights
from turbovid.train.data import latent_object_mask, object_weights
from turbovid.train.ema import PowerEMA
from turbovid.train.inputs import LatentBatches
from turbovid.train.loop import (Env, TrainedNetworks, drive, drive_rounds, make_optimizer, optimizer_step, round_dirs,
                                 step_generator, step_indices, wrap_ddp)
from turbovid.train.losses import flow_matching_pair, lognormal_rf, shifted_logit_normal, velocity_loss
from turbovid.train.recipe import Recipe, TeacherStage
from turbovid.train.trigflow import rf_velocity, swap_attention


def new_dit(recipe: Recipe, attention: str = "dense", topk: float = 0.1, seed: int | None = None) -> WanDiT:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed if seed is None else seed)
        return WanDiT(recipe.dit, attention=attention, topk=topk)


def dit_from_weights(recipe: Recipe, weights: dict[str, torch.Tensor], attention: str = "dense",
                     topk: float = 0.1, new_proj_l: bool = False) -> WanDiT:
    """A DiT of the recipe holding `weights`. SLA's `proj_l` is dropped for dense / sage attention (it means
    nothing without SLA, as in loading.py); with `new_proj_l` weights that lack it get its zero init (zero
    proj_l = pure block-sparse attention: how the SLA student starts from the teacher). Anything else that
    does not fit is a one-line ValueError."""
    net = new_dit(recipe, attention, topk)
    if attention in ("dense", "sage"):
        weights = {k: v for k, v in weights.items() if ".proj_l." not in k}
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if new_proj_l:
        missing = [k for k in missing if ".proj_l." not in k]
    if missing or unexpected:
        raise ValueError(f"the DiT weights do not fit a {recipe.name} DiT with {attention} attention: "
                         f"{len(missing)} missing keys (first {missing[:1]}), {len(unexpected)} unexpected "
                         f"(first {unexpected[:1]})")
    return net


def frozen_dit(recipe: Recipe, weights: dict[str, torch.Tensor], env: Env, attention: str = "dense",
               topk: float = 0.1, new_proj_l: bool = False) -> WanDiT:
    return dit_from_weights(recipe, weights, attention, topk, new_proj_l).to(env.device).eval().requires_grad_(False)


class _VelocityStage(TrainedNetworks):
    """Shared body: one DiT trained by velocity regression, with power EMA and DDP."""
    name: str

    def _setup(self, recipe: Recipe, run_dir: Path, env: Env, net: WanDiT, stage_cfg, fixed_batch: bool,
               inputs: LatentBatches | None) -> None:
        self.recipe, self.env, self.cfg = recipe, env, stage_cfg
        self.schedule, self.fixed_batch = stage_cfg.run, fixed_batch
        self.inputs = inputs or LatentBatches(recipe, run_dir, env, pool=recipe.pool_clips)
        self.net = net.to(env.device).train()
        if stage_cfg.compile and env.device.type == "cuda":
            compile_blocks(self.net)             # in place, same parameter names
        self.model = wrap_ddp(self.net, env)
        self.ema = PowerEMA(self.net, stage_cfg.ema_sigma_rel)
        self.optimizer = make_optimizer(self.net.parameters(), stage_cfg.optim, env)
        self.trained = {"model": (self.model, self.optimizer)}   # name -> (network, its optimizer), checkpointed

    def _draws(self, step: int):
        """(latents, context, generator, clips) of this step's batch."""
        data_step = 0 if self.fixed_batch else step
        x0, context, clips = self.inputs.get(step_indices(data_step, self.env, self.schedule.batch))
        return x0, context, step_generator(self.recipe.seed, data_step, self.env.rank, self.env.device), clips

    def _finish(self, loss: torch.Tensor, step: int) -> dict[str, float]:
        loss.backward()
        lr, norm = optimizer_step(self.optimizer, self.cfg.optim, step, self.schedule.steps)
        self.ema.update(self.net, step)
        return {"loss": loss.item(), "lr": lr, "grad_norm": norm}


class TeacherTrainer(_VelocityStage):
    name = "teacher"

    def __init__(self, recipe: Recipe, run_dir: Path, env: Env, fixed_batch: bool = False,
                 inputs: LatentBatches | None = None, init: str | Path | None = None,
                 stage: TeacherStage | None = None):
        """`init`: DiT weights (e.g. an earlier run's teacher/final.safetensors) to start from instead of the
        seeded random ones; a checkpoint of this run, when there is one, still takes precedence (drive).
        `stage`: one of recipe.teacher_stages (default the first)."""
        if init is not None and not Path(init).is_file():
            raise ValueError(f"--init {init}: no such file")
        net = new_dit(recipe) if init is None else dit_from_weights(recipe, load_weights(init, "cpu"))
        self._setup(recipe, run_dir, env, net, stage or recipe.teacher, fixed_batch, inputs)

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        x0, context, g, clips = self._draws(step)
        B, dev = x0.shape[0], x0.device
        drop = torch.rand(B, generator=g, device=dev) < cfg.caption_dropout
        context = torch.where(drop.view(B, 1, 1), self.inputs.negative.expand_as(context), context)
        s = shifted_logit_normal(B, g, cfg.logit_mean, cfg.logit_std, cfg.shift, dev)
        noise = torch.randn(x0.shape, generator=g, device=dev)
        x_s, target = flow_matching_pair(x0, noise, s)
        weight = None
        if cfg.fg_weight > 0 or cfg.fg_share > 0:   # the object's cells weigh more, [B, 1, T, h, w]
            mask = latent_object_mask(clips, self.recipe.frames, tuple(x0.shape[2:]), self.recipe.vae.temporal_factor)
            weight = object_weights(mask, cfg.fg_weight, cfg.fg_share).unsqueeze(1).to(dev)
        with self.env.autocast():
            v = rf_velocity(self.model, x_s, s, context)
        return self._finish(velocity_loss(v, target, weight), step)


class SLATrainer(_VelocityStage):
    name = "sla"     # also the recipe field of the stage's settings

    def __init__(self, recipe: Recipe, run_dir: Path, env: Env, base_weights: dict[str, torch.Tensor],
                 fixed_batch: bool = False, inputs: LatentBatches | None = None,
                 start_weights: dict[str, torch.Tensor] | None = None):
        """`base_weights`: the frozen full-attention network, and the student's start unless `start_weights`
        are given (the teacher, or the rCM student when the stage's base is "rcm")."""
        cfg = getattr(recipe, self.name)
        self.teacher = frozen_dit(recipe, base_weights, env)
        start = base_weights if start_weights is None else start_weights
        student = dit_from_weights(recipe, start, "sla", cfg.topk, new_proj_l=True)
        if cfg.proj_l_only:        # everything else frozen: the dense-attention output stays the base network's
            for name, p in student.named_parameters():
                p.requires_grad_("proj_l" in name)
        if cfg.base == "rcm" and inputs is None:
            inputs = LatentBatches(recipe, run_dir, env)     # captions only: no latent pool to build
        self._setup(recipe, run_dir, env, student, cfg, fixed_batch, inputs)
        if cfg.compile and env.device.type == "cuda":
            compile_blocks(self.teacher)

    def _trajectory(self, step: int, frozen: WanDiT | None = None):
        """(x, network time, frozen output, context) at every step of the frozen student's (`frozen`, default
        self.teacher) rCM sampling of batch / steps captions, concatenated step after step: batch training inputs."""
        frozen = self.teacher if frozen is None else frozen
        steps = self.recipe.eval_rcm_steps
        clips = max(1, self.schedule.batch // steps)
        data_step = 0 if self.fixed_batch else step
        context, _ = self.inputs.captions(step_indices(data_step, self.env, clips))
        g = step_generator(self.recipe.seed, data_step, self.env.rank, self.env.device)
        noise = torch.randn((clips, *self.recipe.latent_shape), generator=g, device=self.env.device)
        xs, ts, vs = [], [], []

        def velocity(x, t_net, i, s_cur):
            with torch.no_grad(), self.env.autocast():
                v = frozen(x.float(), t_net, context).float()
            xs.append(x.float())
            ts.append(t_net)
            vs.append(v)
            return v
        rcm_sample(velocity, noise, rcm_times(steps, MODELS[self.recipe.name].sigma_max), g)
        return torch.cat(xs), torch.cat(ts), torch.cat(vs), context.repeat(steps, 1, 1)

    def _batch(self, step: int):
        """(x, network time, target velocity, context): this step's training inputs and targets."""
        if self.cfg.base == "rcm":
            return self._trajectory(step)
        x0, context, g, _ = self._draws(step)
        B, dev = x0.shape[0], x0.device
        s = lognormal_rf(B, g, self.cfg.p_mean, self.cfg.p_std, dev)
        noise = torch.randn(x0.shape, generator=g, device=dev)
        x, _ = flow_matching_pair(x0, noise, s)
        t_net = (1000 * s).float()
        with torch.no_grad(), self.env.autocast():
            v_target = self.teacher(x, t_net, context).float()
        return x, t_net, v_target, context

    def _loss_weight(self, x: torch.Tensor, t_net: torch.Tensor, v_target: torch.Tensor) -> torch.Tensor | None:
        """Per-cell loss weights (broadcast to the velocity) or None: every cell alike (the ode stage weighs the
        object's cells)."""
        return None

    def _output_terms(self, step: int, x: torch.Tensor, t_net: torch.Tensor, v: torch.Tensor,
                      context: torch.Tensor) -> dict[str, tuple[float, torch.Tensor]]:
        """Further loss terms {name: (weight, term)} on the student's SLA output v (none here; the ode stage's
        adversarial term)."""
        return {}

    def train_step(self, step: int) -> dict[str, float]:
        x, t_net, v_target, context = self._batch(step)
        weight = self._loss_weight(x, t_net, v_target)
        with self.env.autocast():
            v = self.model(x, t_net, context).float()
        loss = velocity_loss(v, v_target, weight)
        terms = self._output_terms(step, x, t_net, v, context)
        if self.cfg.dense_weight:
            with swap_attention(self.net, SparseLinearAttention, lambda _: DenseAttention()), self.env.autocast():
                terms["loss_dense"] = (self.cfg.dense_weight,
                                       velocity_loss(self.model(x, t_net, context).float(), v_target, weight))
        if self.cfg.quant_weight:
            with quantization_aware(self.net), self.env.autocast():
                terms["loss_quant"] = (self.cfg.quant_weight,
                                       velocity_loss(self.model(x, t_net, context).float(), v_target, weight))
        if not terms:
            return self._finish(loss, step)
        logs = self._finish(loss + sum(w * term for w, term in terms.values()), step)
        return {**logs, "loss_sla": loss.item(), **{k: term.item() for k, (_, term) in terms.items()}}


@contextlib.contextmanager
def quantization_aware(net: torch.nn.Module):
    """Within the block `net` runs as the turbo path does, straight-through: its SLA self-attentions as SageSLA
    (attention/sla.py) and its block Linears as W8A8 (quant.int8.FakeQuantLinear). Put back on exit."""
    slas = [m for m in net.modules() if isinstance(m, SparseLinearAttention) and not m.quantized]
    try:
        for m in slas:
            m.quantized = True
        with fake_quantized_linears(net):
            yield net
    finally:
        for m in slas:
            m.quantized = False


class QATTrainer(SLATrainer):
    """The quantization-aware fine-tune (ours): the SLA stage's training, with the settings of recipe.qat
    (quant_weight > 0), continued from the SLA-tuned student."""
    name = "qat"


def teacher_dirs(recipe: Recipe) -> list[str]:
    """Run-directory folders of the teacher rounds (loop.round_dirs): `teacher` holds the last one, the weights every
    later stage reads."""
    return round_dirs("teacher", len(recipe.teacher_stages))


def run_teacher(recipe: Recipe, run_dir: Path, env: Env, until: int | None = None,
                init: str | Path | None = None) -> Path:
    """Every teacher round in turn (loop.drive_rounds; the first from `init`, the later ones from the previous round's
    exported EMA weights), sharing one pool load. Returns the last round's weights path."""
    def build(stage, start, inputs):
        return TeacherTrainer(recipe, run_dir, env, init=start, stage=stage, inputs=inputs)
    return drive_rounds(build, list(zip(teacher_dirs(recipe), recipe.teacher_stages)), run_dir, env, init, until)


def teacher_file(run_dir: Path) -> Path:
    """The finished teacher's weights file, which the SLA and rCM stages start from."""
    teacher = Path(run_dir) / "teacher" / "final.safetensors"
    if not teacher.is_file():
        raise ValueError(f"{teacher} not found: run `turbovid train teacher` first")
    return teacher


def run_sla(recipe: Recipe, run_dir: Path, env: Env, until: int | None = None) -> Path:
    """SLA fine-tune of the teacher (SPEC) or, with recipe.sla.base == "rcm", of the finished rCM student."""
    out = Path(run_dir) / "sla"
    if recipe.sla.base == "rcm":
        path = Path(run_dir) / "rcm" / "final.safetensors"
        if not path.is_file():
            raise ValueError(f"{path} not found: this recipe SLA-tunes the rCM student; run `turbovid train rcm` first")
    else:
        path = teacher_file(run_dir)
    base = load_weights(path, env.device)
    drive(SLATrainer(recipe, run_dir, env, base), out, env, until=until, init=path)
    return out / "final.safetensors"


def run_qat(recipe: Recipe, run_dir: Path, env: Env, until: int | None = None) -> Path:
    """Quantization-aware fine-tune (recipe.qat) of the SLA-tuned rCM student, against the frozen rCM student."""
    if recipe.qat is None:
        raise ValueError(f"recipe {recipe.name!r} has no qat stage")
    base, start = (Path(run_dir) / name / "final.safetensors" for name in ("rcm", "sla"))
    missing = [str(p) for p in (base, start) if not p.is_file()]
    if missing:
        raise ValueError(f"the qat stage fine-tunes the SLA-tuned rCM student; missing {', '.join(missing)}")
    trainer = QATTrainer(recipe, run_dir, env, load_weights(base, env.device),
                         start_weights=load_weights(start, env.device))
    drive(trainer, Path(run_dir) / "qat", env, until=until, init=start)
    return Path(run_dir) / "qat" / "final.safetensors"
