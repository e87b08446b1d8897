"""Training math (turbovid/train/losses.py, trigflow.py, ema.py, merge.py, recipe.lr_at) against autograd,
finite differences and values computed by hand from SPEC §10."""
import math

import numpy as np
import pytest
import torch

from turbovid.attention import DenseAttention
from turbovid.attention.sla import SparseLinearAttention
from turbovid.config import TINY_DIT
from turbovid.models.dit import WanDiT
from turbovid.train.ema import PowerEMA, power_ema_beta, power_ema_gamma
from turbovid.train.losses import (anchor_distance, dmd_loss, fake_score_loss, flow_matching_pair, lognormal_rf,
                                   rcm_phase, rf_to_trig, sample_p_d, sample_p_g, scm_loss, scm_target,
                                   shifted_logit_normal, trig_to_rf, trigflow_coefficients, trigflow_velocity,
                                   velocity_loss, x0_from_trigflow_velocity, x0_from_velocity)
from turbovid.train.merge import merge_state_dicts
from turbovid.train.recipe import Optim, lr_at
from turbovid.train.trigflow import MathAttention, denoise, math_attention, student_F_jvp, swap_attention
from turbovid.train.vae import edge_loss, foreground_weights


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- rectified flow and time distributions -------------------------------------------------------

def test_flow_matching_target_is_the_path_derivative():
    x0, eps = torch.randn(3, 4, 2, 2, 2, generator=_gen(1)), torch.randn(3, 4, 2, 2, 2, generator=_gen(2))
    s = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    x_s, v = flow_matching_pair(x0, eps, s)
    assert torch.equal(x_s[0], x0[0]) and torch.equal(x_s[2], eps[2])
    assert torch.equal(v, eps - x0)
    # d x_s / d s (autograd) equals the target for every sample.
    s_var = s.float().clone().requires_grad_(True)
    path = (1 - s_var.view(-1, 1, 1, 1, 1)) * x0 + s_var.view(-1, 1, 1, 1, 1) * eps
    (grad,) = torch.autograd.grad(path, s_var, v)
    assert torch.allclose(grad, v.pow(2).flatten(1).sum(1))
    assert velocity_loss(v + 1.0, v).item() == pytest.approx(1.0)


def test_velocity_loss_weights_are_renormalised_per_sample():
    g = _gen(3)
    v, target = torch.randn(2, 4, 3, 2, 2, generator=g), torch.randn(2, 4, 3, 2, 2, generator=g)
    plain = velocity_loss(v, target)
    assert velocity_loss(v, target, torch.full((2, 1, 3, 2, 2), 7.0)).item() == pytest.approx(plain.item())
    w = torch.ones(2, 1, 3, 2, 2)
    w[:, :, 1, 0, 0] = 11.0                       # one cell of 12 weighs 11x: mean weight 22/12
    err = (v - target).pow(2)
    want = (err * w / (22 / 12)).flatten(1).mean(1).mean()
    assert velocity_loss(v, target, w).item() == pytest.approx(want.item(), rel=1e-6)
    assert velocity_loss(v, target, 3 * w).item() == pytest.approx(want.item(), rel=1e-6)


def test_time_distributions_have_the_stated_medians():
    n = 20000
    s = shifted_logit_normal(n, _gen(), 0.0, 1.0, 3.0)
    assert s.dtype == torch.float64 and 0 < s.min() and s.max() < 1
    assert s.median().item() == pytest.approx(3 * 0.5 / (1 + 2 * 0.5), abs=0.01)           # u = 1/2 -> 0.75
    s = lognormal_rf(n, _gen(), 1.5, 1.6)
    assert s.median().item() == pytest.approx(math.exp(1.5) / (1 + math.exp(1.5)), abs=0.01)
    t = sample_p_g(n, _gen(), 0.7, 1.6, multiplier=3.0)
    assert 0 < t.min() and t.max() < math.pi / 2
    assert t.median().item() == pytest.approx(math.atan(3 * math.exp(0.7)), abs=0.01)
    t = sample_p_d(n, _gen(), 5.0)
    assert trig_to_rf(t).median().item() == pytest.approx(5 * 0.5 / (1 + 4 * 0.5), abs=0.01)   # UniformShift(5)


# ---- TrigFlow <-> RF -----------------------------------------------------------------------------

def test_trigflow_rf_conversions_and_x0_identities():
    t = torch.tensor([math.atan(80.0), 1.5, 1.4, 1.0, 0.3], dtype=torch.float64)
    s = trig_to_rf(t)
    # SPEC §5.1 values.
    assert s[0].item() == pytest.approx(80 / 81, abs=1e-12)
    assert s[1:4].tolist() == pytest.approx([0.9337811, 0.8528954, 0.6089790], abs=1e-7)
    assert torch.allclose(rf_to_trig(s), t, atol=1e-12)
    c_skip, c_out, c_in, c_noise = trigflow_coefficients(t)
    assert torch.allclose(c_noise, 1000 * s) and torch.equal(c_skip, c_in)

    x0 = torch.randn(5, 3, 2, 2, generator=_gen(3), dtype=torch.float64)
    eps = torch.randn(5, 3, 2, 2, generator=_gen(4), dtype=torch.float64)
    b = (-1, 1, 1, 1)
    x_t = torch.cos(t).view(b) * x0 + torch.sin(t).view(b) * eps
    # The RF point seen by the network is the TrigFlow point divided by (cos t + sin t).
    assert torch.allclose(c_in.view(b) * x_t, (1 - s).view(b) * x0 + s.view(b) * eps)
    # A perfect RF velocity (eps - x0) gives back x0 exactly, and F = cos t eps - sin t x0 = dx_t/dt.
    assert torch.allclose(x0_from_velocity(x_t, t, eps - x0), x0)
    F = trigflow_velocity(x_t, t, x0)
    assert torch.allclose(F, torch.cos(t).view(b) * eps - torch.sin(t).view(b) * x0)
    assert torch.allclose(x0_from_trigflow_velocity(x_t, t, F), x0)


# ---- sCM -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return WanDiT(TINY_DIT).double().eval()


def test_scm_jvp_matches_finite_difference(net):
    g = _gen(5)
    x_t = torch.randn(2, 16, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.4, 1.2], dtype=torch.float64)
    ctx = torch.randn(2, TINY_DIT.text_len, TINY_DIT.text_dim, generator=g, dtype=torch.float64)
    # rCM's tangent direction: (cos t sin t F_T, cos t sin t) with some teacher velocity F_T.
    F_T = torch.randn(x_t.shape, generator=g, dtype=torch.float64)
    cs = torch.cos(t) * torch.sin(t)
    dx, dt = cs.view(-1, 1, 1, 1, 1) * F_T, cs
    value, tangent = student_F_jvp(net, x_t, t, ctx, dx, dt)

    def F(x, tt):   # the same function through the default (SDPA) attention path
        with torch.no_grad():
            return trigflow_velocity(x, tt, denoise(net, x, tt, ctx))
    h = 1e-3
    fd = (F(x_t + h * dx, t + h * dt) - F(x_t - h * dx, t - h * dt)) / (2 * h)
    assert torch.allclose(value, F(x_t, t), atol=1e-6)
    # The time path runs in fp32 inside the DiT, which bounds the agreement.
    assert ((tangent - fd).norm() / fd.norm()).item() < 2e-2
    # The attention swap is undone afterwards, and no parameter got a gradient.
    assert all(isinstance(b.self_attn.attn_op.local_attn, DenseAttention) for b in net.blocks)
    assert all(p.grad is None for p in net.parameters())


def test_scm_jvp_through_sla_matches_finite_difference():
    # A student with SLA attention (rCM's --sla-student): the JVP runs through MathSLA (the references), since the
    # fused SLA kernels carry no tangent. 128 tokens in blocks of 16, half of the key blocks kept, and a trained
    # (non-zero) proj_l, so that both branches and the block selection matter.
    torch.manual_seed(1)
    net = WanDiT(TINY_DIT, attention="sla", topk=0.5).eval()
    for block in net.blocks:
        sla = block.self_attn.attn_op.local_attn
        sla.block_q = sla.block_k = 16
        torch.nn.init.normal_(sla.proj_l.weight, std=0.2)
    g = _gen(9)
    x_t = torch.randn(2, 16, 2, 16, 16, generator=g)
    t = torch.tensor([0.5, 1.1], dtype=torch.float64)
    ctx = torch.randn(2, TINY_DIT.text_len, TINY_DIT.text_dim, generator=g)
    cs = torch.cos(t) * torch.sin(t)
    dx, dt = cs.view(-1, 1, 1, 1, 1).float() * torch.randn(x_t.shape, generator=g), cs
    value, tangent = student_F_jvp(net, x_t, t, ctx, dx, dt)
    assert all(isinstance(b.self_attn.attn_op.local_attn, SparseLinearAttention) for b in net.blocks)   # undone

    def F(x, tt):   # the default SLA path (the fused inference kernels, or their references)
        with torch.no_grad():
            return trigflow_velocity(x, tt, denoise(net, x, tt, ctx))
    h = 1e-3   # the random network is far from linear in t beyond this (dense attention alike)
    fd = (F(x_t + h * dx, t + h * dt) - F(x_t - h * dx, t - h * dt)) / (2 * h)
    assert torch.allclose(value, F(x_t, t), atol=1e-4)
    error = ((tangent - fd).norm() / fd.norm()).item()
    assert error < 2e-2
    # The tangent of dense attention in the same place is off by far more (0.12 here against 0.008): the check
    # tells sparse from dense although the residual paths carry most of the tangent.
    with swap_attention(net, SparseLinearAttention, lambda _: MathAttention()):
        _, dense = student_F_jvp(net, x_t, t, ctx, dx, dt)
    assert ((dense - fd).norm() / fd.norm()).item() > 5 * error


def test_math_attention_equals_sdpa():
    q, k, v = (torch.randn(2, 7, 3, 8, generator=_gen(i)) for i in range(3))
    assert torch.allclose(MathAttention()(q, k, v), DenseAttention()(q, k, v), atol=1e-5)
    net = WanDiT(TINY_DIT)
    with math_attention(net):
        assert all(isinstance(b.cross_attn.attn_op.local_attn, MathAttention) for b in net.blocks)


def test_scm_target_formula_and_normalisation():
    g = _gen(6)
    shape = (3, 2, 1, 2, 2)
    F_sg, F_T, tangent, x_t = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4))
    t = torch.tensor([0.2, 0.9, 1.4], dtype=torch.float64)
    cos, sin = torch.cos(t).view(-1, 1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1, 1)

    def normed(raw):
        return raw / (raw.flatten(1).norm(dim=1).view(-1, 1, 1, 1, 1) + 0.1)
    # r = 1: the sCM target -cos^2 t (F - F_T) - cos t sin t (x_t + dF/dt), tangent = cos t sin t dF/dt.
    full = -cos ** 2 * (F_sg - F_T) - (cos * sin * x_t + tangent)
    assert torch.allclose(scm_target(F_sg, F_T, tangent, x_t, t, 1.0), normed(full))
    # r = 0: only the consistency-to-teacher term -cos t (F - F_T).
    assert torch.allclose(scm_target(F_sg, F_T, tangent, x_t, t, 0.0), normed(-cos * (F_sg - F_T)))
    r = 0.5
    mid = -cos * torch.sqrt(1 - r ** 2 * sin ** 2) * (F_sg - F_T) - r * (cos * sin * x_t + tangent)
    assert torch.allclose(scm_target(F_sg, F_T, tangent, x_t, t, r), normed(mid))
    # A sample with a NaN gets g = 0; the others are unaffected.
    bad = F_sg.clone()
    bad[1, 0, 0, 0, 0] = float("nan")
    out = scm_target(bad, F_T, tangent, x_t, t, 1.0)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.allclose(out[0], normed(full)[0])


def test_scm_loss_gradient_moves_F_along_g():
    g_dir = torch.randn(2, 3, 1, 2, 2, generator=_gen(7), dtype=torch.float64)
    F = torch.randn(2, 3, 1, 2, 2, generator=_gen(8), dtype=torch.float64, requires_grad=True)
    loss = scm_loss(F, g_dir, scale=100.0)
    assert torch.allclose(loss, 100 * g_dir.pow(2).flatten(1).sum(1))
    (grad,) = torch.autograd.grad(loss.sum(), F)
    assert torch.allclose(grad, -200 * g_dir)


# ---- DMD -----------------------------------------------------------------------------------------

def test_dmd_gradient_moves_generator_toward_real():
    # Toy generator: G_x0 = theta everywhere. The real (teacher) denoiser returns 1, the fake score
    # tracks the generator's own samples. Descending L_DMD must move theta toward 1.
    theta = torch.tensor(-0.5, dtype=torch.float64, requires_grad=True)
    G_x0 = theta * torch.ones(2, 4, 1, 2, 2, dtype=torch.float64)
    x0_real = torch.ones_like(G_x0)
    x0_fake = G_x0.detach() + 0.1   # fake score slightly off the samples
    loss = dmd_loss(G_x0, x0_fake, x0_real).sum()
    (grad_theta,) = torch.autograd.grad(loss, theta)
    w = 1.5   # mean |G - real|
    expected = 2 * ((x0_fake - x0_real) / w).sum()
    assert grad_theta.item() == pytest.approx(expected.item())
    assert grad_theta.item() < 0        # gradient descent increases theta, toward the real mean 1
    # Symmetric case: generator above the real mean -> pushed down.
    theta2 = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    G2 = theta2 * torch.ones(1, 4, 1, 2, 2, dtype=torch.float64)
    (g2,) = torch.autograd.grad(dmd_loss(G2, G2.detach(), torch.ones_like(G2)).sum(), theta2)
    assert g2.item() > 0


def test_anchor_distance_pools_block_averages():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 2, 7, 5, generator=g), torch.randn(2, 3, 2, 7, 5, generator=g)
    plain = (a - b).pow(2).flatten(1).sum(1)
    assert torch.allclose(anchor_distance(a, b), plain)
    # by hand, pool 3 on 7 x 5 cells: blocks of rows 0-2, 3-5, 6 and columns 0-2, 3-4 (partial at the edges)
    d = a - b
    hand = torch.zeros(2)
    for rows in (slice(0, 3), slice(3, 6), slice(6, 7)):
        for cols in (slice(0, 3), slice(3, 5)):
            block = d[..., rows, cols]
            hand += (block.sum((-2, -1)).pow(2) / (block.shape[-2] * block.shape[-1])).flatten(1).sum(1)
    pooled = anchor_distance(a, b, 3)
    assert torch.allclose(pooled, hand, rtol=1e-5)
    assert (pooled < plain).all()                            # a projection: never more than the whole distance
    # a difference constant over each frame is all low frequency: every pool reads it whole
    shift = torch.randn(2, 3, 2, 1, 1, generator=g).expand(2, 3, 2, 7, 5)
    for k in (1, 2, 3, 4, 7):
        assert torch.allclose(anchor_distance(b + shift, b, k), shift.pow(2).flatten(1).sum(1), rtol=1e-5)
    # a checkerboard within 2 x 2 blocks averages out: pool 2 does not see it, an edge's partial block aside
    checker = (torch.arange(6)[:, None] + torch.arange(4)[None, :]) % 2 * 2.0 - 1
    assert anchor_distance(b[..., :6, :4] + checker, b[..., :6, :4], 2).abs().max() < 1e-4
    with pytest.raises(ValueError, match="pool must be >= 1"):
        anchor_distance(a, b, 0)
    with pytest.raises(ValueError, match="one shape"):
        anchor_distance(a, b[..., :4], 2)


def test_fake_score_loss_and_rcm_schedule():
    G, f = torch.ones(2, 1, 1, 1, 2), torch.zeros(2, 1, 1, 1, 2)
    t = torch.tensor([math.pi / 6, math.pi / 2], dtype=torch.float64)
    assert fake_score_loss(G, f, t).tolist() == pytest.approx([2 / 0.25, 2.0])
    # warm-up 5, then one student step every 5 (rCM's is_student_phase and effective iterations, by hand)
    phases = [rcm_phase(n, 5, 5) for n in range(12)]
    assert phases == [("student", 0), ("student", 1), ("student", 2), ("student", 3), ("student", 4), ("student", 5),
                      ("critic", 0), ("critic", 1), ("critic", 2), ("critic", 3), ("student", 6), ("critic", 4)]
    # DMD alone (critic_first): the warm-up's 3 steps are critic steps 0..2, then a student step every 5 steps and
    # the critic's count goes on where the warm-up left it
    phases = [rcm_phase(n, 3, 5, critic_first=True) for n in range(14)]
    assert phases == [("critic", 0), ("critic", 1), ("critic", 2), ("student", 0), ("critic", 3), ("critic", 4),
                      ("critic", 5), ("critic", 6), ("student", 1), ("critic", 7), ("critic", 8), ("critic", 9),
                      ("critic", 10), ("student", 2)]


def test_vae_foreground_weights():
    video = torch.full((2, 3, 5, 8, 8), -0.8)
    video[0, :, :, 2:4, 2:4] = 0.9          # a 2x2 object in clip 0 (4 of 64 pixels per frame)
    w = foreground_weights(video, 10.0)
    assert w.shape == (2, 1, 5, 8, 8)
    assert torch.allclose(w.mean(dim=(2, 3, 4)), torch.ones(2, 1))
    # object pixels weigh 11x the background ones; a clip without an object keeps uniform weights
    assert w[0, 0, 0, 2, 2].item() == pytest.approx(11 * w[0, 0, 0, 0, 0].item())
    assert w[0, 0, 0, 0, 0].item() == pytest.approx(64 / (60 + 4 * 11))
    assert torch.equal(w[1], torch.ones_like(w[1]))
    assert torch.equal(foreground_weights(video, 0.0), torch.ones_like(w))


def test_vae_edge_loss_sees_shape_errors_not_offsets():
    w = torch.ones(1, 1, 2, 8, 8)
    assert edge_loss(torch.full((1, 3, 2, 8, 8), 0.3), w).item() == 0.0      # a constant error has no edges
    err = torch.zeros(1, 3, 2, 8, 8)
    err[..., 3, 3] = 1.0                          # one wrong pixel (a rounded corner): 4 differences of 1
    # dx: 3 channels x 2 frames x 2 differences over [.., 8, 7] elements; dy the same over [.., 7, 8]
    assert edge_loss(err, w).item() == pytest.approx(2 * (3 * 2 * 2) / (3 * 2 * 8 * 7))
    heavy = w.clone()
    heavy[..., 3, 4] = 5.0                        # a difference weighs the larger weight of its two pixels
    assert edge_loss(err, heavy).item() == pytest.approx((3 * 2 * (1 + 5) + 3 * 2 * 2) / (3 * 2 * 8 * 7))


# ---- EMA, lr, merge ------------------------------------------------------------------------------

def test_power_ema_gamma_solves_cubic_and_beta():
    for sigma_rel in (0.05, 0.1, 0.2):
        gamma = power_ema_gamma(sigma_rel)
        s = sigma_rel ** -2
        assert gamma ** 3 + 7 * gamma ** 2 + (16 - s) * gamma + (12 - s) == pytest.approx(0, abs=1e-8)
        assert math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) == pytest.approx(sigma_rel)
        assert gamma == max(r.real for r in np.roots([1, 7, 16 - s, 12 - s]) if abs(r.imag) < 1e-9)
    gamma = power_ema_gamma(0.1)
    assert gamma == pytest.approx(6.9372, abs=1e-3)   # 6.9372^3 + 7*6.9372^2 - 84*6.9372 - 88 ~ 0
    assert power_ema_beta(0, gamma) == 0.0
    assert power_ema_beta(9, gamma) == pytest.approx(0.9 ** (gamma + 1))

    lin = torch.nn.Linear(2, 1)
    ema = PowerEMA(lin, 0.1)
    manual = None
    for n in range(4):
        with torch.no_grad():
            lin.weight.add_(1.0)
        ema.update(lin, n)
        beta = power_ema_beta(n, gamma)
        w = lin.weight.detach().clone()
        manual = w if manual is None else beta * manual + (1 - beta) * w
    assert torch.allclose(ema.state_dict()["weight"], manual)


def test_lr_schedule():
    opt = Optim(lr=1.0, warmup=10, cosine=True)
    assert lr_at(opt, 0, 110) == pytest.approx(0.01)
    assert lr_at(opt, 5, 110) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_at(opt, 10, 110) == pytest.approx(1.0)
    assert lr_at(opt, 60, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(opt, 110, 110) == pytest.approx(0.1)
    assert lr_at(Optim(lr=2.0, warmup=0), 50, 100) == 2.0


def test_merge_arithmetic_fp32_cast_back_and_proj_l():
    g = _gen(9)
    base = {"w": torch.randn(4, 4, generator=g).bfloat16(), "only_base": torch.ones(2), "shape": torch.zeros(3),
            "step": torch.tensor(7)}
    diff_base = {"w": torch.randn(4, 4, generator=g), "shape": torch.zeros(3), "step": torch.tensor(1)}
    proj = "blocks.0.self_attn.attn_op.local_attn.proj_l.weight"
    target = {"w": torch.randn(4, 4, generator=g).bfloat16(), "shape": torch.zeros(5), proj: torch.randn(3, 3, generator=g),
              "step": torch.tensor(3)}
    merged = merge_state_dicts(base, diff_base, target, weight=0.5)
    expected = (base["w"].float() + 0.5 * (target["w"].float() - diff_base["w"].float())).bfloat16()
    assert merged["w"].dtype == torch.bfloat16 and torch.equal(merged["w"], expected)
    assert torch.equal(merged[proj], target[proj])                 # only in the SLA model: copied
    assert torch.equal(merged["only_base"], base["only_base"])     # only in base: copied
    assert torch.equal(merged["shape"], base["shape"])             # shape mismatch: base kept
    assert torch.equal(merged["step"], base["step"])               # integers are not merged
    assert set(merged) == set(base) | {proj}
