import math

import torch

from bench.models.dynamics import Dynamics
from bench.models.gmm import GaussianMixture


def test_eps_matches_autograd_of_log_q_t(gmm_model):
    gmm, sch = gmm_model.data, gmm_model.schedule
    g = torch.Generator().manual_seed(1)
    for t in [1e-3, 0.05, 0.3, 0.9]:
        a, s = sch.alpha(t), sch.sigma(t)
        x = gmm.sample(32, g, alpha=float(a), sigma=float(s)).requires_grad_(True)
        logq = gmm.log_prob_t(x, a, s).sum()
        (grad,) = torch.autograd.grad(logq, x)
        eps = gmm_model.net(x.detach(), torch.full((32,), t, dtype=torch.float64))
        assert torch.allclose(eps, -s * grad, rtol=1e-9, atol=1e-10)


def test_exact_sample_moments(gmm_model):
    gmm = gmm_model.data
    n = 200_000
    x = gmm.sample(n, torch.Generator().manual_seed(0))
    cov = gmm.cov()
    se_mean = torch.sqrt(torch.diag(cov) / n)
    assert ((x.mean(0) - gmm.mean()).abs() < 5 * se_mean).all()
    # covariance entries: standard error ~ sqrt(var(x_i x_j)/n); use a generous 5-sigma bound
    xc = x - gmm.mean()
    prod = xc[:, :, None] * xc[:, None, :]
    se_cov = prod.std(0) / math.sqrt(n)
    assert ((prod.mean(0) - cov).abs() < 5 * se_cov + 1e-12).all()


def test_log_prob_normalised_in_1d():
    gmm = GaussianMixture([0.3, 0.7], [[-1.0], [2.0]], [[[0.2]], [[0.5]]])
    x = torch.linspace(-10, 12, 20001, dtype=torch.float64)[:, None]
    p = gmm.log_prob(x).exp()
    assert abs(float(torch.trapezoid(p, x[:, 0])) - 1.0) < 1e-8


def test_prior_matches_q_T_moments(gmm_model):
    # q_T = sum pi_k N(alpha_T mu_k, alpha_T^2 S_k + sigma_T^2 I) ~ N(0, sigma_T^2 I) for VP at T = 1.
    sch = gmm_model.schedule
    assert float(sch.alpha(sch.T)) < 7e-3 and abs(sch.prior_std() - 1.0) < 1e-4


def test_dynamics_forms_agree(gmm_model):
    # The probability-flow ODE in t and in the EDM form are the same curve: dx/dt = d(alpha x_hat)/dt.
    sch = gmm_model.schedule
    dyn = Dynamics(gmm_model.net, sch)
    x = torch.randn(8, 4, dtype=torch.float64)
    t = torch.tensor(0.4, dtype=torch.float64)
    dxdt = dyn.ode_rhs(t, x)
    x_hat = x / sch.alpha(t)
    dxhat_dsig = dyn.ode_rhs_sigma_hat(sch.sigma_hat(t), x_hat)
    dsig_dt = -sch.sigma_hat(t) * sch.d_lambda(t)
    assert torch.allclose(dxdt, sch.f(t) * x + sch.alpha(t) * dxhat_dsig * dsig_dt, rtol=1e-10)
    # x0 / score / denoiser consistency
    eps = dyn.eps(x, t)
    assert torch.allclose(dyn.score(x, t), -eps / sch.sigma(t))
    assert torch.allclose(dyn.denoiser(x_hat, sch.sigma_hat(t)), dyn.x0(x, t), rtol=1e-10)
    assert dyn.nfe == 6   # every call above went through the counter once


def test_broadcast_keeps_a_python_float_exact_in_float64():
    from bench.models.dynamics import _bc
    x = torch.zeros(3, 2, dtype=torch.float64)
    assert float(_bc(0.1, x)) == 0.1 and _bc(0.1, x).dtype == torch.float64
    assert float(_bc(torch.tensor(0.1, dtype=torch.float64), x)) == 0.1
