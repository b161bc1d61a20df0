import pytest
import torch

from bench.models.errors import ConfigError
from bench.models.schedules import SCHEDULES, make_schedule

ALL = sorted(SCHEDULES)


def _grid(s, n=200):
    return torch.linspace(s.t_min, s.T, n, dtype=torch.float64)


@pytest.mark.parametrize("name", ALL)
def test_inverse_lambda_round_trip(name):
    s = make_schedule(name)
    t = _grid(s)
    assert torch.allclose(s.t_of_lambda(s.lambda_(t)), t, atol=1e-6, rtol=0)
    assert torch.allclose(s.t_of_sigma_hat(s.sigma_hat(t)), t, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_lambda_decreasing_and_sigma_hat(name):
    s = make_schedule(name)
    t = _grid(s)
    assert (torch.diff(s.lambda_(t)) < 0).all()
    assert torch.allclose(s.sigma_hat(t), s.sigma(t) / s.alpha(t), rtol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_f_is_dlogalpha_dt(name):
    s = make_schedule(name)
    t = _grid(s)[1:-1]
    h = 1e-6 * (s.T - s.t_min)
    if name == "vp_discrete":   # piecewise linear: keep both probes inside one piece
        t = (s.t_n[5:-5:37] + 0.5 / s.N).to(torch.float64)
        h = 1e-3 / s.N
    num = (s.log_alpha(t + h) - s.log_alpha(t - h)) / (2 * h)
    assert torch.allclose(s.f(t), num, rtol=1e-5, atol=1e-8)
    num_sigma = (s.log_sigma(t + h) - s.log_sigma(t - h)) / (2 * h)
    assert torch.allclose(s.d_log_sigma(t), num_sigma, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", ALL)
def test_g2_consistent_with_marginal_variance(name):
    # Forward SDE dx = f x dt + g dW: the noise variance obeys d sigma^2/dt = 2 f sigma^2 + g^2.
    s = make_schedule(name)
    t = _grid(s)[1:-1]
    h = 1e-6 * (s.T - s.t_min)
    if name == "vp_discrete":
        t = (s.t_n[5:-5:37] + 0.5 / s.N).to(torch.float64)
        h = 1e-3 / s.N
    dvar = (s.sigma(t + h) ** 2 - s.sigma(t - h) ** 2) / (2 * h)
    assert torch.allclose(dvar, 2 * s.f(t) * s.sigma(t) ** 2 + s.g2(t), rtol=1e-5, atol=1e-8)
    assert (s.g2(t) > 0).all()


def test_closed_forms():
    vp = make_schedule("vp_linear")
    t = torch.tensor([0.3, 0.9], dtype=torch.float64)
    assert torch.allclose(vp.g2(t), 0.1 + t * 19.9)                  # VP: g^2 = beta(t)
    assert torch.allclose(vp.alpha(t) ** 2 + vp.sigma(t) ** 2, torch.ones(2, dtype=torch.float64))
    edm = make_schedule("edm")
    assert torch.allclose(edm.sigma_hat(t), t) and abs(edm.prior_std() - 80.0) < 1e-9
    ve = make_schedule("ve", sigma_min=0.01, sigma_max=50.0)
    assert abs(float(ve.sigma(1.0)) - 50.0) < 1e-9 and abs(float(ve.sigma(0.0)) - 0.01) < 1e-12
    d = make_schedule("vp_discrete")
    # DDPM: alpha_bar_n = prod_{i<=n} (1 - beta_i), attained at t_n = (n+1)/N
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    n = torch.tensor([0, 499, 999], dtype=torch.float64)
    assert torch.allclose(d.alpha((n + 1) / 1000.0) ** 2, abar[n.long()], rtol=1e-10)
    cos = make_schedule("vp_cosine")
    assert abs(float(cos.alpha(0.0)) - 1.0) < 1e-12


def test_unknown_schedule_lists_names():
    with pytest.raises(ConfigError, match="vp_linear.*"):
        make_schedule("nope")
