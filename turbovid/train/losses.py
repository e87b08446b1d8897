"""Training objectives as pure functions of tensors (the networks are called elsewhere).

Conventions. Rectified flow (RF): x_s = (1-s) x0 + s eps, velocity v = eps - x0, s in [0, 1], network time
1000 s. TrigFlow (sigma_data = 1): x_t = cos t x0 + sin t eps, t in [0, pi/2]; the two paths are the same
up to scale, x_RF = x_trig / (cos t + sin t) at s = sin t / (sin t + cos t). The TrigFlow velocity is
F = dx_t/dt = cos t eps - sin t x0, and a denoiser x0_hat gives F_hat = (cos t x_t - x0_hat) / sin t.
Time tensors are [B] and broadcast over [B, C, T, H, W]; sampled times are float64 (as in rCM).
"""
from __future__ import annotations

import math

import torch


def _b(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, 1, ...] to broadcast against `like`."""
    return t.view(-1, *([1] * (like.dim() - 1)))


# ---- time distributions --------------------------------------------------------------------------

def shifted_logit_normal(n: int, generator: torch.Generator, mean: float, std: float, shift: float,
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """RF times for teacher training: u = sigmoid(N(mean, std)), s = shift u / (1 + (shift-1) u) (float64)."""
    u = torch.sigmoid(mean + std * torch.randn(n, generator=generator, dtype=torch.float64, device=device))
    return shift * u / (1 + (shift - 1) * u)


def lognormal_rf(n: int, generator: torch.Generator, p_mean: float, p_std: float,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """SLA fine-tuning times (SPEC §10.2): sigma = exp(p_mean + p_std xi), s = sigma / (1 + sigma)."""
    sigma = torch.exp(p_mean + p_std * torch.randn(n, generator=generator, dtype=torch.float64, device=device))
    return (sigma / (1 + sigma)).clamp(0.0, 1.0)


def sample_p_g(n: int, generator: torch.Generator, p_mean: float, p_std: float, multiplier: float = 1.0,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """rCM's sCM angles: sigma ~ LogNormal(p_mean, p_std) times `multiplier` (rCM: sqrt(latent frames)
    for videos), t = atan(sigma)."""
    sigma = torch.exp(p_mean + p_std * torch.randn(n, generator=generator, dtype=torch.float64, device=device))
    return torch.atan(sigma * multiplier)


def sample_p_d(n: int, generator: torch.Generator, shift: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """rCM's DMD angles, UniformShift: u ~ U(0,1), s = shift u / (1 + (shift-1) u), t = atan(s / (1-s))."""
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
    s = shift * u / (1 + (shift - 1) * u)
    return torch.atan2(s, 1 - s)


# ---- rectified flow ------------------------------------------------------------------------------

def flow_matching_pair(x0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_s, v) with x_s = (1-s) x0 + s eps and the velocity target v = eps - x0 (x0's dtype)."""
    sb = _b(s, x0).to(x0.dtype)
    return (1 - sb) * x0 + sb * noise, noise - x0


def velocity_loss(v_pred: torch.Tensor, v_target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean over (C, T, H, W) of the squared error, averaged over the batch (fp32). Used for the
    teacher (target eps - x0) and for SLA fine-tuning (target = the frozen teacher's velocity). `weight`
    (broadcast to the error, e.g. [B, 1, T, H, W]) weighs each element; it is renormalised to mean 1 per sample,
    so the loss keeps its scale."""
    err = (v_pred.float() - v_target.float()).pow(2)
    if weight is not None:
        weight = weight.float().expand_as(err)
        err = err * (weight / weight.flatten(1).mean(1).view(-1, *[1] * (err.dim() - 1)))
    return err.flatten(1).mean(1).mean()


# ---- TrigFlow <-> RF -----------------------------------------------------------------------------

def trig_to_rf(t: torch.Tensor) -> torch.Tensor:
    return torch.sin(t) / (torch.sin(t) + torch.cos(t))


def rf_to_trig(s: torch.Tensor) -> torch.Tensor:
    return torch.atan2(s, 1 - s)


def trigflow_coefficients(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in, c_noise) of rCM's TrigFlow wrapper around an RF velocity network (SPEC §10.3):
    x0_hat = c_skip x_t + c_out Net(c_in x_t, c_noise), c_noise = 1000 s (RF time of angle t)."""
    d = torch.cos(t) + torch.sin(t)
    return 1 / d, -torch.sin(t) / d, 1 / d, 1000 * torch.sin(t) / d


def x0_from_velocity(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """TrigFlow denoiser from the RF velocity the network predicts at (c_in x_t, c_noise)."""
    c_skip, c_out, _, _ = trigflow_coefficients(t)
    return _b(c_skip, x_t) * x_t + _b(c_out, x_t) * v


def trigflow_velocity(x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """F = (cos t x_t - x0) / sin t."""
    return (_b(torch.cos(t), x_t) * x_t - x0) / _b(torch.sin(t), x_t)


def x0_from_trigflow_velocity(x_t: torch.Tensor, t: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """Inverse of `trigflow_velocity`: x0 = cos t x_t - sin t F."""
    return _b(torch.cos(t), x_t) * x_t - _b(torch.sin(t), x_t) * F


# ---- sCM (continuous-time consistency) -----------------------------------------------------------

def scm_target(F_sg: torch.Tensor, F_teacher: torch.Tensor, tangent: torch.Tensor, x_t: torch.Tensor,
               t: torch.Tensor, warmup_ratio: float) -> torch.Tensor:
    """Normalised sCM direction g (float64). `tangent` is the JVP of the student's F along
    (dx_t, dt) = (cos t sin t F_teacher, cos t sin t), i.e. cos t sin t dF/dt. With r = warmup_ratio:
        g = -cos t sqrt(1 - r^2 sin^2 t) (F_sg - F_teacher) - r (cos t sin t x_t + cos t sin t dF/dt)
    (rCM's code; SPEC §10.3 writes r on the x_t term only — the source puts it on both), then samples with
    NaNs are zeroed and g <- g / (||g||_2 + 0.1) per sample."""
    cos, sin = _b(torch.cos(t), x_t), _b(torch.sin(t), x_t)
    g = -cos * torch.sqrt(1 - warmup_ratio ** 2 * sin ** 2) * (F_sg.double() - F_teacher.double()) \
        - warmup_ratio * (cos * sin * x_t.double() + tangent.double())
    bad = ~torch.isfinite(g).flatten(1).all(1) | ~torch.isfinite(F_sg).flatten(1).all(1)
    g = torch.where(_b(bad, g), torch.zeros_like(g), g)
    return g / (_b(g.flatten(1).norm(dim=1), g) + 0.1)


def scm_loss(F: torch.Tensor, g: torch.Tensor, scale: float = 100.0,
             weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample scale * sum w (F - sg(F) - g)^2 [B]: its gradient moves F along w g; its value is ~ scale ||g||^2.
    `weight` (ours; broadcast to F, e.g. data.object_weights [B, 1, T, h, w]) weighs the cells, default 1."""
    bad = ~torch.isfinite(F.detach()).flatten(1).all(1)
    F = torch.where(_b(bad, F), torch.zeros_like(F), F)
    sq = (F.double() - F.detach().double() - g).pow(2)
    return scale * (sq if weight is None else sq * weight.double()).flatten(1).sum(1)


# ---- DMD (distribution matching with a fake score) -----------------------------------------------

def dmd_loss(G_x0: torch.Tensor, x0_fake: torch.Tensor, x0_real: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Per-sample DMD loss [B]. With w = mean |G_x0 - x0_real| (>= 1e-5) and grad = (x0_fake - x0_real) / w,
    loss = scale * sum (G_x0 - sg(G_x0 - grad))^2, whose gradient in G_x0 is 2 scale grad: descending it moves
    generated samples away from what the fake score denoises to, toward the real (teacher) one."""
    with torch.no_grad():
        w = (G_x0.double() - x0_real.double()).abs().flatten(1).mean(1).clamp(min=1e-5)
        grad = (x0_fake.double() - x0_real.double()) / _b(w, G_x0)
    loss = (G_x0.double() - (G_x0.double() - grad).detach()).pow(2).flatten(1).sum(1)
    return scale * torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss))


def anchor_distance(x0: torch.Tensor, x0_ref: torch.Tensor, pool: int = 1) -> torch.Tensor:
    """Per-sample anchor distance [B] of latents [B, C, T, H, W]: the summed squared difference, or with pool = k > 1
    the squared norm of the difference's projection onto latents constant on k x k spatial blocks of each frame
    (sum over blocks of block_sum^2 / cells, partial blocks at the right and bottom edges). Pooling leaves the
    difference's fine spatial detail (an object's outline) free and keeps its block averages (the colours of a
    region, frame by frame); k = 1 is the plain sum, and a difference constant over the frame reads the same for
    every k."""
    if x0.dim() != 5 or x0.shape != x0_ref.shape:
        raise ValueError(f"anchor_distance takes two [B, C, T, H, W] latents of one shape, got {tuple(x0.shape)} "
                         f"and {tuple(x0_ref.shape)}")
    if pool < 1:
        raise ValueError(f"anchor pool must be >= 1, got {pool}")
    d = x0.float() - x0_ref.float()
    if pool == 1:
        return d.pow(2).flatten(1).sum(1)
    B, C, T, H, W = d.shape
    ph, pw = -H % pool, -W % pool
    d = torch.nn.functional.pad(d, (0, pw, 0, ph))
    cells = torch.nn.functional.pad(torch.ones(H, W, device=d.device), (0, pw, 0, ph))
    Hb, Wb = (H + ph) // pool, (W + pw) // pool
    sums = d.reshape(B, C, T, Hb, pool, Wb, pool).sum((4, 6))
    counts = cells.reshape(Hb, pool, Wb, pool).sum((1, 3))
    return (sums.pow(2) / counts).flatten(1).sum(1)


def fake_score_loss(G_x0: torch.Tensor, x0_fake: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-sample denoising loss of the fake-score net on generated samples [B]: sum (G_x0 - x0_fake)^2 / sin^2 t."""
    return ((G_x0.double() - x0_fake.double()).pow(2) / _b(torch.sin(t), G_x0).pow(2)).flatten(1).sum(1)


def rcm_phase(step: int, tangent_warmup: int, freq: int, critic_first: bool = False) -> tuple[str, int]:
    """("student" | "critic", effective iteration of that network) at 0-based training `step` (rCM):
    student only during the tangent warm-up, afterwards one student update every `freq` steps.
    `critic_first` (ours, DMD alone): the warm-up's steps are critic steps instead, then a student step every
    `freq` steps from the first step after it."""
    if critic_first:
        if step < tangent_warmup:
            return "critic", step
        k = step - tangent_warmup
        return ("student", k // freq) if k % freq == 0 else ("critic", tangent_warmup + k - k // freq - 1)
    if step < tangent_warmup or step % freq == 0:
        return "student", step if step < tangent_warmup else tangent_warmup + (step - tangent_warmup) // freq
    student = tangent_warmup + (step - tangent_warmup) // freq
    return "critic", step - student - 1


HALF_PI = math.pi / 2
