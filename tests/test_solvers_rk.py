import pytest
import torch

from bench.metrics.trunc import fit_order, reference_solve, rms
from bench.orders import solve
from bench.models.dynamics import Dynamics
from bench.models.errors import ConfigError
from bench.solvers.registry import get_solver
from bench.solvers.rng import PerSampleRNG
from bench.solvers.timesteps import make_timesteps


@pytest.fixture(scope="module")
def problem(gmm_model):
    rng = PerSampleRNG(0, range(64), dtype=torch.float64)
    x_T = rng.randn(gmm_model.shape) * gmm_model.schedule.prior_std()
    ref, _ = reference_solve(gmm_model.net, gmm_model.schedule, x_T, gmm_model.schedule.T,
                             gmm_model.schedule.t_min, rtol=1e-11, atol=1e-11)
    return gmm_model, x_T, ref


def run_solver(model, name, nfe, x_T, timesteps="edm", **knobs):
    return solve(model, name, nfe, x_T, timesteps, **knobs)


def fitted_order(model, name, budgets, x_T, ref, **kw):
    errs, nfes = [], []
    for b in budgets:
        x0, nfe, _ = run_solver(model, name, b, x_T, **kw)
        errs.append(rms(x0, ref))
        nfes.append(nfe)
    return fit_order(nfes, errs)[0], errs


@pytest.mark.parametrize("name,budgets,order", [
    ("euler", [64, 128, 256, 512], 1.0),
    ("heun", [33, 65, 129, 257], 2.0),
])
@pytest.mark.parametrize("timesteps", ["edm", "logsnr", "uniform_t"])
def test_global_order_float64(problem, name, budgets, order, timesteps):
    model, x_T, ref = problem
    p, errs = fitted_order(model, name, budgets, x_T, ref, timesteps=timesteps)
    assert abs(p - order) < 0.2, (p, errs)


@pytest.mark.parametrize("variable", ["t", "lambda"])
def test_heun_order_in_other_variables(problem, variable):
    model, x_T, ref = problem
    p, errs = fitted_order(model, "heun", [65, 129, 257, 513], x_T, ref, timesteps="logsnr", variable=variable)
    assert abs(p - 2.0) < 0.2, (p, errs)


@pytest.mark.parametrize("name,formula", [("euler", lambda n: n), ("heun", lambda n: 2 * n - 1)])
@pytest.mark.parametrize("budget", [2, 3, 4, 10, 17, 18, 50])
def test_counted_nfe_equals_formula(gmm_model, name, formula, budget):
    spec = get_solver(name)
    if formula(spec.min_steps) > budget:
        with pytest.raises(ConfigError, match="cannot meet an NFE budget"):
            spec.steps_for(budget)
        return
    x_T = torch.randn(5, 4, dtype=torch.float64)
    _, nfe, steps = run_solver(gmm_model, name, budget, x_T)
    assert nfe == formula(steps) <= budget
    assert formula(steps + 1) > budget      # the budget is used, not rounded down further


def test_euler_sigma_hat_is_ddim(gmm_model):
    # DDIM (Song et al. 2021a, eq. 12 with eta = 0): x_s = alpha_s x0_hat + sigma_s eps_hat.
    sch = gmm_model.schedule
    x_T = torch.randn(7, 4, dtype=torch.float64)
    t = make_timesteps("logsnr", sch, 12)
    x0, _, _ = run_solver(gmm_model, "euler", 12, x_T, timesteps="logsnr")
    dyn = Dynamics(gmm_model.net, sch)
    x = x_T
    for i in range(len(t) - 1):
        eps = dyn.eps(x, t[i])
        x0_hat = dyn.x0(x, t[i], eps=eps)
        x = sch.alpha(t[i + 1]) * x0_hat + sch.sigma(t[i + 1]) * eps
    assert torch.allclose(x0, dyn.x0(x, t[-1]), rtol=1e-10, atol=1e-10)


def test_unknown_solver_lists_valid_names():
    with pytest.raises(ConfigError, match="Valid solver names are: .*euler.*heun"):
        get_solver("nope")
