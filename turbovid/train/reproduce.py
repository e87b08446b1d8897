"""The whole recipe from scratch, in order, with one command (resumable: finished stages are skipped,
an interrupted one continues from its newest checkpoint):

    tokenizer + frozen text encoder -> VAE (-> VAE decoder fine-tune) -> teacher -> rCM distillation -> SLA fine-tune
    (-> quantization-aware fine-tune | -> ode (-> DMD round)) -> merge -> evaluation of teacher / rCM / merged
    -> export/
(SLA tunes the teacher and the merge adds its change to the rCM student, SPEC §10.1; with recipe.sla.base =
"rcm" SLA tunes the rCM student itself and there is no merge, and a recipe that ships the qat stage's student
continues that student quantization-aware, teacher.QATTrainer; one that ships the ode stage's student fits that
student to the teacher's own samples last, trajectory.ODETrainer, and one that ships the DMD round's student then
trains that student by DMD alone, distill.run_dmd.)

Each stage writes run_dir/<stage>/{log.jsonl, checkpoints/, final.safetensors}. Evaluations run on rank 0
(held-out prompts, `turbovid.train.evaluate`) and land in run_dir/eval/*.json (+ an mp4 of 8 samples).
export/ holds the release files `ship` writes (what `turbovid train ship` copies into turbovid/assets/):
    dit.safetensors          the 4-step student, bf16 (recipe.ship_student: merged rCM + SLA, the rCM student, the
                             SLA-tuned rCM student, or that student after the qat or the ode stage, or after the
                             ode stage and the DMD round)
    dit_int8.safetensors     the same, W8A8 INT8 (fast format)
    dit_teacher.safetensors  the teacher, bf16 (50 steps with CFG)
    vae.safetensors, text_encoder.safetensors (bf16), spiece.model
    config.json              latent mean/std, steps per stage, SLA's default top-k (and the one it was tuned at),
                             VAE reconstruction, eval summary
When `--max-minutes` stops a stage, `reproduce` returns that stage's (still missing) final.safetensors path.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path

from turbovid.attention.sla import SLA_BLOCKS
from turbovid.train.distill import run_dmd, run_rcm
from turbovid.train.evaluate import evaluate
from turbovid.train.inputs import build_text_encoder, trained_vae_file
from turbovid.train.loop import Env
from turbovid.train.merge import merge_files
from turbovid.train.recipe import Recipe
from turbovid.train.teacher import run_qat, run_sla, run_teacher, teacher_dirs
from turbovid.train.trajectory import ode_dirs, run_ode
from turbovid.train.vae import run_vae
from turbovid.video import available_backend


def run_merge(recipe: Recipe, run_dir: Path, env: Env) -> Path:
    if not recipe.merges:
        raise ValueError(f"recipe {recipe.name} SLA-tunes the rCM student (sla.base = rcm): there is nothing to merge")
    run_dir = Path(run_dir)
    out = run_dir / "merged" / "model.safetensors"
    parts = [run_dir / stage / "final.safetensors" for stage in ("rcm", "teacher", "sla")]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise ValueError(f"merge needs the rcm, teacher and sla stages first; missing {', '.join(missing)}")
    if env.main:
        merge_files(*parts, out, weight=recipe.merge_weight)
    env.barrier()
    return out


def _evaluate_all(recipe: Recipe, run_dir: Path, env: Env, video_backend: str | None) -> dict:
    """The models the release compares, on the held-out prompts (rank 0 only); each one's first 8 clips to an mp4
    unless `video_backend` is None."""
    ev = run_dir / "eval"
    jobs = {
        "teacher": (run_dir / "teacher" / "final.safetensors", "dense", "teacher", recipe.eval_teacher_steps),
        "teacher_4step": (run_dir / "teacher" / "final.safetensors", "dense", "rcm", recipe.eval_rcm_steps),
        "rcm": (run_dir / "rcm" / "final.safetensors", "dense", "rcm", recipe.eval_rcm_steps),
    }
    if recipe.merges:
        jobs["merged_sla"] = (run_dir / "merged" / "model.safetensors", "sla", "rcm", recipe.eval_rcm_steps)
    else:
        jobs["rcm_sla"] = (run_dir / "sla" / "final.safetensors", "sla", "rcm", recipe.eval_rcm_steps)
    if recipe.student_stages:
        jobs[f"{recipe.ship_student}_sagesla"] = (run_dir / recipe.ship_student / "final.safetensors", "sagesla", "rcm",
                                                  recipe.eval_rcm_steps)
    summary = {}
    if env.main:
        local = Env(env.device)   # rank 0 alone: no collective calls may happen in here
        for name, (dit, attention, sampler, steps) in jobs.items():
            result = evaluate(recipe, run_dir, local, dit, attention=attention, sampler=sampler, steps=steps,
                              out=ev / f"{name}.json", videos=ev / f"{name}.mp4" if video_backend else None,
                              video_backend=video_backend or "ffmpeg")
            summary[name] = {k: result[k] for k in ("all", "color", "shape", "direction", "speed", "size", "steps")}
            print(f"[eval] {name}: adherence {result['all']:.3f} (colour {result['color']:.2f}, shape "
                  f"{result['shape']:.2f}, direction {result['direction']:.2f})", flush=True)
    env.barrier()
    return summary


def reproduce(recipe: Recipe, run_dir: Path, env: Env, evaluate_models: bool = True) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Checked before the first stage, not hours later: the evaluations' sample videos need an mp4 encoder.
    video_backend = available_backend() if evaluate_models else None
    if evaluate_models and video_backend is None and env.main:
        print("note: no mp4 encoder is installed (pip install 'imageio[ffmpeg]'): the evaluations will write their "
              "scores but no sample videos", flush=True)
    if env.main:
        (run_dir / "recipe.json").write_text(json.dumps(dataclasses.asdict(recipe), indent=1, default=str))
    build_text_encoder(recipe, run_dir, env)   # writes spiece.model and the frozen text encoder once
    stages = [(run_vae, "vae"), (run_teacher, "teacher"), (run_rcm, "rcm"), (run_sla, "sla")]
    if recipe.vae_decoder is not None:
        stages.insert(1, (functools.partial(run_vae, decoder=True), "vae_decoder"))
    runners = {"qat": run_qat, "ode": run_ode, "dmd": run_dmd}
    stages += [(runners[name], name) for name in recipe.student_stages]
    for stage, name in stages:
        if not (run_dir / name / "final.safetensors").is_file():
            stage(recipe, run_dir, env)
        if not (run_dir / name / "final.safetensors").is_file():   # stopped by --max-minutes
            return run_dir / name / "final.safetensors"
    if recipe.merges:
        run_merge(recipe, run_dir, env)
    summary = _evaluate_all(recipe, run_dir, env, video_backend) if evaluate_models else {}
    out = run_dir / "export"
    if env.main:
        ship(recipe, run_dir, out, summary)
    env.barrier()
    return out



def ship(recipe: Recipe, run_dir: Path, dest: Path, summary: dict | None = None) -> Path:
    """The files the package ships for the model (turbovid/assets/<name>/, read by pipeline.shipped_files):
    teacher and merged 4-step student in bf16, the student as W8A8 INT8 (`turbovid quantize` fast format),
    VAE and frozen text encoder in bf16, the tokenizer, and config.json (latent statistics, what each stage
    ran, and `summary`: the evaluations of `reproduce`). Each file is written under a temporary name and renamed.

    What each stage ran is read from the shipped files' histories (checkpoint.weights_history, which the shipped
    files keep), so a run assembled from an earlier release's files counts every stage behind them; a stage no
    history records falls back to the step count of run_dir/<stage>/final.safetensors. `stages` keeps one entry per
    stage name (the DMD round's is "dmd", though its record in the history reads "rcm": it trains with the rCM
    trainer); `student_history` is the shipped student's whole history in order (a stage run twice, e.g. rcm again
    after the ode rounds, appears twice there)."""
    import torch
    from safetensors.torch import load_file

    from turbovid.quantize import quantize_checkpoint
    from turbovid.train.checkpoint import history_metadata, save_weights, weights_history

    run_dir, dest = Path(run_dir), Path(dest)
    students = {"merged": run_dir / "merged" / "model.safetensors", "rcm": run_dir / "rcm" / "final.safetensors",
                **{name: run_dir / name / "final.safetensors" for name in ("sla", "qat", "ode", "dmd")}}
    sources = {"dit_teacher": run_dir / "teacher" / "final.safetensors", "dit": students[recipe.ship_student],
               "vae": trained_vae_file(recipe, run_dir), "text_encoder": run_dir / "text_encoder.safetensors"}
    missing = [str(p) for p in sources.values() if not p.is_file()]
    if missing:
        raise ValueError(f"ship needs a finished run; missing {', '.join(missing)}")
    dest.mkdir(parents=True, exist_ok=True)
    histories = {role: weights_history(src) for role, src in sources.items()}
    for role, src in sources.items():
        state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(str(src)).items()}
        save_weights(dest / f"{role}.safetensors", state, metadata={"source": src.relative_to(run_dir).as_posix(),
                                                                      **history_metadata(histories[role])})
    quantize_checkpoint(dest / "dit.safetensors", dest / "dit_int8.safetensors", model=recipe.name, fmt="fast")
    shutil.copyfile(run_dir / "spiece.model", dest / ".spiece.model.tmp")
    (dest / ".spiece.model.tmp").replace(dest / "spiece.model")
    def folder_steps(folder: str) -> int:
        path = run_dir / folder / "final.safetensors"
        history = weights_history(path) if path.is_file() else []
        return history[-1].get("steps", 0) if history else 0
    student = list(histories["dit"])      # the DMD round's record is the student's last (its trainer's, "rcm")
    dmd = student.pop() if "dmd" in recipe.student_stages and student else {"steps": 0}
    recorded = [*histories["vae"], *student]

    def steps(stage: str) -> int:   # the shipped files' last record of the stage, else its run folder's
        found = [entry["steps"] for entry in recorded if entry["stage"] == stage]
        return found[-1] if found else folder_steps(stage)
    def rounds(role: str, stage: str, dirs: list[str]) -> dict:   # every round the role's file records, else its folders'
        found = [entry["steps"] for entry in histories[role] if entry["stage"] == stage]
        found = found or [folder_steps(name) for name in dirs]
        return {"steps": sum(found), "rounds": found}
    stages = {stage: {"steps": steps(stage)} for stage in ("vae", "sla", "rcm")}
    if "qat" in recipe.student_stages:
        stages["qat"] = {"steps": steps("qat")}
    if "ode" in recipe.student_stages:
        stages["ode"] = rounds("dit", "ode", ode_dirs(recipe))
    if "dmd" in recipe.student_stages:
        stages["dmd"] = {"steps": dmd["steps"]}
    if recipe.vae_decoder is not None:
        stages["vae_decoder"] = {"steps": steps("vae_decoder")}
    stages["teacher"] = rounds("dit_teacher", "teacher", teacher_dirs(recipe))
    config = {"recipe": recipe.name, "size": recipe.size, "frames": recipe.frames, "stages": stages,
              "vae_latent_stats": json.loads((run_dir / "vae" / "latent_stats.json").read_text()),
              "student": recipe.ship_student, "sla_topk": recipe.ship_topk or recipe.sla.topk,
              "sla_topk_tuned": recipe.ode_stages[-1].topk if "ode" in recipe.student_stages else recipe.sla.topk,
              # the blocks every training stage runs SLA at (no stage fixes them): the release runs there too
              "sla_blocks": list(SLA_BLOCKS),
              "merge_weight": recipe.merge_weight, "student_history": histories["dit"]}
    recon = trained_vae_file(recipe, run_dir).parent / "reconstruction.json"
    if recon.is_file():
        config["vae_reconstruction"] = json.loads(recon.read_text())
    if summary:
        config["eval"] = summary
    tmp = dest / ".config.json.tmp"
    tmp.write_text(json.dumps(config, indent=1))
    tmp.replace(dest / "config.json")
    return dest
