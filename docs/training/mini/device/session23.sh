#!/usr/bin/env bash
# Session 23's device script. One GPU; the files as committed (turbovid/assets/mini = session 21's release).
# The question: is part of the full stack's gap to the teacher the SageSLA block sizes? The student's SLA was tuned
# at b_q x b_k = 128 x 64 (and SLA runs there on every GPU), but SageSLA on sm90 runs TurboDiffusion's 64 x 128
# (SpargeAttn's H100 tiles), so on the H100 the full stack selects other key blocks than the student was tuned with.
# On the CPU, where SageSLA runs 128 x 64, SageSLA reads level with SLA; on the H100 it has read 2-4 of 128 clips under
# SLA in every release's run. New: `--sla-blocks` (eval, generate, serve; `ModelSpec.sla_blocks`).
#   b1: the full stack at 64 x 128 (the default) and at 128 x 64, two processes side by side on the one GPU, on the
#       held-out sets in SETS (default 3000 0: the widest gap to the teacher first), a pair while 330 s are left.
source "$(dirname "$0")/prelude.sh" "$1"
# `blocks_eval NAME START BLOCKS`: turbo_eval with --sla-blocks BLOCKS, in the background.
blocks_eval() {
  python3 -m turbovid.cli eval --device cuda --configs turbo --start "$2" --count 256 --sla-blocks "$3" \
    --out "$OUT/$1.json" 2> "/tmp/progress_$1.log" | sed -n 2p | sed "s|^|$1: |" >> "$OUT/evals.log" &
}
case "$1" in
b1) for start in ${SETS:-3000 0}; do
      if [ "$(left)" -gt 330 ]; then
        t0=$(date +%s)
        blocks_eval "turbo_64x128_start$start" "$start" 64x128
        blocks_eval "turbo_128x64_start$start" "$start" 128x64
        wait
        echo "set $start: $(( $(date +%s) - t0 )) s"
      fi
    done
    cat "$OUT/evals.log" ;;
*)  echo "usage: session23.sh b1"
    exit 2 ;;
esac
