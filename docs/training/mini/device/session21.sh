#!/usr/bin/env bash
# Session 21's device script. One GPU; each group starts from the files as committed then (turbovid/assets/mini = the
# release of session 20: its student is q3, the ode stage on policy at the second sampler call).
#   r1: the next call on the same ladder: the ode stage on policy with the teacher completing the third call's state
#       (`--on-policy-step 2`, s = 0.85) from the release's student in fp32 (${FILE:-runs/carry/s20/q3_final.safetensors},
#       carried), so its states, and its other calls' targets, are those of the student whose second call already
#       learned the teacher's completion (session 19's p2 ran step 2 from the student before it); fitted to the command
#       minus 260 s; graded on the validation prompts 1000..1255 (the release 224), then the reported 0..255 (226;
#       as run, no time was left for it: r4).
#   r2, r3: the teacher of the release on the validation sets 1000..1255 (r2) and 2000..2255 (r3), which only the
#       full stack had been graded on (224 and 222 of 256), so the gap is measured on 768 prompts, not 256; time
#       allowing, the full stack of FILE2 (default runs/carry/s21/r1_final.safetensors, r1's student) on the same set.
#   r4: FILE2's full stack on the reported prompts 0..255, then the release's on 2000..2255 (beside r3's rows).
#       (as run, LIMIT=330 left time for the first only)
#   r5: the ladder's last rung: the ode stage on policy at the fourth (last) call (`--on-policy-step 3`, s = 0.61)
#       from r1's student (FILE2); session 19's p1 ran it from the student before q3 and blurred shapes. As r1.
#   r6: FILE2 shipped as the student (ship_file) and `turbovid eval` of that release, every row, 128 held-out
#       prompts, the teacher in the same run (prelude release_eval_gpu).
#   r7: a fourth set, 3000..3255: the teacher and FILE2's full stack (teacher_beside), then, time allowing, the
#       release's full stack (as run it had no time left for it: r8).
#   r8: the release's full stack on 3000..3255.
source "$(dirname "$0")/prelude.sh" "$1"
FILE2=${FILE2:-runs/carry/s21/r1_final.safetensors}
# `teacher_beside START NAME`: the release's teacher on held-out prompts START..START+255 ($OUT/teacher_startSTART.json);
# if 150 s are left, FILE2 shipped as the student and its full stack on the same prompts ($OUT/NAME.json).
teacher_beside() {
  release_eval "teacher_start$1.json" --configs teacher --start "$1" --count 256
  if [ "$(left)" -gt 150 ] && [ -f "$FILE2" ]; then
    ship_file "$FILE2"
    turbo_eval "$2" "$1"
  fi
}
case "$1" in
r1) fresh runs/s21 && cp "${FILE:-runs/carry/s20/q3_final.safetensors}" "$S/sla/final.safetensors"
    on_policy 2 260 200 val_step2 reported_step2 ;;
r2) teacher_beside 1000 r1_turbo_start1000 ;;
r3) teacher_beside 2000 r1_turbo_start2000 ;;
r4) beside_release "$FILE2" r1_turbo_start0 r1_turbo_start2000_again ;;
r5) fresh runs/s21r5 && cp "$FILE2" "$S/sla/final.safetensors"
    on_policy 3 260 200 val_step3 reported_step3 ;;
r6) ship_file "$FILE2"
    release_eval_gpu ;;
r7) keep_release
    teacher_beside 3000 r1_turbo_start3000
    if [ "$(left)" -gt 100 ]; then restore_release && turbo_eval release_turbo_start3000 3000; fi ;;
r8) turbo_eval release_turbo_start3000 3000 ;;
*)  echo "usage: session21.sh r1..r8 (r1: FILE; r2..r6: FILE2)"
    exit 2 ;;
esac
