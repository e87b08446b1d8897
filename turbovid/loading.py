"""Checkpoint loading: official Wan, TurboDiffusion and diffusers formats -> our modules.

Official names are our names: a TurboDiffusion or official Wan state dict loads into our modules
with `strict=True` after at most a reshape (Conv3d patch embedding) or a prefix strip (`net.`).
Every other format has one explicit mapping function below and a round-trip test.
Pickles are only ever opened with `torch.load(weights_only=True, mmap=True)`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or of the wrong model; the message is one line."""


def _load_one(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # old (non-zip) serialisation cannot be memory-mapped
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        # Training-style wrappers ({"state_dict": ...}, {"model": ...}) around the tensors.
        for wrapper in ("state_dict", "model", "module"):
            if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
                obj = obj[wrapper]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{path}: not a state dict of tensors")
        return dict(obj)
    raise CheckpointError(f"{path}: unknown checkpoint type {path.suffix!r} (expected .safetensors or .pth)")


def _load_sharded(index: Path) -> dict[str, torch.Tensor]:
    weight_map = json.loads(index.read_text())["weight_map"]
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(_load_one(index.parent / shard))
    missing = set(weight_map) - set(state)
    if missing:
        raise CheckpointError(f"{index}: shards lack {len(missing)} tensors named in the index, e.g. {min(missing)}")
    return state


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint into CPU memory (memory-mapped where possible).

    `path` may be a .safetensors / .pth file, a `*.safetensors.index.json` shard index, or a folder
    holding one of those (official Wan and diffusers folders). A leading `net.` prefix (training
    exports) is stripped.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.is_dir():
            indexes = sorted(path.glob("*.safetensors.index.json"))
            singles = sorted(path.glob("*.safetensors")) or sorted(
                p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if indexes:
                state = _load_sharded(indexes[0])
            elif len(singles) == 1:
                state = _load_one(singles[0])
            elif singles:
                state = {}
                for p in singles:
                    state.update(_load_one(p))
            else:
                raise CheckpointError(f"{path}: folder holds no .safetensors or .pth checkpoint")
        elif path.name.endswith(".index.json"):
            state = _load_sharded(path)
        else:
            state = _load_one(path)
    except CheckpointError:
        raise
    except Exception as e:  # corrupt or truncated files: one line, not a traceback
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if state and all(k.startswith("net.") for k in state):
        state = {k[len("net."):]: v for k, v in state.items()}
    return state


# ---- DiT formats (official Wan, TurboDiffusion, diffusers) --------------------------------------
# (begin DiT section)
# (end DiT section)

# ---- VAE formats (official Wan2.1_VAE.pth, diffusers AutoencoderKLWan) --------------------------
# (begin VAE section)
# (end VAE section)

# ---- umT5 text encoder formats (Wan models_t5_umt5-xxl-enc-bf16.pth, HF UMT5EncoderModel) -------
# (begin text encoder section)
# (end text encoder section)
