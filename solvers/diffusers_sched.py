"""solver=diffusers: a diffusers scheduler (DDIM, DPM-Solver++, Euler, UniPC, Heun, DDPM, ...) as a solver on our
model and our x_T.

Time: discrete step n = 0..N-1 of the scheduler is continuous time t_n = (n + 1) dt, the mapping DPM-Solver uses for
discrete models (Lu et al. 2022, app. D; models/hf_ddpm.py): dt = 1/N with the model's own N for a vp_discrete
schedule, dt = T/N with N = num_train_timesteps for a continuous VP schedule.  The scheduler gets trained_betas that
reproduce our schedule at the nodes, alphas_cumprod[n] = alpha(t_n)^2, and prediction_type='epsilon'.  It runs on
its own time steps (set_timesteps(steps)); the grid `t` gives only their number.  The network sees t = (tau + 1) dt,
also for a fractional timestep tau (Euler-type spacings): what a diffusers pipeline hands a discrete UNet
(hf_ddpm's eps(x, (tau + 1)/N) is unet(x, tau)).

State: a scheduler integrates either our x (DDIM, DDPM, DPM-Solver, UniPC, DEIS, PNDM: scale_model_input is the
identity) or x_hat = x/alpha (Euler, Heun, LMS, KDPM2: scale_model_input multiplies by alpha = 1/sqrt(sigma^2 + 1)).
x_T is our state at the first time step, so the scheduler starts from x_T / c, c that factor at its first time step.
diffusers' init_noise_sigma (1, sigma_max or sqrt(sigma_max^2 + 1) by family and timestep_spacing) is the std of its
own initial latent and is not used: our x_T already has the model's prior std.  The result is the last prev_sample,
x_0 when the last noise level is 0 (every scheduler's default here): DESIGN's final step, the x0-prediction at the
last time step.

float64: diffusers keeps betas, alphas_cumprod and sigmas in float32.  After set_timesteps the solver replaces
betas, alphas, alphas_cumprod, final_alpha_cumprod and DPM-Solver/UniPC's alpha_t, sigma_t, lambda_t by the same
quantities from our schedule in float64, and each entry of `sigmas` that is one of diffusers' float32 node values
sqrt((1 - a_n)/a_n) by that node's float64 value; interpolated sigmas (fractional or Karras time steps) stay as
diffusers computed them.  Still float32 in a float64 run: those interpolated sigmas, and the state inside the step of
schedulers that cast the sample to float32 there (DPMSolverMultistep, Euler: about 1e-7 relative per step).

Randomness: a stochastic configuration (DDPM, Euler-ancestral, DDIM with step_kwargs eta > 0, DPM-Solver's SDE
variants, Euler with s_churn) is detected by running the scheduler twice on a toy problem with different noise
sources.  Its noise is per sample: variance_noise = rng.randn_like(x) where the step takes it, else
generator = rng.gens (diffusers draws row i from generator i).  The spec says stochastic=False (one spec serves every
scheduler), so a stochastic configuration's trunc_rms is its distance from the ODE solution, not a truncation error.
"""
from __future__ import annotations

import copy
import functools
import inspect
import json
import math

import torch

from bench.models.errors import ConfigError
from bench.solvers.registry import register_solver

NAME = "solver 'diffusers'"
# Config keys the solver sets itself, or that move the scheduler's noise levels away from the model's schedule.
SET_BY_SOLVER = {
    "num_train_timesteps": "set it with solver.num_train_timesteps (a vp_discrete model uses its own N)",
    "trained_betas": "the betas come from the model's noise schedule",
    "beta_start": "the betas come from the model's noise schedule (trained_betas)",
    "beta_end": "the betas come from the model's noise schedule (trained_betas)",
    "beta_schedule": "the betas come from the model's noise schedule (trained_betas)",
}
MOVES_SCHEDULE = ("rescale_betas_zero_snr", "use_flow_sigmas", "use_dynamic_shifting", "snr_shift_scale")
OUR_DEFAULTS = {"clip_sample": False}    # diffusers' DDIM/DDPM default true clips x0 to [-1, 1]: not an ODE solver
NOISE_ARGS = ("generator", "variance_noise")


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise ConfigError(f'{NAME} needs the optional package diffusers: pip install -e ".[hf]"') from None
    return diffusers


@functools.lru_cache(maxsize=None)
def _why_unusable(cls) -> str | None:
    """None if a scheduler class can run here, else the reason."""
    try:
        if not (inspect.isclass(cls) and callable(getattr(cls, "set_timesteps", None))
                and callable(getattr(cls, "step", None))):
            return "it has no set_timesteps/step"
        init = inspect.signature(cls.__init__).parameters
        step = list(inspect.signature(cls.step).parameters.values())
    except Exception as e:                       # a class whose backend (torchsde, ...) is missing
        return f"it cannot be loaded ({type(e).__name__}: {str(e).strip().splitlines()[0][:120]})"
    if "Inverse" in cls.__name__:
        return "it runs the diffusion forwards (inversion)"
    if "trained_betas" not in init or "prediction_type" not in init:
        return "its noise levels are not a beta schedule taking trained_betas and prediction_type='epsilon'"
    names = [p.name for p in step[1:4]]
    if names != ["model_output", "timestep", "sample"] or any(
            p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in step[4:]):
        return "its step needs more than (model_output, timestep, sample)"
    try:
        d = cls()
        acp, betas = d.alphas_cumprod.double(), d.betas.double()
    except Exception as e:
        return f"it has no alphas_cumprod/betas tables ({type(e).__name__})"
    if not torch.allclose(acp, torch.cumprod(1 - betas, 0), rtol=1e-4, atol=1e-7):
        return "it reshapes alphas_cumprod away from its betas (a different noise schedule)"
    return None


@functools.lru_cache(maxsize=1)
def usable_schedulers() -> tuple[str, ...]:
    """diffusers scheduler classes that have set_timesteps and step and can run on our schedule."""
    d = _diffusers()
    out = []
    for n in sorted(x for x in dir(d) if x.endswith("Scheduler")):
        try:
            cls = getattr(d, n)
        except Exception:
            continue
        if _why_unusable(cls) is None:
            out.append(n)
    return tuple(out)


def _scheduler_class(name):
    d = _diffusers()
    if not isinstance(name, str) or not name.endswith("Scheduler"):
        cls = None
    else:
        try:
            cls = getattr(d, name)
        except Exception:
            cls = None
    if cls is None:
        raise ConfigError(f"{NAME}: unknown scheduler {name!r}. Valid schedulers (diffusers classes with set_timesteps "
                          f"and step that take trained_betas) are: {', '.join(usable_schedulers())}.")
    why = _why_unusable(cls)
    if why:
        raise ConfigError(f"{NAME}: scheduler '{name}' cannot run on the model's schedule: {why}. Valid schedulers "
                          f"are: {', '.join(usable_schedulers())}.")
    return cls


def _check_config(cls, config) -> dict:
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise ConfigError(f"{NAME}: config must be a mapping of {cls.__name__} settings, e.g. "
                          f"solver.config={{timestep_spacing:trailing}}, got {config!r}")
    valid = [p.name for p in inspect.signature(cls.__init__).parameters.values()
             if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    for k, v in config.items():
        if k not in valid:
            raise ConfigError(f"{NAME}: {cls.__name__} has no config key {k!r} (diffusers would ignore it). Its keys "
                              f"are: {', '.join(x for x in valid if x not in SET_BY_SOLVER)}.")
        if k in SET_BY_SOLVER:
            raise ConfigError(f"{NAME}: config key {k!r} is set by the solver: {SET_BY_SOLVER[k]}.")
        if k == "prediction_type" and v != "epsilon":
            raise ConfigError(f"{NAME}: prediction_type={v!r}: our dynamics hands the scheduler eps, so "
                              f"prediction_type is 'epsilon'.")
        if k in MOVES_SCHEDULE and v and v != inspect.signature(cls.__init__).parameters[k].default:
            raise ConfigError(f"{NAME}: config {k}={v!r} moves the scheduler's noise levels away from the model's "
                              f"schedule; it is not available here.")
    return {**{k: v for k, v in OUR_DEFAULTS.items() if k in valid}, **config}


def _check_step_kwargs(cls, step_kwargs) -> dict:
    if step_kwargs is None:
        return {}
    if not isinstance(step_kwargs, dict):
        raise ConfigError(f"{NAME}: step_kwargs must be a mapping of extra arguments of {cls.__name__}.step, e.g. "
                          f"solver.step_kwargs={{eta:1.0}}, got {step_kwargs!r}")
    extra = [p for p in list(inspect.signature(cls.step).parameters)[4:] if p not in (*NOISE_ARGS, "return_dict")]
    for k in step_kwargs:
        if k not in extra:
            raise ConfigError(f"{NAME}: {cls.__name__}.step takes no argument {k!r} here. Its extra arguments are: "
                              f"{', '.join(extra) or 'none'} (the noise comes from the per-sample generators).")
    return dict(step_kwargs)


def _time_map(schedule, num_train_timesteps) -> tuple[int, float]:
    """(N, dt): discrete step n is continuous time (n + 1) dt."""
    if not getattr(schedule, "is_vp", False):
        raise ConfigError(f"{NAME} runs only on variance-preserving schedules (diffusers' betas define one); the "
                          f"model's schedule is '{getattr(schedule, 'name', type(schedule).__name__)}'.")
    if getattr(schedule, "zero_terminal_snr", False):
        raise ConfigError(f"{NAME}: the model's schedule has zero terminal SNR (alpha = 0 at its last discrete step, "
                          f"Lin et al. 2024), which our interpolated schedule leaves out (sampling starts one step "
                          f"earlier); a diffusers scheduler is handed alphas_cumprod at every step and would get a "
                          f"wrong last value. Use our solvers (e.g. solver=euler, dpm_solver_pp or unipc) with "
                          f"timesteps=trailing instead.")
    if hasattr(schedule, "N") and hasattr(schedule, "log_alpha_n"):      # vp_discrete: its own nodes t_n = (n+1)/N
        return int(schedule.N), 1.0 / schedule.N
    return num_train_timesteps, float(schedule.T) / num_train_timesteps


def _alphas_cumprod(schedule, N, dt) -> torch.Tensor:
    """alpha(t_n)^2 at the nodes, float64."""
    t_n = torch.arange(1, N + 1, dtype=torch.float64) * dt
    return torch.exp(2 * schedule.log_alpha(t_n)).to(torch.float64)


def _betas(acp: torch.Tensor) -> torch.Tensor:
    """betas[n] = 1 - a_n / a_{n-1}, betas[0] = 1 - a_0: their cumulative product of (1 - beta) is a_n."""
    return 1 - acp / torch.cat([acp.new_ones(1), acp[:-1]])


def _build(cls, config: dict, N: int, acp=None):
    """The scheduler on N discrete steps; betas from acp (float64 alphas_cumprod), or diffusers' defaults if None."""
    cfg = {**config, "num_train_timesteps": N, "prediction_type": "epsilon"}
    if acp is not None:
        cfg["trained_betas"] = _betas(acp).tolist()
    try:
        return cls.from_config(cfg)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{NAME}: {cls.__name__} rejected config {config}: {type(e).__name__}: {e}") from None


def _set_timesteps(sched, steps: int, N: int):
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"{NAME}: steps must be a positive integer, got {steps!r}")
    if steps > N:
        raise ConfigError(f"{NAME}: {steps} steps is more than the {N} discrete time steps of the schedule "
                          f"(num_train_timesteps); lower nfe.")
    try:
        sched.set_timesteps(steps)
    except Exception as e:
        raise ConfigError(f"{NAME}: {type(sched).__name__}.set_timesteps({steps}) failed with this config: "
                          f"{type(e).__name__}: {e}") from None


def _freeze(d) -> str:
    return json.dumps(d or {}, sort_keys=True, default=str)


@functools.lru_cache(maxsize=1024)
def _count(scheduler: str, config_json: str, N: int, steps: int) -> int:
    cls = _scheduler_class(scheduler)
    sched = _build(cls, _check_config(cls, json.loads(config_json)), N)
    _set_timesteps(sched, steps, N)
    return len(sched.timesteps)


LOOK_UP = 16          # a step count too small for the scheduler costs what the fewest steps above it cost
TOO_MANY = 10 ** 12   # the count of a step count too large for it: more than any budget


@functools.lru_cache(maxsize=4096)
def _nfe(scheduler: str, config_json: str, N: int, steps: int) -> int:
    try:
        return _count(scheduler, config_json, N, steps)
    except ConfigError as first:
        err = first
    for more in range(steps + 1, min(steps + LOOK_UP, N) + 1):
        try:
            return _count(scheduler, config_json, N, more)
        except ConfigError:
            continue
    fewer = steps - 1
    while fewer >= 1:
        try:
            _count(scheduler, config_json, N, fewer)
            return TOO_MANY
        except ConfigError:
            fewer = fewer - 1 if fewer == steps - 1 else fewer // 2
    raise err


def nfe_of_steps(steps, scheduler: str = "DDIMScheduler", config=None, num_train_timesteps: int = 1000,
                 step_kwargs=None, **_):
    """Network calls of the loop: one per entry of the scheduler's timesteps after set_timesteps(steps) (steps for
    most schedulers, 2*steps - 1 for Heun and KDPM2, steps + 9 for PNDM's Runge-Kutta warm-up).  The count does not
    depend on the betas, so it is taken on a scheduler with diffusers' default betas and N = num_train_timesteps.
    It stays monotone where set_timesteps refuses a step count, so the registry's budget -> steps search works:
    too few steps (PNDM needs 4) cost what the fewest steps it takes cost, too many (more than N, or than LCM's
    original_inference_steps) cost TOO_MANY, so a larger budget runs the most steps the scheduler takes (the row
    records the counted NFE).  A config that fails for every step count is a ConfigError."""
    cls = _scheduler_class(scheduler)
    _check_config(cls, config)
    _check_step_kwargs(cls, step_kwargs)
    if not isinstance(num_train_timesteps, int) or isinstance(num_train_timesteps, bool) or num_train_timesteps < 1:
        raise ConfigError(f"{NAME}: num_train_timesteps must be a positive integer, got {num_train_timesteps!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"{NAME}: steps must be a positive integer, got {steps!r}")
    return _nfe(scheduler, _freeze(config), num_train_timesteps, steps)


# ---------------------------------------------------------------------------------------------------------
def _float64_tables(sched, acp: torch.Tensor) -> None:
    """Replace diffusers' float32 tables by the same quantities from our schedule in float64 (module docstring)."""
    old32 = sched.alphas_cumprod
    old = old32.double()
    if old.shape != acp.shape or not torch.allclose(old, acp, rtol=1e-4, atol=1e-7):
        err = float((old - acp).abs().max()) if old.shape == acp.shape else float("nan")
        raise ConfigError(f"{NAME}: {type(sched).__name__} with this config does not reproduce the model's noise "
                          f"schedule (alphas_cumprod differs by up to {err:.3g}).")
    betas = _betas(acp)
    sched.betas, sched.alphas, sched.alphas_cumprod = betas, 1 - betas, acp.clone()
    if torch.is_tensor(getattr(sched, "final_alpha_cumprod", None)):
        f = float(sched.final_alpha_cumprod)
        sched.final_alpha_cumprod = torch.tensor(1.0 if f == 1.0 else float(acp[0]), dtype=torch.float64)
    if torch.is_tensor(getattr(sched, "lambda_t", None)) and sched.lambda_t.shape == acp.shape:
        sched.alpha_t, sched.sigma_t = acp.sqrt(), (1 - acp).sqrt()
        sched.lambda_t = torch.log(sched.alpha_t) - torch.log(sched.sigma_t)
    sig = getattr(sched, "sigmas", None)
    if torch.is_tensor(sig) and sig.dim() == 1:
        # a sigma is node n if it is, to float32 precision, diffusers' own float32 node value (computed as there)
        nodes32 = (((1 - old32) / old32) ** 0.5).double()
        s = sig.double()
        idx = torch.searchsorted(nodes32, s.contiguous()).clamp(1, len(acp) - 1)
        near = torch.where((s - nodes32[idx - 1]).abs() <= (s - nodes32[idx]).abs(), idx - 1, idx)
        hit = (s - nodes32[near]).abs() <= 1e-6 * nodes32[near]
        sched.sigmas = torch.where(hit, ((1 - acp) / acp).sqrt()[near], s).to(sig.device)


def _step_params(sched) -> set:
    return set(inspect.signature(sched.step).parameters)


def _noise_kwargs(params: set, rng, x) -> dict:
    """Per-sample noise for one step: sample i's noise comes from its own generator only."""
    if "variance_noise" in params:
        return {"variance_noise": rng.randn_like(x)}
    if "generator" in params:
        return {"generator": list(rng.gens)}
    return {}


def _loop(sched, x, eps_fn, step_kwargs, rng=None):
    params = _step_params(sched)
    for tau in sched.timesteps:
        x_in = sched.scale_model_input(x, tau)
        eps = eps_fn(x_in, float(tau))
        extra = _noise_kwargs(params, rng, x) if rng is not None else {}
        x = sched.step(eps, tau, x, **step_kwargs, **extra).prev_sample
    return x


_STOCHASTIC: dict = {}


def is_stochastic(sched, step_kwargs) -> bool:
    """Does the scheduler (after set_timesteps) inject noise with these step arguments?  Run it twice on a toy
    linear problem with different per-sample generators and different global seeds (the global state restored)."""
    from bench.solvers.rng import PerSampleRNG

    key = (type(sched).__name__, _freeze(dict(sched.config)), _freeze(step_kwargs), len(sched.timesteps))
    if key not in _STOCHASTIC:
        outs = []
        for seed in (1, 2):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                x = torch.full((2, 3), 0.5, dtype=torch.float64)
                rng = PerSampleRNG(seed, range(2), dtype=torch.float64)
                outs.append(_loop(copy.deepcopy(sched), x, lambda x_in, t: 0.3 * x_in, step_kwargs, rng))
        _STOCHASTIC[key] = not torch.allclose(outs[0], outs[1], rtol=0.0, atol=0.0, equal_nan=True)
    return _STOCHASTIC[key]


@register_solver("diffusers", nfe_of_steps=nfe_of_steps,
                 nfe_formula="len(scheduler.timesteps) after set_timesteps(steps): steps; Heun, KDPM2: 2*steps - 1; "
                             "PNDM: steps + 9",
                 # min_steps 3: the trunc metric's one-step profile calls a solver on two-point sub-grids, which a
                 # scheduler on its own time steps cannot follow; min_steps > 2 makes the profile report n/a.
                 min_steps=3, order=None, stochastic=False, default_timesteps="uniform_t")
def diffusers_sample(dyn, x_T, t, rng, scheduler: str = "DDIMScheduler", config: dict | None = None,
                     num_train_timesteps: int = 1000, step_kwargs: dict | None = None):
    """Sample with a diffusers scheduler on its own time steps (num_inference_steps = len(t)); see the module doc."""
    cls = _scheduler_class(scheduler)
    cfg = _check_config(cls, config)
    kw = _check_step_kwargs(cls, step_kwargs)
    steps = len(t)
    declared = nfe_of_steps(steps, scheduler, config, num_train_timesteps, step_kwargs)
    N, dt = _time_map(dyn.schedule, num_train_timesteps)
    acp = _alphas_cumprod(dyn.schedule, N, dt)
    if not bool(torch.isfinite(acp).all()) or not bool(((acp > 0) & (acp < 1)).all()):
        raise ConfigError(f"{NAME}: the model's alpha(t)^2 at t_n = (n+1)*{dt:.4g} is not in (0, 1) for every node.")
    sched = _build(cls, cfg, N, acp)
    _set_timesteps(sched, steps, N)
    if len(sched.timesteps) != declared:
        raise ConfigError(f"{NAME}: the model's schedule has N={N} discrete steps, which gives {len(sched.timesteps)} "
                          f"network calls for {steps} steps, not the {declared} declared with num_train_timesteps="
                          f"{num_train_timesteps}; set solver.num_train_timesteps={N}.")
    _float64_tables(sched, acp)
    stochastic = is_stochastic(sched, kw)
    if stochastic:
        if rng is None:
            raise ConfigError(f"{NAME}: {scheduler} with step_kwargs={kw} draws noise and needs a per-sample rng.")
        if not _step_params(sched) & set(NOISE_ARGS):
            raise ConfigError(f"{NAME}: {scheduler} draws noise that no per-sample generator can supply (its step "
                              f"takes neither generator nor variance_noise); it is not available here.")
    c0 = float(copy.deepcopy(sched).scale_model_input(torch.ones(1, dtype=torch.float64), sched.timesteps[0])[0])
    if not (math.isfinite(c0) and c0 > 0):
        raise ConfigError(f"{NAME}: {scheduler}.scale_model_input at the first time step scales by {c0}.")
    x = _loop(sched, x_T / c0, lambda x_in, tau: dyn.eps(x_in, (tau + 1) * dt), kw, rng if stochastic else None)
    return x
