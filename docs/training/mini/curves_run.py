"""`curves.png` of the shipped stages, from the logs committed here: a scratch run directory whose stage folders hold
the shipped stages' logs (the files in SHIPPED, in the recipe's folder order), then `turbovid train plot` of it.
Usage: PYTHONPATH=. python docs/training/mini/curves_run.py [RUN_DIR] (default runs/mini_release)."""
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHIPPED = {   # run folder -> the log of the stage that made the release's weights
    "vae": "vae.jsonl",
    "teacher_round1": "teacher_round1.jsonl", "teacher_round2": "teacher_round2.jsonl",
    "teacher_round3": "teacher_round3.jsonl", "teacher_round4": "teacher.jsonl",
    "teacher_round5": "teacher_round5.jsonl", "teacher_round6": "teacher_round6.jsonl",
    "teacher": "teacher_round7.jsonl",
    "rcm": "rcm_session14_g6_scm.jsonl",
    "sla": "sla_session14.jsonl",
    "ode_round1": "ode_session20_q3_on_policy1.jsonl",
    "ode_round2": "ode_session21_r1_on_policy2.jsonl",
    "ode": "ode_session24_round3_from_stdout.jsonl",
    "dmd": "session28_checks/s28_s_log.jsonl",
}

run = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/mini_release")
shutil.rmtree(run, ignore_errors=True)
for folder, log in SHIPPED.items():
    (run / folder).mkdir(parents=True)
    shutil.copyfile(HERE / log, run / folder / "log.jsonl")
subprocess.run([sys.executable, "-m", "turbovid.cli", "train", "plot", "--run-dir", str(run),
                "--output", str(HERE / "curves.png")], check=True)
