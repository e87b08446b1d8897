"""Samplers against SPEC §5 / §2.3 numbers, hand-written official loops, closed forms and diffusers."""
import math

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler

from turbovid.sampling import (
    cfg_velocity,
    euler_sample,
    expert_for_step,
    experts_for_schedule,
    flow_network_time,
    flow_times,
    network_time,
    rcm_sample,
    parse_mid_angles,
    rcm_times,
    unipc_sample,
)


# ---- rCM schedule and time inputs (SPEC §5.1 values) ---------------------------------------------

def test_rcm_times_match_spec_values():
    times = rcm_times(4, 80.0)
    assert len(times) == 5 and times[-1] == 0.0
    assert times[0] == pytest.approx(80 / 81, abs=1e-15)
    assert times[1:4] == pytest.approx([0.9337811, 0.8528954, 0.6089790], abs=5e-8)
    # s = sin/(sin+cos) is sigma/(1+sigma) with sigma = tan(angle)
    assert times[1] == pytest.approx(math.tan(1.5) / (1 + math.tan(1.5)), rel=1e-14)
    assert rcm_times(4, 200.0)[0] == pytest.approx(0.9950249, abs=5e-8)
    assert rcm_times(4, 1600.0)[0] == pytest.approx(0.9993754, abs=5e-8)
    assert rcm_times(2, 200.0) == pytest.approx([200 / 201, 0.9337811, 0.0], abs=5e-8)
    assert rcm_times(1, 80.0) == pytest.approx([80 / 81, 0.0], abs=1e-15)


def test_rcm_times_through_chosen_mid_angles():
    # SPEC §5.1's older choice [1.3, 1.0, 0.6]: the same sin / (sin + cos) map; the first steps - 1 are used
    times = rcm_times(4, 80.0, (1.3, 1.0, 0.6))
    expect = [80 / 81, *(math.tan(a) / (1 + math.tan(a)) for a in (1.3, 1.0, 0.6)), 0.0]
    assert times == pytest.approx(expect, rel=1e-14)
    assert rcm_times(3, 80.0, (1.3, 1.0, 0.6)) == pytest.approx([*expect[:3], 0.0], rel=1e-14)
    assert rcm_times(2, 80.0, (1.2,)) == pytest.approx([80 / 81, math.tan(1.2) / (1 + math.tan(1.2)), 0.0])
    assert parse_mid_angles("1.3, 1.0,0.6") == (1.3, 1.0, 0.6) and parse_mid_angles(None) is None
    for bad, match in (("1.0,1.4", "decrease strictly"), ("1.6", "decrease strictly"), ("0.5,0", "decrease strictly"),
                       ("1.5,x", "comma-separated numbers"), ("1.5,1.4,1.0,0.5", "1 to 3 finite"),
                       ("nan", "1 to 3 finite")):
        with pytest.raises(ValueError, match=match):
            parse_mid_angles(bad)
    with pytest.raises(ValueError, match="4 rCM steps need 3 mid angles"):
        rcm_times(4, 80.0, (1.2, 0.6))


@pytest.mark.parametrize("steps", [0, 5])
def test_rcm_times_rejects_step_counts(steps):
    with pytest.raises(ValueError):
        rcm_times(steps, 80.0)


def test_network_time_inputs_match_spec():
    def values(sigma_max):
        return [network_time(s, 3, "cpu") for s in rcm_times(4, sigma_max)[:-1]]

    ts = values(80.0)
    assert all(t.dtype == torch.bfloat16 and t.shape == (3,) for t in ts)
    assert [t[0].item() for t in ts] == [988.0, 932.0, 852.0, 608.0]
    assert [t[0].item() for t in values(200.0)] == [996.0, 932.0, 852.0, 608.0]
    assert values(1600.0)[0][0].item() == 1000.0


def test_experts_per_step():
    assert experts_for_schedule(rcm_times(4, 200.0), 0.9) == ["high", "high", "low", "low"]
    assert experts_for_schedule(rcm_times(3, 200.0), 0.9) == ["high", "high", "low"]
    assert experts_for_schedule(rcm_times(2, 200.0), 0.9) == ["high", "high"]
    assert experts_for_schedule(rcm_times(1, 200.0), 0.9) == ["high"]
    assert expert_for_step(0.9, 0.9) == "high" and expert_for_step(0.8999, 0.9) == "low"


# ---- rCM sampler: RNG order and update, against the official loop written out by hand --------------

SHAPE = (2, 3, 2, 4, 4)


def toy_velocity(x, s):
    # Smooth, x- and s-dependent, evaluated on the bf16 input like the real network.
    xb = x.to(torch.bfloat16).float()
    return (torch.tanh(xb) * (1.5 - s) + 0.25 * xb.roll(1, dims=-1)).to(torch.float32)


def official_rcm_loop(times, seed, ode):
    """SPEC §5.1 / the TurboDiffusion inference loop, with the official tensor dtypes."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(SHAPE, dtype=torch.float32, generator=gen)
    t_steps = torch.tensor(times, dtype=torch.float64)
    x = noise.to(torch.float64) * t_steps[0]
    t_inputs = []
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        t_inputs.append((t_cur.float() * torch.ones(SHAPE[0], dtype=torch.float64) * 1000).to(torch.bfloat16))
        v = toy_velocity(x, t_cur.item()).to(torch.float64)
        if ode:
            x = x - (t_cur - t_next) * v
        else:
            x = (1 - t_next) * (x - t_cur * v) + t_next * torch.randn(SHAPE, dtype=torch.float32, generator=gen)
    return x.float(), t_inputs, gen


@pytest.mark.parametrize("ode", [False, True])
@pytest.mark.parametrize("steps", [1, 4])
def test_rcm_sample_reproduces_official_loop(steps, ode):
    times = rcm_times(steps, 80.0)
    expected, expected_t, expected_gen = official_rcm_loop(times, seed=7, ode=ode)

    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(SHAPE, dtype=torch.float32, generator=gen)
    seen, progress = [], []

    def velocity(x, t_net, step, s_cur):
        assert x.dtype == torch.float64 and s_cur == times[step]
        seen.append(t_net)
        return toy_velocity(x, s_cur)

    out = rcm_sample(velocity, noise, times, gen, ode=ode, on_step=lambda i, n: progress.append((i, n)))
    assert out.dtype == torch.float32
    assert torch.equal(out, expected)
    assert all(torch.equal(a, b) for a, b in zip(seen, expected_t)) and len(seen) == steps
    assert progress == [(i, steps) for i in range(steps)]
    # Same generator state afterwards: SDE drew once per step (the last draw too), ODE never.
    assert torch.equal(torch.randn(4, generator=gen), torch.randn(4, generator=expected_gen))


def test_rcm_sde_draws_on_last_step_and_ode_draws_none():
    times = rcm_times(3, 80.0)
    for ode, draws in [(False, 3), (True, 0)]:
        gen = torch.Generator().manual_seed(3)
        noise = torch.randn(SHAPE, generator=gen)
        rcm_sample(lambda x, t, i, s: toy_velocity(x, s), noise, times, gen, ode=ode)
        ref = torch.Generator().manual_seed(3)
        for _ in range(1 + draws):
            torch.randn(SHAPE, generator=ref)
        assert torch.equal(torch.randn(5, generator=gen), torch.randn(5, generator=ref))


def test_rcm_last_step_returns_x0_prediction():
    # With s_next = 0 both modes give x0 = x - s v exactly, whatever the last draw was.
    times = rcm_times(2, 80.0)
    states = []

    def velocity(x, t, i, s):
        states.append(x)
        return toy_velocity(x, s)

    gen = torch.Generator().manual_seed(0)
    out = rcm_sample(velocity, torch.randn(SHAPE, generator=gen), times, gen)
    x_last = states[-1]
    x0 = x_last - times[1] * toy_velocity(x_last, times[1]).to(torch.float64)
    assert torch.equal(out, x0.float())


# ---- teacher flow matching ------------------------------------------------------------------------

def unshifted_grid(steps, shift, sigma_max=5000.0):
    s = sigma_max / (sigma_max + 1)
    return np.linspace(s / (shift - (shift - 1) * s), 0.0, steps + 1)[:-1]


def test_flow_times_match_diffusers_sigmas():
    times = flow_times(50, 5.0)
    assert len(times) == 51 and times[-1] == 0.0
    assert times[0] == pytest.approx(5000 / 5001, rel=1e-14)   # un-shift then shift is the identity
    assert all(a > b for a, b in zip(times[:-1], times[1:]))
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0,
                                    solver_order=2, solver_type="bh2", lower_order_final=True)
    sched.set_timesteps(sigmas=unshifted_grid(50, 5.0))  # diffusers applies the shift and appends 0 itself
    assert sched.sigmas.dtype == torch.float32 and len(sched.sigmas) == 51
    assert torch.equal(torch.tensor(times, dtype=torch.float64).float(), sched.sigmas)
    assert torch.allclose(torch.tensor(times, dtype=torch.float64), sched.sigmas.double(), rtol=0, atol=6e-8)


def test_flow_network_time_and_cfg():
    t = flow_network_time(flow_times(50, 5.0)[0], 2)
    assert t.dtype == torch.bfloat16 and t.tolist() == [1000.0, 1000.0]
    assert flow_network_time(0.5, 1).item() == 500.0
    v_c, v_u = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0])
    assert torch.equal(cfg_velocity(v_c, v_u, 5.0), torch.tensor([3.0, -14.0]))
    assert torch.equal(cfg_velocity(v_c, v_u, 1.0), v_c)


def test_euler_matches_closed_forms():
    times = flow_times(20, 3.0)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    c = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    # Straight flow of one data point c: v = (x - c)/sigma is constant along x_sigma = c + (x_1 - c) sigma/sigma_1,
    # so Euler is exact and lands on c.
    out = euler_sample(lambda x, t, i, s: (x - c) / s, noise.float(), times)
    assert torch.allclose(out.double(), c, rtol=0, atol=1e-6)
    # Linear ODE dx/dsigma = a x: Euler gives x_N = prod(1 + a (sigma_{k+1} - sigma_k)) x_0.
    a = 0.7
    factor = math.prod(1 + a * (s1 - s0) for s0, s1 in zip(times[:-1], times[1:]))
    out = euler_sample(lambda x, t, i, s: a * x, noise.float(), times)
    assert torch.allclose(out, (noise.float().double() * factor).float(), rtol=1e-6, atol=0)


def diffusers_unipc(model, noise, times, order):
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0,
                                    solver_order=order, solver_type="bh2", lower_order_final=True)
    sched.set_timesteps(sigmas=unshifted_grid(len(times) - 1, 5.0))
    sched.sigmas = torch.tensor(times, dtype=torch.float64)  # same sigmas, in float64, for a tight comparison
    sched.set_begin_index(0)
    x, inputs = noise.to(torch.float64), []
    for i, t in enumerate(sched.timesteps):
        inputs.append(x)
        x = sched.step(model(x, times[i]), t, x).prev_sample
    return x, inputs


def nonlinear_model(c):
    return lambda x, s: (x - c) / s + 0.3 * math.sin(3 * s) * x + 0.1 * x * x.abs().clamp(max=2)


@pytest.mark.parametrize("order,steps", [(2, 50), (2, 3), (1, 10), (3, 12)])
def test_unipc_trajectory_equals_diffusers(order, steps):
    times = flow_times(steps, 5.0)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    c = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    model = nonlinear_model(c)
    expected, expected_inputs = diffusers_unipc(model, noise, times, order)

    inputs = []

    def velocity(x, t_net, step, sigma):
        assert sigma == times[step] and t_net.dtype == torch.bfloat16
        inputs.append(x)
        return model(x, sigma)

    out = unipc_sample(velocity, noise, times, order=order)
    assert len(inputs) == len(expected_inputs) == steps
    for ours, theirs in zip(inputs, expected_inputs):   # every network input, step by step
        assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    assert torch.allclose(out, expected.float(), rtol=2e-7, atol=1e-7)  # fp32 rounding of equal float64 states


def test_unipc_is_exact_on_straight_flow():
    # x0 = x - sigma v = c at every step, so all divided differences vanish and each step is exact.
    times = flow_times(8, 5.0)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    c = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    out = unipc_sample(lambda x, t, i, s: (x - c) / s, noise, times)
    assert torch.allclose(out.double(), c, rtol=0, atol=1e-6)


def test_flow_samplers_reject_bad_times():
    noise = torch.zeros(1, 2)
    with pytest.raises(ValueError):
        unipc_sample(lambda x, t, i, s: x, noise, [1.0, 0.5, 0.0])
    with pytest.raises(ValueError):
        euler_sample(lambda x, t, i, s: x, noise, [0.5, 0.7, 0.0])
    with pytest.raises(ValueError):
        flow_times(0, 5.0)
