#!/usr/bin/env bash
# Session 12 (one H100): `bash session12.sh h1`.
#   h1: ship session 11's two candidates (teacher round 6 and its rCM student SLA-tuned at top-k 0.5, both in
#       docs/training/mini/candidates/) into turbovid/assets/mini on the device (`train ship`), then `turbovid eval`
#       of every configuration on 128 held-out prompts. The JSON is rewritten after each configuration.
#       (Shipped afterwards; candidates/ was then removed, the same tensors as turbovid/assets/mini: to re-run h1,
#       `git checkout 9495406 -- docs/training/mini/candidates`.)
#   h2: (the candidates now ship in the working tree) rCM with the SLA student (new: --sla-student, top-k 0.5): the
#       shipped SLA student distils again from the shipped teacher (--init), sCM for 700 steps, then DMD; the
#       schedule fitted to the command (pool encode included); weights to $OUT.
#   h3: `train eval`, 128 held-out prompts: h2's student (carried to runs/carry/rcm12) with SageSLA and dense, and
#       the shipped student dense (its SageSLA on the same prompts: 0.797, session 11 g6).
#       (h2's student: SageSLA 0.688, dense 0.664, colour 0.79 / 0.77; the shipped student dense 0.820. Not shipped.)
#   h4: `train eval`, 128 held-out prompts: the shipped student with SageSLA at top-k 0.75 and 1.0 (tuned at 0.5).
#       (0.828 at both, against 0.797 at 0.5 and 0.820 dense.)
#   h5: `turbovid eval --topk 0.75` (new flag) of the SLA configurations, 128 held-out prompts.
#       (SLA 0.836, SageSLA / W8A8 / full stack 0.859 against h1's teacher 0.867: SLA runs at 0.75 by default since.)
#   h6: `turbovid eval` of the release as committed (every configuration, its default top-k 0.75), 128 prompts.
#   h7: the shipped teacher's CFG scale, chosen on training prompts (not the held-out ones every eval reports):
#       `train eval --split train`, 128 prompts, 50 steps, guidance 4 / 5 / 6 / 7 (rCM distils toward 6).
#       (0.906 / 0.875 / 0.844 / 0.844.)
#   h8: guidance 3 on the same training prompts, then guidance 4 and 5 on 128 held-out prompts (`train eval`).
#       (train 0.859 at 3; held-out 0.883 at 4, 0.891 at 5: no gain on held-out prompts, CFG 5 stays.)
source "$(dirname "$0")/prelude.sh" "$1"
candidates() {   # S: a run dir from the shipped files with the session-11 candidates as teacher and student
  fresh "$1" && mkdir -p "$S/sla"
  cp docs/training/mini/candidates/teacher_round6_session11.safetensors "$S/teacher/final.safetensors"
  cp docs/training/mini/candidates/student_round6_session11.safetensors "$S/sla/final.safetensors"
}
case "$1" in
h1) candidates runs/ship12
    $T ship --run-dir $S --output turbovid/assets/mini --topk 0.5
    release_eval eval_mini_h100_2026-11-23_candidates.json --count "${COUNT:-128}"
    ;;
h2) python3 docs/training/mini/device/jvp_sla_smoke.py
    fresh runs/session12r
    stage rcm rcm --init turbovid/assets/mini/dit.safetensors --sla-student --topk 0.5 --steps 1400 \
       --tangent-warmup 700 --fit-minutes "$(minutes_left 60)" --max-minutes "$(minutes_left 40)"
    ;;
h3) fresh runs/session12e
    for job in "runs/carry/rcm12/final.safetensors sagesla" "runs/carry/rcm12/final.safetensors dense" \
               "turbovid/assets/mini/dit.safetensors dense"; do
      set -- $job
      check "$1 $2" --count 128 --dit "$1" --attention "$2" --sampler rcm --topk 0.5
    done
    ;;
h4) fresh runs/session12e
    for topk in 0.75 1.0; do   # both write dit_sagesla_rcm4_heldout.json: renamed after each
      check "top-k $topk sagesla" --count 128 --dit turbovid/assets/mini/dit.safetensors --attention sagesla \
         --sampler rcm --topk $topk
      mv "$OUT/dit_sagesla_rcm4_heldout.json" "$OUT/dit_sagesla_topk${topk}_rcm4_heldout.json" 2>/dev/null || true
    done
    ;;
h5) release_eval eval_mini_h100_2026-11-23_topk075.json --count 128 --topk 0.75 \
      --configs student_sla,student_sagesla,student_sagesla_w8a8,turbo
    ;;
h6) release_eval eval_mini_h100_2026-11-23_run3.json --count 128 ;;
h7) fresh runs/session12g
    for g in 5 6 4 7; do
      check "guidance $g" --count 128 --split train --dit turbovid/assets/mini/dit_teacher.safetensors \
         --attention dense --sampler teacher --guidance $g
    done
    ;;
h8) fresh runs/session12g
    for job in "3 train" "4 heldout" "5 heldout"; do
      set -- $job
      check "guidance $1 $2" --count 128 --split $2 --dit turbovid/assets/mini/dit_teacher.safetensors \
         --attention dense --sampler teacher --guidance $1
    done
    ;;
*)  echo "usage: session12.sh h1|h2|h3|h4|h5|h6|h7|h8"; exit 2 ;;
esac
