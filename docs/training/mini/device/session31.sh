#!/usr/bin/env bash
# Session 31's device script. One GPU; the files as committed (turbovid/assets/mini = session 28's release, run at its
# tuned SLA blocks 128 x 64).
#   d: the release's DMD round (prelude's release_dmd) from ode round 3's student (INIT) plus each variant's own flags,
#      one run per NAME=FLAGS in VARIANTS side by side (FLAGS: settings joined by +, e.g.
#      --oversample=small:2+--dmd-shift=1), STEPS steps (the release's round: 1455) or, without STEPS, fitted to the
#      command minus FIT s (default 200); each EMA student shipped on this machine into runs/carry/s31/NAME and, in
#      bf16, to $OUT with its log (prelude's ship_runs).
#   r: `turbovid eval` rows side by side, one prelude eval_job per CONFIG:START[:BLOCKS[:STUDENT[:SEED]]] in JOBS; the
#      JSON packed into $OUT/evals.tar, the rows in $OUT/evals.log.
# As run: d with VARIANTS="a=small:2 b=slow:2 c=small:2,slow:2" (then the --oversample value alone; now
# a=--oversample=small:2 ...), fitted; r with JOBS="turbo:1000::s31/a turbo:3000::s31/a turbo:4000::s31/a" and the same
# for b and c on the still-warm machine; r on a fresh machine with a's INT8 file (runs/carry/s31q/a, shipped on the CPU)
# carried, JOBS="teacher:8000 turbo:8000" plus turbo:START::s31q/a for START 0 2000 5000 6000 7000 8000; r with
# JOBS="teacher:9000 turbo:9000 teacher:10000 turbo:10000 teacher:11000 turbo:11000"; d on a fresh machine with
# VARIANTS="e=--dmd-shift=2.5 f=--dmd-shift=1" STEPS=1455; r with e and f on 1000, 3000, 4000.
source "$(dirname "$0")/prelude.sh" "$1"
case "$1" in
d) for v in $VARIANTS; do
     n=${v%%=*} flags=${v#*=}
     if [ -n "${STEPS:-}" ]; then length=(--steps "$STEPS")
     else length=(--steps 100000 --fit-minutes "$(minutes_left "${FIT:-200}")"); fi
     # shellcheck disable=SC2086  # FLAGS split into its settings
     release_dmd "s31_$n" ${flags//+/ } "${length[@]}" --max-minutes "$(minutes_left 60)"
   done
   wait
   ship_runs s31 $(for v in $VARIANTS; do echo "${v%%=*}"; done) ;;
r) for j in $JOBS; do eval_job "$j" & done
   wait
   cat "$OUT/evals.log"
   pack evals ;;
*) echo "usage: session31.sh d | r"
   exit 2 ;;
esac
