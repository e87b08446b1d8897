#!/usr/bin/env bash
# Session 20's device script. One GPU; each group starts from the files as committed then (turbovid/assets/mini = the
# release of session 14, whose student q2-q4 continue; since q3's student shipped, they would continue that one).
#   q1: session 19's p2 student (`train ode --on-policy --on-policy-step 2`, fp32, carried as
#       ${FILE:-runs/carry/s19/p2_final.safetensors}) beside the release and its teacher, one run: the release's
#       teacher and full stack on the reported prompts 0..255 (`turbovid eval`, the reported seeds), then p2's full
#       stack (ship_file) on the same prompts; time allowing, both full stacks on a second validation set 2000..2255.
#   q2: the ode stage on policy with the teacher completing the second sampler call's state (`--on-policy-step 1`,
#       s = 0.93): session 19's hybrid check graded the student run for one step and finished by the teacher as the
#       teacher (0.906 each), two steps 0.875, so the second call is where the student first falls behind; its
#       schedule fitted to the command minus 260 s; that student shipped and its full stack graded on the validation
#       prompts 1000..1255 (release 217, p2 225), then, time allowing, the reported 0..255.
#   q3: meant as q2 again from q2's student on the machine q2 left warm; as run, `fresh` had already set S to the new
#       directory, the copy failed and q3 repeated q2 from the release's student (416 steps): a second draw of q2.
#   q4: what q3 meant, a second round: q2 from ${FILE:-runs/carry/s20/q3_final.safetensors} (q3's student, carried):
#       its states and the start of its other calls' targets are that student's.
#   q5: ${FILE:-runs/carry/s20/q3_final.safetensors}'s full stack on the reported prompts 0..255, then, time
#       allowing, on the second validation set 2000..2255 beside the release's.
#   q6: the release with ${FILE:-runs/carry/s20/q3_final.safetensors} as its student (ship_file): every row on 128
#       held-out prompts (prelude release_eval_gpu), the teacher in the same run.
source "$(dirname "$0")/prelude.sh" "$1"
S=runs/s20
case "$1" in
q1) release_eval release_teacher_turbo_start0_n256.json --configs teacher,turbo --count 256
    beside_release "${FILE:-runs/carry/s19/p2_final.safetensors}" p2_turbo_start0 p2_turbo_start2000 ;;
q2) fresh "$S"
    on_policy 1 260 200 val_on_policy1 reported_on_policy1 ;;
q3) fresh runs/s20b    # as run in session 20: fresh sets S=runs/s20b, so the copy below failed and q3 was q2 again
    cp "$S/ode/final.safetensors" runs/s20b/sla/final.safetensors || true
    on_policy 1 260 200 val_on_policy1_round2 reported_on_policy1_round2 ;;
q4) fresh runs/s20r2 && cp "${FILE:-runs/carry/s20/q3_final.safetensors}" "$S/sla/final.safetensors"
    on_policy 1 270 210 val_round2 reported_round2 ;;
q5) beside_release "${FILE:-runs/carry/s20/q3_final.safetensors}" reported_q3 q3_turbo_start2000 ;;
q6) ship_file "${FILE:-runs/carry/s20/q3_final.safetensors}"
    release_eval_gpu ;;
*)  echo "usage: session20.sh q1|q2|q3|q4|q5|q6 (q1, q4, q5, q6: FILE)"
    exit 2 ;;
esac
