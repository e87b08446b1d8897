#!/usr/bin/env bash
# Session 32's device script. One GPU; the files as committed.
#   p: the whole mini recipe from scratch in one run directory (runs/replay), every stage cut to its time-fitting probe
#      (`train reproduce --fit-minutes`: a fresh stage times its steps 5..25 and fits its schedule to the time left,
#      here none, so each stage ends after 25 steps), then its evaluations and export/, and a video generated from the
#      exported files (no mp4: the device has no imageio-ffmpeg, and the 68 MB wheel does not fit the carry). It proves the chain runs on one GPU at the recipe's shapes and batches, and each stage's fitted
#      rate (steps/s, printed by `drive`) times its recipe steps gives the full replay's time. Stopped and checkpointed
#      60 s before the command's end (`--max-minutes`); run p again on the still-warm machine to resume. stdout with a
#      timestamp per line to $OUT/replay.log, GPU memory every 2 s to $OUT/replay_gpu_memory.csv, the export's
#      config.json and a 4-step full-stack generation from the exported files (bf16, then W8A8) to $OUT.
#   g: `make test-gpu`'s tests in the files that hold them (pytest and its dependencies from the carried .whl) to $OUT/gpu_tests.log, headed by
#      COMMIT (the commit the working tree is at).
# As run: p (its first try died writing a preview mp4 after every stage had trained; the fix is in reproduce), g (its
# first try collected every test file), then session31.sh d with VARIANTS="g=--guidance-size-scale=2,1,1+--oversample=small:2
# h=--guidance-size-scale=2,1,1+--dmd-shift=1" STEPS=1455, and session31.sh r with g and h on 1000, 3000, 4000, then
# g on 0, 2000, 5000, ..., 11000.
source "$(dirname "$0")/prelude.sh" "$1"
case "$1" in
p) nvidia-smi --query-gpu=timestamp,memory.used --format=csv -l 2 >> "$OUT/replay_gpu_memory.csv" &
   $T reproduce --run-dir runs/replay --fit-minutes 0.01 --max-minutes "$(minutes_left 60)" 2>&1 |
     while IFS= read -r line; do printf '%s %s\n' "$(date +%s)" "$line"; done >> "$OUT/replay.log" || true
   kill %1 || true
   tail -5 "$OUT/replay.log"
   x=runs/replay/export
   if [ -f "$x/config.json" ]; then
     cp "$x/config.json" "$OUT/replay_config.json"
     ls -l "$x" | tee "$OUT/replay_export.txt"
     python3 -c "import sys; from turbovid.config import SampleConfig; from turbovid.pipeline import Pipeline
x = sys.argv[1]
for quant in (False, True):
    pipe = Pipeline.load('mini', dit=x + ('/dit_int8.safetensors' if quant else '/dit.safetensors'), vae=x + '/vae.safetensors', quant=quant,
                         text_encoder=x + '/text_encoder.safetensors', tokenizer=x + '/spiece.model', attention='sagesla')
    v = pipe.generate('a red circle moves to the right on a dark background', SampleConfig(steps=4))
    print('export, quant', quant, 'frames', v.frames.shape, 'seconds', round(sum(v.timings.values()), 3))" "$x" 2>&1 |
       tail -3 | tee "$OUT/replay_generate.txt"
   fi ;;
g) python3 -m pip install --no-deps -q .whl/pytest-*.whl .whl/pluggy-*.whl .whl/iniconfig-*.whl \
     .whl/packaging-*.whl .whl/pygments-*.whl
   echo "# make test-gpu on the device over the working tree of commit ${COMMIT:-unknown}" > "$OUT/gpu_tests.log"
   # the files with GPU tests (the others import the server's or diffusers' packages, which the device lacks)
   python3 -m pytest -q -m gpu -o addopts="" $(grep -l "mark.gpu" tests/test_*.py) 2>&1 | tail -30 |
     tee -a "$OUT/gpu_tests.log" ;;
*) echo "usage: session32.sh p | g"
   exit 2 ;;
esac
