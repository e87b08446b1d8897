"""Paired per-clip comparison of two `turbovid eval` JSONs of the same prompts and seeds (session 24): how many clips
each gets right alone (colour, shape and direction, detect.prompt_right) and the exact two-sided McNemar p.
Usage: python paired.py A.json B.json [A2.json B2.json ...] (pairs; the totals pool them); FILE#config grades that
row of a many-row JSON (default: the first row)."""
import json
import math
import sys

from turbovid.train.data import sample_clip
from turbovid.train.detect import prompt_right


def right(path: str) -> tuple[int, list[bool]]:
    path, _, config = path.partition("#")
    d = json.load(open(path))
    row = next(r for r in d["rows"] if r["config"] == config) if config else d["rows"][0]
    truth = [sample_clip(0, "heldout", d["start"] + i).attributes() for i in range(d["count"])]
    return d["start"], [prompt_right(found, t) for found, t in zip(row["detections"], truth)]


def mcnemar(a_only: int, b_only: int) -> float:
    n = a_only + b_only
    k = min(a_only, b_only)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0


totals = [0, 0, 0, 0]
files = sys.argv[1:]
for fa, fb in zip(files[::2], files[1::2]):
    (sa, a), (sb, b) = right(fa), right(fb)
    if sa != sb or len(a) != len(b):
        raise SystemExit(f"{fa} and {fb} grade different prompts")
    counts = [sum(a), sum(b), sum(x and not y for x, y in zip(a, b)), sum(y and not x for x, y in zip(a, b))]
    totals = [t + c for t, c in zip(totals, counts)]
    print(f"start {sa}: A {counts[0]}, B {counts[1]} of {len(a)}; A alone {counts[2]}, B alone {counts[3]}, "
          f"p = {mcnemar(counts[2], counts[3]):.3g}")
print(f"pooled: A {totals[0]}, B {totals[1]}; A alone {totals[2]}, B alone {totals[3]}, "
      f"p = {mcnemar(totals[2], totals[3]):.3g}")
