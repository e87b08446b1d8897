#!/usr/bin/env bash
# Session 24's device script. One GPU; the files as committed (turbovid/assets/mini = session 21's release).
# The question: does a distribution-level loss at the sampler's last call (new: `train ode --adv-weight W`, a
# discriminator on frozen-teacher features, train/adversarial.py) win back the clips that the regression there blurs?
#   a1: three ode runs side by side on the one GPU, each from the release's student (bf16 as shipped), on policy, the
#       adversarial term at one sampler call, that call's rows anchored to the start student's own outputs, fitted to
#       the command minus 150 s. VARIANTS lists CALL:WEIGHT[:HEADS_LR] (default -1:0.01 -1:0.03 -1:0.1: the last call, s = 0.61,
#       at three weights, heads lr 1e-4; as run the second time: 1:0.1:1e-3 2:0.1:1e-3 -1:0.3:1e-3). Their students (bf16)
#       and logs to $OUT (one command returns 8 files: the third run's log.jsonl stays behind; its stdout comes back).
#   a2: on the still-warm machine (or with the bf16 students carried in runs/carry/s24), each of VARIANTS' students shipped
#       (ship_file) and its full stack graded on the validation prompts 1000..1255 (the release: 225 and 224 in session
#       21, the teacher 233).
#   a3: the student named FILE on the held-out sets in SETS (default 0 2000 3000) while 200 s are left; as run:
#       FILE=runs/carry/s24/s24_w0.1_bf16.safetensors (carried).
source "$(dirname "$0")/prelude.sh" "$1"
VARIANTS=${VARIANTS:--1:0.01 -1:0.03 -1:0.1}
name() {       # the run of variant CALL:WEIGHT[:LR]: s24_wWEIGHT at the last call, else s24_kCALL_wWEIGHT, + _dLR
  local k w lr
  IFS=: read -r k w lr <<< "$1"
  echo "s24_$([ "$k" = -1 ] || echo "k${k}_")w$w${lr:+_d$lr}"
}
student() {    # the bf16 student of variant $1: a1's run on this machine, else the carried copy
  local n f
  n=$(name "$1") && f=runs/$n/ode/final.safetensors
  [ -f "$f" ] && echo "$f" || echo "runs/carry/s24/${n}_bf16.safetensors"
}
case "$1" in
a1) for v in $VARIANTS; do
      n=$(name "$v")
      fresh "runs/$n"
      IFS=: read -r k w lr <<< "$v"
      $T ode --run-dir "runs/$n" --on-policy --on-policy-step "$k" --adv-weight "$w" ${lr:+--adv-lr "$lr"} --steps 100000 \
        --fit-minutes "$(minutes_left 150)" --max-minutes "$(minutes_left 100)" > "$OUT/$n.log" 2>&1 &
    done
    wait
    for v in $VARIANTS; do
      n=$(name "$v")
      tail -2 "$OUT/$n.log"
      export_weights "runs/$n/ode/final.safetensors" "$OUT/${n}_bf16.safetensors" 1 "runs/$n/ode/final.safetensors" \
        || echo "$n: no final weights"
      cp "runs/$n/ode/log.jsonl" "$OUT/${n}_log.jsonl" || true
    done ;;
a2) on_validation $(for v in $VARIANTS; do n=$(name "$v"); echo "${n#s24_}=$(student "$v")"; done) ;;
a3) on_sets "$FILE" ${SETS:-0 2000 3000} ;;
*)  echo "usage: session24.sh a1 | a2 | a3"
    exit 2 ;;
esac
