"""Training recipes: the model configs and every stage's hyper-parameters, frozen dataclasses in a dict.

RECIPES["mini"] is the embedded model (Wan architecture at 3.5M DiT parameters, 240x240x33 clips);
RECIPES["tiny"] runs every stage in seconds on a CPU (tests). The CLI may override a handful of fields
(steps, batch, learning rates) with `dataclasses.replace`; everything else is read from here.

Numbers marked (TD) are TurboDiffusion/rCM's for Wan2.1-1.3B (SPEC §10); ours differ where a small
model trained from scratch on synthetic data needs it (higher learning rates, shorter schedules).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from turbovid.config import (MINI_DIT, MINI_TEXT, MINI_VAE, TINY_DIT, TINY_TEXT, TINY_VAE, DiTConfig, TextEncoderConfig,
                             VAEConfig)
from turbovid.train.data import check_object_weighting, check_oversample

# The mini model (configs in turbovid.config). Latent statistics start at (0, 1) for VAE training and are
# measured afterwards (the vae stage writes them next to its weights; later stages and the export use them).
MINI_VAE_UNIT = dataclasses.replace(MINI_VAE, mean=(0.0,) * 16, std=(1.0,) * 16)
TINY_VAE_UNIT = VAEConfig(dim=TINY_VAE.dim, dim_mult=TINY_VAE.dim_mult, num_res_blocks=TINY_VAE.num_res_blocks,
                          mean=(0.0,) * 16, std=(1.0,) * 16)


# The adversarial term's defaults (train/adversarial.py), the same for the ode and rcm stages: the frozen teacher's
# blocks the discriminator's heads read and the noise s ~ U(lo, hi) it sees x0 at (ADV_OPTIM, below Optim: the
# heads' optimizer).
ADV_LAYERS: tuple[int, ...] = (1, 3, 5)
ADV_NOISE: tuple[float, float] = (0.05, 0.6)


def check_adversarial(stage: str, weight: float, noise: tuple[float, float]) -> None:
    """The adversarial term's settings (train/adversarial.py) of an ode or rcm stage."""
    if weight < 0:
        raise ValueError(f"{stage}.adv_weight must be >= 0, got {weight}")
    if not 0 <= noise[0] < noise[1] <= 1:
        raise ValueError(f"{stage}.adv_noise must be (lo, hi) with 0 <= lo < hi <= 1, got {noise}")


@dataclass(frozen=True)
class Optim:
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup: int = 100            # linear warm-up from 0.01 * lr (TD: from 1e-6 x)
    cosine: bool = False         # cosine decay to 10% of lr over the stage (else constant after warm-up)
    grad_clip: float = 1.0       # 0 disables clipping


ADV_OPTIM = Optim(lr=1e-4, betas=(0.0, 0.99), weight_decay=0.0, warmup=0)


@dataclass(frozen=True)
class Schedule:
    steps: int
    batch: int                   # per process (GPU) on `gpus` GPUs; `for_world` keeps the global batch elsewhere
    gpus: int = 1                # GPUs the recorded run used
    log_every: int = 50
    ckpt_every: int = 1000
    keep_checkpoints: int = 2


@dataclass(frozen=True)
class VAEStage:
    run: Schedule
    optim: Optim
    crop: int = 96               # random square crop of the rendered clip (the VAE is convolutional)
    crop_frames: int = 33        # 4k + 1 consecutive frames. Use the full clip length: a VAE trained on
                                 # 5-frame crops reconstructed 9-frame clips 4x worse (L1 0.25 vs 0.06) on a
                                 # CPU probe (more causal chunks than it ever saw); smaller crops in space
                                 # generalised fine (trained at 32 px, 0.06 at 64 px)
    l1: float = 1.0
    l2: float = 1.0
    fg_weight: float = 10.0      # object pixels weigh 1 + fg_weight in the reconstruction loss (vae.py)
    first_frame_weight: float = 4.0  # frame 0 is a whole latent frame (later latent frames cover 4 frames);
                                 # at weight 1 the first frame decoded 2x worse than the rest (L1 0.108)
    object_crops: float = 0.8    # fraction of crops centred on the object (uniform crops mostly miss it)
    edge: float = 0.0            # weight of the edge term (L1 of the error's spatial differences, vae.edge_loss)
    kl: float = 1e-6             # KL-VAE: weight of the mean per-latent-element KL(q(z|x) || N(0, I))
    logvar_init: float = -6.0    # initial posterior log-variance (bias of the logvar half of `conv1`)
    stats_clips: int = 256       # clips encoded (full size) to measure the latent mean/std
    eval_clips: int = 64         # held-out clips round-tripped through the VAE and graded by `detect`


@dataclass(frozen=True)
class TeacherStage:
    run: Schedule
    optim: Optim
    logit_mean: float = 0.0      # u ~ sigmoid(N(logit_mean, logit_std)), then shifted: s = k u / (1 + (k-1) u)
    logit_std: float = 1.0
    shift: float = 3.0
    caption_dropout: float = 0.1  # fraction of samples conditioned on the negative prompt (CFG's uncond)
    fg_weight: float = 0.0        # > 0: latent cells near the object weigh 1 + fg_weight in the velocity loss
                                  # (data.latent_object_mask: 7% of the cells for a small object) (ours)
    fg_share: float = 0.0         # > 0, instead of fg_weight: the object's cells carry this share of each sample's
                                  # loss whatever the object's size (data.object_weights; ours)
    ema_sigma_rel: float = 0.1
    compile: bool = False         # torch.compile the DiT blocks (CUDA only)

    def __post_init__(self):
        check_object_weighting(self.fg_weight, self.fg_share)


@dataclass(frozen=True)
class SLAStage:
    run: Schedule
    optim: Optim
    topk: float = 0.1            # (TD)
    base: str = "teacher"        # what is SLA-tuned: "teacher" (TD; shipped via the merge) or "rcm" (the rCM
                                 # student, on the states of its own 4-step sampling; shipped as is: teacher.py)
    dense_weight: float = 0.0    # > 0: also fit the student's dense-attention output, with this weight (ours)
    quant_weight: float = 0.0    # > 0: also fit its quantized output (SageSLA + W8A8, straight-through; ours)
    proj_l_only: bool = False    # train only SLA's linear-branch projections (ours): the dense-attention output
                                 # stays exactly the base network's, so one file serves every --attention
    p_mean: float = 1.5          # RF time s = sigma / (1 + sigma), sigma ~ LogNormal(p_mean, p_std)  (TD)
    p_std: float = 1.6
    ema_sigma_rel: float = 0.1
    compile: bool = False         # torch.compile the student's and the frozen teacher's blocks (CUDA only)


@dataclass(frozen=True)
class RCMStage:
    run: Schedule
    optim: Optim                 # student (TD: lr 2e-6, betas (0, 0.999))
    fake_optim: Optim            # fake-score network (TD: lr 4e-7)
    p_mean: float = 0.7          # p_G: sigma ~ LogNormal(p_mean, p_std) * sqrt(latent frames), t = atan(sigma) (TD)
    p_std: float = 1.6
    shift_d: float = 5.0         # p_D: UniformShift(5)  (TD)
    dmd_shift: float = 0.0       # > 0 (ours): the DMD term's and the critic's t_D at UniformShift(dmd_shift), the
                                 # backward simulation's re-noising still at shift_d (1: uniform in s, as DMD2; below 1
                                 # more low-noise draws, where small objects' outlines are decided). Session 31, the
                                 # mini DMD round at 2.5 / 1: 674 / 676 of 768 on three sets, the release's 678, its
                                 # colours a little steadier (not shipped)
    guidance: float = 6.0        # teacher CFG in the v_u + g (v_c - v_u) form; rCM's `teacher_guidance=5`
                                 # means v_c + 5 (v_c - v_u), i.e. g = 6
    tangent_warmup: int = 1000   # (TD)
    student_update_freq: int = 5  # (TD)
    max_simulation_steps: int = 4  # backward simulation uses 1..4 student steps  (TD)
    loss_scale: float = 100.0    # sCM (TD)
    loss_scale_dmd: float = 1.0  # (TD)
    ema_sigma_rel: float = 0.1   # (TD)
    student_attention: str = "dense"  # "sla" (ours): the student distils with SLA attention at the recipe's
                                 # sla.topk (teacher and fake score stay dense); its export keeps proj_l
    fg_share: float = 0.0        # > 0 (ours): the object's latent cells carry this share of each sample's sCM loss
                                 # (data.object_weights, as the teacher's TeacherStage.fg_share)
    dmd: bool = True             # False (ours): sCM alone for the whole run, every step a student step (no critic),
                                 # the tangent at full weight after the warm-up
    teacher_data: int = 0        # > 0 (rCM's data, SPEC §5.2): x0 are this many of the teacher's own samples of
                                 # training captions (distill.TeacherSamples) instead of the encoded clips
    scm: bool = True             # False (ours): DMD alone, for a student distilled already (--init): the warm-up's
                                 # steps train the fake score on the start student's samples, then one student step
                                 # every student_update_freq, its loss the DMD term alone (no teacher JVP).
                                 # Session 25, from the mini release's student: shapes up to the teacher's, colours
                                 # turned over the frames (CFG 5: 183-202 of 256; CFG 2: level with the release)
    anchor_weight: float = 0.0   # > 0 (ours, scm off): plus this weight times the summed squared distance of the
                                 # student's sample G_x0 to the frozen start student's x0 from the same state, an anchor
                                 # against the drift DMD brings. Session 26, CFG 2: from W 10 the colour holds but
                                 # the shape gain shrinks; W 10 230 / 226 / 221 on three sets of 256, the release's
                                 # 225 / 225 / 219 (not shipped)
    anchor_pool: int = 1         # > 1 (ours): the anchor counts only the distance's block averages over k x k latent
                                 # cells of each frame (losses.anchor_distance): colours held, outlines left to DMD.
                                 # Session 27, CFG 2, W 10, k 3: 232 / 225 / 218 on the three sets, level with
                                 # k 1's 677 (not shipped); W 30 with k 5 or 3: 228 and 227 on the first
    anchor_size_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)  # (ours) the anchor's weight per sample times
                                 # this factor for the (small, medium, large) object its caption states
                                 # (data.SIZES): session 27 found DMD's gain in small objects' outlines and its loss in
                                 # large crosses' colour (docs/training/mini/session27_checks/by_attribute.txt);
                                 # 0 / 1 / 3 at W 10 is the mini release's DMD round (session 28)
    guidance_size_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)  # (ours) the teacher's CFG scale per sample
                                 # times this factor for the (small, medium, large) object its caption states: the
                                 # shapes small objects lack from a teacher at the CFG that keeps large ones' colour.
                                 # Session 29, the mini DMD round with 2,1,1 (small at CFG 4): 1375 of 1536 on six
                                 # sets against the release's 1368 (13 clips gained, 7 lost; small objects 324 of
                                 # 420 against 318), not shipped; 1.5 / 2.5 / 3 for small read level or below
    adv_weight: float = 0.0      # > 0 (ours, scm off; after DMD2): plus this weight times the number of latent
                                 # elements of a sample times a discriminator's hinge generator loss on the student's
                                 # sample (train/adversarial.py; real = the stage's data latents, the captions' own
                                 # clips), so a weight reads against a per-element DMD gradient of order 1; the heads
                                 # train at every critic step
    adv_layers: tuple[int, ...] = ADV_LAYERS
    adv_noise: tuple[float, float] = ADV_NOISE
    adv_optim: Optim = ADV_OPTIM
    oversample: tuple[tuple[str, int], ...] = ()   # (ours) ((attribute value, k), ...): a pooled clip with that value
                                 # (colour, shape, direction, speed, size or background) comes k times per pass of the
                                 # pool (inputs.LatentBatches), its caption and latent with it. Session 31, the mini
                                 # DMD round with small:2 / slow:2 / both: 682 / 673 / 677 of 768 on three sets, the
                                 # release's 678; small:2 on eight sets 1829 against 1831 (not shipped); session 32,
                                 # small:2 with guidance_size_scale (2, 1, 1): 2505 against 2517 on eleven sets

    def __post_init__(self):
        check_object_weighting(0.0, self.fg_share)
        check_oversample(self.oversample)
        if self.dmd_shift < 0:
            raise ValueError(f"rcm.dmd_shift must be >= 0 (0: shift_d), got {self.dmd_shift}")
        if self.dmd_shift and not self.dmd:
            raise ValueError("rcm.dmd_shift draws the DMD term's times: it needs dmd on")
        if not (self.scm or self.dmd):
            raise ValueError("rcm needs sCM or DMD: scm and dmd are both off")
        if self.anchor_weight < 0:
            raise ValueError(f"rcm.anchor_weight must be >= 0, got {self.anchor_weight}")
        if self.anchor_pool < 1:
            raise ValueError(f"rcm.anchor_pool must be >= 1, got {self.anchor_pool}")
        if self.anchor_pool > 1 and not self.anchor_weight:
            raise ValueError("rcm.anchor_pool pools the anchor: it needs anchor_weight > 0")
        if len(self.anchor_size_scale) != 3 or min(self.anchor_size_scale) < 0:
            raise ValueError(f"rcm.anchor_size_scale is three factors >= 0 (small, medium, large), got "
                             f"{self.anchor_size_scale}")
        if len(self.guidance_size_scale) != 3 or min(self.guidance_size_scale) <= 0:
            raise ValueError(f"rcm.guidance_size_scale is three factors > 0 (small, medium, large), got "
                             f"{self.guidance_size_scale}")
        if min(self.guidance * f for f in self.guidance_size_scale) < 1:
            raise ValueError(f"rcm.guidance times guidance_size_scale must stay >= 1 (1: no CFG), got "
                             f"{self.guidance} x {self.guidance_size_scale}")
        if tuple(self.anchor_size_scale) != (1.0, 1.0, 1.0) and not self.anchor_weight:
            raise ValueError("rcm.anchor_size_scale scales the anchor: it needs anchor_weight > 0")
        if self.anchor_weight and self.scm:
            raise ValueError("rcm.anchor_weight goes with DMD alone (scm off)")
        check_adversarial("rcm", self.adv_weight, self.adv_noise)
        if self.adv_weight and (self.scm or not self.dmd):
            raise ValueError("rcm.adv_weight goes with DMD alone (scm off, dmd on)")
        if not self.scm and self.fg_share:
            raise ValueError("rcm.fg_share weighs the sCM loss, which a DMD-alone run (scm off) does not have")
        if self.teacher_data < 0:
            raise ValueError(f"rcm.teacher_data must be >= 0, got {self.teacher_data}")
        if self.teacher_data and self.fg_share:
            raise ValueError("rcm.fg_share weighs the data clips' objects; the teacher's samples (teacher_data) "
                             "have no object masks")
        if self.student_attention not in ("dense", "sla"):
            raise ValueError(f"rcm.student_attention must be dense or sla, got {self.student_attention!r}")


@dataclass(frozen=True)
class ODEStage:
    """Trajectory distillation (ours, train/trajectory.py): the student fits the teacher's own 50-step samples from
    the states the teacher's sampler passes at the few-step sampler's times, or (on_policy) the teacher's completion
    of one call's state (on_policy_step) of the student's own sampling."""
    run: Schedule                # batch: student inputs per step, one per few-step sampler call of a trajectory
    optim: Optim
    trajectories: int = 3072     # teacher samples (training captions) recorded with their states (not on_policy)
    on_policy: bool = False      # the states of the frozen start student's own sampling, drawn every step: call
                                 # on_policy_step's target is the teacher's sampler run from its state, the others'
                                 # the frozen student's own outputs
    on_policy_step: int = -1     # on_policy: the sampler call (0-based, -1 the last) whose state the teacher completes
    topk: float = 0.75           # SLA's top-k while it trains (the release's default)
    dense_weight: float = 1.0    # > 0: also fit the student's dense-attention output, with this weight
    quant_weight: float = 0.0    # > 0: also fit its quantized output (SageSLA + W8A8, straight-through)
    fg_share: float = 0.0        # > 0: the object's latent cells, read off each target (data.latent_object_estimate),
                                 # carry this share of each sample's loss (data.object_weights)
    adv_weight: float = 0.0      # > 0, on policy: call on_policy_step keeps the frozen student's outputs as targets
                                 # (no teacher completion) and adds this weight times an adversarial loss on the
                                 # student's x0 there, against the captions' training clips (train/adversarial.py)
    adv_layers: tuple[int, ...] = ADV_LAYERS
    adv_noise: tuple[float, float] = ADV_NOISE
    adv_optim: Optim = ADV_OPTIM
    ema_sigma_rel: float = 0.1
    compile: bool = False        # torch.compile the student's blocks (CUDA only)

    def __post_init__(self):
        check_object_weighting(0.0, self.fg_share)
        check_adversarial("ode", self.adv_weight, self.adv_noise)
        if self.adv_weight and not self.on_policy:
            raise ValueError("ode.adv_weight goes with the on-policy ode stage (on_policy=True)")
        if self.trajectories < 1:
            raise ValueError(f"ode.trajectories must be >= 1, got {self.trajectories}")
        if not 0 < self.topk <= 1:
            raise ValueError(f"ode.topk must be in (0, 1], got {self.topk}")
        if self.on_policy_step == 0:
            raise ValueError("ode.on_policy_step 0 is the pure-noise start, which the teacher's sampler would complete "
                             "from scratch: pick a later sampler call")


@dataclass(frozen=True)
class Recipe:
    name: str
    dit: DiTConfig
    vae: VAEConfig
    text: TextEncoderConfig
    size: int                    # clips are size x size pixels ...
    frames: int                  # ... and 4k + 1 frames
    vae_stage: VAEStage
    teacher: TeacherStage
    sla: SLAStage
    rcm: RCMStage
    qat: SLAStage | None = None  # optional quantization-aware fine-tune of the SLA-tuned rCM student (ours,
                                 # teacher.QATTrainer: quant_weight > 0, base "rcm"), after the sla stage; part of
                                 # `reproduce` and of the release when ship_student is "qat"
    ode: ODEStage | None = None  # optional trajectory distillation of the SLA-tuned rCM student (ours,
                                 # trajectory.ODETrainer), the last DiT stage; part of `reproduce` and of the
                                 # release when ship_student is "ode"
    vae_decoder: VAEStage | None = None   # optional second VAE stage: fine-tune the decoder, encoder frozen
                                 # (latents unchanged, so it may run any time after the vae stage; vae.py)
    teacher_rounds: tuple[TeacherStage, ...] = ()   # further teacher rounds, each started from the previous
                                 # round's EMA weights with a fresh optimizer and its own schedule (teacher.py)
    ode_rounds: tuple[ODEStage, ...] = ()   # further ode rounds, each continuing the previous round's student
                                 # (on policy: its sampling states and its other calls' targets are that student's)
    dmd_round: RCMStage | None = None   # optional DMD-alone round (ours; an RCMStage with scm off) of the ode stage's
                                 # student, the last DiT stage, in run_dir/dmd (distill.run_dmd): its student and
                                 # anchor run SLA at the top-k the last ode round trained at; part of `reproduce`
                                 # and of the release when ship_student is "dmd"
    merge_weight: float = 1.0    # merged = rCM + w (SLA - teacher)  (TD)
    ship_topk: float | None = None  # the top-k the release runs SLA at by default (config.json sla_topk); None:
                                 # sla.topk, the one it was tuned at (config.json sla_topk_tuned either way)
    ship_student: str = "merged"  # the 4-step student `ship` releases: "merged" (TD), "rcm" (the rCM student
                                 # alone), "sla" (the SLA-tuned rCM student, with sla.base = "rcm"), "qat" (that
                                 # student after the qat stage), "ode" (after the ode stage) or "dmd" (after the
                                 # ode stage and the DMD round)
    data_seed: int = 0
    pool_clips: int = 0          # > 0: DiT stages train on this many pre-encoded clips (inputs.LatentBatches)
    text_seed: int = 1234        # the frozen text encoder is this seeded random umT5
    eval_clips: int = 64         # held-out prompts generated and graded after each stage
    eval_teacher_steps: int = 50
    eval_rcm_steps: int = 4
    seed: int = 0                # noise / time draws (per step and rank)

    def __post_init__(self):
        if self.sla.base not in ("teacher", "rcm"):
            raise ValueError(f"sla.base must be teacher or rcm, got {self.sla.base!r}")
        wanted = {"merged": "teacher", "sla": "rcm", "qat": "rcm", "ode": "rcm", "dmd": "rcm"}.get(self.ship_student)
        if self.ship_student not in ("merged", "rcm", "sla", "qat", "ode", "dmd"):
            raise ValueError(f"ship_student must be merged, rcm, sla, qat, ode or dmd, got {self.ship_student!r}")
        if wanted and self.sla.base != wanted:
            raise ValueError(f"ship_student={self.ship_student!r} needs sla.base={wanted!r}, got {self.sla.base!r}")
        if self.qat is not None and (self.sla.base != "rcm" or self.qat.base != "rcm" or not self.qat.quant_weight > 0):
            raise ValueError("the qat stage continues the SLA-tuned rCM student: it needs sla.base and qat.base "
                             "'rcm' and qat.quant_weight > 0")
        if self.ship_student == "qat" and self.qat is None:
            raise ValueError("ship_student='qat' needs a qat stage")
        if self.ship_student == "ode" and self.ode is None:
            raise ValueError("ship_student='ode' needs an ode stage")
        if self.ship_student == "dmd" and self.dmd_round is None:
            raise ValueError("ship_student='dmd' needs a dmd_round stage")
        if self.dmd_round is not None and self.ode is None:
            raise ValueError("the DMD round continues the ode stage's student: the recipe has no ode stage")
        if self.dmd_round is not None and self.dmd_round.scm:
            raise ValueError("dmd_round is DMD alone: it needs scm off")
        if self.ode is not None and self.sla.base != "rcm":
            raise ValueError("the ode stage continues the SLA-tuned rCM student: it needs sla.base 'rcm'")
        if self.ode_rounds and self.ode is None:
            raise ValueError("ode_rounds continue the ode stage: the recipe has none")
        for ode in self.ode_stages:
            if not 0 < abs(ode.on_policy_step) < self.eval_rcm_steps:
                raise ValueError(f"ode.on_policy_step must name one of the {self.eval_rcm_steps}-step sampler's calls "
                                 f"after the first: 1..{self.eval_rcm_steps - 1} or -{self.eval_rcm_steps - 1}..-1, "
                                 f"got {ode.on_policy_step}")
        if self.ship_topk is not None and not 0 < self.ship_topk <= 1:
            raise ValueError(f"ship_topk must be in (0, 1], got {self.ship_topk}")

    @property
    def merges(self) -> bool:
        """Whether the run builds the SPEC merge rCM + w (SLA - teacher): only when SLA tuned the teacher."""
        return self.sla.base == "teacher"

    @property
    def teacher_stages(self) -> tuple[TeacherStage, ...]:
        return (self.teacher, *self.teacher_rounds)

    @property
    def student_stages(self) -> tuple[str, ...]:
        """The stages after sla that make the shipped student, in order (each one run_dir folder's final weights)."""
        return {"qat": ("qat",), "ode": ("ode",), "dmd": ("ode", "dmd")}.get(self.ship_student, ())

    @property
    def ode_stages(self) -> tuple[ODEStage, ...]:
        return () if self.ode is None else (self.ode, *self.ode_rounds)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(channels, T, h, w) of one clip's latent."""
        s, t = self.vae.spatial_factor, self.vae.temporal_factor
        return self.vae.z_dim, (self.frames - 1) // t + 1, self.size // s, self.size // s

    @property
    def latent_tokens(self) -> int:
        _, T, h, w = self.latent_shape
        pt, ph, pw = self.dit.patch_size
        return T // pt * (h // ph) * (w // pw)


def _mini() -> Recipe:
    # What the shipped weights ran (docs/training/mini): the VAE and the first teacher round on one 4 x H200 machine
    # (session 3, torchrun DDP: gpus=4, batch per GPU); two more teacher rounds, SLA and rCM on one H200 each
    # (session 4); a fourth teacher round, rCM and SLA again on one H100 (session 7). Every schedule was fitted to its time budget with --fit-minutes (~11 teacher steps/s per GPU
    # eager at batch 32 in round 1, ~23/s compiled in rounds 2-3). `for_world` keeps each global batch on any
    # number of GPUs, so `turbovid train reproduce` on one GPU runs the same optimisation (round 1 and the VAE
    # then take batch 128 / 64 on that GPU). An earlier VAE sweep on one GPU (batch 16, 1475 steps,
    # lr 2e-4 / 4e-4 / 8e-4) put 4e-4 lowest.
    rcm = RCMStage(Schedule(steps=500, batch=8, ckpt_every=1000),
                   # rCM: betas (0, 0.999), no gradient clipping (NaN/inf entries are still zeroed)
                   Optim(lr=2e-5, betas=(0.0, 0.999), warmup=0, grad_clip=0.0),
                   Optim(lr=4e-6, betas=(0.0, 0.999), warmup=0, grad_clip=0.0),
                   tangent_warmup=500, student_update_freq=5)
    return Recipe(
        name="mini", dit=MINI_DIT, vae=MINI_VAE_UNIT, text=MINI_TEXT, size=240, frames=33,
        vae_stage=VAEStage(Schedule(steps=2316, batch=16, gpus=4, ckpt_every=1000),
                           Optim(lr=5e-4, warmup=300, cosine=True, weight_decay=0.0)),
        # No vae_decoder stage: a decoder fine-tune (session 6, one H100, encoder frozen, lr 2e-4 cosine, 1585 x 32
        # fitted to 7.3 minutes) raised the detector's agreement on 128 held-out round trips 0.828 -> 0.867 (all
        # errors were small objects: diamonds read as circles, crosses as diamonds), but on generated videos it
        # measured no gain: `turbovid eval`, 24 held-out prompts, CPU (eval_mini_cpu_2026-11-22_run5.json vs _run4):
        # teacher 0.42 -> 0.42, full stack 0.33 -> 0.33, dense student 0.38 -> 0.33 (it draws the student's blobs
        # more diamond-like). So the shipped VAE is the one above; the fine-tuned file is not shipped.
        teacher=TeacherStage(Schedule(steps=4496, batch=32, gpus=4, ckpt_every=500),
                             Optim(lr=3e-4, warmup=500, cosine=True)),
        teacher_rounds=(
            # round 1 -> 2: the loss went 0.043 -> 0.014 and held-out adherence 0.04 -> 0.33
            TeacherStage(Schedule(steps=26023, batch=32, ckpt_every=500), Optim(lr=3e-4, warmup=500, cosine=True),
                         compile=True),
            # round 3: adherence 0.33 -> 0.50 (GPU check, 24 held-out prompts)
            TeacherStage(Schedule(steps=12481, batch=32, ckpt_every=500), Optim(lr=1e-4, warmup=500, cosine=True),
                         compile=True),
            # round 4 (session 7, one H100, fitted to 7 minutes), the first with ftfy installed: rounds 1-3 ran on
            # GPU boxes without it, where the Wan negative prompt keeps its full-width commas, so CFG's
            # unconditional branch was learnt on other tokens than an installed turbovid feeds it (the teacher
            # drew cyan as green on CPUs only). Held-out adherence, CPU `turbovid eval`, 24 prompts: 0.42 -> 0.58.
            TeacherStage(Schedule(steps=3464, batch=64, ckpt_every=500), Optim(lr=1e-4, warmup=500, cosine=True),
                         compile=True),
            # round 5 (session 10, one H100, fitted to 8.4 minutes): the object-weighted loss (fg_weight 4: the
            # latent cells near the object weigh 5x). 64 held-out prompts on the GPU: 0.61 -> 0.70.
            TeacherStage(Schedule(steps=2250, batch=128, ckpt_every=500), Optim(lr=1e-4, warmup=500, cosine=True),
                         fg_weight=4.0, compile=True),
            # round 6 (session 11, one H100, fitted to 8.7 minutes, the same settings): 96 held-out prompts on the
            # GPU 0.885 -> 0.906; `turbovid eval` (session 12) 0.859 -> 0.867 on 128 GPU prompts, 0.83 -> 0.875 on
            # the CPU's 24.
            TeacherStage(Schedule(steps=2309, batch=128, ckpt_every=500), Optim(lr=1e-4, warmup=500, cosine=True),
                         fg_weight=4.0, compile=True),
            # round 7 (session 13, one H100, 5.1 minutes of steps fitted beside the pool encode): the object's cells
            # carry half of each sample's loss whatever its size (fg_share 0.5; fg_weight 4 gave a small object 27%).
            # `train eval`, 128 held-out prompts: 0.891 -> 0.898 (shape 0.92 -> 0.95); `turbovid eval` (H100, 128
            # prompts) 0.867 -> 0.906.
            TeacherStage(Schedule(steps=2119, batch=128, ckpt_every=500), Optim(lr=1e-4, warmup=500, cosine=True),
                         fg_share=0.5, compile=True),
        ),
        # SLA tunes the rCM student on its own 4-step sampling states (base="rcm"; session 5, one H100, fitted to
        # 6.6 minutes: 4.4 steps/s). Top-k 0.25: at 2025 tokens (32 key blocks) TD's 0.1 keeps 3-4 blocks, ~200 keys
        # per query (Wan-1.3B keeps ~3300), and a first try at 0.1 without the dense term (2064 steps at batch 16)
        # reached held-out adherence 0.17 with SLA and pulled the dense output down to 0.13. The TD route (SLA-tune
        # the teacher, then merge) measured worse too, below.
        # Session 7 re-ran rCM and this stage from round 4's teacher (one H100; SLA fitted to 1475 steps, 5.1 min).
        # Session 10 (round 5's teacher, rCM fitted to 743 steps): at top-k 0.25 this stage cost the dense output
        # 0.58 -> 0.375 adherence (CPU, 24 prompts; SageSLA 0.25), and training proj_l alone (--proj-l-only) stalled
        # at twice the loss. Block-sparse attention alone (zero proj_l) keeps 0.04 of adherence at top-k 0.25 and
        # 0.25 at 0.5 (CPU, 24 prompts). At top-k 0.5 (16 of 32 key blocks; fitted to 1491 steps, 5.6 min) the
        # tuned student keeps its dense output (64 prompts, GPU: 0.56, as the rCM student) with SageSLA 0.50.
        # Session 11 re-ran rCM (743 steps) and this stage (fitted to 1610 steps) from round 6's teacher; session 13
        # from round 7's (rCM 743 steps, this stage fitted to 1649); session 14 from the sCM-only student below
        # (fitted to 2759 steps on an H200).
        sla=SLAStage(Schedule(steps=2759, batch=32, ckpt_every=1000), Optim(lr=5e-5, warmup=200, cosine=True),
                     topk=0.5, base="rcm", dense_weight=1.0),
        # Quantization-aware fine-tune of that student (session 15, one H100, fitted to 909 steps at 2.2 steps/s): the
        # same terms plus its output run as the turbo path runs it (SageSLA with the GPU's block sizes, W8A8),
        # straight-through. Every release had lost 1-4 of 128 held-out clips from SLA to SageSLA + W8A8. It measured
        # no gain, so the release does not ship it (ship_student below; `reproduce` runs the stage only when it does):
        # `turbovid eval`, 128 held-out prompts, full stack on the CPU 0.891 -> 0.875 (same prompts and seeds), on
        # the GPU 0.875 -> 0.875 (H200 -> H100); docs/training/mini/README.md.
        qat=SLAStage(Schedule(steps=909, batch=32, ckpt_every=1000), Optim(lr=2e-5, warmup=100, cosine=True),
                     topk=0.5, base="rcm", dense_weight=1.0, quant_weight=1.0),
        # On-policy trajectory distillation of the SLA-tuned student, the shipped student's last stages, one call at a
        # time down the 4-step sampler: the states of the start student's own sampling, drawn every step; one call's
        # state gets the teacher's UniPC + CFG completion from it as the target, the other calls their start student's
        # own outputs; SLA at top-k 0.75 plus the dense term. Round 1 (session 20, one H100, fitted to 416 steps at
        # 1.38 steps/s): the second call (s = 0.93), where session 19's hybrid check found the student first falling
        # behind the teacher. Round 2 (session 21, fitted to 371 steps at 1.49 steps/s): the third call (s = 0.85),
        # from round 1's student, so its states and its second call's targets are the fitted ones. Full stack,
        # `turbovid eval`, H100, 256 prompts per set (reported 0..255, validation 1000.., 2000.., 3000..): the SLA-tuned
        # student 225 / 217 / 222 / -, after round 1 226 / 224 / 222 / 217, after round 2 228 / 225 / 227 / 220, the
        # teacher 235 / 233 / 232 / 233; Frechet distance lower after each round on every set.
        # Tried besides (sessions 19-21): off policy, fitting 3072 teacher trajectories from their states at the 4-step
        # times (1500 x 32), 0.719 on the reported prompts (the shapes blur); the last call's completion (s = 0.61)
        # from the SLA-tuned student (701 x 32) 0.844 there, and as a third round (689 x 32) 217 of 256 on validation
        # 1000.. (shape 0.86: the last step's regression blurs small shapes); the third call's from the SLA-tuned
        # student (349 x 32) 0.859 there; round 1 twice (373 more steps) no change.
        # Round 3 (session 24, fitted to 511 steps beside two other runs on one H100; shipped in session 25): the last
        # call (s = 0.61), its rows anchored to round 2's own outputs, plus 0.1 times an adversarial loss on its x0
        # (heads on the frozen teacher's features, the captions' training clips as the real data). Full stack, the
        # same four sets: 225 / 225 / 227 / 219 (896 against round 2's 900; 11 clips gained, 15 lost, p = 0.56) and
        # 224 against 224 with seed 1 on the reported set; Frechet distance halved on every set (0..255: 0.043 ->
        # 0.017). Stronger heads (lr 1e-3) lost 4-6 clips at the last call (weight 0.3) and at the second and third.
        ode=ODEStage(Schedule(steps=416, batch=32, ckpt_every=250), Optim(lr=2e-5, warmup=100, cosine=True),
                     on_policy=True, on_policy_step=1),
        ode_rounds=(ODEStage(Schedule(steps=371, batch=32, ckpt_every=250), Optim(lr=2e-5, warmup=100, cosine=True),
                             on_policy=True, on_policy_step=2),
                    ODEStage(Schedule(steps=511, batch=32, ckpt_every=250), Optim(lr=2e-5, warmup=100, cosine=True),
                             on_policy=True, on_policy_step=-1, adv_weight=0.1)),
        # The student tuned at top-k 0.5 runs at 0.75 by default (24 of 32 key blocks): `turbovid eval`, 128 held-out
        # prompts, H100 (session 12), full stack 0.797 at 0.5 and 0.844 / 0.859 at 0.75 (two runs) against the
        # teacher's 0.867 and the dense student's 0.836; the DiT takes 0.13-0.14 s per video instead of 0.11 s.
        ship_topk=0.75,
        # rCM ends at the tangent warm-up: 500 steps of sCM alone, no DMD (session 14, H200, `train eval` dense on 128
        # held-out prompts): the students of round 7 read 0.820 with DMD to 743 steps at CFG 6 (session 13, H100;
        # colour 0.91), 0.844 at CFG 5 (colour 0.93, hue drift 7.7 degrees) and 0.852 with sCM alone at CFG 6
        # (colour 0.97, drift 6.2).
        # DMD's mode-seeking turned large crosses' hue over the frames (docs/training/mini/session13_checks).
        rcm=rcm,
        # The last stage (session 28, one H100 beside two other runs, fitted to 1455 steps at 6.9 steps/s): DMD alone
        # from round 3's student, the teacher's CFG 2, its fake score warmed up 200 steps, the anchor to round 3's own
        # samples at weight 10 times 0 / 1 / 3 for a caption's small / medium / large object (small shapes free,
        # large crosses' colour held). Full stack, 256 prompts per set (0.., 1000.., 3000..): 230 / 230 / 224
        # against round 3's 225 / 225 / 219 (24 clips gained, 9 lost, exact McNemar p = 0.014; the teacher 701 of
        # 768); small objects 189 of 250 (round 3 174, the teacher 199), large 244 of 256 (246, 246). Beside it
        # (sessions 25-28, from round 3): unanchored 189 / 235 small / large, every cell anchored at W 10 184 / 241,
        # block averages only (anchor_pool 3) 185 / 237; the anchor 0 / 0.3 / 3 and 0.1 / 1 / 3 228 and 226 on
        # 1000.. (session28_checks).
        dmd_round=dataclasses.replace(rcm, run=Schedule(steps=1455, batch=8, ckpt_every=1000), guidance=2.0,
                                      tangent_warmup=200, student_attention="sla", scm=False, anchor_weight=10.0,
                                      anchor_size_scale=(0.0, 1.0, 3.0)),
        pool_clips=24000,
        # The merge hurt the session-4 run (SLA fine-tune of the teacher, 478 steps; `turbovid eval`, 24 held-out
        # prompts, CPU): merged student 0.21 adherence with dense attention and 0.08 with SLA, vs 0.42 for the rCM
        # student alone (= the teacher's 0.42); the rCM student with SLA and a zero proj_l scored 0.04. So the
        # release ships the rCM student SLA-tuned on its own sampling states, fitted on policy (ode, above), then
        # trained by DMD alone (dmd_round).
        ship_student="dmd",
    )


def _tiny() -> Recipe:
    few = Schedule(steps=4, batch=2, log_every=1, ckpt_every=2)
    return Recipe(
        name="tiny", dit=TINY_DIT, vae=TINY_VAE_UNIT, text=TINY_TEXT, size=32, frames=5,
        vae_stage=VAEStage(few, Optim(lr=1e-3, warmup=0), crop=32, crop_frames=5, stats_clips=4, eval_clips=2),
        vae_decoder=VAEStage(few, Optim(lr=1e-3, warmup=0), crop=32, crop_frames=5, eval_clips=2),
        teacher=TeacherStage(few, Optim(lr=1e-3, warmup=0)),
        sla=SLAStage(few, Optim(lr=1e-4, warmup=0)),
        rcm=RCMStage(Schedule(steps=6, batch=2, log_every=1, ckpt_every=3), Optim(lr=1e-4, betas=(0.0, 0.999), warmup=0),
                     Optim(lr=1e-4, betas=(0.0, 0.999), warmup=0), tangent_warmup=2, student_update_freq=2),
        eval_clips=2, eval_teacher_steps=3, eval_rcm_steps=2,
    )


RECIPES: dict[str, Recipe] = {"mini": _mini(), "tiny": _tiny()}


# `turbovid train <stage>` -> the Recipe field holding that stage's settings (run, optim, ...).
STAGE_FIELDS = {"vae": "vae_stage", "vae_decoder": "vae_decoder", "teacher": "teacher", "sla": "sla", "qat": "qat",
                "rcm": "rcm", "ode": "ode", "dmd": "dmd_round"}


def for_world(recipe: Recipe, world: int, stages: tuple[str, ...] = tuple(STAGE_FIELDS.values())) -> Recipe:
    """The recipe for a run on `world` GPUs: the per-GPU batch of each named stage (the teacher and the ode stage
    with all their rounds) becomes batch * gpus / world, the recorded global batch; a one-line ValueError if that
    does not divide."""
    def scale(cfg):
        total = cfg.run.batch * cfg.run.gpus
        if total % world:
            raise ValueError(f"a global batch of {total} does not split over {world} GPUs; pass --batch")
        return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, batch=total // world, gpus=world))

    changes = {name: scale(getattr(recipe, name)) for name in stages if getattr(recipe, name) is not None}
    for name in ("teacher", "ode"):
        if name in stages:
            changes[f"{name}_rounds"] = tuple(scale(r) for r in getattr(recipe, f"{name}_rounds"))
    return dataclasses.replace(recipe, **changes)


def lr_at(optim: Optim, step: int, total: int) -> float:
    """Learning rate at 0-based `step`: linear warm-up from 1% of lr, then constant or cosine to 10%."""
    if step < optim.warmup:
        return optim.lr * (0.01 + 0.99 * step / optim.warmup)
    if not optim.cosine or total <= optim.warmup:
        return optim.lr
    progress = min(1.0, (step - optim.warmup) / max(1, total - optim.warmup))
    return optim.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
