"""Resumable training checkpoints: safetensors for weights, torch state for the rest, atomic writes.

Layout of one stage directory:
    checkpoints/step_00001000/{model,ema,...}.safetensors   weights (one file per network)
    checkpoints/step_00001000/state.pt                      step, optimizer states, anything else
    checkpoints/latest                                      name of the newest complete checkpoint
A checkpoint is written into a hidden temporary folder and renamed into place, and `latest` is
replaced atomically afterwards, so a crash at any point leaves the previous checkpoint usable.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied embeddings) and non-contiguous views.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_weights(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Atomically write one safetensors file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(_plain(state), str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)
    return path


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(path), device=str(device))


def weights_history(path: str | Path) -> list[dict]:
    """What produced a safetensors weights file, oldest stage first: its "history" metadata (a JSON list of
    {"stage": name, "steps": n, ...}, written by `drive`, `train merge` and `train ship`). A file from before the
    history existed yields the one stage its "stage"/"steps" metadata names, or [] if it has neither (or is not a
    safetensors file: --init of a VAE reads the official formats too)."""
    if Path(path).suffix != ".safetensors":
        return []
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "history" in meta:
        return json.loads(meta["history"])
    if "stage" in meta and "steps" in meta:
        return [{"stage": meta["stage"], "steps": int(meta["steps"])}]
    return []


def history_metadata(history: list[dict]) -> dict[str, str]:
    """The safetensors metadata entry that `weights_history` reads back."""
    return {"history": json.dumps(history)}


def save_checkpoint(root: str | Path, step: int, weights: dict[str, dict[str, torch.Tensor]], state: dict,
                    keep: int = 2) -> Path:
    """Write checkpoints/step_<step>/ under `root`, point `latest` at it, keep the newest `keep`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, tensors in weights.items():
        save_file(_plain(tensors), str(tmp / f"{name}.safetensors"))
    torch.save({**state, "step": step}, tmp / "state.pt")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():   # a rerun of the same step: replace it
        shutil.rmtree(final)
    tmp.rename(final)
    pointer = root / f".{LATEST}.tmp-{os.getpid()}"
    pointer.write_text(final.name + "\n")
    pointer.replace(root / LATEST)
    _fsync_dir(root)
    old = sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep] if keep > 0 else []
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if (path / "state.pt").is_file() else None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(weights by network name, state) of one checkpoint folder."""
    path = Path(path)
    if not (path / "state.pt").is_file():
        raise ValueError(f"{path} is not a training checkpoint (no state.pt)")
    weights = {f.stem: load_weights(f, device) for f in sorted(path.glob("*.safetensors"))}
    # Optimizer states hold only tensors, numbers and lists, so the safe loader reads them.
    state = torch.load(path / "state.pt", map_location=device, weights_only=True)
    return weights, state
