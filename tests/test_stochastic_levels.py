"""Absolute levels of the stochastic samplers on the exact GMM: with many steps, the samples' mean and covariance
equal the exact data moments within a stated number of standard errors, and a Langevin corrector run at a fixed
time leaves the exact marginal q_t invariant.

Standard errors come from the exact moments, not from the samples: the mean's from diag(C)/n, each covariance
entry's from the exact fourth central moments of the mixture (Isserlis' theorem per component), the trace's
likewise.  Samplers start from exact samples of q_T (not the N(0, sigma_T^2) prior, whose mismatch alpha_T mu
would bias the mean by ~0.3 standard errors at n = 4000).  The bound is Z = 4.5 standard errors on every one of
the 4 means, 10 covariance entries and the trace; the discretisation bias at the chosen NFE was measured with
40 000 samples and stays below ~1.5 standard errors at the quick tests' sample counts (ancestral 'ddpm'
with eta = 1 is the most biased: DDPM's posterior-variance noise under-disperses by O(1/steps)).

The quick cases take about a second each; `slow` ones use more samples and steps.
"""
from __future__ import annotations

import math

import pytest
import torch

from bench.models.dynamics import Dynamics
from bench.solvers.registry import get_solver
from bench.solvers.stochastic import langevin_step
from bench.solvers.timesteps import make_timesteps

Z = 4.5


from tests.test_solvers_stochastic import BatchRNG  # noqa: E402  (one generator for the whole batch)


# ------------------------------------------------------------------------------------- exact moments
def mixture_at(gmm, alpha=1.0, sigma=0.0):
    """(weights, means, covs) of q_t = sum_k pi_k N(alpha mu_k, alpha^2 S_k + sigma^2 I)."""
    d = gmm.dim
    return (gmm.weights, alpha * gmm.means, alpha ** 2 * gmm.covs + sigma ** 2 * torch.eye(d, dtype=torch.float64))


def exact_moments(weights, means, covs):
    """Mean mu, covariance C and the fourth central moments T[p,q,r,s] = E[z_p z_q z_r z_s], z = x - mu, of a
    Gaussian mixture: per component z = a + y with a = mu_k - mu, y ~ N(0, S_k), Isserlis' theorem gives
    a a a a + (six a a S terms) + (three S S terms)."""
    mu = (weights[:, None] * means).sum(0)
    a = means - mu
    C = (weights[:, None, None] * (covs + a[:, :, None] * a[:, None, :])).sum(0)
    e = torch.einsum
    T = 0
    for w, ak, S in zip(weights, a, covs):
        Tk = (e("p,q,r,s->pqrs", ak, ak, ak, ak)
              + e("p,q,rs->pqrs", ak, ak, S) + e("p,r,qs->pqrs", ak, ak, S) + e("p,s,qr->pqrs", ak, ak, S)
              + e("q,r,ps->pqrs", ak, ak, S) + e("q,s,pr->pqrs", ak, ak, S) + e("r,s,pq->pqrs", ak, ak, S)
              + e("pq,rs->pqrs", S, S) + e("pr,qs->pqrs", S, S) + e("ps,qr->pqrs", S, S))
        T = T + w * Tk
    return mu, C, T


def level_z(x, weights, means, covs):
    """z-scores (estimate - exact) / standard error of the sample mean (d), the unbiased sample covariance's
    upper triangle (d(d+1)/2) and its trace, the standard errors from the exact moments."""
    mu, C, T = exact_moments(weights, means, covs)
    n, d = x.shape
    xc = x - x.mean(0)
    S = xc.T @ xc / (n - 1)
    z_mean = (x.mean(0) - mu) / torch.sqrt(torch.diagonal(C) / n)
    var_entry = torch.einsum("jkjk->jk", T) - C ** 2                 # Var(z_j z_k)
    iu = torch.triu_indices(d, d)
    z_cov = ((S - C) / torch.sqrt(var_entry / n))[iu[0], iu[1]]
    var_trace = torch.einsum("jjkk->", T) - torch.trace(C) ** 2       # Var(|z|^2)
    z_trace = (torch.trace(S) - torch.trace(C)) / math.sqrt(float(var_trace) / n)
    return z_mean, z_cov, float(z_trace)


def assert_levels(x, params, bound=Z, what=""):
    assert torch.isfinite(x).all(), what
    zm, zc, zt = level_z(x.double(), *params)
    msg = (f"{what}: z(mean) = {[round(float(v), 2) for v in zm]}, max |z(cov)| = {float(zc.abs().max()):.2f}, "
           f"z(trace) = {zt:.2f}; bound {bound} standard errors")
    assert float(zm.abs().max()) < bound and float(zc.abs().max()) < bound and abs(zt) < bound, msg
    return zm, zc, zt


# ------------------------------------------------------------------------------------- samplers
def sample_from_exact_q_T(model, name, nfe, n, seed=0, **knobs):
    sch, gmm = model.schedule, model.data
    spec = get_solver(name)
    steps = spec.steps_for(nfe, **knobs)
    t = make_timesteps(spec.default_timesteps, sch, steps)
    g = torch.Generator().manual_seed(1000 + seed)
    x_T = gmm.sample(n, generator=g, alpha=sch.alpha(sch.T), sigma=sch.sigma(sch.T))
    with torch.inference_mode():
        return spec.fn(Dynamics(model.net, sch), x_T, t, BatchRNG(seed), **knobs)


QUICK = [   # (solver, knobs, NFE, samples); measured |bias| / SE at these n: <= 0.8, 1.3, 1.2, 0.5, 0.5, 1.1, 0.5, 0.9
    ("euler_maruyama", {}, 100, 4000),
    ("ancestral", {"variant": "ddpm", "eta": 1.0}, 300, 3000),
    ("ancestral", {"variant": "euler", "eta": 0.5}, 200, 4000),
    ("edm_stochastic", {}, 199, 4000),                                   # S_churn/steps = 0.3: below the cap
    ("edm_stochastic", {"S_churn": 80.0, "S_noise": 1.0}, 199, 4000),    # 0.8: capped at sqrt(2) - 1
    ("pc", {"step_size": "sigma2"}, 199, 4000),
    ("pc", {"predictor": "euler_maruyama", "step_size": "sigma2"}, 199, 4000),
    ("pc", {"n_corrector": 0}, 200, 4000),            # the reverse-diffusion predictor alone (no corrector to hide it)
]

SLOW = [    # three times the samples, more steps (about 30 s together)
    ("euler_maruyama", {}, 300, 12000),
    ("ancestral", {"variant": "ddpm", "eta": 1.0}, 600, 12000),
    ("ancestral", {"variant": "euler", "eta": 0.5}, 800, 12000),
    ("ancestral", {"variant": "euler", "eta": 1.5}, 800, 12000),
    ("edm_stochastic", {}, 399, 12000),
    ("edm_stochastic", {"S_churn": 160.0, "S_noise": 1.0}, 399, 12000),
    ("pc", {"step_size": "sigma2"}, 399, 12000),
    ("pc", {"predictor": "euler_maruyama", "step_size": "sigma2", "n_corrector": 2}, 598, 12000),
]


def _id(c):
    name, knobs, nfe, n = c
    return "-".join([name, *(f"{k}={v}" for k, v in knobs.items()), f"nfe{nfe}", f"n{n}"])


@pytest.mark.parametrize("name,knobs,nfe,n", QUICK, ids=[_id(c) for c in QUICK])
def test_stochastic_sampler_matches_data_moments(gmm_model, name, knobs, nfe, n):
    x = sample_from_exact_q_T(gmm_model, name, nfe, n, **knobs)
    assert_levels(x, mixture_at(gmm_model.data), what=_id((name, knobs, nfe, n)))


@pytest.mark.slow
@pytest.mark.parametrize("name,knobs,nfe,n", SLOW, ids=[_id(c) for c in SLOW])
def test_stochastic_sampler_matches_data_moments_many_samples(gmm_model, name, knobs, nfe, n):
    x = sample_from_exact_q_T(gmm_model, name, nfe, n, seed=1, **knobs)
    assert_levels(x, mixture_at(gmm_model.data), what=_id((name, knobs, nfe, n)))


@pytest.mark.xfail(strict=True, reason="known: step_size=norms (Song et al. Alg. 4 per sample) is heavy-tailed in 4-D; "
                   "its position-dependent step e(x) ~ |z|^2/|score(x)|^2 tilts the corrector's stationary law towards "
                   "q |score|^2 instead of q (README, Solvers): z(trace) ~ +26 here")
def test_pc_with_per_sample_norm_step_matches_data_moments(gmm_model):
    x = sample_from_exact_q_T(gmm_model, "pc", 199, 4000)
    assert_levels(x, mixture_at(gmm_model.data), what="pc step_size=norms")


def test_level_check_has_power(gmm_model):
    """The bound is not loose: exact data samples pass, and the same samples with their spread scaled by 5 %
    (what a noise-scale error of a few percent does to a sampler's output) or shifted by 0.1 fail."""
    gmm = gmm_model.data
    x = gmm.sample(4000, generator=torch.Generator().manual_seed(3))
    params = mixture_at(gmm)
    assert_levels(x, params, what="exact samples")
    mu = gmm.mean()
    with pytest.raises(AssertionError):
        assert_levels(mu + 1.05 * (x - mu), params)
    with pytest.raises(AssertionError):
        assert_levels(x + 0.1, params)


def test_standard_errors_match_a_bootstrap_over_exact_samples(gmm_model):
    """The exact fourth moments give the same standard errors as the spread of the moments of exact samples."""
    gmm = gmm_model.data
    weights, means, covs = mixture_at(gmm)
    mu, C, T = exact_moments(weights, means, covs)
    x = gmm.sample(200_000, generator=torch.Generator().manual_seed(4))
    z = x - mu
    var_mc = ((z[:, :, None] * z[:, None, :]) - C).pow(2).mean(0)
    torch.testing.assert_close(var_mc, torch.einsum("jkjk->jk", T) - C ** 2, rtol=0.05, atol=0)
    torch.testing.assert_close(x.mean(0), mu, rtol=0, atol=0.02)
    torch.testing.assert_close(torch.cov(x.T), C, rtol=0, atol=0.03)


# ------------------------------------------------------------------------------------- Langevin invariance
LANGEVIN = [   # (t, snr, steps, samples): ULA's own bias ~ snr^2 sigma^2 / var per direction, << 1 SE here
    (0.5, 0.1, 200, 4000),
    (0.05, 0.16, 200, 4000),
]


def _langevin_chain(model, t, snr, steps, n, step_size="sigma2", seed=0):
    sch, gmm = model.schedule, model.data
    a, s = sch.alpha(torch.tensor(t, dtype=torch.float64)), sch.sigma(torch.tensor(t, dtype=torch.float64))
    x = gmm.sample(n, generator=torch.Generator().manual_seed(2000 + seed), alpha=a, sigma=s)
    x_start = x.clone()
    dyn, rng = Dynamics(model.net, sch), BatchRNG(seed)
    tt = torch.tensor(t, dtype=torch.float64)
    with torch.inference_mode():
        for _ in range(steps):
            x = langevin_step(dyn, x, tt, rng, snr, step_size)
    return x_start, x, mixture_at(gmm, float(a), float(s))


@pytest.mark.parametrize("t,snr,steps,n", LANGEVIN)
def test_langevin_corrector_leaves_q_t_invariant(gmm_model, t, snr, steps, n):
    x_start, x, params = _langevin_chain(gmm_model, t, snr, steps, n)
    assert_levels(x, params, what=f"Langevin at t={t}, snr={snr}, {steps} steps")
    # the chain has moved (invariance is not standing still): the mean squared displacement is a good part of the
    # within-component spread (the modes themselves are too far apart for a local chain to mix between them)
    weights, _, covs = params
    local = float((weights * torch.diagonal(covs, dim1=1, dim2=2).sum(1)).sum())
    moved = float((x - x_start).pow(2).sum(1).mean()) / local
    assert moved > 0.3, moved


@pytest.mark.xfail(strict=True, reason="known: per-sample norms make the Langevin step position-dependent, so q_t is not "
                   "invariant in low dimension (see test_pc_with_per_sample_norm_step_matches_data_moments)")
def test_langevin_corrector_with_norm_step_leaves_q_t_invariant(gmm_model):
    _, x, params = _langevin_chain(gmm_model, 0.5, 0.1, 200, 4000, step_size="norms")    # z(trace) ~ +110
    assert_levels(x, params, what="Langevin, step_size=norms")


@pytest.mark.slow
@pytest.mark.parametrize("t", [0.02, 0.8])
def test_langevin_corrector_leaves_q_t_invariant_many_samples(gmm_model, t):
    _, x, params = _langevin_chain(gmm_model, t, 0.1, 400, 12000, seed=1)
    assert_levels(x, params, what=f"Langevin at t={t}")


# ------------------------------------------------------------------------------------- SDE multistep and Restart
# dpm_solver_pp_sde, sa_solver (solvers/sde_multistep.py) and restart (solvers/restart.py); measured with 40 000
# samples at these NFE, |bias| / SE scaled to the n below stays <= 0.9 (SDE_QUICK) and <= 1.3 (SDE_SLOW).  Restart's
# error is set by its intervals' own Heun steps, not the main grid: [[0.06, 0.3, 4, 3], [0.3, 2, 2, 3]] is biased
# (z(trace) = +4.4 at 40 000 samples, NFE 199 and 299 alike), the same with 6 steps per restart is not (0.9).
SDE_QUICK = [
    ("dpm_solver_pp_sde", {}, 100, 4000),
    ("dpm_solver_pp_sde", {"order": 3, "solver_type": "heun", "d2": "dpm_solver_code", "lower_order_final": False},
     100, 4000),                                                       # k-diffusion's sample_dpmpp_3m_sde
    ("sa_solver", {}, 100, 4000),                                      # tau = 1 on sigma_hat in [0.72, 25.1]
    ("sa_solver", {"tau_sigma_min": 0.0, "tau_sigma_max": math.inf}, 100, 4000),
    ("restart", {}, 99, 4000),
    ("restart", {"restart": [[0.06, 0.3, 4, 6], [0.3, 2.0, 2, 6]]}, 199, 4000),
]

SDE_SLOW = [
    ("dpm_solver_pp_sde", {"order": 3, "eta": 2.0}, 200, 12000),
    ("sa_solver", {"predictor_order": 2, "corrector_order": 2, "tau": 1.5, "tau_sigma_min": 0.0,
                   "tau_sigma_max": math.inf}, 200, 12000),
    ("restart", {"restart": [[0.06, 1.0, 10, 10]]}, 299, 12000),
]


@pytest.mark.parametrize("name,knobs,nfe,n", SDE_QUICK, ids=[_id(c) for c in SDE_QUICK])
def test_sde_multistep_and_restart_match_data_moments(gmm_model, name, knobs, nfe, n):
    x = sample_from_exact_q_T(gmm_model, name, nfe, n, **knobs)
    assert_levels(x, mixture_at(gmm_model.data), what=_id((name, knobs, nfe, n)))


@pytest.mark.slow
@pytest.mark.parametrize("name,knobs,nfe,n", SDE_SLOW, ids=[_id(c) for c in SDE_SLOW])
def test_sde_multistep_and_restart_match_data_moments_many_samples(gmm_model, name, knobs, nfe, n):
    x = sample_from_exact_q_T(gmm_model, name, nfe, n, seed=1, **knobs)
    assert_levels(x, mixture_at(gmm_model.data), what=_id((name, knobs, nfe, n)))
