#!/usr/bin/env bash
# Session 15, one GPU: the quantization-aware fine-tune (the recipe's new qat stage) of the shipped SLA-tuned student.
# The question: every release so far lost 1-4 of 128 held-out clips from SLA (level with the teacher) to SageSLA and
# W8A8 (session 14: H200 SLA 0.906 -> SageSLA 0.883 -> full stack 0.875; CPU 0.906 -> 0.898 -> 0.891). The qat stage
# trains the student on the sla stage's terms plus its output run with SageSLA's Q/K/V rounding (at the GPU's SageSLA
# block sizes: 64 x 128 on sm90, where SLA uses 128 x 64) and W8A8 linears, straight-through.
#   k1: a run directory from the release (assemble.py), the sCM-only rCM student of session 14 (carry
#       runs/carry/s14/rcm.safetensors) as rcm/, the shipped dit.safetensors (the SLA-tuned student) as sla/; the qat
#       stage fitted to the command's time; `train ship` (recipe.ship_student = qat), the new files to $OUT/assets.
#   k2: `turbovid eval` of the release in the working tree (k1's files committed first), every row, 128 held-out
#       prompts: the teacher beside the students in one run.
# As run: k1 fitted the qat stage to 909 steps (2.2 steps/s, H100) and shipped its student (recipe.ship_student was
# "qat" then, commit e706908); k2 (H100) teacher 0.898, dense 0.883, SLA 0.891, SageSLA 0.883, W8A8 0.875, full
# stack 0.875. Then k2 with COUNT=256 CONFIGS=teacher,student_sla,turbo (the same seeds for the first 128 prompts, and
# 128 more, to see how much of the 3-clip gap is the sample): teacher 0.906, SLA 0.855, full stack 0.863. The CPU graded
# the qat release's full stack 0.875 against session 14's 0.891 on the same prompts and seeds, so the release went
# back to session 14's student and the recipe ships "sla" again (docs/training/mini/README.md).
source "$(dirname "$0")/prelude.sh" "$1"
case "$1" in
k1) fresh runs/s15
    mkdir -p $S/rcm $S/sla
    cp runs/carry/s14/rcm.safetensors $S/rcm/final.safetensors
    cp turbovid/assets/mini/dit.safetensors $S/sla/final.safetensors
    stage qat qat --steps 100000 --fit-minutes "$(minutes_left ${FIT:-110})" --max-minutes "$(minutes_left ${STOP:-80})"
    rm -f "$OUT/qat/final.safetensors"   # the release's dit.safetensors is its bf16 copy
    ship_release
    ;;
k2) release_eval_gpu ;;
*)  echo "usage: session15.sh k1|k2 (k1: FIT / STOP reserves in seconds; k2: CONFIGS=a,b,... to grade some rows,"
    echo "COUNT=n held-out prompts instead of 128)"
    exit 2 ;;
esac
