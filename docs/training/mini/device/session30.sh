#!/usr/bin/env bash
# Session 30's device script. One GPU; the files as committed (turbovid/assets/mini = session 28's release).
#   r: `turbovid eval` rows side by side on the one GPU, one per CONFIG:START[:BLOCKS[:STUDENT[:SEED]]] in JOBS (256
#      held-out prompts START..START+255; CONFIG one of turbovid.eval.CONFIGS; BLOCKS: `--sla-blocks BLOCKS`; STUDENT:
#      a folder under runs/carry holding a candidate's dit / dit_int8 files, else the release's; SEED: `--seed`),
#      each with the environment's EVAL_ARGS; JSON $OUT/[<STUDENT>_]<CONFIG>_start<START>[_b<BLOCKS>][_seed<SEED>].json,
#      the rows to $OUT/evals.log.
#   d: the release's DMD round (prelude's release_dmd: recipe.mini's dmd_round) from ode round 3's student (INIT,
#      default runs/carry/s29/ode3_start.safetensors) plus the adversarial term (`--adv-weight`, new for DMD), one run
#      per NAME:ADV[:ADV_LR] in VARIANTS side by side, fitted to the command minus FIT s (default 200); each EMA student
#      shipped on this machine into runs/carry/s30/NAME and, in bf16, to $OUT with its log (prelude's ship_runs).
#   t: the README's table (prelude's release_eval_gpu: every row, 128 held-out prompts, one invocation) beside `r`'s JOBS.
# As run: r with JOBS="student_sla:0 student_sla:1000 student_sla:3000 student_sagesla:0 student_sagesla:1000
# student_sagesla:3000 student_dense:1000" (the last is no config: no row); r with JOBS="turbo:0:128x64 turbo:1000:128x64
# turbo:3000:128x64 student_sla:0:64x128 student_sla:1000:64x128 student:0 student:1000"; r with the release at 128x64
# on 2000, 4000, 0 seed 1 and 5000, session 29's b (runs/carry/s29/s29_b carried) on 0, 1000, 3000, and teacher:5000;
# d with VARIANTS="a:0.1 b:0.3 c:1" (its launch, export and ship lines since moved into prelude's beside / export_rcm /
# ship_to, and row into prelude's eval_row); r with
# the three students' INT8 files (runs/carry/s30q/NAME, shipped on the CPU) on 3000 and 4000 at 128x64; t with
# JOBS="teacher:6000 turbo:6000" (the table cut at 590 s), t alone, r with JOBS="teacher:7000 turbo:7000".
# Its `job` function has since moved into prelude as `eval_job`, d's launch and ship loop into `release_dmd` and
# `ship_runs`.
source "$(dirname "$0")/prelude.sh" "$1"
case "$1" in
r) for j in $JOBS; do eval_job "$j" & done
   wait
   cat "$OUT/evals.log" ;;
d) for v in $VARIANTS; do
     IFS=: read -r n adv advlr <<< "$v"
     release_dmd "s30_$n" --adv-weight "$adv" ${advlr:+--adv-lr "$advlr"} --steps 100000 \
       --fit-minutes "$(minutes_left "${FIT:-200}")" --max-minutes "$(minutes_left 60)"
   done
   wait
   ship_runs s30 $(for v in $VARIANTS; do echo "${v%%:*}"; done) ;;
t) release_eval_gpu > /dev/null &
   for j in $JOBS; do eval_job "$j" & done
   wait
   cat "$OUT/eval.log" "$OUT/evals.log" ;;
*) echo "usage: session30.sh r | d | t"
   exit 2 ;;
esac
