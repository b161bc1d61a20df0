"""The flow-matching schedule (issue 10, item 2): alpha = 1 - t, sigma = t (rectified flow), SD3's time shift as a grid
(timesteps=shifted), the exact GMM on it, parity with diffusers' FlowMatchEulerDiscreteScheduler, and convergence of
an exponential integrator and of stochastic samplers on it."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from bench.models.dynamics import Dynamics
from bench.models.errors import ConfigError
from bench.models.registry import load_model
from bench.models.schedules import make_schedule
from bench.orders import solve
from bench.solvers.registry import get_solver
from bench.solvers.timesteps import make_timesteps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # test_stochastic_levels imports tests.*
from test_stochastic_levels import assert_levels, mixture_at, sample_from_exact_q_T  # noqa: E402



def _close(a, b, rtol=1e-12, atol=1e-12):
    """allclose with the largest difference in the message (torch.testing.assert_close costs 1.3 s to import)."""
    a, b = torch.as_tensor(a), torch.as_tensor(b).to(torch.as_tensor(a).dtype)
    assert torch.allclose(a, b, rtol=rtol, atol=atol), float((a - b).abs().max())

def _gmm(p="eps"):
    return load_model({"name": "gmm", "parametrization": p, "schedule": {"name": "flow"}})


def test_closed_forms():
    s = make_schedule("flow")
    assert (s.T, s.t_min) == (0.999, 1e-3) and not s.is_vp
    t = torch.linspace(s.t_min, s.T, 101, dtype=torch.float64)
    _close(s.alpha(t), 1 - t, rtol=1e-15, atol=1e-15)
    _close(s.sigma(t), t, rtol=1e-15, atol=0)
    _close(s.lambda_(t), torch.log((1 - t) / t), rtol=1e-13, atol=1e-13)
    _close(s.t_of_lambda(s.lambda_(t)), t, rtol=1e-13, atol=0)
    _close(s.sigma_hat(t), t / (1 - t), rtol=1e-12, atol=0)
    _close(s.f(t), -1 / (1 - t), rtol=1e-14, atol=0)
    _close(s.g2(t), 2 * t / (1 - t), rtol=1e-13, atol=0)
    _close(s.d_alpha(t), -torch.ones_like(t))
    _close(s.d_sigma(t), torch.ones_like(t))
    # the forward SDE's variance: d sigma^2/dt = 2 f sigma^2 + g^2 (central differences of sigma(t)^2)
    ti, h = t[1:-1], 1e-6
    dvar = (s.sigma(ti + h) ** 2 - s.sigma(ti - h) ** 2) / (2 * h)
    _close(dvar, 2 * s.f(ti) * s.sigma(ti) ** 2 + s.g2(ti), rtol=1e-7, atol=1e-9)
    assert s.prior_std() == pytest.approx(0.999)
    assert torch.isfinite(s.d_alpha(torch.tensor(1.0, dtype=torch.float64)))      # closed form where alpha = 0


@pytest.mark.parametrize("T", [1.0, 1.5])
def test_T_at_or_beyond_one_is_refused(T):
    with pytest.raises(ConfigError, match=r"noise schedule 'flow': T=.*need T < 1 \(at t = 1 alpha = 0 and lambda = -inf"):
        make_schedule("flow", T=T)
    with pytest.raises(ConfigError, match="no parameter 'beta_min'"):
        make_schedule("flow", beta_min=0.1)


def test_exact_velocity_at_pure_noise_is_x_minus_the_data_mean():
    """At t = 1, x = eps, so E[eps | x] = x and E[x0 | x] = E[x0]: u(x, 1) = x - mean (the GMM's closed form at alpha = 0,
    where the eps path cannot give it)."""
    m = _gmm("velocity")
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    u = m.raw_net(x, torch.ones(5, dtype=torch.float64))
    _close(u, x - m.data.mean(), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_shifted_grid(shift):
    s = make_schedule("flow")
    n = 9
    t = make_timesteps("shifted", s, n, shift=shift)
    w_inv = lambda t: t / (shift - (shift - 1) * t)                     # noqa: E731  the shift's inverse
    u = torch.linspace(w_inv(s.T), w_inv(s.t_min), n, dtype=torch.float64)
    _close(t, shift * u / (1 + (shift - 1) * u), rtol=1e-13, atol=0)   # SD3's formula
    assert float(t[0]) == s.T and float(t[-1]) == s.t_min
    _close(s.sigma_hat(t), shift * s.sigma_hat(u), rtol=1e-10, atol=0)
    if shift == 1.0:
        _close(t, make_timesteps("uniform_t", s, n), rtol=1e-14, atol=0)
    with pytest.raises(ConfigError, match="shift must be a positive number"):
        make_timesteps("shifted", s, n, shift=0)


@pytest.mark.slow                     # imports diffusers (~4 s)
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_diffusers_flow_match_euler_equals_our_euler(shift):
    """diffusers' FlowMatchEulerDiscreteScheduler (x + (sigma_next - sigma) v) stepping the exact GMM velocity equals
    our euler (x + (t_next - t) ode_rhs; on flow Euler in t, in sigma_hat and DDIM coincide) on the same grid.
    Its grid is ours: set_timesteps(sigmas=u) shifts u as timesteps=shifted does.  diffusers' step casts the state to
    float32 (`sample.to(torch.float32)`), so the two agree to float32 rounding; the same recurrence in float64 agrees
    to 1e-10 (Euler in sigma_hat works on x/alpha, 1000 x at T = 0.999: measured 3e-11)."""
    diffusers = pytest.importorskip("diffusers")
    m = _gmm("velocity")
    s, n, steps = m.schedule, 16, 12
    w_inv = lambda t: t / (shift - (shift - 1) * t)                     # noqa: E731
    u = torch.linspace(w_inv(s.T), w_inv(s.t_min), steps, dtype=torch.float64)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=u.tolist())
    sig = sched.sigmas.double()
    assert len(sig) == steps + 1 and float(sig[-1]) == 0.0
    grid = make_timesteps("shifted", s, steps, shift=shift)
    assert float((sig[:-1] - grid).abs().max()) < 1e-6                  # diffusers' float32 sigmas
    t = sig[:-1].clone()
    x_T = torch.randn(n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * float(t[0])
    x = x_T.clone()
    for i, tau in enumerate(sched.timesteps):
        x = sched.step(m.raw_net(x, sig[i].expand(n)), tau, x).prev_sample
    y = x_T.clone()                                                       # the same recurrence in float64
    for i in range(steps):
        y = y + (sig[i + 1] - sig[i]) * m.raw_net(y, sig[i].expand(n))
    eps_model = _gmm("eps")
    for variable in ("sigma_hat", "t"):
        with torch.inference_mode():
            ours = get_solver("euler").fn(Dynamics(eps_model.net, s), x_T, t, None, variable=variable)
            ours_v = get_solver("euler").fn(Dynamics(m.net, s), x_T, t, None, variable=variable)
        err64, err_diffusers = float((ours - y).abs().max()), float((ours - x).abs().max())
        print(f"\nshift {shift} euler variable={variable}: |ours - float64 recurrence| = {err64:.1e}, "
              f"|ours - diffusers| = {err_diffusers:.1e}, |velocity - eps parametrization| = "
              f"{float((ours - ours_v).abs().max()):.1e}")
        assert err64 <= 1e-10 and err_diffusers <= 1e-5 and float((ours - ours_v).abs().max()) <= 1e-10
    # not vacuous: Euler in lambda is another method, off by far more than the tolerance
    with torch.inference_mode():
        lam = get_solver("euler").fn(Dynamics(eps_model.net, s), x_T, t, None, variable="lambda")
    assert float((lam - y).abs().max()) > 1e-3


def test_dpm_solver_pp_converges_with_order_two_on_flow():
    """DPM-Solver++(2M) on the flow schedule (lambda in [-6.9, 6.9]) from x_T ~ N(0, T^2): order 2.00 at NFE 16-64
    against 3M at NFE 1024 (its own error ~4e-7, below 1e-4 of the smallest error here)."""
    m = _gmm()
    x_T = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * m.schedule.prior_std()
    with torch.inference_mode():
        ref = solve(m, "dpm_solver_pp", 1024, x_T, order=3, d2="taylor")[0]
        errs, nfes = [], []
        for nfe in (16, 32, 64):
            x, n_used, _ = solve(m, "dpm_solver_pp", nfe, x_T, order=2)
            errs.append(float(((x - ref) ** 2).mean().sqrt()))
            nfes.append(n_used)
    order = -(math.log(errs[-1]) - math.log(errs[0])) / (math.log(nfes[-1]) - math.log(nfes[0]))
    print(f"\nflow dpm_solver_pp 2M: NFE {nfes}, RMS errors {[f'{e:.2e}' for e in errs]}, order {order:.2f}")
    assert 1.8 < order < 2.4, (nfes, errs)


def test_velocity_gmm_on_flow_matches_the_data_moments():
    """The exact GMM in the velocity parametrization under flow, sampled by heun from exact q_T samples, has the data's
    mean and covariance within 4.5 standard errors (the deterministic solver's error at NFE 59 is far below them)."""
    m = _gmm("velocity")
    x = sample_from_exact_q_T(m, "heun", 59, 2000)
    assert_levels(x, mixture_at(m.data), what="flow heun velocity")


@pytest.mark.parametrize("name,nfe,seed", [("dpm_solver_pp_sde", 100, 0),
                                           pytest.param("euler_maruyama", 400, 1, marks=pytest.mark.slow)])
def test_stochastic_samplers_on_flow_match_the_data_moments(name, nfe, seed):
    """The reverse SDE on flow (g^2 = 2t/(1 - t), 2000 at T): dpm_solver_pp_sde (exact linear part and noise in
    lambda, logsnr steps) and Euler-Maruyama (uniform_t steps) from exact q_T samples reach the data moments within
    4.5 standard errors at n = 4000 (measured max |z|: 1.04 and 1.29; Euler-Maruyama at seed 0 shows 3.5 on one
    mean at NFE 400 and 800 alike, a fluctuation of that seed's x_T draw, not a bias)."""
    m = _gmm()
    x = sample_from_exact_q_T(m, name, nfe, 4000, seed=seed)
    assert_levels(x, mixture_at(m.data), what=f"flow {name} nfe={nfe}")


def test_gmm_runs_under_flow_through_the_cli(tmp_path):
    """model.schedule.name=flow on the command line (the gmm YAML's vp_linear keys dropped): a finished row whose
    recorded grid spans the flow schedule's sigma_hat range [t_min/(1 - t_min), T/(1 - T)] = [0.001, 999]."""
    from bench import store
    from test_faults import run_cli
    rc, out, err = run_cli("run", "model=gmm", "model.schedule.name=flow", "~model.schedule.beta_min",
                           "~model.schedule.beta_max", "model.schedule.T=0.999", "solver=dpm_solver_pp", "nfe=10",
                           "n_samples=8", "metrics=[]", "progress=false", f"results_dir={tmp_path}")
    assert rc == 0, err
    df = store.load_runs(tmp_path)
    assert len(df) == 1 and df.iloc[0]["status"] == "ok"
    import json
    cfg = df.iloc[0]["config"]
    ts = (json.loads(cfg) if isinstance(cfg, str) else cfg)["timesteps"]
    assert ts["model_sigma_hat_range"] == pytest.approx([999.0, 0.001001], rel=1e-4)
