"""The frozen parts of a training run and the batches they make: tokenizer, text encoder, trained VAE.

Run directory (everything a later stage or the export needs is written here once, by rank 0):
    spiece.model                  tokenizer (a copy of the shipped asset, rebuilt if missing)
    text_encoder.safetensors      the frozen umT5: a seeded random init (HF UMT5EncoderModel names)
    vae/final.safetensors         trained VAE (official Wan2.1 VAE names)
    vae/latent_stats.json         per-channel latent mean/std measured after VAE training

The text encoder is never trained: like Wan's umT5 it is a fixed feature extractor, here a random one.
Its token embeddings are distinct random vectors and two residual layers keep them recognisable, which is
all the DiT's cross-attention needs to read colour, shape and direction words.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import time
from pathlib import Path

import torch

from turbovid.config import WAN_NEGATIVE_PROMPT, VAEConfig
from turbovid.models.text_encoder import TextEncoder, make_umt5
from turbovid.models.vae import WanVAE
from turbovid.train.checkpoint import save_weights
from turbovid.train.data import Clip, ProceduralVideos
from turbovid.train.loop import Env
from turbovid.train.recipe import Recipe
from turbovid.train.tokenizer import ASSET, build_spiece

VAE_ENCODE_CHUNK = 4   # clips per VAE call when encoding a batch (bounds activation memory)


def tokenizer_file(run_dir: Path, env: Env) -> Path:
    path = Path(run_dir) / "spiece.model"
    if env.main and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        if ASSET.is_file():
            shutil.copyfile(ASSET, path)
        else:
            build_spiece(path)
    env.barrier()
    return path


def build_text_encoder(recipe: Recipe, run_dir: Path, env: Env) -> TextEncoder:
    """The run's frozen text encoder (created from `recipe.text_seed` on first use, then read back)."""
    from turbovid.loading import load_text_encoder

    path = Path(run_dir) / "text_encoder.safetensors"
    tok = tokenizer_file(run_dir, env)
    if env.main and not path.exists():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.text_seed)
            model = make_umt5(recipe.text)
        state = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied copy
        save_weights(path, state, metadata={"seed": str(recipe.text_seed)})
    env.barrier()
    return load_text_encoder(str(path), tok, recipe.text, device=env.device, dtype=torch.float32)


def vae_config(recipe: Recipe, run_dir: Path) -> VAEConfig:
    """The recipe's VAE config with the latent statistics measured after VAE training."""
    stats = json.loads((Path(run_dir) / "vae" / "latent_stats.json").read_text())
    return dataclasses.replace(recipe.vae, mean=tuple(stats["mean"]), std=tuple(stats["std"]))


def trained_vae_file(recipe: Recipe, run_dir: Path, decode: bool = True) -> Path:
    """The run's VAE weights: vae/ from the vae stage, or vae_decoder/ when the recipe fine-tunes the decoder
    and the VAE is for decoding (both files hold the same encoder, so encoding never waits for that stage)."""
    stage = "vae_decoder" if decode and recipe.vae_decoder is not None else "vae"
    return Path(run_dir) / stage / "final.safetensors"


def load_trained_vae(recipe: Recipe, run_dir: Path, env: Env, decode: bool = True) -> WanVAE:
    from turbovid.loading import load_vae

    path = trained_vae_file(recipe, run_dir, decode)
    if not path.is_file():
        raise ValueError(f"{path} not found: run `turbovid train {path.parent.name}` first")
    dtype = torch.bfloat16 if env.device.type == "cuda" else torch.float32   # TurboDiffusion runs it in bf16
    return load_vae(str(path), vae_config(recipe, run_dir), device=env.device, dtype=dtype)


@torch.no_grad()
def encode_videos(vae: WanVAE, videos: torch.Tensor) -> torch.Tensor:
    """[B, 3, F, H, W] in [-1, 1] -> normalised latents [B, 16, T, h, w] fp32 (one pass per chunk of clips)."""
    return torch.cat([vae.encode_reference(v.to(vae.dtype)).float() for v in videos.split(VAE_ENCODE_CHUNK)])


class LatentBatches:
    """Training inputs for the DiT stages: clips -> VAE latents, captions -> text embeddings.

    pool = 0: every batch is rendered and VAE-encoded on the fly. pool = P > 0: this rank encodes P / world
    clips once (global clip indices rank, rank + world, ...), keeps their bf16 latents on the device and
    caches them in run_dir/pool/ for the later stages; batch index i then reads slot perm_e[i mod P'] with
    a fresh seeded permutation per pass e = i // P' (P' = this rank's pool). At the mini size encoding
    costs about as much as a DiT training step, so the pool makes the DiT stages ~2x faster.

    oversample = ((value, k), ...) (pool only): a pooled clip with any of the attribute values named appears
    k times in each pass (the factors of every value it has multiplied), so P' counts those repeats."""

    POOL_CHUNK = 32      # clips per _pool_chunk call when the pool is built

    def __init__(self, recipe: Recipe, run_dir: Path, env: Env, split: str = "train", pool: int = 0,
                 oversample: tuple[tuple[str, int], ...] = ()):
        if oversample and pool <= 0:
            raise ValueError("oversampling picks clips of the latent pool: the recipe needs pool_clips > 0")
        self.env, self.recipe, self.run_dir = env, recipe, Path(run_dir)
        self.data = ProceduralVideos(split, recipe.size, recipe.frames, recipe.data_seed)
        self.text = build_text_encoder(recipe, run_dir, env)
        self.negative = self.text.encode([WAN_NEGATIVE_PROMPT]).float()   # [1, text_len, text_dim]
        self.pool_latents: torch.Tensor | None = None
        self._perm: tuple[int, torch.Tensor] | None = None
        if pool > 0:
            self._load_or_build_pool(split, pool)
            self._slots = self._repeats(dict(oversample))

    @functools.cached_property
    def vae(self) -> WanVAE:
        """The run's VAE, to encode with; loaded on first use (a cached pool, or the teacher's samples, need none)."""
        return load_trained_vae(self.recipe, self.run_dir, self.env, decode=False)

    def _pool_file(self, split: str, pool: int) -> Path:
        return self.run_dir / "pool" / f"{split}_{pool}_rank{self.env.rank}of{self.env.world}.safetensors"

    def encode(self, indices: list[int]) -> tuple[torch.Tensor, list[Clip]]:
        """(latents [n, 16, T, h, w] fp32, clips) of the clips at `indices`, rendered and VAE-encoded now."""
        videos, clips = self.data.batch(indices, self.env.device)
        return encode_videos(self.vae, videos), clips

    def _pool_chunk(self, indices: list[int]) -> torch.Tensor:
        """The pooled latents [n, 16, T, h, w] of the clips at `indices`: their encodings."""
        return self.encode(indices)[0]

    def _load_or_build_pool(self, split: str, pool: int) -> None:
        from safetensors.torch import load_file

        env = self.env
        per_rank = max(1, pool // env.world)
        self.pool_indices = [env.rank + env.world * i for i in range(per_rank)]
        path = self._pool_file(split, pool)
        if path.is_file():
            self.pool_latents = load_file(str(path), device=str(env.device))["latents"]
            return
        chunks, t0, step = [], time.perf_counter(), self.POOL_CHUNK
        for first in range(0, per_rank, step):
            chunks.append(self._pool_chunk(self.pool_indices[first:first + step]).to(torch.bfloat16))
            done = first + len(chunks[-1])
            if env.main and ((first // step) % max(1, 3200 // step) == 0 or done == per_rank):
                print(f"[pool] {done}/{per_rank} clips ({done / (time.perf_counter() - t0):.3g} clips/s)",
                      flush=True)
        self.pool_latents = torch.cat(chunks)
        save_weights(path, {"latents": self.pool_latents})   # every rank writes its own file

    def _repeats(self, factors: dict[str, int]) -> torch.Tensor:
        """The pool slots of one pass, in order: each slot once, or its clip's oversampling factor times."""
        slots = torch.arange(len(self.pool_indices))
        if not factors:
            return slots
        counts = [math.prod(factors.get(value, 1) for value in self.data.clip(i).attributes().values())
                  for i in self.pool_indices]
        return slots.repeat_interleave(torch.tensor(counts))

    def _slot(self, index: int) -> int:
        size = len(self._slots)
        epoch = index // size
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.recipe.data_seed * 100_003 + epoch)
            self._perm = (epoch, self._slots[torch.randperm(size, generator=g)])
        return int(self._perm[1][index % size])

    def captions(self, indices: list[int]) -> tuple[torch.Tensor, list[Clip]]:
        """(context [B, text_len, text_dim] fp32, clips) of the clips at `indices`, nothing rendered."""
        clips = [self.data.clip(i) for i in indices]
        return self.text.encode([c.caption for c in clips]).float(), clips

    def get(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[Clip]]:
        """(latents [B, 16, T, h, w] fp32, context [B, text_len, text_dim] fp32, clips)."""
        if self.pool_latents is not None:
            slots = [self._slot(i) for i in indices]
            clips = [self.data.clip(self.pool_indices[s]) for s in slots]
            latents = self.pool_latents[slots].float()
        else:
            latents, clips = self.encode(indices)
        context = self.text.encode([c.caption for c in clips]).float()
        return latents, context, clips
