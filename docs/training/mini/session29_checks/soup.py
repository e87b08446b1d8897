"""Session 29: a uniform weight average ("model soup") of DMD students, for grading beside the release.
Usage: python soup.py OUT.safetensors A.safetensors B.safetensors ... (averaged in fp32, stored in bf16 as a release
stores its student; weights history: A's, plus a "soup" record naming the files)."""
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from turbovid.train.checkpoint import history_metadata, save_weights, weights_history

out, files = sys.argv[1], sys.argv[2:]
if len(files) < 2:
    raise SystemExit(__doc__)
states = [load_file(f) for f in files]
if any(s.keys() != states[0].keys() for s in states):
    raise SystemExit("the files hold different tensors")
soup = {k: (torch.stack([s[k].float() for s in states]).mean(0).bfloat16() if v.is_floating_point() else v)
        for k, v in states[0].items()}
history = weights_history(files[0]) + [{"stage": "soup", "steps": 0, "of": [Path(f).name for f in files]}]
save_weights(out, soup, history_metadata(history))
print(f"{out}: mean of {len(files)} files, {sum(v.numel() for v in soup.values())} values")
