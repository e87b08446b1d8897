"""rCM few-step sampler (SPEC §5.1, §2.3, §2.4) as pure functions; the network is a callback.

Times are rectified-flow times s in [0, 1] (x_s = (1-s) x0 + s eps, velocity v = eps - x0). The schedule
comes from TrigFlow angles tau = [atan(sigma_max), 1.5, 1.4, 1.0][:steps] + [0] (the middle ones may be
chosen: `mid_angles`) via s = sin / (sin + cos) (= sigma / (1 + sigma) with sigma = tan tau). The state x is
float64 throughout; the network sees bf16(x) and the bf16 time bf16(fp32(s) * 1000), while the update uses the
exact float64 s (SPEC §13.4).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from turbovid.config import parse_floats

# Intermediate TrigFlow angles shared by rCM training (`backward_timesteps`) and TurboDiffusion inference.
MID_ANGLES = (1.5, 1.4, 1.0)

# velocity(x float64 [B, ...], t_net bf16 [B], step index, s_cur) -> v (any float dtype, same shape as x)
Velocity = Callable[[torch.Tensor, torch.Tensor, int, float], torch.Tensor]


def check_mid_angles(mid_angles: tuple[float, ...]) -> None:
    """One-line ValueError unless there are 1-3 angles decreasing strictly inside (0, pi/2)."""
    a = list(mid_angles)
    if not 1 <= len(a) <= len(MID_ANGLES) or not all(math.isfinite(x) for x in a):
        raise ValueError(f"--mid-angles needs 1 to {len(MID_ANGLES)} finite angles, got {a}")
    if not (math.pi / 2 > a[0] and all(y < x for x, y in zip(a, a[1:])) and a[-1] > 0):
        raise ValueError(f"--mid-angles must decrease strictly inside (0, pi/2), got {a}")


def parse_mid_angles(text: str | None) -> tuple[float, ...] | None:
    """`--mid-angles 1.5,1.4,1.0` -> (1.5, 1.4, 1.0), checked; None stays None (rCM's angles)."""
    if text is None:
        return None
    angles = parse_floats(text, "--mid-angles")
    check_mid_angles(angles)
    return angles


def rcm_times(steps: int, sigma_max: float, mid_angles: tuple[float, ...] = MID_ANGLES) -> list[float]:
    """steps + 1 RF times from sigma_max / (1 + sigma_max) to 0 (float64 math) through the first steps - 1 of
    `mid_angles` (TrigFlow angles; default rCM's)."""
    if not 1 <= steps <= len(MID_ANGLES) + 1:
        raise ValueError(f"rCM sampling takes 1 to {len(MID_ANGLES) + 1} steps, got {steps}")
    if not sigma_max > 0:
        raise ValueError(f"sigma_max must be positive, got {sigma_max}")
    check_mid_angles(tuple(mid_angles))
    if len(mid_angles) < steps - 1:
        raise ValueError(f"{steps} rCM steps need {steps - 1} mid angles, got {list(mid_angles)}")
    angles = [math.atan(sigma_max), *mid_angles[: steps - 1], 0.0]
    return [math.sin(a) / (math.sin(a) + math.cos(a)) for a in angles]


def network_time(s: float, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[batch] bf16 time input: s rounded to fp32, times 1000 in float64, then rounded to bf16 (80/81 -> 988)."""
    value = float(torch.tensor(s, dtype=torch.float32)) * 1000.0
    return torch.full((batch,), value, dtype=torch.float64, device=device).to(torch.bfloat16)


def expert_for_step(s_cur: float, boundary: float) -> str:
    """Wan2.2 A14B: the high-noise expert runs while s_cur >= boundary, the low-noise one after (SPEC §2.3)."""
    return "high" if s_cur >= boundary else "low"


def experts_for_schedule(times: list[float], boundary: float) -> list[str]:
    """The expert of each step of a schedule (one entry per step, i.e. len(times) - 1 entries)."""
    return [expert_for_step(s, boundary) for s in times[:-1]]


def rcm_sample(velocity: Velocity, noise: torch.Tensor, times: list[float], generator: torch.Generator | None,
               *, ode: bool = False, on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Run the rCM sampler; returns the fp32 sample.

    `noise` is eps_0 (fp32), drawn by the caller from `generator` before anything else. SDE mode (default)
    draws one fresh fp32 eps of the same shape from `generator` at every step, including the last one where it
    is multiplied by s_next = 0, so the generator ends in the official state; ODE mode draws nothing.
    """
    if not ode and generator is None:
        raise ValueError("SDE sampling needs the generator that drew the initial noise")
    n = len(times) - 1
    x = noise.to(torch.float64) * times[0]  # pure scaled noise, no data term (SPEC §5.1.4)
    for i, (s_cur, s_next) in enumerate(zip(times[:-1], times[1:])):
        v = velocity(x, network_time(s_cur, x.shape[0], x.device), i, s_cur).to(torch.float64)
        if ode:
            x = x - (s_cur - s_next) * v
        else:
            eps = torch.randn(noise.shape, dtype=torch.float32, device=noise.device, generator=generator)
            # The official update multiplies a float64 0-dim s_next by the fp32 draw, which PyTorch computes
            # in fp32; only then is the noise term promoted to float64. Same rounding here.
            x = (1 - s_next) * (x - s_cur * v) + (eps * s_next).to(torch.float64)
        if on_step is not None:
            on_step(i, n)
    return x.to(torch.float32)
