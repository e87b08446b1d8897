#!/usr/bin/env bash
# Session 13 (one H100): `bash session13.sh i1`. i1-i3 share the run directory runs/s13 and the latent pool
# (prelude `fresh`), so they run back to back on one warm machine; i2 / i3 rebuild what a new machine lacks from
# the files an earlier command returned (carried to runs/carry/s13).
#   i1: teacher round 7 from the shipped round 6 with the size-independent object weight (new: --fg-share 0.5,
#       the object's cells carry half of each sample's loss; round 6's --fg-weight 4 gave a small object 27%),
#       fitted to the command (pool encode included); weights to $OUT.
#   i2: `train eval`, 128 held-out prompts, 50 steps + CFG 5: round 7 (the shipped round 6 read 0.891 with the
#       same code and prompts, session 12 h8). rCM (the recipe's 743 steps) from round 7 if it reads more than
#       0.891, else from the shipped round 6; the student dense on the same prompts.
#   i3: the SLA fine-tune (top-k 0.5) of i2's student, fitted; SageSLA at top-k 0.75 on the same prompts; then
#       `train ship` of i2's teacher and this student into turbovid/assets/mini; the release's files to $OUT.
#   i4: on i3's machine, ship again and return what i3's $OUT left out; `turbovid eval` of that release, 128 prompts.
source "$(dirname "$0")/prelude.sh" "$1"
C=runs/carry/s13
reuse() {   # S=runs/s13, from this machine's earlier command or rebuilt from the carried files
  S=runs/s13
  if [ ! -f $S/teacher/final.safetensors ]; then
    echo "runs/s13 missing: rebuilt from $C"; fresh runs/s13 && mkdir -p $S/rcm
    cp $C/teacher.safetensors $S/teacher/final.safetensors
    [ -f $C/rcm.safetensors ] && cp $C/rcm.safetensors $S/rcm/final.safetensors
  fi
}
case "$1" in
i1) fresh runs/s13 && rm -rf $S/teacher
    stage teacher teacher_r7 --init $S/init/teacher.safetensors --fg-share 0.5 --lr 1e-4 --steps 200000 --compile \
       --fit-minutes "$(minutes_left 60)" --max-minutes "$(minutes_left 40)"
    ;;
i2) reuse
    check "round 7 teacher" --count 128 --dit $S/teacher/final.safetensors --attention dense --sampler teacher
    score=$(tail -1 "$OUT/eval.log" | sed -n 's/.*adherence \([0-9.]*\):.*/\1/p')
    if python3 -c "import sys; sys.exit(0 if float('${score:-0}') > 0.891 else 1)"; then
      echo "rCM from round 7 ($score)"
    else
      echo "rCM from the shipped round 6 (round 7: $score)"; cp $S/init/teacher.safetensors $S/teacher/final.safetensors
    fi
    cp $S/teacher/final.safetensors "$OUT/teacher.safetensors"
    rm -rf $S/rcm && stage rcm rcm --max-minutes "$(minutes_left 90)"
    check "rcm dense" --count 128 --dit $S/rcm/final.safetensors --attention dense --sampler rcm
    ;;
i3) reuse && rm -rf $S/sla
    tune_sla
    check "sla sagesla 0.75" --count 128 --dit $S/sla/final.safetensors --attention sagesla --sampler rcm --topk 0.75
    $T ship --run-dir $S --output turbovid/assets/mini --topk 0.75
    mkdir -p "$OUT/assets" && cp turbovid/assets/mini/dit*.safetensors turbovid/assets/mini/config.json "$OUT/assets/"
    ;;
i4) S=runs/s13   # on i3's machine: ship again (i3's $OUT held more than 8 files: dit_teacher and the SLA log were
    # left out), both to $OUT, then `turbovid eval` of that release, 128 held-out prompts
    $T ship --run-dir $S --output turbovid/assets/mini --topk 0.75
    mkdir -p "$OUT/r" && cp turbovid/assets/mini/dit_teacher.safetensors $S/sla/log.jsonl "$OUT/r/"
    release_eval eval_mini_h100_2026-11-23_run4.json --count 128 ;;
*)  echo "usage: session13.sh i1|i2|i3|i4"; exit 2 ;;
esac
