"""The ode stage's adversarial term (ours, after LADD, Sauer et al. 2024: latent adversarial diffusion distillation).

Regression onto the teacher's completions fits their mean, and at the sampler's last call (s = 0.61 for the mini
schedule) the mean of what the teacher could still draw is a blur: completing the last call cost small shapes in
sessions 21-22. A discriminator asks instead whether the student's final output looks like real data for its caption.

Discriminator (`FeatureDiscriminator`): the frozen teacher DiT is the feature network. A latent x0 is noised to
x_d = (1 - s_d) x0 + s_d eps, s_d ~ U(noise), and the teacher runs on it with the caption; small trainable heads read
the outputs of some of its blocks (`layers`), token by token: h = SiLU(W1 LN(f)), logit = w2 . h + (P c) . h / sqrt(H),
c the mean of the teacher's embedded caption tokens (a projection discriminator: the logit depends on whether the
tokens fit the caption). The teacher already reads the caption through its cross-attention; the projection lets the
heads ask about it directly. Every token of every chosen block gives one logit (a patch discriminator over the video).

Losses (hinge, as LADD): heads: mean relu(1 - D(real)) + mean relu(1 + D(fake)); student: - mean D(fake), the
gradient flowing through the frozen teacher into the student's output. The real latents are the training clips of the
captions the student sampled (rendered and VAE-encoded), so each real sample pairs with a fake one of its caption.
What it measured on the mini model: train/trajectory.py (session 24). The DMD round (train/distill.py,
RCMStage.adv_weight, session 30) uses the same heads, trained at its critic steps on the stage's data latents against
the student's samples.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from turbovid.models.dit import WanDiT
from turbovid.train.loop import Env, make_optimizer, optimizer_step, wrap_ddp
from turbovid.train.recipe import Optim, Recipe


@contextlib.contextmanager
def block_outputs(net: WanDiT, layers: tuple[int, ...]):
    """Within the block, every forward of `net` appends the outputs of its blocks at `layers` ([B, L, dim] each, in
    `layers` order) to the yielded list."""
    found: list[torch.Tensor] = []
    hooks = [net.blocks[i].register_forward_hook(lambda _m, _a, out: found.append(out)) for i in layers]
    try:
        yield found
    finally:
        for h in hooks:
            h.remove()


class FeatureDiscriminator(nn.Module):
    """Heads over a frozen DiT's block outputs (the DiT itself is not a submodule: it is neither trained nor saved)."""

    def __init__(self, dim: int, num_layers: int, layers: tuple[int, ...], hidden: int = 128):
        super().__init__()
        if not layers or any(not 0 <= i < num_layers for i in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"adversarial layers must be distinct block indices in 0..{num_layers - 1}, got {layers}")
        self.layers, self.hidden = tuple(layers), hidden
        self.inp = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim, elementwise_affine=False), nn.Linear(dim, hidden),
                                               nn.SiLU()) for _ in layers)
        self.out = nn.ModuleList(nn.Linear(hidden, 1) for _ in layers)
        self.cond = nn.ModuleList(nn.Linear(dim, hidden) for _ in layers)

    def features(self, net: WanDiT, x0: torch.Tensor, context: torch.Tensor, s: torch.Tensor, noise: torch.Tensor,
                 autocast) -> list[torch.Tensor]:
        """The block outputs at `layers` of the frozen `net` run on x0 noised to RF times s [B] with `noise`.
        Differentiable in x0 (the caller decides what needs a gradient)."""
        sv = s.view(-1, *[1] * (x0.dim() - 1))
        with block_outputs(net, self.layers) as found, autocast():
            net((1 - sv) * x0 + sv * noise, 1000 * s, context)
        return [f.float() for f in found]

    @staticmethod
    def caption(net: WanDiT, context: torch.Tensor) -> torch.Tensor:
        """The caption vector [B, dim]: the mean of `net`'s embedded caption tokens (fp32)."""
        return net.text_embedding(context.to(net.text_embedding[0].weight.dtype)).float().mean(1)

    def forward(self, feats: list[torch.Tensor], caption: torch.Tensor) -> torch.Tensor:
        """Logits [B, len(layers) * L], one per token of each chosen block."""
        logits = []
        for f, inp, out, cond in zip(feats, self.inp, self.out, self.cond):
            h = inp(f)                                                   # [B, L, hidden]
            proj = (h * cond(caption).unsqueeze(1)).sum(-1) / self.hidden ** 0.5
            logits.append(out(h).squeeze(-1) + proj)
        return torch.cat(logits, dim=1)


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return torch.relu(1 - real).mean() + torch.relu(1 + fake).mean()


def hinge_g_loss(fake: torch.Tensor) -> torch.Tensor:
    return -fake.mean()


class Adversarial:
    """A FeatureDiscriminator on the frozen `net` with its optimizer and (DDP) training wrapper, the heads seeded as
    the DiTs are (teacher.new_dit): what the ode and rcm stages share. The trainer puts (ddp, optimizer) in its
    `trained` dict so checkpoints carry the heads."""

    def __init__(self, recipe: Recipe, net: WanDiT, layers: tuple[int, ...], noise: tuple[float, float],
                 optim: Optim, env: Env):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed + 1)
            self.disc = FeatureDiscriminator(recipe.dit.dim, recipe.dit.num_layers, layers).to(env.device)
        self.net, self.noise, self.optim, self.env = net, noise, optim, env
        self.optimizer = make_optimizer(self.disc.parameters(), optim, env)
        self.ddp = wrap_ddp(self.disc, env)

    def draw(self, x0: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The discriminator's noise levels s ~ U(noise) [B] and noise for latents like x0."""
        lo, hi = self.noise
        s = lo + (hi - lo) * torch.rand(x0.shape[0], generator=g, device=x0.device)
        return s, torch.randn(x0.shape, generator=g, device=x0.device)

    def features(self, x0: torch.Tensor, context: torch.Tensor, s: torch.Tensor, noise: torch.Tensor):
        return self.disc.features(self.net, x0, context, s, noise, self.env.autocast)

    def caption(self, context: torch.Tensor) -> torch.Tensor:
        with self.env.autocast():
            return self.disc.caption(self.net, context)

    def generator_logits(self, feats: list[torch.Tensor], caption: torch.Tensor) -> torch.Tensor:
        """The heads' logits [B, tokens] on `feats`, the heads frozen for this pass (their gradient is the
        generator's)."""
        self.disc.requires_grad_(False)
        try:
            return self.disc(feats, caption)
        finally:
            self.disc.requires_grad_(True)

    def heads_step(self, real_feats: list[torch.Tensor], fake_feats: list[torch.Tensor], caption: torch.Tensor,
                   step: int, total: int) -> dict[str, float]:
        """One hinge step of the heads on detached features of real and fake samples of the same captions."""
        clips = real_feats[0].shape[0]
        logits = self.ddp([torch.cat(pair) for pair in zip(real_feats, fake_feats)], caption.repeat(2, 1))
        d_real, d_fake = logits[:clips], logits[clips:]   # one pass: DDP reduces once
        loss = hinge_d_loss(d_real, d_fake)
        loss.backward()
        _, norm = optimizer_step(self.optimizer, self.optim, step, total)
        return {"loss_disc": loss.item(), "d_real": d_real.mean().item(), "d_fake": d_fake.mean().item(),
                "disc_grad_norm": norm}
