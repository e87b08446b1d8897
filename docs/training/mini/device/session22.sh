#!/usr/bin/env bash
# Session 22's device script. One GPU; the files as committed (turbovid/assets/mini = session 21's release: the ode
# stage's two on-policy rounds, the teacher completing the second, then the third sampler call).
# The question: does weighing the object in the ode stage's loss (new: `train ode --fg-share`, the object read off
# each target, data.latent_object_estimate) keep the small shapes that plain MSE blurs?
#   c1: two ode runs side by side on the one GPU, each from the release's student (bf16 as shipped), object share 0.5,
#       fitted to the command minus 150 s: A at the last call (`--on-policy-step 3`, s = 0.61: session 21's r5 ran it
#       unweighted and blurred shapes), B a third round at the third call (`--on-policy-step 2`, s = 0.85, what the
#       release's round 2 ran unweighted). Their students (bf16) to $OUT.
#   c2: on the still-warm machine, each student shipped (ship_file) and its full stack graded on the validation prompts
#       1000..1255 (the release: 225 and 224 in session 21), then A's and B's on the reported 0..255 (228) as time
#       allows (as run: the two validation grades took 439 s, none was left). FILE_A / FILE_B name the students
#       (default c1's runs; carried bf16 copies on a new machine).
#   h1: (run before c3) the release's student for its first 2 or 3 calls, the teacher's sampler on from there
#       (session19_checks/hybrid.py), dense attention, held-out prompts 0..191: does its last call, or an earlier
#       one, lose the clips? (As run: the first attempt, all five variants on 512 prompts, ran out of the command's
#       time in the CPU detector and returned nothing.)
#   c3: the student named FILE (default A's) on the held-out sets in SETS (default 2000 3000) while 200 s are left;
#       as run: B's (FILE=runs/carry/s22/s22b_final_bf16.safetensors, carried) with SETS="0 3000".
source "$(dirname "$0")/prelude.sh" "$1"
FILE_A=${FILE_A:-runs/s22a/ode/final.safetensors}
FILE_B=${FILE_B:-runs/s22b/ode/final.safetensors}
# `weighted DIR STEP`: in the background, `train ode` on policy at call STEP with object share 0.5 from the release's
# student in a fresh run directory DIR, fitted to the command minus 150 s; its output to $OUT/<DIR's name>.log.
weighted() {
  local name
  name=$(basename "$1")
  fresh "$1"
  $T ode --run-dir "$1" --on-policy --on-policy-step "$2" --fg-share 0.5 --steps 100000 \
    --fit-minutes "$(minutes_left 150)" --max-minutes "$(minutes_left 100)" > "$OUT/$name.log" 2>&1 &
}
case "$1" in
c1) weighted runs/s22a 3
    weighted runs/s22b 2
    wait
    for d in s22a s22b; do
      tail -2 "$OUT/$d.log"
      export_weights "runs/$d/ode/final.safetensors" "$OUT/${d}_final_bf16.safetensors" 1 \
        "runs/$d/ode/final.safetensors" || echo "$d: no final weights"
      cp "runs/$d/ode/log.jsonl" "$OUT/${d}_log.jsonl" || true
    done ;;
c2) keep_release
    ship_file "$FILE_A" && turbo_eval a_turbo_start1000 1000
    ship_file "$FILE_B" && turbo_eval b_turbo_start1000 1000
    if [ "$(left)" -gt 150 ]; then ship_file "$FILE_A" && turbo_eval a_turbo_start0 0; fi
    if [ "$(left)" -gt 150 ]; then ship_file "$FILE_B" && turbo_eval b_turbo_start0 0; fi
    restore_release ;;
c3) FILE=${FILE:-$FILE_A}
    keep_release
    ship_file "$FILE"
    for start in ${SETS:-2000 3000}; do
      if [ "$(left)" -gt 200 ]; then turbo_eval "$(basename "$FILE" .safetensors)_turbo_start$start" "$start"; fi
    done
    restore_release ;;
h1) python3 docs/training/mini/device/assemble.py runs/h
    timeout "$(left)" python3 docs/training/mini/session19_checks/hybrid.py runs/h --count 192 --start 0 \
      --variants student,hybrid_2,hybrid_3 --out "$OUT/hybrid_release_h100_n192.json" 2>&1 | tail -5 ;;
*)  echo "usage: session22.sh c1 | c2 | h1 | c3"
    exit 2 ;;
esac
