#!/usr/bin/env bash
# Session 29's device script. One GPU; the files as committed (turbovid/assets/mini = session 28's release).
# The H100's SageSLA row reads 2-5 clips of 128 below its SLA row in every table run since session 21; on the CPU
# (the SageSLA references) 0-1 either way. session29_checks/sage_numerics.py tells the fused kernels from the
# references.
#   n: that script's `numerics` (every SageSLA call of the full stack on 2 held-out prompts, each path against the
#      exact SLA), then bench_attention.py --quick (our kernel with and without two-level FP8 P·V accumulation at the
#      Wan 1.3B shape, beside SDPA and sageattention), then `v`.
#   v: the full stack on the reported prompts 0..255 with SageSLA run by each of VARIANTS (default fused promote
#      ref: the shipped kernel, two-level accumulation, the references the CPU runs), side by side on the one GPU.
#   s: the full stack with SageSLA run by VARIANT (default promote) on the held-out sets in SETS (default 1000 3000),
#      side by side.
#   c: the full stack of each candidate student in CANDS (folders under runs/carry/s29 holding dit and dit_int8, built
#      on the CPU by session29_checks/soup.py and `ship`) on each held-out set in SETS, all side by side, the shipped
#      kernel; "release" in CANDS grades the shipped student, "teacher" the teacher's row.
#   g: session25.sh d1's students of VARIANTS (PREFIX's runs on this machine, else runs/carry/PREFIX/) shipped on this
#      machine into runs/carry/s29/PREFIX_NAME, then `c` on them (SETS, default 1000).
# As run: n; c with CANDS="stuvwy stu svwy" SETS="1000 3000"; four evals typed out (the release on 2000.. and with
# --seed 1, --ode and --mid-angles 1.3,1.0,0.6 on 1000..); then the per-size teacher CFG (--guidance-size-scale, new)
# from the previous release's student (ode round 3, carried as runs/carry/s29/ode3_start.safetensors), as session 28's
# s otherwise: PREFIX=s29 INIT=runs/carry/s29/ode3_start.safetensors VARIANTS="a:2e-5:2:10:1:0,1,3:1.5,1,1
# b:2e-5:2:10:1:0,1,3:2,1,1 c:2e-5:2:10:1:0,1,3:2,1.5,1" FIT=200 session25.sh d1, then g with SETS="1000 3000".
source "$(dirname "$0")/prelude.sh" "$1"
C=docs/training/mini/session29_checks/sage_numerics.py
grade() { eval_row "$1_turbo_start$2" "$1" turbo "$2"; }   # grade VARIANT START: the shipped full stack
cand() {    # cand NAME START: candidate NAME's full stack (or the release's / the teacher's row) on START..START+255
  case "$1" in
    release) eval_row "release_turbo_start$2" fused turbo "$2" ;;
    teacher) eval_row "teacher_start$2" fused teacher "$2" ;;
    *) STUDENT="runs/carry/s29/$1" eval_row "$1_turbo_start$2" fused turbo "$2" ;;
  esac
}
variants() {
  for v in ${VARIANTS:-fused promote ref}; do grade "$v" 0 & done
  wait
  cat "$OUT/evals.log"
}
case "$1" in
n) python3 "$C" numerics "$OUT/sagesla_numerics_mini.json" | tee "$OUT/numerics.log"
   python3 benchmarks/bench_attention.py --quick --out "$OUT" > "$OUT/bench_attention.log" 2>&1 || echo "bench exit $?"
   tail -22 "$OUT/bench_attention.log"
   variants ;;
v) variants ;;
s) for s in ${SETS:-1000 3000}; do grade "${VARIANT:-promote}" "$s" & done
   wait
   cat "$OUT/evals.log" ;;
c) for c in $CANDS; do for s in ${SETS:-1000}; do cand "$c" "$s" & done; done
   wait
   cat "$OUT/evals.log" ;;
g) P=${PREFIX:-s29} CANDS=
   for v in $VARIANTS; do
     n=${v%%:*} f=runs/${P}_${v%%:*}_bf16.safetensors
     [ -f "$f" ] || f=runs/carry/$P/${P}_${n}_bf16.safetensors
     ship_to "$f" "runs/carry/s29/${P}_$n" && CANDS="$CANDS ${P}_$n"
   done
   for c in $CANDS; do for s in ${SETS:-1000}; do cand "$c" "$s" & done; done
   wait
   cat "$OUT/evals.log" ;;
*) echo "usage: session29.sh n | v | s | c | g"
   exit 2 ;;
esac
