"""Deterministic solvers: convergence orders, identities, counted NFE and input errors."""
import pytest
import torch

from bench.metrics.trunc import rms
from bench.orders import CASES, measure, problem, solve, theory
from bench.models.dynamics import Dynamics
from bench.models.errors import ConfigError
from bench.solvers.registry import get_solver
from bench.solvers.timesteps import make_timesteps


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tensors here are tiny (64 x 4): intra-op threads only add contention on a shared 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def prob():
    return problem(64)


# ---------------------------------------------------------------- orders (the cases `python -m bench orders` prints)

@pytest.mark.parametrize("case", [pytest.param(c, id=c.label, marks=[pytest.mark.slow] if max(c.budgets) > 300 else [])
                                  for c in CASES])
def test_global_order_float64(prob, case):
    p, nfes, errs = measure(case, *prob)
    assert min(errs) > 30 * 3e-11, "errors must stay well above the reference's own error (~3e-11)"
    assert abs(p - theory(case)) < 0.2, (p, nfes, errs)


# ---------------------------------------------------------------- identities

def _ddim(model, x_T, t):
    # DDIM (Song et al. 2021a, eq. 12, eta = 0): x_s = alpha_s x0_hat + sigma_s eps_hat; then x0 at t[-1].
    sch, dyn = model.schedule, Dynamics(model.net, model.schedule)
    x = x_T
    for i in range(len(t) - 1):
        eps = dyn.eps(x, t[i])
        x = sch.alpha(t[i + 1]) * dyn.x0(x, t[i], eps=eps) + sch.sigma(t[i + 1]) * eps
    return dyn.x0(x, t[-1])


@pytest.mark.parametrize("timesteps", ["logsnr", "edm"])
def test_ddim_equals_first_order_solvers(gmm_model, timesteps):
    x_T = torch.randn(7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = make_timesteps(timesteps, gmm_model.schedule, 12)
    ddim = _ddim(gmm_model, x_T, t)
    for name, knobs in [("euler", {}), ("ab", {"order": 1}), ("ab", {"order": 1, "ipndm": True}),
                        ("dpm_solver", {"order": 1}), ("dpm_solver_pp", {"order": 1}),
                        ("dpm_solver_pp", {"order": 1, "method": "singlestep"})]:
        dyn = Dynamics(gmm_model.net, gmm_model.schedule)
        x0 = get_solver(name).fn(dyn, x_T, t, None, **knobs)
        assert torch.allclose(x0, ddim, rtol=1e-10, atol=1e-10), (name, knobs, rms(x0, ddim))
        assert dyn.nfe == 12


@pytest.mark.parametrize("order", [2, 3, 4])
def test_ab_on_uniform_sigma_hat_grid_equals_ipndm(gmm_model, order):
    # On a grid uniform in the integration variable the variable-step AB weights are the fixed-step ones.
    sch = gmm_model.schedule
    s = torch.linspace(float(sch.sigma_hat(sch.T)), float(sch.sigma_hat(sch.t_min)), 30, dtype=torch.float64)
    t = sch.t_of_sigma_hat(s)
    x_T = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    a, b = (get_solver("ab").fn(Dynamics(gmm_model.net, sch), x_T, t, None, order=order, ipndm=ip, startup="lower")
            for ip in (False, True))
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)


def test_dpm_solver_pp_3m_d2_weight(prob):
    """The third-order update is exact for x0 quadratic in lambda only with 2*D2 ('taylor'); the reference code's
    weight ('dpm_solver_code') gives order 2, which the orders table shows."""
    from bench.solvers.exponential import D2_SCALE
    assert D2_SCALE == {"taylor": 2.0, "dpm_solver_code": 1.0}
    model, x_T, ref = prob
    e = [rms(solve(model, "dpm_solver_pp", 256, x_T, order=3, d2=d)[0], ref) for d in ("taylor", "dpm_solver_code")]
    assert e[0] < e[1] / 3


# ---------------------------------------------------------------- counted NFE = documented formula

FORMULAS = [
    ("midpoint", {}, lambda n: 2 * n - 1),
    ("rk4", {}, lambda n: 4 * n - 3),
    ("ab", {"order": 4, "startup": "rk"}, lambda n: n + 2 * min(3, n - 1)),   # three rk3 start-up steps, 2 extra each
    ("ab", {"order": 3, "startup": "rk"}, lambda n: n + min(2, n - 1)),       # two heun start-up steps, 1 extra each
    ("ab", {"order": 4}, lambda n: n),
    ("ab", {"order": 3, "ipndm": True}, lambda n: n),
    ("dpm_solver", {"order": 1}, lambda n: n),
    ("dpm_solver", {"order": 2}, lambda n: 2 * n - 1),
    ("dpm_solver", {"order": 3}, lambda n: 3 * n - 2),
    ("dpm_solver", {"fast": True}, lambda n: 3 * (n - 1)),
    ("dpm_solver_pp", {"order": 2}, lambda n: n),
    ("dpm_solver_pp", {"order": 3}, lambda n: n),
    ("dpm_solver_pp", {"order": 3, "lower_order_final": False}, lambda n: n),
    ("dpm_solver_pp", {"order": 2, "method": "singlestep"}, lambda n: 2 * n - 1),
    ("unipc", {"order": 2, "variant": "bh1"}, lambda n: n),
    ("unipc", {"order": 3}, lambda n: n),
    ("dopri5", {"method": "euler"}, lambda n: n),
    ("dopri5", {"method": "rk4"}, lambda n: 4 * n - 3),
    ("dopri5", {"method": "heun3"}, lambda n: 3 * n - 2),
]
from test_deis import NFE_CASES as _DEIS_NFE  # noqa: E402  (deis r = 1-3 x method x startup, ipndm_v k = 1-4)
FORMULAS += _DEIS_NFE


@pytest.mark.parametrize("name,knobs,formula", FORMULAS, ids=[f"{n}-{k}" for n, k, _ in FORMULAS])
@pytest.mark.parametrize("budget", [2, 3, 4, 5, 6, 7, 10, 17, 18, 50])
def test_counted_nfe_equals_formula(gmm_model, name, knobs, formula, budget):
    spec = get_solver(name)
    if formula(spec.min_steps) > budget:
        with pytest.raises(ConfigError, match="cannot meet an NFE budget"):
            spec.steps_for(budget, **knobs)
        return
    x_T = torch.randn(5, 4, dtype=torch.float64)
    _, nfe, steps = solve(gmm_model, name, budget, x_T, **knobs)
    assert nfe == formula(steps) == spec.nfe_of_steps(steps, **knobs) <= budget
    assert formula(steps + 1) > budget      # the budget is used, not rounded down further


def test_dpm_solver_fast_orders():
    from bench.solvers.exponential import fast_orders
    # Lu et al. 2022, sec. 3.4 with N = 3K - 1: K - 1 third-order steps and one second-order step.
    assert fast_orders(1) == [2] and fast_orders(4) == [3, 3, 3, 2]
    assert sum(fast_orders(7)) == 3 * 7 - 1


@pytest.mark.parametrize("order,steps,expect", [
    (3, 10, [1, 2, 3, 3, 3, 3, 3, 3, 2]),     # warm-up 1, 2; last interval lowered (steps < 15)
    (3, 20, [1, 2] + [3] * 17),            # enough steps: no lowering
    (2, 5, [1, 2, 2, 2]),
])
def test_dpm_solver_pp_multistep_orders(order, steps, expect):
    from bench.solvers.exponential import multistep_order
    assert [multistep_order(order, i, steps, True) for i in range(steps - 1)] == expect


def test_adaptive_dopri5_records_counted_nfe_within_budget(prob):
    model, x_T, ref = prob
    x0, nfe, steps = solve(model, "dopri5", 400, x_T, rtol=1e-7, atol=1e-7)
    assert steps == 400 and 20 < nfe <= 400
    assert rms(x0, ref) < 1e-5
    x1, nfe1, _ = solve(model, "dopri5", 400, x_T, rtol=1e-4, atol=1e-4)
    assert nfe1 < nfe and rms(x1, ref) > rms(x0, ref)


def test_adaptive_budget_is_a_cap_never_exceeded(gmm_model):
    x_T = torch.randn(8, 4, dtype=torch.float64)
    spec = get_solver("dopri5")
    t = make_timesteps("edm", gmm_model.schedule, spec.steps_for(30, rtol=1e-9, atol=1e-9))
    dyn = Dynamics(gmm_model.net, gmm_model.schedule)
    with pytest.raises(ConfigError, match="needs more than the NFE budget of 30.*loosen rtol/atol or raise nfe"):
        spec.fn(dyn, x_T, t, None, rtol=1e-9, atol=1e-9)
    assert dyn.nfe <= 29


# ---------------------------------------------------------------- clear errors

@pytest.mark.parametrize("name,knobs,needle", [
    ("ab", {"order": 5}, "order=5 is not available. Valid values are: 1, 2, 3, 4"),
    ("ab", {"ipndm": "yes"}, "ipndm='yes'"),
    ("dpm_solver", {"order": 4}, "order=4 is not available. Valid values are: 1, 2, 3"),
    ("dpm_solver_pp", {"order": 3, "method": "singlestep"}, "order=3 is not available. Valid values are: 1, 2"),
    ("dpm_solver_pp", {"method": "adaptive"}, "method='adaptive' is not available. Valid values are: multistep, singlestep"),
    ("dpm_solver_pp", {"order": 3, "d2": "half"}, "d2='half'"),
    ("unipc", {"order": 4}, "order=4 is not available"),
    ("unipc", {"variant": "bh3"}, "variant='bh3' is not available. Valid values are: bh1, bh2"),
    ("dopri5", {"method": "rk45"}, "method='rk45' is not available. Valid values are: dopri5"),
    ("ab", {"variable": "nope"}, "Valid variables are: sigma_hat, t, lambda"),
])
def test_bad_knobs_are_config_errors(gmm_model, name, knobs, needle):
    spec = get_solver(name)
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        steps = spec.steps_for(20, **knobs)
        spec.fn(Dynamics(gmm_model.net, gmm_model.schedule), torch.zeros(2, 4, dtype=torch.float64),
                make_timesteps("edm", gmm_model.schedule, steps), None, **knobs)


@pytest.mark.parametrize("name,knobs,budget,need", [
    ("rk4", {}, 4, 5),
    ("dpm_solver", {"order": 3}, 3, 4),
    ("dpm_solver", {"order": 2}, 2, 3),
    ("dpm_solver", {"fast": True}, 2, 3),
    ("dpm_solver_pp", {"order": 2, "method": "singlestep"}, 2, 3),
    ("dopri5", {"method": "rk4"}, 4, 5),
])
def test_budget_below_what_the_order_needs(name, knobs, budget, need):
    with pytest.raises(ConfigError, match=f"cannot meet an NFE budget of {budget}: .* needs at least {need}"):
        get_solver(name).steps_for(budget, **knobs)


def test_float32_sampling_runs_close_to_float64(gmm_model):
    x_T = torch.randn(16, 4, dtype=torch.float64)
    for name, knobs in [("dpm_solver", {"order": 3}), ("dpm_solver_pp", {"order": 3}), ("unipc", {"order": 3}),
                        ("ab", {"order": 4})]:
        a = solve(gmm_model, name, 40, x_T, **knobs)[0]
        b = solve(gmm_model, name, 40, x_T.float(), **knobs)[0]
        assert b.dtype == torch.float32 and rms(a, b) < 1e-4, (name, rms(a, b))


def test_orders_command_prints_fitted_orders(capsys):
    from bench.__main__ import main
    assert main(["orders", "--quick", "--only", "dpm_solver"]) == 0
    rows = [l.split() for l in capsys.readouterr().out.splitlines() if l.startswith("dpm_solver ")]
    assert [r[1] for r in rows] == ["order=1", "order=2", "order=3", "fast"]
    for r in rows:
        assert abs(float(r[3]) - float(r[2])) < 0.3, r     # fitted vs theory, two budgets only


def test_orders_command_bad_option_is_an_error(capsys):
    from bench.orders import main
    assert main(["--only", "nope"]) == 2
    assert "Unknown solver 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--samples", "0"])
    assert e.value.code == 2


@pytest.mark.parametrize("name,knobs", [("ab", {"order": 4}), ("ab", {"order": 3, "ipndm": True}),
                                        ("dpm_solver", {"order": 3}), ("dpm_solver", {"fast": True}),
                                        ("dpm_solver_pp", {"order": 3}), ("dpm_solver_pp", {"method": "singlestep"}),
                                        ("unipc", {"order": 3}), ("dopri5", {"method": "rk4"})])
def test_sample_does_not_depend_on_batch(gmm_model, name, knobs):
    x_T = torch.randn(9, 4, generator=torch.Generator().manual_seed(3))
    full = solve(gmm_model, name, 20, x_T, **knobs)[0]
    part = solve(gmm_model, name, 20, x_T[2:5], **knobs)[0]
    assert torch.equal(full[2:5], part)
