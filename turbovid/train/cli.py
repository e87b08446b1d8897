"""`turbovid train <stage>`: vae | vae_decoder | teacher | sla | qat | rcm | ode | dmd | merge | eval | reproduce |
tokenizer | ship | plot.

Single process (CPU or one GPU):   turbovid train reproduce --run-dir runs/mini
Several GPUs of one host:          torchrun --nproc-per-node 8 -m turbovid.cli train reproduce --run-dir runs/mini
Every stage resumes from its newest checkpoint in the run directory.
`ship` writes a finished run's release files (bf16 + INT8) where `--model mini` finds them:
                                   turbovid train ship --run-dir runs/mini   (-> turbovid/assets/mini)
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

STAGES = ("vae", "vae_decoder", "teacher", "sla", "qat", "rcm", "ode", "dmd", "merge", "eval", "reproduce",
          "tokenizer", "ship", "plot")


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    from turbovid.config import SampleConfig
    from turbovid.train.recipe import RECIPES

    p = subparsers.add_parser("train", help="train the embedded model (VAE, teacher, SLA, rCM, merge)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--run-dir", default="runs/mini", help="folder for checkpoints, logs and results")
    p.add_argument("--recipe", default="mini", choices=sorted(RECIPES), help="model size and hyper-parameters")
    p.add_argument("--steps", type=int, help="override the stage's number of steps (teacher, ode: one round of this "
                   "many steps instead of the recipe's rounds; any other ode setting also makes it one round)")
    p.add_argument("--batch", type=int, help="override the stage's batch per process (default: the recipe's global "
                   "batch split over the GPUs)")
    p.add_argument("--lr", type=float, help="override the stage's learning rate")
    p.add_argument("--until", type=int, help="stop after this many steps (resume later)")
    p.add_argument("--max-minutes", type=float, help="wall-clock budget: checkpoint and stop when it is spent "
                   "(resume by running the same command again)")
    p.add_argument("--fit-minutes", type=float, help="shorten a fresh stage's schedule (warm-up and decay included) "
                   "to the steps that fit in this many minutes, measured on its first steps")
    p.add_argument("--device", help="cuda | cpu (default: cuda if available)")
    p.add_argument("--compile", action="store_true",
                   help="teacher / sla / qat / ode: torch.compile the DiT blocks (CUDA only)")
    p.add_argument("--init", help="teacher: start the first round from these DiT weights (e.g. an earlier run's "
                                  "teacher/final.safetensors) instead of random ones; vae: fine-tune these VAE "
                                  "weights (the latents move, so the DiT stages must train on the new ones); rcm: "
                                  "start the student from these weights instead of the teacher's")
    p.add_argument("--edge", type=float, help="vae / vae_decoder: weight of the edge loss term (recipe.VAEStage.edge)")
    p.add_argument("--fg-weight", type=float, help="teacher: latent cells near the object weigh 1 + this in the "
                                                   "velocity loss (recipe.TeacherStage.fg_weight)")
    p.add_argument("--fg-share", type=float, help="teacher, instead of --fg-weight: the cells near the object carry "
                                                  "this share (0-1) of each sample's loss, small objects and large "
                                                  "alike (recipe.TeacherStage.fg_share); rcm: the same for the sCM "
                                                  "loss (recipe.RCMStage.fg_share); ode: the same, the object read "
                                                  "off each target (recipe.ODEStage.fg_share)")
    p.add_argument("--proj-l-only", action="store_true",
                   help="sla: train only SLA's linear-branch projections; the dense output stays the base network's "
                        "(recipe.SLAStage.proj_l_only; no dense loss term then)")
    p.add_argument("--topk", type=float, help="sla / qat / ode / rcm / eval: fraction of key blocks SLA keeps "
                                              "(recipe.SLAStage.topk); ship: the release's default (recipe.ship_topk)")
    p.add_argument("--quant-weight", type=float,
                   help="sla / qat / ode: weight of the loss of the student run quantized (SageSLA + W8A8, "
                        "straight-through; recipe.SLAStage.quant_weight)")
    p.add_argument("--sla-student", action="store_true",
                   help="rcm / dmd: the student distils with SLA attention at the top-k "
                        "(recipe.RCMStage.student_attention)")
    p.add_argument("--tangent-warmup", type=int,
                   help="rcm: steps of sCM alone, its tangent ramped in, before DMD (recipe.RCMStage.tangent_warmup; "
                        "0 for an --init student that is distilled already); dmd and rcm --no-scm: the fake score's "
                        "warm-up steps")
    p.add_argument("--no-dmd", action="store_true", help="rcm: sCM alone for the whole run, no DMD after the "
                                                         "tangent warm-up (recipe.RCMStage.dmd)")
    p.add_argument("--no-scm", action="store_true",
                   help="rcm: DMD alone, for an --init student distilled already: the --tangent-warmup steps train "
                        "the fake score only, then a student step every student_update_freq-th (5 for mini; "
                        "recipe.RCMStage.scm)")
    p.add_argument("--anchor-weight", type=float, metavar="W",
                   help="rcm --no-scm / dmd: plus W times the summed squared distance of the student's samples to the "
                        "frozen start student's, from the same states (recipe.RCMStage.anchor_weight)")
    p.add_argument("--anchor-pool", type=int, metavar="K",
                   help="rcm / dmd --anchor-weight: the anchor counts only the distance's averages over K x K latent "
                        "cells of each frame, fine detail left free (recipe.RCMStage.anchor_pool; 1, the default: "
                        "every cell)")
    p.add_argument("--anchor-size-scale", metavar="S,M,L",
                   help="rcm / dmd --anchor-weight: the anchor's weight times S, M or L for a sample whose caption "
                        "states a small, medium or large object (recipe.RCMStage.anchor_size_scale; 1,1,1 by "
                        "default)")
    p.add_argument("--guidance-size-scale", metavar="S,M,L",
                   help="rcm / dmd: the teacher's CFG scale (--guidance) times S, M or L for a sample whose caption "
                        "states a small, medium or large object (recipe.RCMStage.guidance_size_scale; 1,1,1 by "
                        "default)")
    p.add_argument("--dmd-shift", type=float, metavar="S",
                   help="rcm / dmd: the DMD term's and the fake score's noise times at UniformShift(S) instead of the "
                        "backward simulation's shift 5 (recipe.RCMStage.dmd_shift; 1: uniform)")
    p.add_argument("--oversample", metavar="VALUE:K[,...]",
                   help="rcm / dmd: clips whose attributes include VALUE (a colour, shape, direction, speed, size or "
                        "background word, e.g. small or slow) come K times per pass of the latent pool, the factors of "
                        "a clip's values multiplied (recipe.RCMStage.oversample)")
    p.add_argument("--teacher-data", type=int, metavar="N",
                   help="rcm: distil on N samples the teacher draws for training captions (50 steps, CFG), as rCM "
                        "does, instead of the encoded clips (recipe.RCMStage.teacher_data)")
    p.add_argument("--trajectories", type=int, metavar="N",
                   help="ode: the teacher samples N training captions (50 steps, CFG) and the student fits them from "
                        "the states it passes (recipe.ODEStage.trajectories)")
    policy = p.add_mutually_exclusive_group()
    policy.add_argument("--on-policy", action="store_true",
                        help="ode: the states of the student's own sampling, one call's target the teacher's sampler "
                             "run from its state (recipe.ODEStage.on_policy; the mini recipe's default)")
    policy.add_argument("--off-policy", action="store_true",
                        help="ode: the teacher's own trajectories instead (--trajectories of them)")
    p.add_argument("--on-policy-step", type=int, metavar="K",
                   help="ode on policy: the sampler call (1..steps-1, or -1 the last) whose state the teacher "
                        "completes (recipe.ODEStage.on_policy_step)")
    p.add_argument("--adv-weight", type=float, metavar="W",
                   help="ode on policy: call --on-policy-step keeps the start student's outputs as targets and adds W "
                        "times an adversarial loss on its x0, against the captions' clips "
                        "(recipe.ODEStage.adv_weight); "
                        "rcm --no-scm / dmd: plus W times the latent elements of a sample times an adversarial loss on "
                        "the student's sample, the heads trained at the critic steps (recipe.RCMStage.adv_weight)")
    p.add_argument("--adv-lr", type=float, help="ode / rcm / dmd with --adv-weight: the discriminator heads' learning "
                                                "rate (recipe.ODEStage.adv_optim, recipe.RCMStage.adv_optim)")
    p.add_argument("--no-eval", action="store_true", help="reproduce: skip the final evaluations")
    g = p.add_argument_group("merge of arbitrary files (all three given: TurboDiffusion's merge_models.py)")
    g.add_argument("--base", help="rCM student checkpoint")
    g.add_argument("--diff-base", help="pretrained (teacher) checkpoint")
    g.add_argument("--diff-target", help="SLA fine-tuned checkpoint")
    g.add_argument("--weight", type=float, help="delta weight w (default: the recipe's, 1.0)")
    g.add_argument("--output", help="merged .safetensors path (ship: destination folder)")
    e = p.add_argument_group("eval")
    e.add_argument("--dit", help="DiT weights to evaluate (default: the merged model)")
    e.add_argument("--attention", default="sla", help="dense | sla | sagesla (default sla)")
    e.add_argument("--sampler", default="rcm", choices=("rcm", "teacher"))
    e.add_argument("--eval-steps", type=int, help="sampling steps (default: 4 rcm, 50 teacher)")
    e.add_argument("--count", type=int, help="number of prompts")
    e.add_argument("--split", default="heldout", choices=("heldout", "train"))
    e.add_argument("--guidance", type=float,
                   help=f"eval, teacher sampler: CFG scale (default {SampleConfig.guidance:g}); rcm: the CFG scale of "
                        "the teacher it distils, v_u + g (v_c - v_u) (recipe.RCMStage.guidance)")
    e.add_argument("--shift", type=float, default=SampleConfig.shift,
                   help=f"teacher sampler: flow shift (default {SampleConfig.shift:g})")
    return p


def _adversarial(args: argparse.Namespace, cfg) -> dict:
    """--adv-weight / --adv-lr as settings of `cfg` (an ODEStage or RCMStage; each checks where the term may go)."""
    out = {}
    if args.adv_weight is not None:
        if not args.adv_weight >= 0:
            raise ValueError(f"--adv-weight must be >= 0, got {args.adv_weight}")
        out["adv_weight"] = args.adv_weight
    if args.adv_lr is not None:
        if not args.adv_lr > 0:
            raise ValueError(f"--adv-lr must be positive, got {args.adv_lr}")
        if not out.get("adv_weight", cfg.adv_weight):
            raise ValueError("--adv-lr goes with the adversarial term (--adv-weight)")
        out["adv_optim"] = dataclasses.replace(cfg.adv_optim, lr=args.adv_lr)
    return out


def _parse_oversample(text: str) -> tuple[tuple[str, int], ...]:
    """--oversample "small:2,slow:3" -> (("small", 2), ("slow", 3)); the stage checks the values and factors."""
    pairs = []
    for item in text.split(","):
        value, _, k = item.strip().partition(":")
        if not k.strip().isdigit():
            raise ValueError(f"--oversample takes VALUE:K pairs with integer K, such as small:2,slow:2, got {text!r}")
        pairs.append((value.strip(), int(k)))
    return tuple(pairs)


def _recipe(args, world: int = 1):
    """The named recipe for `world` GPUs (recipe.for_world) with the command line's overrides. An explicit
    --steps or --lr for the teacher replaces its recorded rounds by one round, and so does any setting of the ode
    stage (--steps, --batch, --lr and its own flags) for the ode rounds; --compile applies to all."""
    from turbovid.config import parse_floats
    from turbovid.train.recipe import RECIPES, STAGE_FIELDS, for_world

    stage_field = STAGE_FIELDS.get(args.stage)
    recipe = RECIPES[args.recipe]
    if args.stage in ("vae_decoder", "qat", "ode", "dmd") and getattr(recipe, stage_field) is None:
        raise ValueError(f"recipe {recipe.name!r} has no {args.stage} stage")
    fields = [stage_field] if stage_field else [f for f in STAGE_FIELDS.values() if getattr(recipe, f) is not None]
    recipe = for_world(recipe, world, () if args.batch is not None else tuple(fields))
    if "teacher" in fields and (args.steps is not None or args.lr is not None):
        recipe = dataclasses.replace(recipe, teacher_rounds=())
    for name in fields:
        cfg = getattr(recipe, name)
        run, optim = cfg.run, cfg.optim
        if args.steps is not None:
            if args.steps < 1:
                raise ValueError(f"--steps must be >= 1, got {args.steps}")
            run = dataclasses.replace(run, steps=args.steps, ckpt_every=min(run.ckpt_every, args.steps))
        if args.batch is not None:
            if args.batch < 1:
                raise ValueError(f"--batch must be >= 1, got {args.batch}")
            run = dataclasses.replace(run, batch=args.batch)
        if args.lr is not None:
            if not args.lr > 0:
                raise ValueError(f"--lr must be positive, got {args.lr}")
            optim = dataclasses.replace(optim, lr=args.lr)
        extra = {}
        if args.edge is not None and name in ("vae_stage", "vae_decoder"):
            if args.edge < 0:
                raise ValueError(f"--edge must be >= 0, got {args.edge}")
            extra["edge"] = args.edge
        recipe = dataclasses.replace(recipe, **{name: dataclasses.replace(cfg, run=run, optim=optim, **extra)})
    if args.fg_weight is not None and args.fg_weight < 0:
        raise ValueError(f"--fg-weight must be >= 0, got {args.fg_weight}")
    if args.fg_share is not None and not 0 <= args.fg_share < 1:
        raise ValueError(f"--fg-share must be in [0, 1), got {args.fg_share}")
    if args.fg_weight is not None and args.fg_share is not None:
        raise ValueError("--fg-weight and --fg-share are two ways to weigh the object: give one")
    sla = {}
    if args.topk is not None:
        if not 0 < args.topk <= 1:
            raise ValueError(f"--topk must be in (0, 1], got {args.topk}")
        if args.stage == "ship":     # the release's default top-k, not the one it was tuned at
            recipe = dataclasses.replace(recipe, ship_topk=args.topk)
        else:
            sla["topk"] = args.topk
    if args.proj_l_only:      # the dense output cannot move, so its loss term would be a constant
        sla.update(proj_l_only=True, dense_weight=0.0)
    if args.quant_weight is not None:
        if args.quant_weight < 0 or (args.stage == "qat" and args.quant_weight == 0):
            raise ValueError(f"--quant-weight must be >= 0 (> 0 for qat), got {args.quant_weight}")
        sla["quant_weight"] = args.quant_weight
    if args.trajectories is not None and args.trajectories < 1:
        raise ValueError(f"--trajectories must be >= 1, got {args.trajectories}")
    if args.stage == "ode" and recipe.ode is not None:      # elsewhere the flag check below refuses these flags
        on_policy = (recipe.ode.on_policy or args.on_policy) and not args.off_policy
        if args.on_policy or args.off_policy:
            sla["on_policy"] = on_policy
        if args.trajectories is not None:
            if on_policy:
                raise ValueError("--trajectories goes with the off-policy ode stage (--off-policy)")
            sla["trajectories"] = args.trajectories
        if args.on_policy_step is not None:
            if not on_policy:
                raise ValueError("--on-policy-step goes with the on-policy ode stage (--on-policy)")
            sla["on_policy_step"] = args.on_policy_step
        if args.fg_share is not None:      # the object read off each target
            sla["fg_share"] = args.fg_share
        if args.adv_weight is not None and not on_policy:
            raise ValueError("--adv-weight goes with the on-policy ode stage (--on-policy)")
        sla.update(_adversarial(args, recipe.ode))
    if sla:
        field = args.stage if args.stage in ("qat", "ode") else "sla"    # the settings of the stage being run
        recipe = dataclasses.replace(recipe, **{field: dataclasses.replace(getattr(recipe, field), **sla)})
    if "ode" in fields and (any(v is not None for v in (args.steps, args.batch, args.lr)) or
                            (sla and args.stage == "ode")):
        recipe = dataclasses.replace(recipe, ode_rounds=())      # one round: the settings given, from sla/final
    rcm = {}
    if args.sla_student:
        rcm["student_attention"] = "sla"
    if args.tangent_warmup is not None:
        if args.tangent_warmup < 0:
            raise ValueError(f"--tangent-warmup must be >= 0, got {args.tangent_warmup}")
        rcm["tangent_warmup"] = args.tangent_warmup
    if args.no_dmd:
        rcm["dmd"] = False
    if args.no_scm:
        rcm["scm"] = False
    if args.anchor_weight is not None:
        rcm["anchor_weight"] = args.anchor_weight
    if args.anchor_pool is not None:
        rcm["anchor_pool"] = args.anchor_pool
    if args.anchor_size_scale is not None:
        rcm["anchor_size_scale"] = parse_floats(args.anchor_size_scale, "--anchor-size-scale", 3,
                                                  example="0,1,3")
    if args.guidance_size_scale is not None:
        rcm["guidance_size_scale"] = parse_floats(args.guidance_size_scale, "--guidance-size-scale", 3,
                                                    example="2,1,1")
    if args.dmd_shift is not None:
        if not args.dmd_shift > 0:
            raise ValueError(f"--dmd-shift must be > 0, got {args.dmd_shift}")
        rcm["dmd_shift"] = args.dmd_shift
    if args.oversample is not None:
        rcm["oversample"] = _parse_oversample(args.oversample)
    if args.teacher_data is not None:
        if args.teacher_data < 1:
            raise ValueError(f"--teacher-data must be >= 1, got {args.teacher_data}")
        rcm["teacher_data"] = args.teacher_data
    if args.guidance is not None and args.stage in ("rcm", "dmd", "reproduce"):
        if not args.guidance >= 1:
            raise ValueError(f"--guidance must be >= 1 (1: no CFG), got {args.guidance}")
        rcm["guidance"] = args.guidance
    if args.fg_share is not None and args.stage == "rcm":   # the sCM loss's object weighting
        rcm["fg_share"] = args.fg_share
    field = "dmd_round" if args.stage == "dmd" else "rcm"
    if args.stage in ("rcm", "dmd") and getattr(recipe, field) is not None:
        rcm.update(_adversarial(args, getattr(recipe, field)))
    if rcm:   # the stage's settings: the DMD round's for `train dmd`
        recipe = dataclasses.replace(recipe, **{field: dataclasses.replace(getattr(recipe, field), **rcm)})
    if (args.fg_weight is not None or args.fg_share is not None) and args.stage not in ("rcm", "ode"):   # teacher
        weighted = lambda cfg: dataclasses.replace(cfg, fg_weight=args.fg_weight or 0.0,  # noqa: E731
                                                   fg_share=args.fg_share or 0.0)
        recipe = dataclasses.replace(recipe, teacher=weighted(recipe.teacher),
                                     teacher_rounds=tuple(map(weighted, recipe.teacher_rounds)))
    if args.compile:   # every DiT stage that trains with velocity regression (the teacher's rounds too)
        compiled = lambda cfg: dataclasses.replace(cfg, compile=True)  # noqa: E731
        recipe = dataclasses.replace(recipe, teacher=compiled(recipe.teacher), sla=compiled(recipe.sla),
                                     qat=recipe.qat and compiled(recipe.qat), ode=recipe.ode and compiled(recipe.ode),
                                     teacher_rounds=tuple(map(compiled, recipe.teacher_rounds)),
                                     ode_rounds=tuple(map(compiled, recipe.ode_rounds)))
    return recipe


def cmd_train(args: argparse.Namespace) -> int:
    from turbovid.train.loop import setup_env, teardown_env

    if args.stage == "tokenizer":
        from turbovid.train.tokenizer import build_spiece
        print(f"wrote {build_spiece()}")
        return 0
    if args.stage == "merge" and args.base:
        from turbovid.train.merge import merge_files
        if not (args.diff_base and args.diff_target and args.output):
            raise ValueError("merge of files needs --base, --diff-base, --diff-target and --output")
        print(f"wrote {merge_files(args.base, args.diff_base, args.diff_target, args.output, args.weight or 1.0)}")
        return 0
    if args.stage == "plot":
        from turbovid.train.plots import plot_run
        from turbovid.train.recipe import RECIPES
        out = plot_run(Path(args.run_dir), Path(args.output or Path(args.run_dir) / "curves.png"), RECIPES[args.recipe])
        print(f"wrote {out}")
        return 0
    recipe = _recipe(args, int(os.environ.get("WORLD_SIZE", "1")))   # torchrun sets WORLD_SIZE
    for flag, value, stages in (("--init", args.init, ("teacher", "vae", "rcm")),
                                ("--edge", args.edge, ("vae", "vae_decoder")),
                                ("--fg-weight", args.fg_weight, ("teacher", "reproduce")),
                                ("--fg-share", args.fg_share, ("teacher", "rcm", "ode", "reproduce")),
                                ("--proj-l-only", args.proj_l_only or None, ("sla",)),
                                ("--topk", args.topk, ("sla", "qat", "ode", "rcm", "eval", "ship", "reproduce")),
                                ("--quant-weight", args.quant_weight, ("sla", "qat", "ode")),
                                ("--trajectories", args.trajectories, ("ode",)),
                                ("--on-policy", args.on_policy or None, ("ode",)),
                                ("--off-policy", args.off_policy or None, ("ode",)),
                                ("--on-policy-step", args.on_policy_step, ("ode",)),
                                ("--adv-weight", args.adv_weight, ("ode", "rcm", "dmd")),
                                ("--adv-lr", args.adv_lr, ("ode", "rcm", "dmd")),
                                ("--sla-student", args.sla_student or None, ("rcm", "dmd", "reproduce")),
                                ("--tangent-warmup", args.tangent_warmup, ("rcm", "dmd", "reproduce")),
                                ("--no-dmd", args.no_dmd or None, ("rcm", "reproduce")),
                                ("--no-scm", args.no_scm or None, ("rcm", "reproduce")),
                                ("--anchor-weight", args.anchor_weight, ("rcm", "dmd", "reproduce")),
                                ("--anchor-pool", args.anchor_pool, ("rcm", "dmd", "reproduce")),
                                ("--anchor-size-scale", args.anchor_size_scale, ("rcm", "dmd", "reproduce")),
                                ("--guidance-size-scale", args.guidance_size_scale, ("rcm", "dmd", "reproduce")),
                                ("--dmd-shift", args.dmd_shift, ("rcm", "dmd", "reproduce")),
                                ("--oversample", args.oversample, ("rcm", "dmd", "reproduce")),
                                ("--teacher-data", args.teacher_data, ("rcm", "reproduce")),
                                ("--guidance", args.guidance, ("rcm", "dmd", "eval", "reproduce"))):
        if value is not None and args.stage not in stages:
            named = [st for st in stages if st != "reproduce"]   # reproduce passes the flag on to its stage
            raise ValueError(f"{flag} applies to the {', '.join(named)} stage{'s' * (len(named) > 1)} only")
    if args.stage == "ship":
        from turbovid.train.reproduce import ship
        dest = Path(args.output) if args.output else Path(__file__).resolve().parents[1] / "assets" / recipe.name
        print(f"wrote {ship(recipe, Path(args.run_dir), dest)}")
        return 0
    if args.weight is not None:
        recipe = dataclasses.replace(recipe, merge_weight=args.weight)
    run_dir = Path(args.run_dir)
    if args.max_minutes is not None and not args.max_minutes > 0:
        raise ValueError(f"--max-minutes must be positive, got {args.max_minutes}")
    if args.fit_minutes is not None and not args.fit_minutes > 0:
        raise ValueError(f"--fit-minutes must be positive, got {args.fit_minutes}")
    env = setup_env(args.device, args.max_minutes, args.fit_minutes)
    try:
        if args.stage in ("vae", "vae_decoder"):
            from turbovid.train.vae import run_vae
            out = run_vae(recipe, run_dir, env, until=args.until, decoder=args.stage == "vae_decoder", init=args.init)
        elif args.stage == "teacher":
            from turbovid.train.teacher import run_teacher
            out = run_teacher(recipe, run_dir, env, until=args.until, init=args.init)
        elif args.stage == "sla":
            from turbovid.train.teacher import run_sla
            out = run_sla(recipe, run_dir, env, until=args.until)
        elif args.stage == "qat":
            from turbovid.train.teacher import run_qat
            out = run_qat(recipe, run_dir, env, until=args.until)
        elif args.stage == "ode":
            from turbovid.train.trajectory import run_ode
            out = run_ode(recipe, run_dir, env, until=args.until)
        elif args.stage == "rcm":
            from turbovid.train.distill import run_rcm
            out = run_rcm(recipe, run_dir, env, until=args.until, init=args.init)
        elif args.stage == "dmd":
            from turbovid.train.distill import run_dmd
            out = run_dmd(recipe, run_dir, env, until=args.until)
        elif args.stage == "merge":
            from turbovid.train.reproduce import run_merge
            out = run_merge(recipe, run_dir, env)
        elif args.stage == "eval":
            from turbovid.train.evaluate import evaluate
            dit = Path(args.dit) if args.dit else run_dir / "merged" / "model.safetensors"
            steps = args.eval_steps or (recipe.eval_teacher_steps if args.sampler == "teacher" else recipe.eval_rcm_steps)
            from turbovid.config import SampleConfig
            guidance = SampleConfig.guidance if args.guidance is None else args.guidance
            cfg = f"_g{guidance:g}_s{args.shift:g}" if args.sampler == "teacher" else ""
            out = run_dir / "eval" / f"{dit.stem}_{args.attention}_{args.sampler}{steps}{cfg}_{args.split}.json"
            if env.main:   # rank 0 alone, as a single process (no collectives inside)
                from turbovid.train.loop import Env
                result = evaluate(recipe, run_dir, Env(env.device), dit, attention=args.attention, sampler=args.sampler,
                                  steps=steps, count=args.count, split=args.split, out=out,
                                  guidance=guidance, shift=args.shift)
                drift = "-" if result["hue_drift"] is None else f"{result['hue_drift']:.1f}"
                print(f"adherence {result['all']:.3f}: " + ", ".join(
                    f"{k} {result[k]:.2f}" for k in ("color", "shape", "direction", "speed", "size"))
                    + f", hue drift {drift} deg")
        else:
            from turbovid.train.reproduce import reproduce
            out = reproduce(recipe, run_dir, env, evaluate_models=not args.no_eval)
        if env.main:
            if out.suffix == ".safetensors" and not out.is_file():   # a stage stopped by --max-minutes
                print(f"stopped at the --max-minutes budget in {out.parent}; run the same command again to resume")
            else:
                print(f"done: {out}")
    finally:
        teardown_env(env)
    return 0
