"""Stage 0: train the tiny Wan2.1-architecture VAE so that its latents are meaningful.

Objective (a KL-VAE, like Wan's): z = mu + exp(logvar / 2) * eps from the encoder's (mu, logvar),
    loss = l1 * |x_hat - x| + l2 * (x_hat - x)^2 + kl * KL(N(mu, sigma^2) || N(0, 1))
           [+ edge * (|dx x_hat - dx x| + |dy x_hat - dy x|)  (optional, recipe.VAEStage.edge)],
every term a mean over its elements (pixels, resp. latent elements), kl = 1e-6, and the log-variance
bias starts at -6 (sigma = 0.05). Why: with the default init (sigma = 1 against |mu| ~ 0.15) the decoder
first sees mostly noise; a CPU probe (dim-16 VAE, 8 clips) reached recon loss 0.08 after 550 steps that
way, 0.027 with this init (as fast as a plain autoencoder on mu). The weak KL then keeps sigma near 0.05:
latents carry a little noise, which makes the decoder tolerant to small latent errors. No perceptual or
adversarial loss (flat synthetic shapes do not need them).

Known difficulty: at this width the VAE is slow and spiky to train on random clips. CPU probes with
Adam at lr >= 1e-4 collapsed to a code that only separates dark from light clips (the encoder output
took two values) and stayed there for hundreds of steps; the same happens with diffusers'
AutoencoderKLWan of the same config, so it is the architecture at small width, not our module. On a GPU
with batch >= 16 clips and a 300-step warm-up, lr 4e-4..5e-4 trained well (recipe); check
vae/reconstruction.json before training the DiT.

Training runs on spatial crops of the rendered clips, most of them centred on the object (`_crops`), with
frame 0 weighted like a whole latent frame (recipe.VAEStage.first_frame_weight); with uniform crops and equal
frame weights the first run's frame 0 decoded 2x worse than the rest and its detector agreement was 0.45; the
second run (both changes, 4.2x the clips, the larger objects of the current data; not separated) reached 0.77. The crops are spatial only (the VAE is convolutional apart from
per-frame attention, and spatial crops generalised to full frames), over all frames of the clip (a VAE
trained on shorter clips than it encodes fails on the extra causal chunks: recipe.VAEStage.crop_frames). Afterwards the per-channel mean and std of mu over `stats_clips`
full-size clips are written to latent_stats.json: they become the VAEConfig mean/std, so the DiT sees
unit-scale latents (Wan's constants play the same role); and reconstruction.json grades held-out clips
round-tripped through the VAE (L1, PSNR, detector agreement: the ceiling of every later adherence score).
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
from torch import nn

from turbovid.loading import read_state_dict
from turbovid.models.vae import WanVAE
from turbovid.train.data import ProceduralVideos
from turbovid.train.detect import FG_DISTANCE, adherence
from turbovid.train.loop import (Env, drive, make_optimizer, optimizer_step, step_generator, step_indices, unwrap,
                                 wrap_ddp)
from turbovid.train.recipe import Recipe

LOGVAR_RANGE = (-30.0, 20.0)


@torch.no_grad()
def foreground_weights(video: torch.Tensor, fg_weight: float, first_frame_weight: float = 1.0) -> torch.Tensor:
    """Per-pixel loss weights [B, 1, F, H, W] with mean 1: 1 + fg_weight on object pixels (farther than
    FG_DISTANCE from the clip's median colour), frame 0 times `first_frame_weight` (the first latent frame
    encodes 1 frame, every later one 4), renormalised per clip. The object covers 1-7% of the pixels,
    so with plain means the VAE learns the background first and drops the object: a CPU probe reached
    held-out L1 0.058 with every object gone (detector agreement 0)."""
    if fg_weight <= 0:
        w = torch.ones_like(video[:, :1])
    else:
        bg = video.flatten(2).median(dim=2).values[:, :, None, None, None]          # [B, 3, 1, 1, 1]
        fg = ((video - bg).norm(dim=1, keepdim=True) > 2 * FG_DISTANCE).float()    # [-1, 1] scale: 2x
        w = 1 + fg_weight * fg
    w[:, :, 0] *= first_frame_weight
    return w / w.mean(dim=(2, 3, 4), keepdim=True)


class VAEObjective(nn.Module):
    """Wraps the VAE so that one forward computes the whole training loss (what DDP needs). With a frozen
    encoder (the decoder stage) the encoder and conv1 run without autograd; the KL term is then a constant."""

    def __init__(self, vae: WanVAE, frozen_encoder: bool = False):
        super().__init__()
        self.vae, self.frozen_encoder = vae, frozen_encoder

    def forward(self, video: torch.Tensor, eps_gen: torch.Generator, l1: float, l2: float, kl: float,
                fg_weight: float = 0.0, first_frame_weight: float = 1.0, edge: float = 0.0):
        vae = self.vae
        with torch.no_grad() if self.frozen_encoder else contextlib.nullcontext():
            features, _ = vae.encoder(video)                                # [B, 2z, T, h, w]
            mu, logvar = vae.conv1(features).float().chunk(2, dim=1)
        logvar = logvar.clamp(*LOGVAR_RANGE)
        eps = torch.randn(mu.shape, generator=eps_gen, device=mu.device, dtype=mu.dtype)
        z = mu + torch.exp(0.5 * logvar) * eps
        recon, _ = vae.decoder(vae.conv2(z.to(features.dtype)))
        err = recon.float() - video.float()
        w = foreground_weights(video, fg_weight, first_frame_weight)         # [B, 1, F, H, W], mean 1
        rec_l1, rec_l2 = (w * err.abs()).mean(), (w * err.pow(2)).mean()
        kld = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = l1 * rec_l1 + l2 * rec_l2 + kl * kld
        if edge > 0:
            loss = loss + edge * edge_loss(err, w)
        return loss, rec_l1.detach(), rec_l2.detach(), kld.detach()


def edge_loss(err: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted L1 of the spatial finite differences of the error (x_hat - x) [B, C, F, H, W], i.e. of
    dx x_hat - dx x and dy x_hat - dy x; each difference weighs the larger weight of its two pixels (w [B, 1, F, H,
    W]). Pixel losses barely see a diamond's rounded corner or a cross's filled-in notch (a few pixels each), which is
    what the small objects lose; their edges are where the differences are."""
    dx = (err[..., :, 1:] - err[..., :, :-1]).abs() * torch.maximum(w[..., :, 1:], w[..., :, :-1])
    dy = (err[..., 1:, :] - err[..., :-1, :]).abs() * torch.maximum(w[..., 1:, :], w[..., :-1, :])
    return dx.mean() + dy.mean()


class VAETrainer:
    """Stage "vae": the whole VAE from a seeded init, or (`init`, a VAE weights file) fine-tuned from those weights
    (its latents then move: the DiT stages train on the new ones). Stage "vae_decoder" (`decoder_of` = the trained
    VAE's file, hyper-parameters recipe.vae_decoder): only the decoder and conv2 train, the encoder and conv1 stay
    frozen, so latents, latent statistics and every DiT trained on them stay valid."""

    def __init__(self, recipe: Recipe, env: Env, fixed_batch: bool = False, decoder_of: Path | None = None,
                 init: str | Path | None = None):
        if decoder_of is not None and recipe.vae_decoder is None:
            raise ValueError(f"recipe {recipe.name!r} has no vae_decoder stage")
        if decoder_of is not None and init is not None:
            raise ValueError("the vae_decoder stage starts from the trained VAE; --init applies to the vae stage")
        self.name = "vae" if decoder_of is None else "vae_decoder"
        self.recipe, self.env = recipe, env
        self.cfg = recipe.vae_stage if decoder_of is None else recipe.vae_decoder
        self.schedule, self.fixed_batch = self.cfg.run, fixed_batch
        if (self.cfg.crop_frames - 1) % recipe.vae.temporal_factor or self.cfg.crop % recipe.vae.spatial_factor:
            raise ValueError(f"VAE crop {self.cfg.crop} px x {self.cfg.crop_frames} frames must be a multiple of "
                             f"{recipe.vae.spatial_factor} px and 4k+1 frames")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            self.vae = WanVAE(recipe.vae)
        if init is not None:
            if not Path(init).is_file():
                raise ValueError(f"--init {init}: no such file")
            self._load(init, "--init")
        elif decoder_of is None:
            with torch.no_grad():   # conv1's output channels are [mu (z_dim) ; logvar (z_dim)]
                self.vae.conv1.bias[recipe.vae.z_dim:] = self.cfg.logvar_init
        else:
            if not Path(decoder_of).is_file():
                raise ValueError(f"{decoder_of} not found: run `turbovid train vae` first")
            self._load(decoder_of, "the trained VAE")
            self.vae.encoder.requires_grad_(False)
            self.vae.conv1.requires_grad_(False)
        self.vae.to(env.device).train()
        self.model = wrap_ddp(VAEObjective(self.vae, frozen_encoder=decoder_of is not None), env)
        self.optimizer = make_optimizer([p for p in self.vae.parameters() if p.requires_grad], self.cfg.optim, env)
        self.data = ProceduralVideos("train", recipe.size, recipe.frames, recipe.data_seed)

    def _load(self, path: str | Path, what: str) -> None:
        try:
            self.vae.load_state_dict(read_state_dict(str(path)))
        except RuntimeError as e:   # another model's file, or another VAE size
            kind = "keys" if "key(s)" in str(e) else "shapes"
            raise ValueError(f"{what} {path}: not the weights of a {self.recipe.name} VAE (its {kind} differ)") from None

    def _crops(self, step: int) -> torch.Tensor:
        """Spatial crops of the batch's clips. A uniformly placed crop often misses the object (a 96 px crop of
        a 240 px frame showed it in some frame for 75% of the clips, mostly for a few frames), so a fraction
        `object_crops` of the crops is centred on the object's position at a random frame, jittered by up
        to a quarter of the crop; the rest are uniform (background-only crops still occur)."""
        cfg, size, frames = self.cfg, self.recipe.size, self.recipe.frames
        videos, clips = self.data.batch(step_indices(step, self.env, cfg.run.batch), self.env.device)
        # Crop offsets from a CPU generator (integers; the device generator is for the noise).
        g = step_generator(self.recipe.seed, step, self.env.rank, torch.device("cpu"))
        out = []
        for v, clip in zip(videos, clips):
            u = torch.rand(4, generator=g).tolist()
            t = int(torch.randint(0, frames - cfg.crop_frames + 1, (1,), generator=g))
            if u[0] < cfg.object_crops:
                at = (t + u[1] * (cfg.crop_frames - 1)) / max(frames - 1, 1)    # render()'s time in [0, 1]
                centre = [(clip.start[i] + clip.displacement[i] * at) * size + (u[2 + i] - 0.5) * cfg.crop / 2
                          for i in (0, 1)]
                x, y = (min(max(int(round(c - cfg.crop / 2)), 0), size - cfg.crop) for c in centre)
            else:
                y, x = (int(u[2 + i] * (size - cfg.crop + 1)) for i in (0, 1))
            out.append(v[:, t:t + cfg.crop_frames, y:y + cfg.crop, x:x + cfg.crop])
        return torch.stack(out)

    def train_step(self, step: int) -> dict[str, float]:
        data_step = 0 if self.fixed_batch else step
        video = self._crops(data_step)
        g = step_generator(self.recipe.seed, data_step, self.env.rank, self.env.device)
        with self.env.autocast():
            loss, l1, l2, kld = self.model(video, g, self.cfg.l1, self.cfg.l2, self.cfg.kl, self.cfg.fg_weight,
                                             self.cfg.first_frame_weight, self.cfg.edge)
        loss.backward()
        lr, norm = optimizer_step(self.optimizer, self.cfg.optim, step, self.schedule.steps)
        return {"loss": loss.item(), "l1": l1.item(), "l2": l2.item(), "kl": kld.item(), "lr": lr, "grad_norm": norm}

    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"model": unwrap(self.model).vae.state_dict()}

    def load_weights(self, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        self.vae.load_state_dict(weights["model"])

    def optimizer_states(self) -> dict:
        return {"model": self.optimizer.state_dict()}

    def load_optimizer_states(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["model"])

    def export(self) -> dict[str, torch.Tensor]:
        return self.vae.state_dict()

    @torch.no_grad()
    def latent_stats(self) -> dict[str, list[float]]:
        """Per-channel mean/std of the encoder mean over `stats_clips` full-size clips (recipe mean/std must
        be the identity (0, 1) while measuring, which the recipes guarantee)."""
        self.vae.eval()
        total = torch.zeros(self.recipe.vae.z_dim, dtype=torch.float64, device=self.env.device)
        sq, count = torch.zeros_like(total), 0
        data = ProceduralVideos("train", self.recipe.size, self.recipe.frames, self.recipe.data_seed + 1)
        for first in range(0, self.cfg.stats_clips, 4):
            videos, _ = data.batch(list(range(first, min(first + 4, self.cfg.stats_clips))), self.env.device)
            with self.env.autocast():
                mu = self.vae.encode_reference(videos).double()             # [b, z, T, h, w]
            total += mu.sum(dim=(0, 2, 3, 4))
            sq += mu.pow(2).sum(dim=(0, 2, 3, 4))
            count += mu[:, 0].numel()
        mean = total / count
        std = (sq / count - mean.pow(2)).clamp(min=1e-12).sqrt()
        self.vae.train()
        return {"mean": mean.tolist(), "std": std.tolist()}


@torch.no_grad()
def reconstruction_report(vae: WanVAE, recipe: Recipe, env: Env, count: int) -> dict:
    """Round trip of `count` held-out clips: pixel L1 and PSNR (on [-1, 1]), and `detect` adherence of the
    reconstructions against the clips' attributes (the ceiling for every generated-video score)."""
    data = ProceduralVideos("heldout", recipe.size, recipe.frames, recipe.data_seed)
    clips, recons, l1, mse = [], [], 0.0, 0.0
    for first in range(0, count, 4):
        videos, batch = data.batch(list(range(first, min(first + 4, count))), env.device)
        with env.autocast():
            rec = vae.decode_reference(vae.encode_reference(videos.to(vae.dtype)), clamp=True).float()
        l1 += float((rec - videos).abs().mean()) * len(batch)
        mse += float((rec - videos).pow(2).mean()) * len(batch)
        recons.append(rec.cpu())
        clips += batch
    scores = adherence(list(torch.cat(recons)), [c.attributes() for c in clips])
    # Small objects lose their shape first (the mini VAE: ~half of the small ones), so shape per size class.
    by_size = {}
    for clip, found in zip(clips, scores["detections"]):
        right, total = by_size.get(clip.size, (0, 0))
        by_size[clip.size] = (right + (found["shape"] == clip.shape), total + 1)
    return {"l1": l1 / count, "psnr": 10 * math.log10(4.0 / max(mse / count, 1e-12)), "count": count,
            **{k: v for k, v in scores.items() if k != "detections"},
            "shape_by_size": {size: {"right": r, "clips": n} for size, (r, n) in sorted(by_size.items())}}


def run_vae(recipe: Recipe, run_dir: Path, env: Env, until: int | None = None, decoder: bool = False,
            init: str | Path | None = None) -> Path:
    """Stage "vae" (decoder=False; from `init`'s weights when given) or "vae_decoder" (decoder=True: fine-tune the
    decoder of run_dir/vae)."""
    if recipe.vae.mean != (0.0,) * recipe.vae.z_dim or recipe.vae.std != (1.0,) * recipe.vae.z_dim:
        raise ValueError("VAE training needs the recipe's VAE mean/std to be 0/1 (they are measured afterwards)")
    decoder_of = Path(run_dir) / "vae" / "final.safetensors" if decoder else None
    trainer = VAETrainer(recipe, env, decoder_of=decoder_of, init=init)
    out = Path(run_dir) / trainer.name
    drive(trainer, out, env, until=until, init=decoder_of or init)
    if (out / "final.safetensors").exists() and (until is None or until >= trainer.schedule.steps):
        stats = None if decoder else trainer.latent_stats()   # the decoder stage keeps the encoder's statistics
        if env.main:
            if stats is not None:
                tmp = out / ".latent_stats.json.tmp"
                tmp.write_text(json.dumps(stats, indent=1))
                tmp.replace(out / "latent_stats.json")
            trainer.vae.eval()
            report = reconstruction_report(trainer.vae, recipe, env, trainer.cfg.eval_clips)
            (out / "reconstruction.json").write_text(json.dumps(report, indent=1))
            print(f"[{trainer.name}] held-out reconstruction: L1 {report['l1']:.4f}, PSNR {report['psnr']:.2f} dB, "
                  f"detector agreement {report['all']:.3f}", flush=True)
        env.barrier()
    return out / "final.safetensors"
