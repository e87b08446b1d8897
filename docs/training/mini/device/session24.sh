#!/usr/bin/env bash
# Session 24's device script. One GPU; the files as committed (turbovid/assets/mini = session 21's release).
# The question: does a distribution-level loss at the sampler's last call (new: `train ode --adv-weight W`, a
# discriminator on frozen-teacher features, train/adversarial.py) win back the clips that the regression there blurs?
#   a1: three ode runs side by side on the one GPU, each from the release's student (bf16 as shipped), on policy at the
#       last call (`--on-policy-step -1`, s = 0.61), its rows anchored to the start student's own outputs, plus the
#       adversarial term at the weights in WEIGHTS (default 0.01 0.03 0.1), fitted to the command minus 150 s. Their
#       students (bf16) and logs to $OUT.
#   a2: on the still-warm machine (or with the bf16 students carried in runs/carry/s24), each student shipped
#       (ship_file) and its full stack graded on the validation prompts 1000..1255 (the release: 225 and 224 in session
#       21, the teacher 233).
#   a3: the student named FILE on the held-out sets in SETS (default 0 2000 3000) while 200 s are left.
source "$(dirname "$0")/prelude.sh" "$1"
WEIGHTS=${WEIGHTS:-0.01 0.03 0.1}
student() {    # the bf16 student of weight $1: a1's run on this machine, else the carried copy
  local f=runs/s24_w$1/ode/final.safetensors
  [ -f "$f" ] && echo "$f" || echo "runs/carry/s24/s24_w$1_bf16.safetensors"
}
case "$1" in
a1) for w in $WEIGHTS; do
      fresh "runs/s24_w$w"
      $T ode --run-dir "runs/s24_w$w" --on-policy --on-policy-step -1 --adv-weight "$w" --steps 100000 \
        --fit-minutes "$(minutes_left 150)" --max-minutes "$(minutes_left 100)" > "$OUT/s24_w$w.log" 2>&1 &
    done
    wait
    for w in $WEIGHTS; do
      tail -2 "$OUT/s24_w$w.log"
      export_weights "runs/s24_w$w/ode/final.safetensors" "$OUT/s24_w${w}_bf16.safetensors" 1 \
        "runs/s24_w$w/ode/final.safetensors" || echo "w$w: no final weights"
      cp "runs/s24_w$w/ode/log.jsonl" "$OUT/s24_w${w}_log.jsonl" || true
    done ;;
a2) keep_release
    for w in $WEIGHTS; do
      if [ "$(left)" -gt 150 ]; then ship_file "$(student "$w")" && turbo_eval "w${w}_turbo_start1000" 1000; fi
    done
    restore_release ;;
a3) keep_release
    ship_file "$FILE"
    for start in ${SETS:-0 2000 3000}; do
      if [ "$(left)" -gt 200 ]; then turbo_eval "$(basename "$FILE" .safetensors)_turbo_start$start" "$start"; fi
    done
    restore_release ;;
*)  echo "usage: session24.sh a1 | a2 | a3"
    exit 2 ;;
esac
