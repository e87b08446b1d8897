#!/usr/bin/env bash
# The mini model's second training run (2026-11-22, session 4) on one-GPU machines (H200), five device commands
# of under 10 minutes each: `bash session4.sh a1|a2|a3|b1|b2`. It continues the session-3 run: same VAE, text
# encoder and tokenizer, teacher started from the session-3 teacher's EMA weights (--init), ~8x the optimizer
# steps that run gave the teacher (one GPU at batch 32 takes about as many steps per second as four did).
#   machine A: a1 step-time probe (+ profile) and teacher start, a2 teacher, a3 teacher end + SLA + GPU eval
#   machine B: b1 rCM, b2 rCM end + merge + ship + GPU evals (in the recorded run the SLA weights did not fit in
#   the 64 MiB carried to machine B; b1 finished rCM on the round-2 teacher, b2 was not run, and c1 / c2 trained a
#   third teacher round, SLA and rCM in runs/next2: the shipped run; merge / ship / eval then ran on the CPU)
# The run directory stays on a machine between its commands; each command sends the run's small files back
# ($OUT/run.tar.part-*). Machine B starts from what a3 sent back (carried as runs/next).
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. TURBOVID_COMMIT=${TURBOVID_COMMIT:-unknown}
RUN=runs/next
T="python3 -m turbovid.cli train"
START=$(date +%s)
left() { echo $(( (${LIMIT:-570} - ($(date +%s) - START)) )); }     # seconds left in this command
minutes_left() { python3 -c "print(max(0.5, ($(left) - $1) / 60))"; }  # minus a reserve, in minutes
echo "group $1: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
bring_back() {
  tar cf - --exclude=checkpoints --exclude=pool --exclude=init $RUN | split -b 15m - "$OUT/run.tar.part-"
  ls -la "$OUT"
}
teacher_flags() { cat $RUN/teacher_flags 2>/dev/null || true; }
gpu_eval() {   # held-out prompts on the GPU (quick look; the committed numbers come from `turbovid eval` on CPU)
  python3 -m turbovid.cli train eval --run-dir $RUN --count 24 "$@" 2>&1 | tail -2 | tee -a "$OUT/eval.log"
}
case "$1" in
a1) # where a training step's time goes, eager vs compiled, batch 32 vs 64; then the teacher starts
    python3 benchmarks/train_speed.py --rows dit --batches 64 --profile --iters 8 --out "$OUT" 2>&1 | tee "$OUT/speed.log"
    python3 - "$OUT" > $RUN/teacher_flags <<'EOF'
import json, pathlib, sys
rows = {r["row"]: r["ms"] for r in json.loads(next(pathlib.Path(sys.argv[1]).glob("train_speed_mini_dit_*.json")).read_text())["rows"]}
comp = rows["teacher step (compiled)"] < 0.9 * rows["teacher step"]
tag = " (compiled)" if comp else ""
big = rows["teacher step b64" + tag] < 1.35 * rows["teacher step" + tag]
print(("--compile " if comp else "") + ("--batch 64" if big else ""))
EOF
    echo "teacher flags: $(teacher_flags)"
    # schedule fitted to ~18 minutes of this machine (pool building included), spread over a1..a3
    $T teacher --run-dir $RUN --init $RUN/init/teacher.safetensors --lr 3e-4 --steps 200000 $(teacher_flags) \
       --fit-minutes 18 --max-minutes "$(minutes_left 40)" 2>&1 | tee "$OUT/teacher.log"
    ;;
a2) $T teacher --run-dir $RUN --lr 3e-4 --steps 200000 $(teacher_flags) --max-minutes "$(minutes_left 40)" \
       2>&1 | tee "$OUT/teacher.log"
    ;;
a3) $T teacher --run-dir $RUN --lr 3e-4 --steps 200000 $(teacher_flags) --max-minutes "$(minutes_left 200)" \
       2>&1 | tee "$OUT/teacher.log"
    if [ -f $RUN/teacher/final.safetensors ]; then
      $T sla --run-dir $RUN --steps 100000 --fit-minutes 1.5 --max-minutes 2.0 2>&1 | tee "$OUT/sla.log"
      gpu_eval --dit $RUN/teacher/final.safetensors --attention dense --sampler teacher
      gpu_eval --dit $RUN/teacher/final.safetensors --attention dense --sampler teacher --split train
    fi
    ;;
b1) # rCM distillation fitted to ~13 minutes of this machine (pool building included), spread over b1..b2
    $T rcm --run-dir $RUN --steps 100000 --fit-minutes 13 --max-minutes "$(minutes_left 30)" 2>&1 | tee "$OUT/rcm.log"
    ;;
b2) $T rcm --run-dir $RUN --steps 100000 --max-minutes "$(minutes_left 180)" 2>&1 | tee "$OUT/rcm.log"
    if [ -f $RUN/rcm/final.safetensors ] && [ -f $RUN/sla/final.safetensors ]; then   # # SLA weights carried?
      $T merge --run-dir $RUN 2>&1 | tee -a "$OUT/rcm.log"
      $T ship --run-dir $RUN 2>&1 | tee -a "$OUT/rcm.log"
      tar cf - turbovid/assets/mini | split -b 15m - "$OUT/assets.tar.part-"
      gpu_eval --dit $RUN/teacher/final.safetensors --attention dense --sampler teacher
      gpu_eval --attention dense
      gpu_eval --attention sla
    fi
    ;;
c1) # (typed out on machine B after b1, recorded here as run) teacher round 3 in runs/next2, sharing next's files
    R=runs/next2; mkdir -p $R && for f in vae pool spiece.model text_encoder.safetensors; do ln -sfn ../next/$f $R/$f; done
    $T teacher --run-dir $R --init runs/next/teacher/final.safetensors --lr 1e-4 --steps 200000 --compile \
       --fit-minutes 7.6 --max-minutes 7.9 2>&1 | tee $OUT/teacher2.log
    ;;
c2) # round 3's last steps, its GPU check, SLA and rCM on it (merge, ship and `turbovid eval` then ran on a CPU)
    R=runs/next2; E="$T eval --run-dir $R --count 24"
    $T teacher --run-dir $R --lr 1e-4 --steps 200000 --compile 2>&1 | tail -2 | tee $OUT/teacher2b.log
    $E --dit $R/teacher/final.safetensors --sampler teacher --attention dense 2>&1 | tail -2 | tee $OUT/eval2.log
    $T sla --run-dir $R --steps 100000 --fit-minutes 1.0 --max-minutes 1.3 2>&1 | tail -2 | tee $OUT/sla2.log
    $T rcm --run-dir $R --steps 100000 --fit-minutes 3.6 --max-minutes 3.9 2>&1 | tee $OUT/rcm2.log | tail -2
    $E --dit $R/rcm/final.safetensors --attention dense 2>&1 | tail -2 | tee -a $OUT/eval2.log
    RUN=$R
    ;;
*)  echo "usage: session4.sh a1|a2|a3|b1|b2|c1|c2"; exit 2 ;;
esac
bring_back
