"""Probability-flow ODE and reverse SDE of an epsilon-model under a noise schedule.

All derived predictions (x0, score, EDM denoiser) come from eps in one place here, and every
network call goes through NFECounter, so the benchmark's NFE is counted, never inferred.
"""
from __future__ import annotations

import torch


class NFECounter:
    """Wraps the network; one call on a batch is one network function evaluation."""

    def __init__(self, net):
        self.net, self.nfe = net, 0

    def __call__(self, x, t):
        self.nfe += 1
        return self.net(x, t)

    def reset(self):
        self.nfe = 0


def _bc(c, x):
    """Reshape a scalar or per-sample coefficient to broadcast against x."""
    # a Python number goes straight to x's dtype (as_tensor would round it to float32 first: 1e-8 off in float64)
    c = c.to(x.dtype) if torch.is_tensor(c) else torch.as_tensor(c, dtype=x.dtype, device=x.device)
    return c.reshape(-1, *([1] * (x.dim() - 1))) if c.dim() else c


class Dynamics:
    """Right-hand sides for samplers: ode_rhs(t, x) (torchdiffeq signature), sde_drift(t, x), diffusion(t)."""

    def __init__(self, net, schedule):
        self.counter = NFECounter(net)
        self.schedule = schedule

    @property
    def nfe(self) -> int:
        return self.counter.nfe

    def eps(self, x, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        return self.counter(x, t.to(x.device, x.dtype))

    # Derived predictions: x_t = alpha x0 + sigma eps (DESIGN: derived from eps in one place).
    def x0(self, x, t, eps=None):
        eps = self.eps(x, t) if eps is None else eps
        s = self.schedule
        return (x - _bc(s.sigma(t), x) * eps) / _bc(s.alpha(t), x)

    def score(self, x, t, eps=None):
        eps = self.eps(x, t) if eps is None else eps
        return -eps / _bc(self.schedule.sigma(t), x)

    def denoiser(self, x_hat, sigma_hat):
        """EDM's D(x_hat; sigma_hat) = x_hat - sigma_hat eps(alpha x_hat, t(sigma_hat)) (Karras et al. 2022, eq. 12)."""
        t = self.schedule.t_of_sigma_hat(torch.as_tensor(sigma_hat, dtype=torch.float64))
        return self.x0(_bc(self.schedule.alpha(t), x_hat) * x_hat, t)

    # Probability-flow ODE dx/dt = f x - g^2/2 score = f x + g^2/(2 sigma) eps (Song et al. 2021, eq. 13).
    def ode_rhs(self, t, x, eps=None):
        s = self.schedule
        eps = self.eps(x, t) if eps is None else eps
        return _bc(s.f(t), x) * x + _bc(s.g2(t) / (2 * s.sigma(t)), x) * eps

    # Reverse SDE dx = [f x - g^2 score] dt + g dW-bar (Song et al. 2021, eq. 6).
    def sde_drift(self, t, x, eps=None):
        s = self.schedule
        eps = self.eps(x, t) if eps is None else eps
        return _bc(s.f(t), x) * x + _bc(s.g2(t) / s.sigma(t), x) * eps

    def diffusion(self, t):
        return torch.sqrt(self.schedule.g2(t))

    # EDM form: d x_hat / d sigma_hat = eps(alpha x_hat, t(sigma_hat)) (Karras et al. 2022, eq. 4 with s = alpha).
    def ode_rhs_sigma_hat(self, sigma_hat, x_hat):
        t = self.schedule.t_of_sigma_hat(torch.as_tensor(sigma_hat, dtype=torch.float64))
        return self.eps(_bc(self.schedule.alpha(t), x_hat) * x_hat, t)
