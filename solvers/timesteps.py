"""Time-step schedules: n positive times from T down to t_min; the final step to sigma_hat = 0
is appended by every solver (DESIGN: final step).  Each is built from the noise schedule alone."""
from __future__ import annotations

from typing import Callable

import torch

from bench.models.errors import ConfigError, unknown_name

TIMESTEPS: dict[str, Callable] = {}
FIXED_POINTS: dict[str, Callable] = {}   # name -> fn(**knobs): the number of points a user-given list fixes


def register_timesteps(name, fixed_points: Callable | None = None):
    def deco(fn):
        TIMESTEPS[name] = fn
        if fixed_points is not None:
            FIXED_POINTS[name] = fixed_points
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


@register_timesteps("quadratic")
def quadratic_t(schedule, n):
    """Quadratic in t: t_i = (sqrt(T) + i/(n-1) (sqrt(t_min) - sqrt(T)))^2, DDIM's quadratic sub-sequence
    tau_i = c i^2 (Song et al. 2021a, app. D) and DPM-Solver's 'time_quadratic'; denser near the data."""
    r = torch.linspace(0, 1, n, dtype=torch.float64)
    return (schedule.T ** 0.5 + r * (schedule.t_min ** 0.5 - schedule.T ** 0.5)) ** 2


def _explicit_list(t=None, sigma_hat=None):
    if (t is None) == (sigma_hat is None):
        raise ConfigError("timesteps 'explicit': give exactly one of t (times) or sigma_hat (noise levels) as a list, "
                          f"got t={t!r}, sigma_hat={sigma_hat!r}")
    key, vals = ("t", t) if t is not None else ("sigma_hat", sigma_hat)
    if isinstance(vals, (str, bytes)) or not hasattr(vals, "__len__") or len(vals) < 1:
        raise ConfigError(f"timesteps 'explicit': {key} must be a non-empty list of numbers, got {vals!r}")
    try:
        out = [float(v) for v in vals]
    except (TypeError, ValueError):
        raise ConfigError(f"timesteps 'explicit': {key} must be a list of numbers, got {vals!r}") from None
    return key, out


def explicit_points(t=None, sigma_hat=None) -> int:
    return len(_explicit_list(t, sigma_hat)[1])


@register_timesteps("explicit", fixed_points=explicit_points)
def explicit(schedule, n, t=None, sigma_hat=None, rtol: float = 1e-6):
    """A user-given list of times t or of noise levels sigma_hat: strictly decreasing, the first at T (where x_T is
    drawn), all within [t_min, T] (ends matched up to rtol, then pinned).  The list fixes steps = its length."""
    key, vals = _explicit_list(t, sigma_hat)
    if len(vals) != n:
        raise ConfigError(f"timesteps 'explicit': the {key} list has {len(vals)} points but {n} were asked for")
    v = torch.tensor(vals, dtype=torch.float64)
    if len(v) > 1 and not bool((v[1:] < v[:-1]).all()):
        raise ConfigError(f"timesteps 'explicit': {key} must be strictly decreasing, got {vals}")
    hi, lo = (schedule.T, schedule.t_min) if key == "t" else (float(schedule.sigma_hat(schedule.T)),
                                                             float(schedule.sigma_hat(schedule.t_min)))
    if abs(vals[0] - hi) > rtol * abs(hi):
        raise ConfigError(f"timesteps 'explicit': the first {key} must be the start of sampling, {key}(T) = {hi:.10g}, "
                          f"got {vals[0]:.10g}")
    if vals[-1] < lo * (1 - rtol):
        raise ConfigError(f"timesteps 'explicit': every {key} must lie in [{lo:.10g}, {hi:.10g}] "
                          f"(t_min to T), got {vals[-1]:.10g}")
    out = v if key == "t" else schedule.t_of_sigma_hat(v)
    out[0] = schedule.T
    if vals[-1] <= lo:
        out[-1] = schedule.t_min
    return out


def fixed_points(name: str, **knobs) -> int | None:
    """The number of points a schedule's own list fixes (explicit), or None when any n is allowed."""
    return FIXED_POINTS[name](**{k: v for k, v in knobs.items() if k in ("t", "sigma_hat")}) \
        if name in FIXED_POINTS else None


def make_timesteps(name: str, schedule, n: int, **knobs) -> torch.Tensor:
    if name not in TIMESTEPS:
        raise unknown_name("time-step schedule", name, TIMESTEPS)
    if n < 1:
        raise ConfigError(f"a time-step schedule needs at least one point, got {n}")
    try:
        t = TIMESTEPS[name](schedule, n, **knobs)
    except TypeError as e:
        raise ConfigError(f"time-step schedule '{name}' got bad parameters {sorted(knobs)}: {e}") from None
    if name in FIXED_POINTS:
        return t
    t[0], t[-1] = schedule.T, schedule.t_min  # pin the ends exactly
    if n == 1:
        t = torch.tensor([schedule.T], dtype=torch.float64)
    return t
