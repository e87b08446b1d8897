"""Per-attribute tally of `turbovid eval` full-stack grades over held-out sets (session 27): for each labelled model,
the clips right (colour, shape and direction, detect.prompt_right) per shape, size and speed, summed over the sets,
and the shape each reads where the first model (the reference, e.g. the teacher) is right and it is not.
Usage: python by_attribute.py LABEL=START:FILE[,START:FILE...] ... (one argument per model; ROW=config picks a row
of a many-row JSON, e.g. teacher=0:f.json#teacher)."""
import collections
import json
import sys

from turbovid.train.data import sample_clip
from turbovid.train.detect import prompt_right


def grades(spec: str) -> dict[int, list]:
    out = {}
    for part in spec.split(","):
        start, path = part.split(":", 1)
        path, _, config = path.partition("#")
        d = json.load(open(path))
        row = next(r for r in d["rows"] if r["config"] == config) if config else d["rows"][0]
        if d["start"] != int(start):
            raise SystemExit(f"{path} starts at {d['start']}, not {start}")
        out[int(start)] = row["detections"]
    return out


models = [(a.split("=", 1)[0], grades(a.split("=", 1)[1])) for a in sys.argv[1:]]
sets = sorted(models[0][1])
if any(sorted(g) != sets for _, g in models):
    raise SystemExit("every model needs the same sets")
tally, total, misread = collections.Counter(), collections.Counter(), collections.Counter()
for start in sets:
    for i, _ in enumerate(models[0][1][start]):
        truth = sample_clip(0, "heldout", start + i).attributes()
        right = {name: prompt_right(g[start][i], truth) for name, g in models}
        for key in ("shape", "size", "speed"):
            total[(key, truth[key])] += 1
            for name, ok in right.items():
                tally[(key, truth[key], name)] += ok
        for name, g in models[1:]:
            if right[models[0][0]] and not right[name]:
                misread[(name, truth["size"], truth["shape"], str(g[start][i].get("shape")))] += 1
print(f"sets {sets}, {sum(len(models[0][1][s]) for s in sets)} clips")
print("attribute".ljust(20) + "clips".rjust(6) + "".join(n.rjust(9) for n, _ in models))
for key in sorted(total):
    print(f"{key[0]} {key[1]}".ljust(20) + str(total[key]).rjust(6) + "".join(str(tally[(*key, n)]).rjust(9) for n, _ in models))
print("all".ljust(20) + str(sum(total[k] for k in total if k[0] == 'shape')).rjust(6)
      + "".join(str(sum(tally[k] for k in tally if k[0] == 'shape' and k[2] == n)).rjust(9) for n, _ in models))
print(f"\nwhere {models[0][0]} is right and the model is not (model, size, shape, shape read), 3 or more:")
for k, c in misread.most_common():
    if c >= 3:
        print(c, k)
