"""Teacher flow-matching samplers (SPEC §5.2) as pure functions: schedule, CFG, Euler, UniPC.

Same conventions as rcm.py: RF time sigma in [0, 1], velocity v = eps - x0, float64 state, the network sees
bf16(x) and bf16(sigma * 1000). Sampling starts from x = eps itself (not sigma_0 * eps: sigma_0 = 5000/5001).
The rCM teacher scripts keep their sigma tables in fp32 and some products in fp32; we keep float64
throughout, a difference of order 1e-7 relative in the coefficients.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from turbovid.sampling.rcm import Velocity


def flow_times(steps: int, shift: float, sigma_max_edm: float = 5000.0) -> list[float]:
    """steps + 1 shifted RF times: un-shift sigma_max, N equal steps down to 0 (the 0 dropped), shift each,
    then 0 appended as the final target. The first time is exactly sigma_max / (1 + sigma_max)."""
    if steps < 1:
        raise ValueError(f"flow sampling needs at least 1 step, got {steps}")
    if not shift > 0 or not sigma_max_edm > 0:
        raise ValueError(f"shift and sigma_max must be positive, got shift={shift}, sigma_max={sigma_max_edm}")
    s_max = sigma_max_edm / (sigma_max_edm + 1)
    unshifted = s_max / (shift - (shift - 1) * s_max)  # inverse of s -> shift*s / (1 + (shift-1)*s)
    grid = torch.linspace(unshifted, 0.0, steps + 1, dtype=torch.float64)[:-1].tolist()
    return [shift * s / (1 + (shift - 1) * s) for s in grid] + [0.0]


def flow_network_time(sigma: float, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[batch] bf16 time input bf16(sigma * 1000) (the teacher scripts keep sigma * 1000 in float64)."""
    return torch.full((batch,), sigma * 1000.0, dtype=torch.float64, device=device).to(torch.bfloat16)


def cfg_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance v_uncond + g (v_cond - v_uncond); the uncond branch is the negative prompt."""
    return v_uncond + guidance * (v_cond - v_uncond)


def _check_times(times: list[float]) -> None:
    if len(times) < 2 or not all(a > b for a, b in zip(times[:-1], times[1:])) or not 0 < times[0] < 1 \
            or times[-1] < 0:
        raise ValueError(f"flow times must decrease strictly inside (0, 1) and end at >= 0, got {times[:3]}...")


def euler_sample(velocity: Velocity, noise: torch.Tensor, times: list[float], *,
                 on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """x <- x + (sigma_next - sigma) v at every step; returns fp32."""
    _check_times(times)
    n = len(times) - 1
    x = noise.to(torch.float64)
    for i, (s, s_next) in enumerate(zip(times[:-1], times[1:])):
        v = velocity(x, flow_network_time(s, x.shape[0], x.device), i, s).to(torch.float64)
        x = x + (s_next - s) * v
        if on_step is not None:
            on_step(i, n)
    return x.to(torch.float32)


# ---- UniPC ---------------------------------------------------------------------------------------
# UniPC (Zhao et al. 2023) in its data-prediction form on the RF path x = alpha x0 + sigma eps with
# alpha = 1 - sigma. With log-SNR lambda = log(alpha / sigma), one step from index j to j+1 is
#     x_{j+1} = (sigma_{j+1} / sigma_j) x_j - alpha_{j+1} (e^{-h} - 1) x0_j - alpha_{j+1} B(h) sum_k rho_k D_k
# with h = lambda_{j+1} - lambda_j and D_k = (x0_{j-k} - x0_j) / r_k, r_k = (lambda_{j-k} - lambda_j) / h, the
# divided differences of the past x0 predictions. "bh2" takes B(h) = e^{-h} - 1. The rho solve
# R rho = b with R[m][k] = r_k^m (r_p = 1) and b_m = g_m m! / B(h), g_1 = (e^{-h} - 1)/(-h) - 1,
# g_{m+1} = g_m / (-h) - 1/(m+1)!. The predictor (UniP) of order p uses the p-1 past differences and the
# leading (p-1)x(p-1) block of that system (order 2 is fixed at rho = 1/2, as in diffusers); the corrector
# (UniC), run once the network has been evaluated at x_{j+1}, redoes the same step from x_j with one more
# difference D_p = x0_{j+1} - x0_j (r_p = 1) and the full p x p system (order 1: rho = 1/2). Orders warm up
# 1, 2, ... and drop to 1 on the final step, like diffusers' UniPCMultistepScheduler with
# lower_order_final=True.

def _log_snr(sigma: float) -> float:
    return math.inf if sigma == 0 else math.log(1 - sigma) - math.log(sigma)


def _unipc_step(x: torch.Tensor, x0s: dict[int, torch.Tensor], times: list[float], lams: list[float], j: int,
                order: int, x0_next: torch.Tensor | None = None) -> torch.Tensor:
    """x at times[j] -> x at times[j+1]: predictor, or corrector when `x0_next` (x0 at j+1) is given."""
    s, t = times[j], times[j + 1]
    h = lams[j + 1] - lams[j]
    hh = -h
    b_h = math.expm1(hh)  # "bh2"; it is also h*phi_1 of the exponential integrator
    rks = [(lams[j - k] - lams[j]) / h for k in range(1, order)] + [1.0]
    diffs = [(x0s[j - k] - x0s[j]) / rks[k - 1] for k in range(1, order)]
    b, g, factorial = [], b_h / hh - 1, 1
    for m in range(1, order + 1):
        b.append(g * factorial / b_h)
        factorial *= m + 1
        g = g / hh - 1 / factorial
    rows = [[r ** (m - 1) for r in rks] for m in range(1, order + 1)]

    if x0_next is None:
        if order == 1:
            rho = []
        elif order == 2:
            rho = [0.5]
        else:
            rho = torch.linalg.solve(torch.tensor([r[:-1] for r in rows[:-1]], dtype=torch.float64),
                                     torch.tensor(b[:-1], dtype=torch.float64)).tolist()
    else:
        diffs.append(x0_next - x0s[j])
        rho = [0.5] if order == 1 else torch.linalg.solve(torch.tensor(rows, dtype=torch.float64),
                                                          torch.tensor(b, dtype=torch.float64)).tolist()
    x_next = (t / s) * x - (1 - t) * b_h * x0s[j]
    for r, d in zip(rho, diffs):
        x_next = x_next - (1 - t) * b_h * r * d
    return x_next


def unipc_sample(velocity: Velocity, noise: torch.Tensor, times: list[float], *, order: int = 2,
                 on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Multistep UniPC ("bh2", x0-prediction x0 = x - sigma v, predictor-corrector); returns fp32."""
    _check_times(times)
    if not 1 <= order <= 3:
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order}")
    n = len(times) - 1
    lams = [_log_snr(s) for s in times]
    x = noise.to(torch.float64)
    x0s: dict[int, torch.Tensor] = {}  # step index -> x0 prediction; the last `order` are kept
    prev_x, prev_order = x, 0
    for i in range(n):
        v = velocity(x, flow_network_time(times[i], x.shape[0], x.device), i, times[i]).to(torch.float64)
        x0s[i] = x - times[i] * v
        if i > 0:  # corrector: redo step i-1 -> i with the prediction just made at i
            x = _unipc_step(prev_x, x0s, times, lams, i - 1, prev_order, x0_next=x0s[i])
        prev_x, prev_order = x, min(order, n - i, i + 1)  # warm-up; lower order on the final step
        x = _unipc_step(x, x0s, times, lams, i, prev_order)
        x0s.pop(i - order, None)  # keep indices i-order+1 .. i
        if on_step is not None:
            on_step(i, n)
    return x.to(torch.float32)
