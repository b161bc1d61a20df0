"""Restart sampling (Xu et al. 2023, Algorithm 1): EDM's Heun (Karras et al. 2022, Alg. 1) on the main grid, in
sigma_hat = sigma/alpha and x_hat = x/alpha; at restart intervals [sigma_min_i, sigma_max_i] the sample is noised
forward from sigma_min_i back up to sigma_max_i, x_hat + S_noise sqrt(sigma_max^2 - sigma_min^2) z, and the interval
is solved again with steps_i Heun steps on EDM's rho = 7 grid, K_i times.

As the paper's code (generate_restart.py) does, sigma_min_i is moved to the main-grid point nearest to it in
sigma_hat, where the restart starts once the main process has reached it.  The restart noise raises the noise level
at a fixed point of the path (no increment of a Brownian path over a step), so it is drawn with rng.randn_like.

NFE = 2*steps - 1 (Heun, last step Euler: the x0-prediction at t[-1]) + 2 * sum_i K_i steps_i.
"""
from __future__ import annotations

import math

import torch

from bench.models.errors import ConfigError
from bench.solvers.registry import register_solver
from bench.solvers.rk import rk_step
from bench.solvers.variables import ODEVariable

RHO = 7.0
# Xu et al. 2023, Table 3 / params_cifar10_vp.txt, the fewest-NFE CIFAR-10 VP setting: 18 main steps, one interval
# [0.06, 0.30] restarted K = 2 times with N_restart = 3 grid points (2 Heun steps): NFE 35 + 8 = 43.
PAPER_RESTART = ((0.06, 0.30, 2, 2),)


def _int_like(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_restart(restart, S_noise=1.0):
    """The restart list as [(sigma_min, sigma_max, K, steps), ...]: 0 < sigma_min < sigma_max, K >= 0, steps >= 1."""
    if not _num(S_noise) or S_noise <= 0:
        raise ConfigError(f"solver 'restart': S_noise must be a number > 0 (1 = the paper's Algorithm 1), "
                          f"got {S_noise!r}")
    form = ("a list of [sigma_min, sigma_max, K, steps] entries in sigma_hat (e.g. [[0.06, 0.30, 2, 2]]): restart "
            "K >= 0 times from sigma_min up to sigma_max, re-solving with steps >= 1 Heun steps; [] = plain Heun")
    if isinstance(restart, (str, bytes, dict)) or not hasattr(restart, "__len__"):
        raise ConfigError(f"solver 'restart': restart must be {form}; got {restart!r}")
    out = []
    for e in restart:
        if isinstance(e, (str, bytes, dict)) or not hasattr(e, "__len__") or len(e) != 4:
            raise ConfigError(f"solver 'restart': restart must be {form}; entry {e!r} is not a 4-item list")
        s_min, s_max, K, n = e
        if not (_num(s_min) and _num(s_max) and 0 < s_min < s_max):
            raise ConfigError(f"solver 'restart': entry {list(e)}: need numbers 0 < sigma_min < sigma_max")
        if not _int_like(K) or K < 0:
            raise ConfigError(f"solver 'restart': entry {list(e)}: K (the number of restarts) must be an integer >= 0, "
                              f"got {K!r}")
        if not _int_like(n) or n < 1:
            raise ConfigError(f"solver 'restart': entry {list(e)}: steps (Heun steps per restart) must be an integer "
                              f">= 1, got {n!r}")
        out.append((float(s_min), float(s_max), K, n))
    return out


def restart_nfe(steps, restart=PAPER_RESTART, S_noise=1.0, **_):
    return 2 * steps - 1 + 2 * sum(K * n for _, _, K, n in check_restart(restart, S_noise))


def restart_points(sig, entries, schedule):
    """{main-grid index j: [(sigma_max, K, steps), ...]} (entries in the given order): sigma_min snapped to the nearest
    grid point in sigma_hat.  An interval outside the model's sigma_hat range, or one whose snapped point is the
    grid's first or not below sigma_max, is a ConfigError."""
    lo, hi = float(schedule.sigma_hat(schedule.t_min)), float(schedule.sigma_hat(schedule.T))
    at = {}
    for s_min, s_max, K, n in entries:
        if s_min < lo * (1 - 1e-12) or s_max > hi * (1 + 1e-12):
            raise ConfigError(f"solver 'restart': interval [{s_min:g}, {s_max:g}] is outside the model's sigma_hat "
                              f"range [{lo:.6g}, {hi:.6g}] (sigma_hat at t_min and T)")
        j = min(range(len(sig)), key=lambda m: abs(sig[m] - s_min))
        if j == 0 or sig[j] >= s_max:
            raise ConfigError(f"solver 'restart': interval [{s_min:g}, {s_max:g}]: the main-grid point nearest to "
                              f"sigma_min is sigma_hat = {sig[j]:.6g} (point {j} of {len(sig)}), "
                              f"{'the first' if j == 0 else 'not below sigma_max'}; widen the interval or use more "
                              f"steps")
        at.setdefault(j, []).append((s_max, K, n))
    return at


def rho_grid(s_max, s_min, steps, rho=RHO):
    """steps + 1 values of sigma_hat from s_max to s_min (Karras et al. 2022, eq. 5), both ends exact."""
    r = torch.arange(steps + 1, dtype=torch.float64) / steps
    sig = (s_max ** (1 / rho) + r * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    sig[0], sig[-1] = s_max, s_min
    return sig


# Not Brownian: the restart noise goes back up in noise level at one point (rng.randn_like).
@register_solver("restart", nfe_of_steps=restart_nfe, nfe_formula="2*steps - 1 + 2*sum(K_i*steps_i over restart)",
                 min_steps=2, stochastic=True, brownian=False, default_timesteps="edm", end_evals=1)
def restart(dyn, x, t, rng, restart=PAPER_RESTART, S_noise: float = 1.0):
    """Restart sampling (Xu et al. 2023, Alg. 1) with EDM's Heun steps; x0 at t[-1] from the evaluation there."""
    entries = check_restart(restart, S_noise)
    V = ODEVariable(dyn, "sigma_hat")
    sig = V.s_of_t(t)
    at = restart_points(sig.tolist(), entries, dyn.schedule)
    y = V.to_state(x, t[0])
    for j in range(len(t) - 1):
        y = rk_step(V, "heun", sig[j], sig[j + 1], y)                        # EDM Alg. 1, lines 4-8
        for s_max, K, n in at.get(j + 1, ()):
            sub = rho_grid(s_max, sig[j + 1], n)
            for _ in range(K):                                                # Xu et al. 2023, Alg. 1: restart loop
                noise = S_noise * math.sqrt(s_max ** 2 - float(sig[j + 1]) ** 2)
                y = y + noise * rng.randn_like(y)                             # forward noise sigma_min -> sigma_max
                for k in range(n):
                    y = rk_step(V, "heun", sub[k], sub[k + 1], y)             # backward ODE sigma_max -> sigma_min
    _, eps = V.deriv(sig[-1], y)
    return dyn.x0(V.to_x(y, t[-1]), t[-1], eps=eps)
