# The shared start of the session scripts, sourced with the group as $1: strict mode, the train command, the
# command's time budget (LIMIT seconds, 570 unless set) and ftfy from the carried wheels (.whl, see README).
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
T="python3 -m turbovid.cli train"
START=$(date +%s)
left() { echo $(( (${LIMIT:-570} - ($(date +%s) - START)) )); }     # seconds left in this command
minutes_left() { python3 -c "print(max(0.5, ($(left) - $1) / 60))"; }  # minus a reserve, in minutes
echo "group $1: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
python3 -m pip install --no-deps -q .whl/ftfy-*.whl .whl/wcwidth-*.whl && python3 -c "import ftfy"

# The commands the session scripts repeat. `fresh DIR`: S=DIR, a run directory from the shipped files. Its pool/
# links to runs/pool, one cache for every such directory (they share the shipped VAE): on a machine still warm
# from an earlier command the DiT stages find their 24000 latents there instead of encoding them (~4 minutes).
fresh() {
  S=$1 && rm -rf "$S" && python3 docs/training/mini/device/assemble.py "$S"
  mkdir -p runs/pool && ln -sfn "$PWD/runs/pool" "$S/pool"
}
# `stage NAME OUTDIR ARGS...`: `train NAME --run-dir $S ARGS`, its output to $OUT/NAME.log, its weights and log.jsonl
# to $OUT/OUTDIR (also when the stage stopped early, whatever it left).
stage() {
  local name=$1 dir=$2; shift 2
  $T "$name" --run-dir "$S" "$@" > "$OUT/$name.log" 2>&1 || echo "$name exit $?"
  tail -2 "$OUT/$name.log"
  mkdir -p "$OUT/$dir" && cp "$S/$name/final.safetensors" "$S/$name/log.jsonl" "$OUT/$dir/" || true
}
# `tune_sla [FIT STOP]`: the mini recipe's SLA fine-tune (top-k 0.5) of $S/rcm's student as a `stage`, its schedule
# fitted to what the command has left minus FIT seconds (default 150), stopped and checkpointed STOP seconds
# (default 125) before the end.
tune_sla() {
  stage sla sla --topk 0.5 --steps 100000 --fit-minutes "$(minutes_left "${1:-150}")" \
    --max-minutes "$(minutes_left "${2:-125}")"
}
# `check LABEL ARGS...`: `train eval --run-dir $S ARGS`; its summary line, labelled, to $OUT/eval.log, its JSON to $OUT.
check() {
  local label=$1; shift
  $T eval --run-dir "$S" "$@" 2>&1 | tail -2 | head -1 | sed "s|^|$label: |" | tee -a "$OUT/eval.log"
  cp "$S"/eval/*.json "$OUT/" 2>/dev/null || true
}
# `release_eval NAME ARGS...`: `turbovid eval` of the model in turbovid/assets on the GPU, its JSON to $OUT/NAME.
release_eval() {
  local name=$1; shift
  python3 -m turbovid.cli eval --device cuda --out "$OUT/$name" "$@" 2> "$OUT/eval_progress.log" | tee "$OUT/eval.log"
}
# `release_eval_gpu`: release_eval named eval_mini_<gpu>_<date>[_n<COUNT>].json: COUNT held-out prompts (default
# 128), the rows in CONFIGS (default all).
release_eval_gpu() {
  local gpu n tag
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o 'H[0-9]\+' | head -1 | tr H h)
  n=${COUNT:-128}; [ "$n" = 128 ] && tag= || tag=_n$n
  release_eval "eval_mini_${gpu}_$(date +%F)$tag.json" --count "$n" ${CONFIGS:+--configs $CONFIGS}
}
# `ship_release`: `train ship` of $S into turbovid/assets/mini, the student's files and config.json to $OUT/assets.
ship_release() {
  $T ship --run-dir "$S" --output turbovid/assets/mini
  mkdir -p "$OUT/assets" && cp turbovid/assets/mini/dit{,_int8}.safetensors turbovid/assets/mini/config.json "$OUT/assets/"
}
# `export_weights SRC DEST BF16 HISTORY [STAGE STEPS]`: SRC's weights (in bf16, as a release stores them, when BF16=1)
# to DEST with HISTORY's weights history (the file they came from), plus a record of STAGE's STEPS when given.
export_weights() {
  python3 -c "import sys; from safetensors.torch import load_file
from turbovid.train.checkpoint import history_metadata, save_weights, weights_history
h = weights_history(sys.argv[4]) + ([{'stage': sys.argv[5], 'steps': int(sys.argv[6])}] if len(sys.argv) > 5 else [])
w = {k: v.bfloat16() if sys.argv[3] == '1' and v.is_floating_point() else v for k, v in load_file(sys.argv[1]).items()}
save_weights(sys.argv[2], w, history_metadata(h))" "$@"
}
# `beside LOG ARGS...`: `train ARGS` in the background, its output to LOG. The first of several runs started this way
# encodes the shared latent pool (~2.5 min): return once it is written (or the run has ended), so the next one reads it.
beside() {
  local log=$1; shift
  $T "$@" > "$log" 2>&1 &
  while [ ! -f runs/pool/train_24000_rank0of1.safetensors ] && kill -0 $! 2>/dev/null; do sleep 5; done
}
# `export_rcm RUN NAME`: RUN/rcm's EMA student in bf16 to runs/NAME_bf16.safetensors and $OUT, its log to
# $OUT/NAME_log.jsonl; fails when the run left no final weights.
export_rcm() {
  export_weights "$1/rcm/final.safetensors" "runs/$2_bf16.safetensors" 1 "$1/rcm/final.safetensors" &&
    cp "runs/$2_bf16.safetensors" "$OUT/" && { cp "$1/rcm/log.jsonl" "$OUT/$2_log.jsonl" || true; }
}
# `release_dmd RUN ARGS...`: the release's DMD round (recipe.mini's dmd_round: DMD alone, SLA student at top-k 0.75, the
# teacher's CFG 2, the anchor at weight 10 times 0 / 1 / 3 per caption size, lr 2e-5) in a fresh runs/RUN from INIT
# (default ode round 3's student, runs/carry/s29/ode3_start.safetensors) plus ARGS (its length among them), `beside`,
# its output to $OUT/RUN.log.
release_dmd() {
  local run=$1; shift
  fresh "runs/$run"
  beside "$OUT/$run.log" rcm --run-dir "runs/$run" --init "${INIT:-runs/carry/s29/ode3_start.safetensors}" \
    --sla-student --topk 0.75 --no-scm --guidance 2 --anchor-weight 10 --anchor-size-scale 0,1,3 \
    --tangent-warmup 200 --lr 2e-5 "$@"
}
# `ship_runs PREFIX NAME...`: after release_dmd runs PREFIX_NAME, each EMA student exported (export_rcm) and shipped on
# this machine into runs/carry/PREFIX/NAME (ship_to); their stdout joined into $OUT/d_stdout.log.
ship_runs() {
  local prefix=$1 n; shift
  for n in "$@"; do
    tail -2 "$OUT/${prefix}_$n.log"
    export_rcm "runs/${prefix}_$n" "${prefix}_$n" || { echo "$n: no final weights"; continue; }
    ship_to "runs/${prefix}_${n}_bf16.safetensors" "runs/carry/$prefix/$n"
  done
  cat "$OUT/${prefix}"_*.log > "$OUT/d_stdout.log" && rm "$OUT/${prefix}"_*.log
}
# `kept NAME FROM EVERY ARGS...`: `train NAME --run-dir $S ARGS` run EVERY steps at a time (each run resumes from the
# last checkpoint) until the stage is done or the command's time ends, stopped and checkpointed 40 s before its end.
# After each run the EMA student goes to $OUT/<NAME>_<step>.safetensors and $S/kept/ with the weights history the
# stage's own final file would have: FROM's (the file the student started from), then the stage's steps so far (in
# bf16, as a release stores it, when BF16=1). Its log to $OUT/<NAME>.log and $OUT/log.jsonl.
kept() {
  local name=$1 from=$2 every=$3 n ckpt step; shift 3
  mkdir -p "$S/kept"
  for n in $(seq "$every" "$every" 100000); do
    $T "$name" --run-dir "$S" "$@" --until "$n" --max-minutes "$(minutes_left 40)" \
      >> "$OUT/$name.log" 2>&1 || echo "$name exit $?"
    tail -1 "$OUT/$name.log"
    ckpt=$(cat "$S/$name/checkpoints/latest") && step=$(echo "$ckpt" | sed 's/^step_0*//')
    export_weights "$S/$name/checkpoints/$ckpt/ema.safetensors" "$S/kept/${name}_$step.safetensors" "${BF16:-0}" \
      "$from" "$name" "$step"
    cp "$S/kept/${name}_$step.safetensors" "$S/$name/log.jsonl" "$OUT/"
    if [ "$step" -lt "$n" ] || [ -f "$S/$name/final.safetensors" ]; then break; fi    # time ran out, or done
  done
}
# `rcm_kept FROM EVERY ARGS...`: `kept rcm` with an open-ended schedule (`--steps 100000`), its log $OUT/rcm.log.
rcm_kept() { local from=$1 every=$2; shift 2; kept rcm "$from" "$every" "$@" --steps 100000; }
# `ship_file FILE [DEST]`: a release whose 4-step student is FILE (its weights history kept; the other files the
# shipped ones) into DEST (default turbovid/assets/mini), by `reproduce.ship` with FILE as the ode stage's output of a scratch run directory
# (to grade a candidate: its config.json records FILE's last stage as an ode round; session 28 shipped the release
# itself with recipe.mini, FILE as dmd/final.safetensors, so that config.json matches the recipe).
ship_file() {
  local r=runs/ship_file
  rm -rf "$r" && python3 docs/training/mini/device/assemble.py "$r" && mkdir -p "$r/ode" && cp "$1" "$r/ode/final.safetensors"
  python3 -c "import dataclasses, sys; from pathlib import Path; from turbovid.train.recipe import RECIPES
from turbovid.train.reproduce import ship
ship(dataclasses.replace(RECIPES['mini'], ship_student='ode'), Path(sys.argv[1]), Path(sys.argv[2]))" "$r" \
    "${2:-turbovid/assets/mini}"
}
# `ship_to FILE DIR`: FILE shipped as the student (ship_file) into runs/assets_<DIR's name>, its DiT files (the rest are
# the release's) copied to DIR: a candidate `eval_row` grades with STUDENT=DIR.
ship_to() {
  local a=runs/assets_$(basename "$2")
  ship_file "$1" "$a" > /dev/null
  mkdir -p "$2" && cp "$a/dit.safetensors" "$a/dit_int8.safetensors" "$2/"
}
# `eval_row NAME VARIANT CONFIG START [ARGS...]`: `turbovid eval ARGS` of CONFIG on held-out prompts START..START+255,
# through session29_checks/sage_numerics.py's eval: SageSLA run as VARIANT (fused | promote | ref), and with STUDENT=DIR
# in the environment a candidate's dit / dit_int8 files from DIR. JSON $OUT/NAME.json, its table row to $OUT/evals.log.
eval_row() {
  local name=$1 variant=$2 cfg=$3 start=$4; shift 4
  OMP_NUM_THREADS=3 python3 docs/training/mini/session29_checks/sage_numerics.py eval "$variant" --device cuda \
    --configs "$cfg" --start "$start" --count 256 --out "$OUT/$name.json" "$@" 2> "/tmp/progress_$name.log" \
    | sed -n 2p | sed "s|^|$name: |" >> "$OUT/evals.log"
}
# `eval_job CONFIG:START[:BLOCKS[:STUDENT[:SEED]]]`: eval_row of CONFIG (one of turbovid.eval.CONFIGS) on
# START..START+255 with the fused kernels; BLOCKS: `--sla-blocks BLOCKS`; STUDENT: a folder under runs/carry holding
# a candidate's dit / dit_int8 files, else the release's; SEED: `--seed`; plus the environment's EVAL_ARGS. Its JSON
# $OUT/[<STUDENT>_]<CONFIG>_start<START>[_b<BLOCKS>][_seed<SEED>].json.
eval_job() {
  local cfg start blocks student seed name args=()
  IFS=: read -r cfg start blocks student seed <<< "$1"
  name=${student:+${student//\//_}_}${cfg}_start$start
  if [ -n "$blocks" ]; then name=${name}_b$blocks args+=(--sla-blocks "$blocks"); fi
  if [ -n "$seed" ]; then name=${name}_seed$seed args+=(--seed "$seed"); fi
  STUDENT=${student:+runs/carry/$student} eval_row "$name" fused "$cfg" "$start" "${args[@]}" ${EVAL_ARGS:-}
}
# `pack NAME`: every JSON in $OUT into one archive, $OUT/NAME.tar (the device returns at most 8 files a command).
pack() { (cd "$OUT" && tar cf "$1.tar" ./*.json && rm ./*.json); }
# `turbo_eval NAME START`: `turbovid eval` of the full stack of the release in turbovid/assets on held-out prompts
# START..START+255, JSON to $OUT/NAME.json, the table row, labelled, to $OUT/evals.log.
turbo_eval() {
  python3 -m turbovid.cli eval --device cuda --configs turbo --start "$2" --count 256 --out "$OUT/$1.json" \
    2> /tmp/progress.log | sed -n 2p | sed "s|^|$1: |" | tee -a "$OUT/evals.log"
}
# `grade_students ANCHOR FILES...`: `train eval` dense, 4-step rCM, 128 held-out prompts of ANCHOR then each of FILES,
# one at a time in a fresh run directory (the anchor: a student already graded elsewhere, to place this machine's
# grades beside).
grade_students() {
  fresh runs/grade
  local f
  for f in "$@"; do
    check "$f dense" --count 128 --dit "$f" --attention dense --sampler rcm
  done
}
# `on_policy STEP FIT STOP VAL REPORTED`: the ode stage on policy with the teacher completing sampler call STEP's state
# (`--on-policy-step STEP`) from $S/sla/final.safetensors, its schedule fitted to the command minus FIT s and stopped
# STOP s before its end; that student shipped (ship_file) and graded on the validation prompts 1000..1255
# ($OUT/VAL.json), then, time allowing, on the reported 0..255 (REPORTED).
on_policy() {
  stage ode ode --on-policy --on-policy-step "$1" --steps 100000 --fit-minutes "$(minutes_left "$2")" \
    --max-minutes "$(minutes_left "$3")"
  ship_file "$S/ode/final.safetensors"
  turbo_eval "$4" 1000
  if [ "$(left)" -gt 110 ]; then turbo_eval "$5" 0; fi
}
# `keep_release` / `restore_release`: the release in turbovid/assets/mini copied to runs/release before a ship_file
# replaces it, and put back.
keep_release() { rm -rf runs/release && cp -r turbovid/assets/mini runs/release; }
restore_release() { rm -rf turbovid/assets/mini && cp -r runs/release turbovid/assets/mini; }
# `beside_release FILE NAME0 NAME2000`: the release kept, FILE shipped as its student (ship_file) and its full stack
# graded on the reported prompts 0..255 ($OUT/NAME0.json); time allowing, on 2000..2255 (NAME2000), then the kept
# release's on the same prompts (release_turbo_start2000).
beside_release() {
  keep_release
  ship_file "$1"
  turbo_eval "$2" 0
  if [ "$(left)" -gt 240 ]; then
    turbo_eval "$3" 2000
    restore_release && turbo_eval release_turbo_start2000 2000
  fi
}
# `on_validation LABEL=FILE ...`: the release kept, each FILE shipped as its student (ship_file) and its full stack
# graded on the validation prompts 1000..1255 ($OUT/LABEL_turbo_start1000.json) while 150 s are left; the release put
# back.
on_validation() {
  local lf
  keep_release
  for lf in "$@"; do
    if [ "$(left)" -gt 150 ]; then ship_file "${lf#*=}" && turbo_eval "${lf%%=*}_turbo_start1000" 1000; fi
  done
  restore_release
}
# `on_sets FILE START...`: the release kept, FILE shipped as its student and its full stack graded on the held-out
# prompts START..START+255 of each START ($OUT/<FILE's name>_turbo_startSTART.json) while 200 s are left; the release
# put back.
on_sets() {
  local file=$1 start; shift
  keep_release
  ship_file "$file"
  for start in "$@"; do
    if [ "$(left)" -gt 200 ]; then turbo_eval "$(basename "$file" .safetensors)_turbo_start$start" "$start"; fi
  done
  restore_release
}
