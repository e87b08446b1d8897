"""The one-GPU replay probe of session 32 (`device/session32.sh p`): every stage of `train reproduce --recipe mini` cut
to its 25 time-fitting steps, then the evaluations and the export, on one H100. This reads the probe's stdout
(replay.log, one Unix timestamp per line) and GPU-memory samples (replay_gpu_memory.csv) and projects the full
replay's time on that GPU: each stage's fitted rate (steps/s over its steps 5..25, printed by `drive`) times the steps
recipe.mini gives it, plus what the probe spent outside the training steps (latent pool, compiles, evaluations).
Writes replay_projection_h100.json beside it and prints a table.

    PYTHONPATH=. python3 docs/training/mini/session32_checks/replay_projection.py
"""
import csv
import datetime
import json
import re
from pathlib import Path

from turbovid.train.recipe import RECIPES

HERE = Path(__file__).resolve().parent


def stages(recipe):
    """(name, steps, global batch) of each drive()n stage in the order `reproduce` runs them."""
    run = [("vae", recipe.vae_stage.run)]
    run += [(f"teacher round {i + 1}", t.run) for i, t in enumerate(recipe.teacher_stages)]
    run += [("rcm", recipe.rcm.run), ("sla", recipe.sla.run)]
    run += [(f"ode round {i + 1}", o.run) for i, o in enumerate(recipe.ode_stages)]
    run += [("dmd", recipe.dmd_round.run)]
    return [(name, s.steps, s.batch * s.gpus) for name, s in run]


def main():
    recipe = RECIPES["mini"]
    lines = [line.split(" ", 1) for line in (HERE / "replay.log").read_text().splitlines()]
    fitted = [(int(t), float(m.group(1))) for t, text in lines
              if (m := re.search(r"\] ([0-9.]+) steps/s: schedule fitted to 25 steps", text))]
    plan = stages(recipe)
    assert len(fitted) == len(plan), (len(fitted), len(plan))
    done = next(int(t) for t, text in lines if text.startswith("done:"))
    with open(HERE / "replay_gpu_memory.csv") as f:
        samples = list(csv.reader(f))[1:]
    peak_mib = max(int(row[1].split()[0]) for row in samples)
    # the run starts with the memory log (the same second); its first stdout line comes after the text encoder is
    # built and the VAE's first step (both clocks UTC)
    started = datetime.datetime.strptime(samples[0][0], "%Y/%m/%d %H:%M:%S.%f").replace(tzinfo=datetime.timezone.utc)
    first = min(int(lines[0][0]), int(started.timestamp()))
    rows, step_seconds = [], 0.0
    for (name, steps, batch), (_, rate) in zip(plan, fitted):
        seconds = steps / rate
        step_seconds += seconds
        rows.append({"stage": name, "steps": steps, "global_batch": batch, "steps_per_s": rate,
                     "projected_s": round(seconds, 1)})
    probe_steps = sum(25 / rate for _, rate in fitted)
    probe_wall = done - first
    other = probe_wall - probe_steps           # pool encode, model builds, compiles, checkpoints, evaluations
    total = step_seconds + other
    result = {"gpu": "NVIDIA H100 80GB HBM3", "recipe": "mini", "date": "2026-11-25",
              "command": "turbovid train reproduce --run-dir runs/replay --fit-minutes 0.01 (device/session32.sh p)",
              "probe_wall_s": probe_wall, "probe_training_steps_s": round(probe_steps, 1),
              "probe_other_s": round(other, 1), "peak_gpu_memory_mib": peak_mib, "stages": rows,
              "projected_training_steps_s": round(step_seconds), "projected_total_s": round(total),
              "projected_total_h": round(total / 3600, 2)}
    (HERE / "replay_projection_h100.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'stage':<18}{'steps':>7}{'batch':>7}{'steps/s':>9}{'projected':>11}")
    for r in rows:
        print(f"{r['stage']:<18}{r['steps']:>7}{r['global_batch']:>7}{r['steps_per_s']:>9.2f}{r['projected_s'] / 60:>9.1f} m")
    print(f"probe: {probe_wall} s wall, {probe_steps:.0f} s of it training steps, {other:.0f} s the rest; "
          f"peak GPU memory {peak_mib} MiB")
    print(f"projected full replay: {step_seconds / 3600:.2f} h of steps + {other / 60:.1f} min = {total / 3600:.2f} h")


if __name__ == "__main__":
    main()
