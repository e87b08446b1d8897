#!/usr/bin/env bash
# Prepared in session 16 for the next device session (not run yet). One GPU; each command may get a new machine.
# The question: the shipped 4-step student is ~4 points under its teacher on 256 held-out prompts (H100, session 16:
# teacher 0.918, SLA 0.871, full stack 0.879), and the gap is the rCM stage's. Its sCM run stops at the end of the
# tangent warm-up (500 x 8, lr 2e-5). Session 16 ran it on at full tangent with the same lr and batch: 0.852 at step
# 500 -> 0.750 at step 864 (colour 0.97 -> 0.90). TurboDiffusion's student lr is 2e-6 (recipe's 2e-5 / 10) on a far
# larger batch; the sCM target's tangent term is noisy (gradient norms 1e5-7e5 after the warm-up).
#   n1: sCM alone at full tangent, continued from session 14's sCM student (carry runs/carry/s14/rcm.safetensors:
#       --init, --tangent-warmup 0, --no-dmd) at lr ${LR:-2e-6} and batch ${BATCH:-16}, pool encode included; the EMA
#       student every ${EVERY:-200} steps to $OUT/rcm_<step>.safetensors until the command's time ends (no grading
#       here: session 16's background grading starved the training and did not finish).
#   n2: `train eval` dense on 128 held-out prompts of each student carried back (runs/carry/s17/rcm_*.safetensors),
#       one at a time, session 14's student first as the anchor of the same run (its CPU and H200 grade: 0.852).
#   Then, for a student that reads higher: session16.sh m2 (SLA fine-tune + ship; carry it as
#   runs/carry/s16/rcm.safetensors) and m3 (the release's grade).
# Added in session 17 (run before n1/n2: no training, only the shipped release):
#   p1: the rCM sampler's settings, chosen on validation prompts: `turbovid eval` of the full stack (row turbo) on
#       held-out prompts 1000..1255 (never reported elsewhere), one run per (sigma_max, sde|ode) in SIGMAS x MODES,
#       JSON per setting to $OUT/sampler_<mode>_<sigma>.json; stops before a run that would not fit.
#   p2: the setting p1 picks (SIGMA, ODE=1|0) against the teacher on the reported prompts 0..255, one run.
source "$(dirname "$0")/prelude.sh" "$1"
INIT=runs/carry/s14/rcm.safetensors
# `snapshot CKPT STEP OUT`: the EMA student of checkpoint CKPT as a weights file whose history (checkpoint.
# weights_history) is INIT's followed by this run's STEP rCM steps, as the stage's own final file would have it.
snapshot() {
  python3 -c "import sys; from safetensors.torch import load_file
from turbovid.train.checkpoint import history_metadata, save_weights, weights_history
h = weights_history(sys.argv[2]) + [{'stage': 'rcm', 'steps': int(sys.argv[3])}]
save_weights(sys.argv[4], load_file(sys.argv[1]), history_metadata(h))" "$1/ema.safetensors" "$INIT" "$2" "$3"
}
case "$1" in
n1) fresh runs/s17
    for n in $(seq "${EVERY:-200}" "${EVERY:-200}" 100000); do
      # resumes from the last checkpoint; stops (checkpointed) 40 s before the command's end
      $T rcm --run-dir "$S" --init "$INIT" --tangent-warmup 0 --no-dmd --lr "${LR:-2e-6}" \
         --batch "${BATCH:-16}" --steps 100000 --until "$n" --max-minutes "$(minutes_left 40)" \
         >> "$OUT/rcm.log" 2>&1 || echo "rcm exit $?"
      tail -1 "$OUT/rcm.log"
      ckpt=$(cat "$S/rcm/checkpoints/latest") && step=$(echo "$ckpt" | sed 's/^step_0*//')
      snapshot "$S/rcm/checkpoints/$ckpt" "$step" "$OUT/rcm_$step.safetensors"
      cp "$S/rcm/log.jsonl" "$OUT/"
      if [ "$step" -lt "$n" ]; then break; fi    # the time ran out
    done ;;
p1) for sigma in ${SIGMAS:-80 200 20 1000}; do
      for mode in ${MODES:-sde ode}; do
        if [ "$(left)" -lt 75 ]; then echo "time: stopped before $mode $sigma"; break 2; fi
        python3 -m turbovid.cli eval --device cuda --configs turbo --start 1000 --count "${COUNT:-256}" \
          --sigma-max "$sigma" $([ $mode = ode ] && echo --ode) --out "$OUT/sampler_${mode}_$sigma.json" \
          2> "$OUT/eval_progress.log" | sed -n 2p | sed "s|^|$mode sigma_max=$sigma: |" | tee -a "$OUT/eval.log"
      done
    done ;;
p2) python3 -m turbovid.cli eval --device cuda --configs teacher,turbo --count "${COUNT:-256}" \
      --sigma-max "$SIGMA" $([ "${ODE:-0}" = 1 ] && echo --ode) --out "$OUT/eval_sampler_n${COUNT:-256}.json" \
      2> "$OUT/eval_progress.log" | tee "$OUT/eval.log" ;;
n2) fresh runs/s17_eval
    for f in "$INIT" runs/carry/s17/rcm_*.safetensors; do
      check "$f dense" --count 128 --dit "$f" --attention dense --sampler rcm
    done ;;
*)  echo "usage: session17.sh p1|p2|n1|n2 (p1: SIGMAS, MODES, COUNT; p2: SIGMA, ODE, COUNT; n1: LR, BATCH, EVERY)"
    exit 2 ;;
esac
