"""Power EMA (Karras et al., EDM2) as rCM uses it: an fp32 shadow copy of the weights.

After update number n (0-based) the shadow is  ema <- beta_n * ema + (1 - beta_n) * weights  with
    beta_n = (1 - 1/(n+1))^(gamma+1)    (beta_0 = 0: the first update copies the weights),
which averages the whole trajectory with weights ~ n^gamma. gamma is fixed by the relative width
sigma_rel of that averaging profile: sigma_rel^2 = (gamma+1) / ((gamma+2)^2 (gamma+3)), i.e. gamma is
the largest real root of  gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0
(sigma_rel = 0.1 -> gamma ~= 6.94).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def power_ema_gamma(sigma_rel: float) -> float:
    if not 0 < sigma_rel < 0.5:
        raise ValueError(f"sigma_rel must be in (0, 0.5), got {sigma_rel}")
    s = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def power_ema_beta(n: int, gamma: float) -> float:
    if n < 1:
        return 0.0
    return (1.0 - 1.0 / (n + 1)) ** (gamma + 1.0)


class PowerEMA:
    """fp32 shadow of a module's floating-point parameters and buffers (by state-dict name)."""

    def __init__(self, module: nn.Module, sigma_rel: float):
        self.gamma = power_ema_gamma(sigma_rel)
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: nn.Module, n: int) -> float:
        beta = power_ema_beta(n, self.gamma)
        for k, v in module.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().float(), 1.0 - beta)
        return beta

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = self.shadow.keys() - state.keys()
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
        for k in self.shadow:
            self.shadow[k].copy_(state[k])
