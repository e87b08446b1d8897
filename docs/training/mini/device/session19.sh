#!/usr/bin/env bash
# Session 19's device script. One GPU; o2 and o3 expect the machine o1 left warm (its run directory runs/s19 with
# the teacher's trajectories cached in runs/s19/ode/); a new machine makes o2 start over.
# The question: does the 4-step student get closer to the teacher when it fits the teacher's own samples? The new
# ode stage (`train ode`, trajectory.py): the shipped teacher samples ${TRAJ:-3072} training captions with the sampler
# its adherence is graded with (UniPC 50 steps, CFG 5), keeping the states it passes at the 4-step sampler's times,
# and the shipped student (SLA-tuned rCM, SLA at top-k 0.75 + the dense term) regresses onto those samples from
# those states: the recipe's 1500 x 32 (8 trajectories x 4 states a step), lr 2e-5 cosine.
#   o1: a run directory from the shipped files, the trajectories, and the stage until the command's time ends; the
#       EMA student every 250 steps, in bf16 (kept).
#   o2: the stage resumed to its end; that student shipped (ship_file) and its full stack graded on the validation
#       prompts 1000..1255 (release: 217 in sessions 17 and 18) and the reported 0..255 (release: 225 in session 16,
#       teacher 234-235); then, time allowing, the step-${MID:-750} student on the validation prompts.
#   r1: the one-GPU replay's first two stages, which no run had tried at their one-GPU batches: the VAE (global batch
#       64 in one process) from scratch, then teacher round 1 (batch 128, after the 24000-clip pool encode) from
#       scratch with the shipped VAE, ${UNTIL:-40} steps each; GPU memory sampled every 2 s to $OUT/gpu_memory.csv.
#   h1: session19_checks/hybrid.py: the shipped student for its first k of 4 steps, then the teacher (UniPC + CFG 5)
#       for the rest, k = 1, 2, 3, beside the student and the teacher alone, on held-out prompts 0..${COUNT:-160}-1.
#   p1: the ode stage on policy (`--on-policy`): the shipped student's own 4-step sampling states, the last one's
#       target the teacher's UniPC + CFG completion from it, the others' the shipped student's own outputs; its
#       schedule fitted to the command minus 250 s (one process: `stage`); then that student shipped and graded as
#       o2 grades (validation 1000..1255, reported 0..255).
#   p2: p1 with the teacher completing the third sampler call's state instead (`--on-policy-step 2`, s = 0.85):
#       the last step stays the shipped student's own; the stage stopped 60 s after its fitted end.
#   o3: not run in session 19. The release's grade of the student carried as ${FILE:-runs/carry/s19/p2_final.safetensors}
#       (p2's, fp32; shipped with ship_file): every row on 128 held-out prompts (prelude release_eval_gpu).
#   o4: not run in session 19. The same release: teacher, SLA and full stack on 256 prompts.
# o1 / o2 ran before `--off-policy` existed, when the stage was off policy by default; since session 20 the mini
# recipe's ode stage is on policy at call 1 (416 steps), so they now pass --off-policy and session 19's --steps
# 1500, and p1 names the last call (-1, the default then).
source "$(dirname "$0")/prelude.sh" "$1"
export BF16=1
S=runs/s19
case "$1" in
o1) fresh "$S"; kept ode "$S/sla/final.safetensors" 250 --off-policy --trajectories "${TRAJ:-3072}" --steps 1500 ;;
o2) kept ode "$S/sla/final.safetensors" 250 --off-policy --trajectories "${TRAJ:-3072}" --steps 1500
    ship_file "$S/ode/final.safetensors"
    turbo_eval val_final 1000
    turbo_eval reported_final 0
    if [ "$(left)" -gt 130 ]; then ship_file "$S/kept/ode_${MID:-750}.safetensors" && turbo_eval "val_${MID:-750}" 1000; fi ;;
r1) nvidia-smi --query-gpu=memory.used --format=csv,noheader -l 2 > "$OUT/gpu_memory.csv" &
    rm -rf runs/r1 && mkdir -p runs/r1
    $T vae --run-dir runs/r1 --until "${UNTIL:-40}" > "$OUT/vae.log" 2>&1 || echo "vae exit $?"
    tail -2 "$OUT/vae.log"
    echo "vae done $(date +%s)" >> "$OUT/gpu_memory.csv"
    fresh runs/r1t    # the shipped VAE; teacher round 1 goes to runs/r1t/teacher_round1
    $T teacher --run-dir "$S" --until "${UNTIL:-40}" > "$OUT/teacher.log" 2>&1 || echo "teacher exit $?"
    tail -2 "$OUT/teacher.log"
    kill %1 ;;
h1) fresh runs/hy
    python3 docs/training/mini/session19_checks/hybrid.py "$S" --count "${COUNT:-160}" \
      --out "$OUT/hybrid_h100_n${COUNT:-160}.json" 2>&1 | tee "$OUT/hybrid.log" ;;
p1) fresh "$S"
    stage ode ode --on-policy --on-policy-step -1 --steps 100000 --fit-minutes "$(minutes_left 250)" \
      --max-minutes "$(minutes_left 230)"
    ship_file "$S/ode/final.safetensors"
    turbo_eval val_on_policy 1000
    turbo_eval reported_on_policy 0 ;;
p2) fresh "$S"
    stage ode ode --on-policy --on-policy-step 2 --steps 100000 --fit-minutes "$(minutes_left 260)" \
      --max-minutes "$(minutes_left 200)"
    ship_file "$S/ode/final.safetensors"
    turbo_eval val_on_policy2 1000
    turbo_eval reported_on_policy2 0 ;;
o3) ship_file "${FILE:-runs/carry/s19/p2_final.safetensors}"
    release_eval_gpu ;;
o4) ship_file "${FILE:-runs/carry/s19/p2_final.safetensors}"
    COUNT=256 CONFIGS=teacher,student_sla,turbo release_eval_gpu ;;
*)  echo "usage: session19.sh o1|o2|r1|h1|p1|p2|o3|o4 (o1, o2: TRAJ; o2: MID; r1: UNTIL; h1: COUNT; o3, o4: FILE)"
    exit 2 ;;
esac
