"""Noise schedules: the single source of truth for alpha(t), sigma(t) and everything derived.

x_t = alpha(t) x_0 + sigma(t) eps.  Every schedule defines log alpha, log sigma and their
t-derivatives; lambda(t) = log(alpha/sigma) (the half log-SNR), the SDE coefficients
f(t) = d log alpha / dt and g^2(t) = d sigma^2/dt - 2 f sigma^2 = -2 sigma^2 d lambda/dt
(Kingma et al. 2021, eq. 33; Lu et al. 2022, DPM-Solver eq. 2.2), and the EDM parametrisation
sigma_hat = sigma/alpha with x_hat = x/alpha (Karras et al. 2022, eq. 12) all follow here.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from bench.models.errors import ConfigError, unknown_name

Tensorish = torch.Tensor | float


def _t(x: Tensorish) -> torch.Tensor:
    return x if torch.is_tensor(x) else torch.tensor(x, dtype=torch.float64)


class NoiseSchedule:
    """Base class. Subclasses implement log_alpha, log_sigma, their derivatives and t_of_lambda."""

    name = "base"
    T: float = 1.0          # start of sampling (the prior's time)
    t_min: float = 1e-3     # last positive time a sampler evaluates the network at
    is_vp = False

    # --- primitives -------------------------------------------------------------------------
    def log_alpha(self, t):
        raise NotImplementedError

    def d_log_alpha(self, t):
        raise NotImplementedError

    def log_sigma(self, t):
        raise NotImplementedError

    def d_log_sigma(self, t):
        raise NotImplementedError

    def t_of_lambda(self, lam):
        raise NotImplementedError

    # --- derived quantities -----------------------------------------------------------------
    def alpha(self, t):
        return torch.exp(self.log_alpha(_t(t)))

    def sigma(self, t):
        return torch.exp(self.log_sigma(_t(t)))

    def lambda_(self, t):
        t = _t(t)
        return self.log_alpha(t) - self.log_sigma(t)

    def d_lambda(self, t):
        t = _t(t)
        return self.d_log_alpha(t) - self.d_log_sigma(t)

    def sigma_hat(self, t):
        """EDM noise level sigma/alpha = exp(-lambda)."""
        return torch.exp(-self.lambda_(t))

    def t_of_sigma_hat(self, sigma_hat):
        return self.t_of_lambda(-torch.log(_t(sigma_hat)))

    def d_alpha(self, t):
        """d alpha/dt (the velocity parametrization; a schedule where alpha reaches 0 overrides it in closed form)."""
        t = _t(t)
        return self.alpha(t) * self.d_log_alpha(t)

    def d_sigma(self, t):
        """d sigma/dt."""
        t = _t(t)
        return self.sigma(t) * self.d_log_sigma(t)

    def f(self, t):
        """Drift coefficient of the forward SDE dx = f x dt + g dW."""
        return self.d_log_alpha(_t(t))

    def g2(self, t):
        """Squared diffusion coefficient g(t)^2 = -2 sigma^2 d lambda/dt."""
        t = _t(t)
        return -2.0 * torch.exp(2 * self.log_sigma(t)) * self.d_lambda(t)

    # --- prior at T -------------------------------------------------------------------------
    def prior_std(self) -> float:
        """q_T is approximated by N(0, sigma(T)^2 I) (alpha(T) x_0 is neglected)."""
        return float(self.sigma(self.T))

    def prior_logp(self, x: torch.Tensor) -> torch.Tensor:
        """Log-density of the prior N(0, sigma(T)^2 I), summed over all but the batch dim."""
        s = self.prior_std()
        d = x[0].numel()
        return -0.5 * (x.flatten(1) ** 2).sum(1) / s**2 - d * (math.log(s) + 0.5 * math.log(2 * math.pi))

    def describe(self) -> dict:
        return {"name": self.name, "T": self.T, "t_min": self.t_min}


class _VP(NoiseSchedule):
    """Variance preserving: sigma^2 = 1 - alpha^2, so everything follows from log alpha."""

    is_vp = True

    def log_sigma(self, t):
        t = _t(t)
        return 0.5 * torch.log(-torch.expm1(2.0 * self.log_alpha(t)))

    def d_log_sigma(self, t):
        t = _t(t)
        a2 = torch.exp(2.0 * self.log_alpha(t))
        return -a2 / (1.0 - a2) * self.d_log_alpha(t)

    @staticmethod
    def _log_alpha_of_lambda(lam):
        # alpha^2 = sigmoid(2 lambda)  =>  log alpha = -0.5 softplus(-2 lambda)
        return -0.5 * torch.nn.functional.softplus(-2.0 * lam)


class VPLinear(_VP):
    """VP SDE with beta(t) = beta_min + t (beta_max - beta_min) (Song et al. 2021, eq. 11)."""

    name = "vp_linear"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, T: float = 1.0, t_min: float = 1e-3):
        self.beta_min, self.beta_max, self.T, self.t_min = beta_min, beta_max, T, t_min

    def log_alpha(self, t):
        t = _t(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def d_log_alpha(self, t):
        t = _t(t)
        return -0.5 * (self.beta_min + t * (self.beta_max - self.beta_min))

    def t_of_lambda(self, lam):
        # DPM-Solver, appendix: solve the quadratic log alpha(t) = -0.5 log(1 + e^{-2 lambda}).
        lam = _t(lam)
        tmp = 2.0 * (self.beta_max - self.beta_min) * torch.logaddexp(-2.0 * lam, torch.zeros_like(lam))
        delta = self.beta_min**2 + tmp
        return tmp / (torch.sqrt(delta) + self.beta_min) / (self.beta_max - self.beta_min)

    def describe(self):
        return {**super().describe(), "beta_min": self.beta_min, "beta_max": self.beta_max}


class VPCosine(_VP):
    """iDDPM cosine schedule: alpha(t) = cos((t+s)/(1+s) pi/2) / cos(s/(1+s) pi/2) (Nichol & Dhariwal 2021, eq. 17)."""

    name = "vp_cosine"

    def __init__(self, s: float = 0.008, T: float = 0.9946, t_min: float = 1e-3):
        # T < 1 keeps log alpha finite; 0.9946 is DPM-Solver's choice for this schedule.
        self.s, self.T, self.t_min = s, T, t_min
        self._log_alpha0 = math.log(math.cos(s / (1 + s) * math.pi / 2))

    def _angle(self, t):
        return (t + self.s) / (1 + self.s) * math.pi / 2

    def log_alpha(self, t):
        t = _t(t)
        return torch.log(torch.cos(self._angle(t))) - self._log_alpha0

    def d_log_alpha(self, t):
        t = _t(t)
        return -torch.tan(self._angle(t)) * math.pi / (2 * (1 + self.s))

    def t_of_lambda(self, lam):
        lam = _t(lam)
        log_alpha = self._log_alpha_of_lambda(lam)
        return 2 * (1 + self.s) / math.pi * torch.arccos(torch.exp(log_alpha + self._log_alpha0)) - self.s

    def describe(self):
        return {**super().describe(), "s": self.s}


BETA_SCHEDULES = ("linear", "cosine", "scaled_linear")
BETA_FILES = (".npy", ".pt", ".txt")


def named_betas(name: str, num_steps: int, beta_start: float | None = None, beta_end: float | None = None,
                s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """The N betas of a published discrete schedule, float64:
      linear         linspace(beta_start, beta_end, N), DDPM's 1e-4 .. 0.02 (Ho et al. 2020, sec. 4)
      cosine         beta_n = min(1 - abar(n+1)/abar(n), max_beta), abar(n) = f(n/N)/f(0),
                     f(u) = cos^2((u + s)/(1 + s) pi/2), s = 0.008, max_beta = 0.999 (Nichol & Dhariwal 2021, eq. 17)
      scaled_linear  linspace(sqrt(beta_start), sqrt(beta_end), N)^2, Stable Diffusion's 0.00085 .. 0.012
    beta_start/beta_end None = the published constants of `name`."""
    if name not in BETA_SCHEDULES:
        raise ConfigError(f"noise schedule 'vp_discrete': unknown betas '{name}'. Valid names are: "
                          f"{', '.join(BETA_SCHEDULES)}; or give a list of betas or a file ({', '.join(BETA_FILES)}).")
    n = int(num_steps)
    if name == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ConfigError("noise schedule 'vp_discrete': betas 'cosine' takes s and max_beta, not "
                              f"beta_start/beta_end (got beta_start={beta_start}, beta_end={beta_end}).")
        u = torch.arange(n + 1, dtype=torch.float64) / n
        f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
        return torch.clamp(1 - f[1:] / f[:-1], max=max_beta)
    lo, hi = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}[name]
    lo = lo if beta_start is None else float(beta_start)
    hi = hi if beta_end is None else float(beta_end)
    if name == "linear":
        return torch.linspace(lo, hi, n, dtype=torch.float64)
    if lo < 0 or hi < 0:
        raise ConfigError(f"noise schedule 'vp_discrete': scaled_linear needs beta_start, beta_end >= 0, got {lo}, {hi}.")
    return torch.linspace(lo ** 0.5, hi ** 0.5, n, dtype=torch.float64) ** 2


def betas_from_file(path) -> torch.Tensor:
    """Betas stored in a file: .npy (numpy.save, no pickles), .pt (a tensor or list, loaded with weights_only),
    or .txt (numbers separated by white space, commas or new lines)."""
    from pathlib import Path

    p = Path(str(path)).expanduser()
    if p.suffix not in BETA_FILES:
        raise ConfigError(f"noise schedule 'vp_discrete': betas '{path}' is neither a schedule name "
                          f"({', '.join(BETA_SCHEDULES)}) nor a file ending in {', '.join(BETA_FILES)}.")
    if not p.is_file():
        raise ConfigError(f"noise schedule 'vp_discrete': betas file '{p.resolve()}' does not exist.")
    try:
        if p.suffix == ".npy":
            import numpy as np
            vals = torch.as_tensor(np.load(p, allow_pickle=False), dtype=torch.float64)
        elif p.suffix == ".pt":
            vals = torch.as_tensor(torch.load(p, map_location="cpu", weights_only=True), dtype=torch.float64)
        else:
            vals = torch.tensor([float(v) for v in p.read_text().replace(",", " ").split()], dtype=torch.float64)
    except Exception as e:  # noqa: BLE001  (numpy, torch and float() raise many types for foreign files)
        raise ConfigError(f"noise schedule 'vp_discrete': betas file '{p}' could not be read as a list of numbers "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}).") from None
    return vals


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Zero terminal SNR (Lin et al. 2024, alg. 1): sqrt(alphabar_n) mapped linearly, s -> (s - s_N) s_1/(s_1 - s_N),
    so the first is unchanged and the last is 0; the betas of the rescaled alphabar (beta_N = 1).  Idempotent."""
    s = torch.exp(0.5 * torch.cumsum(torch.log1p(-betas), 0))
    s = (s - s[-1]) * (s[0] / (s[0] - s[-1]))
    abar = s ** 2
    return 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])


class VPDiscrete(_VP):
    """Discrete DDPM betas made continuous: log alpha interpolated piecewise-linearly over
    t_n = (n+1)/N, n = 0..N-1 (DPM-Solver's NoiseScheduleVP('discrete'), Lu et al. 2022, app. D).

    betas: a published schedule by name (linear | cosine | scaled_linear, with num_steps), an explicit list,
    or a file (.npy / .pt / .txt).  Sampling runs on [t_min, T] within [t_1, t_N] = [1/N, 1]: t_min defaults
    to the first step 1/N; the schedule is never extrapolated beyond its steps.

    lambda_min_clipped (None = off): where lambda(T) lies below it, T moves to t(lambda_min_clipped), so sampling
    starts there: DPM-Solver's log-SNR clip (the reference code's numerical_clip_alpha, clipped_lambda = -5.1, for
    cosine betas; diffusers' lambda_min_clipped, default -inf).  It moves the schedule's T, which every consumer
    reads (x_T drawn from N(0, sigma(T)^2), every grid's first point, NLL's prior), not a solver's grid alone.  The
    references drop the discrete steps below the clip and start at the last kept step; here T is where lambda
    equals the clip, between two steps.

    zero_terminal_snr (default false): rescale the betas by Lin et al. 2024, alg. 1 (rescale_zero_terminal_snr), so
    alpha(t_N = 1) = 0; a list or file whose last beta is 1 (diffusers' rescale_betas_zero_snr) is taken the same way.
    At t_N lambda = -inf and sigma_hat = inf, where no solver can step: that node is left out of the interpolation
    and T moves to the last node with alpha > 0, t_{N-1} = (N-1)/N (alpha there ~ 6e-5 for linear betas, N = 1000).
    An eps-network is ill-conditioned there (x0 = (x - sigma eps)/alpha); Lin et al. pair the rescaling with
    v-prediction and trailing time steps."""

    name = "vp_discrete"

    def __init__(self, betas="linear", num_steps: int | None = None, beta_start: float | None = None,
                 beta_end: float | None = None, s: float = 0.008, max_beta: float = 0.999, T: float = 1.0,
                 t_min: float | None = None, lambda_min_clipped: float | None = None, zero_terminal_snr: bool = False):
        if not isinstance(zero_terminal_snr, bool):
            raise ConfigError(f"noise schedule 'vp_discrete': zero_terminal_snr must be true (rescale the betas to "
                              f"alpha(t_N) = 0, Lin et al. 2024) or false, got {zero_terminal_snr!r}.")
        if isinstance(betas, str) and betas in BETA_SCHEDULES:
            if num_steps is None:
                num_steps = 1000
            if isinstance(num_steps, bool) or not float(num_steps).is_integer() or num_steps < 2:
                raise ConfigError(f"noise schedule 'vp_discrete': num_steps must be an integer >= 2, got {num_steps!r}.")
            if not 0 < max_beta <= 1 or not s > 0:
                raise ConfigError(f"noise schedule 'vp_discrete': need s > 0 and 0 < max_beta <= 1, got s={s}, "
                                  f"max_beta={max_beta}.")
            self.source = betas
            betas = named_betas(betas, int(num_steps), beta_start, beta_end, s, max_beta)
        else:
            if beta_start is not None or beta_end is not None:
                raise ConfigError("noise schedule 'vp_discrete': beta_start/beta_end apply to the named schedules "
                                  f"linear and scaled_linear, not to betas given as a list or file.")
            self.source = str(betas) if isinstance(betas, str) else "list"
            if isinstance(betas, str):
                betas = betas_from_file(betas)
            elif isinstance(betas, (bytes, dict)) or not hasattr(betas, "__len__"):
                raise ConfigError(f"noise schedule 'vp_discrete': betas must be one of {', '.join(BETA_SCHEDULES)}, "
                                  f"a list of numbers or a file ({', '.join(BETA_FILES)}), got {betas!r}.")
            else:
                try:
                    betas = torch.as_tensor(betas, dtype=torch.float64)
                except (TypeError, ValueError, RuntimeError):
                    raise ConfigError(f"noise schedule 'vp_discrete': betas must be a list of numbers, "
                                      f"got {str(betas)[:200]}.") from None
            if betas.dim() != 1 or len(betas) < 2:
                raise ConfigError(f"noise schedule 'vp_discrete': betas must be a flat list of at least 2 numbers, "
                                  f"got shape {tuple(betas.shape)}.")
            if num_steps is not None and int(num_steps) != len(betas):
                raise ConfigError(f"noise schedule 'vp_discrete': num_steps={num_steps} but the betas have "
                                  f"{len(betas)} entries; leave num_steps null with an explicit list or a file.")
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.N = len(betas)
        self.beta_start, self.beta_end = float(betas[0]), float(betas[-1])
        self.t_n = torch.arange(1, self.N + 1, dtype=torch.float64) / self.N
        self.log_alpha_n = 0.5 * torch.cumsum(torch.log1p(-betas), 0)
        self.zero_terminal_snr = bool(betas[-1] == 1)
        if self.zero_terminal_snr:      # alpha(t_N) = 0: interpolate over the nodes with alpha > 0, start at t_{N-1}
            if self.N < 3:
                raise ConfigError(f"noise schedule 'vp_discrete': zero terminal SNR needs at least 3 steps (two with "
                                  f"alpha > 0), got N = {self.N}.")
            self.t_n, self.log_alpha_n = self.t_n[:-1], self.log_alpha_n[:-1]
            T = min(T, float(self.t_n[-1]))
        self.T = T
        self.t_min = 1.0 / self.N if t_min is None else t_min
        self.lambda_min_clipped = self._clip_T(lambda_min_clipped)

    def _clip_T(self, clip):
        """Move T to t(clip) where lambda(T) < clip (Lu et al. 2022, app. D's discrete wrapper with the reference
        code's log-SNR clip); returns the clip as a float, or None."""
        if clip is None:
            return None
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip):
            raise ConfigError(f"noise schedule 'vp_discrete': lambda_min_clipped must be a finite number (the lowest "
                              f"log-SNR lambda = log(alpha/sigma) sampling starts from, -5.1 in DPM-Solver) or null "
                              f"(off), got {clip!r}.")
        clip = float(clip)
        lam_lo = float(self.lambda_(self.t_min))
        if not clip < lam_lo:
            raise ConfigError(f"noise schedule 'vp_discrete': lambda_min_clipped={clip} leaves nothing to sample: "
                              f"lambda(t_min = {self.t_min:.6g}) = {lam_lo:.6g}; the clip must lie below it.")
        if float(self.lambda_(self.T)) < clip:
            self.T = float(self.t_of_lambda(torch.tensor(clip, dtype=torch.float64)))
        return clip

    def _interp(self, x, xp, fp):
        """Piecewise-linear interpolation with linear extrapolation at both ends; returns value and slope."""
        x = _t(x)
        xp_, fp_ = xp.to(x.dtype), fp.to(x.dtype)
        if xp_[0] > xp_[-1]:
            xp_, fp_ = xp_.flip(0), fp_.flip(0)
        idx = torch.clamp(torch.searchsorted(xp_, x.detach().contiguous()) - 1, 0, len(xp_) - 2)
        x0, x1, y0, y1 = xp_[idx], xp_[idx + 1], fp_[idx], fp_[idx + 1]
        slope = (y1 - y0) / (x1 - x0)
        return y0 + slope * (x - x0), slope

    def log_alpha(self, t):
        return self._interp(t, self.t_n, self.log_alpha_n)[0]

    def d_log_alpha(self, t):
        return self._interp(t, self.t_n, self.log_alpha_n)[1]

    def t_of_lambda(self, lam):
        lam = _t(lam)
        return self._interp(self._log_alpha_of_lambda(lam), self.log_alpha_n, self.t_n)[0]

    def describe(self):
        return {**super().describe(), "num_steps": self.N, "betas": self.source, "beta_start": self.beta_start,
                "beta_end": self.beta_end, "lambda_min_clipped": self.lambda_min_clipped,
                "zero_terminal_snr": self.zero_terminal_snr}


class VE(NoiseSchedule):
    """Variance exploding: alpha = 1, sigma(t) = sigma_min (sigma_max/sigma_min)^t (Song et al. 2021, eq. 9)."""

    name = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, T: float = 1.0, t_min: float = 1e-5):
        self.sigma_min, self.sigma_max, self.T, self.t_min = sigma_min, sigma_max, T, t_min
        self._r = math.log(sigma_max / sigma_min)

    def log_alpha(self, t):
        return torch.zeros_like(_t(t))

    def d_log_alpha(self, t):
        return torch.zeros_like(_t(t))

    def log_sigma(self, t):
        return math.log(self.sigma_min) + _t(t) * self._r

    def d_log_sigma(self, t):
        return torch.full_like(_t(t), self._r)

    def t_of_lambda(self, lam):
        return (-_t(lam) - math.log(self.sigma_min)) / self._r

    def describe(self):
        return {**super().describe(), "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


class EDM(NoiseSchedule):
    """EDM: alpha = 1, sigma(t) = t, sampled on [sigma_min, sigma_max] (Karras et al. 2022, table 1)."""

    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.T, self.t_min = sigma_max, sigma_min

    def log_alpha(self, t):
        return torch.zeros_like(_t(t))

    def d_log_alpha(self, t):
        return torch.zeros_like(_t(t))

    def log_sigma(self, t):
        return torch.log(_t(t))

    def d_log_sigma(self, t):
        return 1.0 / _t(t)

    def t_of_lambda(self, lam):
        return torch.exp(-_t(lam))

    def describe(self):
        return {**super().describe(), "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


class SubVP(NoiseSchedule):
    """sub-VP SDE dx = -beta/2 x dt + sqrt(beta (1 - exp(-2 B(t)))) dW, B(t) = int_0^t beta, with vp_linear's
    beta(t) = beta_min + t (beta_max - beta_min) (Song et al. 2021, sec. 3.4; kernel in app. B, eq. 29):
    alpha = exp(-B/2) as for VP, sigma = 1 - exp(-B) = 1 - alpha^2 (not its square root), so sigma^2 < 1 - alpha^2.

    The base class's f = d log alpha = -beta/2 and g^2 = -2 sigma^2 d lambda = beta (1 - e^{-2B}) give the SDE back.
    is_vp is False: alpha^2 + sigma^2 != 1, which diffusers' schedulers assume (solvers/diffusers_sched.py refuses
    non-VP schedules); the other use, capping a grid's start at sigma_hat = 80 (timesteps.capped_sigma_range), only
    saves steps where sigma_hat(T) > 800 and is not needed for correctness (default sigma_hat(T) = 152)."""

    name = "sub_vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, T: float = 1.0, t_min: float = 1e-3):
        self.beta_min, self.beta_max, self.T, self.t_min = beta_min, beta_max, T, t_min

    # alpha is the VP SDE's (the same drift): vp_linear's closed forms, log alpha = -B/2, d log alpha = -beta/2.
    log_alpha = VPLinear.log_alpha
    d_log_alpha = VPLinear.d_log_alpha

    def log_sigma(self, t):
        # sigma = 1 - e^{-B} with e^{-B} = alpha^2 (Song et al. 2021, eq. 29)
        return torch.log(-torch.expm1(2.0 * self.log_alpha(_t(t))))

    def d_log_sigma(self, t):
        # d/dt log(1 - e^{-B}) = beta e^{-B} / (1 - e^{-B}) = beta / (e^B - 1), beta = -2 d log alpha
        t = _t(t)
        return -2.0 * self.d_log_alpha(t) / torch.expm1(-2.0 * self.log_alpha(t))

    def t_of_lambda(self, lam):
        # lambda = log(a / (1 - a^2)), a = e^{-B/2}: strictly decreasing in B (both terms are), and with
        # r = e^{-lambda} = sigma_hat, a^2 + r a - 1 = 0 gives B = -2 log a = 2 asinh(r/2).  For lambda < 0,
        # asinh(r/2) = -lambda + log((1 + sqrt(1 + 4 e^{2 lambda}))/2) (no overflow of e^{-lambda}).  Then t solves
        # B(t) = beta_min t + (beta_max - beta_min) t^2/2 in the cancellation-free form 2B / (beta_min + sqrt(...)).
        lam = _t(lam)
        half_b = torch.where(lam >= 0, torch.asinh(0.5 * torch.exp(-lam.clamp(min=0))),
                             -lam + torch.log1p(torch.sqrt(1 + 4 * torch.exp(2 * lam.clamp(max=0)))) - math.log(2))
        b = 2 * half_b
        return 2 * b / (self.beta_min + torch.sqrt(self.beta_min ** 2 + 2 * (self.beta_max - self.beta_min) * b))

    def describe(self):
        return {**super().describe(), "beta_min": self.beta_min, "beta_max": self.beta_max}


class Flow(NoiseSchedule):
    """Rectified flow / flow matching: x_t = (1 - t) x_0 + t eps, alpha = 1 - t, sigma = t (Liu et al. 2022;
    Lipman et al. 2022, the conditional OT path with sigma_min = 0), lambda = log((1 - t)/t), t(lambda) =
    sigmoid(-lambda); f and g^2 from the base class (f = -1/(1 - t), g^2 = 2t/(1 - t)).

    T < 1: at t = 1 alpha = 0 and lambda = -inf.  Flow models sample from N(0, I) at t = 1, but the dynamics work in
    eps (x0 = (x - sigma eps)/alpha), undefined at alpha = 0, and the exponential integrators step in lambda; so
    sampling starts at T = 0.999 (sigma_hat = 999, lambda = -6.9, the prior N(0, T^2 I) neglects alpha(T) x_0 = 1e-3
    x_0, less than vp_linear's alpha(1) = 6.6e-3), and T >= 1 is a ConfigError.  SD3's time shift (Esser et al.
    2024) is a property of the time grid, not of the path: timesteps=shifted timesteps.shift=3 (solvers/timesteps.py)."""

    name = "flow"

    def __init__(self, T: float = 0.999, t_min: float = 1e-3):
        self.T, self.t_min = T, t_min

    def log_alpha(self, t):
        return torch.log1p(-_t(t))

    def d_log_alpha(self, t):
        return -1.0 / (1.0 - _t(t))

    def log_sigma(self, t):
        return torch.log(_t(t))

    def d_log_sigma(self, t):
        return 1.0 / _t(t)

    def t_of_lambda(self, lam):
        # lambda = log((1 - t)/t)  =>  t = 1/(1 + e^lambda)
        return torch.sigmoid(-_t(lam))

    # d alpha/dt, d sigma/dt in closed form, finite at t = 1 where alpha = 0 (the velocity parametrization's inverse)
    def d_alpha(self, t):
        return torch.full_like(_t(t), -1.0)

    def d_sigma(self, t):
        return torch.ones_like(_t(t))


SCHEDULES: dict[str, Callable[..., NoiseSchedule]] = {
    "vp_linear": VPLinear,
    "vp_cosine": VPCosine,
    "vp_discrete": VPDiscrete,
    "ve": VE,
    "edm": EDM,
    "sub_vp": SubVP,
    "flow": Flow,
}


def schedule_params(name: str) -> list[str]:
    """The parameters a noise schedule accepts (its constructor's keywords)."""
    import inspect

    return [p for p in inspect.signature(SCHEDULES[name]).parameters if p != "self"]


def make_schedule(name: str, **kwargs) -> NoiseSchedule:
    """The schedule `name` with `kwargs`; a None value means the schedule's own default (so one config can list
    the keys of every family, null where unused).  A key the schedule does not take is a ConfigError naming
    the keys it accepts."""
    if name not in SCHEDULES:
        raise unknown_name("noise schedule", name, SCHEDULES)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    accepted = schedule_params(name)
    if unknown := sorted(set(kwargs) - set(accepted)):
        raise ConfigError(f"noise schedule '{name}' has no parameter {', '.join(map(repr, unknown))} "
                          f"(= {', '.join(f'{k}={kwargs[k]!r}' for k in unknown)}). It accepts: {', '.join(accepted)} "
                          f"(null or absent = its default).")
    for k, v in kwargs.items():
        if k not in ("betas", "zero_terminal_snr") and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ConfigError(f"noise schedule '{name}': {k}={v!r} must be a finite number.")
    try:
        sch = SCHEDULES[name](**kwargs)
    except TypeError as e:
        raise ConfigError(f"noise schedule '{name}' got bad parameters {sorted(kwargs)}: {e}") from None
    check_schedule(sch)
    return sch


def check_schedule(sch: NoiseSchedule) -> None:
    """Parameters that give a valid diffusion on [t_min, T]: positive noise rates, 0 < t_min < T, and alpha, sigma
    finite with log-SNR lambda decreasing from t_min to T.  A ConfigError names the parameter and the rule."""
    name = sch.name
    bad = None
    if name == "vp_linear" and (sch.beta_min < 0 or sch.beta_max <= 0):
        bad = f"beta_min={sch.beta_min}, beta_max={sch.beta_max}: need beta_min >= 0 and beta_max > 0"
    elif name == "vp_cosine" and (sch.s <= 0 or sch.T >= 1):
        bad = f"s={sch.s}, T={sch.T}: need s > 0 and T < 1 (alpha(1) = 0)"
    elif name == "vp_discrete":
        b = torch.diff(sch.log_alpha_n)
        if not bool(torch.isfinite(sch.log_alpha_n).all()) or bool((b >= 0).any()) or sch.log_alpha_n[0] >= 0:
            bad = "betas must lie in (0, 1)"
        elif sch.t_min < 1.0 / sch.N - 1e-12:
            bad = (f"t_min={sch.t_min} lies below the first discrete step 1/N = {1.0 / sch.N:.6g} (N = {sch.N}); "
                   f"set t_min >= 1/N or null (= 1/N)")
        elif sch.T > 1.0 + 1e-12:
            bad = (f"T={sch.T} lies beyond the last discrete step t_N = 1 (N = {sch.N}); the schedule is not "
                   f"extrapolated: set T <= 1 (1 = start at the last step)")
    elif name in ("ve", "edm") and not 0 < sch.sigma_min < sch.sigma_max:
        bad = f"sigma_min={sch.sigma_min}, sigma_max={sch.sigma_max}: need 0 < sigma_min < sigma_max"
    elif name == "sub_vp" and (sch.beta_min < 0 or sch.beta_max <= 0
                               or sch.beta_min + sch.T * (sch.beta_max - sch.beta_min) <= 0):
        bad = (f"beta_min={sch.beta_min}, beta_max={sch.beta_max}, T={sch.T}: need beta_min >= 0, beta_max > 0 and "
               f"beta(T) > 0 (beta > 0 on (0, T], so lambda decreases)")
    elif name == "flow" and not sch.T < 1:
        bad = (f"T={sch.T}: need T < 1 (at t = 1 alpha = 0 and lambda = -inf: x0 = (x - sigma eps)/alpha and the "
               f"exponential integrators' steps in lambda are undefined there); the default T = 0.999 starts at "
               f"sigma_hat = 999 from N(0, T^2 I)")
    if bad is None and not 0 < sch.t_min < sch.T:
        bad = f"t_min={sch.t_min}, T={sch.T}: need 0 < t_min < T"
    if bad is None:
        ends = torch.tensor([sch.t_min, sch.T], dtype=torch.float64)
        a, sg, lam = sch.alpha(ends), sch.sigma(ends), sch.lambda_(ends)
        if not bool(torch.isfinite(a).all() & torch.isfinite(sg).all() & (sg > 0).all()) or not lam[0] > lam[1]:
            bad = (f"alpha or sigma is not finite and positive at t_min or T, or log-SNR does not decrease from "
                   f"t_min to T (alpha={a.tolist()}, sigma={sg.tolist()})")
    if bad is None:
        p = sch.prior_std()
        if not (math.isfinite(p) and p > 0):
            bad = f"the prior scale sigma(T) = {p} at T={sch.T} is not a finite positive number"
    if bad:
        raise ConfigError(f"noise schedule '{name}': {bad}.")
