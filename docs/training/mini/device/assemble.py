"""A training run directory from the shipped files of the embedded model (turbovid/assets/mini): VAE, its latent
statistics, text encoder, tokenizer, and the teacher as init/teacher.safetensors. Usage: assemble.py RUN_DIR."""
import json
import shutil
import sys
from pathlib import Path

run, assets = Path(sys.argv[1]), Path("turbovid/assets/mini")
for sub in ("vae", "init"):
    (run / sub).mkdir(parents=True, exist_ok=True)
shutil.copyfile(assets / "vae.safetensors", run / "vae" / "final.safetensors")
shutil.copyfile(assets / "text_encoder.safetensors", run / "text_encoder.safetensors")
shutil.copyfile(assets / "spiece.model", run / "spiece.model")
stats = json.loads((assets / "config.json").read_text())["vae_latent_stats"]
(run / "vae" / "latent_stats.json").write_text(json.dumps(stats))
shutil.copyfile(assets / "dit_teacher.safetensors", run / "init" / "teacher.safetensors")
# The rCM / SLA stages read the teacher from teacher/final.safetensors.
(run / "teacher").mkdir(exist_ok=True)
shutil.copyfile(assets / "dit_teacher.safetensors", run / "teacher" / "final.safetensors")
