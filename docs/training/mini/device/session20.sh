#!/usr/bin/env bash
# Session 20's device script. One GPU; each group starts from the files as committed (turbovid/assets/mini = the
# release, session 14's student).
#   q1: session 19's p2 student (`train ode --on-policy --on-policy-step 2`, fp32, carried as
#       ${FILE:-runs/carry/s20/p2_final.safetensors}) beside the release and its teacher, one run: the release's
#       teacher and full stack on the reported prompts 0..255 (`turbovid eval`, the reported seeds), then p2's full
#       stack (ship_file) on the same prompts; time allowing, both full stacks on a second validation set 2000..2255.
#   q2: the ode stage on policy with the teacher completing the second sampler call's state (`--on-policy-step 1`,
#       s = 0.93): session 19's hybrid check graded the student run for one step and finished by the teacher as the
#       teacher (0.906 each), two steps 0.875, so the second call is where the student first falls behind; its
#       schedule fitted to the command minus 260 s; that student shipped and its full stack graded on the validation
#       prompts 1000..1255 (release 217, p2 225), then, time allowing, the reported 0..255.
source "$(dirname "$0")/prelude.sh" "$1"
S=runs/s20
case "$1" in
q1) rm -rf runs/release && cp -r turbovid/assets/mini runs/release
    release_eval release_teacher_turbo_start0_n256.json --configs teacher,turbo --count 256
    ship_file "${FILE:-runs/carry/s20/p2_final.safetensors}"
    turbo_eval p2_turbo_start0 0
    if [ "$(left)" -gt 240 ]; then
      turbo_eval p2_turbo_start2000 2000
      rm -rf turbovid/assets/mini && cp -r runs/release turbovid/assets/mini && turbo_eval release_turbo_start2000 2000
    fi ;;
q2) fresh "$S"
    stage ode ode --on-policy --on-policy-step 1 --steps 100000 --fit-minutes "$(minutes_left 260)" \
      --max-minutes "$(minutes_left 200)"
    ship_file "$S/ode/final.safetensors"
    turbo_eval val_on_policy1 1000
    if [ "$(left)" -gt 110 ]; then turbo_eval reported_on_policy1 0; fi ;;
*)  echo "usage: session20.sh q1|q2 (q1: FILE)"
    exit 2 ;;
esac
