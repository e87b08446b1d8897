#!/usr/bin/env bash
# Session 11 (one H100): `bash session11.sh g1`. (Written with prelude.sh's helpers since session 12; the commands
# they run are unchanged.)
#   g1: `turbovid eval` of the shipped mini model on the GPU, every configuration, 128 held-out prompts, graded by
#       detector version 2 (rounded templates). The JSON is rewritten after each configuration, so a cut-off run
#       still returns the rows it finished.
#   g2: (after g1: SLA 0.74 / SageSLA 0.76 against the dense student's 0.82) the SLA fine-tune continued from the
#       shipped student at top-k 0.5 (its own dense output is the frozen target), fitted to the command; weights to
#       $OUT first, then SageSLA and dense checks on the same 128 prompts (`turbovid train eval`).
#       (Loss 0.016 -> 0.011, SageSLA 0.742: no gain; the dense check ran out of the command's time. Not shipped.)
#   g3: a teacher round from the shipped teacher (round 5) with --fg-weight 4, fitted to the command (pool encode
#       included); weights to $OUT.
#   g4: 96 held-out prompts, 50 steps + CFG: g3's teacher (carried to runs/carry/teacher_fg3) and the shipped one.
#       (Round 6 0.906, shipped round 5 0.885; round 6 kept in docs/training/mini/candidates/, bf16.)
#   g5: rCM from the round-6 candidate, fitted to the command (pool encode included); weights to $OUT.
#   g6: the SLA fine-tune (top-k 0.5) of g5's rCM student (carried to runs/carry/rcm6), fitted; weights to $OUT;
#       then SageSLA on 128 held-out prompts. (0.797; kept in docs/training/mini/candidates/, bf16.)
source "$(dirname "$0")/prelude.sh" "$1"
case "$1" in
g1) release_eval eval_mini_h100_2026-11-23.json --count "${COUNT:-128}" ;;
g2) fresh runs/session11 && mkdir -p $S/rcm
    cp turbovid/assets/mini/dit.safetensors $S/rcm/final.safetensors
    tune_sla 230 150
    for attention in sagesla dense; do
      check $attention --count 128 --dit $S/sla/final.safetensors --attention $attention --sampler rcm --topk 0.5
    done
    ;;
g3) fresh runs/session11t && rm -rf $S/teacher
    stage teacher teacher_fg3 --init $S/init/teacher.safetensors --fg-weight 4 --lr 1e-4 --steps 200000 --compile \
       --fit-minutes "$(minutes_left 60)" --max-minutes "$(minutes_left 40)"
    ;;
g4) fresh runs/session11e
    for dit in runs/carry/teacher_fg3/final.safetensors turbovid/assets/mini/dit_teacher.safetensors; do
      check $dit --count 96 --dit $dit --attention dense --sampler teacher
    done
    ;;
g5) fresh runs/session11s
    cp docs/training/mini/candidates/teacher_round6_session11.safetensors $S/teacher/final.safetensors
    stage rcm rcm --fit-minutes "$(minutes_left 60)" --max-minutes "$(minutes_left 40)"
    ;;
g6) fresh runs/session11k && mkdir -p $S/rcm
    cp docs/training/mini/candidates/teacher_round6_session11.safetensors $S/teacher/final.safetensors
    cp runs/carry/rcm6/final.safetensors $S/rcm/final.safetensors
    tune_sla
    check "sla sagesla" --count 128 --dit $S/sla/final.safetensors --attention sagesla --sampler rcm --topk 0.5
    ;;
*)  echo "usage: session11.sh g1|g2|g3|g4|g5|g6"; exit 2 ;;
esac
