#!/usr/bin/env bash
# Prepared in session 13 for the next device session (not run yet: session 13's machine loans paused after i4).
# One H100: `bash session14.sh j1`, then j2, j3, j4 back to back on the warm machine (run dirs share runs/pool).
# The question: where does the students' colour drift come from? Every student row of session 13's release misses
# the colour of the same 8-10 of 128 held-out clips, all crosses, most large: frame 0 has the asked hue, later
# frames turn 15-70 degrees further round the hue circle by frame 32 (blue -> purple, red -> orange, cyan -> blue).
# The teacher drifts the same way, less, and more at a higher CFG; in 7 of 8 clips the student drifts as far as the
# teacher at CFG 8 or further
# (docs/training/mini/session13_checks/colour_drift_cpu.json). rCM distils v_u + 6 (v_c - v_u) (TurboDiffusion's
# teacher_guidance 5) against the teacher's sampling CFG of 5, and its DMD term is mode-seeking; the two commands
# below separate those (session 13 i2, CFG 6 with DMD: dense 0.820, colour 0.914).
#   j1: rCM (743 steps) from the shipped teacher at --guidance 5 (new flag), pool encode included; `train eval`
#       dense on 128 held-out prompts.
#   j2: rCM at the recipe's CFG 6 without DMD: --steps 500 ends the schedule where DMD would start (the tangent
#       warm-up is 500 steps), so this is the shipped run's sCM part alone (pool cached).
#   j3: L=g5|g6_scm (the better of j1 / j2): the SLA fine-tune (top-k 0.5) of that student (carried to
#       runs/carry/s14/rcm.safetensors if the machine is new), then `train ship` (the teacher unchanged; config.json's
#       stage counts come from the weights' histories, which assemble.py seeds from the release's config.json), the
#       student's files and config.json to $OUT/assets.
#   j4: `turbovid eval` of the release in the working tree (j3's files committed first), 128 held-out prompts.
# As run (session 14; each command got a new H200, so j1 and j2 each encoded the pool): j1 dense 0.844 (colour 0.93,
# drift 7.7 deg), j2 0.852 (colour 0.97, drift 6.2 deg): L=g6_scm. j3 and j4 were merged from the prepared j3 / j4
# (SLA check dropped, ship moved into j3) to fit the device time left.
source "$(dirname "$0")/prelude.sh" "$1"
rcm_at() {   # rcm_at LABEL ARGS...: rCM in runs/s14_LABEL with ARGS, its dense check, its weights to $OUT/rcm_LABEL
  local label=$1; shift
  fresh runs/s14_$label && rm -rf "$S/eval"
  stage rcm rcm_$label "$@" --max-minutes "$(minutes_left 90)"
  check "rcm $label dense" --count 128 --dit $S/rcm/final.safetensors --attention dense --sampler rcm
}
case "$1" in
j1) rcm_at g5 --guidance 5 ;;
j2) rcm_at g6_scm --steps 500 ;;
j3) S=runs/s14_${L:?set L=g5 or L=g6_scm, the student j1 / j2 graded higher}
    if [ ! -f $S/rcm/final.safetensors ]; then   # a new machine: the student from runs/carry (carry it)
      fresh $S && mkdir -p $S/rcm && cp runs/carry/s14/rcm.safetensors $S/rcm/final.safetensors
    fi
    rm -rf $S/sla $S/eval
    tune_sla 110 90   # the ship below needs about a minute; the release's grade is j4's turbovid eval
    rm -f "$OUT/sla/final.safetensors"   # the release's dit.safetensors is its bf16 copy
    $T ship --run-dir $S --output turbovid/assets/mini --topk 0.75
    mkdir -p "$OUT/assets" && cp turbovid/assets/mini/dit{,_int8}.safetensors turbovid/assets/mini/config.json "$OUT/assets/"
    ;;
j4) release_eval eval_mini_h200_$(date +%F).json --count 128 ${CONFIGS:+--configs $CONFIGS} ;;   # j3's release, committed
*)  echo "usage: session14.sh j1|j2|j3|j4 (j3: L=g5|g6_scm; j4: CONFIGS=a,b,... to grade some rows only)"; exit 2 ;;
esac
