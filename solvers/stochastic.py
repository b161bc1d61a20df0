"""Stochastic samplers: Euler-Maruyama, ancestral (DDPM-eta / Euler-ancestral), EDM's stochastic sampler
and predictor-corrector.

Every draw comes from the `rng` argument (a PerSampleRNG), never torch's global generator, so sample i
is the same whatever the batch size.  Noise that stands for a Brownian increment of the reverse SDE
over [t_n, t_{n+1}] is drawn with rng.increment (a strong-error reference can then couple a path);
other noise (EDM's churn, Langevin moves at a fixed time) with rng.randn_like.

All end with DESIGN's final step: the x0-prediction from the evaluation at the last positive time.
"""
from __future__ import annotations

import math

import torch

from bench.models.dynamics import _bc
from bench.models.errors import ConfigError
from bench.solvers.registry import register_solver
from bench.solvers.variables import floats


def sde_plan(sch, t):
    """Per step n, as Python floats once per solve (issue 17): (t_n, t_{n+1}, 1 + f dt, (g^2/sigma) dt, g sqrt|dt|) at
    t_n, dt = t_{n+1} - t_n: em_step's weights on x, eps and z."""
    g2 = sch.g2(t)
    tf, f, c, g = t.tolist(), floats(sch.f(t), t), floats(g2 / sch.sigma(t), t), floats(torch.sqrt(g2), t)
    return [(tf[n], tf[n + 1], 1.0 + f[n] * (tf[n + 1] - tf[n]), c[n] * (tf[n + 1] - tf[n]),
             g[n] * math.sqrt(abs(tf[n + 1] - tf[n]))) for n in range(len(tf) - 1)]


def em_step(dyn, x, plan, n, rng):
    """One Euler-Maruyama step t_n -> t_{n+1} of the reverse SDE dx = [f x - g^2 score] dt + g dW-bar (Song et al. 2021,
    eq. 6); score = -eps/sigma, so the drift is f x + (g^2/sigma) eps and the step x (1 + f dt) + (g^2/sigma) dt eps
    + g sqrt|dt| z (dt < 0: time runs backwards), three fused ops with sde_plan's weights."""
    tn, tn1, cx, ce, cz = plan[n]
    z = rng.increment(x, tn, tn1)
    return x.mul(cx).add_(dyn.eps(x, tn), alpha=ce).add_(z, alpha=cz)


# ---------------------------------------------------------------------------------------------------------
@register_solver("euler_maruyama", nfe_of_steps=lambda steps, **_: steps, nfe_formula="steps", min_steps=2,
                 stochastic=True, brownian=True, default_timesteps="uniform_t")
def euler_maruyama(dyn, x, t, rng):
    """Euler-Maruyama (Kloeden & Platen 1992, ch. 9) on the reverse SDE (Song et al. 2021, eq. 6)."""
    plan = sde_plan(dyn.schedule, t)
    for n in range(len(t) - 1):
        x = em_step(dyn, x, plan, n, rng)
    return dyn.x0(x, t[-1])


# ---------------------------------------------------------------------------------------------------------
ANCESTRAL_VARIANTS = ("ddpm", "euler")
ANCESTRAL_VARIANCES = ("posterior", "beta")


def ancestral_sigmas(sig_from, sig_to, eta):
    """(sigma_up, sigma_down) in sigma_hat: sigma_up = eta * the DDPM posterior std (DDIM, Song et al. 2021a,
    eq. 16, written in sigma_hat = sigma/alpha), capped at sig_to as k-diffusion's get_ancestral_step does;
    sigma_down^2 + sigma_up^2 = sig_to^2."""
    up = eta * sig_to * torch.sqrt(1 - (sig_to / sig_from) ** 2)
    up = torch.minimum(up, sig_to)
    return up, torch.sqrt(sig_to ** 2 - up ** 2)


def _check_ancestral(variant, eta, variance="posterior"):
    if variant not in ANCESTRAL_VARIANTS:
        raise ConfigError(f"ancestral: unknown variant '{variant}'. Valid variants are: {', '.join(ANCESTRAL_VARIANTS)}.")
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not eta >= 0:
        raise ConfigError(f"ancestral: eta must be a number >= 0 (0 = DDIM, 1 = DDPM), got {eta!r}")
    if variant == "ddpm" and eta > 1:
        raise ConfigError(f"ancestral: variant 'ddpm' needs 0 <= eta <= 1 (DDIM eq. 12 takes sqrt(sigma_s^2 - "
                          f"sigma_eta^2)), got eta={eta}; variant 'euler' caps sigma_up and allows eta > 1.")
    if variance not in ANCESTRAL_VARIANCES:
        raise ConfigError(f"ancestral: unknown variance '{variance}'. Valid variances are: "
                          f"{', '.join(ANCESTRAL_VARIANCES)}.")
    if variance == "beta" and (variant != "ddpm" or eta != 1):
        raise ConfigError(f"ancestral: variance 'beta' (DDPM's sigma_t^2 = beta_t, Ho et al. 2020, sec. 3.2) is "
                          f"defined for variant 'ddpm' with eta = 1 only, got variant '{variant}', eta={eta}: DDIM's "
                          f"eta family moves the mean with the noise (eq. 12), and no member of it has variance beta; "
                          f"use variance 'posterior' (beta-tilde, scaled by eta) there.")


def _ancestral_nfe(steps, variant="ddpm", eta=1.0, variance="posterior", **_):
    _check_ancestral(variant, eta, variance)      # bad knobs are refused when the budget is planned, before any work
    return steps


# Brownian: with eta = 1 this is DDPM's ancestral sampler, a discretisation of the reverse SDE (Song et al. 2021,
# app. E); with eta it discretises the SDE with diffusion eta*g (its noise variance is
# sigma_up^2 = eta^2 g^2 |dt| + O(dt^2)); variance 'beta' (g^2 |dt| + O(dt^2) too) as well.  Each step's z stands for
# the normalised Brownian increment over [t_n, t_{n+1}], so all noise is drawn with rng.increment.
@register_solver("ancestral", nfe_of_steps=_ancestral_nfe, nfe_formula="steps", min_steps=2,
                 stochastic=True, brownian=True, default_timesteps="uniform_t")
def ancestral(dyn, x, t, rng, variant: str = "ddpm", eta: float = 1.0, variance: str = "posterior"):
    """Ancestral sampling.  'ddpm': DDIM's generalised step (Song et al. 2021a, eq. 12 with sigma_eta of eq. 16),
    x_s = alpha_s x0 + sqrt(sigma_s^2 - sigma_eta^2) eps + sigma_eta z.  'euler': k-diffusion's Euler-ancestral,
    an Euler step in sigma_hat to sigma_down, then noise sigma_up (both in x_hat = x/alpha).  For eta <= 1 the
    two are the same map (Euler in sigma_hat is DDIM), computed along different paths.  variance 'beta' ('ddpm',
    eta = 1): the same mean (DDPM's posterior mean, eq. 11) with noise variance beta_n = sigma_n^2 -
    (alpha_n/alpha_{n+1})^2 sigma_{n+1}^2, the forward step's variance (DDPM's beta_t for VP; Ho et al. 2020, sec. 3.2
    and Alg. 2 with sigma_t^2 = beta_t) instead of the posterior's beta-tilde = (sigma_{n+1}/sigma_n)^2 beta_n."""
    _check_ancestral(variant, eta, variance)
    sch = dyn.schedule
    sig = sch.sigma_hat(t)
    # the step's coefficients depend on the grid only: computed for every step at once (issue 17)
    ups, downs = ancestral_sigmas(sig[:-1], sig[1:], eta)
    alpha, sigma = sch.alpha(t), sch.sigma(t)
    if variant == "ddpm":
        sigma_eta = alpha[1:] * ups                           # sigma_hat -> x units
        std = sigma_eta if variance == "posterior" else alpha[:-1] * torch.sqrt(sig[:-1] ** 2 - sig[1:] ** 2)
        # c_x0 x0 + c_eps eps + c_z z with x0 = (x - sigma eps)/alpha: weights on x, eps, z
        c_x0, c_eps, c_z = alpha[1:], torch.sqrt(sigma[1:] ** 2 - sigma_eta ** 2), std
        w_x, w_eps, w_z = c_x0 / alpha[:-1], c_eps - c_x0 * sigma[:-1] / alpha[:-1], c_z
    else:                                                      # x_hat = x/alpha, d x_hat/d sigma_hat = eps, then alpha
        w_x, w_eps, w_z = alpha[1:] / alpha[:-1], (downs - sig[:-1]) * alpha[1:], ups * alpha[1:]
    tf = t.tolist()
    plan = list(zip(tf, tf[1:], w_x.tolist(), w_eps.tolist(), w_z.tolist()))   # Python floats: fused ops' scalars
    for tn, tn1, cx, ce, cz in plan:
        eps = dyn.eps(x, tn)
        z = rng.increment(x, tn, tn1)
        x = x.mul(cx).add_(eps, alpha=ce).add_(z, alpha=cz)
    return dyn.x0(x, t[-1])


# ---------------------------------------------------------------------------------------------------------
def _check_edm(S_churn, S_min, S_max, S_noise):
    for k, v in (("S_churn", S_churn), ("S_min", S_min), ("S_max", S_max), ("S_noise", S_noise)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v):
            raise ConfigError(f"edm_stochastic: {k} must be a number, got {v!r}")
    if S_churn < 0:
        raise ConfigError(f"edm_stochastic: S_churn must be >= 0 (0 = deterministic Heun), got {S_churn}")
    if S_min < 0 or S_min > S_max:
        raise ConfigError(f"edm_stochastic: need 0 <= S_min <= S_max (the sigma_hat range where churn is "
                          f"added), got S_min={S_min}, S_max={S_max}")
    if S_noise <= 0:
        raise ConfigError(f"edm_stochastic: S_noise must be > 0 (1 = unscaled noise), got {S_noise}")


# Not Brownian: the churn raises the noise level at a fixed step (x_hat + sqrt(s_c^2 - s^2) z), it is no increment
# of a path over [t_n, t_{n+1}], so it is drawn with rng.randn_like.
@register_solver("edm_stochastic", nfe_of_steps=lambda steps, **_: 2 * steps - 1, nfe_formula="2*steps - 1",
                 min_steps=2, stochastic=True, brownian=False, default_timesteps="edm", end_evals=1, churn=True)
def edm_stochastic(dyn, x, t, rng, S_churn: float = 30.0, S_min: float = 0.01, S_max: float = 1.0,
                   S_noise: float = 1.007):
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2), in sigma_hat = sigma/alpha and x_hat = x/alpha."""
    _check_edm(S_churn, S_min, S_max, S_noise)
    sch = dyn.schedule
    sig = sch.sigma_hat(t)
    N = len(t)
    x_hat = x / _bc(sch.alpha(t[0]), x)
    # the churn of every step depends on the grid only: decided and scaled before sampling (issue 17)
    gammas = [min(S_churn / N, math.sqrt(2) - 1) if S_min <= s <= S_max else 0.0 for s in sig.tolist()]
    sig_cs = sig * torch.tensor([1 + g for g in gammas], dtype=sig.dtype)          # line 5: t_hat_i
    noise = torch.sqrt(sig_cs ** 2 - sig ** 2) * S_noise
    # d x_hat / d sigma_hat = eps(alpha x_hat, t(sigma_hat)) (ode_rhs_sigma_hat) at sig_c[i] and sig[i + 1]: the times and
    # alphas of both, and the step sizes, as Python floats once per solve
    t_c, t_n = sch.t_of_sigma_hat(sig_cs), sch.t_of_sigma_hat(sig[1:])
    a_c, a_n = floats(sch.alpha(t_c), t_c), floats(sch.alpha(t_n), t_n)
    t_c, t_n, noise, sig_c = t_c.tolist(), t_n.tolist(), noise.tolist(), sig_cs.tolist()
    h = [s1 - s0 for s0, s1 in zip(sig_c, sig[1:].tolist())]
    for i in range(N):
        if gammas[i] > 0:                                                        # line 6
            x_hat = x_hat.add(rng.randn_like(x_hat), alpha=noise[i])
        d = dyn.eps(x_hat.mul(a_c[i]), t_c[i])                                   # line 7: (x - D)/t_hat = eps
        if i == N - 1:                                                           # last step Euler to sigma = 0
            return x_hat.sub(d, alpha=sig_c[i])                                  # = D(x_hat; sig_c), i.e. x0
        x_next = x_hat.add(d, alpha=h[i])                                        # line 8
        d2 = dyn.eps(x_next.mul(a_n[i]), t_n[i])                                 # lines 9-11: Heun correction
        x_hat = x_hat.add(d.add_(d2), alpha=0.5 * h[i])


# ---------------------------------------------------------------------------------------------------------
PREDICTORS = ("reverse_diffusion", "euler_maruyama")


def reverse_diffusion_plan(sch, t):
    """Per step n, as Python floats once per solve (issue 17): (t_n, t_{n+1}, a - 1, G^2/sigma(t_n), G) for
    reverse_diffusion_step, a = alpha(t_n)/alpha(t_{n+1}), G^2 = sigma(t_n)^2 - a^2 sigma(t_{n+1})^2."""
    alpha, sigma = sch.alpha(t), sch.sigma(t)
    a = alpha[:-1] / alpha[1:]
    G2 = sigma[:-1] ** 2 - a ** 2 * sigma[1:] ** 2
    tf = t.tolist()
    return list(zip(tf, tf[1:], (a - 1).tolist(), (G2 / sigma[:-1]).tolist(), torch.sqrt(G2).tolist()))


def reverse_diffusion_step(dyn, x, plan, n, rng):
    """Reverse-diffusion predictor (Song et al. 2021, eq. 47) t_n -> t_{n+1}: x - f_i(x) + G_i^2 score + G_i z, with
    the forward step t_{n+1} -> t_n of the schedule, f_i(x) = (a - 1) x, a = alpha(t_n)/alpha(t_{n+1}),
    G_i^2 = sigma(t_n)^2 - a^2 sigma(t_{n+1})^2 (DDPM's beta_i for VP, sigma_i^2 - sigma_{i-1}^2 for VE);
    score = -eps/sigma(t_n).  plan: reverse_diffusion_plan."""
    tn, tn1, a1, G2s, G = plan[n]
    z = rng.increment(x, tn, tn1)
    return x.sub(x, alpha=a1).sub_(dyn.eps(x, tn), alpha=G2s).add_(z, alpha=G)


STEP_SIZES = ("norms", "sigma2")


def langevin_step(dyn, x, t, rng, snr, step_size="norms", sigma=None):
    """Langevin corrector x + e score + sqrt(2e) z (Song et al. 2021, Algorithms 4/5 with alpha_i = 1).
    'norms': e = 2 (snr ||z|| / ||score||)^2 per sample, as Alg. 4 prints it (score_sde averages the norms over the
    batch, which would tie samples together).  'sigma2': e = 2 snr^2 sigma(t)^2, the same with ||z||^2 and
    ||score||^2 replaced by their typical sizes d and d/sigma^2; in low dimension the per-sample ratio is
    heavy-tailed (an F(d, d) variable) and the occasional huge step biases the samples.  sigma: sigma(t) as a float
    when the caller has it (once per grid, issue 17), t then a float too."""
    z = rng.randn_like(x)
    if sigma is None:
        sigma = float(dyn.schedule.sigma(torch.as_tensor(t, dtype=torch.float64)))
    eps = dyn.eps(x, t)                                   # score = -eps / sigma
    # with q = sqrt(step / 2): x + step score + sqrt(2 step) z = x - (2 q^2 / sigma) eps + 2 q z
    if step_size == "norms":                              # q = snr ||z|| / ||score|| = snr sigma ||z|| / ||eps||
        dims = tuple(range(1, x.dim()))                   # per sample, q shaped (batch, 1, ...) to broadcast
        r = torch.linalg.vector_norm(z, dim=dims, keepdim=True).div_(
            torch.linalg.vector_norm(eps, dim=dims, keepdim=True))                # q = c r, c = snr sigma
        c = snr * sigma
        return torch.addcmul(x, r * r, eps, value=-2.0 * c * c / sigma).addcmul_(r, z, value=2.0 * c)
    q = snr * sigma                                       # step = 2 snr^2 sigma^2
    return x.sub(eps, alpha=2 * q * q / sigma).add_(z, alpha=2 * q)


def _check_pc(predictor, snr, n_corrector, step_size):
    if predictor not in PREDICTORS:
        raise ConfigError(f"pc: unknown predictor '{predictor}'. Valid predictors are: {', '.join(PREDICTORS)}.")
    if step_size not in STEP_SIZES:
        raise ConfigError(f"pc: unknown step_size '{step_size}'. Valid step sizes are: {', '.join(STEP_SIZES)}.")
    if not isinstance(snr, (int, float)) or not snr > 0:
        raise ConfigError(f"pc: snr must be a number > 0 (the Langevin signal-to-noise ratio), got {snr!r}")
    _check_n_corrector(n_corrector)


def _check_n_corrector(n_corrector):
    if not isinstance(n_corrector, int) or isinstance(n_corrector, bool) or n_corrector < 0:
        raise ConfigError(f"pc: n_corrector must be an integer >= 0 (0 = predictor only), got {n_corrector!r}")


def _pc_nfe(steps, n_corrector=1, **_):
    _check_n_corrector(n_corrector)       # also guards steps_for against a budget loop that never ends
    return (1 + n_corrector) * (steps - 1) + 1


# Not Brownian as a whole: the predictor's noise is an increment (rng.increment), the Langevin corrector's is not.
@register_solver("pc", nfe_of_steps=_pc_nfe, nfe_formula="(1 + n_corrector)*(steps - 1) + 1", min_steps=2,
                 stochastic=True, brownian=False, default_timesteps="uniform_t",
                 end_evals=lambda m, n, n_corrector=1, **_: n_corrector)
def pc(dyn, x, t, rng, predictor: str = "reverse_diffusion", snr: float = 0.16, n_corrector: int = 1,
       step_size: str = "norms"):
    """Predictor-corrector sampling (Song et al. 2021, Algorithms 2/3): a predictor step t_n -> t_{n+1}, then
    n_corrector Langevin steps at t_{n+1}; the final step is the x0-prediction at t_min."""
    _check_pc(predictor, snr, n_corrector, step_size)
    sch = dyn.schedule
    step, plan = ((reverse_diffusion_step, reverse_diffusion_plan(sch, t)) if predictor == "reverse_diffusion"
                  else (em_step, sde_plan(sch, t)))
    tf, sigma = t.tolist(), floats(sch.sigma(t), t)
    for n in range(len(t) - 1):
        x = step(dyn, x, plan, n, rng)
        for _ in range(n_corrector):
            x = langevin_step(dyn, x, tf[n + 1], rng, snr, step_size, sigma=sigma[n + 1])
    return dyn.x0(x, t[-1])
