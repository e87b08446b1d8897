"""Does the shipped 4-step student's sampler setting cost it adherence or colour? Renders validation prompts
(held-out captions 128.. , past the 128 that `turbovid eval` grades, so nothing here is tuned on the eval set) with
the shipped student (dense attention) under several rCM sampler settings: the default (4 steps, SDE, sigma_max 80),
ODE, fewer steps, and other sigma_max values; seed = the prompt's index. Reports the detector's adherence and the
mean |hue drift| per setting.
    PYTHONPATH=. python docs/training/mini/session14_checks/sampler_study.py [--count 64] [--device cpu]"""
import argparse
import json
import time
from pathlib import Path

from turbovid.config import SampleConfig
from turbovid.pipeline import Pipeline
from turbovid.train.data import sample_clip
from turbovid.train.detect import adherence, prompt_right
from turbovid.video import from_uint8_frames

HERE = Path(__file__).resolve().parent
FIRST = 128   # the validation prompts start where turbovid eval's 128 end

SETTINGS = {
    "sde4_s80": SampleConfig(steps=4),
    "ode4_s80": SampleConfig(steps=4, ode=True),
    "sde3_s80": SampleConfig(steps=3),
    "sde2_s80": SampleConfig(steps=2),
    "sde1_s80": SampleConfig(steps=1),
    "sde4_s20": SampleConfig(steps=4, sigma_max=20.0),
    "sde4_s200": SampleConfig(steps=4, sigma_max=200.0),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--count", type=int, default=64)
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--out", default=str(HERE / "sampler_study_cpu.json"))
    args = p.parse_args()
    clips = [sample_clip(0, "heldout", FIRST + i) for i in range(args.count)]
    pipe = Pipeline.load("mini", device=args.device)
    rows = []
    for name in args.settings.split(","):
        base = SETTINGS[name]
        t0 = time.perf_counter()
        videos = []
        for i, clip in enumerate(clips):
            cfg = SampleConfig(steps=base.steps, ode=base.ode, sigma_max=base.sigma_max, seed=FIRST + i)
            videos.append(from_uint8_frames(pipe.generate(clip.caption, cfg).frames))
        s = adherence(videos, [c.attributes() for c in clips])
        row = {"setting": name, "steps": base.steps, "ode": base.ode, "sigma_max": base.sigma_max,
               **{k: s[k] for k in ("all", "color", "shape", "direction", "hue_drift")},
               "drifts": [d["hue_drift"] for d in s["detections"]],
               "missed": [FIRST + i for i, (d, c) in enumerate(zip(s["detections"], clips))
                          if not prompt_right(d, c.attributes())],
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"{name:<10} all {row['all']:.3f} colour {row['color']:.3f} shape {row['shape']:.3f} "
              f"dir {row['direction']:.3f} drift {row['hue_drift']:.1f} ({row['seconds']:.0f} s)", flush=True)
        Path(args.out).write_text(json.dumps({"device": args.device, "first": FIRST, "count": args.count,
                                              "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
