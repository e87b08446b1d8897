#!/usr/bin/env bash
# Session 7 (2026-11-22), one H100: `bash session7.sh t1|t2`. The run directory is assembled from the shipped
# files (VAE, latent statistics, text encoder, tokenizer; the teacher as --init), so nothing is carried; t2 finds
# t1's teacher on the machine, or in runs/carry/teacher.safetensors (fetched from t1's $OUT) after a new start.
#   t1: held-out GPU checks of the shipped teacher (guidance 3 / 5 / 7, and the training split at 5: is shape a
#       generalisation or a training problem?), then a fourth teacher round (batch 64, lr 1e-4 cosine) alone on
#       the GPU, fitted to what is left of the command; the new teacher's held-out check.
#   t2: rCM distillation from t1's teacher, then the SLA stage (base rcm) on it; held-out checks, dense / SLA /
#       SageSLA.
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. TURBOVID_COMMIT=${TURBOVID_COMMIT:-unknown}
RUN=runs/session7
T="python3 -m turbovid.cli train"
START=$(date +%s)
left() { echo $(( (${LIMIT:-570} - ($(date +%s) - START)) )); }     # seconds left in this command
minutes_left() { python3 -c "print(max(0.5, ($(left) - $1) / 60))"; }  # minus a reserve, in minutes
echo "group $1: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
assemble() {   # run dir from turbovid/assets/mini
python3 - "$RUN" <<'PY'
import json, shutil, sys
from pathlib import Path
run, assets = Path(sys.argv[1]), Path("turbovid/assets/mini")
for sub in ("vae", "init"):
    (run / sub).mkdir(parents=True, exist_ok=True)
shutil.copyfile(assets / "vae.safetensors", run / "vae" / "final.safetensors")
shutil.copyfile(assets / "text_encoder.safetensors", run / "text_encoder.safetensors")
shutil.copyfile(assets / "spiece.model", run / "spiece.model")
(run / "vae" / "latent_stats.json").write_text(json.dumps(json.loads((assets / "config.json").read_text())["vae_latent_stats"]))
shutil.copyfile(assets / "dit_teacher.safetensors", run / "init" / "teacher.safetensors")
PY
}
gpu_eval() {   # held-out check on the GPU (the committed numbers come from `turbovid eval` on CPU)
  $T eval --run-dir $RUN --count 64 "$@" 2>&1 | tail -2 | head -1 | sed "s|^|$* : |" | tee -a "$OUT/eval.log"
}
case "$1" in
t1) rm -rf $RUN && assemble
    for g in 5 3 7; do gpu_eval --dit $RUN/init/teacher.safetensors --attention dense --sampler teacher --guidance $g; done
    gpu_eval --dit $RUN/init/teacher.safetensors --attention dense --sampler teacher --split train
    $T teacher --run-dir $RUN --init $RUN/init/teacher.safetensors --lr 1e-4 --batch 64 --steps 200000 --compile \
       --fit-minutes "$(minutes_left 75)" --max-minutes "$(minutes_left 45)" > "$OUT/teacher.log" 2>&1 \
       || echo "teacher exit $?"
    grep -v "step .*/" "$OUT/teacher.log" | tail -3; tail -2 "$OUT/teacher.log"
    if [ -f $RUN/teacher/final.safetensors ]; then
      mkdir -p "$OUT/teacher" && cp $RUN/teacher/final.safetensors $RUN/teacher/log.jsonl "$OUT/teacher/"
      gpu_eval --dit $RUN/teacher/final.safetensors --attention dense --sampler teacher
      gpu_eval --dit $RUN/teacher/final.safetensors --attention dense --sampler teacher --split train
    fi
    ;;
t2) if [ ! -f $RUN/teacher/final.safetensors ]; then
      rm -rf $RUN && assemble && mkdir -p $RUN/teacher && cp runs/carry/teacher.safetensors $RUN/teacher/final.safetensors
    fi
    rm -rf $RUN/rcm $RUN/sla
    $T rcm --run-dir $RUN --max-minutes "$(minutes_left 300)" > "$OUT/rcm.log" 2>&1 || echo "rcm exit $?"
    tail -2 "$OUT/rcm.log"
    gpu_eval --dit $RUN/rcm/final.safetensors --attention dense --sampler rcm
    $T sla --run-dir $RUN --steps 100000 --fit-minutes "$(minutes_left 75)" --max-minutes "$(minutes_left 50)" \
       > "$OUT/sla.log" 2>&1 || echo "sla exit $?"
    tail -2 "$OUT/sla.log"
    mkdir -p "$OUT/rcm" "$OUT/sla" && cp $RUN/rcm/final.safetensors $RUN/rcm/log.jsonl "$OUT/rcm/"
    cp $RUN/sla/final.safetensors $RUN/sla/log.jsonl "$OUT/sla/" || true
    for a in dense sla sagesla; do gpu_eval --dit $RUN/sla/final.safetensors --attention $a --sampler rcm; done
    ;;
*)  echo "usage: session7.sh t1|t2"; exit 2 ;;
esac
