#!/usr/bin/env bash
# Session 25's device script. One GPU; the files as committed, turbovid/assets/mini = the release candidate: session
# 24's last-call adversarial round (W 0.1, 511 x 32) shipped as the student on CPU by `ship_file` (prelude).
#   e1: `turbovid eval` of that release, every row, 128 held-out prompts, the teacher in the same run
#       (prelude release_eval_gpu), as the README's table.
#   e2: its full stack on the reported prompts 0..255 with other noise draws (`--seed 1`), beside session 23's run of
#       the previous release with the same seed (teacher 237, full stack 224).
#   d1: DMD alone from the release's student (new: `train rcm --no-scm`, RCMStage.scm; --init the release's student,
#       SLA student at top-k 0.75, the fake score's warm-up 200 steps), the runs in VARIANTS side by side on the one
#       GPU, each NAME:STUDENT_LR[:CFG[:ANCHOR[:POOL[:SCALE[:GSCALE]]]]] (the teacher's CFG scale, default 5, its
#       graded sampler's; ANCHOR: --anchor-weight, none by default; POOL: --anchor-pool, 1 by default; SCALE:
#       --anchor-size-scale S,M,L, 1,1,1 by default; GSCALE: --guidance-size-scale S,M,L, session 29; the start
#       student INIT, default the shipped one; VARIANTS default a:2e-5
#       b:5e-6; as run the second time: c:5e-6:2 d:5e-6:3 e:2e-5:2; prepared for the next session, not run:
#       f:2e-5:2:1 g:2e-5:2:3 h:2e-5:2:10), fitted to the command
#       minus FIT s (default 150; three runs need more: the first measures its speed before the others start, and c
#       overshot). Their EMA students (bf16) and logs to $OUT, their stdout in one file, d1_stdout.log (as run the
#       first time: s25_NAME.log).
#   d2: each of VARIANTS' students (this machine's run, else runs/carry/s25/NAME_bf16.safetensors) shipped
#       (ship_file) and its full stack graded on the validation prompts 1000..1255 (the release 225, the teacher 233);
#       as run the second time: VARIANTS="e:2e-5:2 d:5e-6:3" (c left no final weights).
#   x:  the student FILE's full stack on the held-out sets in SETS (prelude on_sets; as run, typed out with LIMIT=560:
#       FILE = the second d1's e, SETS = 0 3000).
#   e3: the student FILE shipped (ship_file) and graded as the README's table (release_eval_gpu), the release put back.
# Session 26 ran d1 again with f g h (as prepared above) and i j, d2 and x on them, and e3; PREFIX names the runs and
# files (default s25; session 26's i and j: s26). Session 27: e3 of h and of the weight average
# (runs/carry/s26/soup_release_e_bf16.safetensors), x of the average, then the pooled anchor, PREFIX=s27
# VARIANTS="p:2e-5:2:10:3 q:2e-5:2:30:5 r:2e-5:2:30:3" FIT=200 d1, then d2 on them and x on p. Session 28: the
# anchor per caption size, PREFIX=s28 VARIANTS="s:2e-5:2:10:1:0,1,3 t:2e-5:2:10:1:0,0.3,3 u:2e-5:2:10:1:0.1,1,3"
# FIT=200 d1, d2 (540 s for three), x on s (SETS="0 3000" LIMIT=560), e3 with FILE=runs/carry/s28/s28_s_bf16.safetensors
# carried (s shipped as recipe.dmd_round); then from s, PREFIX=s28b VARIANTS="v:2e-5:2:10:1:0,1,3
# w:2e-5:2:10:1:0,1,10 y:1e-5:2:10:1:0,1,3" FIT=200 d1 and d2 with runs/carry/s28b carried (a bare machine: 581 s).
source "$(dirname "$0")/prelude.sh" "$1"
VARIANTS=${VARIANTS:-a:2e-5 b:5e-6}
P=${PREFIX:-s25}
student() {    # the bf16 student of variant NAME: d1's run on this machine, else the carried copy
  local f=runs/${P}_$1/rcm/final.safetensors
  [ -f "$f" ] && echo "runs/${P}_$1_bf16.safetensors" || echo "runs/carry/$P/${P}_$1_bf16.safetensors"
}
case "$1" in
d1) for v in $VARIANTS; do
      IFS=: read -r n lr cfg anchor pool scale gscale <<< "$v"
      fresh "runs/${P}_$n"
      beside "$OUT/${P}_$n.log" rcm --run-dir "runs/${P}_$n" --init "${INIT:-runs/${P}_$n/sla/final.safetensors}" \
        --sla-student --topk 0.75 --no-scm --guidance "${cfg:-5}" ${anchor:+--anchor-weight "$anchor"} \
        ${pool:+--anchor-pool "$pool"} ${scale:+--anchor-size-scale "$scale"} ${gscale:+--guidance-size-scale "$gscale"} \
        --tangent-warmup 200 --lr "$lr" --steps 100000 --fit-minutes "$(minutes_left "${FIT:-150}")" \
        --max-minutes "$(minutes_left 100)"
    done
    wait
    for v in $VARIANTS; do
      n=${v%%:*}
      tail -2 "$OUT/${P}_$n.log"
      export_rcm "runs/${P}_$n" "${P}_$n" || echo "$n: no final weights"
      cat "$OUT/${P}_$n.log" >> "$OUT/d1_stdout.log" && rm "$OUT/${P}_$n.log"   # one file: a command returns 8
    done ;;
d2) on_validation $(for v in $VARIANTS; do n=${v%%:*}; echo "${P}_$n=$(student "$n")"; done) ;;
x)  on_sets "$FILE" ${SETS:-0 3000} ;;
e1) release_eval_gpu ;;
e2) release_eval turbo_seed1_start0.json --configs turbo --start 0 --count 256 --seed 1 ;;
e3) keep_release && ship_file "$FILE" && release_eval_gpu && restore_release ;;
*)  echo "usage: session25.sh e1 | e2 | e3 | d1 | d2 | x"
    exit 2 ;;
esac
