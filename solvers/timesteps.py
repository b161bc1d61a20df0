"""Time-step schedules: n positive times from T down to t_min; the final step to sigma_hat = 0
is appended by every solver (DESIGN: final step).  Each is built from the noise schedule alone."""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch

from bench.models.errors import ConfigError, unknown_name

log = logging.getLogger("timesteps")

TIMESTEPS: dict[str, Callable] = {}
FIXED_POINTS: dict[str, Callable] = {}   # name -> fn(**knobs): the number of points a user-given list fixes
ENDS: dict[str, Callable] = {}           # name -> fn(schedule, **knobs): (first, last) time, where not (T, t_min)
OWN_ENDS: set = set()                    # names whose formula sets both ends (depending on n): never pinned
RECORDED = ("sigma_hat_range", "model_sigma_hat_range")   # written into the row's timesteps config by grid_record

# EDM's sigma range for VP models (Karras et al. 2022, sec. 5 and table 1, "VP" column: sigma in [0.002, 80]).
# Above sigma_hat = 80, alpha < 1/80: x_t is the prior N(0, sigma^2) to within 1.25 % of the data's scale,
# which is what "saturated" means in the warning of check_grid.
EDM_SIGMA_MIN, EDM_SIGMA_MAX = 0.002, 80.0
SATURATED_SIGMA_HAT = EDM_SIGMA_MAX


def register_timesteps(name, fixed_points: Callable | None = None, ends: Callable | None = None,
                       own_ends: bool = False):
    def deco(fn):
        TIMESTEPS[name] = fn
        if own_ends:
            OWN_ENDS.add(name)
        if fixed_points is not None:
            FIXED_POINTS[name] = fixed_points
        if ends is not None:
            ENDS[name] = ends
        return fn
    return deco


@register_timesteps("uniform_t")
def uniform_t(schedule, n):
    """Uniform in the schedule's native time t (Song et al. 2021)."""
    return torch.linspace(schedule.T, schedule.t_min, n, dtype=torch.float64)


@register_timesteps("shifted")
def shifted_t(schedule, n, shift: float = 3.0):
    """SD3's time shift (Esser et al. 2024, sec. 5.3.2; diffusers' FlowMatchEulerDiscreteScheduler `shift`): a grid
    uniform in u whose noise levels are scaled by `shift`, sigma_hat(t_i) = shift sigma_hat(u_i), with u_i uniform
    from u(T) to u(t_min) so the grid spans [t_min, T].  On the flow schedule (sigma_hat = t/(1 - t)) this is
    t_i = shift u_i / (1 + (shift - 1) u_i), diffusers' shifted sigmas; shift = 1 is uniform_t.  A grid, not a
    schedule knob: the path x_t = (1 - t) x_0 + t eps is the same for every shift, and our Euler steps in sigma = t
    as diffusers does, so their Euler and ours agree step by step on this grid (tests/test_flow.py)."""
    s = _knob_number("shifted", "shift", shift, allow_none=False)
    ends = torch.tensor([schedule.T, schedule.t_min], dtype=torch.float64)
    u_ends = schedule.t_of_sigma_hat(schedule.sigma_hat(ends) / s)
    u = torch.linspace(float(u_ends[0]), float(u_ends[1]), n, dtype=torch.float64)
    return schedule.t_of_sigma_hat(s * schedule.sigma_hat(u))


def _knob_number(name, key, v, allow_none=True):
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"timesteps '{name}': {key} must be a positive number{' or null' if allow_none else ''}, "
                          f"got {v!r}")
    return float(v)


def capped_sigma_range(schedule, sigma_max=EDM_SIGMA_MAX, sigma_min=EDM_SIGMA_MIN, cap_factor: float = 10.0,
                       name: str = "edm", exact: bool = False):
    """(hi, lo): the sigma_hat range of a grid that takes sigma from the model's range [sigma_hat(t_min),
    sigma_hat(T)], bounded as in EDM's VP setting (sigma in [0.002, 80]) where the model's range passes a bound
    by more than cap_factor: hi = sigma_max where sigma_hat(T) > cap_factor sigma_max (VP schedules only: x_T is
    drawn from N(0, sigma(T)^2), within 1/(2 sigma_max^2) of sigma at the capped start), lo = sigma_min where
    sigma_hat(t_min) < sigma_min / cap_factor.  None switches a bound off.  exact: the range must be
    [sigma_min, sigma_max] itself (a paper's preset), else a ConfigError naming both ranges."""
    sigma_max = _knob_number(name, "sigma_max", sigma_max)
    sigma_min = _knob_number(name, "sigma_min", sigma_min)
    if isinstance(cap_factor, bool) or not isinstance(cap_factor, (int, float)) or not cap_factor >= 1:
        raise ConfigError(f"timesteps '{name}': cap_factor must be a number >= 1 (1 = bound wherever the model's range "
                          f"passes sigma_min/sigma_max), got {cap_factor!r}")
    if sigma_min is not None and sigma_max is not None and not sigma_min < sigma_max:
        raise ConfigError(f"timesteps '{name}': need sigma_min < sigma_max, got sigma_min={sigma_min}, "
                          f"sigma_max={sigma_max}")
    s_hi, s_lo = float(schedule.sigma_hat(schedule.T)), float(schedule.sigma_hat(schedule.t_min))
    for where, tv, v in (("T", schedule.T, s_hi), ("t_min", schedule.t_min, s_lo)):
        if not (math.isfinite(v) and v > 0):
            raise ConfigError(f"timesteps '{name}': the model's sigma_hat at {where} = {tv} is {v}, not a finite positive "
                              f"number; the noise schedule '{schedule.name}' is invalid there (a configuration error, "
                              f"not a solver divergence).")
    hi = sigma_max if (sigma_max is not None and schedule.is_vp and s_hi > cap_factor * sigma_max) else s_hi
    lo = sigma_min if (sigma_min is not None and s_lo < sigma_min / cap_factor) else s_lo
    if exact:
        _check_exact(name, schedule, (hi, lo), (sigma_max, sigma_min), (s_hi, s_lo))
    if not lo < hi:
        raise ConfigError(f"timesteps '{name}': the bounded range [{lo:.6g}, {hi:.6g}] is empty for the model's range "
                          f"[{s_lo:.6g}, {s_hi:.6g}] (sigma_min={sigma_min}, sigma_max={sigma_max})")
    return hi, lo


def _check_exact(name, schedule, used, want, model):
    """A paper's range is used as it is or refused: a grid silently narrowed to the model's range would carry the
    preset's name but not its numbers.  Ends within 1e-9 relative count as equal."""
    close = lambda a, b: abs(a - b) <= 1e-9 * abs(b)  # noqa: E731
    if close(used[0], want[0]) and close(used[1], want[1]):
        return
    where = (f"model '{schedule.name}' (T={schedule.T:.6g}, t_min={schedule.t_min:.6g}) has sigma_hat in "
             f"[{model[1]:.6g}, {model[0]:.6g}]")
    fix = []
    if not close(used[1], want[1]):
        t_lo = float(schedule.t_of_sigma_hat(torch.tensor(want[1], dtype=torch.float64)))
        first_step = 1.0 / schedule.N if hasattr(schedule, "N") else 0.0      # vp_discrete: t >= 1/N
        at = f" to <= {t_lo:.4g}" if math.isfinite(t_lo) and t_lo > first_step else \
            (f"; not possible below its first discrete step 1/N = {first_step:.4g}" if first_step else "")
        fix.append(f"sigma_hat(t_min) <= {want[1]:g} (lower model.schedule.t_min{at})")
    if not close(used[0], want[0]):
        fix.append(f"sigma_hat(T) >= {want[0]:g}" if schedule.is_vp else
                   f"sigma_hat(T) = {want[0]:g}: x_T is drawn at sigma(T), and on a non-VP schedule a grid "
                   f"starting below T does not match it (set the schedule's sigma_max / T)")
    raise ConfigError(f"timesteps '{name}' is the paper's sigma_hat range [{want[1]:g}, {want[0]:g}], but the "
                      f"{where}; it would need {' and '.join(fix)}. timesteps=edm bounds its grid to the model's "
                      f"range instead.")


def _bounded_ends(name, schedule, sigma_max, sigma_min, cap_factor, exact=False):
    """(first, last) time of a grid on capped_sigma_range: T and t_min where a bound does not apply."""
    hi, lo = capped_sigma_range(schedule, sigma_max, sigma_min, cap_factor, name, exact)
    s_hi, s_lo = float(schedule.sigma_hat(schedule.T)), float(schedule.sigma_hat(schedule.t_min))
    first = schedule.T if hi == s_hi else float(schedule.t_of_sigma_hat(torch.tensor(hi, dtype=torch.float64)))
    last = schedule.t_min if lo == s_lo else float(schedule.t_of_sigma_hat(torch.tensor(lo, dtype=torch.float64)))
    return first, last


def _edm_ends(schedule, rho: float = 7.0, sigma_max=EDM_SIGMA_MAX, sigma_min=EDM_SIGMA_MIN, cap_factor: float = 10.0):
    return _bounded_ends("edm", schedule, sigma_max, sigma_min, cap_factor)


def _logsnr_ends(schedule, sigma_max=EDM_SIGMA_MAX, cap_factor: float = 10.0):
    return _bounded_ends("logsnr", schedule, sigma_max, None, cap_factor)


@register_timesteps("logsnr", ends=_logsnr_ends)
def uniform_logsnr(schedule, n, sigma_max=EDM_SIGMA_MAX, cap_factor: float = 10.0):
    """Uniform in lambda = log(alpha/sigma) = -log sigma_hat (DPM-Solver's 'logSNR' skip type, Lu et al. 2022,
    sec. 3.3), from lambda(T) to lambda(t_min); the start capped at sigma_hat = sigma_max as the edm preset does
    where the model saturates (capped_sigma_range; conf/timesteps/logsnr.yaml)."""
    hi, lo = capped_sigma_range(schedule, sigma_max, None, cap_factor, "logsnr")
    lam_hi = float(schedule.lambda_(schedule.T)) if hi == float(schedule.sigma_hat(schedule.T)) else -math.log(hi)
    lam = torch.linspace(lam_hi, float(schedule.lambda_(schedule.t_min)), n, dtype=torch.float64)
    return schedule.t_of_lambda(lam)


@register_timesteps("edm", ends=_edm_ends)
def edm_rho(schedule, n, rho: float = 7.0, sigma_max=EDM_SIGMA_MAX, sigma_min=EDM_SIGMA_MIN, cap_factor: float = 10.0):
    """sigma_hat_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho (Karras et al. 2022, eq. 5), on
    the model's range bounded as EDM's VP setting does (capped_sigma_range; conf/timesteps/edm.yaml)."""
    return _rho_grid("edm", schedule, n, rho, sigma_max, sigma_min, cap_factor)


def _rho_grid(name, schedule, n, rho, sigma_max, sigma_min, cap_factor, exact=False):
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or rho <= 0:
        raise ConfigError(f"timesteps '{name}': rho must be positive, got {rho}")
    s_max, s_min = capped_sigma_range(schedule, sigma_max, sigma_min, cap_factor, name, exact)
    r = torch.linspace(0, 1, n, dtype=torch.float64)
    sig = (s_max ** (1 / rho) + r * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return schedule.t_of_sigma_hat(sig)


# Paper presets by name: Karras et al. 2022, eq. 5 with rho = 7 on a fixed sigma range, used as it is whatever the
# model's own range (cap_factor 1) or refused (exact).  edm_vp: table 1's "Ours" column [0.002, 80], which EDM's
# edm_sampler (NVlabs/edm generate.py) keeps on its VP networks (their range [sigma(1e-5), sigma(1)] ~ [0.001, 152]
# contains it); edm_ve: table 1's VE column range [0.02, 100] (VEPrecond's sigma_min/sigma_max) with eq. 5.
# name -> (sigma_min, sigma_max, rho).  No knobs: the name is the guarantee; timesteps=edm takes knobs.
EDM_PRESETS = {"edm_vp": (0.002, 80.0, 7.0), "edm_ve": (0.02, 100.0, 7.0)}


def _register_edm_preset(name, sigma_min, sigma_max, rho):
    def ends(schedule):
        return _bounded_ends(name, schedule, sigma_max, sigma_min, 1.0, exact=True)

    def grid(schedule, n):
        return _rho_grid(name, schedule, n, rho, sigma_max, sigma_min, 1.0, exact=True)
    grid.__doc__ = f"Karras et al. 2022, eq. 5, rho = {rho:g}, on sigma_hat in [{sigma_min:g}, {sigma_max:g}] exactly."
    register_timesteps(name, ends=ends)(grid)


for _name, (_lo, _hi, _rho) in EDM_PRESETS.items():
    _register_edm_preset(_name, _lo, _hi, _rho)


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


def _explicit_file(t, sigma_hat, file):
    """(t, sigma_hat) from timesteps.file, a YAML holding one of the lists (an optimize-steps artifact)."""
    if file is None:
        return t, sigma_hat
    if t is not None or sigma_hat is not None:
        raise ConfigError("timesteps 'explicit': give the grid either as timesteps.file or as t / sigma_hat, not both")
    art = load_grid_file(file)
    return art.get("t"), art.get("sigma_hat")


def load_grid_file(path) -> dict:
    """The mapping of a timesteps.file YAML (yaml.safe_load: no code runs), with exactly one of t or sigma_hat."""
    import yaml
    from pathlib import Path
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise ConfigError(f"timesteps 'explicit': file '{path}' is not a file (an artifact of python -m bench "
                          f"optimize-steps is results_dir/steps/timesteps/NAME.yaml)")
    try:
        art = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"timesteps 'explicit': file '{path}' is not valid YAML: {e}") from None
    if not isinstance(art, dict) or (art.get("t") is None) == (art.get("sigma_hat") is None):
        raise ConfigError(f"timesteps 'explicit': file '{path}' must hold a mapping with exactly one of the lists t "
                          f"or sigma_hat")
    return art


def explicit_points(t=None, sigma_hat=None, file=None) -> int:
    return len(_explicit_list(*_explicit_file(t, sigma_hat, file))[1])


@register_timesteps("explicit", fixed_points=explicit_points)
def explicit(schedule, n, t=None, sigma_hat=None, rtol: float = 1e-6, file=None, source=None):
    """A user-given list of times t or of noise levels sigma_hat: strictly decreasing, the first at T (where x_T is
    drawn), all within [t_min, T] (ends matched up to rtol, then pinned).  The list fixes steps = its length.
    file: a YAML holding the list (bench/optimize_steps.py writes them); source: where the list came from, only
    recorded (a run checks an optimize-steps source in bench.optimize_steps.resolve_grid)."""
    key, vals = _explicit_list(*_explicit_file(t, sigma_hat, file))
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


# ------------------------------------------------------------------------------------------ spacings known by name
# Training-step spacings (diffusers' timestep_spacing; Lin et al. 2024, table 2): n points k_0 > ... > k_{n-1} among
# the N discrete training steps 0 .. N-1, as EulerDiscreteScheduler.set_timesteps places them; step k is the time
# t = (k + 1) T_N / N with T_N = 1 on a vp_discrete schedule (its own nodes t_n) and T_N = T with N = num_train_steps
# on a continuous one (the map of solver=diffusers).  Their ends are the formula's: leading starts below T and
# trailing stops above t_min (the solver's final step to sigma_hat = 0 follows either way).
def _train_steps(name, schedule, num_train_steps):
    """(N, T_N): the training steps a spacing counts and the time of the last one."""
    if num_train_steps is not None and (isinstance(num_train_steps, bool) or not isinstance(num_train_steps, int)
                                        or num_train_steps < 2):
        raise ConfigError(f"timesteps '{name}': num_train_steps must be null (a vp_discrete model's own N) or an "
                          f"integer >= 2, got {num_train_steps!r}")
    if hasattr(schedule, "N") and hasattr(schedule, "log_alpha_n"):      # vp_discrete: its nodes t_n = (n + 1)/N
        if num_train_steps not in (None, schedule.N):
            raise ConfigError(f"timesteps '{name}': num_train_steps={num_train_steps}, but the model's vp_discrete "
                              f"schedule has its own N = {schedule.N} steps; leave num_train_steps null.")
        return schedule.N, 1.0
    if num_train_steps is None:
        raise ConfigError(f"timesteps '{name}' spaces the N discrete training steps of a vp_discrete schedule, and "
                          f"the model's schedule '{schedule.name}' is continuous. Give timesteps.num_train_steps=N "
                          f"(step k is then t = (k + 1) T/N, as solver=diffusers maps them), or use "
                          f"timesteps=uniform_t (uniform in t, what linspace is on continuous time).")
    return num_train_steps, float(schedule.T)


def _step_grid(name, schedule, k, N, t_N):
    """The times (k + 1) t_N / N of the training steps k, checked: distinct steps within 0 .. N-1, times within
    [t_min, T].  With zero terminal SNR, step N-1 (alpha = 0, sigma_hat = inf) is taken at T, the last node with
    alpha > 0 (models/schedules.py, VPDiscrete)."""
    kl = [int(v) if float(v).is_integer() else float(v) for v in k.tolist()]
    if len(kl) > 1 and not bool((k[1:] < k[:-1]).all()):
        raise ConfigError(f"timesteps '{name}': {len(kl)} points repeat a training step among N = {N} (steps "
                          f"{_short(kl)}); it takes at most {N} points, fewer where rounding merges steps.")
    if kl[0] > N - 1 or kl[-1] < 0:
        raise ConfigError(f"timesteps '{name}': the steps {_short(kl)} leave the training steps 0 .. {N - 1} "
                          f"(steps_offset too large for {len(kl)} points?).")
    t = (k.to(torch.float64) + 1) * t_N / N
    for i in (0, -1):                                       # (k + 1) T/N at k = N-1 is T up to rounding
        for end in (schedule.T, schedule.t_min):
            if abs(float(t[i]) - end) <= 1e-12 * max(abs(end), 1.0):
                t[i] = end
    if getattr(schedule, "zero_terminal_snr", False) and kl[0] == N - 1:
        t[0] = schedule.T
    if float(t[0]) > schedule.T:
        raise ConfigError(f"timesteps '{name}': training step {kl[0]} lies at t = {float(t[0]):.6g}, beyond the model's "
                          f"T = {schedule.T:.6g} (moved by lambda_min_clipped, or set below the last step); sampling "
                          f"starts at T. Use a grid that starts at T (uniform_t, edm, logsnr, karras) or T = the last "
                          f"step.")
    if float(t[-1]) < schedule.t_min:
        raise ConfigError(f"timesteps '{name}': training step {kl[-1]} lies at t = {float(t[-1]):.6g}, below the "
                          f"model's t_min = {schedule.t_min:.6g}; set timesteps.steps_offset (leading) or lower "
                          f"model.schedule.t_min to <= {float(t[-1]):.6g}.")
    s0 = float(schedule.sigma_hat(t[0]))
    if float(t[0]) < schedule.T and s0 < SATURATED_SIGMA_HAT and (name, schedule.name, len(kl)) not in _WARNED:
        _WARNED.add((name, schedule.name, len(kl)))
        log.warning("timesteps '%s' starts at training step %s (t = %.4g, sigma_hat = %.4g), below T: x_T is drawn "
                    "at sigma(T) but taken as the state there, as diffusers does (the flaw of 'leading' that Lin et "
                    "al. 2024, sec. 3.3, remove with 'trailing').", name, kl[0], float(t[0]), s0)
    return t


def _spacing_knob_int(name, key, v, lo):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ConfigError(f"timesteps '{name}': {key} must be an integer >= {lo}, got {v!r}")
    return v


@register_timesteps("linspace", own_ends=True)
def linspace_steps(schedule, n, num_train_steps=None, round: bool = False):  # noqa: A002  (diffusers' word)
    """k_i = (N - 1)(n - 1 - i)/(n - 1): n points evenly over the training steps, N-1 first (diffusers'
    timestep_spacing='linspace'; fractional as Euler/Heun, rounded to whole steps as DDIM with round).  On a
    vp_discrete schedule with its default T = 1, t_min = 1/N this is uniform_t."""
    if not isinstance(round, bool):
        raise ConfigError(f"timesteps 'linspace': round must be true (whole training steps, as DDIM) or false "
                          f"(fractional steps, as Euler), got {round!r}")
    N, t_N = _train_steps("linspace", schedule, num_train_steps)
    j = torch.arange(n - 1, -1, -1, dtype=torch.float64)
    k = j * ((N - 1) / (n - 1)) if n > 1 else torch.tensor([N - 1.0], dtype=torch.float64)
    k[0] = N - 1
    return _step_grid("linspace", schedule, torch.round(k) if round else k, N, t_N)


@register_timesteps("leading", own_ends=True)
def leading_steps(schedule, n, num_train_steps=None, steps_offset: int = 0):
    """k_i = (n - 1 - i) floor(N/n) + steps_offset (diffusers' timestep_spacing='leading', DDIM's uniform skip,
    Song et al. 2021a): the first point lies below the last training step N-1 (Lin et al. 2024, table 2)."""
    steps_offset = _spacing_knob_int("leading", "steps_offset", steps_offset, 0)
    N, t_N = _train_steps("leading", schedule, num_train_steps)
    if N // n < 1:
        raise ConfigError(f"timesteps 'leading': n = {n} points need N // n >= 1, and N = {N}; at most {N} points.")
    k = torch.arange(n - 1, -1, -1, dtype=torch.float64) * (N // n) + steps_offset
    return _step_grid("leading", schedule, k, N, t_N)


@register_timesteps("trailing", own_ends=True)
def trailing_steps(schedule, n, num_train_steps=None):
    """k_i = round(N - i N/n) - 1 (diffusers' timestep_spacing='trailing', Lin et al. 2024, sec. 3.3 and table 2):
    the first point is the last training step N-1; the last is round(N/n) - 1, not step 0.  Rounding is numpy's
    (half to even)."""
    N, t_N = _train_steps("trailing", schedule, num_train_steps)
    k = torch.round(N - torch.arange(n, dtype=torch.float64) * (N / n)) - 1
    return _step_grid("trailing", schedule, k, N, t_N)


# Noise-level spacings by the names of k-diffusion and diffusers (use_karras_sigmas, use_exponential_sigmas,
# use_beta_sigmas), on the model's whole sigma_hat range [sigma_hat(t_min), sigma_hat(T)] as diffusers takes it,
# narrowed where sigma_max / sigma_min are given (capped_sigma_range with cap_factor 1; sigma_max on VP only).
def _named_sigma_ends(name):
    def ends(schedule, sigma_max=None, sigma_min=None, **_):
        return _bounded_ends(name, schedule, sigma_max, sigma_min, 1.0)
    return ends


@register_timesteps("karras", ends=_named_sigma_ends("karras"))
def karras(schedule, n, rho: float = 7.0, sigma_max=None, sigma_min=None):
    """Karras et al. 2022, eq. 5 on the model's whole range: timesteps=edm with no caps (its sigma_max/sigma_min
    bound the range only where given), k-diffusion's get_sigmas_karras, diffusers' use_karras_sigmas."""
    return _rho_grid("karras", schedule, n, rho, sigma_max, sigma_min, 1.0)


@register_timesteps("exponential", ends=_named_sigma_ends("exponential"))
def exponential(schedule, n, sigma_max=None, sigma_min=None):
    """Uniform in log sigma_hat = -lambda (k-diffusion's get_sigmas_exponential, diffusers' use_exponential_sigmas):
    timesteps=logsnr on the model's whole range."""
    hi, lo = capped_sigma_range(schedule, sigma_max, sigma_min, 1.0, "exponential")
    lam = torch.linspace(-math.log(hi), -math.log(lo), n, dtype=torch.float64)
    return schedule.t_of_lambda(lam)


@register_timesteps("beta", ends=_named_sigma_ends("beta"))
def beta_sigmas(schedule, n, alpha: float = 0.6, beta: float = 0.6, sigma_max=None, sigma_min=None):
    """sigma_hat_i = s_min + F^-1(1 - i/(n-1)) (s_max - s_min), F the Beta(alpha, beta) CDF: Lee et al. 2024 ("Beta
    sampling is all you need") as diffusers' use_beta_sigmas defines it (alpha = beta = 0.6); alpha, beta < 1 put
    more points near both ends of the sigma_hat range."""
    from scipy.stats import beta as beta_dist

    a = _knob_number("beta", "alpha", alpha, allow_none=False)
    b = _knob_number("beta", "beta", beta, allow_none=False)
    hi, lo = capped_sigma_range(schedule, sigma_max, sigma_min, 1.0, "beta")
    q = torch.as_tensor(beta_dist.ppf(1 - torch.linspace(0, 1, n, dtype=torch.float64).numpy(), a, b),
                        dtype=torch.float64)
    sig = lo + q * (hi - lo)
    if len(sig) > 1 and not bool((sig[1:] < sig[:-1]).all()):
        raise ConfigError(f"timesteps 'beta': alpha={a:g}, beta={b:g} merge noise levels of {n} points in double "
                          f"precision (quantiles {_short(q.tolist())}); use alpha, beta nearer 1 or fewer points.")
    return schedule.t_of_sigma_hat(sig)


def fixed_points(name: str, **knobs) -> int | None:
    """The number of points a schedule's own list fixes (explicit), or None when any n is allowed."""
    return FIXED_POINTS[name](**{k: v for k, v in knobs.items() if k in ("t", "sigma_hat", "file")}) \
        if name in FIXED_POINTS else None


def make_timesteps(name: str, schedule, n: int, **knobs) -> torch.Tensor:
    if name not in TIMESTEPS:
        raise unknown_name("time-step schedule", name, TIMESTEPS)
    if n < 1:
        raise ConfigError(f"a time-step schedule needs at least one point, got {n}")
    knobs = {k: v for k, v in knobs.items() if k not in RECORDED}    # a row's config, fed back, runs as it ran
    try:
        t = TIMESTEPS[name](schedule, n, **knobs)
        first, last = ENDS[name](schedule, **knobs) if name in ENDS else (schedule.T, schedule.t_min)
    except TypeError as e:
        raise ConfigError(f"time-step schedule '{name}' got bad parameters {sorted(knobs)}: {e}") from None
    if name not in FIXED_POINTS and name not in OWN_ENDS:
        t[0], t[-1] = first, last  # pin the ends exactly
        if n == 1:
            t = torch.tensor([first], dtype=torch.float64)
    check_grid(name, schedule, t)
    return t


def check_grid(name: str, schedule, t: torch.Tensor) -> None:
    """A grid the solvers can run on, or a ConfigError naming the value (never a NaN grid that a run would record
    as a solver divergence): finite, strictly decreasing times within [t_min, T], with alpha, sigma and sigma_hat
    finite and positive at every point.  Warns when most points lie where the schedule is saturated."""
    where = f"time-step schedule '{name}' on noise schedule '{schedule.name}' (T={schedule.T}, t_min={schedule.t_min})"
    tl = t.double().tolist()
    for i, v in enumerate(tl):
        if not math.isfinite(v):
            raise ConfigError(f"{where} gives a non-finite time t[{i}] = {v} (grid {_short(tl)}): a configuration "
                              f"error, not a solver divergence; check the schedule's T, t_min and the preset's knobs.")
    for i in range(len(tl) - 1):
        if not tl[i + 1] < tl[i]:
            raise ConfigError(f"{where} gives times that do not decrease: t[{i}] = {tl[i]:.10g}, t[{i + 1}] = "
                              f"{tl[i + 1]:.10g} (grid {_short(tl)}).")
    tol = 1e-9 * max(abs(schedule.T), 1.0)
    if tl[0] > schedule.T + tol or tl[-1] < schedule.t_min - tol:
        bad = (0, tl[0]) if tl[0] > schedule.T + tol else (len(tl) - 1, tl[-1])
        raise ConfigError(f"{where} gives t[{bad[0]}] = {bad[1]:.10g} outside [t_min, T] = [{schedule.t_min}, "
                          f"{schedule.T}].")
    tt = torch.tensor(tl, dtype=torch.float64)
    for what, vals in (("alpha", schedule.alpha(tt)), ("sigma", schedule.sigma(tt)), ("sigma_hat", schedule.sigma_hat(tt))):
        ok = torch.isfinite(vals) & (vals > 0)
        if not bool(ok.all()):
            i = int(torch.nonzero(~ok)[0])
            raise ConfigError(f"{where}: {what}(t[{i}] = {tl[i]:.10g}) = {float(vals[i])} is not a finite positive "
                              f"number; the noise schedule is invalid there.")
    sig = schedule.sigma_hat(tt)
    n_sat = int((sig > SATURATED_SIGMA_HAT).sum())
    if len(tl) > 1 and 2 * n_sat > len(tl):
        key = (name, schedule.name, len(tl), round(float(sig[0]), 6))
        if key not in _WARNED:
            _WARNED.add(key)
            log.warning("%s: %d of its %d points lie at sigma_hat > %g, where the schedule is saturated (x_t is "
                        "pure noise to within 1/%g); the solver spends most of its budget there. sigma_hat(T) = %.4g. "
                        "Bound it as EDM's VP setting does: timesteps=edm timesteps.sigma_max=%g timesteps.cap_factor=1.", where,
                        n_sat, len(tl), SATURATED_SIGMA_HAT, SATURATED_SIGMA_HAT,
                        float(schedule.sigma_hat(schedule.T)), EDM_SIGMA_MAX)


_WARNED: set = set()


def _short(vals, k=6) -> str:
    v = [f"{x:.6g}" for x in vals]
    return "[" + ", ".join(v if len(v) <= k else v[:k // 2] + ["..."] + v[-k // 2:]) + "]"


def grid_record(schedule, t: torch.Tensor) -> dict:
    """What a row records of its grid: the sigma_hat range the grid spans and the model's own range."""
    s = schedule.sigma_hat(torch.tensor([float(t[0]), float(t[-1]), schedule.T, schedule.t_min], dtype=torch.float64))
    r = lambda x: float(f"{float(x):.6g}")  # noqa: E731
    return {"sigma_hat_range": [r(s[0]), r(s[1])], "model_sigma_hat_range": [r(s[2]), r(s[3])]}
