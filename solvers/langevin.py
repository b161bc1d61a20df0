"""Annealed Langevin dynamics (Song & Ermon 2019, NCSN, Algorithm 1), on any noise schedule through sigma_hat.

NCSN perturbs data with Gaussian noise of levels sigma_1 > ... > sigma_L and samples p_sigma = p_data * N(0, sigma^2 I)
at each level in turn by Langevin dynamics, warm-started from the previous level.  Here the levels are the time
grid's sigma_hat(t_i) = sigma/alpha, i = 1..L = len(t), and p_sigma_i is the law of x_hat = x_{t_i}/alpha(t_i)
= x0 + sigma_hat_i eps (Karras et al. 2022, eq. 12): on `ve` (alpha = 1) that is q_{t_i} itself; on VP-type
schedules it is q_{t_i} rescaled by 1/alpha(t_i), with score alpha grad_x log q_t(alpha x_hat) = -eps(alpha x_hat,
t_i)/sigma_hat_i.  So the chain runs in x_hat (data units), the network is evaluated at x = alpha(t_i) x_hat, and
NCSN's step sizes alpha_i = eps sigma_i^2/sigma_L^2 mean the same on every schedule.  Every Langevin move draws its
noise with rng.randn_like (a move at a fixed level, not a Brownian increment over [t_n, t_{n+1}]).
"""
from __future__ import annotations

import math

import torch

from bench.models.dynamics import _bc
from bench.models.errors import ConfigError
from bench.solvers.registry import register_solver


def _check_steps_per_level(steps_per_level):
    if not isinstance(steps_per_level, int) or isinstance(steps_per_level, bool) or steps_per_level < 1:
        raise ConfigError(f"annealed_langevin: steps_per_level must be an integer >= 1 (NCSN's T, Langevin steps at "
                          f"each noise level), got {steps_per_level!r}")


def _check(steps_per_level, eps, denoise):
    _check_steps_per_level(steps_per_level)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or not eps > 0:
        raise ConfigError(f"annealed_langevin: eps must be a finite number > 0 (the step size alpha_L at the last "
                          f"noise level; alpha_i = eps sigma_i^2 / sigma_L^2), got {eps!r}")
    if not isinstance(denoise, bool):
        raise ConfigError(f"annealed_langevin: denoise must be true (x0-prediction at the last level) or false (the "
                          f"last Langevin iterate, as NCSN), got {denoise!r}")


def _nfe(steps, steps_per_level=100, **_):
    _check_steps_per_level(steps_per_level)    # also guards steps_for against a budget loop that never ends
    return steps * steps_per_level


# One noise level per grid point.  For locating a divergence (bench.run.step_of), step m+1 is the Langevin moves at
# level t[m] (its evaluations start step m+1, as an Euler step's do; end_evals = 0), and the last step is the moves
# at sigma_L with the denoise, the step "to sigma_hat = 0".
@register_solver("annealed_langevin", nfe_of_steps=_nfe, nfe_formula="steps*steps_per_level", min_steps=2,
                 stochastic=True, brownian=False, default_timesteps="logsnr", end_evals=0)
def annealed_langevin(dyn, x, t, rng, steps_per_level: int = 100, eps: float = 2e-5, denoise: bool = True):
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1): for i = 1..L, alpha_i = eps sigma_i^2/sigma_L^2 and
    steps_per_level times x_hat <- x_hat + alpha_i/2 score(x_hat, sigma_i) + sqrt(alpha_i) z, sigma_i = sigma_hat(t_i).

    denoise=false returns the last iterate, as NCSN does: approximately a sample of p_data * N(0, sigma_L^2 I).
    denoise=true (DESIGN 'final step'; later work, e.g. Jolicoeur-Martineau et al. 2021, adds this step): the last
    evaluation at sigma_L gives the x0-prediction (Tweedie, E[x0 | x_hat] = x_hat + sigma_L^2 score) in place of the
    last Langevin move, so the network is never evaluated at sigma = 0 and NFE = L * steps_per_level either way."""
    _check(steps_per_level, eps, denoise)
    sch = dyn.schedule
    sig, a = sch.sigma_hat(t), sch.alpha(t)
    x_hat = x / _bc(a[0], x)                                   # x_T drawn at t[0]: x_hat ~ N(0, sigma_hat_1^2 I)
    L = len(t)
    for i in range(L):
        step = eps * (sig[i] / sig[-1]) ** 2                   # alpha_i
        for j in range(steps_per_level):
            e = dyn.eps(_bc(a[i], x_hat) * x_hat, t[i])
            if denoise and i == L - 1 and j == steps_per_level - 1:
                return dyn.x0(_bc(a[i], x_hat) * x_hat, t[i], eps=e)      # = x_hat - sigma_L eps
            z = rng.randn_like(x_hat)
            score = -e / _bc(sig[i], x_hat)                    # grad log p_sigma_i at x_hat
            x_hat = x_hat + _bc(step / 2, x_hat) * score + _bc(torch.sqrt(step), x_hat) * z
    return x_hat
