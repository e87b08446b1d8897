"""Where do the 4-step students lose colour? For the held-out prompts whose colour every student row of
`benchmarks/results/eval_mini_h100_2026-11-23_run4.json` missed, plus a few every row got right (controls), this
renders each prompt with `turbovid eval`'s seed (its index) on this machine: the shipped teacher, 50 steps, at CFG 5
(its sampling CFG), 6 (the CFG rCM distils) and 8, and the shipped 4-step student; then reads the object's hue
(HSV degrees, mean of the pixels farther than 0.25 from the clip's background colour) at frames 0, 8, 16, 24, 32 and
the detector's colour.
    PYTHONPATH=. python docs/training/mini/session13_checks/colour_drift.py [--device cpu] [--controls 2]"""
import argparse
import colorsys
import json
from pathlib import Path

import torch

from turbovid.config import SampleConfig
from turbovid.pipeline import Pipeline
from turbovid.train.data import sample_clip
from turbovid.train.detect import detect
from turbovid.video import from_uint8_frames

HERE = Path(__file__).resolve().parent
RESULT = HERE.parents[3] / "benchmarks" / "results" / "eval_mini_h100_2026-11-23_run4.json"
FRAMES = (0, 8, 16, 24, 32)


def hues(video: torch.Tensor, bg: tuple[float, float, float]) -> list[int | None]:
    """video [3, F, H, W] in [-1, 1] -> the object's hue at FRAMES (None where under 5 object pixels)."""
    out = []
    for k in FRAMES:
        frame = (video[:, k].float() + 1) / 2
        mask = (frame - torch.tensor(bg).view(3, 1, 1)).abs().amax(0) > 0.25
        rgb = frame[:, mask].mean(1).tolist() if mask.sum() >= 5 else None
        out.append(None if rgb is None else round(colorsys.rgb_to_hsv(*rgb)[0] * 360))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--controls", type=int, default=2, help="prompts every row got right, rendered the same way")
    p.add_argument("--out", default=str(HERE / "colour_drift_cpu.json"))
    args = p.parse_args()
    rows = {r["config"]: r for r in json.loads(RESULT.read_text())["rows"]}
    clips = [sample_clip(0, "heldout", i) for i in range(rows["teacher"]["count"])]
    students = [name for name in rows if name.startswith("student") or name == "turbo"]
    missed = [i for i, c in enumerate(clips) if all(rows[n]["detections"][i]["color"] != c.color for n in students)]
    right = [i for i, c in enumerate(clips) if all(r["detections"][i]["color"] == c.color for r in rows.values())]
    teacher = Pipeline.load("mini", device=args.device, teacher=True)
    student = Pipeline.load("mini", device=args.device)
    out = []
    for i in missed + right[:args.controls]:
        clip = clips[i]
        entry = {"index": i, "caption": clip.caption, "color": clip.color, "missed_by_students": i in missed,
                 "truth_hue": round(colorsys.rgb_to_hsv(*clip.rgb)[0] * 360), "frames": list(FRAMES)}
        runs = [(f"teacher_cfg{g:g}", teacher, SampleConfig(steps=50, seed=i, guidance=g)) for g in (5.0, 6.0, 8.0)]
        for name, pipe, cfg in runs + [("student", student, SampleConfig(steps=4, seed=i))]:
            video = from_uint8_frames(pipe.generate(clip.caption, cfg).frames)
            entry[name] = {"hue": hues(video, clip.bg_rgb), "detected": detect(video)["color"]}
        out.append(entry)
        print(json.dumps(entry), flush=True)
    Path(args.out).write_text(json.dumps({"device": args.device, "source": RESULT.name, "clips": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
