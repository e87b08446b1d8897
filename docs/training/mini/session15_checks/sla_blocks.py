"""Does the shipped student's SLA prefer other block sizes? Session 15's quantization-aware fine-tune logged the
student's output 10-25% closer to its dense target with SageSLA at 64 x 128 blocks (query x key; what SageSLA runs on
sm90) than with SLA at 128 x 64 (what SLA trains and runs with). This grades the `turbovid eval` rows student_sla and
student_sagesla (the shipped student at its default top-k, 0.75) with both block sizes on validation prompts
(held-out captions 128.., past the 128 that `turbovid eval` grades; seed = the prompt's index).
    PYTHONPATH=. python docs/training/mini/session15_checks/sla_blocks.py [--count 64] [--device cpu]"""
import argparse
import json
from pathlib import Path

from turbovid import eval as ev
from turbovid.train.data import sample_clip

HERE = Path(__file__).resolve().parent
FIRST = 128   # the validation prompts start where turbovid eval's 128 end
BLOCKS = ((128, 64), (64, 128))
SCORES = ("all", "color", "shape", "direction")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--count", type=int, default=64)
    p.add_argument("--out", default=str(HERE / "sla_blocks_cpu.json"))
    args = p.parse_args()
    clips = [sample_clip(0, "heldout", FIRST + i) for i in range(args.count)]
    real = ev._real_features(clips, 240, 33)
    rows = []
    for config in ("student_sla", "student_sagesla"):
        for blocks in BLOCKS:
            row = ev.evaluate_config(config, clips, model="mini", device=args.device, seed=FIRST, real=real,
                                     log=lambda msg: None, sla_blocks=blocks)
            rows.append({"setting": f"{config}_{blocks[0]}x{blocks[1]}", "block_q": blocks[0], "block_k": blocks[1],
                         **row})
            print(" ".join([f"{rows[-1]['setting']:<24}"] + [f"{k} {row[k]:.3f}" for k in SCORES]), flush=True)
    Path(args.out).write_text(json.dumps({"device": args.device, "first": FIRST, "count": args.count, "rows": rows},
                                         indent=1) + "\n")


if __name__ == "__main__":
    main()
