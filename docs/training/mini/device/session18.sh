#!/usr/bin/env bash
# Session 18's device script. One GPU; each command may get a new machine. As run (one H100): s1; a command that
# copied t1's last two EMA checkpoints (runs/s18t/rcm/checkpoints/step_*/ema.safetensors) from the still-warm machine,
# because the device returns at most 8 files and t1's students were left out; q2 on those (converted to bf16 and
# carried as runs/carry/s18b: s14_rcm, t1_750, t1_837, q1_574); a1 (all sets at once: none finished); a1 again, one
# set at a time; a2; START=2000 ANGLES="1.3,1.0,0.6 1.5,1.4,1.0 1.5,1.0,0.6" a1.
# Two questions about the sCM student. The shipped student is the EMA of 500 sCM steps from the shipped teacher,
# tangent weight r ramped 0 -> 1 over those steps (tangent warm-up 500), x0 = encoded data clips. Every run past
# r = 1 lost clips (`train eval` dense, 128 held-out prompts, CPU): session 16 at lr 2e-5, 0.852 -> 0.750 by step 864;
# session 17 continued the shipped student at lr 5e-6, 0.836 -> 0.805 by 1098 more steps.
#   t1: the data rCM distils on (SPEC §5.2): its student learns from latents the teacher family sampled, ours from
#       the encoded clips. Here x0 are ${DATA:-2048} samples the shipped teacher draws for training captions
#       (`train rcm --teacher-data`: UniPC 50 steps, CFG, the sampler its 0.914 is graded with), everything else the
#       shipped recipe (sCM alone, warm-up 500, lr 2e-5, batch 8). The EMA student every 250 steps, in bf16.
#   q1: the tangent ramped in four times slower (warm-up ${WARMUP:-2000}: r = 0.25 at step 500, 0.5 at 1000), the
#       encoded clips as data; the EMA student every ${EVERY:-500} steps, in bf16.
#   s1: t1 and q1 side by side on the one GPU (rCM at batch 8 leaves it mostly idle), each into its own $OUT folder
#       ($OUT/t1, $OUT/q1) and run directory.
#   q2: `train eval` dense on 128 held-out prompts of session 14's student (the anchor: 0.852 on the H200, 0.836 on
#       the CPU) and of each student carried as runs/carry/s18b/*.safetensors. Or on the CPU, 15 min each:
#       PYTHONPATH=. python3 -m turbovid.cli train eval --run-dir RUN --count 128 --dit FILE --attention dense
#       --sampler rcm (RUN from assemble.py).
#   a1: the rCM sampler's middle TrigFlow angles (`turbovid eval --mid-angles`; rCM's 1.5,1.4,1.0 by default, SPEC
#       §5.1 keeps an older 1.3,1.0,0.6), the full stack of the release on the validation prompts 1000..1255, one
#       set after another, JSON $OUT/angles_<set, commas as _>.json, the table rows to $OUT/angles.log (not
#       prelude's release_eval: its two logs per set would pass the device's 8 returned files). (As first
#       run, all seven sets at once, each in its own process on the one GPU, none finished in the command's time.)
#   a2: the best of a1 (SET) on the reported prompts 0..255, the teacher beside it.
#   Then, for a student that reads higher: session16.sh m2 (SLA fine-tune + ship; carry it as
#   runs/carry/s16/rcm.safetensors) and m3 (the release's grade, teacher beside it; COUNT=256).
source "$(dirname "$0")/prelude.sh" "$1"
export BF16=1
t1() { fresh runs/s18t; rcm_kept "$S/teacher/final.safetensors" 250 --no-dmd --teacher-data "${DATA:-2048}"; }
q1() { fresh runs/s18; rcm_kept "$S/teacher/final.safetensors" "${EVERY:-500}" --no-dmd --tangent-warmup "${WARMUP:-2000}"; }
case "$1" in
t1) t1 ;;
q1) q1 ;;
s1) for g in t1 q1; do
      ( OUT=$OUT/$g && mkdir -p "$OUT" && $g > "$OUT/out.log" 2>&1 ) &
    done
    wait
    tail -n 3 "$OUT"/*/out.log ;;
a1) for set in ${ANGLES:-1.5,1.4,1.0 1.3,1.0,0.6 1.5,1.2,0.8 1.5,1.0,0.6 1.4,1.1,0.8 1.5,1.3,1.1}; do
      if [ "$(left)" -lt 75 ]; then echo "time: stopped before $set"; break; fi
      python3 -m turbovid.cli eval --device cuda --configs turbo --start "${START:-1000}" --count "${COUNT:-256}" \
        --mid-angles "$set" --out "$OUT/angles_${set//,/_}.json" 2> /tmp/progress.log \
        | sed -n 2p | sed "s|^|mid angles $set: |" | tee -a "$OUT/angles.log"
    done ;;
q2) grade_students runs/carry/s18b/s14_rcm.safetensors runs/carry/s18b/t1_*.safetensors runs/carry/s18b/q1_*.safetensors ;;
a2) release_eval eval_mini_h100_2026-11-23_run10_angles_n256.json --configs teacher,turbo --count 256 \
      --mid-angles "${SET:-1.3,1.0,0.6}" ;;
*)  echo "usage: session18.sh t1|q1|s1|q2|a1|a2 (t1: DATA; q1: WARMUP, EVERY; a1: ANGLES, START, COUNT; a2: SET)"
    exit 2 ;;
esac
