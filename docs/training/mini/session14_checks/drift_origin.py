"""Where does the students' colour drift start? For the held-out clips of `session13_checks/colour_drift_cpu.json`
(8 whose colour every student row missed, 2 controls) this reads the object's hue drift (detect.hue_drift: last
quarter minus frame 0, degrees) of:
- the real clip (data.render) and its VAE round trip (the shipped VAE), so the data and the VAE are ruled in or out;
- the shipped 4-step student's clean-latent prediction x0 = x - s v after each of its 4 steps, decoded, and its video;
- the shipped teacher's (50 steps UniPC + CFG 5) x0 prediction at steps 1, 5, 10, 25 and 50, decoded.
Each generation is `Pipeline.generate` as `turbovid eval` runs it (seed = the prompt's index); the x0 predictions are
read by wrapping the sampler's velocity callback.
    PYTHONPATH=. python docs/training/mini/session14_checks/drift_origin.py [--device cpu]"""
import argparse
import json
from pathlib import Path

import torch

import turbovid.pipeline as pipeline
from turbovid.config import SampleConfig
from turbovid.pipeline import Pipeline
from turbovid.train.data import render, sample_clip
from turbovid.train.detect import hue_drift
from turbovid.video import from_uint8_frames

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent / "session13_checks" / "colour_drift_cpu.json"
TEACHER_STEPS = (1, 5, 10, 25, 50)


def recording(sampler, predictions: list):
    """`sampler` whose velocity callback also appends (step, x0 prediction) to `predictions`."""
    def run(velocity, noise, times, *args, **kwargs):
        def wrapped(x, t_net, step, s_cur):
            v = velocity(x, t_net, step, s_cur)
            predictions.append((step + 1, (x - s_cur * v.to(x.dtype)).float()))
            return v
        return sampler(wrapped, noise, times, *args, **kwargs)
    return run


def drift_of_latent(pipe: Pipeline, latent: torch.Tensor) -> float | None:
    return hue_drift(from_uint8_frames(pipe.decode_frames(latent)))


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(HERE / "drift_origin_cpu.json"))
    args = p.parse_args()
    indices = [c["index"] for c in json.loads(SOURCE.read_text())["clips"]]
    student = Pipeline.load("mini", device=args.device)
    teacher = Pipeline.load("mini", device=args.device, teacher=True)
    size, frames = 240, student.spec.num_frames
    out = []
    for i in indices:
        clip = sample_clip(0, "heldout", i)
        real = render(clip, size, frames)
        with torch.no_grad():
            latent = student.vae.encode(real[None].to(student.device, student.dtype)).float()
        entry = {"index": i, "caption": clip.caption, "real": rounded(hue_drift(real)),
                 "vae_round_trip": rounded(drift_of_latent(student, latent))}
        for name, pipe, sampler, cfg in (("student", student, "rcm_sample", SampleConfig(steps=4, seed=i)),
                                         ("teacher", teacher, "unipc_sample", SampleConfig(steps=50, seed=i))):
            predictions: list = []
            original = getattr(pipeline, sampler)
            setattr(pipeline, sampler, recording(original, predictions))
            try:
                video = from_uint8_frames(pipe.generate(clip.caption, cfg).frames)
            finally:
                setattr(pipeline, sampler, original)
            keep = TEACHER_STEPS if name == "teacher" else range(1, 5)
            entry[name] = {"video": rounded(hue_drift(video)),
                           "x0_after_step": {str(k): rounded(drift_of_latent(pipe, x0)) for k, x0 in predictions
                                             if k in keep}}
        out.append(entry)
        print(json.dumps(entry), flush=True)
    Path(args.out).write_text(json.dumps({"device": args.device, "source": SOURCE.name, "clips": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
