#!/usr/bin/env bash
# Prepared in session 15 for the next device session (not run yet). One GPU; each command may get a new machine.
# The question: session 15 measured the full stack 11 of 256 held-out clips (4.3 points) under the teacher and level
# with SLA, so the gap is the 4-step student's: shapes (10 of the 21 clips only the student misses), colours (7),
# directions (5), mostly crosses and diamonds. Teacher round 7 gained shape accuracy (0.92 -> 0.95) when the object's
# latent cells carried half of each sample's loss (--fg-share 0.5); rCM's sCM loss has the same option now.
#   m1: rCM (sCM alone, 500 steps, as the recipe) from the shipped teacher with --fg-share 0.5, pool encode included;
#       `train eval` dense on 128 held-out prompts (session 14 j2 without the weighting: 0.852, colour 0.97); the
#       student to $OUT/rcm_fg (carry it to runs/carry/s16/rcm.safetensors for m2 if m1 reads higher).
#   m2: the recipe's SLA fine-tune (top-k 0.5) of that student (from runs/carry/s16 on a new machine), `train ship`,
#       the release's files to $OUT/assets.
#   m3: `turbovid eval` of the release in the working tree (m2's files committed first), every row, 128 prompts
#       (COUNT=256 CONFIGS=teacher,student_sla,turbo for the larger sample, as session15.sh k2).
source "$(dirname "$0")/prelude.sh" "$1"
case "$1" in
m1) fresh runs/s16_fg && rm -rf "$S/eval"
    stage rcm rcm_fg --fg-share 0.5 --max-minutes "$(minutes_left 90)"
    check "rcm fg_share 0.5 dense" --count 128 --dit $S/rcm/final.safetensors --attention dense --sampler rcm ;;
m2) S=runs/s16_fg
    if [ ! -f $S/rcm/final.safetensors ]; then   # a new machine: the student from runs/carry (carry it)
      fresh $S && mkdir -p $S/rcm && cp runs/carry/s16/rcm.safetensors $S/rcm/final.safetensors
    fi
    rm -rf $S/sla $S/eval
    tune_sla 110 90
    rm -f "$OUT/sla/final.safetensors"   # the release's dit.safetensors is its bf16 copy
    ship_release
    ;;
m3) release_eval_gpu ;;
*)  echo "usage: session16.sh m1|m2|m3 (m3: CONFIGS=a,b,... to grade some rows, COUNT=n prompts instead of 128)"
    exit 2 ;;
esac
