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
candidates() {   # run dir $1 from the shipped files with the session-11 candidates in place of teacher and student
  rm -rf "$1" && python3 docs/training/mini/device/assemble.py "$1" && mkdir -p "$1/sla"
  cp docs/training/mini/candidates/teacher_round6_session11.safetensors "$1/teacher/final.safetensors"
  cp docs/training/mini/candidates/student_round6_session11.safetensors "$1/sla/final.safetensors"
}
case "$1" in
h1) candidates runs/ship12
    $T ship --run-dir runs/ship12 --output turbovid/assets/mini --topk 0.5
    python3 -m turbovid.cli eval --count "${COUNT:-128}" --device cuda \
      --out "$OUT/eval_mini_h100_2026-11-23_candidates.json" 2> "$OUT/eval_progress.log" | tee "$OUT/eval.log"
    ;;
h2) python3 docs/training/mini/device/jvp_sla_smoke.py
    S=runs/session12r && rm -rf $S && python3 docs/training/mini/device/assemble.py $S
    $T rcm --run-dir $S --init turbovid/assets/mini/dit.safetensors --sla-student --topk 0.5 --steps 1400 \
       --tangent-warmup 700 --fit-minutes "$(minutes_left 60)" --max-minutes "$(minutes_left 40)" > "$OUT/rcm.log" 2>&1 \
       || echo "rcm exit $?"
    tail -1 "$OUT/rcm.log"
    mkdir -p "$OUT/rcm" && cp $S/rcm/final.safetensors $S/rcm/log.jsonl "$OUT/rcm/" || true
    ;;
h3) S=runs/session12e && rm -rf $S && python3 docs/training/mini/device/assemble.py $S
    for job in "runs/carry/rcm12/final.safetensors sagesla" "runs/carry/rcm12/final.safetensors dense" \
               "turbovid/assets/mini/dit.safetensors dense"; do
      set -- $job
      $T eval --run-dir $S --count 128 --dit "$1" --attention "$2" --sampler rcm --topk 0.5 \
         2>&1 | tail -2 | head -1 | sed "s|^|$1 $2: |" | tee -a "$OUT/eval.log"
      cp $S/eval/*.json "$OUT/" 2>/dev/null || true
    done
    ;;
h4) S=runs/session12e && rm -rf $S && python3 docs/training/mini/device/assemble.py $S
    for topk in 0.75 1.0; do
      $T eval --run-dir $S --count 128 --dit turbovid/assets/mini/dit.safetensors --attention sagesla --sampler rcm \
         --topk $topk 2>&1 | tail -2 | head -1 | sed "s|^|top-k $topk sagesla: |" | tee -a "$OUT/eval.log"
      mv $S/eval/dit_sagesla_rcm4_heldout.json "$OUT/dit_sagesla_topk${topk}_rcm4_heldout.json" 2>/dev/null || true
    done
    ;;
h5) python3 -m turbovid.cli eval --count 128 --device cuda --topk 0.75 \
      --configs student_sla,student_sagesla,student_sagesla_w8a8,turbo \
      --out "$OUT/eval_mini_h100_2026-11-23_topk075.json" 2> "$OUT/eval_progress.log" | tee "$OUT/eval.log"
    ;;
h6) python3 -m turbovid.cli eval --count 128 --device cuda --out "$OUT/eval_mini_h100_2026-11-23_run3.json" \
      2> "$OUT/eval_progress.log" | tee "$OUT/eval.log"
    ;;
h7) S=runs/session12g && rm -rf $S && python3 docs/training/mini/device/assemble.py $S
    for g in 5 6 4 7; do
      $T eval --run-dir $S --count 128 --split train --dit turbovid/assets/mini/dit_teacher.safetensors \
         --attention dense --sampler teacher --guidance $g 2>&1 | tail -2 | head -1 | sed "s|^|guidance $g: |" \
         | tee -a "$OUT/eval.log"
      cp $S/eval/*.json "$OUT/" 2>/dev/null || true
    done
    ;;
h8) S=runs/session12g && rm -rf $S && python3 docs/training/mini/device/assemble.py $S
    for job in "3 train" "4 heldout" "5 heldout"; do
      set -- $job
      $T eval --run-dir $S --count 128 --split $2 --dit turbovid/assets/mini/dit_teacher.safetensors \
         --attention dense --sampler teacher --guidance $1 2>&1 | tail -2 | head -1 | sed "s|^|guidance $1 $2: |" \
         | tee -a "$OUT/eval.log"
      cp $S/eval/*.json "$OUT/" 2>/dev/null || true
    done
    ;;
*)  echo "usage: session12.sh h1|h2|h3|h4|h5|h6|h7|h8"; exit 2 ;;
esac
