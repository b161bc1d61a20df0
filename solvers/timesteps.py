"""Time-step schedules: n positive times from T down to t_min; the final step to sigma_hat = 0
is appended by every solver (DESIGN: final step).  Each is built from the noise schedule alone."""
from __future__ import annotations

from typing import Callable

import torch

from models.errors import ConfigError, unknown_name

TIMESTEPS: dict[str, Callable] = {}


def register_timesteps(name):
    def deco(fn):
        TIMESTEPS[name] = fn
        return fn
    return deco


@register_timesteps("uniform_t")
def uniform_t(schedule, n):
    """Uniform in the schedule's native time t (Song et al. 2021)."""
    return torch.linspace(schedule.T, schedule.t_min, n, dtype=torch.float64)


@register_timesteps("logsnr")
def uniform_logsnr(schedule, n):
    """Uniform in lambda = log(alpha/sigma) (DPM-Solver's 'logSNR' skip type, Lu et al. 2022, sec. 3.3)."""
    lam = torch.linspace(float(schedule.lambda_(schedule.T)), float(schedule.lambda_(schedule.t_min)), n,
                         dtype=torch.float64)
    return schedule.t_of_lambda(lam)


@register_timesteps("edm")
def edm_rho(schedule, n, rho: float = 7.0):
    """sigma_hat_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho (Karras et al. 2022, eq. 5)."""
    if rho <= 0:
        raise ConfigError(f"timesteps 'edm': rho must be positive, got {rho}")
    s_max, s_min = float(schedule.sigma_hat(schedule.T)), float(schedule.sigma_hat(schedule.t_min))
    r = torch.linspace(0, 1, n, dtype=torch.float64)
    sig = (s_max ** (1 / rho) + r * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return schedule.t_of_sigma_hat(sig)


def make_timesteps(name: str, schedule, n: int, **knobs) -> torch.Tensor:
    if name not in TIMESTEPS:
        raise unknown_name("time-step schedule", name, TIMESTEPS)
    if n < 1:
        raise ConfigError(f"a time-step schedule needs at least one point, got {n}")
    try:
        t = TIMESTEPS[name](schedule, n, **knobs)
    except TypeError as e:
        raise ConfigError(f"time-step schedule '{name}' got bad parameters {sorted(knobs)}: {e}") from None
    t[0], t[-1] = schedule.T, schedule.t_min  # pin the ends exactly
    if n == 1:
        t = torch.tensor([schedule.T], dtype=torch.float64)
    return t
