#!/usr/bin/env bash
# Session 6 (2026-11-22), one H100: `bash session6.sh a1|a2|a3`. The run directory is assembled from the shipped
# files (VAE, latent statistics, text encoder, tokenizer; the teacher as --init), so nothing is carried; it stays
# on the machine between the two commands, and each command sends its small results back to $OUT.
# d1 ran at commit bce2762, whose mini recipe had the vae_decoder stage; the recipe dropped it afterwards (the
# fine-tuned decoder measured no gain on generated videos, recipe.py), so run it from that commit.
#   a1: VAE decoder fine-tune (recipe.vae_decoder, encoder frozen) and a fourth teacher round, side by side on
#       the one GPU; the VAE detector agreement of the old and new decoder on the same 128 held-out clips.
#   a2: the VAE decode profile (#4: benchmarks/bench_vae.py --profile, the GPU otherwise idle), then the teacher.
#   a3: the teacher round continues to its end; held-out GPU checks of the teacher with both decoders.
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. TURBOVID_COMMIT=${TURBOVID_COMMIT:-unknown}
RUN=runs/session6
T="python3 -m turbovid.cli train"
START=$(date +%s)
left() { echo $(( (${LIMIT:-570} - ($(date +%s) - START)) )); }     # seconds left in this command
minutes_left() { python3 -c "print(max(0.5, ($(left) - $1) / 60))"; }  # minus a reserve, in minutes
echo "group $1: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
assemble() {   # run dir from turbovid/assets/mini; olddec/ = the same run with the shipped decoder as "fine-tuned"
python3 - "$RUN" <<'PY'
import json, shutil, sys
from pathlib import Path
run, assets = Path(sys.argv[1]), Path("turbovid/assets/mini")
stats = json.loads((assets / "config.json").read_text())["vae_latent_stats"]
for r, dec in ((run, None), (run / "olddec", "vae_decoder")):
    for sub in ("vae", "init") + ((dec,) if dec else ()):
        (r / sub).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(assets / "vae.safetensors", r / "vae" / "final.safetensors")
    if dec:
        shutil.copyfile(assets / "vae.safetensors", r / dec / "final.safetensors")
    shutil.copyfile(assets / "text_encoder.safetensors", r / "text_encoder.safetensors")
    shutil.copyfile(assets / "spiece.model", r / "spiece.model")
    (r / "vae" / "latent_stats.json").write_text(json.dumps(stats))
shutil.copyfile(assets / "dit_teacher.safetensors", run / "init" / "teacher.safetensors")
PY
}
recon() {   # detector agreement of VAE round trips of the same held-out clips: $1 = run dir
python3 - "$1" <<'PY'
import sys, json, torch
from pathlib import Path
from turbovid.train.inputs import load_trained_vae
from turbovid.train.loop import Env
from turbovid.train.recipe import RECIPES
from turbovid.train.vae import reconstruction_report
recipe, env = RECIPES["mini"], Env(torch.device("cuda"))
vae = load_trained_vae(recipe, Path(sys.argv[1]), env)
r = reconstruction_report(vae, recipe, env, 128)
print(sys.argv[1], json.dumps(r))
PY
}
gpu_eval() {   # quick held-out check on the GPU (the committed numbers come from `turbovid eval` on CPU)
  python3 -m turbovid.cli train eval --count 24 "$@" 2>&1 | tail -1 | sed "s|^|$* : |" | tee -a "$OUT/eval.log"
}
case "$1" in
a1) rm -rf $RUN && assemble
    $T vae_decoder --run-dir $RUN --fit-minutes 7.0 --max-minutes "$(minutes_left 60)" > "$OUT/vae_decoder.log" 2>&1 &
    DEC=$!
    $T teacher --run-dir $RUN --init $RUN/init/teacher.safetensors --lr 1e-4 --steps 200000 --compile \
       --fit-minutes 16 --max-minutes "$(minutes_left 40)" > "$OUT/teacher.log" 2>&1 || echo "teacher exit $?"
    wait $DEC || echo "vae_decoder exit $?"
    grep -v "step .*/" "$OUT/vae_decoder.log" | tail -5; tail -3 "$OUT/teacher.log"
    recon $RUN/olddec | tee -a "$OUT/recon.log"
    recon $RUN | tee -a "$OUT/recon.log"
    mkdir -p "$OUT/vae_decoder" && cp $RUN/vae_decoder/final.safetensors $RUN/vae_decoder/log.jsonl \
       $RUN/vae_decoder/reconstruction.json "$OUT/vae_decoder/" 2>/dev/null || true
    ;;
a2) python3 benchmarks/bench_vae.py --profile --out "$OUT" > "$OUT/vae_profile.log" 2>&1 || echo "profile exit $?"
    mv "$OUT"/vae_profile_*.json "$OUT/vae_profile.json"
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 benchmarks/bench_vae.py --profile --out "$OUT" \
       > "$OUT/vae_profile_expandable.log" 2>&1 || echo "profile exit $?"
    grep -A200 "^case" "$OUT/vae_profile.log" | cut -c1-200; grep "fast decode, warm" "$OUT/vae_profile_expandable.log"
    $T teacher --run-dir $RUN --lr 1e-4 --steps 200000 --compile --max-minutes "$(minutes_left 25)" \
       > "$OUT/teacher.log" 2>&1 || echo "teacher exit $?"
    tail -2 "$OUT/teacher.log"
    ;;
a3) $T teacher --run-dir $RUN --lr 1e-4 --steps 200000 --compile --max-minutes "$(minutes_left 150)" \
       > "$OUT/teacher.log" 2>&1 || echo "teacher exit $?"
    tail -3 "$OUT/teacher.log"
    if [ -f $RUN/teacher/final.safetensors ]; then
      gpu_eval --run-dir $RUN --dit $RUN/teacher/final.safetensors --attention dense --sampler teacher
      gpu_eval --run-dir $RUN --dit $RUN/init/teacher.safetensors --attention dense --sampler teacher
      gpu_eval --run-dir $RUN/olddec --dit $RUN/init/teacher.safetensors --attention dense --sampler teacher
      mkdir -p "$OUT/teacher" && cp $RUN/teacher/final.safetensors $RUN/teacher/log.jsonl "$OUT/teacher/"
    fi
    ;;
d1) # the decoder fine-tune alone (a1's run dir was lost: the machine was handed back between a1 and a2)
    rm -rf $RUN && assemble
    $T vae_decoder --run-dir $RUN --fit-minutes 7.3 --max-minutes "$(minutes_left 75)" > "$OUT/vae_decoder.log" 2>&1 \
       || echo "vae_decoder exit $?"
    grep -v "step .*/" "$OUT/vae_decoder.log" | tail -3
    mkdir -p "$OUT/vae_decoder" && cp $RUN/vae_decoder/final.safetensors $RUN/vae_decoder/log.jsonl \
       $RUN/vae_decoder/reconstruction.json "$OUT/vae_decoder/" || true
    recon $RUN/olddec | tee -a "$OUT/recon.log" | cut -c1-300
    ;;
*)  echo "usage: session6.sh a1|a2|a3|d1"; exit 2 ;;
esac
