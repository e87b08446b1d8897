#!/usr/bin/env bash
# Session 9 (2026-11-23), one H100: `bash session9.sh v|t`. Run directories come from the shipped files
# (device/assemble.py); ftfy and wcwidth come as wheels (.whl).
#   v: the whole shipped VAE fine-tuned (encoder too: `turbovid train vae --init`) with the edge loss term, to see
#      whether the small objects' shapes survive the round trip better (session 8: the shipped VAE keeps 12 of 25
#      small shapes, which caps the teacher). Round trips of the same 128 held-out clips before and after.
#   t: a teacher round on the fine-tuned VAE's latents (runs/carry/vae: v's files, carried), from the shipped
#      teacher; then held-out checks of it and of the shipped teacher (with the shipped VAE). The checks did not
#      finish inside the command (two 50-step CFG evaluations side by side); the teachers were compared on the CPU.
#   s: the students of t's teacher (runs/carry/teacher, carried) on the fine-tuned VAE's latents: rCM (the recipe's
#      1003 steps), then the SLA fine-tune of the rCM student fitted to the command; graded on the CPU afterwards.
#      Its rCM ran out of the command's time at step 748 (the pool's encode took most of it); the same rCM and SLA
#      commands were then typed on the still-warm machine (`session9_s_*_resumed.log`), which resumed it.
#   e: held-out checks on 96 prompts (24 on the CPU cannot separate the two sets): the shipped set (VAE, teacher,
#      student) against session 9's (fine-tuned VAE, t's teacher, s's students; runs/carry, carried).
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. TURBOVID_COMMIT=${TURBOVID_COMMIT:-unknown}
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
T="python3 -m turbovid.cli train"
A=turbovid/assets/mini
START=$(date +%s)
left() { echo $(( (${LIMIT:-570} - ($(date +%s) - START)) )); }     # seconds left in this command
minutes_left() { python3 -c "print(max(0.5, ($(left) - $1) / 60))"; }  # minus a reserve, in minutes
echo "group $1: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
python3 -m pip install --no-deps -q .whl/ftfy-*.whl .whl/wcwidth-*.whl && python3 -c "import ftfy"
recon() {   # held-out round trips (128 clips) graded by the detector: $1 = VAE weights, $2 = label
python3 - "$1" "$2" <<'PY' | tee -a "$OUT/recon.log"
import json, sys, torch
from turbovid.loading import load_vae
from turbovid.train.loop import Env
from turbovid.train.recipe import RECIPES
from turbovid.train.vae import reconstruction_report
recipe, env = RECIPES["mini"], Env(torch.device("cuda"))
vae = load_vae(sys.argv[1], recipe.vae, device=env.device, dtype=torch.bfloat16)
r = reconstruction_report(vae, recipe, env, 128)
print(sys.argv[2], json.dumps(r))
PY
}
check() {   # held-out check on the GPU (the committed numbers come from `turbovid eval` on CPU)
  local run=$1 n=$2; shift 2
  $T eval --run-dir "$run" --count "$n" "$@" 2>&1 | tail -2 | head -1 | sed "s|^|$run $* : |" | tee -a "$OUT/eval.log"
}
case "$1" in
v)  RUN=runs/session9v && rm -rf $RUN && mkdir -p $RUN
    $T vae --run-dir $RUN --init $A/vae.safetensors --lr 2e-4 --edge 0.5 --batch 32 --steps 100000 \
       --fit-minutes "$(minutes_left 150)" --max-minutes "$(minutes_left 100)" > "$OUT/vae.log" 2>&1 || echo "vae exit $?"
    grep -v "step .*/" "$OUT/vae.log" | tail -4
    mkdir -p "$OUT/vae" && cp $RUN/vae/final.safetensors $RUN/vae/latent_stats.json $RUN/vae/log.jsonl \
       $RUN/vae/reconstruction.json "$OUT/vae/" || true
    recon $A/vae.safetensors shipped
    [ -f $RUN/vae/final.safetensors ] && recon $RUN/vae/final.safetensors tuned
    ;;
t)  RUN=runs/session9t && rm -rf $RUN && python3 docs/training/mini/device/assemble.py $RUN
    cp runs/carry/vae/final.safetensors runs/carry/vae/latent_stats.json $RUN/vae/
    rm -rf $RUN/teacher
    $T teacher --run-dir $RUN --init $RUN/init/teacher.safetensors --lr 1e-4 --steps 200000 --compile \
       --fit-minutes "$(minutes_left 130)" --max-minutes "$(minutes_left 100)" > "$OUT/teacher.log" 2>&1 \
       || echo "teacher exit $?"
    tail -2 "$OUT/teacher.log"
    mkdir -p "$OUT/teacher" && cp $RUN/teacher/final.safetensors $RUN/teacher/log.jsonl "$OUT/teacher/" || true
    S=runs/session9s && rm -rf $S && python3 docs/training/mini/device/assemble.py $S
    check $RUN 48 --dit $RUN/teacher/final.safetensors --attention dense --sampler teacher &
    check $S 48 --dit $A/dit_teacher.safetensors --attention dense --sampler teacher
    wait
    ;;
s)  RUN=runs/session9s && rm -rf $RUN && python3 docs/training/mini/device/assemble.py $RUN
    cp runs/carry/vae/final.safetensors runs/carry/vae/latent_stats.json $RUN/vae/
    cp runs/carry/teacher/final.safetensors $RUN/teacher/final.safetensors
    $T rcm --run-dir $RUN --max-minutes "$(minutes_left 240)" > "$OUT/rcm.log" 2>&1 || echo "rcm exit $?"
    tail -2 "$OUT/rcm.log"
    mkdir -p "$OUT/rcm" "$OUT/sla" && cp $RUN/rcm/final.safetensors $RUN/rcm/log.jsonl "$OUT/rcm/" || true
    $T sla --run-dir $RUN --steps 100000 --fit-minutes "$(minutes_left 60)" --max-minutes "$(minutes_left 35)" \
       > "$OUT/sla.log" 2>&1 || echo "sla exit $?"
    tail -2 "$OUT/sla.log"
    cp $RUN/sla/final.safetensors $RUN/sla/log.jsonl "$OUT/sla/" || true
    ;;
e)  N=runs/session9e_new O=runs/session9e_old && rm -rf $N $O
    python3 docs/training/mini/device/assemble.py $N && python3 docs/training/mini/device/assemble.py $O
    cp runs/carry/vae/final.safetensors runs/carry/vae/latent_stats.json $N/vae/
    check $O 96 --dit $A/dit_teacher.safetensors --attention dense --sampler teacher &
    check $N 96 --dit runs/carry/teacher/final.safetensors --attention dense --sampler teacher &
    for a in dense sagesla; do check $O 96 --dit $A/dit.safetensors --attention $a --sampler rcm; done
    check $N 96 --dit runs/carry/s/rcm.safetensors --attention dense --sampler rcm
    for a in dense sla sagesla; do check $N 96 --dit runs/carry/s/sla.safetensors --attention $a --sampler rcm; done
    wait
    cp $O/eval/*.json $N/eval/*.json "$OUT/" || true
    ;;
*)  echo "usage: session9.sh v|t|s|e"; exit 2 ;;
esac
