"""The weight average of two students of the same architecture (session 26's soup: the release's student and
session 25's DMD-alone student e, half each), stored in bf16 as a release stores it, with B's weights history plus a
`soup` record naming the weight. Usage: python soup.py A.safetensors B.safetensors OUT.safetensors [WEIGHT_OF_B=0.5]."""
import sys

from safetensors.torch import load_file

from turbovid.train.checkpoint import history_metadata, save_weights, weights_history

a_path, b_path, out = sys.argv[1:4]
w = float(sys.argv[4]) if len(sys.argv) > 4 else 0.5
a, b = load_file(a_path), load_file(b_path)
if a.keys() != b.keys():
    raise SystemExit(f"{a_path} and {b_path} hold different tensors")
soup = {k: ((1 - w) * a[k].float() + w * b[k].float()).bfloat16() if a[k].is_floating_point() else a[k] for k in a}
save_weights(out, soup, history_metadata([*weights_history(b_path), {"stage": "soup", "weight": w}]))
print(f"wrote {out}")
