"""A training run directory from the shipped files of the embedded model (turbovid/assets/mini): VAE, its latent
statistics, text encoder, tokenizer, the teacher as init/teacher.safetensors and teacher/final.safetensors, and the
4-step student as sla/final.safetensors (what the ode stage continues; a `train sla` run there replaces it).
The teacher and VAE copies carry their weights history (turbovid.train.checkpoint.weights_history): the shipped
file's own, or for a release shipped before files kept one, the stages its config.json records. So the stages
run in this directory, and `train ship` from it, count every step behind the release. Usage: assemble.py RUN_DIR."""
import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file

from turbovid.train.checkpoint import history_metadata, save_weights, weights_history

run, assets = Path(sys.argv[1]), Path("turbovid/assets/mini")
config = json.loads((assets / "config.json").read_text())
stages = config["stages"]
recorded = {"dit_teacher": [{"stage": "teacher", "steps": n} for n in stages["teacher"]["rounds"]],
            "vae": [{"stage": name, "steps": stages[name]["steps"]} for name in ("vae", "vae_decoder") if name in stages]}


def copy(role: str, dest: Path) -> None:
    src = assets / f"{role}.safetensors"
    history = weights_history(src) or recorded[role]
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_weights(dest, load_file(str(src)), metadata={"source": src.as_posix(), **history_metadata(history)})


copy("vae", run / "vae" / "final.safetensors")
shutil.copyfile(assets / "text_encoder.safetensors", run / "text_encoder.safetensors")
shutil.copyfile(assets / "spiece.model", run / "spiece.model")
(run / "vae" / "latent_stats.json").write_text(json.dumps(config["vae_latent_stats"]))
if "vae_reconstruction" in config:   # the VAE's report, which `train ship` puts back in config.json
    (run / "vae" / "reconstruction.json").write_text(json.dumps(config["vae_reconstruction"], indent=1))
copy("dit_teacher", run / "init" / "teacher.safetensors")
copy("dit_teacher", run / "teacher" / "final.safetensors")   # the rCM / SLA stages read the teacher from here
copy("dit", run / "sla" / "final.safetensors")    # the SLA-tuned rCM student (sessions 14-19), then it after ode (20, 21)
