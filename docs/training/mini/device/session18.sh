#!/usr/bin/env bash
# Prepared in session 17 for the next device session (not run yet). One GPU; each command may get a new machine.
# The question: does the sCM student gain from more steps at a partial tangent? The shipped student is the EMA of
# 500 sCM steps whose tangent weight r ramps 0 -> 1 over those steps (tangent warm-up 500). Every run past r = 1 lost
# clips (`train eval` dense, 128 held-out prompts, CPU): session 16 at lr 2e-5, 0.852 -> 0.750 by step 864; session 17
# continued the shipped student at lr 5e-6, 0.836 -> 0.805 by 1098 more steps. Here r rises four times slower.
#   q1: rCM (sCM alone, --no-dmd) from the shipped teacher with tangent warm-up ${WARMUP:-2000}, the recipe's lr and
#       batch, pool encode included; the EMA student every ${EVERY:-250} steps to $OUT/rcm_<step>.safetensors until
#       the command's time ends (step 500: r = 0.25; step 1000: 0.5). About 1100 steps on an H100, 2000 on an H200.
#   q2: `train eval` dense on 128 held-out prompts of session 14's student (the anchor: 0.852 on the H200, 0.836 on
#       the CPU) and of each student carried back as runs/carry/s18/rcm_*.safetensors. Or on the CPU, 15 min each:
#       PYTHONPATH=. python3 -m turbovid.cli train eval --run-dir RUN --count 128 --dit FILE --attention dense
#       --sampler rcm (RUN from assemble.py).
#   Then, for a student that reads higher: session16.sh m2 (SLA fine-tune + ship; carry it as
#   runs/carry/s16/rcm.safetensors) and m3 (the release's grade, teacher beside it; COUNT=256).
source "$(dirname "$0")/prelude.sh" "$1"
case "$1" in
q1) fresh runs/s18
    rcm_kept "$S/teacher/final.safetensors" "${EVERY:-250}" --no-dmd --tangent-warmup "${WARMUP:-2000}" ;;
q2) grade_students runs/carry/s14/rcm.safetensors runs/carry/s18/rcm_*.safetensors ;;
*)  echo "usage: session18.sh q1|q2 (q1: WARMUP, EVERY)"
    exit 2 ;;
esac
