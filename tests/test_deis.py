"""DEIS (solvers/deis.py) and the variable-step iPNDM (solvers/ipndm_v.py): counted NFE, knob errors, the exactness
of the exponential-integrator weights, and identities with ab and with diffusers' DEISMultistepScheduler.  The
convergence orders are Cases of bench/orders.py (tests/test_solvers_deterministic.py); the golden steps are in
tests/test_golden_steps.py."""
import inspect
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.models.dynamics import Dynamics
from bench.models.errors import ConfigError
from bench.models.registry import load_model
from bench.models.schedules import make_schedule
from bench.orders import solve
from bench.solvers.deis import deis_weights
from bench.solvers.ipndm_v import ipndm_v_coefficients
from bench.solvers.registry import get_solver, solver_from_cfg
from bench.solvers.timesteps import make_timesteps

METHODS = ("tab", "rhoab", "logrho")
CONF = Path(__file__).resolve().parents[1] / "conf" / "solver"


def _x_T(model, n=5, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *model.shape, dtype=torch.float64, generator=g) * model.schedule.prior_std()


def _run(model, name, t, x_T, **knobs):
    dyn = Dynamics(model.net, model.schedule)
    return get_solver(name).fn(dyn, x_T, t, None, **knobs), dyn.nfe


@pytest.mark.parametrize("name", ["deis", "ipndm_v"])
def test_yaml_has_every_knob_with_the_function_default_and_a_comment(name):
    from omegaconf import OmegaConf
    params = list(inspect.signature(get_solver(name).fn).parameters.values())[4:]
    yaml = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml")).items() if k != "name"}
    assert {p.name: p.default for p in params} == yaml
    lines = [ln for ln in (CONF / f"{name}.yaml").read_text().splitlines() if ln and not ln.startswith(("#", "name:"))]
    assert len(lines) == len(params) and all("  # " in ln for ln in lines), lines


# ---------------------------------------------------------------------------------------------- counted NFE
def _deis_nfe(order, startup):
    extra = {1: 0, 2: 1, 3: 2}[order] if startup == "rk" else 0     # heun / rk3 start-up: 1 / 2 extra per step
    return lambda n: n + extra * min(order, n - 1)


NFE_CASES = [("deis", {"order": r, "method": m, "startup": st}, _deis_nfe(r, st))
             for r in (1, 2, 3) for m in METHODS for st in ("lower", "rk")]
NFE_CASES += [("ipndm_v", {"order": k}, lambda n: n) for k in (1, 2, 3, 4)]


# checked by tests/test_solvers_deterministic.py::test_counted_nfe_equals_formula, which includes NFE_CASES


def test_rk_startup_costs_what_the_yaml_says(gmm_model):
    # conf/solver/deis.yaml: NFE = steps (+2 for order 2, +6 for order 3 with startup=rk)
    spec = get_solver("deis")
    assert [spec.nfe_of_steps(20, order=r, startup="rk") for r in (1, 2, 3)] == [20, 22, 26]
    assert [spec.nfe_of_steps(20, order=r) for r in (1, 2, 3)] == [20, 20, 20]


# ---------------------------------------------------------------------------------------------- bad knobs
@pytest.mark.parametrize("name,knobs,needle", [
    ("deis", {"order": 4}, "solver 'deis': order=4 is not available. Valid values are: 1, 2, 3"),
    ("deis", {"order": 0}, "order=0 is not available"),
    ("deis", {"method": "rk"}, "method='rk' is not available. Valid values are: tab, rhoab, logrho"),
    ("deis", {"startup": "auto"}, "startup='auto' is not available. Valid values are: lower, rk"),
    ("ipndm_v", {"order": 5}, "solver 'ipndm_v': order=5 is not available. Valid values are: 1, 2, 3, 4"),
])
def test_bad_knobs_are_config_errors_before_any_evaluation(gmm_model, name, knobs, needle):
    spec = get_solver(name)
    with pytest.raises(ConfigError, match=needle):
        spec.steps_for(20, **knobs)
    dyn = Dynamics(gmm_model.net, gmm_model.schedule)
    with pytest.raises(ConfigError, match=needle):
        spec.fn(dyn, _x_T(gmm_model), make_timesteps("edm", gmm_model.schedule, 8), None, **knobs)
    assert dyn.nfe == 0


@pytest.mark.parametrize("node", [{"name": "deis", "order": "2"}, {"name": "deis", "steps": 3},
                                  {"name": "ipndm_v", "order": 2.0}, {"name": "ipndm_v", "variable": "t"}])
def test_knob_names_and_types_are_checked(node):
    with pytest.raises(ConfigError, match="solver '(deis|ipndm_v)'"):
        solver_from_cfg(node)


# ---------------------------------------------------------------------------------------------- exactness
def _log_moment(a, b, m):
    """int_a^b (log s)^m ds = [s sum_k (-1)^(m-k) m!/k! (log s)^k]_a^b."""
    F = lambda s: s * sum((-1) ** (m - k) * math.factorial(m) / math.factorial(k) * math.log(s) ** k  # noqa: E731
                          for k in range(m + 1))
    return F(b) - F(a)


def _moments(schedule, t, method, order):
    """(sum_j W_ij v_{i-j}^m, exact int v^m d sigma_hat) for every row i and m < its number of points."""
    W = deis_weights(schedule, t, order, method)
    sh = schedule.sigma_hat(t).tolist()
    if method == "tab":                  # VE: sigma_hat = sigma_min (sigma_max/sigma_min)^t, so t is affine in log sigma_hat
        c, l0 = math.log(schedule.sigma_max / schedule.sigma_min), math.log(schedule.sigma_min)
        v = t.tolist()
        exact = lambda a, b, m: sum(math.comb(m, k) * (-l0) ** (m - k) * _log_moment(a, b, k)  # noqa: E731
                                    for k in range(m + 1)) / c ** m
    elif method == "rhoab":
        v = sh
        exact = lambda a, b, m: (b ** (m + 1) - a ** (m + 1)) / (m + 1)  # noqa: E731
    else:                                # v = lambda = -log sigma_hat
        v = [-math.log(s) for s in sh]
        exact = lambda a, b, m: (-1) ** m * _log_moment(a, b, m)  # noqa: E731
    out = []
    for i, row in enumerate(W):
        for m in range(len(row)):
            out.append((sum(w * v[i - j] ** m for j, w in enumerate(row)), exact(sh[i], sh[i + 1], m)))
    return out


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_weights_integrate_the_extrapolating_polynomial_exactly(method, order):
    """W_ij (eq. 17 over alpha(t_{i+1})) integrate every polynomial of degree < (points of row i) in the method's variable
    exactly against d sigma_hat: a weight 1e-10 off fails.  tab on the VE schedule, where int t^m d sigma_hat has a
    closed form; rhoab and logrho on vp_linear."""
    sch = make_schedule("ve") if method == "tab" else make_schedule("vp_linear")
    t = make_timesteps("edm", sch, 9)
    for got, want in _moments(sch, t, method, order):
        assert abs(got - want) <= 1e-11 * max(1.0, abs(want)), (got, want)


def test_tab_weights_sum_to_the_sigma_hat_step_on_vp():
    # degree 0 in t on a VP schedule: sum_j C_ij / alpha(t_{i+1}) = sigma_hat(t_{i+1}) - sigma_hat(t_i) (DDIM's weight)
    sch = make_schedule("vp_linear")
    t = make_timesteps("logsnr", sch, 12)
    sh = sch.sigma_hat(t).tolist()
    for i, row in enumerate(deis_weights(sch, t, 3, "tab")):
        assert sum(row) == pytest.approx(sh[i + 1] - sh[i], rel=1e-13)


def test_tab_differs_from_rhoab_and_logrho(gmm_model):
    """The three methods are different integrators: their samples on one grid differ by more than rounding."""
    t = make_timesteps("edm", gmm_model.schedule, 8)
    x_T = _x_T(gmm_model)
    out = {m: _run(gmm_model, "deis", t, x_T, order=2, method=m)[0] for m in METHODS}
    for a, b in (("tab", "rhoab"), ("tab", "logrho"), ("rhoab", "logrho")):
        assert float((out[a] - out[b]).abs().max()) > 1e-4, (a, b)


# ---------------------------------------------------------------------------------------------- identities
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("startup", ["lower", "rk"])
def test_rhoab_is_adams_bashforth_in_sigma_hat(gmm_model, order, startup):
    """rhoAB-r: d x_hat / d rho = eps with eps extrapolated in rho = sigma_hat is variable-step AB-(r+1) in sigma_hat."""
    t = make_timesteps("edm", gmm_model.schedule, 9)
    x_T = _x_T(gmm_model)
    a, na = _run(gmm_model, "deis", t, x_T, order=order, method="rhoab", startup=startup)
    b, nb = _run(gmm_model, "ab", t, x_T, order=order + 1, variable="sigma_hat", startup=startup)
    assert na == nb
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), float((a - b).abs().max())


def test_tab_is_rhoab_where_t_is_sigma_hat():
    """On the EDM schedule (alpha = 1, sigma = t) t = sigma_hat: tAB and rhoAB are one method."""
    model = load_model({"name": "gmm", "schedule": {"name": "edm"}})
    t = make_timesteps("edm", model.schedule, 9)
    x_T = _x_T(model)
    a, _ = _run(model, "deis", t, x_T, order=3, method="tab")
    b, _ = _run(model, "deis", t, x_T, order=3, method="rhoab")
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), float((a - b).abs().max())


def test_deis_order_1_startup_lower_and_rk_agree(gmm_model):
    # an Euler (DDIM) start suffices for r = 1: no Runge-Kutta start-up step, the same numbers
    t = make_timesteps("edm", gmm_model.schedule, 7)
    x_T = _x_T(gmm_model)
    a, _ = _run(gmm_model, "deis", t, x_T, order=1)
    b, _ = _run(gmm_model, "deis", t, x_T, order=1, startup="rk")
    assert torch.equal(a, b)


class _NoDenoise:
    """Dynamics whose final x0-prediction hands back x: a solver then returns its state at t[-1]."""

    def __init__(self, dyn):
        self._dyn = dyn

    def __getattr__(self, k):
        return getattr(self._dyn, k)

    def x0(self, x, t, eps=None):
        return x

    def x0_at(self, x, t, alpha, sigma, eps=None):
        return x


@pytest.mark.slow                                   # importing diffusers takes seconds
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("solver_order", [2, 3])
def test_logrho_is_diffusers_deis_multistep(gmm_model, solver_order):
    """diffusers' DEISMultistepScheduler (solver_type 'logrho', solver_order = r + 1) is deis method=logrho on its own
    grid: discrete steps tau -> t = (tau + 1) dt, down to its last noise level sigma_hat(dt) (not 0: it does not
    denoise).  20 steps: its lower_order_final acts below 15."""
    diffusers = pytest.importorskip("diffusers")
    steps, dt = 20, gmm_model.schedule.T / 1000
    x_T = _x_T(gmm_model)
    dyn = Dynamics(gmm_model.net, gmm_model.schedule)
    theirs = get_solver("diffusers").fn(dyn, x_T, torch.zeros(steps), None, scheduler="DEISMultistepScheduler",
                                        config={"solver_order": solver_order})
    sched = diffusers.DEISMultistepScheduler(num_train_timesteps=1000, solver_order=solver_order)
    sched.set_timesteps(steps)
    t = torch.cat([(sched.timesteps.double() + 1) * dt, torch.tensor([dt], dtype=torch.float64)])
    ours = get_solver("deis").fn(_NoDenoise(Dynamics(gmm_model.net, gmm_model.schedule)), x_T, t, None,
                                 order=solver_order - 1, method="logrho")
    assert torch.allclose(ours, theirs, rtol=1e-10, atol=1e-10), float((ours - theirs).abs().max())
    tab = get_solver("deis").fn(_NoDenoise(Dynamics(gmm_model.net, gmm_model.schedule)), x_T, t, None,
                                order=solver_order - 1, method="tab")
    assert float((tab - theirs).abs().max()) > 1e-4           # the paper's tAB is another method


@pytest.mark.parametrize("order", [1, 2])
def test_ipndm_v_orders_1_2_are_adams_bashforth(gmm_model, order):
    t = make_timesteps("edm", gmm_model.schedule, 9)
    x_T = _x_T(gmm_model)
    a, _ = _run(gmm_model, "ipndm_v", t, x_T, order=order)
    b, _ = _run(gmm_model, "ab", t, x_T, order=order, startup="lower")
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), float((a - b).abs().max())


def test_ipndm_v_order_3_on_uniform_sigma_hat_steps_is_ipndm(gmm_model):
    sch = gmm_model.schedule
    s = torch.linspace(80.0, float(sch.sigma_hat(sch.t_min)), 12, dtype=torch.float64)
    t = sch.t_of_sigma_hat(s)
    x_T = _x_T(gmm_model)
    a, _ = _run(gmm_model, "ipndm_v", t, x_T, order=3)
    b, _ = _run(gmm_model, "ab", t, x_T, order=3, ipndm=True)
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), float((a - b).abs().max())


def test_ipndm_v_weights():
    """The facts solvers/ipndm_v.py states about diff-sampler's weights, on step sizes h_n, h_{n-1}, ... (newest first)."""
    rng = np.random.default_rng(0)
    # uniform steps: orders 1-3 are Adams-Bashforth (iPNDM); order 4 has 57, -65, 43, -11 over 24 (AB4: 55, -59, 37, -9)
    for k, want in ((1, [24]), (2, [36, -12]), (3, [46, -32, 10]), (4, [57, -65, 43, -11])):
        assert np.allclose(np.array(ipndm_v_coefficients([0.3] * k)) * 24, want, rtol=1e-13)
    for _ in range(20):
        h = list(rng.uniform(0.2, 2.0, 4))
        z = -np.cumsum([0.0] + h[1:3]) / h[0]               # nodes s_{n-j} - s_n in units of h_n
        w3 = np.array(ipndm_v_coefficients(h[:3]))
        # order 3: order conditions 0 and 1 exactly (sum w_j z_j^m = 1/(m+1)); condition 2 off the uniform grid
        assert [float((w3 * z ** m).sum()) for m in (0, 1)] == pytest.approx([1.0, 0.5], rel=1e-13)
        assert abs(float((w3 * z ** 2).sum()) - 1 / 3) > 1e-6
        # order 4: the weights sum to 1 + a_4 X (h_2/h_3 - h_1/h_2), with w_4 = -a_4 X h_1/h_2
        w4 = ipndm_v_coefficients(h)
        r1, r2 = h[1] / h[2], h[2] / h[3]
        assert sum(w4) == pytest.approx(1 - w4[3] / r1 * (r2 - r1), rel=1e-13)
        geo = [h[0] * 1.7 ** j for j in range(4)]          # geometric steps (a logsnr grid): consistent
        assert sum(ipndm_v_coefficients(geo)) == pytest.approx(1.0, rel=1e-13)


def test_float32_sampling_stays_float32_and_close(gmm_model):
    t = make_timesteps("edm", gmm_model.schedule, 10)
    x64 = _x_T(gmm_model)
    for name, knobs in (("deis", {"order": 3, "method": "tab"}), ("ipndm_v", {"order": 4})):
        a, _ = _run(gmm_model, name, t, x64, **knobs)
        b, _ = _run(gmm_model, name, t.float(), x64.float(), **knobs)
        assert b.dtype == torch.float32
        assert float((a - b.double()).abs().max()) < 1e-4 * float(a.abs().max())


@pytest.mark.parametrize("knobs,expect", [({"order": 3, "startup": "rk"}, {2: 2, 5: 6}),
                                          ({"order": 3}, {2: 3, 5: 6}), ({"order": 2, "startup": "rk"}, {2: 2, 5: 6})])
def test_diverged_step_with_runge_kutta_start_up(gmm_model, knobs, expect):
    """A start-up step (heun, rk3: last stage at its end point t[j]) outputs NaN first at step j when the network is
    NaN from t[j] down; a multistep step (one evaluation, at its start) at step j + 1 (end_evals, bench.run.step_of)."""
    from types import SimpleNamespace

    import bench.run as brun
    spec = get_solver("deis")
    t = make_timesteps("edm", gmm_model.schedule, 8).double()
    for j, step in expect.items():
        t_bad = float(t[j])

        def net(x, tt, t_bad=t_bad):
            out = gmm_model.net(x, tt)
            return torch.where(tt.reshape(-1, *[1] * (x.dim() - 1)) <= t_bad * (1 + 1e-12), torch.nan, out)
        model = SimpleNamespace(net=net, schedule=gmm_model.schedule, shape=gmm_model.shape)
        got = brun.locate_divergence(model, spec, knobs, t, 0, [0, 1], torch.device("cpu"), torch.float64)
        assert got == step, (knobs, j, got)
