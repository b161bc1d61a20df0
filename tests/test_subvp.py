"""sub-VP SDE schedule (Song et al. 2021, sec. 3.4 and app. B): the SDE coefficients against the paper's formula
written out here, lambda and its closed-form inverse, parameter errors, the exact GMM's marginals against a long
Euler-Maruyama run of the forward SDE, and the deterministic solvers' convergence orders on it."""
from __future__ import annotations

import math

import pytest
import torch

from bench.models.errors import ConfigError
from bench.models.registry import load_model
from bench.models.schedules import make_schedule
from bench.orders import CASES, measure, problem, theory

from tests.test_stochastic_levels import assert_levels, mixture_at

PARAMS = [{}, {"beta_min": 0.5, "beta_max": 8.0, "T": 1.5, "t_min": 1e-4}, {"beta_min": 0.0, "beta_max": 20.0},
          {"beta_min": 12.0, "beta_max": 2.0}]      # beta decreasing in t, still > 0 on (0, T]


def _paper(p, t):
    """beta(t), B(t) = int_0^t beta and the sub-VP SDE's f, g^2, alpha, sigma as printed by Song et al. 2021:
    dx = -1/2 beta x dt + sqrt(beta (1 - e^{-2B})) dW, kernel N(x0 e^{-B/2}, (1 - e^{-B})^2 I)."""
    b0, b1 = p.get("beta_min", 0.1), p.get("beta_max", 20.0)
    beta = b0 + t * (b1 - b0)
    B = b0 * t + 0.5 * (b1 - b0) * t ** 2
    return {"f": -0.5 * beta, "g2": beta * (1 - torch.exp(-2 * B)), "alpha": torch.exp(-0.5 * B),
            "sigma": 1 - torch.exp(-B), "B": B}


@pytest.mark.parametrize("p", PARAMS)
def test_sde_coefficients_are_song_et_al_formula(p):
    s = make_schedule("sub_vp", **p)
    t = torch.linspace(s.t_min, s.T, 101, dtype=torch.float64)
    ref = _paper(p, t)
    for k in ("f", "g2", "alpha", "sigma"):
        got = getattr(s, k)(t)
        torch.testing.assert_close(got, ref[k], rtol=1e-12, atol=0, msg=k)
    # the base class's d log sigma agrees with a central difference of log sigma (it feeds g^2 and lambda')
    h = 1e-6 * (s.T - s.t_min)
    tt = t[1:-1]
    torch.testing.assert_close(s.d_log_sigma(tt), (s.log_sigma(tt + h) - s.log_sigma(tt - h)) / (2 * h),
                               rtol=1e-6, atol=0)
    # sub-VP: variance below the VP one with the same alpha, and g^2 below VP's beta
    assert (s.sigma(t) ** 2 < 1 - s.alpha(t) ** 2).all()
    assert (s.g2(t) < -2 * ref["f"]).all()


def test_sde_coefficients_in_the_small_t_limit():
    # t -> 0: no cancellation in 1 - e^{-B}: sigma and g^2 keep full relative precision (Taylor series in B)
    s = make_schedule("sub_vp", t_min=1e-12)
    t = torch.tensor([1e-12, 1e-9, 1e-7], dtype=torch.float64)
    c = _paper({}, t)
    B, beta = c["B"], -2 * c["f"]
    torch.testing.assert_close(s.sigma(t), B * (1 - B / 2 + B ** 2 / 6), rtol=1e-13, atol=0)
    torch.testing.assert_close(s.g2(t), 2 * beta * B * (1 - B + 2 * B ** 2 / 3), rtol=1e-12, atol=0)


@pytest.mark.parametrize("p", PARAMS)
def test_lambda_decreasing_and_closed_form_inverse(p):
    s = make_schedule("sub_vp", **p)
    t = torch.linspace(s.t_min, s.T, 400, dtype=torch.float64)
    lam = s.lambda_(t)
    assert (torch.diff(lam) < 0).all() and (s.d_lambda(t) < 0).all()
    torch.testing.assert_close(s.t_of_lambda(lam), t, rtol=1e-11, atol=0)
    torch.testing.assert_close(s.t_of_sigma_hat(s.sigma_hat(t)), t, rtol=1e-11, atol=0)
    # an independent path: bisection of the monotone lambda(t) (no closed form) agrees with t_of_lambda
    target = torch.tensor([-4.0, -1.0, 0.0, 0.5, 3.0, 8.0], dtype=torch.float64)
    target = target[(target < lam[0]) & (target > lam[-1])]
    lo, hi = torch.full_like(target, s.t_min), torch.full_like(target, s.T)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        above = s.lambda_(mid) > target          # lambda decreases: the root lies later
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    torch.testing.assert_close(s.t_of_lambda(target), 0.5 * (lo + hi), rtol=1e-12, atol=1e-15)


def test_inverse_is_finite_far_outside_the_range():
    # B = 2 asinh(e^{-lambda}/2) written without overflow: t_of_lambda is finite and monotone at |lambda| of hundreds
    s = make_schedule("sub_vp")
    lam = torch.tensor([-800.0, -300.0, -50.0, -1e-12, 0.0, 1e-12, 40.0, 300.0], dtype=torch.float64)
    t = s.t_of_lambda(lam)
    assert torch.isfinite(t).all() and (torch.diff(t) <= 0).all() and (t >= 0).all()
    # lambda -> -inf: B ~ -2 lambda = 1600, dominated by its quadratic term (beta_max - beta_min)/2 t^2
    assert abs(float(t[0]) - (2 * 1600 / 19.9) ** 0.5) / float(t[0]) < 0.01
    torch.testing.assert_close(t[3], t[5], rtol=1e-12, atol=0)


def test_not_vp_and_described():
    s = make_schedule("sub_vp", beta_min=0.2, beta_max=10.0)
    assert s.is_vp is False           # alpha^2 + sigma^2 != 1 (diffusers' schedulers assume it)
    assert s.describe() == {"name": "sub_vp", "T": 1.0, "t_min": 1e-3, "beta_min": 0.2, "beta_max": 10.0}
    assert abs(s.prior_std() - (1 - math.exp(-5.1))) < 1e-12


def test_diffusers_solver_refuses_sub_vp():
    pytest.importorskip("diffusers")
    from bench.models.dynamics import Dynamics
    from bench.solvers.registry import get_solver
    m = load_model({"name": "gmm", "schedule": {"name": "sub_vp"}})
    t = torch.linspace(1.0, 1e-3, 5, dtype=torch.float64)
    with pytest.raises(ConfigError, match="variance-preserving.*'sub_vp'"):
        get_solver("diffusers").fn(Dynamics(m.net, m.schedule), torch.zeros(2, 4, dtype=torch.float64), t, None)


@pytest.mark.parametrize("p,needle", [
    ({"beta_min": -0.1}, "need beta_min >= 0"),
    ({"beta_max": 0.0}, "beta_max > 0"),
    ({"beta_min": 12.0, "beta_max": 2.0, "T": 1.5}, r"beta\(T\) > 0"),     # beta(1.5) = -3
    ({"t_min": 1.0}, "need 0 < t_min < T"),
    ({"s": 0.008}, "has no parameter 's'"),
    ({"beta_max": float("nan")}, "must be a finite number"),
])
def test_bad_parameters_are_config_errors(p, needle):
    with pytest.raises(ConfigError, match=needle):
        make_schedule("sub_vp", **p)


# ------------------------------------------------------------------------ the exact GMM against the forward SDE
def test_gmm_marginals_match_forward_sub_vp_sde():
    """Exact data samples pushed through the forward SDE (Euler-Maruyama, dt = 1/2000, the formula written out
    above) have the mean and covariance of the GMM's closed-form q_t = sum_k pi_k N(alpha mu_k, alpha^2 S_k +
    sigma^2 I) at t = 0.1, 0.3, 1 (Z = 4.5 standard errors from the exact fourth moments; measured max |z| 2.1 over
    the 45 statistics); the VP kernel (sigma^2 = 1 - alpha^2, same alpha) fails on the same samples (|z| 8 and 25).
    EM's bias, about |f| dt / 2 <= 2.5e-3 of the variance, is ~0.2 standard errors at n = 8000 (about 2.5 s)."""
    m = load_model({"name": "gmm", "schedule": {"name": "sub_vp"}})
    gmm, s = m.data, m.schedule
    n, steps = 8000, 2000
    g = torch.Generator().manual_seed(11)
    x = gmm.sample(n, generator=g)
    t_grid = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    dt = 1.0 / steps
    c = _paper({}, t_grid)
    drift, amp = c["f"] * dt, torch.sqrt(c["g2"] * dt)
    check = {steps // 10: 0.1, 3 * steps // 10: 0.3, steps: 1.0}
    for i in range(steps):
        x = x + drift[i] * x + amp[i] * torch.randn(x.shape, generator=g, dtype=torch.float64)
        if i + 1 in check:
            t = t_grid[i + 1]
            assert abs(float(t) - check[i + 1]) < 1e-12
            a, sg = float(s.alpha(t)), float(s.sigma(t))
            # GMMEps uses only alpha(t), sigma(t): its eps is -sigma times the score of this mixture
            torch.testing.assert_close(m.net(x[:5], t.expand(5)), -sg * gmm.score_t(x[:5], a, sg))
            assert_levels(x, mixture_at(gmm, a, sg), what=f"forward sub-VP at t={check[i + 1]}")
            if check[i + 1] <= 0.3:
                with pytest.raises(AssertionError):
                    assert_levels(x, mixture_at(gmm, a, math.sqrt(1 - a ** 2)))


# ------------------------------------------------------------------------ convergence orders on sub-VP
SUBVP_CASES = [c for c in CASES if c.schedule == "sub_vp"]


def test_sub_vp_cases_cover_the_brief():
    got = {(c.solver, tuple(sorted(c.knobs.items()))) for c in SUBVP_CASES}
    assert got == {("heun", ()), ("dpm_solver", (("order", 2),)), ("dpm_solver_pp", (("order", 2),)),
                   ("dpm_solver_pp", (("d2", "taylor"), ("order", 3))), ("unipc", (("order", 2), ("variant", "bh2")))}


@pytest.fixture(scope="module")
def subvp_prob():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield problem(64, schedule="sub_vp")
    torch.set_num_threads(n)


@pytest.mark.slow
@pytest.mark.parametrize("case", SUBVP_CASES, ids=[c.label for c in SUBVP_CASES])
def test_global_order_on_sub_vp(subvp_prob, case):
    assert subvp_prob[0].schedule.name == "sub_vp"
    p, nfes, errs = measure(case, *subvp_prob)
    assert min(errs) > 30 * 1e-11, "errors must stay well above the reference's own error (~1e-11 on sub_vp)"
    assert abs(p - theory(case)) < 0.2, (p, nfes, errs)
