#!/usr/bin/env bash
# Session 17, one H100 (its groups p1, p2 added in the session; n1 prepared in session 16). Each command may get a new
# machine. The question: the shipped 4-step student is ~4 points under its teacher on 256 held-out prompts (H100,
# session 16: teacher 0.918, SLA 0.871, full stack 0.879), and the gap is the rCM stage's.
#   p1: the rCM sampler's settings, chosen on validation prompts: `turbovid eval` of the full stack (row turbo) on
#       held-out prompts 1000..1255 (never reported elsewhere), one run per (sigma_max, sde|ode) in SIGMAS x MODES,
#       JSON per setting to $OUT/sampler_<mode>_<sigma>.json, its row to $OUT/sampler.log; stops before a run
#       that would not fit (prelude's release_eval; as run, the rows went to eval.log).
#       As run: `p1` (SDE / ODE at 80, SDE at 200; the time ended there), then `SIGMAS="1000 500 2000" MODES=sde p1`.
#   p2: the setting p1 picks (SIGMA, ODE=1|0) against the teacher on the reported prompts 0..255, one run.
#       As run: `SIGMA=200 p2`.
#   n1: sCM alone at full tangent, continued from session 14's sCM student (carry runs/carry/s14/rcm.safetensors:
#       --init, --tangent-warmup 0, --no-dmd) at lr ${LR:-2e-6} and batch ${BATCH:-16}, pool encode included; the EMA
#       student every ${EVERY:-200} steps to $OUT/rcm_<step>.safetensors until the command's time ends (prelude's
#       rcm_kept). Session 16 ran the recipe's lr 2e-5 past the warm-up: 0.852 at step 500 -> 0.750 at step 864.
#       As run: `LR=5e-6 BATCH=8 EVERY=250 n1` (steps 250 .. 1098; the 750 file did not fit in what comes back).
#   n2: `train eval` dense on 128 held-out prompts of each student carried back (runs/carry/s17/rcm_*.safetensors),
#       session 14's student first as the anchor. Not run: the device time was spent; this CPU graded them instead.
source "$(dirname "$0")/prelude.sh" "$1"
INIT=runs/carry/s14/rcm.safetensors
case "$1" in
n1) fresh runs/s17
    rcm_kept "$INIT" "${EVERY:-200}" --init "$INIT" --tangent-warmup 0 --no-dmd --lr "${LR:-2e-6}" \
      --batch "${BATCH:-16}" ;;
p1) for sigma in ${SIGMAS:-80 200 20 1000}; do
      for mode in ${MODES:-sde ode}; do
        if [ "$(left)" -lt 75 ]; then echo "time: stopped before $mode $sigma"; break 2; fi
        release_eval "sampler_${mode}_$sigma.json" --configs turbo --start 1000 --count "${COUNT:-256}" \
          --sigma-max "$sigma" $([ $mode = ode ] && echo --ode) | sed -n 2p | sed "s|^|$mode sigma_max=$sigma: |" \
          | tee -a "$OUT/sampler.log"
      done
    done ;;
p2) release_eval "eval_sampler_n${COUNT:-256}.json" --configs teacher,turbo --count "${COUNT:-256}" \
      --sigma-max "$SIGMA" $([ "${ODE:-0}" = 1 ] && echo --ode) ;;
n2) grade_students "$INIT" runs/carry/s17/rcm_*.safetensors ;;
*)  echo "usage: session17.sh p1|p2|n1|n2 (p1: SIGMAS, MODES, COUNT; p2: SIGMA, ODE, COUNT; n1: LR, BATCH, EVERY)"
    exit 2 ;;
esac
