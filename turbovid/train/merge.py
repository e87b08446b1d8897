"""Task-arithmetic merge of the rCM student with the SLA fine-tuning delta (SPEC §10.1 step 3).

    merged[k] = base[k] + w * (target[k] - diff_base[k])     base = rCM student, diff_base = teacher,
                                                               target = SLA-tuned model
computed in fp32 and cast back to base[k]'s dtype, for keys present in all three with one shape.
Keys only in base (or whose shapes differ) are copied from base; keys only in target (SLA's
`...attn_op.local_attn.proj_l.*`) are copied from target.
"""
from __future__ import annotations

from pathlib import Path

import torch

from turbovid.train.checkpoint import history_metadata, save_weights, weights_history


def merge_state_dicts(base: dict[str, torch.Tensor], diff_base: dict[str, torch.Tensor],
                      diff_target: dict[str, torch.Tensor], weight: float = 1.0) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    for key, b in base.items():
        if key in diff_base and key in diff_target and b.shape == diff_base[key].shape == diff_target[key].shape \
                and b.is_floating_point():
            delta = diff_target[key].float() - diff_base[key].float()
            merged[key] = (b.float() + weight * delta).to(b.dtype)
        else:
            merged[key] = b.clone()
    for key, t in diff_target.items():
        if key not in base:
            merged[key] = t.clone()
    return merged


def merge_files(base: str | Path, diff_base: str | Path, diff_target: str | Path, out: str | Path,
                weight: float = 1.0) -> Path:
    """The same on checkpoint files (any format `turbovid.loading.read_state_dict` reads); writes safetensors.
    Its history (checkpoint.weights_history) is base's, then target's last stage (the change added), then
    {"stage": "merge", "weight": weight}."""
    from turbovid.loading import read_state_dict

    merged = merge_state_dicts(read_state_dict(base), read_state_dict(diff_base), read_state_dict(diff_target), weight)
    history = [*weights_history(base), *weights_history(diff_target)[-1:], {"stage": "merge", "weight": weight}]
    return save_weights(out, merged, metadata={"merge": f"base + {weight} * (target - diff_base)",
                                               **history_metadata(history)})
